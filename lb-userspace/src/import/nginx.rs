//! nginx's configuration grammar: a lexer and parser that turn nginx.conf (and every file its
//! `include`s name) into one tree of directives, each with the file and line it was written on.
//!
//! The tokens are nginx's own (`ngx_conf_read_token` in src/core/ngx_conf_file.c): words end at
//! whitespace, `;`, `{` or `}`; `#` starts a comment only where a word could start; `"…"` and
//! `'…'` are words in which `\"`, `\'`, `\\`, `\n`, `\r` and `\t` are escapes; a quote must be
//! followed by whitespace or `;{})`; `${name}` is a variable, its braces part of the word. What
//! nginx refuses here (an unbalanced brace, a directive without `;`, a word after a quote) is
//! refused with its file and line.
//!
//! `include` is expanded where it is written, as `nginx -T` shows the configuration: a pattern
//! relative to the main file's directory, with `*`, `?` and `[…]` matched per path component. The
//! input may also be `nginx -T`'s output itself, whose `# configuration file PATH:` headers give
//! the files; includes are then resolved among them.
use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

/// Where a directive was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: Arc<Path>,
    /// 1-based; 0 for the file as a whole.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            // The whole file, not a line of it.
            0 => write!(f, "{}", self.file.display()),
            line => write!(f, "{}:{line}", self.file.display()),
        }
    }
}

/// One directive: `name arg…;` or `name arg… { block }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directive {
    pub name: String,
    /// The arguments with quotes removed and escapes applied.
    pub args: Vec<String>,
    /// `None` for a simple directive, the directives inside its braces for a block.
    pub block: Option<Vec<Directive>>,
    pub at: Origin,
}

impl Directive {
    /// The block's directives (none for a simple directive).
    pub fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or(&[])
    }

    /// The directive as written, for messages: `name arg …`.
    pub fn text(&self) -> String {
        let mut s = self.name.clone();
        for a in &self.args {
            s.push(' ');
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || matches!(c, ';' | '{' | '}' | '#')) {
                s.push_str(&format!("\"{}\"", a.replace('"', "\\\"")));
            } else {
                s.push_str(a);
            }
        }
        s
    }
}

/// Input nginx itself would refuse, or that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {message}")]
pub struct ParseError {
    pub at: Origin,
    pub message: String,
}

/// Where the files come from: the file system, or the sections of an `nginx -T` dump.
#[derive(Debug)]
pub enum Files {
    Disk,
    /// Path → text, in the dump's order.
    Dump(BTreeMap<PathBuf, String>),
}

/// The deepest nesting of includes followed: nginx has no limit, but a file that includes
/// itself would never end.
const MAX_INCLUDE_DEPTH: usize = 16;
/// The most directives read from all files together: input beyond this is not a configuration
/// someone maintains by hand, and bounding it keeps a hostile input's memory bounded.
const MAX_DIRECTIVES: usize = 100_000;
/// The deepest nesting of blocks (nginx's own configurations go four deep), so that the
/// recursive descent stays within the stack whatever the input.
const MAX_NESTING: usize = 64;

/// Reads `main` and everything it includes into one tree.
pub fn parse_file(main: &Path, files: &Files) -> Result<Vec<Directive>, ParseError> {
    let whole = Origin { file: main.into(), line: 0 };
    let text = match files {
        Files::Disk => std::fs::read(main)
            .map_err(|e| ParseError {
                at: whole.clone(),
                message: format!("cannot read the nginx configuration: {e}; give its path (default /etc/nginx/nginx.conf)"),
            })
            .and_then(|bytes| utf8(bytes, &whole))?,
        Files::Dump(dump) => dump.get(main).cloned().ok_or_else(|| ParseError {
            at: whole.clone(),
            message: "not in the nginx -T output".into(),
        })?,
    };
    let base = main.parent().unwrap_or(Path::new("/")).to_owned();
    let mut reader = Reader { files, base, count: 0, nesting: 0 };
    reader.file(main.into(), &text, 0)
}

/// Splits `nginx -T` output into its files. The first file is the main one.
pub fn split_dump(text: &str) -> Result<(PathBuf, Files), ParseError> {
    const HEADER: &str = "# configuration file ";
    let mut files = BTreeMap::new();
    let mut first = None;
    let mut current: Option<(PathBuf, String)> = None;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        if let Some(path) = bare.strip_prefix(HEADER).and_then(|p| p.strip_suffix(':')) {
            if let Some((p, t)) = current.take() {
                files.insert(p, t);
            }
            let path = PathBuf::from(path);
            first.get_or_insert_with(|| path.clone());
            current = Some((path, String::new()));
        } else if let Some((_, t)) = &mut current {
            t.push_str(line);
        } else if !bare.trim().is_empty() && !bare.starts_with("nginx: ") {
            return Err(ParseError {
                at: Origin { file: Path::new("-").into(), line: 1 },
                message: format!(
                    "standard input is not nginx -T output: it does not start with \"{HEADER}PATH:\"; \
                     run `nginx -T | xlb import nginx -`, or give the configuration file's path"
                ),
            });
        }
    }
    if let Some((p, t)) = current.take() {
        files.insert(p, t);
    }
    let main = first.ok_or_else(|| ParseError {
        at: Origin { file: Path::new("-").into(), line: 1 },
        message: format!("no \"{HEADER}PATH:\" section in standard input; pipe `nginx -T` into it"),
    })?;
    Ok((main, Files::Dump(files)))
}

fn utf8(bytes: Vec<u8>, at: &Origin) -> Result<String, ParseError> {
    String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        ParseError {
            at: Origin { file: at.file.clone(), line },
            message: "not UTF-8 text; xlb reads nginx configurations written in UTF-8 (or ASCII)".into(),
        }
    })
}

struct Reader<'a> {
    files: &'a Files,
    /// The main file's directory, which relative include patterns start from (nginx's prefix
    /// conf directory).
    base: PathBuf,
    count: usize,
    /// Blocks open around the directive being read.
    nesting: usize,
}

/// What ended a list of directives.
#[derive(PartialEq)]
enum End {
    Eof,
    Brace,
}

impl Reader<'_> {
    fn file(&mut self, file: Arc<Path>, text: &str, depth: usize) -> Result<Vec<Directive>, ParseError> {
        let mut lexer = Lexer { file: file.clone(), text: text.as_bytes(), pos: 0, line: 1 };
        let (list, end) = self.list(&mut lexer, depth)?;
        if end == End::Brace {
            return Err(lexer.error(lexer.line, "unexpected \"}\": it closes no block; remove it or add the \"{\" it closes"));
        }
        Ok(list)
    }

    /// Directives up to the end of the file or a `}`.
    fn list(&mut self, lx: &mut Lexer, depth: usize) -> Result<(Vec<Directive>, End), ParseError> {
        let mut list = Vec::new();
        loop {
            let mut words: Vec<(String, usize)> = Vec::new();
            let term = loop {
                match lx.token()? {
                    Token::Word(w, line) => words.push((w, line)),
                    t => break t,
                }
            };
            let line = words.first().map(|w| w.1).unwrap_or(lx.line);
            let at = Origin { file: lx.file.clone(), line };
            match term {
                Token::Word(..) => unreachable!("words are collected above"),
                Token::Eof if words.is_empty() => return Ok((list, End::Eof)),
                Token::Eof => {
                    return Err(lx.error(line, "unexpected end of file, expecting \";\" or \"}\"; end the directive with \";\""));
                }
                Token::Close if words.is_empty() => return Ok((list, End::Brace)),
                Token::Close => {
                    return Err(lx.error(lx.line, "unexpected \"}\": the directive before it has no \";\"; add one"));
                }
                Token::Semicolon | Token::Open if words.is_empty() => {
                    let what = if term == Token::Open { "{" } else { ";" };
                    return Err(lx.error(lx.line, format!("unexpected \"{what}\" with no directive before it; remove it")));
                }
                Token::Semicolon | Token::Open => {}
            }
            self.count += 1;
            if self.count > MAX_DIRECTIVES {
                return Err(lx.error(line, format!("more than {MAX_DIRECTIVES} directives; this is not a configuration xlb imports")));
            }
            let mut words = words.into_iter().map(|w| w.0);
            let name = words.next().expect("not empty");
            let args: Vec<String> = words.collect();
            if term == Token::Open && name.ends_with("lua_block") {
                // Lua, not nginx's grammar, up to the brace that closes it (as lua-nginx-module
                // reads it); kept as an empty block.
                lx.skip_lua(line)?;
                list.push(Directive { name, args, block: Some(Vec::new()), at });
            } else if term == Token::Open {
                self.nesting += 1;
                if self.nesting > MAX_NESTING {
                    return Err(lx.error(line, format!("blocks nested more than {MAX_NESTING} deep")));
                }
                let (block, end) = self.list(lx, depth)?;
                self.nesting -= 1;
                if end == End::Eof {
                    return Err(lx.error(line, format!("\"{name}\" block has no closing \"}}\" before the end of the file; add it")));
                }
                list.push(Directive { name, args, block: Some(block), at });
            } else if name == "include" {
                let [pattern] = &args[..] else {
                    return Err(ParseError {
                        at,
                        message: "invalid number of arguments in \"include\" directive; write `include PATH;`".into(),
                    });
                };
                list.extend(self.include(pattern, &at, depth)?);
            } else {
                list.push(Directive { name, args, block: None, at });
            }
        }
    }

    fn include(&mut self, pattern: &str, at: &Origin, depth: usize) -> Result<Vec<Directive>, ParseError> {
        if depth >= MAX_INCLUDE_DEPTH {
            return Err(ParseError {
                at: at.clone(),
                message: format!("include \"{pattern}\": includes nested more than {MAX_INCLUDE_DEPTH} deep (does a file include itself?)"),
            });
        }
        let full = if Path::new(pattern).is_absolute() { PathBuf::from(pattern) } else { self.base.join(pattern) };
        let wild = pattern.contains(['*', '?', '[']);
        let paths = if wild {
            self.glob(&full, at)?
        } else {
            vec![full.clone()]
        };
        let mut out = Vec::new();
        for path in paths {
            let text = match self.files {
                Files::Disk => std::fs::read(&path)
                    .map_err(|e| ParseError {
                        at: at.clone(),
                        message: format!("include \"{pattern}\": cannot read {}: {e}", path.display()),
                    })
                    .and_then(|bytes| utf8(bytes, &Origin { file: path.as_path().into(), line: 0 }))?,
                Files::Dump(dump) => dump.get(&path).cloned().ok_or_else(|| ParseError {
                    at: at.clone(),
                    message: format!("include \"{pattern}\": {} is not in the nginx -T output", path.display()),
                })?,
            };
            out.extend(self.file(path.as_path().into(), &text, depth + 1)?);
        }
        Ok(out)
    }

    /// The files matching `pattern`, sorted as glob(3) sorts them.
    fn glob(&self, pattern: &Path, at: &Origin) -> Result<Vec<PathBuf>, ParseError> {
        let mut found = match self.files {
            Files::Dump(dump) => dump.keys().filter(|p| path_matches(pattern, p)).cloned().collect(),
            Files::Disk => {
                let mut candidates = vec![PathBuf::from("/")];
                for part in pattern.components().skip(1) {
                    let part = part.as_os_str().to_string_lossy();
                    let mut next = Vec::new();
                    for dir in &candidates {
                        if !part.contains(['*', '?', '[']) {
                            next.push(dir.join(&*part));
                            continue;
                        }
                        let Ok(entries) = std::fs::read_dir(dir) else { continue };
                        for entry in entries.flatten() {
                            let name = entry.file_name().to_string_lossy().into_owned();
                            if !name.starts_with('.') && matches(part.as_bytes(), name.as_bytes()) {
                                next.push(dir.join(name));
                            }
                        }
                    }
                    candidates = next;
                }
                let files: Vec<PathBuf> = candidates.into_iter().filter(|p| p.is_file()).collect();
                if files.len() > 1000 {
                    return Err(ParseError { at: at.clone(), message: format!("include \"{}\": more than 1000 files match", pattern.display()) });
                }
                files
            }
        };
        found.sort();
        Ok(found)
    }
}

/// Whether `path` matches the glob `pattern` component by component.
fn path_matches(pattern: &Path, path: &Path) -> bool {
    let (p, q): (Vec<_>, Vec<_>) = (pattern.components().collect(), path.components().collect());
    p.len() == q.len()
        && p.iter().zip(&q).all(|(a, b)| {
            matches(a.as_os_str().to_string_lossy().as_bytes(), b.as_os_str().to_string_lossy().as_bytes())
        })
}

/// fnmatch(3) without flags: `*`, `?` and `[…]` (with `!` or `^` negation and ranges).
fn matches(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| matches(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && matches(rest, &name[1..]),
        Some((b'[', rest)) if rest.contains(&b']') => {
            let Some((&c, tail)) = name.split_first() else { return false };
            let negate = matches!(rest.first(), Some(b'!' | b'^'));
            let set = if negate { &rest[1..] } else { rest };
            // A `]` first in the set is a member, not its end.
            let end = 1 + set[1..].iter().position(|&b| b == b']').map_or(set.len() - 1, |i| i);
            let (members, after) = (&set[..end.min(set.len())], set.get(end + 1..).unwrap_or(&[]));
            let mut hit = false;
            let mut i = 0;
            while i < members.len() {
                if i + 2 < members.len() && members[i + 1] == b'-' {
                    hit |= (members[i]..=members[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= members[i] == c;
                    i += 1;
                }
            }
            hit != negate && matches(after, tail)
        }
        Some((&p, rest)) => name.first() == Some(&p) && matches(rest, &name[1..]),
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    /// A word and the line it starts on.
    Word(String, usize),
    Semicolon,
    Open,
    Close,
    Eof,
}

struct Lexer<'a> {
    file: Arc<Path>,
    text: &'a [u8],
    pos: usize,
    line: usize,
}

impl Lexer<'_> {
    fn error(&self, line: usize, message: impl Into<String>) -> ParseError {
        ParseError { at: Origin { file: self.file.clone(), line }, message: message.into() }
    }

    fn bump(&mut self) -> Option<u8> {
        let c = *self.text.get(self.pos)?;
        self.pos += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn token(&mut self) -> Result<Token, ParseError> {
        loop {
            let Some(&c) = self.text.get(self.pos) else { return Ok(Token::Eof) };
            match c {
                b' ' | b'\t' | b'\r' | b'\n' => {
                    self.bump();
                }
                b'#' => {
                    while self.bump().is_some_and(|c| c != b'\n') {}
                }
                b';' => {
                    self.bump();
                    return Ok(Token::Semicolon);
                }
                b'{' => {
                    self.bump();
                    return Ok(Token::Open);
                }
                b'}' => {
                    self.bump();
                    return Ok(Token::Close);
                }
                b'"' | b'\'' => return self.quoted(c),
                _ => return self.word(),
            }
        }
    }

    /// Skips a Lua block's body and its closing brace: braces are counted outside strings and
    /// `--` comments.
    fn skip_lua(&mut self, line: usize) -> Result<(), ParseError> {
        let mut depth = 1;
        while let Some(c) = self.bump() {
            match c {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                b'"' | b'\'' => {
                    while let Some(d) = self.bump() {
                        if d == b'\\' {
                            self.bump();
                        } else if d == c || d == b'\n' {
                            break;
                        }
                    }
                }
                b'-' if self.text.get(self.pos) == Some(&b'-') => while self.bump().is_some_and(|c| c != b'\n') {},
                _ => {}
            }
        }
        Err(self.error(line, "the Lua block opened here has no closing \"}\" before the end of the file; add it"))
    }

    fn quoted(&mut self, quote: u8) -> Result<Token, ParseError> {
        let line = self.line;
        self.bump();
        let mut out = Vec::new();
        loop {
            let Some(c) = self.bump() else {
                return Err(self.error(line, format!("unexpected end of file: the {} quote opened here is not closed", quote as char)));
            };
            match c {
                b'\\' => match self.bump() {
                    Some(b'"') => out.push(b'"'),
                    Some(b'\'') => out.push(b'\''),
                    Some(b'\\') => out.push(b'\\'),
                    Some(b't') => out.push(b'\t'),
                    Some(b'r') => out.push(b'\r'),
                    Some(b'n') => out.push(b'\n'),
                    Some(other) => out.extend([b'\\', other]),
                    None => {
                        return Err(self.error(line, format!("unexpected end of file: the {} quote opened here is not closed", quote as char)));
                    }
                },
                c if c == quote => break,
                c => out.push(c),
            }
        }
        match self.text.get(self.pos) {
            None | Some(b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' | b'}' | b')') => {}
            Some(&c) => {
                return Err(self.error(self.line, format!(
                    "unexpected \"{}\" right after a closing quote; put a space between the quoted word and the next",
                    c as char
                )));
            }
        }
        Ok(Token::Word(String::from_utf8_lossy(&out).into_owned(), line))
    }

    fn word(&mut self) -> Result<Token, ParseError> {
        let line = self.line;
        let mut out = Vec::new();
        let mut variable = false;
        while let Some(&c) = self.text.get(self.pos) {
            match c {
                b' ' | b'\t' | b'\r' | b'\n' | b';' => break,
                // `${name}`: the braces belong to the word.
                b'{' if variable => {
                    self.bump();
                    out.push(c);
                    while let Some(c) = self.bump() {
                        out.push(c);
                        if c == b'}' {
                            break;
                        }
                        if matches!(c, b' ' | b'\n' | b';') {
                            return Err(self.error(line, "a \"${\" variable is not closed by \"}\"; write ${name}"));
                        }
                    }
                    variable = false;
                    continue;
                }
                b'{' | b'}' => break,
                b'\\' => {
                    self.bump();
                    out.push(b'\\');
                    if let Some(c) = self.bump() {
                        out.push(c);
                    }
                    variable = false;
                    continue;
                }
                _ => {}
            }
            variable = c == b'$';
            self.bump();
            out.push(c);
        }
        Ok(Token::Word(String::from_utf8_lossy(&out).into_owned(), line))
    }
}

/// Reads `text` as the file `path` without following includes to the disk: for tests and the
/// fuzz target, with `includes` as the other files.
pub fn parse_text(path: &Path, text: &str, includes: &[(&str, &str)]) -> Result<Vec<Directive>, ParseError> {
    let mut dump: BTreeMap<PathBuf, String> = includes.iter().map(|(p, t)| (PathBuf::from(p), t.to_string())).collect();
    dump.insert(path.to_owned(), text.to_owned());
    parse_file(path, &Files::Dump(dump))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Directive>, String> {
        parse_text(Path::new("/etc/nginx/nginx.conf"), text, &[]).map_err(|e| e.to_string())
    }

    #[test]
    fn blocks_quotes_comments_and_variables() {
        let tree = parse(
            "# top\nhttp {\n  add_header X-A \"a b; c\" always; # trailing\n  set $x ${host}x;\n  \
             log 'it s';\n  map $a $b { default 0; }\n}\n",
        );
        let tree = tree.unwrap();
        assert_eq!(tree.len(), 1);
        let http = &tree[0];
        assert_eq!((http.name.as_str(), http.at.line), ("http", 2));
        let names: Vec<_> = http.children().iter().map(|d| (d.name.as_str(), d.at.line)).collect();
        assert_eq!(names, [("add_header", 3), ("set", 4), ("log", 5), ("map", 6)]);
        assert_eq!(http.children()[0].args, ["X-A", "a b; c", "always"]);
        assert_eq!(http.children()[1].args, ["$x", "${host}x"]);
        assert_eq!(http.children()[2].args, ["it s"]);
        assert_eq!(http.children()[3].children()[0].args, ["0"]);
    }

    #[test]
    fn escapes_in_quotes() {
        let tree = parse("a \"q\\\"x\\\\y\\n\" 'b\\'c';").unwrap();
        assert_eq!(tree[0].args, ["q\"x\\y\n", "b'c"]);
    }

    #[test]
    fn what_nginx_refuses() {
        for (text, expected) in [
            ("http {\n server {\n}\n", "/etc/nginx/nginx.conf:1: \"http\" block has no closing \"}\" before the end of the file; add it"),
            ("http { }\n}\n", "/etc/nginx/nginx.conf:2: unexpected \"}\": it closes no block; remove it or add the \"{\" it closes"),
            ("http {\n listen 80\n}\n", "/etc/nginx/nginx.conf:3: unexpected \"}\": the directive before it has no \";\"; add one"),
            ("worker_processes 1", "/etc/nginx/nginx.conf:1: unexpected end of file, expecting \";\" or \"}\"; end the directive with \";\""),
            ("a \"b\"c;", "/etc/nginx/nginx.conf:1: unexpected \"c\" right after a closing quote; put a space between the quoted word and the next"),
            ("a \"b;\n", "/etc/nginx/nginx.conf:1: unexpected end of file: the \" quote opened here is not closed"),
            ("\n;", "/etc/nginx/nginx.conf:2: unexpected \";\" with no directive before it; remove it"),
            ("include a b;", "/etc/nginx/nginx.conf:1: invalid number of arguments in \"include\" directive; write `include PATH;`"),
        ] {
            assert_eq!(parse(text).unwrap_err(), expected, "{text:?}");
        }
    }

    #[test]
    fn includes_are_expanded_in_place_with_their_own_lines() {
        let tree = parse_text(
            Path::new("/etc/nginx/nginx.conf"),
            "http {\n  include conf.d/*.conf;\n  server_tokens off;\n}\n",
            &[("/etc/nginx/conf.d/b.conf", "\n\nupstream b { server 127.0.0.1:2; }\n"), ("/etc/nginx/conf.d/a.conf", "upstream a {}\n"), ("/etc/nginx/other", "x;")],
        )
        .unwrap();
        let inside: Vec<_> = tree[0].children().iter().map(|d| (d.args.first().cloned().unwrap_or_default(), d.at.to_string())).collect();
        assert_eq!(
            inside,
            [
                ("a".to_string(), "/etc/nginx/conf.d/a.conf:1".to_string()),
                ("b".into(), "/etc/nginx/conf.d/b.conf:3".into()),
                ("off".into(), "/etc/nginx/nginx.conf:3".into()),
            ]
        );
        let e = parse("http {\n include missing.conf;\n}").unwrap_err();
        assert_eq!(e, "/etc/nginx/nginx.conf:2: include \"missing.conf\": /etc/nginx/missing.conf is not in the nginx -T output");
        // A file including itself ends instead of recursing forever.
        let e = parse_text(Path::new("/n.conf"), "include /n.conf;", &[]).unwrap_err();
        assert!(e.message.contains("nested more than 16 deep"), "{e}");
    }

    #[test]
    fn includes_from_disk_follow_globs() {
        let dir = std::env::temp_dir().join(format!("xlb-import-glob-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sites")).unwrap();
        std::fs::write(dir.join("nginx.conf"), "http { include sites/*.conf; include none/*.conf; }").unwrap();
        std::fs::write(dir.join("sites/2.conf"), "two;").unwrap();
        std::fs::write(dir.join("sites/1.conf"), "one;").unwrap();
        std::fs::write(dir.join("sites/x.bak"), "bak;").unwrap();
        let tree = parse_file(&dir.join("nginx.conf"), &Files::Disk).unwrap();
        let names: Vec<_> = tree[0].children().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["one", "two"]);
        std::fs::write(dir.join("nginx.conf"), "http {\n include sites/3.conf; }").unwrap();
        let e = parse_file(&dir.join("nginx.conf"), &Files::Disk).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:2: include \"sites/3.conf\": cannot read", dir.join("nginx.conf").display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nginx_t_output_is_split_into_files() {
        let dump = "# configuration file /etc/nginx/nginx.conf:\nhttp { include conf.d/*.conf; }\n\n\
                    # configuration file /etc/nginx/conf.d/up.conf:\nupstream u { server 127.0.0.1:1; }\n";
        let (main, files) = split_dump(dump).unwrap();
        assert_eq!(main, Path::new("/etc/nginx/nginx.conf"));
        let tree = parse_file(&main, &files).unwrap();
        assert_eq!(tree[0].children()[0].at.to_string(), "/etc/nginx/conf.d/up.conf:1");
        assert!(split_dump("http {}\n").unwrap_err().message.contains("not nginx -T output"));
    }

    #[test]
    fn glob_matching() {
        for (p, n, m) in [("*.conf", "a.conf", true), ("*.conf", "a.conff", false), ("?.c", "ab.c", false), ("[a-c]x", "bx", true), ("[!a-c]x", "bx", false), ("*", "", true)] {
            assert_eq!(matches(p.as_bytes(), n.as_bytes()), m, "{p} {n}");
        }
    }
}

//! `xlb import nginx`: an nginx configuration read with nginx's grammar (`nginx`), mapped onto
//! the config module's typed values with a diagnostic for what does not carry over (`map`), and
//! written as `xlb.toml` (`emit`). The config module knows nothing of this one.
pub mod emit;
pub mod map;
pub mod nginx;

use std::path::Path;

pub use map::{Diagnostic, Import, Level, Options};
pub use nginx::{Directive, Files, Origin, ParseError};

use crate::config::{ChallengeKind, Config, ServiceMode};

/// How much of the configuration the written file carries over; the exit status of
/// `xlb import`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completeness {
    /// Everything (the notes say what differs in detail): exit status 0.
    Complete,
    /// Some directives were not carried over: exit status 3.
    Partial,
    /// Nothing xlb can serve: no file is written, exit status 1.
    Impossible,
}

impl Completeness {
    pub fn exit_code(self) -> u8 {
        match self {
            Completeness::Complete => 0,
            Completeness::Partial => 3,
            Completeness::Impossible => 1,
        }
    }
}

/// An import's result: the file (empty when impossible) and what to tell the user.
#[derive(Debug)]
pub struct Outcome {
    pub toml: String,
    pub import: Import,
    pub completeness: Completeness,
}

/// Reads, maps and writes out the configuration `main` (with `files` giving its includes).
/// `Err` is input nginx would refuse or that cannot be read: nothing is to be written then.
pub fn nginx(main: &Path, files: &Files, opts: &Options) -> Result<Outcome, ParseError> {
    let tree = nginx::parse_file(main, files)?;
    from_tree(main, &tree, opts)
}

/// The mapping and emission of a parsed tree; the emitted text is read back by `Config::parse`
/// before it is offered, so that what is written is what `xlb check` accepts.
pub fn from_tree(main: &Path, tree: &[Directive], opts: &Options) -> Result<Outcome, ParseError> {
    let mut import = map::map(tree, opts)?;
    let redirects = import.services.iter().any(|s| s.service.mode == ServiceMode::Redirect);
    for s in &mut import.services {
        if let Some(a) = &mut s.acme
            && !redirects
        {
            // HTTP-01 needs a redirect service on port 80; without one, TLS-ALPN-01 on 443.
            a.challenge = ChallengeKind::TlsAlpn01;
        }
    }
    if import.services.is_empty() {
        return Ok(Outcome { toml: String::new(), import, completeness: Completeness::Impossible });
    }
    let toml = emit::toml(&import, &main.display().to_string());
    if let Err(e) = Config::parse(Path::new("xlb.toml"), &toml) {
        return Err(ParseError {
            at: Origin { file: main.into(), line: 0 },
            message: format!("the imported config would not pass xlb's checks ({e}); fix the nginx configuration there, or write that part by hand"),
        });
    }
    let completeness = if import.complete() { Completeness::Complete } else { Completeness::Partial };
    Ok(Outcome { toml, import, completeness })
}

#[cfg(test)]
mod tests;

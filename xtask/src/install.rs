//! `cargo xtask install`: the release binary to `<prefix>/bin/xlb`, the systemd units to
//! `/etc/systemd/system/`, and the commented default config to `/etc/xlb/xlb.toml` unless one
//! exists. Everything lands under `--destdir` when given (a staging root, as for packaging).
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::workspace_root;

pub struct Options {
    pub prefix: PathBuf,
    pub destdir: Option<PathBuf>,
    pub dry_run: bool,
    /// Install this binary instead of building the release one.
    pub binary: Option<PathBuf>,
}

/// What to do with a file that exists already.
#[derive(Clone, Copy, PartialEq)]
enum Existing {
    Replace,
    /// The user's to edit: the config, and the app template whose ExecStart they fill in.
    Keep,
}

pub fn install(options: Options) -> anyhow::Result<()> {
    let Options {
        prefix,
        destdir,
        dry_run,
        binary,
    } = options;
    if !prefix.is_absolute() {
        bail!("--prefix {} must be an absolute path", prefix.display());
    }
    let binary = match binary {
        Some(path) => path,
        None if dry_run => workspace_root().join("target/release/xlb"),
        None => {
            crate::build(true)?;
            workspace_root().join("target/release/xlb")
        }
    };
    if !dry_run && !binary.is_file() {
        bail!(
            "{} does not exist: build it (`cargo xtask build --release`)",
            binary.display()
        );
    }
    let installed_bin = prefix.join("bin/xlb");
    let root = destdir.unwrap_or_else(|| PathBuf::from("/"));
    // `root.join("/etc")` would drop the root: paths inside it are joined relative.
    let under = |path: &Path| root.join(path.strip_prefix("/").unwrap_or(path));
    let systemd = workspace_root().join("systemd");
    let read = |name: &str| {
        let path = systemd.join(name);
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let unit = read("xlb.service")?.replace("/usr/local/bin/xlb", &installed_bin.to_string_lossy());
    let text = |source, text| Content::Text { source, text };
    let files: [(Content, &str, u32, Existing); 5] = [
        (
            Content::Copy(binary),
            &installed_bin.to_string_lossy(),
            0o755,
            Existing::Replace,
        ),
        (
            text("systemd/xlb.service", unit),
            "/etc/systemd/system/xlb.service",
            0o644,
            Existing::Replace,
        ),
        (
            // Holds the user's listen addresses, like the config.
            text("systemd/xlb.socket", read("xlb.socket")?),
            "/etc/systemd/system/xlb.socket",
            0o644,
            Existing::Keep,
        ),
        (
            text("systemd/app@.service", read("app@.service")?),
            "/etc/systemd/system/app@.service",
            0o644,
            Existing::Keep,
        ),
        (
            text("systemd/xlb.toml", read("xlb.toml")?),
            "/etc/xlb/xlb.toml",
            0o644,
            Existing::Keep,
        ),
    ];
    let verb = if dry_run {
        "would install"
    } else {
        "installing"
    };
    for (content, target, mode, existing) in files {
        let dest = under(Path::new(target));
        if existing == Existing::Keep && dest.exists() {
            println!("install: {} exists; kept as it is", dest.display());
            continue;
        }
        println!(
            "install: {verb} {} -> {} (mode {mode:o})",
            content.describe(),
            dest.display()
        );
        if !dry_run {
            write(&content, &dest, mode)
                .with_context(|| format!("installing {}", dest.display()))?;
        }
    }
    if !dry_run {
        println!(
            "install: done. Edit {} (and ExecStart= of app@.service), check it with `{} check --config /etc/xlb/xlb.toml`, then:\n  \
             systemctl daemon-reload && systemctl enable --now xlb",
            under(Path::new("/etc/xlb/xlb.toml")).display(),
            installed_bin.display()
        );
    }
    Ok(())
}

enum Content {
    Copy(PathBuf),
    Text { source: &'static str, text: String },
}

impl Content {
    fn describe(&self) -> String {
        match self {
            Content::Copy(path) => path.display().to_string(),
            Content::Text { source, .. } => source.to_string(),
        }
    }
}

/// Writes next to `dest` and renames over it, so that a running binary is replaced rather than
/// overwritten (which would fail with "text file busy") and nobody sees a half-written file.
fn write(content: &Content, dest: &Path, mode: u32) -> anyhow::Result<()> {
    let dir = dest.parent().context("no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = dest.file_name().context("no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.xtask-install"));
    match content {
        Content::Copy(src) => fs::copy(src, &tmp)
            .map(drop)
            .with_context(|| format!("copying {}", src.display()))?,
        Content::Text { text, .. } => {
            fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?
        }
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

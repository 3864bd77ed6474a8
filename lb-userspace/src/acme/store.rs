//! What the manager keeps on disk: the account file, and each service's certificate and key,
//! in private directories and files replaced whole.

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use instant_acme::AccountCredentials;
use rustls::sign::CertifiedKey;

use super::AcmeSettings;
use crate::certs;

pub(super) const ACCOUNT_FILE: &str = "account.json";
pub(super) const CERT_FILE: &str = "cert.pem";
pub(super) const KEY_FILE: &str = "key.pem";

/// A certificate as read from disk or obtained from the CA.
pub(super) struct Issued {
    pub(super) key: Arc<CertifiedKey>,
    pub(super) chain_pem: Vec<u8>,
    pub(super) validity: (SystemTime, SystemTime),
    /// The DNS names the certificate is for.
    pub(super) names: Vec<String>,
}

/// Reads a chain and key pair as stored, checking that they belong together.
pub(super) fn load_pair(cert_path: &Path, key_path: &Path) -> Result<Issued, String> {
    let (loaded, chain_pem) =
        certs::read_files(cert_path, key_path).map_err(|e| format!("{e:#}"))?;
    issued(loaded, chain_pem)
}

/// A chain and key as the CA and rcgen give them.
pub(super) fn parse_pair(chain_pem: &[u8], key_pem: &[u8]) -> Result<Issued, String> {
    let loaded = certs::load_pem(chain_pem, key_pem).map_err(|e| format!("{e:#}"))?;
    issued(loaded, chain_pem.to_vec())
}

/// Adds what scheduling needs to a loaded pair: its notBefore as well as its notAfter.
fn issued(loaded: certs::Loaded, chain_pem: Vec<u8>) -> Result<Issued, String> {
    let leaf = certs::describe(&loaded.key.cert[0])
        .map_err(|e| format!("the leaf certificate: {e:#}"))?;
    let time = |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    Ok(Issued {
        key: loaded.key,
        chain_pem,
        validity: (time(leaf.not_before), time(leaf.not_after)),
        names: loaded.names,
    })
}

/// Whether a certificate for `names` is one for `domains` (order and case aside).
pub(super) fn same_names(names: &[String], domains: &[String]) -> bool {
    let set = |list: &[String]| {
        list.iter()
            .map(|n| n.to_ascii_lowercase())
            .collect::<std::collections::BTreeSet<_>>()
    };
    set(names) == set(domains)
}

/// Serializes the read-modify-write of the account file among managers in this process.
static ACCOUNT_FILE_LOCK: Mutex<()> = Mutex::new(());

/// `account.json`: directory URL → the account's credentials.
type AccountFile = BTreeMap<String, serde_json::Value>;

fn read_account_file(path: &Path) -> Result<AccountFile, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} is not an account file ({e}); move it away to have a new account created",
                path.display()
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(AccountFile::new()),
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

pub(super) fn read_account(path: &Path, directory: &str) -> Result<Option<AccountCredentials>, String> {
    let _lock = ACCOUNT_FILE_LOCK.lock().unwrap();
    let Some(value) = read_account_file(path)?.remove(directory) else {
        return Ok(None);
    };
    serde_json::from_value(value).map(Some).map_err(|e| {
        format!(
            "{}: the account for {directory} is unreadable ({e}); remove its entry to have a new \
             account created",
            path.display()
        )
    })
}

pub(super) fn write_account(
    state_dir: &Path,
    directory: &str,
    credentials: &AccountCredentials,
) -> Result<(), String> {
    let _lock = ACCOUNT_FILE_LOCK.lock().unwrap();
    private_dir(state_dir)?;
    let path = state_dir.join(ACCOUNT_FILE);
    let mut accounts = read_account_file(&path)?;
    let value =
        serde_json::to_value(credentials).map_err(|e| format!("serializing the account: {e}"))?;
    accounts.insert(directory.to_owned(), value);
    let mut text = serde_json::to_vec_pretty(&accounts)
        .map_err(|e| format!("serializing the accounts: {e}"))?;
    text.push(b'\n');
    write_private(&path, &text)
}

/// Stores a new pair for the service, replacing the old one.
pub(super) fn write_pair(settings: &AcmeSettings, chain_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    private_dir(&settings.state_dir)?;
    private_dir(&settings.service_dir())?;
    // Key first: a crash between the two renames leaves a new key beside the old
    // certificate, which the next start detects (keys do not match) and re-orders, rather
    // than a certificate whose key was never written.
    write_private(&settings.key_path(), key_pem)?;
    write_private(&settings.cert_path(), chain_pem)
}

/// Creates `dir` if needed and makes it 0700: it holds private keys.
fn private_dir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("making {} private (0700): {e}", dir.display()))
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file renamed over it, synced
/// before and after the rename.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // `mode` applies only to a file that did not exist: a stale temporary file keeps its own.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_files_are_private_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("xlb-acme-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let sub = dir.join("svc");
        private_dir(&sub).unwrap();
        let file = sub.join("key.pem");
        write_private(&file, b"one").unwrap();
        write_private(&file, b"two").unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two");
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&sub), 0o700);
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stored_pair_that_does_not_fit_is_refused() {
        let a = rcgen::generate_simple_self_signed(vec!["a.example".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.example".into()]).unwrap();
        let issued = parse_pair(
            a.cert.pem().as_bytes(),
            a.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        assert!(issued.validity.0 < issued.validity.1);
        assert_eq!(issued.names, ["a.example"]);
        assert!(same_names(&issued.names, &["A.example".into()]));
        assert!(!same_names(
            &issued.names,
            &["a.example".into(), "b.example".into()]
        ));
        let err = parse_pair(
            a.cert.pem().as_bytes(),
            b.signing_key.serialize_pem().as_bytes(),
        )
        .err()
        .unwrap();
        assert!(err.contains("do not fit together"), "{err}");
    }
}

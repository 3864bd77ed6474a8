//! `[acme]`, shared by every service whose certificate comes from ACME, and the ACME values the
//! services' `tls.acme` tables use.
use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use super::from_str_with;

/// Renew this long before a certificate ends (Let's Encrypt's 90-day certificates are then
/// renewed after 60 days, as certbot does), or after two thirds of a shorter lifetime.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which challenge proves control of the domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChallengeKind {
    /// A file at `http://<domain>/.well-known/acme-challenge/<token>`: needs port 80.
    Http01,
    /// A special certificate on port 443 for the `acme-tls/1` protocol: needs only port 443.
    TlsAlpn01,
}

impl ChallengeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeKind::Http01 => "http-01",
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
        }
    }
}

impl fmt::Display for ChallengeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The top-level `[acme]` table, shared by every service whose certificate comes from ACME.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcmeSection {
    /// Accounts (`account.json`) and each service's certificate and key (`<service>/`).
    #[serde(deserialize_with = "state_dir")]
    pub state_dir: PathBuf,
}

impl Default for AcmeSection {
    fn default() -> AcmeSection {
        AcmeSection { state_dir: PathBuf::from(DEFAULT_ACME_STATE_DIR) }
    }
}

/// systemd's `StateDirectory=xlb` creates /var/lib/xlb for the unit.
pub const DEFAULT_ACME_STATE_DIR: &str = "/var/lib/xlb/acme";
/// Bounds of `renew_before`: an hour is the least that leaves room for retries; past a year
/// every certificate a public CA issues would be renewed at two thirds of its life anyway.
pub(super) const RENEW_BEFORE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3600)..=Duration::from_secs(365 * 24 * 3600);

fn state_dir<'de, D: Deserializer<'de>>(de: D) -> Result<PathBuf, D::Error> {
    from_str_with(de, |dir| {
        let path = Path::new(dir);
        if !path.is_absolute() || path.as_os_str().len() <= 1 {
            return Err(format!(
                "acme.state_dir \"{dir}\": not an absolute path of a directory; write the full path, e.g. \
                 \"{DEFAULT_ACME_STATE_DIR}\""
            ));
        }
        Ok(path.to_owned())
    })
}

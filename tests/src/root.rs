//! Whether a root-only test runs: the scenario tests create network namespaces and load BPF
//! programs, which a normal user cannot. Since the package is a default workspace member, a
//! plain `cargo test` as a normal user runs them too; they skip, saying why, instead of failing.
//! `cargo xtask test` sets `XLB_REQUIRE_ROOT=1`, under which a skip would be a failure: a run
//! that is meant to prove the scenarios must not pass by skipping them.
use std::{ffi::OsStr, io::Write as _};

/// Set to `1` to make a root-only test fail, instead of skipping, when not run as root.
pub const REQUIRE_ROOT_ENV: &str = "XLB_REQUIRE_ROOT";

const WHY: &str = "needs root (network namespaces, BPF); run `cargo xtask test` as root";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Run,
    Skip,
    Fail,
}

/// The decision for a root-only test, from whether we are root and the value of
/// `XLB_REQUIRE_ROOT` (only `1` requires root; unset or anything else lets the test skip).
pub fn decide(is_root: bool, require_root: Option<&OsStr>) -> Decision {
    match (is_root, require_root.is_some_and(|v| v == "1")) {
        (true, _) => Decision::Run,
        (false, false) => Decision::Skip,
        (false, true) => Decision::Fail,
    }
}

/// Whether the calling root-only test should go on; prints why when it should not, and panics
/// when it must not skip. Use `root_or_skip!()`, which returns from the test.
#[track_caller]
pub fn should_run() -> bool {
    let is_root = nix::unistd::geteuid().is_root();
    match decide(is_root, std::env::var_os(REQUIRE_ROOT_ENV).as_deref()) {
        Decision::Run => true,
        Decision::Skip => {
            // Straight to the stream rather than `eprintln!`: libtest captures the macros'
            // output of a passing test, and a skip nobody sees looks like a pass.
            let _ = writeln!(std::io::stderr(), "skipped: {WHY}");
            false
        }
        Decision::Fail => panic!("{REQUIRE_ROOT_ENV}=1 and not root: this test {WHY}"),
    }
}

/// Returns from the calling test unless it runs as root (see `root::should_run`).
#[macro_export]
macro_rules! root_or_skip {
    () => {
        if !$crate::root::should_run() {
            return;
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_runs_whatever_the_variable_says() {
        for v in [None, Some("1"), Some("0"), Some("")] {
            assert_eq!(decide(true, v.map(OsStr::new)), Decision::Run, "{v:?}");
        }
    }

    #[test]
    fn not_root_skips_unless_root_is_required() {
        assert_eq!(decide(false, None), Decision::Skip);
        assert_eq!(decide(false, Some(OsStr::new("0"))), Decision::Skip);
        assert_eq!(decide(false, Some(OsStr::new(""))), Decision::Skip);
        assert_eq!(decide(false, Some(OsStr::new("1"))), Decision::Fail);
    }
}

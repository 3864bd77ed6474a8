//! The cargo-fuzz targets in lb-userspace/fuzz (the config parser, the admin API's request
//! handling, the health checks' response parsing, the nginx importer), each run for a bounded time.
//!
//! The corpus in the repository (`lb-userspace/fuzz/corpus/<target>`) is only read: new inputs
//! libFuzzer finds go to a scratch directory, so a run leaves the work tree as it was. A crash
//! is written to `lb-userspace/fuzz/artifacts/<target>/` and fails the run, naming the file
//! (`cargo +nightly fuzz run <target> <file>` replays it).
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};

use crate::{Totals, run, workspace_root};

pub const TARGETS: &[&str] = &["config", "admin_request", "health_response", "nginx_import"];

fn fuzz_cargo(dir: &std::path::Path) -> Command {
    // The rustup proxy (not `$CARGO`, which is stable's own cargo) understands `+nightly`:
    // cargo-fuzz needs nightly for the sanitizer and coverage flags.
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir)
        .arg("+nightly")
        .arg("fuzz")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        // The targets never load the BPF programs: skip building them (see lb-userspace/build.rs).
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Builds every target, then runs each for `each`; one passed or failed test per target.
pub fn run_all(each: Duration, totals: &mut Totals) -> anyhow::Result<()> {
    let dir = workspace_root().join("lb-userspace");
    if let Err(e) = run(fuzz_cargo(&dir).arg("build")) {
        totals.failed += TARGETS.len() as u64;
        return Err(e).context("building the fuzz targets (cargo-fuzz comes with `cargo xtask setup`)");
    }
    let mut failed = Vec::new();
    for target in TARGETS {
        let scratch = std::env::temp_dir().join(format!("xlb-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let corpus: PathBuf = ["fuzz", "corpus", target].iter().collect();
        let mut cmd = fuzz_cargo(&dir);
        cmd.args(["run", target])
            .arg(&scratch)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={}", each.as_secs()))
            // An input that takes this long is a hang: a finding, not a slow test.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1");
        let result = run(&mut cmd);
        let _ = std::fs::remove_dir_all(&scratch);
        match result {
            Ok(()) => {
                println!("xtask: fuzz target {target}: no crash in {} s", each.as_secs());
                totals.passed += 1;
            }
            Err(e) => {
                println!("xtask: fuzz target {target} FAILED: {e:#} (see lb-userspace/fuzz/artifacts/{target}/)");
                totals.failed += 1;
                failed.push(*target);
            }
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

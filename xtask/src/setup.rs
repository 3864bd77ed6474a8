//! `cargo xtask setup`: everything a fresh machine needs beyond stable Rust. Each step checks
//! first, so a provisioned machine costs a few process spawns.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cargo, find_in_path, output, run};

/// aya-build links the eBPF object with this; pinned so that every machine emits the same code.
const BPF_LINKER_VERSION: &str = "0.10.3";

/// Debian packages the tests and the demo use, each with a binary that shows it is there.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("iproute2", "ss"),
    ("ethtool", "ethtool"),
    ("bpftool", "bpftool"),
    ("util-linux", "nsenter"),
    ("curl", "curl"),
    // The HTTPS tests: `openssl s_client` for refused protocol versions, testssl.sh for the
    // TLS audit (Debian installs it as `testssl`).
    ("openssl", "openssl"),
    ("testssl.sh", "testssl"),
    ("wrk", "wrk"),
    // `systemd-analyze verify` checks the shipped units (PID 1 need not be systemd).
    ("systemd", "systemd-analyze"),
    // A real SMTP server for the e-mail alert test.
    ("python3-aiosmtpd", "aiosmtpd"),
    // Let's Encrypt's test CA (and its DNS server) for the ACME scenario test.
    ("pebble", "pebble"),
    ("pebble", "pebble-challtestsrv"),
];

/// The fuzz targets (lb-userspace/fuzz) run with this; 0.13.2 builds with our stable toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn setup() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    if nix::unistd::geteuid().is_root() {
        debian_packages()?;
        // nginx for the import test (`tests/import.rs` runs it beside xlb), installed as the
        // bench installs it: the system's own nginx service is kept from starting.
        crate::bench::peers::provision()
    } else {
        println!(
            "setup: not root, not checking Debian packages ({})",
            package_names().join(" ")
        );
        Ok(())
    }
}

/// The eBPF crate builds with `-Z build-std=core` for bpfel-unknown-none: nightly + rust-src.
fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"])).context(
        "`rustup toolchain list` failed: xlb builds its eBPF part with rustup's nightly",
    )?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain with rust-src");
        return run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == "rust-src") {
        println!("setup: nightly rust-src: ok");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = || output(Command::new("bpf-linker").arg("--version"));
    // Prints "bpf-linker 0.10.3".
    let wanted = |v: &str| v.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION);
    match version() {
        Some(v) if wanted(&v) => {
            println!("setup: bpf-linker {BPF_LINKER_VERSION}: ok");
            return Ok(());
        }
        Some(v) => println!("setup: found {}, want {BPF_LINKER_VERSION}", v.trim()),
        None => println!("setup: bpf-linker not found"),
    }
    run(cargo().args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
        "--force",
    ]))?;
    if !version().is_some_and(|v| wanted(&v)) {
        bail!(
            "installed bpf-linker {BPF_LINKER_VERSION} but `bpf-linker --version` does not show \
             it: is cargo's bin directory (~/.cargo/bin) on PATH?"
        );
    }
    Ok(())
}

fn cargo_fuzz() -> anyhow::Result<()> {
    // Prints "cargo-fuzz 0.13.2".
    let version = || output(Command::new("cargo-fuzz").arg("--version"));
    if let Some(v) = version() {
        println!("setup: {}: ok", v.trim());
        return Ok(());
    }
    println!("setup: cargo-fuzz not found");
    run(cargo().args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ]))?;
    if version().is_none() {
        bail!(
            "installed cargo-fuzz {CARGO_FUZZ_VERSION} but `cargo-fuzz --version` fails: is \
             cargo's bin directory (~/.cargo/bin) on PATH?"
        );
    }
    Ok(())
}

fn debian_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, bin)| find_in_path(bin).is_none())
        .map(|(package, _)| *package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        println!("setup: {}: ok", package_names().join(", "));
        return Ok(());
    }
    if find_in_path("apt-get").is_none() {
        bail!(
            "missing {} and no apt-get here: install them by hand",
            missing.join(" ")
        );
    }
    println!("setup: installing {}", missing.join(" "));
    let apt = || {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(apt().args(["update", "-q"]))?;
    run(apt()
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}

fn package_names() -> Vec<&'static str> {
    let mut names: Vec<_> = PACKAGES.iter().map(|(package, _)| *package).collect();
    names.dedup();
    names
}

//! `cargo xtask run` without arguments: builds xlb and runs the demo (`xlb_tests::demo`) until
//! Ctrl-C or `--demo-seconds`.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub fn run(duration: Option<Duration>) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and attaches XDP programs: run it as root");
    }
    // Installed first so that Ctrl-C at any point ends in the demo's cleanup, not mid-way.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;

    crate::build(false)?;
    let deadline = duration.map(|d| Instant::now() + d);
    let done = || stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d);
    let result = xlb_tests::demo::run(&mut std::io::stdout(), &done);
    println!("demo stopped; everything it created is removed");
    result
}

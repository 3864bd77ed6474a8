//! `xlb rollout` under a steady stream of short connections through the VIP: restarting all
//! three backends one at a time fails no request; a restart command that fails stops the
//! rollout, undrains what it drained, runs the rollback command and exits non-zero.
//!
//! The restart command is a script this test writes: it stops the backend whose pid is in
//! `app-N.pid` (SIGTERM), waits until its port is free, starts a new `xlb-demo-backend` there
//! and waits until it listens, as `systemctl restart app@N` would.
//!
//! Run as root after `cargo build`:
//! `cargo test -p xlb-tests --test rollout -- --test-threads=1 --nocapture`.

use std::time::Duration;

use xlb_tests::*;

/// Bounds a whole `xlb rollout` run.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

fn rollout(lb: &Lb, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut all = vec!["rollout", "web"];
    all.extend_from_slice(args);
    let proc = lb.topo.spawn(lb.xlb(&all), "xlb rollout");
    proc.wait_with_output(ROLLOUT_TIMEOUT)
}

#[test]
fn rollout_restarts_every_backend_without_a_failed_request() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("rollout", Family::V4);
    let _restarted = Restarted(lb.dir.clone());
    let script = write_restart_script(&lb);
    let dir = lb.dir.display().to_string();
    let old_pids = app_pids(&lb.dir);
    let exec = format!("{} {{index}}", script.display());
    let before = format!("touch {dir}/before-ran");
    let after = format!("touch {dir}/after-ran");
    let ((status, out), load) = under_load(&lb, || {
        rollout(
            &lb,
            &["--exec", &exec, "--before", &before, "--after", &after, "--drain-timeout", "10s", "--health-timeout", "20s"],
        )
    });
    println!("xlb rollout:\n{out}");
    println!("load during the rollout: {} requests, per backend {:?}, {} failed", load.ok, load.served, load.failures.len());
    assert!(status.success(), "xlb rollout failed ({status}):\n{out}");
    assert!(out.contains("rollout of web complete: 3 backends restarted"), "{out}");
    for (i, addr) in lb.backends.iter().enumerate() {
        let tag = format!("[{}/3] {addr}", i + 1);
        for step in ["draining", "no open connections left", "running `", "healthy"] {
            assert!(out.contains(&format!("{tag}: {step}")), "no `{tag}: {step}` in:\n{out}");
        }
    }
    assert!(lb.dir.join("before-ran").exists() && lb.dir.join("after-ran").exists(), "--before/--after did not run");
    let new_pids = app_pids(&lb.dir);
    for i in 0..BACKENDS {
        assert_ne!(old_pids[i], new_pids[i], "app-{} was not restarted", i + 1);
    }
    assert!(load.failures.is_empty(), "{} failed requests during the rollout: {:?}", load.failures.len(), load.failures);
    assert!(load.ok >= 100, "too little load to show anything: {load:?}");
    lb.wait_healthy();
    assert_eq!(lb.spread(9), [3, 3, 3], "every restarted backend is back in rotation");
    lb.finish();
}

#[test]
fn failing_restart_stops_undrains_and_rolls_back() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("rollout-fail", Family::V4);
    let _restarted = Restarted(lb.dir.clone());
    let script = write_restart_script(&lb);
    let dir = lb.dir.display().to_string();
    // The second backend's restart "fails" after restarting it.
    let exec = format!("{} {{index}} && [ {{index}} -ne 2 ]", script.display());
    let rollback = format!("echo rolled back at {{index}} {{backend}} > {dir}/rollback");
    let ((status, out), load) = under_load(&lb, || {
        rollout(&lb, &["--exec", &exec, "--rollback", &rollback, "--drain-timeout", "10s", "--health-timeout", "20s"])
    });
    println!("xlb rollout:\n{out}");
    println!("load during the rollout: {} requests, per backend {:?}, {} failed", load.ok, load.served, load.failures.len());
    assert_eq!(status.code(), Some(1), "{out}");
    let (b1, b2, b3) = (lb.backends[0], lb.backends[1], lb.backends[2]);
    for line in [
        format!("rollout of web stopped: [2/3] {b2}: `"),
        format!("restarted and back in rotation: {b1}"),
        format!("undrained again: {b2} (up)"),
        format!("not restarted: {b3}"),
        "succeeded".to_string(),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }
    assert_eq!(
        std::fs::read_to_string(lb.dir.join("rollback")).unwrap().trim(),
        format!("rolled back at 2 {b2}")
    );
    assert!(load.failures.is_empty(), "failed requests: {:?}", load.failures);
    // Nothing is left drained.
    let view = lb.view();
    assert!(view.iter().all(|b| b.state == "up"), "{view:?}");
    assert!(lb.spread(9).iter().all(|&n| n > 0), "every backend takes connections again");

    // A service that does not exist, and a backend that is not up, are refused before anything.
    let (status, out) = rollout(&lb, &["--exec", "true"]);
    assert!(status.success(), "{out}");
    let mut cmd = lb.xlb(&["rollout", "api", "--exec", "true"]);
    cmd.env_remove("XLB_LOG");
    let (status, out) = run(cmd, "xlb rollout api");
    assert!(!status.success() && out.contains("no service \"api\"; the services are: web"), "{out}");
    run_ok(lb.xlb(&["drain", "web", &b3.to_string()]), "xlb drain");
    let (status, out) = rollout(&lb, &["--exec", "true"]);
    assert!(
        !status.success() && out.contains(&format!("not starting the rollout of web: {b3} is draining")),
        "{out}"
    );
    run_ok(lb.xlb(&["undrain", "web", &b3.to_string()]), "xlb undrain");
    lb.finish();
}

/// A backend whose connections outlast `--drain-timeout` stops the rollout before its restart
/// (and is undrained), unless `--proceed-on-drain-timeout`, which restarts it anyway and says so.
#[test]
fn drain_timeout_stops_unless_told_to_proceed() {
    xlb_tests::root_or_skip!();
    let lb = Lb::start("rollout-drain", Family::V4);
    // One keep-alive connection on every backend, held through both rollouts.
    let mut held: Vec<Held> = (0..BACKENDS).map(|_| lb.hold()).collect();
    lb.await_live([1, 1, 1], "one held connection per backend");
    let b1 = lb.backends[0];
    let (status, out) = rollout(&lb, &["--exec", "true", "--drain-timeout", "1s"]);
    println!("xlb rollout --drain-timeout 1s:\n{out}");
    assert_eq!(status.code(), Some(1), "{out}");
    for line in [
        format!("[1/3] {b1}: draining (1 open connection)"),
        format!("rollout of web stopped: [1/3] {b1}: still 1 open connection after --drain-timeout 1s; not restarting it"),
        "no backend was restarted".to_string(),
        format!("undrained again: {b1} (up)"),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }
    assert!(!out.contains("running `true`"), "the command ran: {out}");
    assert!(lb.view().iter().all(|b| b.state == "up"));

    let (status, out) = rollout(&lb, &["--exec", "true", "--drain-timeout", "500ms", "--proceed-on-drain-timeout"]);
    println!("xlb rollout --proceed-on-drain-timeout:\n{out}");
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("[1/3] {b1}: still 1 open connection after 500ms; restarting anyway (--proceed-on-drain-timeout); the restart may cut them")),
        "{out}"
    );
    assert!(out.contains("rollout of web complete: 3 backends restarted"), "{out}");
    // `true` restarted nothing: the held connections are still there and answered.
    for h in &mut held {
        assert_eq!(h.request(), h.backend, "a held connection changed backend");
    }
    drop(held);
    lb.finish();
}

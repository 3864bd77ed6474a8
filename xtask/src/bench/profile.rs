//! System calls and context switches per request of an HTTPS arm's server: one keep-alive
//! run with `perf stat` counting on the server's threads (tracepoints, counted in the kernel;
//! nothing is sampled or copied out), in runs of its own so that the counting's small cost
//! per system call never touches the throughput rounds.
use std::{process::Command, sync::atomic::AtomicBool, time::Duration};

use anyhow::{Context as _, bail};
use xlb_tests::{Proc, Topology};

use super::{Arm, Mode, Tax, measure, tls};

/// The system calls broken out in the report; the rest are counted in the total only.
pub const CALLS: &[&str] = &[
    "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
    "epoll_wait", "epoll_pwait", "epoll_ctl", "futex", "bpf", "sched_yield",
];

/// Counts of one profiled run, per keep-alive request.
#[derive(Clone, Debug)]
pub struct Profile {
    pub arm: &'static str,
    pub rps: f64,
    pub syscalls: f64,
    pub context_switches: f64,
    /// Per call of `CALLS`, in that order.
    pub by_call: Vec<f64>,
}

/// One `wrk` keep-alive HTTPS run of `seconds` against `arm` with the server counted.
pub fn profile(topology: &Topology, arm: &'static Arm, seconds: u64, stop: &AtomicBool) -> anyhow::Result<Profile> {
    let comm = match arm.tax {
        Tax::Xlb => "xlb",
        Tax::Noop => "nginx",
    };
    let pids = tls::pids_named(topology, comm);
    if pids.is_empty() {
        bail!("arm {}: no {comm} process in the lb namespace", arm.id);
    }
    let mut events = vec!["raw_syscalls:sys_enter".to_owned(), "context-switches".to_owned()];
    events.extend(CALLS.iter().map(|c| format!("syscalls:sys_enter_{c}")));
    let pid_list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut cmd = Command::new("perf");
    // -x,: CSV on stderr; the window is the run's plus a margin, when the server is idle.
    cmd.args(["stat", "-x,", "--no-big-num", "-e", &events.join(","), "-p", &pid_list.join(",")])
        .args(["--", "sleep", &(seconds + 1).to_string()]);
    let perf = Proc::spawn(cmd, "perf stat");
    // XLB_BENCH_RECORD=DIR: also a sampled profile of the same run, DIR/<arm>.perf.data, for
    // `perf report -i`.
    let record = std::env::var_os("XLB_BENCH_RECORD").map(|dir| {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-F", "1999", "-g", "-p", &pid_list.join(","), "-o"])
            .arg(std::path::Path::new(&dir).join(format!("{}.perf.data", arm.id)))
            .args(["--", "sleep", &(seconds + 1).to_string()]);
        Proc::spawn(cmd, "perf record")
    });
    // perf attaches in a few milliseconds; the run must not start before it counts.
    std::thread::sleep(Duration::from_millis(300));
    let run = measure::wrk(topology, arm, Mode::TlsKeepAlive, seconds, stop)?;
    if let Some(record) = record {
        let (status, out) = record.wait_with_output(Duration::from_secs(30));
        if !status.success() {
            bail!("perf record failed ({status}):\n{out}");
        }
    }
    let (status, out) = perf.wait_with_output(Duration::from_secs(10));
    if !status.success() {
        bail!("perf stat failed ({status}):\n{out}");
    }
    let counts = parse(&out).with_context(|| format!("unexpected perf stat output:\n{out}"))?;
    let per = |event: &str| counts.iter().find(|(e, _)| e == event).map_or(f64::NAN, |(_, n)| *n as f64 / run.requests.max(1) as f64);
    Ok(Profile {
        arm: arm.id,
        rps: run.rps,
        syscalls: per("raw_syscalls:sys_enter"),
        context_switches: per("context-switches"),
        by_call: CALLS.iter().map(|c| per(&format!("syscalls:sys_enter_{c}"))).collect(),
    })
}

/// `value,unit,event,...` lines of `perf stat -x,`; a count perf could not take reads as
/// `<not counted>` or `<not supported>` and is left out.
fn parse(out: &str) -> Option<Vec<(String, u64)>> {
    let counts: Vec<(String, u64)> = out
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(',');
            let value = fields.next()?.trim().parse::<u64>().ok()?;
            let event = fields.nth(1)?.trim().to_owned();
            Some((event, value))
        })
        .collect();
    counts.iter().any(|(e, _)| e == "raw_syscalls:sys_enter").then_some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_stat_csv() {
        let out = "161,,raw_syscalls:sys_enter,605083105,100.00,,\n\
                   56,,context-switches,605081283,100.00,,\n\
                   <not counted>,,syscalls:sys_enter_bpf,0,100.00,,\n";
        assert_eq!(
            parse(out),
            Some(vec![("raw_syscalls:sys_enter".to_owned(), 161), ("context-switches".to_owned(), 56)])
        );
        assert_eq!(parse("perf: command not found"), None);
    }
}

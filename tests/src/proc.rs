//! A child process that cannot outlive its test, with its output captured for assertions and
//! shown when the test fails.
use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// Captured output kept per process; older output is dropped past this (a daemon at debug level
/// can log for a long time).
const OUTPUT_CAP: usize = 4 << 20;
/// What a failing test prints of each process's output.
const OUTPUT_SHOWN_ON_PANIC: usize = 16 << 10;

/// A spawned child. Dropping it kills it (SIGKILL) and reaps it.
///
/// Methods take `&self`, so a `Proc` can be shared with helper threads; the child is locked
/// while it is signalled so a signal never reaches a reaped (and possibly reused) pid.
pub struct Proc {
    label: String,
    pid: u32,
    pub(crate) child: Arc<Mutex<Child>>,
    output: Arc<Output>,
}

#[derive(Default)]
struct Output {
    text: Mutex<String>,
    grew: Condvar,
    /// Captured streams not yet at end of file.
    open: AtomicUsize,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout+stderr captured (interleaved by line).
    /// Set `XLB_TEST_ECHO=1` to also copy every line to stderr as it arrives.
    pub fn spawn(mut cmd: Command, label: impl Into<String>) -> Proc {
        let label = label.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {label} ({cmd:?}): {e}"));
        let output = Arc::new(Output::default());
        let echo = std::env::var_os("XLB_TEST_ECHO").is_some_and(|v| v == "1");
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let streams: Vec<_> = [stdout, stderr].into_iter().flatten().collect();
        output.open.store(streams.len(), Ordering::SeqCst);
        for stream in streams {
            let (output, label) = (output.clone(), label.clone());
            // Detached: the thread ends at EOF, i.e. when the process (and anything it forked
            // that kept the pipe) is gone.
            std::thread::spawn(move || capture(stream, &output, &label, echo));
        }
        Proc {
            pid: child.id(),
            label,
            child: Arc::new(Mutex::new(child)),
            output,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// CPU time the process has used so far, user and system.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid)
    }

    /// Its resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    /// Sends `signal` if the process has not exited yet; returns whether it was sent.
    pub fn signal(&self, signal: Signal) -> bool {
        let mut child = self.child.lock().unwrap();
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        nix::sys::signal::kill(Pid::from_raw(self.pid as i32), signal)
            .unwrap_or_else(|e| panic!("kill -{signal} {} ({}): {e}", self.pid, self.label));
        true
    }

    /// `kill -9` and reap; returns the exit status (a signal, unless it had exited already).
    pub fn kill9(&self) -> ExitStatus {
        kill_and_reap(&self.child).unwrap_or_else(|e| panic!("reaping {}: {e}", self.label))
    }

    /// SIGTERM, then waits up to 10 s for the process to exit. Panics (after SIGKILL) if it
    /// does not: a daemon that ignores SIGTERM is a bug the tests should report.
    pub fn terminate(&self) -> ExitStatus {
        self.terminate_timeout(Duration::from_secs(10))
    }

    pub fn terminate_timeout(&self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_timeout(timeout).unwrap_or_else(|| {
            self.kill9();
            panic!(
                "{} (pid {}) did not exit within {timeout:?} of SIGTERM; its output:\n{}",
                self.label,
                self.pid,
                self.output_tail(OUTPUT_SHOWN_ON_PANIC)
            )
        })
    }

    /// Waits for the process to exit by itself; `None` if it is still running after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit and for its output to be read to the end
    /// (`output` right after an exit may still miss the last lines); returns the exit status
    /// and everything it printed. Panics, after SIGKILL, if it runs longer: for commands that
    /// must finish, so that a hung one fails the test instead of hanging it.
    pub fn wait_with_output(&self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = self.wait_timeout(timeout).unwrap_or_else(|| {
            self.kill9();
            panic!(
                "{} (pid {}) still running after {timeout:?}; its output:\n{}",
                self.label,
                self.pid,
                self.output_tail(OUTPUT_SHOWN_ON_PANIC)
            )
        });
        let mut text = self.output.text.lock().unwrap();
        // A process it forked may hold the pipes open longer: give up at the deadline.
        while self.output.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            let step =
                Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
            text = self.output.grew.wait_timeout(text, step).unwrap().0;
        }
        (status, text.clone())
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap();
        child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.label))
    }

    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Everything captured so far from stdout and stderr.
    pub fn output(&self) -> String {
        self.output.text.lock().unwrap().clone()
    }

    /// Waits until the captured output contains `needle`. Panics on timeout or if the process
    /// exits first, showing its output.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut text = self.output.text.lock().unwrap();
        while !text.contains(needle) {
            let now = Instant::now();
            let exited = self.try_status();
            if exited.is_some() || now >= deadline {
                let why = match exited {
                    Some(status) => format!("it exited ({status})"),
                    None => format!("timed out after {timeout:?}"),
                };
                panic!(
                    "{} (pid {}) never printed {needle:?}: {why}; its output:\n{}",
                    self.label,
                    self.pid,
                    tail(&text, OUTPUT_SHOWN_ON_PANIC)
                );
            }
            // Short waits: an exit is noticed by polling, not by the condvar.
            let step = (deadline - now).min(Duration::from_millis(50));
            text = self.output.grew.wait_timeout(text, step).unwrap().0;
        }
    }

    fn output_tail(&self, max: usize) -> String {
        tail(&self.output.text.lock().unwrap(), max).to_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let status = kill_and_reap(&self.child);
        if std::thread::panicking() {
            // The test failed: what its processes said is usually the explanation.
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            eprintln!(
                "----- {} (pid {}, {status}) output -----\n{}",
                self.label,
                self.pid,
                self.output_tail(OUTPUT_SHOWN_ON_PANIC)
            );
        }
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("pid", &self.pid)
            .finish()
    }
}

/// SIGKILL unless already reaped, then reap. Shared with `Topology`'s cleanup.
pub(crate) fn kill_and_reap(child: &Mutex<Child>) -> std::io::Result<ExitStatus> {
    // A poisoned lock only means a panic elsewhere while it was held; the child is still ours.
    let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
    // `Child::kill` is a no-op once the child has been reaped, so this never hits a reused pid.
    child.kill()?;
    child.wait()
}

fn capture(stream: Box<dyn Read + Send>, output: &Output, label: &str, echo: bool) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
        let text = String::from_utf8_lossy(&line);
        if echo {
            eprint!("[{label}] {text}");
        }
        let mut all = output.text.lock().unwrap();
        all.push_str(&text);
        if !text.ends_with('\n') {
            all.push('\n');
        }
        if all.len() > OUTPUT_CAP {
            let cut = all.ceil_char_boundary(all.len() - OUTPUT_CAP / 2);
            all.drain(..cut);
        }
        output.grew.notify_all();
        line.clear();
    }
    let _all = output.text.lock().unwrap();
    output.open.fetch_sub(1, Ordering::SeqCst);
    output.grew.notify_all();
}

fn tail(text: &str, max: usize) -> &str {
    &text[text.ceil_char_boundary(text.len().saturating_sub(max))..]
}

/// Resident memory of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time a process has used, user and system (`utime` + `stime` of /proc/<pid>/stat, in
/// clock ticks).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')').unwrap_or_else(|| panic!("/proc/{pid}/stat without a command: {stat}")) + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or_else(|| panic!("/proc/{pid}/stat: no field {}: {stat}", i + 3)))
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

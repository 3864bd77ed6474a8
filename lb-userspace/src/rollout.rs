//! `xlb rollout`: restart a service's backends one at a time without failing a request.
//!
//! For each backend in config order: drain it (no new connections), wait until its open
//! connections have ended, run the restart command, wait until its health checks pass on
//! probes made after the command, undrain it, go on. The daemon does the draining and the
//! probing; this only drives its admin API, so it works the same on any host with a daemon.
//!
//! Any failure stops the rollout: every backend it drained is undrained, the rollback command
//! (if any) runs, and the error says what was done and what was not.
use std::{
    net::SocketAddr,
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use tokio::process::Command;

use crate::{
    admin,
    status::{BackendStatus, BackendState, Status},
};

/// How often the status is read while waiting: well below any health interval (≥ 100 ms), so
/// a backend seen down for one interval is seen.
const POLL: Duration = Duration::from_millis(50);

/// What `xlb rollout` was asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    pub service: String,
    /// Run per backend through `sh -c`, after its connections have drained; `{index}` (1-based
    /// position in the service's backends), `{backend}` (ip:port), `{port}` and `{service}`
    /// are replaced.
    pub exec: String,
    /// Run once before the first backend / after the last one.
    pub before: Option<String>,
    pub after: Option<String>,
    /// Run once when the rollout fails, after the drained backends are undrained; the
    /// placeholders name the backend it stopped at (empty when it stopped before the first).
    pub rollback: Option<String>,
    /// How long to wait for a drained backend's connections to end.
    pub drain_timeout: Duration,
    /// Restart anyway when connections are still open after `drain_timeout` (they are cut);
    /// otherwise the rollout stops there.
    pub proceed_on_drain_timeout: bool,
    /// How long a backend may take to pass its health checks after the command.
    pub health_timeout: Duration,
}

/// Runs the plan against the daemon at `admin`, printing progress to stdout. The error is the
/// full account of a failed rollout.
pub async fn run(admin: SocketAddr, plan: &Plan) -> anyhow::Result<()> {
    let status = admin::fetch_status(admin).await?;
    let service = find_service(&status, &plan.service)?;
    let backends: Vec<String> = service.backends.iter().map(|b| b.address.clone()).collect();
    let rise = u64::from(service.rise.max(1));
    let not_up: Vec<String> = service
        .backends
        .iter()
        .filter(|b| b.state != BackendState::Up)
        .map(|b| format!("{} is {}", b.address, state_name(b.state)))
        .collect();
    if !not_up.is_empty() {
        bail!(
            "not starting the rollout of {}: {}; every backend must be up first (the others carry the traffic \
             while one restarts) — `xlb undrain` a drained one, or fix the one that is down",
            plan.service,
            not_up.join(", ")
        );
    }
    println!("rollout of {}: {} backends, one at a time", plan.service, backends.len());
    let mut run = Run { admin, plan, drained: Vec::new(), done: Vec::new() };
    let outcome = tokio::select! {
        outcome = run.steps(&backends, rise) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (Ctrl-C)")),
    };
    match outcome {
        Ok(()) => {
            println!("rollout of {} complete: {} backends restarted", plan.service, run.done.len());
            Ok(())
        }
        Err(e) => Err(run.fail(e, &backends).await),
    }
}

fn find_service<'a>(status: &'a Status, name: &str) -> anyhow::Result<&'a crate::status::ServiceStatus> {
    status.services.iter().find(|s| s.name == name).ok_or_else(|| {
        let names: Vec<&str> = status.services.iter().map(|s| s.name.as_str()).collect();
        anyhow!("no service {name:?}; the services are: {}", names.join(", "))
    })
}

fn state_name(state: BackendState) -> &'static str {
    match state {
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Draining => "draining",
        BackendState::Failed => "failed (passive)",
    }
}

/// `{index}`, `{backend}`, `{port}` and `{service}` of `template` replaced.
pub fn substitute(template: &str, service: &str, index: usize, backend: &str) -> String {
    let port = backend.rsplit_once(':').map_or("", |(_, p)| p);
    let index = if index == 0 { String::new() } else { index.to_string() };
    template
        .replace("{index}", &index)
        .replace("{backend}", backend)
        .replace("{port}", port)
        .replace("{service}", service)
}

struct Run<'a> {
    admin: SocketAddr,
    plan: &'a Plan,
    /// Drained by us and not yet undrained: undrained again if the rollout stops.
    drained: Vec<String>,
    /// Restarted and back in rotation.
    done: Vec<String>,
}

impl Run<'_> {
    async fn steps(&mut self, backends: &[String], rise: u64) -> anyhow::Result<()> {
        let service = &self.plan.service;
        if let Some(before) = &self.plan.before {
            let command = substitute(before, service, 0, "");
            shell("--before", &command).await?;
        }
        let n = backends.len();
        for (i, backend) in backends.iter().enumerate() {
            let index = i + 1;
            let tag = format!("[{index}/{n}] {backend}");
            let started = Instant::now();
            let drained = admin::set_drained(self.admin, service, backend, true).await?;
            self.drained.push(backend.clone());
            println!("{tag}: draining ({})", connections(drained.live_connections));
            self.wait_drained(&tag, backend).await?;

            let before = self.backend(backend).await?;
            let command = substitute(&self.plan.exec, service, index, backend);
            println!("{tag}: running `{command}`");
            let mut seen_down = false;
            let status = {
                let child = spawn_shell(&command)?;
                let mut wait = std::pin::pin!(wait_child(child));
                // Watch the health checks while the command runs: a backend seen failing
                // during or after it has been restarted for sure.
                loop {
                    tokio::select! {
                        status = wait.as_mut() => break status.with_context(|| format!("running `{command}`"))?,
                        () = tokio::time::sleep(POLL) => {
                            seen_down |= !self.backend(backend).await?.checks_up;
                        }
                    }
                }
            };
            if !status.success() {
                bail!("{tag}: `{command}` failed ({status})");
            }
            let after = self.backend(backend).await?;
            let took = self.wait_healthy(&tag, backend, before.probes.max(after.probes), rise, seen_down).await?;
            admin::set_drained(self.admin, service, backend, false).await?;
            self.drained.retain(|b| b != backend);
            self.done.push(backend.clone());
            println!(
                "{tag}: healthy {:.1}s after the command; undrained ({:.1}s in all)",
                took.as_secs_f64(),
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(after) = &self.plan.after {
            let command = substitute(after, service, 0, "");
            shell("--after", &command).await?;
        }
        Ok(())
    }

    async fn backend(&self, address: &str) -> anyhow::Result<BackendStatus> {
        let status = admin::fetch_status(self.admin).await?;
        let service = find_service(&status, &self.plan.service)?;
        service
            .backends
            .iter()
            .find(|b| b.address == address)
            .cloned()
            .ok_or_else(|| anyhow!("backend {address} is no longer in service {} (was the config reloaded?)", self.plan.service))
    }

    async fn wait_drained(&self, tag: &str, backend: &str) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last_said = Instant::now();
        loop {
            let b = self.backend(backend).await?;
            if b.live_connections == 0 {
                println!("{tag}: no open connections left ({:.1}s)", start.elapsed().as_secs_f64());
                return Ok(());
            }
            if start.elapsed() >= self.plan.drain_timeout {
                let timeout = humantime::format_duration(self.plan.drain_timeout);
                if self.plan.proceed_on_drain_timeout {
                    println!(
                        "{tag}: still {} after {timeout}; restarting anyway (--proceed-on-drain-timeout); the restart may cut them",
                        connections(b.live_connections)
                    );
                    return Ok(());
                }
                bail!(
                    "{tag}: still {} after --drain-timeout {timeout}; not restarting it (give a longer \
                     --drain-timeout, or --proceed-on-drain-timeout to cut them)",
                    connections(b.live_connections)
                );
            }
            if last_said.elapsed() >= Duration::from_secs(5) {
                println!("{tag}: waiting for {} to end", connections(b.live_connections));
                last_said = Instant::now();
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the health checks pass on probes made after the command: `rise` passes in a
    /// row, all of them later than the probes seen when the command ended (one more, in case
    /// one was under way then), or, once the backend was seen failing, its return to up.
    async fn wait_healthy(&self, tag: &str, backend: &str, probes_before: u64, rise: u64, mut seen_down: bool) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let b = self.backend(backend).await?;
            seen_down |= !b.checks_up;
            let fresh = b.probes.saturating_sub(probes_before);
            if b.checks_up && b.probes_passed_in_a_row >= rise && (seen_down || fresh > rise) {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= self.plan.health_timeout {
                let why = b.last_error.map_or_else(String::new, |e| format!(" (last probe: {e})"));
                bail!(
                    "{tag}: not healthy within --health-timeout {} after the command{why}",
                    humantime::format_duration(self.plan.health_timeout)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Undoes what can be undone and returns the account of the failed rollout.
    async fn fail(&mut self, error: anyhow::Error, backends: &[String]) -> anyhow::Error {
        let service = &self.plan.service;
        let mut account = vec![format!("rollout of {service} stopped: {error:#}")];
        account.push(match self.done.len() {
            0 => "no backend was restarted".into(),
            _ => format!("restarted and back in rotation: {}", self.done.join(", ")),
        });
        let mut undrained = Vec::new();
        for backend in std::mem::take(&mut self.drained) {
            match admin::set_drained(self.admin, service, &backend, false).await {
                Ok(r) => undrained.push(format!("{backend} ({})", state_name(r.state))),
                Err(e) => account.push(format!("could not undrain {backend}: {e:#}; run `xlb undrain {service} {backend}`")),
            }
        }
        if !undrained.is_empty() {
            account.push(format!("undrained again: {}", undrained.join(", ")));
        }
        let untouched: Vec<&str> = backends
            .iter()
            .skip(self.done.len() + 1)
            .map(String::as_str)
            .collect();
        if !untouched.is_empty() {
            account.push(format!("not restarted: {}", untouched.join(", ")));
        }
        if let Some(rollback) = &self.plan.rollback {
            let at = self.done.len();
            let backend = backends.get(at).map_or("", String::as_str);
            let index = if backend.is_empty() { 0 } else { at + 1 };
            let command = substitute(rollback, service, index, backend);
            account.push(match shell("--rollback", &command).await {
                Ok(()) => format!("rollback `{command}` succeeded"),
                Err(e) => format!("{e:#}"),
            });
        }
        for line in &account {
            println!("{line}");
        }
        anyhow!(account.join("; "))
    }
}

fn connections(n: u64) -> String {
    match n {
        1 => "1 open connection".into(),
        n => format!("{n} open connections"),
    }
}

fn spawn_shell(command: &str) -> anyhow::Result<tokio::process::Child> {
    Command::new("sh")
        .arg("-c")
        .arg(command)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting `sh -c {command:?}`"))
}

async fn wait_child(mut child: tokio::process::Child) -> std::io::Result<ExitStatus> {
    child.wait().await
}

/// Runs a hook command to its end; an error unless it exits 0.
async fn shell(what: &str, command: &str) -> anyhow::Result<()> {
    println!("running {what} `{command}`");
    let status = wait_child(spawn_shell(command)?).await?;
    if !status.success() {
        bail!("{what} `{command}` failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert_eq!(
            substitute("systemctl restart app@{index} # {backend} {port} {service}", "web", 2, "203.0.113.10:8002"),
            "systemctl restart app@2 # 203.0.113.10:8002 8002 web"
        );
        assert_eq!(substitute("x{port}", "web", 1, "[2001:db8::1]:8001"), "x8001");
        assert_eq!(substitute("deploy {index}", "web", 0, ""), "deploy ");
    }
}

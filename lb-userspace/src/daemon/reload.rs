//! A reload (`SIGHUP`, `xlb reload`, `POST /api/reload`) reads the config file again and
//! applies it whole, or not at all: services and backends that stay keep their slots
//! (`layout`), so their flows and counts are untouched; new ones take free slots; removed
//! backends are drained and their slots cleared once no flow refers to them (`reconcile`).
//! The `https` and `redirect` services are added, changed and removed with it (`sites`): what
//! can fail for them (binding, certificates, ACME managers) is done before anything changes.

use std::sync::Arc;

use tracing::{error, info};

use super::{Current, Shared, probes};
use crate::{
    config::Config,
    layout::Layout,
    status::ReloadResult,
};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new config is not valid, or cannot be applied while running.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Reads the config file again and applies it: all of it, or (when it is invalid, or asks for
/// something only a restart can do) nothing, with the reason. Logs the outcome either way.
pub(super) fn reload(sh: &Arc<Shared>) -> Result<ReloadResult, ReloadError> {
    let result = try_reload(sh);
    match &result {
        Ok(r) if r.changes.is_empty() => info!(config = %r.config, "config reloaded: nothing changed"),
        Ok(r) => info!(config = %r.config, "config reloaded: {}", r.changes.join("; ")),
        Err(e) => error!("reload refused, the running config stays in force: {e}"),
    }
    result
}

fn try_reload(sh: &Arc<Shared>) -> Result<ReloadResult, ReloadError> {
    let _one_at_a_time = sh.reloading.lock().unwrap();
    let old = sh.current();
    let path = old.config.path.clone();
    let new = Config::load(&path).map_err(|e| ReloadError::Rejected(e.to_string()))?;
    let restart = |what: &str| {
        ReloadError::Rejected(format!(
            "{}: {what} changed; that takes a restart of the daemon (`systemctl restart xlb`, which keeps \
             connections), not a reload",
            path.display()
        ))
    };
    if new.dataplane != old.config.dataplane {
        return Err(restart("[dataplane]"));
    }
    if new.admin != old.config.admin {
        return Err(restart("admin.listen"));
    }
    // Certificate files are read again on every reload, changed or not.
    sh.sites.certificates.notify_waiters();
    let changes = describe_changes(&old.config, &new);
    if changes.is_empty() {
        return Ok(ReloadResult { config: path.display().to_string(), changes });
    }
    // Dropped unused (the reload fails below), it closes what it bound and stops what it started.
    let sites = sh.sites.prepare(&new).map_err(|e| ReloadError::Rejected(format!("{}: {e:#}", path.display())))?;
    let mut backends = sh.backends.lock().unwrap();
    let mut dp = sh.dp.lock().unwrap();
    let layout = Layout::plan(&new.services, &dp.occupancy()?).map_err(|e| ReloadError::Rejected(format!("{}: {e}", path.display())))?;
    let next = backends.replan(&new, &layout);
    if let Err(e) = dp.apply_layout(&new.services, &layout, &next.states()) {
        // Put back what the running config says, so that the maps match it again.
        if let Err(undo) = dp.apply_layout(&old.config.services, &old.layout, &backends.states()) {
            error!("restoring the running config in the maps after a failed reload: {undo:#}");
        }
        return Err(ReloadError::Failed(e.context("writing the new config into the maps")));
    }
    let mut retiring = sh.retiring.lock().unwrap();
    for r in layout.retiring.iter().filter(|r| !retiring.contains(r)) {
        let live = dp.slot_conns(r.slot).map(|c| c.live.max(0)).unwrap_or(0);
        info!(backend = %r.addr, live, "backend removed from the config: draining; its open connections continue, and its slot is freed once they end");
    }
    *retiring = layout.retiring.clone();
    drop(retiring);
    if new.alerts != old.config.alerts {
        sh.alerts.configure(new.alerts.clone());
    }
    *backends = next;
    backends.settle_alerts();
    let current = Arc::new(Current { config: new, layout });
    *sh.current.lock().unwrap() = current.clone();
    sh.backplane.relayout(&current.config, &current.layout);
    let proxies: Arc<dyn crate::https::Backplane> = sh.backplane.clone();
    sh.sites.commit(sites, backends.generation(), &backends.view(), &proxies);
    drop(dp);
    drop(backends);
    for p in sh.probers.lock().unwrap().drain(..) {
        p.abort();
    }
    probes::start(sh);
    Ok(ReloadResult { config: path.display().to_string(), changes })
}

/// What differs between two configs' services, one line each.
fn describe_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changes = Vec::new();
    // A service is the same one when its name or, renamed, its VIP is (the maps know it by VIP).
    let same = |a: &crate::config::Service, b: &crate::config::Service| {
        a.name == b.name || (a.listen == b.listen && !new.services.iter().any(|n| n.name == a.name))
    };
    for svc in &new.services {
        let Some(before) = old.services.iter().find(|s| same(s, svc)) else {
            let n = svc.backends.len();
            changes.push(format!("service {} added ({}, {n} backend{})", svc.name, svc.listen, if n == 1 { "" } else { "s" }));
            continue;
        };
        if before.name != svc.name {
            changes.push(format!("service {} renamed to {}", before.name, svc.name));
        }
        if before.listen != svc.listen {
            changes.push(format!("service {}: listen {} -> {}", svc.name, before.listen, svc.listen));
        }
        for addr in svc.backends.iter().filter(|a| !before.backends.contains(a)) {
            changes.push(format!("service {}: backend {addr} added", svc.name));
        }
        for addr in before.backends.iter().filter(|a| !svc.backends.contains(a)) {
            changes.push(format!("service {}: backend {addr} removed (draining)", svc.name));
        }
        if before.health != svc.health {
            changes.push(format!("service {}: health checks changed", svc.name));
        }
        if before.mode != svc.mode {
            changes.push(format!("service {}: mode {} -> {}", svc.name, before.mode.as_str(), svc.mode.as_str()));
        } else if before.https != svc.https {
            let tls = |s: &crate::config::Service| s.https.as_ref().map(|h| h.tls.clone());
            changes.push(format!(
                "service {}: {}",
                svc.name,
                if tls(before) != tls(svc) { "certificates ([service.tls]) changed" } else { "HTTP settings changed" }
            ));
        }
        if before.backends != svc.backends && changes.iter().all(|c| !c.starts_with(&format!("service {}: backend", svc.name))) {
            changes.push(format!("service {}: backends reordered", svc.name));
        }
    }
    for svc in old.services.iter().filter(|s| !new.services.iter().any(|n| same(s, n))) {
        changes.push(format!("service {} removed (its backends drain)", svc.name));
    }
    if old.alerts != new.alerts {
        changes.push("[alerts] changed".into());
    }
    if old.acme != new.acme {
        changes.push("[acme] changed (the ACME managers start again from the new state_dir)".into());
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(services: &str) -> Config {
        let text = format!("[dataplane]\ninterfaces = [\"lo\"]\n{services}");
        Config::parse(std::path::Path::new("/etc/xlb/xlb.toml"), &text).unwrap()
    }

    fn service(name: &str, listen: &str, backends: &str) -> String {
        format!("[[service]]\nname = \"{name}\"\nlisten = \"{listen}\"\nbackends = [{backends}]\n")
    }

    #[test]
    fn reload_changes_are_described() {
        let a = "\"127.0.0.1:8001\"";
        let b = "\"127.0.0.1:8002\"";
        let c = "\"127.0.0.1:8003\"";
        let old = config(&(service("web", "127.0.0.1:80", &format!("{a}, {b}")) + &service("api", "127.0.0.1:81", a)));
        assert!(describe_changes(&old, &old.clone()).is_empty());
        let new = config(
            &(service("web", "127.0.0.1:80", &format!("{b}, {c}"))
                + &service("app", "127.0.0.1:81", a)
                + &service("admin", "127.0.0.1:82", c)),
        );
        assert_eq!(
            describe_changes(&old, &new),
            [
                "service web: backend 127.0.0.1:8003 added",
                "service web: backend 127.0.0.1:8001 removed (draining)",
                "service api renamed to app",
                "service admin added (127.0.0.1:82, 1 backend)",
            ]
        );
        let reordered = config(&(service("web", "127.0.0.1:80", &format!("{b}, {a}")) + &service("api", "127.0.0.1:81", a)));
        assert_eq!(describe_changes(&old, &reordered), ["service web: backends reordered"]);
        let gone = config(&service("web", "127.0.0.1:8080", &format!("{a}, {b}")));
        assert_eq!(
            describe_changes(&old, &gone),
            ["service web: listen 127.0.0.1:80 -> 127.0.0.1:8080", "service api removed (its backends drain)"]
        );
    }
}

//! Start-up: the admin API's listener and the data path, loaded or adopted. Everything that
//! can fail because of the config or the host fails here (or in `Sites::prepare`, for the
//! `https` and `redirect` services), before the daemon serves.

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::{
    backends::BackendState,
    config::Config,
    dataplane::{self, Dataplane},
    layout::Layout,
};

/// Binds the admin API's address; a socket systemd passed for it (xlb.socket) is used as is.
pub(super) async fn bind_admin(config: &Config) -> anyhow::Result<TcpListener> {
    let listen = config.admin.listen;
    // A socket systemd passed for it (xlb.socket) is used as is; else it is bound here.
    let listener = match crate::listeners::take(listen) {
        Some(inherited) => {
            info!(admin = %listen, "admin API on the socket passed by systemd");
            tokio::net::TcpListener::from_std(inherited).context("using the admin API socket passed by systemd")?
        }
        None => tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the admin API to {listen} (admin.listen in the config)"))?,
    };
    Ok(listener)
}

/// Loads or adopts the data path. A first start that fails half-way (say, the second interface
/// refuses XDP) must not leave the first one attached and the maps pinned with nobody managing
/// them; a restart that fails leaves the running data path alone.
pub(super) fn open_dataplane(config: &Config) -> anyhow::Result<(Dataplane, Layout, Vec<Vec<BackendState>>)> {
    let pin_path = config.dataplane.pin_path.clone();
    let first_start = match std::fs::read_dir(&pin_path) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    let (dp, layout, states) = match tokio::task::block_in_place(|| load_or_adopt(config)) {
        Ok(opened) => opened,
        Err(e) => {
            if first_start {
                match dataplane::detach(&pin_path) {
                    Ok(removed) if !removed.is_empty() => {
                        warn!(pin_path = %pin_path.display(), "start failed: detached and unpinned what it had set up")
                    }
                    Ok(_) => {}
                    Err(undo) => error!(pin_path = %pin_path.display(), "start failed, and undoing it failed too: {undo:#}"),
                }
            }
            return Err(e);
        }
    };
    for (iface, mode) in dp.interfaces() {
        info!(interface = %iface, xdp_mode = mode.as_str(), "data path attached");
    }
    info!(
        pin_path = %dp.pin_path().display(),
        adopted = dp.adopted,
        "{}",
        if dp.adopted { "adopted pinned maps: existing flows kept" } else { "created fresh maps" }
    );
    for r in &layout.retiring {
        info!(backend = %r.addr, slot = r.slot, "backend no longer in the config: draining; its slot is freed once its connections end");
    }
    Ok((dp, layout, states))
}

/// Loads or adopts the data path and writes the services into it: where (every backend found
/// in the maps keeps its slot) and with which backend states.
fn load_or_adopt(config: &Config) -> anyhow::Result<(Dataplane, Layout, Vec<Vec<BackendState>>)> {
    let mut dp = Dataplane::open(&config.dataplane)?;
    let layout = Layout::plan(&config.services, &dp.occupancy()?).map_err(|e| anyhow::anyhow!("{}: {e}", config.path.display()))?;
    // Restore each backend's state from the maps when adopting, so a restart neither floods a
    // backend that was down nor pauses one that was up. New backends start up, as in nginx,
    // and the first probes correct that within `fall` intervals.
    let states: Vec<Vec<BackendState>> = dp
        .layout_states(&config.services, &layout)
        .into_iter()
        .map(|svc| svc.into_iter().map(|s| s.unwrap_or(BackendState::Up)).collect())
        .collect();
    dp.apply_layout(&config.services, &layout, &states)?;
    // Requests a previous daemon had in flight died with it; and a backend that is no longer
    // behind an https service must not keep what was published for it.
    for slot in 0..lb_common::backend::MAX_BACKENDS {
        dp.set_proxied(slot, 0)?;
    }
    Ok((dp, layout, states))
}

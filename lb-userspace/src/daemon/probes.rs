//! The health probes of the running config, and the two tasks that hand their reports to the
//! backend state machine. A reload aborts them and starts new ones; a report from an earlier
//! config's probers is dropped by the state machine (`generation`).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Shared;
use crate::{backends::Event, health};

/// Starts probing the backends of the running config, each from the verdict the state machine
/// has for it (a backend down or failed must pass `rise` probes). They stop when the daemon
/// does, or when a reload aborts them.
pub(super) fn start(sh: &Arc<Shared>) {
    let current = sh.current();
    let (generation, initial_up, passive_failed) = {
        let backends = sh.backends.lock().unwrap();
        (backends.generation(), backends.initial_up(), backends.passive_failed().clone())
    };
    let (results_tx, mut results_rx) = mpsc::unbounded_channel::<health::ProbeResult>();
    let (transitions_tx, mut transitions_rx) = mpsc::unbounded_channel::<health::Transition>();
    let _guard = sh.runtime.enter();
    let mut tasks = health::spawn_with_passive(
        &current.config.services,
        initial_up,
        &passive_failed,
        results_tx,
        transitions_tx,
        sh.shutdown.clone(),
    );
    let s = sh.clone();
    tasks.push(sh.runtime.spawn(async move {
        while let Some(t) = transitions_rx.recv().await {
            let mut backends = s.backends.lock().unwrap();
            let mut dp = s.dp.lock().unwrap();
            let event = Event::Health { generation, service: t.service, backend: t.backend, up: t.up };
            // A failed write is logged where it happened.
            let _ = backends.apply(&mut *dp, event);
        }
    }));
    let s = sh.clone();
    tasks.push(sh.runtime.spawn(async move {
        while let Some(result) = results_rx.recv().await {
            s.backends.lock().unwrap().probed(generation, result);
        }
    }));
    *sh.probers.lock().unwrap() = tasks;
}

//! What packet tests and the benchmark need of a `Dataplane` and the daemon does not: the
//! programs loaded without attaching or pinning, run with `BPF_PROG_TEST_RUN`, and backends
//! addressed by position (backend `b` of service `s` in slot `s * 16 + b`, as a first start
//! lays them out: `Layout::positional`).

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use aya::{TestRunOptions, programs::TestRun as _};
use lb_common::{
    backend::{BackendConns, Passive},
    flow::{Flow, FlowKey, ReplyNat},
    programs,
};

use super::{Dataplane, load_object};
use crate::{backends::BackendState, config, layout::Layout};

/// What one `BPF_PROG_TEST_RUN` returned.
#[derive(Debug)]
pub struct TestRunOutput {
    /// The program's return value (XDP action or TC action).
    pub verdict: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// Average run time per repetition, as measured by the kernel.
    pub duration: std::time::Duration,
}

impl Dataplane {
    /// Loads the programs with fresh, unpinned maps and attaches nothing: for running them
    /// with `BPF_PROG_TEST_RUN` (packet tests, benchmarks). Everything is freed on drop.
    pub fn load_detached(max_flows: u32) -> anyhow::Result<Self> {
        let ebpf = load_object(max_flows, None)?;
        Self::new(ebpf, PathBuf::new(), max_flows, Vec::new(), false)
    }


    /// Runs the XDP program on `packet` (`repeat` times; map updates persist across repeats).
    pub fn test_run_xdp(&self, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        self.test_run(programs::XDP, packet, repeat)
    }

    /// Runs the TC egress program on `packet`.
    pub fn test_run_tc(&self, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        self.test_run(programs::TC_EGRESS, packet, repeat)
    }

    /// Runs the object's no-op XDP program: the baseline program cost is measured against.
    pub fn test_run_noop(&self, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        self.test_run(programs::NOOP, packet, repeat)
    }

    fn test_run(&self, name: &str, packet: &[u8], repeat: u32) -> anyhow::Result<TestRunOutput> {
        let program = self.ebpf.program(name).with_context(|| format!("program {name} missing"))?;
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions { data_in: Some(packet), data_out: Some(&mut out), repeat, ..Default::default() };
        let result = match program {
            aya::programs::Program::Xdp(p) => p.test_run(opts),
            aya::programs::Program::SchedClassifier(p) => p.test_run(opts),
            _ => bail!("program {name} cannot be test-run"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput { verdict: result.return_value, data: out, duration: result.duration })
    }

    /// Instructions the verifier processed for each program when loading it (the kernel's
    /// `verified_insns`): what its load time grows with.
    pub fn verified_instructions(&self) -> anyhow::Result<Vec<(&'static str, u32)>> {
        [programs::XDP, programs::TC_EGRESS]
            .into_iter()
            .map(|name| {
                let program = self.ebpf.program(name).with_context(|| format!("program {name} missing"))?;
                let info = match program {
                    aya::programs::Program::Xdp(p) => p.info(),
                    aya::programs::Program::SchedClassifier(p) => p.info(),
                    _ => bail!("unexpected type of program {name}"),
                }
                .with_context(|| format!("reading the info of {name}"))?;
                Ok((name, info.verified_instruction_count().unwrap_or(0)))
            })
            .collect()
    }


    /// The `FLOWS` entry of a client → VIP 4-tuple.
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    /// The `REPLIES` entry of a backend → client 4-tuple.
    pub fn reply(&self, key: &FlowKey) -> Option<ReplyNat> {
        self.replies.get(key, 0).ok()
    }

    pub fn set_conns(&mut self, service: usize, backend: usize, conns: BackendConns) -> anyhow::Result<()> {
        Ok(self.conns.set(Layout::positional_slot(service, backend), conns, 0)?)
    }


    /// The backend states currently in the maps for `services` (as laid out by
    /// `apply_services`), or `None` for a backend whose slot holds something else.
    pub fn current_states(&self, services: &[config::Service]) -> Vec<Vec<Option<BackendState>>> {
        self.layout_states(services, &Layout::positional(services))
    }

    /// Writes services and backends in the positional layout of a first start (backend `b` of
    /// service `s` in slot `s * 16 + b`). `states[s][b]` is each backend's state.
    pub fn apply_services(&mut self, services: &[config::Service], states: &[Vec<BackendState>]) -> anyhow::Result<()> {
        self.apply_layout(services, &Layout::positional(services), states)
    }


    /// A backend's passive health record, in the positional layout (tests).
    pub fn passive(&self, service: usize, backend: usize) -> anyhow::Result<Passive> {
        self.slot_passive(Layout::positional_slot(service, backend))
    }

    /// Overwrites a backend's passive health record, in the positional layout (tests set up
    /// ramps and windows with it).
    pub fn set_passive(&mut self, service: usize, backend: usize, passive: Passive) -> anyhow::Result<()> {
        Ok(self.passive.set(Layout::positional_slot(service, backend), passive, 0)?)
    }

    /// A backend's state, in the positional layout (tests).
    pub fn set_state(&mut self, service: usize, backend: usize, state: BackendState) -> anyhow::Result<()> {
        self.set_slot_state(Layout::positional_slot(service, backend), state)
    }


    pub fn conns(&self, service: usize, backend: usize) -> anyhow::Result<BackendConns> {
        Ok(self.conns.get(&Layout::positional_slot(service, backend), 0)?)
    }


    pub fn proxied(&self, slot: u32) -> anyhow::Result<i64> {
        Ok(self.proxied.get(&slot, 0)?)
    }


    /// Connections ever sent to a backend: its new flows, summed over CPUs.
    pub fn total(&self, service: usize, backend: usize) -> anyhow::Result<u64> {
        self.backend_flows(Layout::positional_slot(service, backend))
    }

}

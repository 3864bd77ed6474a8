//! Short commands a test runs to completion: bounded in time, their output kept for the
//! assertion message.
use std::process::{Command, ExitStatus};

use crate::{COMMAND_TIMEOUT, Proc, Topology};

/// Runs a command that must finish within `COMMAND_TIMEOUT`, owned by a `Proc` (killed if
/// the test fails first); its exit status and output (stdout and stderr, interleaved).
pub fn run(cmd: Command, label: &str) -> (ExitStatus, String) {
    Proc::spawn(cmd, label).wait_with_output(COMMAND_TIMEOUT)
}

/// `run`, asserting that the command succeeds; its output.
pub fn run_ok(cmd: Command, label: &str) -> String {
    let (status, output) = run(cmd, label);
    assert!(status.success(), "{label} failed ({status}): {output}");
    output
}

pub fn link_show(topo: &Topology) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", &topo.lb_ns, "link", "show", &topo.lb_if]);
    run_ok(cmd, "ip link show")
}

/// Whether the lb end of the veth has an XDP program (native `xdp` or generic `xdpgeneric`).
pub fn xdp_attached(topo: &Topology) -> bool {
    link_show(topo).contains("xdp")
}

//! Per-CPU counters in `STATS` (one entry). Each field is one reason a packet took a path;
//! userspace sums the CPUs.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Stats {
    /// Packets seen by the XDP program.
    pub xdp_packets: u64,
    /// Bytes seen by the XDP program.
    pub xdp_bytes: u64,
    /// Packets towards a VIP rewritten to their backend (new and existing flows).
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Flows created (SYN to a VIP with a backend chosen).
    pub new_flows: u64,
    /// Replies rewritten back to the VIP by the TC egress program.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// Flows closed by FIN or RST.
    pub closed_flows: u64,
    /// New flows passed unmodified because conntrack was full.
    pub conntrack_full: u64,
    /// SYNs to a VIP dropped because no backend was up (the client retransmits the SYN).
    pub drop_no_backend: u64,
    /// Non-SYN packets to a VIP with no flow (passed unmodified; the host answers RST).
    pub no_flow: u64,
    /// Truncated Ethernet/IP/TCP headers, IPv4 ihl < 5, TCP doff < 5 or past the end.
    pub malformed: u64,
    /// IPv4 fragments carrying TCP (passed unmodified).
    pub fragments: u64,
    /// IPv6 packets whose first next-header is an extension header (passed unmodified).
    pub ipv6_ext: u64,
    /// IPv4 packets with options that were handled.
    pub ip_options: u64,
    /// ICMP errors about a reply of a tracked flow, rewritten to name the backend.
    pub icmp_errors: u64,
    /// Egress packets whose headers had to be pulled into the linear area before parsing
    /// (the stack builds them there, so this stays near zero).
    pub tc_pull: u64,
}
const _: () = assert!(size_of::<Stats>() == 17 * 8);

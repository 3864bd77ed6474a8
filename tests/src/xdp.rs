//! A no-op XDP program (`return XDP_PASS`) attached in driver mode through a BPF link, for
//! benchmark arms that bypass xlb but must pay the same "XDP tax": any XDP program on a veth
//! disables GSO on its peer, so the baselines carry one too.
//!
//! Loaded from two hand-written instructions, the same code as the object's `xlb_noop`
//! (`r0 = XDP_PASS; exit`), so it needs neither the built object nor a BPF library. The link
//! is held by a file descriptor, not pinned: it detaches when the `NoopXdp` is dropped, and
//! also when the process dies in any way.
use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

use nix::libc;

use crate::Topology;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `struct bpf_insn` as one little-endian u64: opcode, registers, offset, immediate.
const INSNS: [u64; 2] = [
    0xb7 | (2 << 32), // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 2 (XDP_PASS)
    0x95,             // BPF_JMP | BPF_EXIT
];

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

/// The leading fields of `union bpf_attr` for `BPF_LINK_CREATE`.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// A no-op XDP program attached to an interface; detached on drop.
#[derive(Debug)]
pub struct NoopXdp {
    // Field order is drop order: the link (the attachment) goes first.
    _link: OwnedFd,
    _prog: OwnedFd,
}

impl Topology {
    /// Attaches the no-op XDP program to the lb end of the veth (`lb_if`) in driver mode, the
    /// mode xlb's `xdp_mode = "auto"` gets on a veth. Panics if something else is attached.
    pub fn attach_noop_xdp(&self) -> NoopXdp {
        let dev = self.lb_if.clone();
        // The link resolves the ifindex in the calling thread's network namespace.
        self.in_lb(|| attach(&dev))
            .unwrap_or_else(|e| panic!("attaching a no-op XDP program to {dev}: {e}"))
    }
}

fn attach(dev: &str) -> io::Result<NoopXdp> {
    let ifindex = nix::net::if_::if_nametoindex(dev).map_err(io::Error::from)?;
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..8].copy_from_slice(b"xlb_noop");
    let load = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: INSNS.len() as u32,
        insns: INSNS.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..ProgLoad::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &load)?;
    let link = LinkCreate {
        prog_fd: raw(&prog),
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    let link = bpf(BPF_LINK_CREATE, &link)?;
    Ok(NoopXdp {
        _link: link,
        _prog: prog,
    })
}

fn raw(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd as _;
    fd.as_raw_fd() as u32
}

/// `bpf(cmd, attr, sizeof attr)` for commands that return a new file descriptor (the kernel
/// opens BPF fds close-on-exec, so children never inherit them).
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a live, initialised `repr(C)` prefix of `union bpf_attr` and the size
    // passed is its own; the kernel reads only that many bytes and writes nothing back for
    // these commands. Pointers inside it (`insns`, `license`) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return of these commands is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

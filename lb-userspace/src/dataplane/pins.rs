//! Loading the object, pinning it under `pin_path`, attaching to interfaces and detaching.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapInfo},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{
    LAYOUT_VERSION, Meta,
    backend::{Backend, BackendConns, MAX_BACKENDS, Passive},
    flow::{Closed, Flow, FlowKey, ReplyNat},
    maps, programs,
    service::{Service, ServiceKey},
    stats::Stats,
};
use tracing::{info, warn};

use super::{AttachedMode, OBJECT};
use crate::config;

/// Mounts bpffs on `/sys/fs/bpf` when the pin path lives there and nothing is mounted yet
/// (systemd mounts it at boot; minimal systems and containers may not).
pub(super) fn ensure_bpffs(pin_path: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_path.starts_with(root) {
        return Ok(());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mounted = mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "));
    if !mounted {
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .context("mounting bpffs on /sys/fs/bpf (needs CAP_SYS_ADMIN; or mount it yourself: `mount -t bpf bpf /sys/fs/bpf`)")?;
        info!("mounted bpffs on /sys/fs/bpf");
    }
    Ok(())
}

pub(super) struct Expected {
    name: &'static str,
    key: u32,
    value: u32,
    max_entries: u32,
}

pub(super) fn expected_maps(max_flows: u32) -> [Expected; 12] {
    let e = |name, key: usize, value: usize, max_entries| Expected { name, key: key as u32, value: value as u32, max_entries };
    [
        e(maps::SERVICES, size_of::<ServiceKey>(), size_of::<Service>(), lb_common::service::MAX_SERVICES),
        e(maps::BACKENDS, 4, size_of::<Backend>(), MAX_BACKENDS),
        e(maps::BACKEND_CONNS, 4, size_of::<BackendConns>(), MAX_BACKENDS),
        e(maps::BACKEND_FLOWS, 4, 8, MAX_BACKENDS),
        e(maps::FLOWS, size_of::<FlowKey>(), size_of::<Flow>(), max_flows),
        e(maps::REPLIES, size_of::<FlowKey>(), size_of::<ReplyNat>(), max_flows),
        e(maps::CLOSED, size_of::<FlowKey>(), size_of::<Closed>(), max_flows),
        e(maps::STATS, 4, size_of::<Stats>(), 1),
        e(maps::META, 4, size_of::<Meta>(), 1),
        e(maps::VIP_PORTS, 4, 1, lb_common::service::VIP_PORTS_LEN),
        e(maps::PROXIED, 4, 8, MAX_BACKENDS),
        e(maps::PASSIVE, 4, size_of::<Passive>(), MAX_BACKENDS),
    ]
}

/// Refuses pinned maps this build cannot use as they are, before anything is loaded: silently
/// reinterpreting another layout's bytes would corrupt flows.
pub(super) fn check_pinned_layout(pin_path: &Path, max_flows: u32) -> anyhow::Result<bool> {
    let mut found = 0;
    for Expected { name, key, value, max_entries } in expected_maps(max_flows) {
        let path = pin_path.join(name);
        let info = match MapInfo::from_pin(&path) {
            Ok(info) => info,
            Err(_) if !path.exists() => continue,
            Err(e) => bail!("cannot open pinned map {}: {e}", path.display()),
        };
        found += 1;
        let fix = format!(
            "the state under {} was written by another xlb version or configuration; restore the previous setting, or run `xlb detach --config FILE` to remove it (this drops tracked flows)",
            pin_path.display()
        );
        if info.key_size() != key || info.value_size() != value {
            bail!(
                "pinned map {} has {}-byte keys and {}-byte values, this xlb uses {key} and {value}: {fix}",
                path.display(), info.key_size(), info.value_size()
            );
        }
        if info.max_entries() != max_entries {
            let what = if name == maps::FLOWS || name == maps::REPLIES {
                format!("dataplane.max_flows is {max_flows} but the pinned conntrack holds {}", info.max_entries())
            } else {
                format!("pinned map {} has {} entries, this xlb uses {max_entries}", path.display(), info.max_entries())
            };
            bail!("{what}: {fix}");
        }
    }
    if found > 0 {
        let meta: Array<MapData, Meta> = Array::try_from(aya::maps::Map::Array(
            MapData::from_pin(pin_path.join(maps::META)).context("opening pinned META map")?,
        ))?;
        let Meta { layout_version, .. } = meta.get(&0, 0)?;
        // 0: an earlier start created the maps but failed before finishing (sizes matched above).
        if layout_version != LAYOUT_VERSION && layout_version != 0 {
            bail!(
                "the maps pinned under {} have layout version {layout_version}, this xlb uses {LAYOUT_VERSION}; run `xlb detach --config FILE` to remove them (this drops tracked flows)",
                pin_path.display()
            );
        }
    }
    Ok(found > 0)
}

pub(super) fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map>,
    <T as TryFrom<aya::maps::Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Replaces a pin with a fresh one of `pin` (programs are re-pinned on every start).
pub(super) fn repin(path: &Path, pin: impl FnOnce(&Path) -> Result<(), aya::pin::PinError>) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing old pin {}", path.display())),
    }
    pin(path).with_context(|| format!("pinning {}", path.display()))
}

pub(super) fn open_pinned_link(path: &Path) -> anyhow::Result<Option<FdLink>> {
    if !path.exists() {
        return Ok(None);
    }
    let link = PinnedLink::from_pin(path).with_context(|| format!("opening pinned link {}", path.display()))?;
    Ok(Some(FdLink::from(link)))
}

pub(super) fn xdp_link_path(pin_path: &Path, mode: AttachedMode, iface: &str) -> PathBuf {
    pin_path.join(format!("link_xdp_{}_{iface}", mode.as_str()))
}

/// Parses the object, creating its maps (or opening those pinned under `pin_path`), and loads
/// both programs into the kernel (the verifier runs here).
pub(super) fn load_object(max_flows: u32, pin_path: Option<&Path>) -> anyhow::Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!("this xlb binary was built without its eBPF object (AYA_BUILD_SKIP was set); rebuild it with `cargo xtask build`");
    }
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = match pin_path {
        Some(dir) => maps::PINNED.iter().map(|&m| (m, dir.join(m))).collect(),
        None => Vec::new(),
    };
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(maps::FLOWS, max_flows)
        .map_max_entries(maps::REPLIES, max_flows)
        .map_max_entries(maps::CLOSED, max_flows);
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    for name in [programs::XDP, programs::NOOP] {
        let xdp: &mut Xdp = ebpf.program_mut(name).with_context(|| format!("{name} missing"))?.try_into()?;
        xdp.load().with_context(|| format!("loading {name} (verifier)"))?;
    }
    let tc: &mut SchedClassifier = ebpf.program_mut(programs::TC_EGRESS).context("TC program missing")?.try_into()?;
    tc.load().context("loading the TC egress program (verifier)")?;
    Ok(ebpf)
}

/// Attaches XDP to `iface`, or swaps the program into the link a previous run pinned.
pub(super) fn attach_xdp(xdp: &mut Xdp, pin_path: &Path, iface: &str, want: config::XdpMode) -> anyhow::Result<AttachedMode> {
    for mode in [AttachedMode::Native, AttachedMode::Generic] {
        let path = xdp_link_path(pin_path, mode, iface);
        if let Some(link) = open_pinned_link(&path)? {
            let wanted = match want {
                config::XdpMode::Auto => true,
                config::XdpMode::Native => mode == AttachedMode::Native,
                config::XdpMode::Generic => mode == AttachedMode::Generic,
            };
            if !wanted {
                bail!(
                    "{iface} already has xlb's XDP program attached in {} mode but xdp_mode asks for another; run `xlb detach --config FILE` first (this drops tracked flows) or set xdp_mode = \"auto\"",
                    mode.as_str()
                );
            }
            match xdp.attach_to_link(XdpLink::try_from(link)?) {
                Ok(id) => {
                    // The pin still refers to this link; drop our handle without detaching.
                    let _ = xdp.take_link(id)?;
                    info!(interface = iface, mode = mode.as_str(), "XDP program replaced in the existing link");
                    return Ok(mode);
                }
                Err(e) if is_defunct(&e) => forget_defunct_link(&path, iface)?,
                Err(e) => return Err(e).with_context(|| format!("replacing the XDP program on {iface}")),
            }
        }
    }
    let tries: &[(XdpMode, AttachedMode)] = match want {
        config::XdpMode::Auto => &[(XdpMode::Driver, AttachedMode::Native), (XdpMode::Skb, AttachedMode::Generic)],
        config::XdpMode::Native => &[(XdpMode::Driver, AttachedMode::Native)],
        config::XdpMode::Generic => &[(XdpMode::Skb, AttachedMode::Generic)],
    };
    let mut last_err = None;
    for &(flags, mode) in tries {
        match xdp.attach(iface, flags) {
            Ok(id) => {
                let link: FdLink = xdp.take_link(id)?.try_into().context("XDP attached without a bpf_link (kernel too old?)")?;
                link.pin(xdp_link_path(pin_path, mode, iface)).context("pinning the XDP link")?;
                info!(interface = iface, mode = mode.as_str(), "XDP program attached");
                return Ok(mode);
            }
            Err(e) => {
                if want == config::XdpMode::Auto {
                    info!(interface = iface, "native XDP unavailable ({e}); trying generic");
                }
                last_err = Some(e);
            }
        }
    }
    Err(last_err.expect("at least one mode tried")).with_context(|| format!("attaching XDP to {iface}"))
}

pub(super) fn attach_tc(tc: &mut SchedClassifier, pin_path: &Path, iface: &str) -> anyhow::Result<()> {
    let path = pin_path.join(format!("link_tc_{iface}"));
    if let Some(link) = open_pinned_link(&path)? {
        match tc.attach_to_link(SchedClassifierLink::try_from(link)?) {
            Ok(id) => {
                let _ = tc.take_link(id)?;
                return Ok(());
            }
            Err(e) if is_defunct(&e) => forget_defunct_link(&path, iface)?,
            Err(e) => return Err(e).with_context(|| format!("replacing the TC program on {iface}")),
        }
    }
    let id = tc
        .attach_with_options(iface, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| format!("attaching TC egress (tcx) to {iface}"))?;
    let link: FdLink = tc.take_link(id)?.try_into()?;
    link.pin(&path).context("pinning the TC link")?;
    Ok(())
}

/// A pinned link whose interface was deleted (and perhaps created again under the same name)
/// is detached for good: the kernel answers ENOLINK to updating it.
pub(super) fn is_defunct(e: &aya::programs::ProgramError) -> bool {
    matches!(e, aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. })
        if io_error.raw_os_error() == Some(libc::ENOLINK))
}

pub(super) fn forget_defunct_link(path: &Path, iface: &str) -> anyhow::Result<()> {
    warn!(interface = iface, "the pinned link outlived its interface; attaching afresh");
    fs::remove_file(path).with_context(|| format!("removing defunct link pin {}", path.display()))
}

/// Unpins links to interfaces no longer configured, which detaches them.
pub(super) fn remove_stale_links(pin_path: &Path, interfaces: &[String]) -> anyhow::Result<()> {
    for entry in fs::read_dir(pin_path)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let iface = name
            .strip_prefix("link_xdp_native_")
            .or_else(|| name.strip_prefix("link_xdp_generic_"))
            .or_else(|| name.strip_prefix("link_tc_"));
        if let Some(iface) = iface
            && !interfaces.iter().any(|i| i == iface)
        {
            detach_link(&pin_path.join(&name))?;
            fs::remove_file(pin_path.join(&name))?;
            info!(interface = iface, "detached from an interface no longer configured");
        }
    }
    Ok(())
}

/// Removes everything `open` created: unpinning the links detaches the programs, unpinning
/// the maps frees them (and every tracked flow) once no program uses them.
pub fn detach(pin_path: &Path) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(pin_path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("reading {}", pin_path.display())),
    };
    let mut names: Vec<String> = entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    // Links first, so no packet runs a program whose maps are being removed.
    names.sort_by_key(|n| !n.starts_with("link_"));
    for name in names {
        let path = pin_path.join(&name);
        if name.starts_with("link_") {
            detach_link(&path)?;
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(name);
    }
    fs::remove_dir(pin_path).with_context(|| format!("removing {}", pin_path.display()))?;
    Ok(removed)
}

/// Detaches a pinned link now (`BPF_LINK_DETACH`). Removing the pin alone detaches it only when
/// the kernel gets round to freeing the link, a moment later; `xlb detach` promises that the
/// program is gone when it returns.
pub(super) fn detach_link(path: &Path) -> anyhow::Result<()> {
    use std::os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let pathname = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // The `obj_get` member of `union bpf_attr`: pathname, bpf_fd, file_flags.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjGet { pathname: pathname.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `attr` points at a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &raw const attr, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("opening {}", path.display()));
    }
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The `link_detach` member of `union bpf_attr`: the link fd.
    let detach = [fd as u32, 0, 0, 0];
    // SAFETY: a zeroed attr holding a link fd that `link` keeps open during the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_ptr(), size_of_val(&detach)) };
    drop(link);
    if ret < 0 {
        let e = io::Error::last_os_error();
        // ENOLINK: already detached (its interface is gone).
        if e.raw_os_error() != Some(libc::ENOLINK) {
            return Err(e).with_context(|| format!("detaching {}", path.display()));
        }
    }
    Ok(())
}


//! Map system calls aya 0.14 has no API for.

use std::io;

use aya::maps::MapData;

/// Removes `key` from a hash map and returns what it held, in one system call
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`); `None` when it was not there. aya 0.14 has no API for it.
pub(super) fn take_entry<K: bytemuck::Pod, V: bytemuck::Pod>(map: &MapData, key: &K) -> io::Result<Option<V>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // The `map_elem` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: &raw mut value as u64,
        flags: 0,
    };
    // SAFETY: attr points at a key and a value buffer of the map's sizes (checked at load by
    // `check_pinned_layout` / the object's BTF), both alive for the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &raw mut attr, size_of::<ElemAttr>()) };
    if ret == 0 {
        return Ok(Some(value));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(err),
    }
}

/// Every entry of a hash map, read with `BPF_MAP_LOOKUP_BATCH`: a handful of system calls for
/// thousands of entries, where walking keys one by one costs two per entry (seconds, with the
/// map lock of the daemon held, at a hundred thousand flows). aya 0.14 has no batch API.
pub(super) fn dump<K: bytemuck::Pod, V: bytemuck::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    // The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut entries = Vec::new();
    let mut chunk = 4096usize;
    // Hash maps page by bucket; the token is a u32 bucket index.
    let (mut token, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut keys = vec![K::zeroed(); chunk];
        let mut values = vec![V::zeroed(); chunk];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { (&raw const token) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd,
            ..BatchAttr::default()
        };
        // SAFETY: the attr points at buffers of `count` keys and values that outlive the call.
        let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_of::<BatchAttr>()) };
        let err = (ret < 0).then(io::Error::last_os_error);
        if let Some(e) = &err
            && e.raw_os_error() == Some(libc::ENOSPC)
        {
            // One bucket holds more than `chunk` entries: retry it with room for them.
            chunk *= 2;
            continue;
        }
        let n = attr.count as usize;
        entries.extend(keys.into_iter().zip(values).take(n));
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Some(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

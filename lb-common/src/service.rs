//! L4 services (VIPs): `SERVICES` maps a VIP address/port to its slice of `BACKENDS`.

/// Backends per service. Selection scans at most this many slots.
pub const MAX_BACKENDS_PER_SERVICE: u32 = 16;
pub const MAX_SERVICES: u32 = 64;

/// `VIP_PORTS` has one byte per TCP port (host byte order index): 1 if some VIP uses the port.
/// An array lookup costs next to nothing, so packets to other ports skip both hash lookups.
pub const VIP_PORTS_LEN: u32 = 65536;

/// Key of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceKey {
    /// VIP address; IPv4 in the first four bytes.
    pub addr: crate::Addr,
    /// VIP port, network byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// IP protocol number (`PROTO_TCP`).
    pub proto: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Service {
    /// Index of the service in the configuration.
    pub id: u32,
    /// First slot of this service in `BACKENDS`; its backends are `first .. first + count`.
    pub first_backend: u32,
    /// Number of configured backends (≤ `MAX_BACKENDS_PER_SERVICE`).
    pub backend_count: u32,
    pub flags: u32,
}
const _: () = assert!(size_of::<Service>() == 16);

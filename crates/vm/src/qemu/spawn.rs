//! What the platform layers need to launch QEMU: the same on every OS, so it lives once here.

use std::ffi::OsString;

/// User and groups QEMU runs as after a privilege drop (Linux only; unused elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (e.g. `kvm`, for `/dev/kvm`).
    pub groups: Vec<u32>,
}

/// What to launch and how.
#[derive(Debug)]
pub struct SpawnSpec {
    /// Full argv (`argv[0]` is the binary).
    pub argv: Vec<OsString>,
    /// Unix descriptors QEMU inherits (ignored on Windows, where nothing is inherited).
    pub inherit: Vec<i32>,
    /// Drop to these ids before exec (Linux only).
    pub drop_to: Option<Ids>,
}

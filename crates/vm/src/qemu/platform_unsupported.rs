//! Stand-in OS layer where the QEMU backend cannot launch VMs (macOS: VMs run on the `vz`
//! backend there, and QEMU with HVF is not offered). The pure parts of the backend (command
//! line, accelerator choice, QMP) still build and are tested here; selecting or creating a VM
//! reports the backend as unavailable, and `vmcp doctor` says so.

pub use super::spawn::{Ids, SpawnSpec};
use std::io;
use std::path::Path;

use super::cmdline::HostOs;

/// The host OS this module serves.
pub fn host_os() -> HostOs {
    match std::env::consts::OS {
        "macos" => HostOs::MacOs,
        "windows" => HostOs::Windows,
        _ => HostOs::Linux,
    }
}

/// Whether the QEMU backend can launch VMs on this OS.
pub const LAUNCH_SUPPORTED: Result<(), &str> =
    Err("this build cannot launch QEMU on this OS (on macOS, VMs run on the vz backend)");

/// The host end of a channel to QEMU.
pub type HostStream = tokio::io::DuplexStream;

/// A descriptor QEMU would inherit.
#[derive(Debug)]
pub struct ChildFd(i32);

impl ChildFd {
    /// Its number.
    pub fn raw(&self) -> i32 {
        self.0
    }

    /// How the plan names this file: by inherited descriptor.
    pub fn file_ref(&self) -> super::cmdline::FileRef {
        super::cmdline::FileRef::Fd(self.raw())
    }

    /// How the plan names this channel end: by inherited descriptor.
    pub fn endpoint(&self) -> super::cmdline::Endpoint {
        super::cmdline::Endpoint::Fd(self.raw())
    }
}

/// A disk handed over as descriptors in fd set `set`.
pub fn disk_source(set: u32, fds: &[ChildFd]) -> super::cmdline::DiskSource {
    super::cmdline::DiskSource::FdSet {
        set,
        fds: fds.iter().map(ChildFd::raw).collect(),
    }
}

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this build cannot launch QEMU on this OS",
    )
}

/// Not available here.
pub fn stream_pair() -> io::Result<(HostStream, ChildFd)> {
    Err(unsupported())
}

/// Not available here.
pub fn open_for_child(_path: &Path, _write: bool) -> io::Result<ChildFd> {
    Err(unsupported())
}

/// Not available here.
pub async fn spawn(spec: SpawnSpec) -> io::Result<vmcp_host_process::OwnedChild> {
    let SpawnSpec {
        argv,
        inherit,
        drop_to,
    } = spec;
    tracing::debug!(
        ?argv,
        ?inherit,
        ?drop_to,
        "QEMU launch requested on an unsupported OS"
    );
    Err(unsupported())
}

/// Passing descriptors over QMP is not implemented on this OS (no snapshots here yet).
pub async fn send_with_fd(
    _stream: &HostStream,
    _data: &[u8],
    _file: &std::fs::File,
) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "QEMU snapshots are implemented on Linux only",
    ))
}

/// Not on this OS (no QEMU snapshots here yet).
pub fn copy_sparse(_from: &Path, _to: &Path) -> io::Result<u64> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "QEMU snapshots are implemented on Linux only",
    ))
}

/// Not on this OS (no QEMU snapshots here yet).
pub fn create_memory_file(_path: &Path, _bytes: u64, _owner: Option<&Ids>) -> io::Result<ChildFd> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "QEMU snapshots are implemented on Linux only",
    ))
}

/// Not on this OS (no QEMU snapshots here yet).
pub fn seal_memory_file(_path: &Path, _reader: Option<&Ids>) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "QEMU snapshots are implemented on Linux only",
    ))
}

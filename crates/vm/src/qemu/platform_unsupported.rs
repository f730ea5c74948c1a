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

/// A descriptor QEMU would inherit: none can exist here ([`stream_pair`] and
/// [`open_for_child`] always fail), so the type has no values.
#[derive(Debug)]
pub enum ChildFd {}

impl ChildFd {
    /// Its number.
    pub fn raw(&self) -> i32 {
        match *self {}
    }

    /// How the plan names this file.
    pub fn file_ref(&self) -> super::cmdline::FileRef {
        match *self {}
    }

    /// How the plan names this channel end.
    pub fn endpoint(&self) -> super::cmdline::Endpoint {
        match *self {}
    }
}

/// A disk handed over as descriptors: there are none here.
pub fn disk_source(set: u32, fds: &[ChildFd]) -> super::cmdline::DiskSource {
    match fds.first() {
        Some(fd) => match *fd {},
        None => super::cmdline::DiskSource::FdSet { set, fds: vec![] },
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

/// The token stays on the kernel command line here (no inherited descriptors).
pub fn token_file(_token: &str) -> io::Result<Option<ChildFd>> {
    Ok(None)
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

/// No QEMU snapshots on this OS: the shared "Linux only" answers.
pub use super::no_snapshot::{copy_sparse, create_memory_file, seal_memory_file, send_with_fd};

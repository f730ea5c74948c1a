//! Windows process and channel plumbing for the QEMU backend (the process `unsafe` lives in
//! `vmcp_host_process`).
//!
//! Differences from Linux, and why:
//! - **Channels** are loopback TCP, not inherited socketpairs: QMP, console and agent port
//!   each get a [`PendingTcpStream`] bound to `127.0.0.1:<ephemeral>` before QEMU starts;
//!   QEMU connects as a client (`-chardev socket,host=127.0.0.1,port=N`). The agent channel is
//!   authenticated by the per-VM token (see `crate::qemu::host_windows::channel` for the limits).
//! - **Files by path**: QEMU gets the kernel, initrd and disk paths (without the `\\?\`
//!   prefix). vmcp opens each once first, so a missing or unreadable file is reported by vmcp
//!   before QEMU starts. No descriptors are inherited; [`ChildFd::raw`] is always -1 and
//!   [`SpawnSpec::inherit`] is ignored.
//! - **Dies with its owner** (`vmcp_host_process::spawn_owned`): each QEMU is put in its own
//!   Job Object with `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`. vmcp holds the only handle; when vmcp
//!   exits or is killed, Windows closes it and terminates QEMU. A dropped VM terminates the job
//!   at once. Between `CreateProcess` and the assignment there is a window of microseconds in
//!   which a killed vmcp would leave QEMU running (std cannot create a process inside a job).
//! - **Own process group, no console window** (`CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW`):
//!   Ctrl-C in vmcp's console reaches vmcp, which shuts the VM down itself.
//! - **Stale folders:** a killed vmcp leaves its runtime folder in `%TEMP%`; the next VM removes
//!   it (owner file with pid and process creation time, as on Linux; only folders directly in
//!   this user's `%TEMP%` are touched).
//! - No privilege drop, no seccomp (`-sandbox` is Linux-only).

pub use super::spawn::{Ids, SpawnSpec};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use vmcp_host_process::{spawn_owned, OwnedChild, SpawnOptions};

use super::cmdline::{DiskSource, Endpoint, FileRef, HostOs};
use crate::qemu::host_windows::channel::PendingTcpStream;
use crate::qemu::host_windows::qemu_args::host_path;

/// The host OS this module serves.
pub fn host_os() -> HostOs {
    HostOs::Windows
}

/// Whether the QEMU backend can launch VMs on this OS.
pub const LAUNCH_SUPPORTED: Result<(), &str> = Ok(());

/// The host end of a channel to QEMU.
pub type HostStream = PendingTcpStream;

/// What QEMU is given instead of an inherited descriptor. [`stream_pair`] makes `Tcp`,
/// [`open_for_child`] makes `File`; the cross-kind conversions below exist only to keep the
/// functions total.
#[derive(Debug)]
pub enum ChildFd {
    /// A file by path.
    File(PathBuf),
    /// A loopback address vmcp listens on.
    Tcp(SocketAddr),
}

impl ChildFd {
    /// No descriptor is inherited on Windows: always -1.
    pub fn raw(&self) -> i32 {
        -1
    }

    /// How the plan names this file.
    pub fn file_ref(&self) -> FileRef {
        match self {
            ChildFd::File(p) => FileRef::Path(p.clone()),
            ChildFd::Tcp(a) => FileRef::Path(PathBuf::from(a.to_string())),
        }
    }

    /// How the plan names this channel end.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            ChildFd::Tcp(a) => Endpoint::TcpConnect(*a),
            ChildFd::File(p) => Endpoint::NamedPipe(p.to_string_lossy().into_owned()),
        }
    }
}

/// A disk by path (the first entry; a read-write disk is opened by QEMU itself).
pub fn disk_source(_set: u32, fds: &[ChildFd]) -> DiskSource {
    match fds.first() {
        Some(ChildFd::File(p)) => DiskSource::Path(p.clone()),
        Some(ChildFd::Tcp(a)) => DiskSource::Path(PathBuf::from(a.to_string())),
        None => DiskSource::Path(PathBuf::new()),
    }
}

/// A channel: vmcp listens on loopback, QEMU connects.
pub fn stream_pair() -> io::Result<(HostStream, ChildFd)> {
    let host = PendingTcpStream::listen()?;
    let addr = host.addr();
    Ok((host, ChildFd::Tcp(addr)))
}

/// Checks that `path` opens (read-write if `write`) and returns it for QEMU.
pub fn open_for_child(path: &Path, write: bool) -> io::Result<ChildFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)?;
    let plain = host_path(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(ChildFd::File(PathBuf::from(plain)))
}

/// The token stays on the kernel command line here (no inherited descriptors).
pub fn token_file(_token: &str) -> io::Result<Option<ChildFd>> {
    Ok(None)
}

/// Starts QEMU in its own kill-on-close job. Must be called inside a tokio runtime.
pub async fn spawn(spec: SpawnSpec) -> io::Result<OwnedChild> {
    let Some((bin, args)) = spec.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    if spec.drop_to.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "running QEMU as another user is not supported on Windows",
        ));
    }
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    spawn_owned(
        cmd,
        SpawnOptions::default()
            .with_inherited_fds(spec.inherit)
            .with_no_window(true),
    )
}

/// No QEMU snapshots on this OS: the shared "Linux only" answers.
pub use super::no_snapshot::{copy_sparse, create_memory_file, seal_memory_file, send_with_fd};

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Run on Windows, and under wine by scripts/test.d/40-windows.sh.

    #[tokio::test]
    async fn spawned_child_is_in_the_job_and_killable() {
        let mut child = spawn(SpawnSpec {
            argv: vec!["ping".into(), "-n".into(), "60".into(), "127.0.0.1".into()],
            inherit: vec![],
            drop_to: None,
        })
        .await
        .unwrap();
        assert!(child.try_wait().unwrap().is_none());
        let status = child
            .kill_and_wait(std::time::Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!status.success());
    }

    #[tokio::test]
    async fn channels_and_files() {
        let (mut host, child) = stream_pair().unwrap();
        let Endpoint::TcpConnect(addr) = child.endpoint() else {
            panic!("{child:?}")
        };
        assert!(addr.ip().is_loopback());
        let mut peer = tokio::net::TcpStream::connect(addr).await.unwrap();
        peer.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        host.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"x");

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a, b.img");
        std::fs::write(&f, b"disk").unwrap();
        let c = open_for_child(&f, true).unwrap();
        assert_eq!(c.file_ref(), FileRef::Path(f.clone()));
        assert_eq!(disk_source(1, &[c]), DiskSource::Path(f));
        assert!(open_for_child(&dir.path().join("missing"), false).is_err());
    }
}

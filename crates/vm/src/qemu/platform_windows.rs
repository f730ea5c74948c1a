//! Windows process and channel plumbing for the QEMU backend (the `unsafe` it needs lives in
//! `crate::qemu::host_windows`'s OS layer).
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
//! - **Dies with its owner**: every QEMU is put in one process-wide Job Object with
//!   `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`. vmcp holds the only handle; when vmcp exits or is
//!   killed, Windows closes it and terminates every QEMU in the job. A dropped VM still kills
//!   its QEMU at once (`TerminateProcess` through `kill_on_drop`/`start_kill`). Between
//!   `CreateProcess` and the assignment there is a window of microseconds in which a killed
//!   vmcp would leave QEMU running (std cannot create a process inside a job); QEMU starts
//!   no children of its own, so nothing escapes the job after that.
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
use std::sync::OnceLock;

use windows_sys::Win32::System::Threading::{CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW};

use super::cmdline::{DiskSource, Endpoint, FileRef, HostOs};
use crate::qemu::host_windows::channel::PendingTcpStream;
use crate::qemu::host_windows::qemu_args::host_path;
use crate::qemu::host_windows::KillOnCloseJob;

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

/// vmcp never drops privileges on Windows.
pub fn is_root() -> bool {
    false
}

/// Not used on Windows.
pub fn unprivileged_ids(_with_kvm_group: bool) -> Ids {
    Ids {
        uid: 0,
        gid: 0,
        groups: Vec::new(),
    }
}

/// The process-wide kill-on-close job every QEMU goes into.
fn qemu_job() -> io::Result<&'static KillOnCloseJob> {
    static JOB: OnceLock<Result<KillOnCloseJob, (io::ErrorKind, String)>> = OnceLock::new();
    JOB.get_or_init(|| KillOnCloseJob::new().map_err(|e| (e.kind(), e.to_string())))
        .as_ref()
        .map_err(|(kind, msg)| {
            io::Error::new(
                *kind,
                format!("cannot create the Job Object for QEMU: {msg}"),
            )
        })
}

/// Starts QEMU inside the kill-on-close job. Must be called inside a tokio runtime.
pub async fn spawn(spec: SpawnSpec) -> io::Result<tokio::process::Child> {
    let Some((bin, args)) = spec.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    if spec.drop_to.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "running QEMU as another user is not supported on Windows",
        ));
    }
    tracing::debug!(
        handles = spec.inherit.len(),
        "Windows passes files by path and channels by loopback address; nothing is inherited"
    );
    let job = qemu_job()?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .creation_flags(CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW);
    let mut child = cmd.spawn()?;
    if let Err(e) = job.assign(&child) {
        let _ = child.start_kill();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot put QEMU in its Job Object: {e}"),
        ));
    }
    Ok(child)
}

/// Nothing to do: the child itself is terminated by the caller, the job covers the rest.
pub fn kill_group(_pgid: u32) {}

/// Creation time of running process `pid` (for the owner file of runtime folders).
pub fn start_time(pid: u32) -> Option<u64> {
    crate::qemu::host_windows::process_start_time(pid)
}

/// Working set of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    crate::qemu::host_windows::process_rss_kib(pid)
}

/// Whether `path` is a runtime folder of this user: a folder directly in this user's own
/// temp folder (`%TEMP%` is per user on Windows), where vmcp creates them.
pub fn dir_is_mine(path: &Path) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return false;
    };
    let (Some(parent), Ok(temp)) = (
        path.parent().and_then(|p| std::fs::canonicalize(p).ok()),
        std::fs::canonicalize(std::env::temp_dir()),
    ) else {
        return false;
    };
    meta.is_dir() && parent == temp
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
        child.start_kill().unwrap();
        let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(!status.success());
    }

    #[test]
    fn stale_folder_of_a_dead_owner_is_swept() {
        let me = std::process::id();
        let start = start_time(me).unwrap();
        assert!(rss_kib(me).unwrap() > 0);
        let temp = std::env::temp_dir();
        let dead = tempfile::Builder::new()
            .prefix("vmcp-stale-")
            .tempdir_in(&temp)
            .unwrap();
        let alive = tempfile::Builder::new()
            .prefix("vmcp-alive-")
            .tempdir_in(&temp)
            .unwrap();
        // A pid that cannot be running (Windows pids are multiples of 4).
        std::fs::write(dead.path().join(super::super::stale::OWNER_FILE), "3 1\n").unwrap();
        std::fs::write(
            alive.path().join(super::super::stale::OWNER_FILE),
            super::super::stale::owner_line(me, start),
        )
        .unwrap();
        assert!(dir_is_mine(dead.path()));
        assert!(!dir_is_mine(&temp.join("vmcp-no-such-folder")));
        let removed = super::super::stale::sweep(&temp, dir_is_mine, start_time);
        assert!(removed
            .iter()
            .any(|p| p.ends_with(dead.path().file_name().unwrap())));
        assert!(!dead.path().exists());
        assert!(alive.path().exists());
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

//! Linux descriptor plumbing for the QEMU backend, and its spawn through the owned-process
//! layer (`vmcp_host_process`), which keeps the `unsafe` of starting processes.
//!
//! What it guarantees about the QEMU child:
//! - **Dies with its owner, in its own process group** (`vmcp_host_process::spawn_owned`: a
//!   watchdog-led group, `PR_SET_PDEATHSIG` armed from the process-lifetime spawner thread), so
//!   a terminal's Ctrl-C reaches vmcp, not QEMU (vmcp shuts the VM down itself).
//! - **Unprivileged when vmcp is root**: supplementary groups, gid and uid are set to the
//!   dedicated `vmcp-qemu` user (`nobody` with a warning where it is missing) before exec.
//!   QEMU's own `-run-with user=` cannot be used: under `-sandbox ...,elevateprivileges=deny`
//!   the drop itself is a denied syscall (SIGSYS).
//! - **Only the descriptors it is given**: every descriptor vmcp opens is close-on-exec; the
//!   ones QEMU must inherit (socketpair ends, kernel, initrd, disk) have the flag cleared in
//!   the child only. Files are opened by vmcp and handed over, so QEMU needs no access to
//!   the paths (the image cache may sit in a home directory only root can enter).
//! - An environment with only `PATH`, stdin and stdout on `/dev/null`, stderr piped.

pub use super::spawn::SpawnSpec;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use vmcp_host_process::{spawn_owned, OwnedChild, SpawnOptions};

use super::cmdline::HostOs;

/// The host OS this module serves.
pub fn host_os() -> HostOs {
    HostOs::Linux
}

/// Whether the QEMU backend can launch VMs on this OS.
pub const LAUNCH_SUPPORTED: Result<(), &str> = Ok(());

/// The host end of a channel to QEMU.
pub type HostStream = tokio::net::UnixStream;

/// A descriptor QEMU inherits.
#[derive(Debug)]
pub struct ChildFd(OwnedFd);

impl ChildFd {
    /// Its number (the same in QEMU, which inherits it unchanged).
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
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

/// A connected stream pair: vmcp keeps the first end, QEMU inherits the second.
pub fn stream_pair() -> io::Result<(HostStream, ChildFd)> {
    let (host, child) = std::os::unix::net::UnixStream::pair()?;
    host.set_nonblocking(true)?;
    Ok((HostStream::from_std(host)?, ChildFd(OwnedFd::from(child))))
}

/// Opens `path` for QEMU to inherit, read-only or read-write.
pub fn open_for_child(path: &Path, write: bool) -> io::Result<ChildFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)?;
    Ok(ChildFd(OwnedFd::from(f)))
}

/// Starts QEMU as described by `spec`. Must be called inside a tokio runtime.
pub async fn spawn(spec: SpawnSpec) -> io::Result<OwnedChild> {
    let Some((bin, args)) = spec.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_clear()
        .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    spawn_owned(
        cmd,
        SpawnOptions::default()
            .with_inherited_fds(spec.inherit)
            .with_run_as(spec.drop_to),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_sets_group_and_inherits_fds() {
        let (_host, child) = stream_pair().unwrap();
        let fd = child.raw();
        // The child reports its process group and pid, and whether it has the fd, on stderr.
        let script = format!(
            "read -r _ _ _ _ pgrp _ < /proc/self/stat; test -e /proc/self/fd/{fd} && echo \"$pgrp $$ ok\" >&2"
        );
        let mut c = spawn(SpawnSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            inherit: vec![fd],
            drop_to: None,
        })
        .await
        .unwrap();
        drop(child);
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut c.take_stderr().unwrap(), &mut out)
            .await
            .unwrap();
        assert!(c.wait().await.unwrap().success());
        let v: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(v.len(), 3, "{out:?}");
        assert_ne!(v[0], v[1], "QEMU is in the group its watchdog leads");
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let own_pgrp = own[own.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_owned();
        assert_ne!(v[0], own_pgrp, "not in vmcp's group");
        assert_eq!(v[2], "ok");
    }

    #[tokio::test]
    async fn not_inherited_fds_are_closed_in_the_child() {
        let (_host, child) = stream_pair().unwrap();
        let fd = child.raw();
        let mut c = spawn(SpawnSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("test -e /proc/self/fd/{fd}").into(),
            ],
            inherit: vec![],
            drop_to: None,
        })
        .await
        .unwrap();
        assert!(!c.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn drops_privileges_when_root() {
        if !vmcp_host_process::is_root() {
            vmcp_test_support::skipped!("SKIPPED: dropping privileges needs root");
            return;
        }
        let ids = super::super::spawn::unprivileged_ids(false);
        let mut c = spawn(SpawnSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "[ \"$(id -u)\" = {} ] && [ \"$(id -g)\" = {} ] && [ \"$(id -G)\" = {} ]",
                    ids.uid, ids.gid, ids.gid
                )
                .into(),
            ],
            inherit: vec![],
            drop_to: Some(ids),
        })
        .await
        .unwrap();
        assert!(c.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn spawn_of_missing_binary_fails() {
        let e = spawn(SpawnSpec {
            argv: vec!["/nonexistent/qemu".into()],
            inherit: vec![],
            drop_to: None,
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(spawn(SpawnSpec {
            argv: vec![],
            inherit: vec![],
            drop_to: None
        })
        .await
        .is_err());
    }
}

//! Other Unix hosts (macOS): own process group, killed while its leader is unreaped.
//!
//! There is no parent-death signal here, so a SIGKILLed vmcp leaves its children running
//! (compile-checked only; the Virtualization.framework backend keeps its VMs in-process).
//! Start time and RSS are not read, so runtime directories get no owner file and are never
//! swept.

use std::io;

pub use crate::unix::{allocated_bytes, is_root, open_log};
pub(crate) use crate::unix::{create_private_file, private_tempdir};
use crate::SpawnOptions;

/// The child's own process group.
#[derive(Debug)]
pub(crate) struct Group {
    pgid: libc::pid_t,
    killed: bool,
}

impl Group {
    /// SIGKILL to the group, only while its leader is unreaped (so the id is still ours).
    pub(crate) fn kill(&mut self, leader_reaped: bool) {
        if self.killed || leader_reaped || self.pgid <= 1 {
            return;
        }
        self.killed = true;
        // SAFETY: killpg with a positive group id and a valid signal touches no memory; the
        // leader is our unreaped child, so the id cannot name another group.
        unsafe {
            libc::killpg(self.pgid, libc::SIGKILL);
        }
    }
}

/// Starts `cmd` as the leader of a new process group.
pub(crate) fn spawn(
    mut cmd: tokio::process::Command,
    options: &SpawnOptions,
) -> io::Result<(tokio::process::Child, Group)> {
    if options.run_as.is_some() || !options.inherit_fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "inherited descriptors and another user are supported on Linux only",
        ));
    }
    cmd.process_group(0);
    let child = cmd.spawn()?;
    let pgid = child
        .id()
        .and_then(|p| libc::pid_t::try_from(p).ok())
        .unwrap_or(0);
    Ok((
        child,
        Group {
            pgid,
            killed: false,
        },
    ))
}

/// Not read here.
pub fn start_time(_pid: u32) -> Option<u64> {
    None
}

/// Not read here.
pub fn rss_kib(_pid: u32) -> Option<u64> {
    None
}

/// Never claims a directory here (stale directories are not swept).
pub fn dir_is_mine(_path: &std::path::Path) -> bool {
    false
}

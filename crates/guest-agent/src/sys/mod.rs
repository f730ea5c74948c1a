//! Every `unsafe` call of the agent, each wrapped in a small safe function.
//!
//! POSIX calls used by the request server live here; Linux-only calls used by `/init`
//! (mounts, modules, reboot, vsock, terminals) live in [`linux`].

#[cfg(target_os = "linux")]
pub mod linux;
#[cfg(not(target_os = "linux"))]
mod other;

#[cfg(target_os = "linux")]
pub use linux::{overlay_opaque, peek_zombie};
#[cfg(not(target_os = "linux"))]
pub use other::{overlay_opaque, peek_zombie};

use std::io;

/// How a reaped child ended, decoded from a wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Exited with a code.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

fn decode_status(status: libc::c_int) -> Option<WaitStatus> {
    if libc::WIFEXITED(status) {
        Some(WaitStatus::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(WaitStatus::Signaled(libc::WTERMSIG(status)))
    } else {
        None
    }
}

/// Sends `signal` to process `pid` (or to process group `-pid` when negative).
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits until child `pid` terminates and reaps it. `Ok(None)` if it was not a child that
/// terminated (stopped/continued states are skipped).
pub fn wait_pid(pid: i32, nohang: bool) -> io::Result<Option<WaitStatus>> {
    let flags = if nohang { libc::WNOHANG } else { 0 };
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, flags) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            return Ok(None);
        }
        match decode_status(status) {
            Some(s) => return Ok(Some(s)),
            None if nohang => return Ok(None),
            None => continue,
        }
    }
}

//! Processes vmcp owns on the host, and the private places they use.
//!
//! One layer for everything vmcp starts (QEMU, stdio MCP servers) so that each promise is kept
//! in one place:
//!
//! - [`spawn_owned`] starts a child that **dies with vmcp, together with everything it started**:
//!   - Linux: the child runs in a process group led by a tiny *watchdog* process (forked, not
//!     exec'd) that holds the read end of a pipe whose only write end vmcp holds. When vmcp
//!     exits for any reason, SIGKILL included, the pipe reaches end-of-file and the watchdog
//!     kills its process group: the child and its descendants (a shell's background job, the
//!     `node` an `npx` started). The child itself also gets `PR_SET_PDEATHSIG(SIGKILL)`, armed
//!     from one spawner thread that lives as long as the process (the signal follows the
//!     *thread* that forked, so a short-lived thread must never spawn). Because the watchdog
//!     leads the group and is reaped only after the group was killed, the group id can never
//!     name another process's group (no pid-reuse race), even after the child was reaped.
//!   - Windows: each child gets its own Job Object with kill-on-close; vmcp holds the only
//!     handle, so the child and its descendants end when vmcp does, and [`OwnedChild::kill`]
//!     terminates the whole job.
//!   - Other hosts (macOS): own process group, killed while its leader is not yet reaped;
//!     nothing ties the child to a SIGKILLed vmcp (compile-checked only).
//! - [`RuntimeDir`]: a private directory per VM (0700, files 0600 on Unix) with an owner file;
//!   creating one removes the directories a killed vmcp left behind ([`sweep`]).
//! - [`open_log`]: opens a log file once for appending, refusing symlinks and files of other
//!   users, created 0600.
//! - [`start_time`], [`rss_kib`]: what identifies a process across pid reuse, and its memory.
//!
//! The per-OS contract is the re-export list below; each OS module holds all `unsafe` it
//! needs, each block with a `SAFETY` comment.
//!
//! # Limits
//! A descendant that leaves the process group on purpose (`setsid`, `setpgid`) escapes the
//! group kill on Linux; only a PID namespace or a cgroup would catch it, which need privileges
//! vmcp does not assume. The parent-death signal still covers the direct child.

mod ids;
mod runtime_dir;
mod stale;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(not(any(target_os = "linux", windows)))]
mod other;
#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

#[cfg(target_os = "linux")]
use linux as sys;
#[cfg(not(any(target_os = "linux", windows)))]
use other as sys;
#[cfg(windows)]
use windows as sys;

/// The per-OS contract: every OS module provides exactly these.
pub use sys::{allocated_bytes, dir_is_mine, is_root, open_log, rss_kib, start_time};
use sys::{create_private_file, private_tempdir, spawn, Group};

pub use ids::{lookup_user, user_ids_from, Ids};
pub use runtime_dir::{new_vm_id, write_private, RuntimeDir, RuntimeDirError};
pub use stale::{owner_line, parse_owner, sweep, DIR_PREFIX, OWNER_FILE};

use std::ffi::OsString;
use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

/// How [`spawn_owned`] starts a child, beyond what the `Command` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpawnOptions {
    /// Unix descriptors the child inherits (everything else vmcp opens is close-on-exec).
    /// Ignored on Windows, where nothing is inherited.
    pub inherit_fds: Vec<i32>,
    /// Run the child as this user (Unix, when vmcp is root). Set after the process group and
    /// before the parent-death signal (a credential change clears it).
    pub run_as: Option<Ids>,
    /// Windows: start without a console window (`CREATE_NO_WINDOW`).
    pub no_window: bool,
    /// Linux: set `PR_SET_NO_NEW_PRIVS` in the child, so neither it nor anything it executes
    /// can gain privileges through set-user-ID or file-capability executables.
    pub no_new_privs: bool,
}

impl SpawnOptions {
    /// Inherit these descriptors.
    pub fn with_inherited_fds(mut self, fds: Vec<i32>) -> Self {
        self.inherit_fds = fds;
        self
    }

    /// Run as `ids`.
    pub fn with_run_as(mut self, ids: Option<Ids>) -> Self {
        self.run_as = ids;
        self
    }

    /// Set `no_new_privs` in the child (Linux; ignored elsewhere).
    pub fn with_no_new_privs(mut self, on: bool) -> Self {
        self.no_new_privs = on;
        self
    }

    /// Start without a console window on Windows.
    pub fn with_no_window(mut self, no_window: bool) -> Self {
        self.no_window = no_window;
        self
    }
}

/// How long dropping an [`OwnedChild`] waits for the killed child to be reaped.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts `cmd` as a child that dies with vmcp, with everything it starts (see the crate
/// docs). Sets the process group, the parent-death signal, `kill_on_drop` and, on Windows,
/// the job; the caller sets program, arguments, environment and stdio.
///
/// Must be called inside a tokio runtime. Blocks the calling thread for as long as the
/// fork and exec take, like `Command::spawn`.
pub fn spawn_owned(
    mut cmd: tokio::process::Command,
    options: SpawnOptions,
) -> io::Result<OwnedChild> {
    let program: OsString = cmd.as_std().get_program().to_owned();
    cmd.kill_on_drop(true);
    let (child, group) = spawn(cmd, &options).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", program.to_string_lossy()),
        )
    })?;
    let pid = child.id();
    Ok(OwnedChild {
        child,
        group,
        pid,
        reaped: false,
    })
}

/// A child started by [`spawn_owned`]. Dropping it kills the child and everything it started
/// and reaps the child (bounded by [`REAP_TIMEOUT`]).
#[derive(Debug)]
pub struct OwnedChild {
    child: tokio::process::Child,
    group: Group,
    pid: Option<u32>,
    reaped: bool,
}

impl OwnedChild {
    /// The child's process id (kept after it exits, for messages).
    pub fn id(&self) -> Option<u32> {
        self.pid
    }

    /// Takes the child's stdin pipe, if it has one.
    pub fn take_stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Takes the child's stdout pipe, if it has one.
    pub fn take_stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Takes the child's stderr pipe, if it has one.
    pub fn take_stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// Waits for the child to exit (its descendants may still run: [`OwnedChild::kill`]).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await?;
        self.reaped = true;
        Ok(status)
    }

    /// The child's exit status if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let status = self.child.try_wait()?;
        self.reaped |= status.is_some();
        Ok(status)
    }

    /// Sends SIGKILL to the child and everything it started (Windows: terminates its job).
    /// Does not wait; [`OwnedChild::wait`] reaps the child. Idempotent.
    pub fn kill(&mut self) {
        self.group.kill(self.reaped);
        if !self.reaped {
            let _ = self.child.start_kill();
        }
    }

    /// [`OwnedChild::kill`], then waits up to `timeout` for the child to be reaped.
    pub async fn kill_and_wait(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        self.kill();
        match tokio::time::timeout(timeout, self.wait()).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the process did not exit within {timeout:?} of being killed"),
            )),
        }
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        self.kill();
        if self.reaped {
            return;
        }
        // Reap synchronously (bounded): an owned process must not outlive its handle. SIGKILL
        // takes effect in milliseconds; the loop only waits for the kernel to tear it down.
        // If it times out, tokio's kill_on_drop reaps it in the background.
        let until = Instant::now() + REAP_TIMEOUT;
        while Instant::now() < until {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests;

/// Bytes a directory tree occupies on disk ([`allocated_bytes`] of every file below it);
/// entries that cannot be read count as 0 (a size for a listing, not an exact account).
pub fn disk_usage(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => allocated_bytes(&m),
            Err(_) => 0,
        })
        .sum()
}

//! Linux: the watchdog-led process group, the process-lifetime spawner thread, `/proc`.
//!
//! How a child is started ([`spawn`]), all from the spawner thread:
//! 1. A pipe (both ends close-on-exec) and a **watchdog**: `fork` without `exec`. The watchdog
//!    makes itself a process-group leader, names itself `vmcp-watchdog`, closes every
//!    descriptor but the pipe's read end, and blocks in `read`. The parent also calls
//!    `setpgid` on it, so the group exists before step 2 no matter who runs first.
//! 2. The child: `fork`+`exec` through tokio's `Command`, joining the watchdog's group; in the
//!    child before `exec`: inherited descriptors lose close-on-exec, the user changes when asked,
//!    then `PR_SET_PDEATHSIG(SIGKILL)` (after the credential change, which would clear it), then
//!    a check that vmcp did not die meanwhile.
//!
//! When vmcp exits, is killed, or drops the [`Group`], the pipe's last write end closes, the
//! watchdog's `read` returns, and it sends SIGKILL to its own group (itself included). vmcp's own
//! kill does the same from outside and then reaps the watchdog; until then the watchdog, a child
//! of vmcp, keeps the group id reserved, so the group kill can never hit a reused id.
//!
//! After `fork` in a multi-threaded process only async-signal-safe calls are allowed: the
//! watchdog makes nothing but raw system calls and never returns to Rust code.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

pub use crate::unix::{allocated_bytes, is_root, open_log};
pub(crate) use crate::unix::{create_private_file, private_tempdir};
use crate::SpawnOptions;

/// The watchdog-led process group of one child.
#[derive(Debug)]
pub(crate) struct Group {
    /// The watchdog's pid, which is the group id. Unreaped until [`Group::kill`].
    watchdog: libc::pid_t,
    /// The pipe's write end; closing it makes the watchdog kill the group.
    alarm: Option<OwnedFd>,
    killed: bool,
}

impl Group {
    /// SIGKILL to the whole group (child, descendants, watchdog), then reaps the watchdog.
    pub(crate) fn kill(&mut self, _leader_reaped: bool) {
        if self.killed {
            return;
        }
        self.killed = true;
        // SAFETY: kill(2) with a negative id signals a process group and touches no memory.
        // The group is led by our watchdog, which is our child and not yet reaped (it is
        // reaped below, only after this), so the id cannot belong to anyone else.
        unsafe {
            libc::kill(-self.watchdog, libc::SIGKILL);
        }
        self.alarm = None;
        reap_bounded(self.watchdog, Duration::from_secs(5));
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill(false);
    }
}

/// Waits (polling, bounded) for our child `pid` to exit and reaps it.
fn reap_bounded(pid: libc::pid_t, timeout: Duration) {
    let until = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid pointer to an int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != 0 || Instant::now() >= until {
            // Reaped, or an error (not our child any more): done. On timeout the zombie stays
            // until vmcp exits; its group id stays reserved, which is harmless.
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The process-lifetime spawner thread: `PR_SET_PDEATHSIG` fires when the *thread* that forked
/// exits, so every child is forked here, never by a tokio or caller thread that may end.
fn spawner() -> io::Result<&'static mpsc::Sender<Job>> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("vmcp-spawner".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
        .ok_or_else(|| io::Error::other("cannot start the spawner thread"))
}

/// Starts `cmd` in a watchdog-led group (see the module docs). Needs a tokio runtime.
pub(crate) fn spawn(
    mut cmd: tokio::process::Command,
    options: &SpawnOptions,
) -> io::Result<(tokio::process::Child, Group)> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| io::Error::other("an owned process must be spawned inside a tokio runtime"))?;
    let inherit = options.inherit_fds.clone();
    let run_as = options.run_as.clone();
    let no_new_privs = options.no_new_privs;
    let parent = std::process::id() as libc::pid_t;
    let child_setup = move || -> io::Result<()> {
        for &fd in &inherit {
            // SAFETY: F_SETFD on a descriptor number only changes its flags; if `fd` were
            // not open the call fails with EBADF, which we report.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(ids) = &run_as {
            // SAFETY: `ids.groups` is a live Vec for the whole call; setgroups reads exactly
            // `len` gid_t values from it.
            if unsafe { libc::setgroups(ids.groups.len(), ids.groups.as_ptr()) } == -1 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: setgid/setuid take plain integers; order matters (gid while still root).
            if unsafe { libc::setgid(ids.gid) } == -1 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above.
            if unsafe { libc::setuid(ids.uid) } == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        if no_new_privs {
            // SAFETY: PR_SET_NO_NEW_PRIVS takes the constant 1 and unused zero arguments.
            let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
            if rc == -1 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: PR_SET_PDEATHSIG takes a signal number as its only argument. Set after the
        // credential change, which would clear it.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            // vmcp died before the prctl took effect: do not run without an owner.
            return Err(io::Error::other("the parent exited during spawn"));
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe system calls (fcntl, setgroups,
    // setgid, setuid, prctl, getppid) and allocates nothing: the Vecs it reads were built
    // before the fork.
    unsafe {
        cmd.pre_exec(child_setup);
    }
    let (tx, rx) = mpsc::channel();
    spawner()?
        .send(Box::new(move || {
            let _guard = handle.enter();
            let result = fork_watchdog().and_then(|mut group| {
                cmd.process_group(group.watchdog);
                match cmd.spawn() {
                    Ok(child) => Ok((child, group)),
                    Err(e) => {
                        group.kill(true);
                        Err(e)
                    }
                }
            });
            let _ = tx.send(result);
        }))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

/// Forks the watchdog and makes it a process-group leader.
fn fork_watchdog() -> io::Result<Group> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two new descriptors into the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a valid pointer.
    let max_fd = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        libc::c_int::try_from(limit.rlim_cur.min(1 << 20)).unwrap_or(1 << 20)
    } else {
        1 << 16
    };
    let read_fd = read.as_raw_fd();
    // SAFETY: fork has no memory preconditions. In the child (0) only `watchdog_main` runs,
    // which makes only async-signal-safe system calls and never returns.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: we are the freshly forked child; see `watchdog_main`.
        0 => unsafe { watchdog_main(read_fd, max_fd) },
        pid => {
            drop(read);
            let group = Group {
                watchdog: pid,
                alarm: Some(write),
                killed: false,
            };
            // The child does the same; whoever is first makes the group (EACCES cannot
            // happen: the watchdog never execs).
            // SAFETY: setpgid on our own child with plain integer arguments.
            if unsafe { libc::setpgid(pid, pid) } == -1 {
                let e = io::Error::last_os_error();
                drop(group);
                return Err(e);
            }
            Ok(group)
        }
    }
}

/// The watchdog, in the forked child: waits for the pipe to close, then kills its group.
///
/// # Safety
/// Must only be called in a child just forked from a (possibly multi-threaded) process: it
/// makes raw, async-signal-safe system calls only (no allocation, no locks) and never returns.
unsafe fn watchdog_main(read_fd: RawFd, max_fd: libc::c_int) -> ! {
    // SAFETY: each call below is a raw system call on plain integers or on a stack buffer;
    // none allocates or takes a lock, so all are async-signal-safe in a forked child.
    unsafe {
        libc::setpgid(0, 0);
        libc::prctl(
            libc::PR_SET_NAME,
            c"vmcp-watchdog".as_ptr() as libc::c_ulong,
        );
        // Keep only the read end, as fd 0; close everything else, so the watchdog holds no
        // pipe, socket or file of vmcp open (a server's stdin would otherwise never see EOF).
        if read_fd != 0 && libc::dup2(read_fd, 0) == -1 {
            libc::kill(0, libc::SIGKILL);
            libc::_exit(1);
        }
        if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
            for fd in 1..max_fd {
                libc::close(fd);
            }
        }
        let mut byte = 0u8;
        loop {
            let n = libc::read(0, (&mut byte as *mut u8).cast(), 1);
            if n == -1 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            // End of file (vmcp is gone or dropped the group), an error, or a byte nobody
            // should send: the group's owner is gone either way.
            break;
        }
        libc::kill(0, libc::SIGKILL);
        libc::_exit(0)
    }
}

/// Whether `path` is a directory owned by vmcp's effective user (and not a symlink).
pub fn dir_is_mine(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(m) => m.is_dir() && m.uid() == crate::unix::euid(),
        Err(_) => false,
    }
}

/// Start time of process `pid` (clock ticks since boot, `/proc/<pid>/stat` field 22), which
/// with the pid identifies a process across pid reuse.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line (the command name may contain spaces and parens).
fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name: field 3 (state) is the first; start time is field 22.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Resident set size of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix("VmRSS:")?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 1000 200";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
        assert!(start_time(std::process::id()).is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert_eq!(rss_kib(u32::MAX), None);
    }
}

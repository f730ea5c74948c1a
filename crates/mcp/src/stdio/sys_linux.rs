//! Linux: the child gets its own process group and `PR_SET_PDEATHSIG(SIGKILL)`, so it dies
//! with the thread that started it even when vmcp is SIGKILLed.

use tokio::process::Command;

/// Puts the child in a new process group and arms the parent-death signal.
pub(super) fn prepare(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2) and
    // getppid(2), both async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other(
                    "parent exited before the child started",
                ));
            }
            Ok(())
        });
    }
}

/// Kills the process group led by `pid` (the child and everything it started).
pub(super) fn kill_group(pid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the process group `pgid`, which is the
    // group our child created with process_group(0); no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

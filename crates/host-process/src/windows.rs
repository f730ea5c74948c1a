//! Windows: a kill-on-close Job Object per child, process queries through `OpenProcess`.
//!
//! - [`Group`]: a Job Object with `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE` per child. vmcp holds the
//!   only handle; when it closes (on drop, or when Windows cleans up a vmcp that was killed),
//!   Windows terminates every process in the job, and [`Group::kill`] terminates them at once
//!   (`TerminateJobObject`). Processes the child starts are in the job too. Between
//!   `CreateProcess` and the assignment there is a window of microseconds in which a killed
//!   vmcp would leave the child running (std cannot create a process inside a job).
//! - Own process group (`CREATE_NEW_PROCESS_GROUP`), so Ctrl-C in vmcp's console reaches vmcp,
//!   which shuts its children down itself; optionally no console window.
//! - [`start_time`], [`rss_kib`]: `GetProcessTimes` / `K32GetProcessMemoryInfo`.
//! - Runtime folders live in this user's own `%TEMP%`, which Windows keeps private to the user.

use std::fs::File;
use std::io;
use std::os::windows::io::RawHandle;
use std::path::Path;

use windows_sys::Win32::Foundation::{CloseHandle, FILETIME, HANDLE, STILL_ACTIVE};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectExtendedLimitInformation,
    SetInformationJobObject, TerminateJobObject, JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
};
use windows_sys::Win32::System::ProcessStatus::{K32GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS};
use windows_sys::Win32::System::Threading::{
    GetExitCodeProcess, GetProcessTimes, OpenProcess, CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW,
    PROCESS_QUERY_LIMITED_INFORMATION, PROCESS_VM_READ,
};

use crate::SpawnOptions;

/// The child's own kill-on-close job.
pub(crate) type Group = KillOnCloseJob;

/// Starts `cmd` in a new process group and puts it into its own kill-on-close job.
pub(crate) fn spawn(
    mut cmd: tokio::process::Command,
    options: &SpawnOptions,
) -> io::Result<(tokio::process::Child, Group)> {
    if options.run_as.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "running a child as another user is not supported on Windows",
        ));
    }
    tracing::debug!(
        handles = options.inherit_fds.len(),
        "Windows passes files by path and channels by address; nothing is inherited"
    );
    let job = KillOnCloseJob::new()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create a Job Object: {e}")))?;
    let flags = if options.no_window {
        CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW
    } else {
        CREATE_NEW_PROCESS_GROUP
    };
    cmd.creation_flags(flags);
    let mut child = cmd.spawn()?;
    if let Err(e) = job.assign(&child) {
        let _ = child.start_kill();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot put the process in its Job Object: {e}"),
        ));
    }
    Ok((child, job))
}

/// Bytes a file occupies on disk; its length here (allocation is not asked for).
pub fn allocated_bytes(m: &std::fs::Metadata) -> u64 {
    m.len()
}

/// vmcp never changes users on Windows.
pub fn is_root() -> bool {
    false
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

/// A new folder named `prefix` + random characters in `base` (private through `%TEMP%`'s ACL).
pub(crate) fn private_tempdir(base: &Path, prefix: &str) -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix(prefix).tempdir_in(base)
}

/// Creates `path`, which must not exist yet.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// Opens the log file `path` once, for appending (created if missing); refuses anything but a
/// regular file.
pub fn open_log(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(f)
}

/// A process handle opened with `OpenProcess`, closed on drop.
struct Process(HANDLE);

impl Process {
    fn open(pid: u32, access: u32) -> Option<Process> {
        // SAFETY: plain integer arguments; a null result (no such process, or no access) is
        // handled below.
        let h = unsafe { OpenProcess(access, 0, pid) };
        (!h.is_null()).then_some(Process(h))
    }

    fn running(&self) -> bool {
        let mut code: u32 = 0;
        // SAFETY: the handle is valid while `self` lives; `code` is a writable u32.
        let ok = unsafe { GetExitCodeProcess(self.0, &mut code) };
        ok != 0 && code == STILL_ACTIVE as u32
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: the handle came from OpenProcess and is closed exactly once, here.
        unsafe {
            CloseHandle(self.0);
        }
    }
}

/// Creation time of running process `pid` (100 ns units since 1601), `None` if it is not
/// running or cannot be queried.
pub fn start_time(pid: u32) -> Option<u64> {
    let p = Process::open(pid, PROCESS_QUERY_LIMITED_INFORMATION)?;
    if !p.running() {
        return None;
    }
    let mut times = [FILETIME {
        dwLowDateTime: 0,
        dwHighDateTime: 0,
    }; 4];
    let [created, exited, kernel, user] = &mut times;
    // SAFETY: the handle is valid while `p` lives; the four pointers are distinct writable
    // FILETIMEs.
    let ok = unsafe { GetProcessTimes(p.0, created, exited, kernel, user) };
    (ok != 0).then(|| (u64::from(created.dwHighDateTime) << 32) | u64::from(created.dwLowDateTime))
}

/// Working set of process `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let p = Process::open(pid, PROCESS_QUERY_LIMITED_INFORMATION | PROCESS_VM_READ)?;
    let mut counters = PROCESS_MEMORY_COUNTERS {
        cb: std::mem::size_of::<PROCESS_MEMORY_COUNTERS>() as u32,
        ..Default::default()
    };
    // SAFETY: the handle is valid while `p` lives; the pointer and size describe `counters`.
    let ok = unsafe { K32GetProcessMemoryInfo(p.0, &mut counters, counters.cb) };
    (ok != 0).then_some(counters.WorkingSetSize as u64 / 1024)
}

/// A Job Object that kills every process in it when its handle closes.
#[derive(Debug)]
pub(crate) struct KillOnCloseJob {
    handle: HANDLE,
}

// SAFETY: a job handle is a kernel object handle; every job API used here may be called from
// any thread, and the handle is only closed in Drop.
unsafe impl Send for KillOnCloseJob {}
// SAFETY: as above; the methods taking `&self` only read the handle value.
unsafe impl Sync for KillOnCloseJob {}

impl KillOnCloseJob {
    /// Creates an unnamed job with `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`.
    pub(crate) fn new() -> io::Result<KillOnCloseJob> {
        // SAFETY: null security attributes (default, not inheritable) and a null name
        // (unnamed job, so no other process can open it by name) are allowed.
        let handle = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        let job = KillOnCloseJob { handle };
        let mut info = JOBOBJECT_EXTENDED_LIMIT_INFORMATION::default();
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
        // SAFETY: `job.handle` is a valid job handle; the pointer and length describe `info`,
        // the structure this information class expects, which lives across the call.
        let ok = unsafe {
            SetInformationJobObject(
                job.handle,
                JobObjectExtendedLimitInformation,
                (&info as *const JOBOBJECT_EXTENDED_LIMIT_INFORMATION).cast(),
                std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(job)
    }

    fn assign_raw(&self, process: RawHandle) -> io::Result<()> {
        // SAFETY: both handles are valid for the duration of the call (the caller borrows the
        // child that owns `process`); the job handle is owned by `self`.
        let ok = unsafe { AssignProcessToJobObject(self.handle, process) };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts a tokio child process into the job.
    pub(crate) fn assign(&self, child: &tokio::process::Child) -> io::Result<()> {
        let handle = child.raw_handle().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the process has already exited",
            )
        })?;
        self.assign_raw(handle)
    }

    /// Terminates every process in the job now (the job stays usable).
    pub(crate) fn kill(&mut self, _leader_reaped: bool) {
        // SAFETY: the handle is a valid job handle owned by `self`; a failure (nothing left to
        // terminate) changes nothing.
        unsafe {
            TerminateJobObject(self.handle, 1);
        }
    }
}

impl Drop for KillOnCloseJob {
    fn drop(&mut self) {
        // SAFETY: the handle came from CreateJobObjectW and is closed exactly once, here.
        // Closing the last handle terminates the processes in the job.
        unsafe {
            CloseHandle(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::windows::io::AsRawHandle;

    // These run only on Windows (or under wine: scripts/test.d/40-windows.sh).

    #[test]
    fn process_queries() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert_eq!(start_time(me), Some(t));
        assert!(rss_kib(me).unwrap() > 0);
        let mut child = std::process::Command::new("cmd")
            .args(["/c", "exit", "0"])
            .spawn()
            .unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // Exited (the std handle is closed by now too): no start time.
        assert_eq!(start_time(pid), None);
    }

    fn long_child() -> std::process::Child {
        // `ping -n 60` runs for about a minute on Windows and under wine.
        let mut child = std::process::Command::new("ping")
            .args(["-n", "60", "127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "ping ended by itself; the test needs a long-running child"
        );
        child
    }

    fn wait_gone(child: &mut std::process::Child, what: &str) {
        let t = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn job_kills_its_process_on_drop() {
        let job = KillOnCloseJob::new().unwrap();
        let mut child = long_child();
        job.assign_raw(child.as_raw_handle()).unwrap();
        drop(job);
        wait_gone(&mut child, "process outlived its job");
    }

    #[test]
    fn job_kill_terminates_its_process() {
        let mut job = KillOnCloseJob::new().unwrap();
        let mut child = long_child();
        job.assign_raw(child.as_raw_handle()).unwrap();
        job.kill(false);
        wait_gone(&mut child, "process outlived TerminateJobObject");
    }
}

//! The Windows OS layer: every `unsafe` call vmcp makes on Windows, each wrapped in a small
//! safe function.
//!
//! - [`whp_status`]: loads `WinHvPlatform.dll` at run time with `LoadLibraryExW` (System32
//!   only, so no DLL planting) and calls `WHvGetCapability(WHvCapabilityCodeHypervisorPresent)`
//!   through `GetProcAddress`. The DLL is never imported: the Windows loader refuses to start
//!   an executable whose imported DLL is missing, and `WinHvPlatform.dll` only exists where the
//!   optional "Windows Hypervisor Platform" feature is on. `scripts/test.d/40-windows.sh`
//!   checks the import table of `vmcp.exe`.
//! - [`windows_version`]: `RtlGetVersion` from ntdll (always present).
//! - [`process_start_time`], [`process_rss_kib`]: `OpenProcess` + `GetProcessTimes` /
//!   `K32GetProcessMemoryInfo`, for the sweep of runtime folders left by a killed vmcp and for
//!   `vmcp bench`.
//! - [`KillOnCloseJob`]: a Job Object with `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`. When its last
//!   handle closes — on drop, or when the kernel cleans up a vmcp that was killed — Windows
//!   terminates every process in it.

use std::ffi::c_void;
use std::os::windows::io::{AsRawHandle, RawHandle};

use windows_sys::core::HRESULT;
use windows_sys::Wdk::System::SystemServices::RtlGetVersion;
use windows_sys::Win32::Foundation::{
    CloseHandle, FreeLibrary, FILETIME, HANDLE, HMODULE, STILL_ACTIVE,
};
use windows_sys::Win32::System::Hypervisor::{
    WHvCapabilityCodeHypervisorPresent, WHV_CAPABILITY_CODE,
};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectExtendedLimitInformation,
    SetInformationJobObject, JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
    JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
};
use windows_sys::Win32::System::LibraryLoader::{
    GetProcAddress, LoadLibraryExW, LOAD_LIBRARY_SEARCH_SYSTEM32,
};
use windows_sys::Win32::System::ProcessStatus::{K32GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS};
use windows_sys::Win32::System::SystemInformation::OSVERSIONINFOW;
use windows_sys::Win32::System::Threading::{
    GetExitCodeProcess, GetProcessTimes, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    PROCESS_VM_READ,
};

use crate::qemu::host_windows::facts::{WhpStatus, WindowsVersion};

/// `WHvGetCapability` as declared in WinHvPlatform.h.
type WHvGetCapabilityFn = unsafe extern "system" fn(
    capability_code: WHV_CAPABILITY_CODE,
    capability_buffer: *mut c_void,
    capability_buffer_size_in_bytes: u32,
    written_size_in_bytes: *mut u32,
) -> HRESULT;

/// A DLL loaded with `LoadLibraryExW`, freed on drop.
struct Library(HMODULE);

impl Library {
    /// Loads `name` from System32 only.
    fn load_system32(name: &str) -> std::io::Result<Library> {
        let wide: Vec<u16> = name.encode_utf16().chain(Some(0)).collect();
        // SAFETY: `wide` is a NUL-terminated UTF-16 string that lives across the call; the
        // file handle argument must be null; the flag restricts the search to System32.
        let module = unsafe {
            LoadLibraryExW(
                wide.as_ptr(),
                std::ptr::null_mut(),
                LOAD_LIBRARY_SEARCH_SYSTEM32,
            )
        };
        if module.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Library(module))
    }

    /// The address of export `name` (NUL-terminated).
    fn symbol(
        &self,
        name: &std::ffi::CStr,
    ) -> std::io::Result<unsafe extern "system" fn() -> isize> {
        // SAFETY: `self.0` is a module handle from LoadLibraryExW that stays loaded while
        // `self` lives; `name` is a NUL-terminated ASCII string.
        let proc = unsafe { GetProcAddress(self.0, name.as_ptr().cast()) };
        proc.ok_or_else(std::io::Error::last_os_error)
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: the handle came from LoadLibraryExW and is freed exactly once; no function
        // pointer obtained from it is used after the owning `Library` is dropped (they are only
        // called inside `whp_status` while the `Library` is alive).
        unsafe {
            FreeLibrary(self.0);
        }
    }
}

/// Whether the Windows Hypervisor Platform is usable here.
pub(crate) fn whp_status() -> WhpStatus {
    let lib = match Library::load_system32("WinHvPlatform.dll") {
        Ok(lib) => lib,
        Err(e) => {
            return WhpStatus::DllMissing {
                error: e.to_string(),
            }
        }
    };
    let proc = match lib.symbol(c"WHvGetCapability") {
        Ok(p) => p,
        Err(e) => {
            return WhpStatus::NoEntryPoint {
                error: e.to_string(),
            }
        }
    };
    // SAFETY: the export named WHvGetCapability has the signature of `WHvGetCapabilityFn`
    // (WinHvPlatform.h, stdcall/"system" ABI); both are plain function pointers of the same
    // size, so reinterpreting the generic FARPROC as this type is sound.
    let get_capability: WHvGetCapabilityFn = unsafe { std::mem::transmute(proc) };
    let mut present: i32 = 0; // WINBOOL, as the HypervisorPresent capability is defined.
    let mut written: u32 = 0;
    // SAFETY: the buffer is a valid, writable 4-byte BOOL and its size is passed; `written`
    // is a valid u32; the library stays loaded (`lib` lives until the end of the function).
    let hr = unsafe {
        get_capability(
            WHvCapabilityCodeHypervisorPresent,
            (&mut present as *mut i32).cast(),
            std::mem::size_of::<i32>() as u32,
            &mut written,
        )
    };
    drop(lib);
    if hr < 0 {
        WhpStatus::QueryFailed { hresult: hr }
    } else if present != 0 {
        WhpStatus::Present
    } else {
        WhpStatus::HypervisorAbsent
    }
}

/// The real Windows version (`RtlGetVersion` is not subject to manifest-based lies).
pub(crate) fn windows_version() -> Result<WindowsVersion, String> {
    let mut info = OSVERSIONINFOW {
        dwOSVersionInfoSize: std::mem::size_of::<OSVERSIONINFOW>() as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a valid OSVERSIONINFOW whose size field is set as the API requires.
    let status = unsafe { RtlGetVersion(&mut info) };
    if status != 0 {
        return Err(format!("RtlGetVersion failed with NTSTATUS {status:#010x}"));
    }
    Ok(WindowsVersion {
        major: info.dwMajorVersion,
        minor: info.dwMinorVersion,
        build: info.dwBuildNumber,
    })
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
pub fn process_start_time(pid: u32) -> Option<u64> {
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
pub fn process_rss_kib(pid: u32) -> Option<u64> {
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
pub struct KillOnCloseJob {
    handle: HANDLE,
}

// SAFETY: a job handle is a kernel object handle; every job API used here may be called from
// any thread, and the handle is only closed in Drop.
unsafe impl Send for KillOnCloseJob {}
// SAFETY: as above; `assign` only reads the handle value.
unsafe impl Sync for KillOnCloseJob {}

impl KillOnCloseJob {
    /// Creates an unnamed job with `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`.
    pub fn new() -> std::io::Result<KillOnCloseJob> {
        // SAFETY: null security attributes (default, not inheritable) and a null name
        // (unnamed job, so no other process can open it by name) are allowed.
        let handle = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
        if handle.is_null() {
            return Err(std::io::Error::last_os_error());
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
            return Err(std::io::Error::last_os_error());
        }
        Ok(job)
    }

    fn assign_raw(&self, process: RawHandle) -> std::io::Result<()> {
        // SAFETY: both handles are valid for the duration of the call (the caller borrows the
        // child that owns `process`); the job handle is owned by `self`.
        let ok = unsafe { AssignProcessToJobObject(self.handle, process) };
        if ok == 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Puts a tokio child process into the job.
    pub fn assign(&self, child: &tokio::process::Child) -> std::io::Result<()> {
        let handle = child.raw_handle().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the process has already exited",
            )
        })?;
        self.assign_raw(handle)
    }

    /// Puts a std child process into the job.
    pub fn assign_std(&self, child: &std::process::Child) -> std::io::Result<()> {
        self.assign_raw(child.as_raw_handle())
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

    // These run only on Windows (or under wine: scripts/test.d/40-windows.sh).

    #[test]
    fn version_is_readable() {
        let v = windows_version().unwrap();
        assert!(v.major >= 6, "{v}");
    }

    #[test]
    fn whp_status_is_probed_without_crashing() {
        let s = whp_status();
        eprintln!("WHP status here: {s:?} {}", s.reason());
        assert_ne!(s, WhpStatus::NotWindows);
        if let WhpStatus::DllMissing { error } = &s {
            // Under wine and where the feature is off.
            assert!(!error.is_empty());
            assert!(s.reason().starts_with("WinHvPlatform.dll cannot be loaded"));
        }
        assert_eq!(s.usable(), s.reason().is_empty());
    }

    #[test]
    fn process_queries() {
        let me = std::process::id();
        let t = process_start_time(me).unwrap();
        assert_eq!(process_start_time(me), Some(t));
        assert!(process_rss_kib(me).unwrap() > 0);
        let mut child = std::process::Command::new("cmd")
            .args(["/c", "exit", "0"])
            .spawn()
            .unwrap();
        let pid = child.id();
        child.wait().unwrap();
        // Exited (the std handle is closed by now too): no start time.
        assert_eq!(process_start_time(pid), None);
    }

    #[test]
    fn job_kills_its_process_on_drop() {
        let job = KillOnCloseJob::new().unwrap();
        // `ping -n 60` runs for about a minute on Windows and under wine.
        let mut child = std::process::Command::new("ping")
            .args(["-n", "60", "127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        job.assign_std(&child).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "ping ended by itself; the test needs a long-running child"
        );
        let t = std::time::Instant::now();
        drop(job);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "process outlived its job"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

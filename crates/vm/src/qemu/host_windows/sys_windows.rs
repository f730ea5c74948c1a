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
//!
//! Process ownership (Job Objects, process start time and RSS) lives in `vmcp_host_process`.

use std::ffi::c_void;

use windows_sys::core::HRESULT;
use windows_sys::Wdk::System::SystemServices::RtlGetVersion;
use windows_sys::Win32::Foundation::{FreeLibrary, HMODULE};
use windows_sys::Win32::System::Hypervisor::{
    WHvCapabilityCodeHypervisorPresent, WHV_CAPABILITY_CODE,
};
use windows_sys::Win32::System::LibraryLoader::{
    GetProcAddress, LoadLibraryExW, LOAD_LIBRARY_SEARCH_SYSTEM32,
};
use windows_sys::Win32::System::SystemInformation::OSVERSIONINFOW;

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
}

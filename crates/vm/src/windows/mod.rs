//! Windows host support for the QEMU backend (QEMU with WHPX, or TCG).
//!
//! Layout — logic is pure and compiled and tested on every host; the OS is touched only in
//! `sys_windows.rs` (compiled on Windows only, all `unsafe` there with `SAFETY` comments):
//!
//! - [`qemu_args`]: the Windows pieces of a QEMU command line (option-value quoting, Windows
//!   paths, loopback-TCP and named-pipe chardevs, WHPX flags, where QEMU is installed).
//! - [`facts`]: what a probe found (Windows version, Hypervisor Platform status, QEMU).
//! - [`accel`]: the accelerator choice from those facts (WHPX, else TCG with a notice).
//! - [`doctor`]: the Windows section of `vmcp doctor` from those facts.
//! - [`probe`]: gathers the facts (OS layer + running QEMU with timeouts).
//! - [`channel`]: loopback TCP listeners for QMP and the token-checked agent channel.
//!
//! `WinHvPlatform.dll` is loaded at run time, never imported, so `vmcp.exe` starts on every
//! Windows machine and can say what to turn on. See docs/windows.md.

pub mod accel;
pub mod channel;
pub mod doctor;
pub mod facts;
pub mod probe;
pub mod qemu_args;

#[cfg(not(windows))]
#[path = "sys_other.rs"]
mod sys;
#[cfg(windows)]
#[path = "sys_windows.rs"]
mod sys;

/// `Ok` when the Windows Hypervisor Platform can be used here and the QEMU that `vmcp run`
/// would start has WHPX built in, else why not and what to do, in one line (the QEMU
/// backend's `HostFacts::whpx`). QEMU's accelerator list is read once per process.
pub fn whpx_fact() -> Result<(), String> {
    let status = sys::whp_status();
    if !status.usable() {
        let fix = status.fix();
        return Err(if fix.is_empty() {
            status.reason()
        } else {
            format!("{}; to fix: {fix}", status.reason())
        });
    }
    // A missing QEMU is reported by the backend itself.
    let Ok(qemu) = crate::qemu::binary::find(crate::Arch::host()) else {
        return Ok(());
    };
    static WHPX_BUILT_IN: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let built_in = *WHPX_BUILT_IN
        .get_or_init(|| probe::qemu_lists_accel_blocking(&qemu, "whpx", probe::PROBE_TIMEOUT));
    match built_in {
        Some(false) => Err(format!(
            "{} was built without WHPX; to fix: install the QEMU for Windows build from {}",
            qemu.display(),
            qemu_args::QEMU_DOWNLOAD_URL
        )),
        // Listed, or the list could not be read (then QEMU's own error shows at start).
        Some(true) | None => Ok(()),
    }
}

/// Gathers the facts for this host and builds the Windows doctor report (QEMU for the host's
/// architecture, found through this process's `PATH` and `%ProgramFiles%`).
pub async fn doctor_report() -> doctor::Report {
    let facts = probe::gather(&probe::HostEnv::current(), crate::Arch::host()).await;
    doctor::build(&facts)
}

#[cfg(test)]
mod tests {
    #[test]
    fn whpx_fact_explains() {
        match super::whpx_fact() {
            // Linux: "this is not a Windows host"; Windows/wine without WHP: reason and fix.
            Err(e) => assert!(
                e.contains("not a Windows host") || e.contains("to fix:"),
                "{e}"
            ),
            Ok(()) => assert_eq!(std::env::consts::OS, "windows"),
        }
    }
}

//! Windows host facts of the QEMU backend (QEMU with WHPX, or TCG). A host layer of the
//! backend, not a backend: the QEMU backend's accelerator choice reads [`whpx_fact`], its
//! doctor section is [`doctor_checks`], its Windows launch layer (`platform_windows.rs`)
//! uses [`channel`], [`qemu_args`] and the Job Object.
//!
//! Layout — logic is pure and compiled and tested on every host; the OS is touched only in
//! `sys_windows.rs` (compiled on Windows only, all `unsafe` there with `SAFETY` comments):
//!
//! - [`qemu_args`]: the Windows pieces of a QEMU command line (option-value quoting, Windows
//!   paths, loopback-TCP and named-pipe chardevs, WHPX flags, where QEMU is installed).
//! - [`facts`]: what a probe found (Windows version, Hypervisor Platform status, QEMU).
//! - [`doctor`]: the Windows checks of `vmcp doctor` from those facts.
//! - [`probe`]: gathers the facts (OS layer + running QEMU with timeouts).
//! - [`channel`]: loopback TCP listeners for QMP and the token-checked agent channel.
//!
//! `WinHvPlatform.dll` is loaded at run time, never imported, so `vmcp.exe` starts on every
//! Windows machine and can say what to turn on. See docs/windows.md.

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
/// backend's `HostFacts::whpx`). The same judgement as the doctor's
/// ([`facts::WindowsFacts::whpx_problem`]) without the slow WHPX start; QEMU's accelerator
/// list is read once per process.
pub fn whpx_fact() -> Result<(), String> {
    let whp = sys::whp_status();
    let qemu = if whp.usable() {
        match crate::qemu::binary::find(crate::Arch::host()) {
            Ok(path) => {
                static ACCELS: std::sync::OnceLock<Result<Vec<String>, String>> =
                    std::sync::OnceLock::new();
                let accels = ACCELS
                    .get_or_init(|| probe::qemu_accels_blocking(&path, probe::PROBE_TIMEOUT))
                    .clone();
                facts::QemuFacts::Found {
                    path,
                    version: Ok(String::new()),
                    accels,
                    whpx_trial: None,
                }
            }
            // A missing QEMU is reported by the backend itself.
            Err(_) => return Ok(()),
        }
    } else {
        facts::QemuFacts::NotFound { searched: vec![] }
    };
    let facts = facts::WindowsFacts {
        version: Err("not read".into()),
        whp,
        qemu,
    };
    match facts.whpx_problem() {
        None => Ok(()),
        Some((reason, fix)) if fix.is_empty() => Err(reason),
        Some((reason, fix)) => Err(format!("{reason}; to fix: {fix}")),
    }
}

/// Gathers the facts for this host and turns them into the doctor's checks (QEMU for the
/// host's architecture, found through this process's `PATH` and `%ProgramFiles%`).
pub async fn doctor_checks() -> Vec<crate::select::Check> {
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

//! What vmcp found out about a Windows host: plain data, filled in by the OS layer and by
//! running QEMU ([`super::probe`]), consumed by the QEMU backend's accelerator choice
//! (through [`WindowsFacts::whpx_problem`]) and the doctor checks ([`super::doctor`]). Tests
//! build these by hand.

use std::path::PathBuf;

use super::qemu_args::QEMU_DOWNLOAD_URL;
use crate::qemu::cmdline::accel_arg;
use crate::Accel;

/// The optional Windows feature that provides `WinHvPlatform.dll`.
pub const WHP_FEATURE_NAME: &str = "Windows Hypervisor Platform";

/// The PowerShell command (run as administrator) that turns it on.
pub const WHP_ENABLE_COMMAND: &str =
    "Enable-WindowsOptionalFeature -Online -FeatureName HypervisorPlatform";

/// `major.minor.build` as reported by `RtlGetVersion` (which, unlike `GetVersionEx`, does not
/// lie to programs without a compatibility manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowsVersion {
    /// 10 for Windows 10 and 11.
    pub major: u32,
    /// 0 for Windows 10 and 11.
    pub minor: u32,
    /// Build number; 22000 and above is Windows 11.
    pub build: u32,
}

impl std::fmt::Display for WindowsVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.major, self.minor, self.build) {
            (10, 0, b) if b >= 22000 => "Windows 11",
            (10, 0, _) => "Windows 10",
            (6, 3, _) => "Windows 8.1",
            (6, 2, _) => "Windows 8",
            (6, 1, _) => "Windows 7",
            _ => "Windows",
        };
        write!(f, "{name} ({}.{}.{})", self.major, self.minor, self.build)
    }
}

/// Whether the Windows Hypervisor Platform API can be used, and if not the first thing that
/// failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhpStatus {
    /// The host is not Windows.
    NotWindows,
    /// `LoadLibraryExW("WinHvPlatform.dll")` failed (the feature is off).
    DllMissing {
        /// The loader's error text.
        error: String,
    },
    /// The DLL loaded but has no `WHvGetCapability` export.
    NoEntryPoint {
        /// The loader's error text.
        error: String,
    },
    /// `WHvGetCapability(WHvCapabilityCodeHypervisorPresent)` returned a failure HRESULT.
    QueryFailed {
        /// The HRESULT.
        hresult: i32,
    },
    /// The API works but reports no hypervisor (virtualization off in firmware, or the
    /// hypervisor is not launched at boot).
    HypervisorAbsent,
    /// A hypervisor is present: WHPX can be used.
    Present,
}

impl WhpStatus {
    /// Whether WHPX can be used.
    pub fn usable(&self) -> bool {
        matches!(self, WhpStatus::Present)
    }

    /// Why WHPX cannot be used (empty when it can).
    pub fn reason(&self) -> String {
        match self {
            WhpStatus::NotWindows => "this is not a Windows host".into(),
            WhpStatus::DllMissing { error } => {
                format!("WinHvPlatform.dll cannot be loaded ({error})")
            }
            WhpStatus::NoEntryPoint { error } => {
                format!("WinHvPlatform.dll has no WHvGetCapability ({error})")
            }
            WhpStatus::QueryFailed { hresult } => {
                format!(
                    "WHvGetCapability failed with HRESULT {:#010x}",
                    *hresult as u32
                )
            }
            WhpStatus::HypervisorAbsent => "WHvGetCapability reports no hypervisor running".into(),
            WhpStatus::Present => String::new(),
        }
    }

    /// What the user should do (empty when nothing).
    pub fn fix(&self) -> String {
        match self {
            WhpStatus::NotWindows | WhpStatus::Present => String::new(),
            WhpStatus::DllMissing { .. } | WhpStatus::NoEntryPoint { .. } => format!(
                "turn on the optional feature \"{WHP_FEATURE_NAME}\" (PowerShell as \
                 administrator: `{WHP_ENABLE_COMMAND}`), then restart Windows"
            ),
            WhpStatus::QueryFailed { .. } | WhpStatus::HypervisorAbsent => format!(
                "turn on CPU virtualization (Intel VT-x / AMD-V) in the firmware settings, make \
                 sure the hypervisor starts at boot (`bcdedit /set hypervisorlaunchtype auto` as \
                 administrator) and that \"{WHP_FEATURE_NAME}\" is on, then restart Windows"
            ),
        }
    }
}

/// What running `qemu-system-x86_64.exe` showed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QemuFacts {
    /// No QEMU in any searched place.
    NotFound {
        /// Where vmcp looked, in order.
        searched: Vec<PathBuf>,
    },
    /// Found.
    Found {
        /// The executable.
        path: PathBuf,
        /// `--version`, or why it could not be read.
        version: Result<String, String>,
        /// Accelerators compiled in (`-accel help`), or why the list could not be read.
        accels: Result<Vec<String>, String>,
        /// Result of starting QEMU with `-accel whpx,kernel-irqchip=off` (`None`: not tried,
        /// because WHP or QEMU's WHPX support is missing).
        whpx_trial: Option<Result<(), String>>,
    },
}

impl QemuFacts {
    /// Whether QEMU lists `accel` among its accelerators.
    pub fn has_accel(&self, accel: &str) -> bool {
        match self {
            QemuFacts::Found {
                accels: Ok(list), ..
            } => list.iter().any(|a| a == accel),
            _ => false,
        }
    }
}

/// Everything `vmcp doctor` and the accelerator choice need to know about a Windows host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsFacts {
    /// Windows version, or why it could not be read.
    pub version: Result<WindowsVersion, String>,
    /// The Hypervisor Platform.
    pub whp: WhpStatus,
    /// QEMU.
    pub qemu: QemuFacts,
}

impl WindowsFacts {
    /// Why WHPX cannot be used on this host, with the fix; `None` when it can (a WHPX start
    /// not tried yet counts as working).
    pub fn whpx_problem(&self) -> Option<(String, String)> {
        if !self.whp.usable() {
            return Some((self.whp.reason(), self.whp.fix()));
        }
        let QemuFacts::Found {
            path,
            accels,
            whpx_trial,
            ..
        } = &self.qemu
        else {
            return Some((
                "QEMU is not installed".into(),
                format!("install QEMU for Windows from {QEMU_DOWNLOAD_URL}"),
            ));
        };
        match accels {
            Err(e) => {
                return Some((
                    format!("cannot list the accelerators of {}: {e}", path.display()),
                    format!(
                    "check that `{} -accel help` runs, or reinstall QEMU from {QEMU_DOWNLOAD_URL}",
                    path.display()
                ),
                ))
            }
            Ok(list) if !list.iter().any(|a| a == "whpx") => {
                return Some((
                    format!("{} was built without WHPX support", path.display()),
                    format!("install the QEMU for Windows build from {QEMU_DOWNLOAD_URL}"),
                ))
            }
            Ok(_) => {}
        }
        if let Some(Err(e)) = whpx_trial {
            return Some((
                format!(
                    "QEMU did not start with -accel {}: {e}",
                    accel_arg(Accel::Whpx)
                ),
                format!("update QEMU from {QEMU_DOWNLOAD_URL}, or run with --accel tcg"),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names() {
        let v = |major, minor, build| WindowsVersion {
            major,
            minor,
            build,
        };
        assert_eq!(v(10, 0, 22631).to_string(), "Windows 11 (10.0.22631)");
        assert_eq!(v(10, 0, 19045).to_string(), "Windows 10 (10.0.19045)");
        assert_eq!(v(6, 1, 7601).to_string(), "Windows 7 (6.1.7601)");
        assert_eq!(v(6, 3, 9600).to_string(), "Windows 8.1 (6.3.9600)");
        assert_eq!(v(6, 2, 9200).to_string(), "Windows 8 (6.2.9200)");
        assert_eq!(v(5, 1, 2600).to_string(), "Windows (5.1.2600)");
    }

    #[test]
    fn reasons_and_fixes() {
        let missing = WhpStatus::DllMissing {
            error: "module not found (os error 126)".into(),
        };
        assert!(!missing.usable());
        assert!(missing.reason().contains("os error 126"));
        assert!(missing.fix().contains(WHP_ENABLE_COMMAND));
        assert!(missing.fix().contains(WHP_FEATURE_NAME));
        let absent = WhpStatus::HypervisorAbsent;
        assert!(absent.fix().contains("firmware"));
        let q = WhpStatus::QueryFailed {
            hresult: -2147024809,
        };
        assert!(q.reason().contains("0x80070057"), "{}", q.reason());
        let ne = WhpStatus::NoEntryPoint { error: "x".into() };
        assert!(ne.reason().contains("WHvGetCapability"));
        assert!(WhpStatus::Present.usable());
        assert!(WhpStatus::Present.reason().is_empty() && WhpStatus::Present.fix().is_empty());
        assert!(WhpStatus::NotWindows.reason().contains("not a Windows"));
    }

    fn facts(whp: WhpStatus, accels: &[&str], trial: Option<Result<(), String>>) -> WindowsFacts {
        WindowsFacts {
            version: Ok(WindowsVersion {
                major: 10,
                minor: 0,
                build: 22631,
            }),
            whp,
            qemu: QemuFacts::Found {
                path: r"C:\Program Files\qemu\qemu-system-x86_64.exe".into(),
                version: Ok("10.0.2".into()),
                accels: Ok(accels.iter().map(|s| s.to_string()).collect()),
                whpx_trial: trial,
            },
        }
    }

    #[test]
    fn whpx_problems_in_order() {
        let f = facts(WhpStatus::Present, &["tcg", "whpx"], Some(Ok(())));
        assert_eq!(f.whpx_problem(), None);
        assert_eq!(
            facts(WhpStatus::Present, &["tcg", "whpx"], None).whpx_problem(),
            None
        );
        let (reason, fix) = facts(
            WhpStatus::DllMissing {
                error: "os error 126".into(),
            },
            &["tcg", "whpx"],
            None,
        )
        .whpx_problem()
        .unwrap();
        assert!(reason.contains("os error 126") && fix.contains("HypervisorPlatform"));
        let (reason, _) = facts(WhpStatus::Present, &["tcg"], None)
            .whpx_problem()
            .unwrap();
        assert!(reason.contains("built without WHPX"), "{reason}");
        let (reason, _) = facts(
            WhpStatus::Present,
            &["tcg", "whpx"],
            Some(Err("WHPX: Failed to setup partition".into())),
        )
        .whpx_problem()
        .unwrap();
        assert!(reason.contains("Failed to setup partition"), "{reason}");
        let mut f = facts(WhpStatus::Present, &[], None);
        if let QemuFacts::Found { accels, .. } = &mut f.qemu {
            *accels = Err("timed out".into());
        }
        let (reason, fix) = f.whpx_problem().unwrap();
        assert!(reason.contains("timed out") && fix.contains("-accel help"));
        f.qemu = QemuFacts::NotFound { searched: vec![] };
        assert!(f.whpx_problem().unwrap().0.contains("not installed"));
    }

    #[test]
    fn has_accel() {
        let q = QemuFacts::Found {
            path: "q".into(),
            version: Ok("10.0.2".into()),
            accels: Ok(vec!["tcg".into(), "whpx".into()]),
            whpx_trial: None,
        };
        assert!(q.has_accel("whpx") && !q.has_accel("kvm"));
        let nf = QemuFacts::NotFound { searched: vec![] };
        assert!(!nf.has_accel("tcg"));
    }
}

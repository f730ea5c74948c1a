//! The Windows checks of the QEMU backend's `vmcp doctor` section: a pure function from
//! [`WindowsFacts`] to checks, so every combination is tested on Linux with made-up facts.
//!
//! Each line is one check: what was found, and for anything missing the exact thing to do.
//! Whether vmcp can run VMs here is the selector's verdict at the end of the report.

use crate::qemu::host_windows::facts::{QemuFacts, WhpStatus, WindowsFacts};
use crate::qemu::host_windows::qemu_args::QEMU_DOWNLOAD_URL;
use crate::select::Check;

/// The checks, in display order.
pub fn build(facts: &WindowsFacts) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.push(match &facts.version {
        Ok(v) => Check {
            label: "Windows version".into(),
            ok: true,
            detail: v.to_string(),
            fix: None,
        },
        Err(e) => Check {
            label: "Windows version".into(),
            ok: false,
            detail: format!("unknown ({e})"),
            fix: None,
        },
    });

    let dll_loaded = !matches!(
        facts.whp,
        WhpStatus::DllMissing { .. } | WhpStatus::NotWindows
    );
    checks.push(Check {
        label: "WinHvPlatform.dll".into(),
        ok: dll_loaded,
        detail: if dll_loaded {
            "loads".into()
        } else {
            facts.whp.reason()
        },
        fix: (!dll_loaded)
            .then(|| facts.whp.fix())
            .filter(|f| !f.is_empty()),
    });
    checks.push(Check {
        label: "hypervisor present (WHvGetCapability)".into(),
        ok: facts.whp.usable(),
        detail: match &facts.whp {
            WhpStatus::Present => "yes".into(),
            WhpStatus::DllMissing { .. } | WhpStatus::NotWindows => {
                "not checked: WinHvPlatform.dll is not loaded".into()
            }
            other => other.reason(),
        },
        fix: match &facts.whp {
            WhpStatus::NoEntryPoint { .. }
            | WhpStatus::QueryFailed { .. }
            | WhpStatus::HypervisorAbsent => Some(facts.whp.fix()),
            _ => None,
        },
    });

    match &facts.qemu {
        QemuFacts::NotFound { searched } => checks.push(Check {
            label: "QEMU".into(),
            ok: false,
            detail: format!(
                "not found (looked in: {})",
                if searched.is_empty() {
                    "nothing: PATH and %ProgramFiles% are unset".to_string()
                } else {
                    searched
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            ),
            fix: Some(format!(
                "install QEMU for Windows from {QEMU_DOWNLOAD_URL} into its default folder \
                 (%ProgramFiles%\\qemu) or add its folder to PATH"
            )),
        }),
        QemuFacts::Found {
            path,
            version,
            accels,
            whpx_trial,
        } => {
            checks.push(match version {
                Ok(v) => Check {
                    label: "QEMU".into(),
                    ok: true,
                    detail: format!("{} (version {v})", path.display()),
                    fix: None,
                },
                Err(e) => Check {
                    label: "QEMU".into(),
                    ok: false,
                    detail: format!("{} does not run: {e}", path.display()),
                    fix: Some(format!(
                        "reinstall QEMU for Windows from {QEMU_DOWNLOAD_URL}"
                    )),
                },
            });
            let whpx_built_in = facts.qemu.has_accel("whpx");
            checks.push(Check {
                label: "QEMU accelerators".into(),
                ok: whpx_built_in,
                detail: match accels {
                    Ok(list) => list.join(", "),
                    Err(e) => format!("unknown ({e})"),
                },
                fix: (!whpx_built_in).then(|| {
                    format!(
                        "install the QEMU for Windows build from {QEMU_DOWNLOAD_URL} (it has whpx)"
                    )
                }),
            });
            if let Some(trial) = whpx_trial {
                checks.push(Check {
                    label: "QEMU starts with whpx".into(),
                    ok: trial.is_ok(),
                    detail: match trial {
                        Ok(()) => "yes".into(),
                        Err(e) => e.clone(),
                    },
                    fix: trial.is_err().then(|| {
                        format!("update QEMU from {QEMU_DOWNLOAD_URL}; until then vmcp uses tcg")
                    }),
                });
            }
        }
    }

    checks.push(match facts.whpx_problem() {
        None => Check {
            label: "WHPX for QEMU".into(),
            ok: true,
            detail: "usable: `vmcp run` uses whpx".into(),
            fix: None,
        },
        Some((reason, fix)) => Check {
            label: "WHPX for QEMU".into(),
            ok: false,
            detail: format!("not usable, `vmcp run` falls back to tcg (much slower): {reason}"),
            fix: (!fix.is_empty()).then_some(fix),
        },
    });
    checks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::host_windows::facts::{WindowsVersion, WHP_ENABLE_COMMAND, WHP_FEATURE_NAME};
    use crate::select::{DoctorReport, Section};

    fn win11() -> Result<WindowsVersion, String> {
        Ok(WindowsVersion {
            major: 10,
            minor: 0,
            build: 22631,
        })
    }

    fn qemu(accels: &[&str], trial: Option<Result<(), String>>) -> QemuFacts {
        QemuFacts::Found {
            path: r"C:\Program Files\qemu\qemu-system-x86_64.exe".into(),
            version: Ok("10.0.2".into()),
            accels: Ok(accels.iter().map(|s| s.to_string()).collect()),
            whpx_trial: trial,
        }
    }

    /// The checks as `vmcp doctor` prints them.
    fn render(checks: &[Check]) -> String {
        DoctorReport {
            sections: vec![Section::new("Windows host (QEMU backend)", checks.to_vec())],
            selection: Ok("backend qemu".into()),
            notices: vec![],
        }
        .to_string()
    }

    #[test]
    fn wine_like_host() {
        // What vmcp.exe sees under wine: no WinHvPlatform.dll, no QEMU.
        let facts = WindowsFacts {
            version: win11(),
            whp: WhpStatus::DllMissing {
                error: "Module not found. (os error 126)".into(),
            },
            qemu: QemuFacts::NotFound {
                searched: vec![r"C:\Program Files\qemu\qemu-system-x86_64.exe".into()],
            },
        };
        let text = render(&build(&facts));
        assert!(
            text.contains("[ok] Windows version: Windows 11 (10.0.22631)"),
            "{text}"
        );
        assert!(
            text.contains("[--] WinHvPlatform.dll: WinHvPlatform.dll cannot be loaded (Module not found. (os error 126))"),
            "{text}"
        );
        assert!(text.contains(WHP_ENABLE_COMMAND) && text.contains(WHP_FEATURE_NAME));
        assert!(text.contains("not checked"));
        assert!(
            text.contains("[--] QEMU: not found (looked in: C:\\Program Files\\qemu"),
            "{text}"
        );
        assert!(text.contains(QEMU_DOWNLOAD_URL));
        assert!(text.contains("[--] WHPX for QEMU: not usable"), "{text}");
    }

    #[test]
    fn whpx_host_is_all_ok() {
        let facts = WindowsFacts {
            version: win11(),
            whp: WhpStatus::Present,
            qemu: qemu(&["tcg", "whpx"], Some(Ok(()))),
        };
        let checks = build(&facts);
        assert!(
            checks.iter().all(|c| c.ok && c.fix.is_none()),
            "{checks:#?}"
        );
        let text = render(&checks);
        assert!(text.contains("version 10.0.2"));
        assert!(text.contains("QEMU starts with whpx: yes"));
        assert!(text.contains("[ok] WHPX for QEMU: usable"), "{text}");
    }

    #[test]
    fn hypervisor_off_says_tcg_and_how_to_fix() {
        let facts = WindowsFacts {
            version: Err("RtlGetVersion failed".into()),
            whp: WhpStatus::HypervisorAbsent,
            qemu: qemu(&["tcg", "whpx"], None),
        };
        let text = render(&build(&facts));
        assert!(text.contains("Windows version: unknown (RtlGetVersion failed)"));
        assert!(text.contains("[ok] WinHvPlatform.dll: loads"));
        assert!(text.contains(
            "[--] hypervisor present (WHvGetCapability): WHvGetCapability reports no hypervisor"
        ));
        assert!(text.contains("bcdedit"));
        assert!(text.contains("falls back to tcg (much slower)"), "{text}");
        assert!(!text.contains("QEMU starts with whpx"));
    }

    #[test]
    fn qemu_problems_are_reported() {
        let facts = WindowsFacts {
            version: win11(),
            whp: WhpStatus::Present,
            qemu: QemuFacts::Found {
                path: r"D:\q\qemu-system-x86_64.exe".into(),
                version: Err("exit code 3".into()),
                accels: Err("timed out after 10s".into()),
                whpx_trial: Some(Err("WHPX: No accelerator found".into())),
            },
        };
        let text = render(&build(&facts));
        assert!(
            text.contains(r"D:\q\qemu-system-x86_64.exe does not run: exit code 3"),
            "{text}"
        );
        assert!(text.contains("QEMU accelerators: unknown (timed out after 10s)"));
        assert!(text.contains("[--] QEMU starts with whpx: WHPX: No accelerator found"));

        let facts = WindowsFacts {
            version: win11(),
            whp: WhpStatus::QueryFailed { hresult: 1 },
            qemu: QemuFacts::NotFound { searched: vec![] },
        };
        let text = render(&build(&facts));
        assert!(text.contains("PATH and %ProgramFiles% are unset"));
        assert!(text.contains("HRESULT 0x00000001"));
    }
}

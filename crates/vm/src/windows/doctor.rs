//! The Windows section of `vmcp doctor`: a pure function from [`HostFacts`] to a report, so
//! every combination is tested on Linux with made-up facts.
//!
//! Each line is one check: what was found, and for anything missing the exact thing to do.
//! The report says whether vmcp can run VMs here (QEMU present; WHPX or TCG), which decides
//! the exit code of `vmcp doctor`.

use std::fmt;

use crate::config::Accel;
use crate::windows::accel::{choose, whpx_problem, AccelChoice};
use crate::windows::facts::{HostFacts, QemuFacts, WhpStatus};
use crate::windows::qemu_args::QEMU_DOWNLOAD_URL;

/// One check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub label: &'static str,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do when it is not fine.
    pub fix: Option<String>,
}

/// The Windows doctor report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Checks in display order.
    pub checks: Vec<Check>,
    /// The accelerator `vmcp run` would use, if any.
    pub accel: Option<AccelChoice>,
}

impl Report {
    /// Adds a check from outside the Windows facts (e.g. the guest image), shown before the
    /// accelerator line. It does not change [`Report::can_run`].
    pub fn add_check(&mut self, check: Check) {
        let at = self.checks.len().saturating_sub(1);
        self.checks.insert(at, check);
    }

    /// Whether `vmcp run` can start VMs here.
    pub fn can_run(&self) -> bool {
        self.accel.is_some()
    }
}

/// Builds the report.
pub fn build(facts: &HostFacts) -> Report {
    let mut checks = Vec::new();
    checks.push(match &facts.version {
        Ok(v) => Check {
            label: "Windows version",
            ok: true,
            detail: v.to_string(),
            fix: None,
        },
        Err(e) => Check {
            label: "Windows version",
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
        label: "WinHvPlatform.dll",
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
        label: "hypervisor present (WHvGetCapability)",
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
            label: "QEMU",
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
                    label: "QEMU",
                    ok: true,
                    detail: format!("{} (version {v})", path.display()),
                    fix: None,
                },
                Err(e) => Check {
                    label: "QEMU",
                    ok: false,
                    detail: format!("{} does not run: {e}", path.display()),
                    fix: Some(format!(
                        "reinstall QEMU for Windows from {QEMU_DOWNLOAD_URL}"
                    )),
                },
            });
            let whpx_built_in = facts.qemu.has_accel("whpx");
            checks.push(Check {
                label: "QEMU accelerators",
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
                    label: "QEMU starts with whpx",
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

    let accel = choose(None, facts).ok();
    checks.push(match &accel {
        Some(c) if c.accel == Accel::Whpx => Check {
            label: "accelerator for `vmcp run`",
            ok: true,
            detail: format!("whpx (-accel {})", c.qemu_arg),
            fix: None,
        },
        Some(c) => Check {
            label: "accelerator for `vmcp run`",
            ok: false,
            detail: format!(
                "{} (software emulation, much slower): {}",
                c.accel,
                whpx_problem(facts).map(|(r, _)| r).unwrap_or_default()
            ),
            fix: Some("fix the items above to get whpx".into()),
        },
        None => Check {
            label: "accelerator for `vmcp run`",
            ok: false,
            detail: "none: QEMU is missing".into(),
            fix: Some(format!("install QEMU for Windows from {QEMU_DOWNLOAD_URL}")),
        },
    });
    Report { checks, accel }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Windows host (QEMU backend)")?;
        for c in &self.checks {
            writeln!(
                f,
                "  [{}] {}: {}",
                if c.ok { "ok" } else { "--" },
                c.label,
                c.detail
            )?;
            if let Some(fix) = &c.fix {
                writeln!(f, "       to fix: {fix}")?;
            }
        }
        match &self.accel {
            Some(c) => write!(f, "vmcp can run VMs here (accelerator {}).", c.accel),
            None => write!(
                f,
                "vmcp cannot run VMs here: fix the items marked [--] above."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::windows::facts::{WindowsVersion, WHP_ENABLE_COMMAND, WHP_FEATURE_NAME};

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

    #[test]
    fn wine_like_host_cannot_run() {
        // What vmcp.exe sees under wine: no WinHvPlatform.dll, no QEMU.
        let facts = HostFacts {
            version: win11(),
            whp: WhpStatus::DllMissing {
                error: "Module not found. (os error 126)".into(),
            },
            qemu: QemuFacts::NotFound {
                searched: vec![r"C:\Program Files\qemu\qemu-system-x86_64.exe".into()],
            },
        };
        let r = build(&facts);
        assert!(!r.can_run());
        let text = r.to_string();
        assert!(text.contains("Windows 11 (10.0.22631)"), "{text}");
        assert!(
            text.contains("WinHvPlatform.dll cannot be loaded (Module not found. (os error 126))"),
            "{text}"
        );
        assert!(text.contains(WHP_ENABLE_COMMAND) && text.contains(WHP_FEATURE_NAME));
        assert!(text.contains("not checked"));
        assert!(
            text.contains("[--] QEMU: not found (looked in: C:\\Program Files\\qemu"),
            "{text}"
        );
        assert!(text.contains(QEMU_DOWNLOAD_URL));
        assert!(text.contains("accelerator for `vmcp run`: none"));
        assert!(text.ends_with("fix the items marked [--] above."));
    }

    #[test]
    fn extra_checks_go_before_the_accelerator() {
        let facts = HostFacts {
            version: win11(),
            whp: WhpStatus::Present,
            qemu: qemu(&["tcg", "whpx"], None),
        };
        let mut r = build(&facts);
        r.add_check(Check {
            label: "guest image",
            ok: false,
            detail: "not built yet".into(),
            fix: Some("run `vmcp image build`".into()),
        });
        assert!(r.can_run());
        let text = r.to_string();
        let image = text.find("[--] guest image: not built yet").unwrap();
        let accel = text.find("accelerator for `vmcp run`").unwrap();
        assert!(image < accel, "{text}");
        assert!(text.contains("to fix: run `vmcp image build`"));
    }

    #[test]
    fn whpx_host_can_run() {
        let facts = HostFacts {
            version: win11(),
            whp: WhpStatus::Present,
            qemu: qemu(&["tcg", "whpx"], Some(Ok(()))),
        };
        let r = build(&facts);
        assert!(r.can_run());
        assert!(r.checks.iter().all(|c| c.ok && c.fix.is_none()), "{r:#?}");
        let text = r.to_string();
        assert!(text.contains("version 10.0.2"));
        assert!(text.contains("whpx (-accel whpx,kernel-irqchip=off)"));
        assert!(text.contains("QEMU starts with whpx: yes"));
        assert!(text.ends_with("vmcp can run VMs here (accelerator whpx)."));
    }

    #[test]
    fn hypervisor_off_falls_back_to_tcg_and_still_can_run() {
        let facts = HostFacts {
            version: Err("RtlGetVersion failed".into()),
            whp: WhpStatus::HypervisorAbsent,
            qemu: qemu(&["tcg", "whpx"], None),
        };
        let r = build(&facts);
        assert!(r.can_run());
        assert_eq!(r.accel.as_ref().map(|c| c.accel), Some(Accel::Tcg));
        let text = r.to_string();
        assert!(text.contains("Windows version: unknown (RtlGetVersion failed)"));
        assert!(text.contains("[ok] WinHvPlatform.dll: loads"));
        assert!(text.contains(
            "[--] hypervisor present (WHvGetCapability): WHvGetCapability reports no hypervisor"
        ));
        assert!(text.contains("bcdedit"));
        assert!(text.contains("tcg (software emulation, much slower)"));
        assert!(!text.contains("QEMU starts with whpx"));
    }

    #[test]
    fn qemu_problems_are_reported() {
        let facts = HostFacts {
            version: win11(),
            whp: WhpStatus::Present,
            qemu: QemuFacts::Found {
                path: r"D:\q\qemu-system-x86_64.exe".into(),
                version: Err("exit code 3".into()),
                accels: Err("timed out after 10s".into()),
                whpx_trial: Some(Err("WHPX: No accelerator found".into())),
            },
        };
        let text = build(&facts).to_string();
        assert!(
            text.contains(r"D:\q\qemu-system-x86_64.exe does not run: exit code 3"),
            "{text}"
        );
        assert!(text.contains("QEMU accelerators: unknown (timed out after 10s)"));
        assert!(text.contains("[--] QEMU starts with whpx: WHPX: No accelerator found"));

        let facts = HostFacts {
            version: win11(),
            whp: WhpStatus::QueryFailed { hresult: 1 },
            qemu: QemuFacts::NotFound { searched: vec![] },
        };
        let text = build(&facts).to_string();
        assert!(text.contains("PATH and %ProgramFiles% are unset"));
        assert!(text.contains("HRESULT 0x00000001"));
    }
}

//! Which QEMU accelerator `vmcp run` uses on Windows: WHPX when the Hypervisor Platform is
//! present, QEMU has WHPX built in and (when tried) starts with it; otherwise TCG with a
//! one-line notice that says why and what to turn on. A pure function of [`HostFacts`].

use crate::config::Accel;
use crate::windows::facts::{HostFacts, QemuFacts};
use crate::windows::qemu_args::{accel_arg, QEMU_DOWNLOAD_URL};

/// The accelerator decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// The value for QEMU's `-accel`.
    pub qemu_arg: String,
    /// One line to show the user when vmcp fell back to something slower.
    pub notice: Option<String>,
}

/// Why no accelerator can be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccelError {
    /// QEMU is missing.
    #[error("QEMU is not installed: install QEMU for Windows from {QEMU_DOWNLOAD_URL} (default folder, or add its folder to PATH)")]
    NoQemu,
    /// The requested accelerator does not exist on Windows.
    #[error("accelerator {0} does not exist on Windows: use --accel whpx or --accel tcg")]
    NotOnWindows(Accel),
    /// WHPX was requested but cannot be used.
    #[error("accelerator whpx cannot be used: {reason}; to fix: {fix}")]
    WhpxUnavailable {
        /// Why.
        reason: String,
        /// What to do.
        fix: String,
    },
}

/// Why WHPX cannot be used on this host, with the fix; `None` when it can.
pub fn whpx_problem(facts: &HostFacts) -> Option<(String, String)> {
    if !facts.whp.usable() {
        return Some((facts.whp.reason(), facts.whp.fix()));
    }
    let QemuFacts::Found {
        path,
        accels,
        whpx_trial,
        ..
    } = &facts.qemu
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

/// Picks the accelerator: `requested` if it can work, else the best available.
pub fn choose(requested: Option<Accel>, facts: &HostFacts) -> Result<AccelChoice, AccelError> {
    if matches!(facts.qemu, QemuFacts::NotFound { .. }) {
        return Err(AccelError::NoQemu);
    }
    let pick = |accel: Accel, notice: Option<String>| AccelChoice {
        accel,
        qemu_arg: accel_arg(accel),
        notice,
    };
    match requested {
        Some(a @ (Accel::Kvm | Accel::Hvf)) => Err(AccelError::NotOnWindows(a)),
        Some(Accel::Tcg) => Ok(pick(Accel::Tcg, None)),
        Some(Accel::Whpx) => match whpx_problem(facts) {
            None => Ok(pick(Accel::Whpx, None)),
            Some((reason, fix)) => Err(AccelError::WhpxUnavailable { reason, fix }),
        },
        None => match whpx_problem(facts) {
            None => Ok(pick(Accel::Whpx, None)),
            Some((reason, fix)) => Ok(pick(
                Accel::Tcg,
                Some(format!(
                    "vmcp: using tcg (software emulation, much slower): {reason}; for whpx: {fix}"
                )),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::windows::facts::{WhpStatus, WindowsVersion};

    fn facts(whp: WhpStatus, accels: &[&str], trial: Option<Result<(), String>>) -> HostFacts {
        HostFacts {
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
    fn whpx_when_everything_is_there() {
        let f = facts(WhpStatus::Present, &["tcg", "whpx"], Some(Ok(())));
        let c = choose(None, &f).unwrap();
        assert_eq!(c.accel, Accel::Whpx);
        assert_eq!(c.qemu_arg, "whpx,kernel-irqchip=off");
        assert_eq!(c.notice, None);
        // Not tried yet counts as usable.
        let f = facts(WhpStatus::Present, &["tcg", "whpx"], None);
        assert_eq!(choose(None, &f).unwrap().accel, Accel::Whpx);
        assert_eq!(choose(Some(Accel::Whpx), &f).unwrap().accel, Accel::Whpx);
    }

    #[test]
    fn tcg_fallback_says_why_in_one_line() {
        let f = facts(
            WhpStatus::DllMissing {
                error: "os error 126".into(),
            },
            &["tcg", "whpx"],
            None,
        );
        let c = choose(None, &f).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.qemu_arg, "tcg");
        let n = c.notice.unwrap();
        assert!(!n.contains('\n'));
        assert!(
            n.contains("os error 126") && n.contains("HypervisorPlatform"),
            "{n}"
        );

        let f = facts(WhpStatus::Present, &["tcg"], None);
        let n = choose(None, &f).unwrap().notice.unwrap();
        assert!(n.contains("built without WHPX"), "{n}");

        let f = facts(
            WhpStatus::Present,
            &["tcg", "whpx"],
            Some(Err("WHPX: Failed to setup partition".into())),
        );
        let c = choose(None, &f).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.notice.unwrap().contains("Failed to setup partition"));
    }

    #[test]
    fn explicit_choices() {
        let f = facts(WhpStatus::HypervisorAbsent, &["tcg", "whpx"], None);
        assert_eq!(
            choose(Some(Accel::Tcg), &f).unwrap(),
            AccelChoice {
                accel: Accel::Tcg,
                qemu_arg: "tcg".into(),
                notice: None
            }
        );
        let e = choose(Some(Accel::Whpx), &f).unwrap_err();
        assert!(matches!(e, AccelError::WhpxUnavailable { .. }));
        assert!(e.to_string().contains("no hypervisor running"), "{e}");
        for a in [Accel::Kvm, Accel::Hvf] {
            let e = choose(Some(a), &f).unwrap_err().to_string();
            assert!(e.contains(a.as_str()) && e.contains("--accel whpx"), "{e}");
        }
    }

    #[test]
    fn unreadable_accel_list_and_missing_qemu() {
        let mut f = facts(WhpStatus::Present, &[], None);
        if let QemuFacts::Found { accels, .. } = &mut f.qemu {
            *accels = Err("timed out".into());
        }
        let (reason, fix) = whpx_problem(&f).unwrap();
        assert!(reason.contains("timed out") && fix.contains("-accel help"));
        f.qemu = QemuFacts::NotFound { searched: vec![] };
        assert_eq!(choose(None, &f).unwrap_err(), AccelError::NoQemu);
        assert!(AccelError::NoQemu.to_string().contains(QEMU_DOWNLOAD_URL));
        assert!(whpx_problem(&f).unwrap().0.contains("not installed"));
    }
}

//! The one report type of `vmcp doctor`: sections of checks, one section per backend (each
//! backend contributes its own checks through [`crate::Backend::checks`]), then what the
//! selector would pick for `vmcp run` and why.

use std::fmt;

/// One check: what was found, and for anything missing the exact thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Check {
    /// What was checked (`"qemu"`, `"accel kvm"`, `"WinHvPlatform.dll"`).
    pub label: String,
    /// Whether it is fine.
    pub ok: bool,
    /// What was found: how it works, or why not.
    pub detail: String,
    /// What to do when it is not fine.
    pub fix: Option<String>,
}

impl Check {
    /// A check result without a fix.
    pub fn new(label: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Check {
            label: label.into(),
            ok,
            detail: detail.into(),
            fix: None,
        }
    }

    /// The same check with what to do about it.
    pub fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// A titled group of checks (one backend, or the guest image).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Section {
    /// Heading (`"QEMU backend (Linux host)"`).
    pub title: String,
    /// Checks in display order.
    pub checks: Vec<Check>,
}

impl Section {
    /// A section.
    pub fn new(title: impl Into<String>, checks: Vec<Check>) -> Self {
        Section {
            title: title.into(),
            checks,
        }
    }
}

/// What `vmcp doctor` found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DoctorReport {
    /// Sections in display order.
    pub sections: Vec<Section>,
    /// What `vmcp run` would use (`"backend qemu, accelerator tcg"`), or why it cannot start
    /// a VM (the selector's error chain).
    pub selection: Result<String, String>,
    /// The selector's notices (fallbacks and why).
    pub notices: Vec<String>,
}

impl DoctorReport {
    /// Whether `vmcp run` can start VMs here (the selector found a backend).
    pub fn can_run_vms(&self) -> bool {
        self.selection.is_ok()
    }

    /// Adds a section (e.g. the guest image) after the backends'; it does not change
    /// [`DoctorReport::can_run_vms`].
    pub fn push_section(&mut self, section: Section) {
        self.sections.push(section);
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.sections {
            writeln!(f, "{}", s.title)?;
            for c in &s.checks {
                let mark = if c.ok { "ok" } else { "--" };
                writeln!(f, "  [{mark}] {}: {}", c.label, c.detail)?;
                if let Some(fix) = &c.fix {
                    writeln!(f, "       to fix: {fix}")?;
                }
            }
        }
        for n in &self.notices {
            writeln!(f, "notice: {n}")?;
        }
        match &self.selection {
            Ok(what) => write!(f, "vmcp can run VMs here: `vmcp run` uses {what}."),
            Err(why) => write!(
                f,
                "`vmcp run` cannot start a VM: {why}\nvmcp cannot run VMs here: fix the items marked [--] above."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_checks_fixes_notices_and_the_verdict() {
        let mut r = DoctorReport {
            sections: vec![Section::new(
                "QEMU backend",
                vec![
                    Check::new("qemu", true, "QEMU 10.0.2 at /usr/bin/qemu"),
                    Check::new("accel kvm", false, "/dev/kvm does not exist")
                        .with_fix("load the kvm module"),
                ],
            )],
            selection: Ok("backend qemu, accelerator tcg".into()),
            notices: vec!["using TCG".into()],
        };
        r.push_section(Section::new(
            "guest image",
            vec![Check::new("image", true, "built")],
        ));
        assert!(r.can_run_vms());
        let text = r.to_string();
        assert_eq!(
            text,
            "QEMU backend\n  [ok] qemu: QEMU 10.0.2 at /usr/bin/qemu\n  [--] accel kvm: /dev/kvm does not exist\n       to fix: load the kvm module\nguest image\n  [ok] image: built\nnotice: using TCG\nvmcp can run VMs here: `vmcp run` uses backend qemu, accelerator tcg."
        );
        r.selection = Err("backend qemu is unavailable: not found".into());
        assert!(!r.can_run_vms());
        assert!(r
            .to_string()
            .ends_with("not found\nvmcp cannot run VMs here: fix the items marked [--] above."));
    }
}

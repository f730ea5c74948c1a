//! Choosing a backend for this host, and the facts behind `vmcp doctor`.
//!
//! [`backends`] lists the backends compiled for this OS in order of preference;
//! [`default_backend`] returns the first whose probe says it is usable. [`doctor`] gathers,
//! for each backend and accelerator, whether it works here and why not, as plain data the
//! CLI prints.

use std::time::Duration;

use crate::qemu::{self, HostOs, QemuBackend};
use crate::{Accel, Arch, Backend, Probe, VmError};

/// The backends compiled for this OS, most preferred first.
pub fn backends() -> Vec<Box<dyn Backend>> {
    // The OS's own hypervisor framework first (macOS: Virtualization.framework), QEMU after.
    let mut all = crate::vz::native_backends();
    all.push(Box::new(QemuBackend::new()));
    all
}

/// The first usable backend; the error lists why each one is not.
pub async fn default_backend() -> Result<Box<dyn Backend>, VmError> {
    let mut reasons = Vec::new();
    for b in backends() {
        match b.probe().await {
            Probe::Usable { .. } => return Ok(b),
            Probe::Unusable { reason } => reasons.push(format!("{}: {reason}", b.name())),
        }
    }
    Err(VmError::Unavailable {
        backend: "any",
        reason: if reasons.is_empty() {
            "no backend is compiled for this OS".into()
        } else {
            reasons.join("; ")
        },
    })
}

/// One line of the doctor report.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Check {
    /// What was checked (`"qemu"`, `"accel kvm"`, `"/dev/vhost-vsock"`).
    pub name: String,
    /// Whether it works.
    pub ok: bool,
    /// How it works, or why not and what to do.
    pub detail: String,
}

impl Check {
    /// A check result.
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Self {
        Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

/// What `vmcp doctor` found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DoctorReport {
    /// The checks, in display order.
    pub checks: Vec<Check>,
    /// Whether at least one backend can run VMs here.
    pub can_run_vms: bool,
}

impl DoctorReport {
    /// Renders the report, one check per line: `ok   name: detail` / `no   name: detail`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(if c.ok { "ok   " } else { "no   " });
            out.push_str(&c.name);
            out.push_str(": ");
            out.push_str(&c.detail);
            out.push('\n');
        }
        out
    }
}

/// Builds the report from facts; pure so every branch is testable.
pub fn report_from(
    facts: &qemu::HostFacts,
    qemu_found: Result<(std::path::PathBuf, String), String>,
    launch: Result<(), &str>,
) -> DoctorReport {
    let mut checks = Vec::new();
    let qemu_ok = qemu_found.is_ok() && launch.is_ok();
    match &qemu_found {
        Ok((path, version)) => checks.push(Check::new(
            "qemu",
            true,
            format!("QEMU {version} at {}", path.display()),
        )),
        Err(why) => checks.push(Check::new("qemu", false, why.clone())),
    }
    if let Err(why) = launch {
        checks.push(Check::new("qemu backend", false, why));
    }
    let accels: &[Accel] = match facts.os {
        HostOs::Linux => &[Accel::Kvm, Accel::Tcg],
        HostOs::MacOs => &[Accel::Hvf, Accel::Tcg],
        HostOs::Windows => &[Accel::Whpx, Accel::Tcg],
    };
    for &a in accels {
        let usable = facts.usable(a, facts.arch);
        let (ok, detail) = match (&usable, qemu_ok) {
            (Ok(()), true) if a == Accel::Tcg => (
                true,
                "software emulation (slow but works everywhere)".to_string(),
            ),
            (Ok(()), true) => (true, "hardware virtualization".to_string()),
            (Ok(()), false) => (false, "needs a working QEMU (see above)".to_string()),
            (Err(why), _) => (false, why.clone()),
        };
        checks.push(Check::new(format!("accel {a}"), ok, detail));
    }
    if facts.os == HostOs::Linux {
        checks.push(Check::new(
            "/dev/kvm",
            facts.kvm_device.is_ok(),
            match &facts.kvm_device {
                Ok(()) => "opens read-write".to_string(),
                Err(why) => why.clone(),
            },
        ));
        if facts.arch == Arch::X86_64 {
            let virt = facts
                .cpu_flags
                .as_ref()
                .and_then(|f| f.iter().find(|f| *f == "vmx" || *f == "svm").cloned());
            checks.push(Check::new(
                "cpu virtualization",
                virt.is_some(),
                match virt {
                    Some(flag) => format!("the CPU shows {flag}"),
                    None => "no vmx/svm flag in /proc/cpuinfo".into(),
                },
            ));
        }
        checks.push(Check::new(
            "/dev/vhost-vsock",
            facts.vhost_vsock,
            if facts.vhost_vsock {
                "present (vmcp uses virtio-serial for now)"
            } else {
                "absent; not needed: the agent channel is virtio-serial"
            },
        ));
    }
    DoctorReport {
        checks,
        can_run_vms: qemu_ok,
    }
}

/// Probes this host.
pub async fn doctor() -> DoctorReport {
    let backend = QemuBackend::new();
    let facts = backend.host_facts();
    let found = match qemu::binary::find(Arch::host()) {
        Ok(path) => match qemu::binary::version(&path, Duration::from_secs(10)).await {
            Ok(v) => Ok((path, v)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e.to_string()),
    };
    let mut report = report_from(&facts, found, qemu::launch_supported());
    for b in crate::vz::native_backends() {
        let (ok, detail) = match b.probe().await {
            Probe::Usable { detail } => (true, detail),
            Probe::Unusable { reason } => (false, reason),
        };
        report.can_run_vms |= ok;
        report.checks.insert(0, Check::new(b.name(), ok, detail));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::HostFacts;

    fn facts() -> HostFacts {
        let mut f = qemu::accel::read_host_facts(HostOs::Linux, Arch::X86_64);
        f.kvm_device = Err("/dev/kvm does not exist".into());
        f.cpu_flags = Some(vec!["fpu".into()]);
        f.vhost_vsock = false;
        f
    }

    #[test]
    fn tcg_only_host() {
        let r = report_from(
            &facts(),
            Ok(("/usr/bin/qemu".into(), "10.0.2".into())),
            Ok(()),
        );
        assert!(r.can_run_vms);
        let text = r.render();
        assert!(
            text.contains("ok   qemu: QEMU 10.0.2 at /usr/bin/qemu"),
            "{text}"
        );
        assert!(
            text.contains("no   accel kvm: /dev/kvm does not exist"),
            "{text}"
        );
        assert!(text.contains("ok   accel tcg"), "{text}");
        assert!(text.contains("no   cpu virtualization"), "{text}");
        assert!(text.contains("no   /dev/vhost-vsock"), "{text}");
    }

    #[test]
    fn kvm_host() {
        let mut f = facts();
        f.kvm_device = Ok(());
        f.cpu_flags = Some(vec!["vmx".into()]);
        f.vhost_vsock = true;
        let r = report_from(&f, Ok(("/q".into(), "9.0.0".into())), Ok(()));
        let text = r.render();
        assert!(text.contains("ok   accel kvm: hardware"), "{text}");
        assert!(
            text.contains("ok   cpu virtualization: the CPU shows vmx"),
            "{text}"
        );
        assert!(text.contains("ok   /dev/vhost-vsock"), "{text}");
    }

    #[test]
    fn no_qemu_means_no_vms() {
        let r = report_from(
            &facts(),
            Err("qemu-system-x86_64 was not found".into()),
            Ok(()),
        );
        assert!(!r.can_run_vms);
        let text = r.render();
        assert!(text.contains("no   qemu: qemu-system-x86_64 was not found"));
        assert!(
            text.contains("no   accel tcg: needs a working QEMU"),
            "{text}"
        );
        let r = report_from(&facts(), Ok(("/q".into(), "1".into())), Err("not here"));
        assert!(!r.can_run_vms);
        assert!(r.render().contains("no   qemu backend: not here"));
    }

    #[test]
    fn other_oses_list_their_accelerators() {
        let mut f = facts();
        f.os = HostOs::MacOs;
        let text = report_from(&f, Ok(("/q".into(), "1".into())), Ok(())).render();
        assert!(
            text.contains("accel hvf") && !text.contains("/dev/kvm"),
            "{text}"
        );
        f.os = HostOs::Windows;
        let text = report_from(&f, Ok(("/q".into(), "1".into())), Ok(())).render();
        assert!(text.contains("accel whpx"), "{text}");
    }

    #[tokio::test]
    async fn doctor_and_default_backend_run_here() {
        let r = doctor().await;
        assert!(!r.checks.is_empty());
        match default_backend().await {
            Ok(b) => {
                assert!(r.can_run_vms);
                assert_eq!(b.name(), "qemu");
            }
            Err(e) => {
                assert!(!r.can_run_vms);
                assert!(e.to_string().contains("qemu"), "{e}");
            }
        }
        assert_eq!(backends().len(), 1);
    }
}

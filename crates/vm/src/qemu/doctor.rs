//! The QEMU backend's section of `vmcp doctor`: which host facts decide whether QEMU runs VMs
//! here and how fast, with the fix for each missing piece. The check lists are pure functions
//! of gathered facts, so every combination is tested on any host; Windows hosts get theirs
//! from [`super::host_windows::doctor`].

use std::path::PathBuf;
use std::time::Duration;

use super::accel::HostFacts;
use super::cmdline::HostOs;
use super::{binary, host_windows, platform, QemuBackend};
use crate::select::{Check, Section};
use crate::{Accel, Arch};

/// The section for this host.
pub async fn section(backend: &QemuBackend) -> Section {
    if let Err(why) = platform::LAUNCH_SUPPORTED {
        return Section::new("QEMU backend", vec![Check::new("qemu backend", false, why)]);
    }
    match platform::host_os() {
        HostOs::Windows => Section::new(
            "Windows host (QEMU backend)",
            host_windows::doctor_checks().await,
        ),
        HostOs::Linux | HostOs::MacOs => {
            let found = match binary::find(Arch::host()) {
                Ok(path) => match binary::version(&path, Duration::from_secs(10)).await {
                    Ok(v) => Ok((path, v)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.to_string()),
            };
            Section::new("QEMU backend", unix_checks(&backend.host_facts(), found))
        }
    }
}

/// The checks of a Linux host from its facts and the QEMU found (path and version, or why
/// not).
pub fn unix_checks(facts: &HostFacts, qemu_found: Result<(PathBuf, String), String>) -> Vec<Check> {
    let mut checks = Vec::new();
    let qemu_ok = qemu_found.is_ok();
    match &qemu_found {
        Ok((path, version)) => checks.push(Check::new(
            "qemu",
            true,
            format!("QEMU {version} at {}", path.display()),
        )),
        Err(why) => {
            checks.push(Check::new("qemu", false, why.clone()).with_fix(
                "install QEMU (Debian: apt-get install qemu-system-x86), or set $VMCP_QEMU",
            ))
        }
    }
    for a in [Accel::Kvm, Accel::Tcg] {
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
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        let mut f = super::super::accel::read_host_facts(HostOs::Linux, Arch::X86_64);
        f.kvm_device = Err("/dev/kvm does not exist".into());
        f.cpu_flags = Some(vec!["fpu".into()]);
        f.vhost_vsock = false;
        f
    }

    fn render(checks: &[Check]) -> String {
        checks
            .iter()
            .map(|c| {
                format!(
                    "{} {}: {}\n",
                    if c.ok { "ok" } else { "no" },
                    c.label,
                    c.detail
                )
            })
            .collect()
    }

    #[test]
    fn tcg_only_host() {
        let text = render(&unix_checks(
            &facts(),
            Ok(("/usr/bin/qemu".into(), "10.0.2".into())),
        ));
        assert!(
            text.contains("ok qemu: QEMU 10.0.2 at /usr/bin/qemu"),
            "{text}"
        );
        assert!(
            text.contains("no accel kvm: /dev/kvm does not exist"),
            "{text}"
        );
        assert!(text.contains("ok accel tcg"), "{text}");
        assert!(text.contains("no cpu virtualization"), "{text}");
        assert!(text.contains("no /dev/vhost-vsock"), "{text}");
    }

    #[test]
    fn kvm_host() {
        let mut f = facts();
        f.kvm_device = Ok(());
        f.cpu_flags = Some(vec!["vmx".into()]);
        f.vhost_vsock = true;
        let text = render(&unix_checks(&f, Ok(("/q".into(), "9.0.0".into()))));
        assert!(text.contains("ok accel kvm: hardware"), "{text}");
        assert!(
            text.contains("ok cpu virtualization: the CPU shows vmx"),
            "{text}"
        );
        assert!(text.contains("ok /dev/vhost-vsock"), "{text}");
    }

    #[test]
    fn no_qemu_says_how_to_get_it() {
        let checks = unix_checks(&facts(), Err("qemu-system-x86_64 was not found".into()));
        let text = render(&checks);
        assert!(text.contains("no qemu: qemu-system-x86_64 was not found"));
        assert!(
            text.contains("no accel tcg: needs a working QEMU"),
            "{text}"
        );
        assert!(checks[0]
            .fix
            .as_deref()
            .is_some_and(|f| f.contains("VMCP_QEMU")));
    }

    #[tokio::test]
    async fn section_runs_here() {
        let s = section(&QemuBackend::new()).await;
        assert!(!s.checks.is_empty());
        assert!(s.title.contains("QEMU"), "{}", s.title);
    }
}

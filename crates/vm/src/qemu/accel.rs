//! Accelerator choice: a pure decision over [`HostFacts`], and a thin reader of those facts.
//!
//! KVM counts as usable only when `/dev/kvm` opens read-write **and** the CPU shows hardware
//! virtualization (`vmx`/`svm` on x86). The second check matters: a nested, software-emulated
//! KVM (as on some cloud hosts) opens fine but hangs a stock kernel. On arm64 the CPU flags
//! say nothing about virtualization, so there `/dev/kvm` alone decides. When nothing
//! hardware-assisted is usable, QEMU's TCG emulation is used and the caller gets a one-line
//! notice saying why.

use std::path::Path;

use super::cmdline::HostOs;
use crate::{Accel, Arch};

/// Facts about the host that decide the accelerator.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostFacts {
    /// Host OS.
    pub os: HostOs,
    /// Host CPU architecture.
    pub arch: Arch,
    /// `Ok` when `/dev/kvm` opens read-write, else why not.
    pub kvm_device: Result<(), String>,
    /// The CPU flags (`/proc/cpuinfo` `flags`), when readable.
    pub cpu_flags: Option<Vec<String>>,
    /// Host CPU frequency in kHz (`cpu MHz` × 1000), when known.
    pub cpu_khz: Option<u64>,
    /// Whether `/dev/vhost-vsock` exists.
    pub vhost_vsock: bool,
    /// `Ok` when macOS Hypervisor.framework is available, else why not.
    pub hvf: Result<(), String>,
    /// `Ok` when the Windows Hypervisor Platform is available, else why not.
    pub whpx: Result<(), String>,
}

/// The chosen accelerator, and a notice for the user when it is a fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// What to pass to QEMU.
    pub accel: Accel,
    /// One line for stderr when emulation was chosen because nothing faster works.
    pub notice: Option<String>,
}

/// A requested accelerator cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("accelerator {accel} is not usable here: {reason} (try --accel tcg)")]
pub struct AccelError {
    /// The accelerator asked for.
    pub accel: Accel,
    /// Why not.
    pub reason: String,
}

impl HostFacts {
    /// Whether `accel` can run a `guest` VM here; `Err` says why not.
    pub fn usable(&self, accel: Accel, guest: Arch) -> Result<(), String> {
        if accel == Accel::Tcg {
            return Ok(());
        }
        if guest != self.arch {
            return Err(format!(
                "a {} guest on a {} host needs emulation",
                guest.as_str(),
                self.arch.as_str()
            ));
        }
        match accel {
            Accel::Tcg => Ok(()),
            Accel::Kvm => {
                if self.os != HostOs::Linux {
                    return Err("KVM exists only on Linux".into());
                }
                self.kvm_device.clone()?;
                if self.arch == Arch::X86_64 {
                    let flags = self
                        .cpu_flags
                        .as_ref()
                        .ok_or("the CPU flags in /proc/cpuinfo cannot be read")?;
                    if !flags.iter().any(|f| f == "vmx" || f == "svm") {
                        return Err("the CPU shows no vmx/svm flag (nested or emulated KVM cannot boot a stock kernel)".into());
                    }
                }
                Ok(())
            }
            Accel::Hvf => {
                if self.os != HostOs::MacOs {
                    return Err("HVF exists only on macOS".into());
                }
                self.hvf.clone()
            }
            Accel::Whpx => {
                if self.os != HostOs::Windows {
                    return Err("WHPX exists only on Windows".into());
                }
                self.whpx.clone()
            }
        }
    }

    /// The hardware accelerator this OS would use.
    pub fn native_accel(&self) -> Accel {
        match self.os {
            HostOs::Linux => Accel::Kvm,
            HostOs::MacOs => Accel::Hvf,
            HostOs::Windows => Accel::Whpx,
        }
    }

    /// Picks the accelerator for a `guest` VM: the requested one if it is usable, else the
    /// OS's hardware accelerator if usable, else TCG with a notice.
    pub fn choose(&self, guest: Arch, requested: Option<Accel>) -> Result<AccelChoice, AccelError> {
        if let Some(accel) = requested {
            return self
                .usable(accel, guest)
                .map(|()| AccelChoice {
                    accel,
                    notice: None,
                })
                .map_err(|reason| AccelError { accel, reason });
        }
        let native = self.native_accel();
        match self.usable(native, guest) {
            Ok(()) => Ok(AccelChoice {
                accel: native,
                notice: None,
            }),
            Err(why) => Ok(AccelChoice {
                accel: Accel::Tcg,
                notice: Some(format!(
                    "using TCG software emulation (slower): {native} is not usable: {why}"
                )),
            }),
        }
    }
}

/// Reads the facts from this host. `os` and `arch` describe the running host.
pub fn read_host_facts(os: HostOs, arch: Arch) -> HostFacts {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok();
    HostFacts {
        os,
        arch,
        kvm_device: if os == HostOs::Linux {
            open_rdwr(Path::new("/dev/kvm"))
        } else {
            Err("not Linux".into())
        },
        cpu_flags: cpuinfo.as_deref().and_then(parse_cpu_flags),
        cpu_khz: cpuinfo.as_deref().and_then(parse_cpu_khz),
        vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
        hvf: Err("not probed by this build".into()),
        whpx: crate::qemu::host_windows::whpx_fact(),
    }
}

fn open_rdwr(path: &Path) -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("{} does not exist", path.display()))
        }
        Err(e) => Err(format!(
            "{} cannot be opened read-write: {e}",
            path.display()
        )),
    }
}

/// The `flags` (x86) or `Features` (arm) of the first CPU in `/proc/cpuinfo`.
pub fn parse_cpu_flags(cpuinfo: &str) -> Option<Vec<String>> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        let key = key.trim();
        (key == "flags" || key == "Features")
            .then(|| value.split_whitespace().map(str::to_string).collect())
    })
}

/// `cpu MHz` of the first CPU, in kHz.
pub fn parse_cpu_khz(cpuinfo: &str) -> Option<u64> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        if key.trim() != "cpu MHz" {
            return None;
        }
        let mhz: f64 = value.trim().parse().ok()?;
        (mhz.is_finite() && mhz > 0.0 && mhz < 1.0e6).then(|| (mhz * 1000.0).round() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(kvm: Result<(), String>, flags: &[&str]) -> HostFacts {
        HostFacts {
            os: HostOs::Linux,
            arch: Arch::X86_64,
            kvm_device: kvm,
            cpu_flags: Some(flags.iter().map(|s| s.to_string()).collect()),
            cpu_khz: Some(2_596_144),
            vhost_vsock: false,
            hvf: Err("no".into()),
            whpx: Err("no".into()),
        }
    }

    #[test]
    fn kvm_needs_device_and_flags() {
        let f = linux(Ok(()), &["fpu", "vmx"]);
        assert_eq!(f.choose(Arch::X86_64, None).unwrap().accel, Accel::Kvm);
        let f = linux(Ok(()), &["fpu", "svm"]);
        assert_eq!(f.choose(Arch::X86_64, None).unwrap().accel, Accel::Kvm);
    }

    #[test]
    fn nested_kvm_without_flags_falls_back_to_tcg_with_notice() {
        let f = linux(Ok(()), &["fpu", "sse2"]);
        let c = f.choose(Arch::X86_64, None).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        let n = c.notice.unwrap();
        assert!(n.contains("vmx/svm") && n.contains("TCG"), "{n}");
        assert!(!n.contains('\n'));
    }

    #[test]
    fn missing_device_falls_back() {
        let f = linux(Err("/dev/kvm does not exist".into()), &["vmx"]);
        let c = f.choose(Arch::X86_64, None).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.notice.unwrap().contains("/dev/kvm does not exist"));
    }

    #[test]
    fn explicit_request_is_checked() {
        let f = linux(Ok(()), &["sse2"]);
        let e = f.choose(Arch::X86_64, Some(Accel::Kvm)).unwrap_err();
        assert_eq!(e.accel, Accel::Kvm);
        assert!(e.to_string().contains("--accel tcg"), "{e}");
        let c = f.choose(Arch::X86_64, Some(Accel::Tcg)).unwrap();
        assert_eq!(
            c,
            AccelChoice {
                accel: Accel::Tcg,
                notice: None
            }
        );
        let e = f.choose(Arch::X86_64, Some(Accel::Hvf)).unwrap_err();
        assert!(e.reason.contains("macOS"));
        let e = f.choose(Arch::X86_64, Some(Accel::Whpx)).unwrap_err();
        assert!(e.reason.contains("Windows"));
    }

    #[test]
    fn foreign_guest_needs_tcg() {
        let f = linux(Ok(()), &["vmx"]);
        let c = f.choose(Arch::Aarch64, None).unwrap();
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.notice.unwrap().contains("aarch64 guest"));
    }

    #[test]
    fn arm_kvm_needs_only_the_device() {
        let mut f = linux(Ok(()), &["fp", "asimd"]);
        f.arch = Arch::Aarch64;
        assert_eq!(f.choose(Arch::Aarch64, None).unwrap().accel, Accel::Kvm);
    }

    #[test]
    fn other_oses_use_their_accelerator() {
        let mut f = linux(Err("not Linux".into()), &[]);
        f.os = HostOs::MacOs;
        assert_eq!(f.choose(Arch::X86_64, None).unwrap().accel, Accel::Tcg);
        f.hvf = Ok(());
        assert_eq!(f.choose(Arch::X86_64, None).unwrap().accel, Accel::Hvf);
        f.os = HostOs::Windows;
        f.whpx = Ok(());
        assert_eq!(f.choose(Arch::X86_64, None).unwrap().accel, Accel::Whpx);
        assert!(f
            .usable(Accel::Kvm, Arch::X86_64)
            .unwrap_err()
            .contains("Linux"));
    }

    #[test]
    fn unreadable_flags_mean_no_kvm() {
        let mut f = linux(Ok(()), &[]);
        f.cpu_flags = None;
        assert!(f
            .usable(Accel::Kvm, Arch::X86_64)
            .unwrap_err()
            .contains("cpuinfo"));
    }

    #[test]
    fn parses_cpuinfo() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu MHz\t\t: 2596.144\nflags\t\t: fpu vme svm sse\n\nprocessor\t: 1\nflags\t\t: other\n";
        assert_eq!(
            parse_cpu_flags(text).unwrap(),
            vec!["fpu", "vme", "svm", "sse"]
        );
        assert_eq!(parse_cpu_khz(text), Some(2_596_144));
        assert_eq!(parse_cpu_khz("cpu MHz : nan\n"), None);
        assert_eq!(parse_cpu_khz("cpu MHz : -3\n"), None);
        assert_eq!(parse_cpu_flags("nothing here"), None);
        let arm = "processor : 0\nFeatures : fp asimd evtstrm\n";
        assert_eq!(
            parse_cpu_flags(arm).unwrap(),
            vec!["fp", "asimd", "evtstrm"]
        );
    }

    #[test]
    fn reader_runs_on_this_host() {
        let f = read_host_facts(HostOs::Linux, Arch::X86_64);
        // Whatever the host, the reader must give a reason when KVM is unusable.
        if let Err(why) = &f.kvm_device {
            assert!(!why.is_empty());
        }
        assert!(open_rdwr(Path::new("/nonexistent/kvm"))
            .unwrap_err()
            .contains("does not exist"));
    }
}

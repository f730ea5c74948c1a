//! VM configuration and its validation.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{ConfigError, VmError};

/// Smallest guest memory vmcp accepts: the initramfs is unpacked into RAM and the kernel needs
/// room of its own.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest vCPU count accepted.
pub const MAX_CPUS: u32 = 64;

/// Guest CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// x86_64.
    X86_64,
    /// arm64.
    Aarch64,
}

impl Arch {
    /// The architecture vmcp itself was built for.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }
    /// The name used in target triples and QEMU binaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

/// The guest image crate's name for the same architecture.
impl From<Arch> for vmcp_image::Arch {
    fn from(a: Arch) -> Self {
        match a {
            Arch::X86_64 => vmcp_image::Arch::X86_64,
            Arch::Aarch64 => vmcp_image::Arch::Aarch64,
        }
    }
}

/// An image architecture this crate can run (the image crate may know more).
impl TryFrom<vmcp_image::Arch> for Arch {
    type Error = ConfigError;
    fn try_from(a: vmcp_image::Arch) -> Result<Self, Self::Error> {
        match a {
            vmcp_image::Arch::X86_64 => Ok(Arch::X86_64),
            vmcp_image::Arch::Aarch64 => Ok(Arch::Aarch64),
            other => Err(ConfigError::UnknownArch(other.to_string())),
        }
    }
}

impl FromStr for Arch {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            other => Err(ConfigError::UnknownArch(other.to_string())),
        }
    }
}

/// Hardware accelerator for backends that offer a choice (QEMU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Linux KVM.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
    /// macOS Hypervisor.framework.
    Hvf,
    /// Windows Hypervisor Platform.
    Whpx,
}

impl Accel {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Hvf => "hvf",
            Accel::Whpx => "whpx",
        }
    }
}

impl FromStr for Accel {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "hvf" => Ok(Accel::Hvf),
            "whpx" => Ok(Accel::Whpx),
            other => Err(ConfigError::UnknownAccel(other.to_string())),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM backend, named in [`VmConfig::backend`] (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// QEMU (KVM or TCG on Linux, WHPX or TCG on Windows).
    Qemu,
    /// Apple's Virtualization.framework (macOS).
    Vz,
}

impl BackendKind {
    /// The backend's name (`Backend::name`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Qemu => "qemu",
            BackendKind::Vz => "vz",
        }
    }
}

impl FromStr for BackendKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu" => Ok(BackendKind::Qemu),
            "vz" => Ok(BackendKind::Vz),
            other => Err(ConfigError::UnknownBackend(other.to_string())),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A disk image attached as virtio-block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
}

/// A root filesystem image shared read-only between VMs, with this VM's own writable layer.
///
/// The guest agent mounts `path` read-only, `scratch` read-write, and an overlayfs of the two
/// as `/` of every process (docs/images.md). Many VMs may attach the same `path` at once;
/// `scratch` belongs to one VM and holds exactly what it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageConfig {
    /// The ext4 image, attached read-only.
    pub path: PathBuf,
    /// Its identity (the rootfs cache key, or `path:<file>`), so that a snapshot manifest can
    /// name the image it needs to restore.
    pub id: String,
    /// An ext4 file with room for the writable layer (the overlay's upper and work
    /// directories), attached read-write.
    pub scratch: PathBuf,
    /// Default user and group of processes (the image's `User`); root when `None`.
    pub user: Option<(u32, u32)>,
}

impl ImageConfig {
    /// An image at `path` named `id`, written through `scratch`, run as root.
    pub fn new(
        path: impl Into<PathBuf>,
        id: impl Into<String>,
        scratch: impl Into<PathBuf>,
    ) -> Self {
        ImageConfig {
            path: path.into(),
            id: id.into(),
            scratch: scratch.into(),
            user: None,
        }
    }
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmConfig {
    /// Guest architecture.
    pub arch: Arch,
    /// Virtual CPUs (1..=[`MAX_CPUS`]).
    pub cpus: u32,
    /// Guest memory in MiB (at least [`MIN_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// Kernel image (bzImage on x86_64, uncompressed `Image` on arm64).
    pub kernel: PathBuf,
    /// Initramfs holding the guest agent as `/init`.
    pub initrd: PathBuf,
    /// Extra kernel command-line arguments, appended after vmcp's own.
    pub cmdline_extra: Vec<String>,
    /// Root filesystem image attached as virtio-block and mounted by the agent.
    pub rootfs: Option<DiskConfig>,
    /// Root filesystem image with a per-VM writable layer (instead of `rootfs`).
    pub image: Option<ImageConfig>,
    /// Where the guest console goes; `console.log` in the runtime directory when `None`.
    pub console_log: Option<PathBuf>,
    /// Backend to use; chosen by [`crate::select::select`] when `None`.
    pub backend: Option<BackendKind>,
    /// Accelerator, for backends that offer a choice (QEMU); chosen by the backend when
    /// `None`.
    pub accel: Option<Accel>,
    /// The guest's network: none (default), allow-listed through the egress proxy, or NAT;
    /// plus published ports (see [`crate::net`]).
    pub net: crate::net::NetConfig,
}

impl VmConfig {
    /// A config with defaults (1 vCPU, 256 MiB, host arch) for the given kernel and initrd.
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>) -> Self {
        VmConfig {
            arch: Arch::host(),
            cpus: 1,
            memory_mib: 256,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline_extra: Vec::new(),
            rootfs: None,
            image: None,
            console_log: None,
            backend: None,
            accel: None,
            net: crate::net::NetConfig::default(),
        }
    }

    /// Checks the config; the error names the field and what to do.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(self.cpus).into());
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib).into());
        }
        if self.net.publish.len() > crate::net::MAX_PUBLISH {
            return Err(ConfigError::Network(format!(
                "{} published ports; at most {}",
                self.net.publish.len(),
                crate::net::MAX_PUBLISH
            ))
            .into());
        }
        check_file("kernel", &self.kernel)?;
        check_file("initrd", &self.initrd)?;
        if let Some(disk) = &self.rootfs {
            check_file("rootfs", &disk.path)?;
        }
        if let Some(image) = &self.image {
            if self.rootfs.is_some() {
                return Err(ConfigError::Unsupported(
                    "a VM takes either a rootfs disk or an image, not both".into(),
                )
                .into());
            }
            check_file("image", &image.path)?;
            check_file("image scratch disk", &image.scratch)?;
        }
        if let Some(disk) = &self.rootfs {
            // The agent mounts it as ext4 unless the command line names another type.
            let other_fs = self
                .cmdline_extra
                .iter()
                .any(|a| a.starts_with("vmcp.rootfs_fstype=") && !a.ends_with("=ext4"));
            if !other_fs {
                crate::disk_image::check_ext4(&disk.path).map_err(|problem| {
                    ConfigError::BadRootfs {
                        path: disk.path.clone(),
                        problem,
                    }
                })?;
            }
        }
        for arg in &self.cmdline_extra {
            if arg.is_empty() || arg.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ConfigError::CmdlineArg(arg.clone()).into());
            }
        }
        Ok(())
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), VmError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        }
        .into()),
        Err(source) => Err(ConfigError::Missing {
            what,
            path: path.to_path_buf(),
            source,
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, VmConfig) {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("kernel");
        let i = dir.path().join("initrd");
        std::fs::write(&k, b"k").unwrap();
        std::fs::write(&i, b"i").unwrap();
        (dir, VmConfig::new(k, i))
    }

    #[test]
    fn valid_config_passes() {
        let (_d, c) = files();
        c.validate().unwrap();
    }

    #[test]
    fn zero_cpus_rejected() {
        let (_d, mut c) = files();
        c.cpus = 0;
        let e = vmcp_test_support::error_chain(&c.validate().unwrap_err());
        assert!(e.contains("vCPU"), "{e}");
    }

    #[test]
    fn small_memory_rejected() {
        let (_d, mut c) = files();
        c.memory_mib = 16;
        let e = vmcp_test_support::error_chain(&c.validate().unwrap_err());
        assert!(e.contains("16 MiB"), "{e}");
    }

    #[test]
    fn missing_kernel_rejected() {
        let (_d, mut c) = files();
        c.kernel = "/nonexistent/vmlinuz".into();
        let e = vmcp_test_support::error_chain(&c.validate().unwrap_err());
        assert!(
            e.contains("kernel") && e.contains("/nonexistent/vmlinuz"),
            "{e}"
        );
    }

    #[test]
    fn directory_rootfs_rejected() {
        let (d, mut c) = files();
        c.rootfs = Some(DiskConfig {
            path: d.path().to_path_buf(),
            read_only: true,
        });
        let e = vmcp_test_support::error_chain(&c.validate().unwrap_err());
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn non_ext4_rootfs_rejected_on_the_host() {
        let (d, mut c) = files();
        let passwd = d.path().join("passwd");
        std::fs::write(&passwd, "root:x:0:0:root:/root:/bin/sh\n".repeat(100)).unwrap();
        c.rootfs = Some(DiskConfig {
            path: passwd.clone(),
            read_only: true,
        });
        let e = vmcp_test_support::error_chain(&c.validate().unwrap_err());
        assert!(
            e.contains("not an ext4 image") && e.contains(&passwd.display().to_string()),
            "{e}"
        );
        // Another filesystem type named on the command line is left to the guest.
        c.cmdline_extra = vec!["vmcp.rootfs_fstype=squashfs".into()];
        c.validate().unwrap();
    }

    #[test]
    fn image_and_rootfs_exclude_each_other() {
        let (d, mut c) = files();
        let img = d.path().join("img");
        std::fs::write(&img, b"x").unwrap();
        c.image = Some(ImageConfig::new(&img, "oci-1", &img));
        c.validate().unwrap();
        c.rootfs = Some(DiskConfig {
            path: img.clone(),
            read_only: true,
        });
        let e = vmcp_test_support::error_chain(&c.validate().unwrap_err());
        assert!(e.contains("not both"), "{e}");
        c.rootfs = None;
        c.image = Some(ImageConfig::new(&img, "oci-1", d.path().join("nope")));
        let e = vmcp_test_support::error_chain(&c.validate().unwrap_err());
        assert!(e.contains("scratch"), "{e}");
    }

    #[test]
    fn bad_cmdline_rejected() {
        let (_d, mut c) = files();
        c.cmdline_extra = vec!["a b".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn parse_accel_and_arch() {
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert_eq!("whpx".parse::<Accel>().unwrap().to_string(), "whpx");
        assert!("xen"
            .parse::<Accel>()
            .unwrap_err()
            .to_string()
            .contains("xen"));
        assert_eq!("arm64".parse::<Arch>().unwrap(), Arch::Aarch64);
        for a in [Arch::X86_64, Arch::Aarch64] {
            let image: vmcp_image::Arch = a.into();
            assert_eq!(image.name(), a.as_str());
            assert_eq!(Arch::try_from(image).unwrap(), a);
        }
        assert_eq!("vz".parse::<BackendKind>().unwrap(), BackendKind::Vz);
        assert_eq!(BackendKind::Qemu.to_string(), "qemu");
        let e = "xen".parse::<BackendKind>().unwrap_err().to_string();
        assert!(e.contains("xen") && e.contains("qemu"), "{e}");
        assert!("mips".parse::<Arch>().is_err());
    }
}

//! The pinned inputs of the guest image, one table row per architecture.
//!
//! Every input is a Debian package fetched with `apt-get download <name>=<version>` and
//! checked against its sha256 here. To move to a newer kernel: `apt-get download` the new
//! package, take its `sha256sum`, update the row (release, paths) and check that the module
//! order still holds (`vmcp image build` refuses a module whose `depends=` is not loaded
//! before it, unless the kernel has it built in).
//!
//! Choice of kernel (x86_64): Debian's 6.1 cloud kernel from the bookworm point release.
//! Its bzImage is LZ4-compressed and reaches userspace about 0.8 s sooner under TCG than the
//! zstd-compressed 6.12 (see docs/guest.md for the measurement); in exchange its virtio
//! drivers are modules that the agent loads.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Guest CPU architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Arch {
    /// x86-64.
    X86_64,
    /// 64-bit Arm.
    Aarch64,
}

impl Arch {
    /// The architecture of the machine this code runs on, if it is a guest architecture.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// Name as used in paths and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// The musl target triple the agent is built for.
    pub fn musl_triple(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        }
    }

    /// ELF `e_machine` of binaries for this architecture.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An architecture name that is not supported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown architecture {0:?}: expected x86_64 or aarch64")]
pub struct UnknownArch(pub String);

impl FromStr for Arch {
    type Err = UnknownArch;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" | "x86-64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            _ => Err(UnknownArch(s.to_string())),
        }
    }
}

/// A pinned Debian package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebPin {
    /// Package name.
    pub name: &'static str,
    /// Exact version (as `apt-get download name=version` takes it).
    pub version: &'static str,
    /// Debian architecture name (`amd64`, `arm64`).
    pub deb_arch: &'static str,
    /// sha256 of the `.deb` file, lowercase hex.
    pub sha256: &'static str,
}

impl DebPin {
    /// File name of the verified package in the download directory.
    pub fn file_name(&self) -> String {
        format!(
            "{}_{}_{}.deb",
            self.name,
            self.version.replace(':', "%3a"),
            self.deb_arch
        )
    }
}

/// How the kernel file is handed to the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelFormat {
    /// x86 bzImage, used as is.
    BzImage,
    /// Compressed arm64 `Image.gz` that must be gunzipped into a plain `Image` (for VMMs
    /// such as Virtualization.framework that need it uncompressed).
    GzipImage,
    /// arm64 `Image`, plain or gzip-compressed; always written out uncompressed and checked
    /// for the arm64 header (see [`crate::arm64`]).
    Arm64Image,
}

/// Everything pinned for one architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchInputs {
    /// Guest architecture.
    pub arch: Arch,
    /// The kernel package.
    pub kernel: DebPin,
    /// `uname -r` of that kernel.
    pub kernel_release: &'static str,
    /// Path of the kernel image inside the package.
    pub kernel_path: &'static str,
    /// Format of that file.
    pub kernel_format: KernelFormat,
    /// Directory of the modules inside the package.
    pub modules_dir: &'static str,
    /// Modules to ship and load, relative to `modules_dir`, in load order. A `.ko.xz` or
    /// `.ko.zst` is decompressed at build time. Absent files are fine when the kernel has the
    /// driver built in (the build says so).
    pub modules: &'static [&'static str],
    /// The busybox-static package.
    pub busybox: DebPin,
    /// Path of the busybox binary inside it.
    pub busybox_path: &'static str,
}

const BUSYBOX_APPLETS: &str = include_str!("busybox-applets.txt");

/// Applet paths (`usr/bin/awk`, ...) of the pinned busybox, linked to `/bin/busybox`.
pub fn busybox_applets() -> impl Iterator<Item = &'static str> {
    BUSYBOX_APPLETS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
}

/// The pinned inputs, one row per architecture. Keep all per-arch knowledge here.
pub const INPUTS: &[ArchInputs] = &[
    ArchInputs {
        arch: Arch::X86_64,
        kernel: DebPin {
            name: "linux-image-6.1.0-50-cloud-amd64",
            version: "6.1.176-1",
            deb_arch: "amd64",
            sha256: "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791",
        },
        kernel_release: "6.1.0-50-cloud-amd64",
        kernel_path: "boot/vmlinuz-6.1.0-50-cloud-amd64",
        kernel_format: KernelFormat::BzImage,
        modules_dir: "lib/modules/6.1.0-50-cloud-amd64",
        modules: &[
            "kernel/drivers/virtio/virtio.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
            "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
            "kernel/drivers/virtio/virtio_pci.ko",
            "kernel/drivers/virtio/virtio_mmio.ko",
            "kernel/drivers/char/virtio_console.ko",
            "kernel/drivers/firmware/qemu_fw_cfg.ko",
            "kernel/net/core/failover.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/block/virtio_blk.ko",
            // `vmcp run --image`: overlayfs over the read-only image (ext4 is built in).
            "kernel/fs/overlayfs/overlay.ko",
            "kernel/net/vmw_vsock/vsock.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
        ],
        busybox: DebPin {
            name: "busybox-static",
            version: "1:1.35.0-4+deb12u1+b1",
            deb_arch: "amd64",
            sha256: "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
        },
        busybox_path: "bin/busybox",
    },
    // arm64 (Virtualization.framework on Apple Silicon; QEMU `virt`): the same Debian 6.1 cloud
    // kernel release as x86_64. Its vmlinuz is a plain `Image` (EFI stub, no compression), which
    // the framework needs. The module list is the x86_64 one plus virtio-rng for the framework's
    // entropy device.
    ArchInputs {
        arch: Arch::Aarch64,
        kernel: DebPin {
            name: "linux-image-6.1.0-50-cloud-arm64",
            version: "6.1.176-1",
            deb_arch: "arm64",
            sha256: "9d41a53f5d687ae1a33cf546d0ed8be955f72e5f9e97b2b4e45e41dff3353b97",
        },
        kernel_release: "6.1.0-50-cloud-arm64",
        kernel_path: "boot/vmlinuz-6.1.0-50-cloud-arm64",
        kernel_format: KernelFormat::Arm64Image,
        modules_dir: "lib/modules/6.1.0-50-cloud-arm64",
        modules: &[
            "kernel/drivers/virtio/virtio.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
            "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
            "kernel/drivers/virtio/virtio_pci.ko",
            "kernel/drivers/virtio/virtio_mmio.ko",
            "kernel/drivers/char/virtio_console.ko",
            "kernel/net/core/failover.ko",
            "kernel/drivers/net/net_failover.ko",
            "kernel/drivers/net/virtio_net.ko",
            "kernel/drivers/block/virtio_blk.ko",
            "kernel/net/vmw_vsock/vsock.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "kernel/drivers/char/hw_random/virtio-rng.ko",
        ],
        busybox: DebPin {
            name: "busybox-static",
            version: "1:1.35.0-4+deb12u1+b1",
            deb_arch: "arm64",
            sha256: "732c9135564fc71337e0e05fb4da4d11e6c28c1834bce3e405e575afef2a52f5",
        },
        busybox_path: "bin/busybox",
    },
];

/// Errors looking up the inputs of an architecture.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// No row for this architecture yet.
    #[error("no pinned guest inputs for {0} in this build of vmcp (supported: {1})")]
    Unsupported(Arch, String),
}

/// The inputs pinned for `arch`.
pub fn inputs(arch: Arch) -> Result<&'static ArchInputs, ManifestError> {
    INPUTS.iter().find(|i| i.arch == arch).ok_or_else(|| {
        let names: Vec<&str> = INPUTS.iter().map(|i| i.arch.name()).collect();
        ManifestError::Unsupported(arch, names.join(", "))
    })
}

/// Bumped when the image layout changes, so old cache entries are not reused.
pub const LAYOUT_VERSION: u32 = 1;

impl ArchInputs {
    /// A stable text describing every input; its hash names the cache entry.
    pub fn canonical(&self) -> String {
        let mut s = format!(
            "layout {LAYOUT_VERSION}\narch {}\nkernel {} {} {} {}\nrelease {}\npath {} {:?}\nmodules {}\n",
            self.arch,
            self.kernel.name,
            self.kernel.version,
            self.kernel.deb_arch,
            self.kernel.sha256,
            self.kernel_release,
            self.kernel_path,
            self.kernel_format,
            self.modules_dir,
        );
        for m in self.modules {
            s.push_str(&format!("module {m}\n"));
        }
        s.push_str(&format!(
            "busybox {} {} {} {} {}\n",
            self.busybox.name,
            self.busybox.version,
            self.busybox.deb_arch,
            self.busybox.sha256,
            self.busybox_path
        ));
        for a in busybox_applets() {
            s.push_str(&format!("applet {a}\n"));
        }
        s
    }

    /// Cache key of an image built from these inputs and an agent binary with hash
    /// `agent_sha256`: `<arch>-<16 hex digits>`.
    pub fn image_key(&self, agent_sha256: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.canonical().as_bytes());
        h.update(b"agent ");
        h.update(agent_sha256.as_bytes());
        let digest = hex(&h.finalize());
        format!("{}-{}", self.arch, &digest[..16])
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_round_trip() {
        for a in [Arch::X86_64, Arch::Aarch64] {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!("arm64".parse::<Arch>().unwrap(), Arch::Aarch64);
        let err = "riscv64".parse::<Arch>().unwrap_err();
        assert!(err.to_string().contains("riscv64"));
    }

    #[test]
    fn every_row_is_well_formed() {
        for row in INPUTS {
            for pin in [row.kernel, row.busybox] {
                assert_eq!(pin.sha256.len(), 64, "{}", pin.name);
                assert!(pin
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                assert!(!pin.version.is_empty());
            }
            assert!(row.kernel_path.contains(row.kernel_release));
            assert!(row.modules_dir.ends_with(row.kernel_release));
            assert!(row.modules.iter().all(|m| m.contains(".ko")));
            assert_eq!(inputs(row.arch).unwrap(), row);
        }
    }

    #[test]
    fn unsupported_arch_is_a_clear_error() {
        if INPUTS.iter().any(|i| i.arch == Arch::Aarch64) {
            return;
        }
        let err = inputs(Arch::Aarch64).unwrap_err().to_string();
        assert!(err.contains("aarch64") && err.contains("x86_64"), "{err}");
    }

    #[test]
    fn image_key_depends_on_inputs_and_agent() {
        let row = inputs(Arch::X86_64).unwrap();
        let a = row.image_key("aa");
        assert_eq!(a, row.image_key("aa"));
        assert_ne!(a, row.image_key("bb"));
        assert!(a.starts_with("x86_64-") && a.len() == "x86_64-".len() + 16);
        let mut other = *row;
        other.modules = &["kernel/x.ko"];
        assert_ne!(other.image_key("aa"), a);
    }

    #[test]
    fn busybox_applets_include_a_shell() {
        let applets: Vec<_> = busybox_applets().collect();
        assert!(applets.contains(&"bin/sh"));
        assert!(applets.len() > 100);
        assert!(applets
            .iter()
            .all(|a| !a.starts_with('/') && !a.contains("..")));
    }

    #[test]
    fn deb_file_name_escapes_epoch() {
        let row = inputs(Arch::X86_64).unwrap();
        assert_eq!(
            row.busybox.file_name(),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(hex(&[0x00, 0xff, 0x1a]), "00ff1a");
    }
}

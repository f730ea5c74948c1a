//! [`VmConfig`] → [`VzPlan`]: everything the Virtualization.framework configuration will hold,
//! decided and checked in plain Rust.
//!
//! The plan is pure (it reads at most the kernel's first bytes) so it is compiled and
//! unit-tested on every platform; the Objective-C layer (`objc.rs`, macOS only) copies it into
//! a `VZVirtualMachineConfiguration` field by field and makes no decisions of its own.
//!
//! # Limits
//! The framework publishes its limits as class properties of `VZVirtualMachineConfiguration`
//! (`minimumAllowedCPUCount`, `maximumAllowedCPUCount`, `minimumAllowedMemorySize`,
//! `maximumAllowedMemorySize`). They depend on the Mac, so vmcp does not hard-code them: the
//! macOS layer reads them at run time into [`VzLimits`] (`vmcp doctor` prints them) and the
//! plan checks the config against them, so a bad value is reported before any framework call
//! with the allowed range in the message. Memory must also be a whole number of MiB, which a
//! [`VmConfig`] guarantees.
//!
//! # Devices
//! | device | framework class | guest sees |
//! |---|---|---|
//! | boot | `VZLinuxBootLoader` (kernel, initrd, command line) | — |
//! | agent channel | `VZVirtioSocketDevice`, host listens on [`AGENT_VSOCK_PORT`] | vsock, connects to CID 2 |
//! | console | `VZVirtioConsoleDeviceSerialPortConfiguration` → log file | `/dev/hvc0` |
//! | entropy | `VZVirtioEntropyDeviceConfiguration` | virtio-rng |
//! | rootfs (optional) | `VZVirtioBlockDeviceConfiguration` + disk image (ro/rw) | `/dev/vda` |
//! | network (only with `network: true`) | `VZVirtioNetworkDeviceConfiguration` + NAT | `eth0` |
//!
//! # Guest contract
//! The kernel command line carries `vmcp.token=<token>` and `vmcp.channel=vsock:<port>`. For
//! `vsock:<port>` the guest agent **connects** to the host (CID 2) on that port and sends its
//! hello; the host side listens. When the connection is reset (after a snapshot restore the
//! framework resets every vsock connection) the agent connects again and sends a new hello.

use std::path::{Path, PathBuf};

use crate::config::{Arch, VmConfig};

/// vsock port the host listens on for the guest agent.
pub const AGENT_VSOCK_PORT: u32 = 7000;

/// The framework's limits on this Mac (class properties of `VZVirtualMachineConfiguration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VzLimits {
    /// `minimumAllowedCPUCount`.
    pub min_cpus: u32,
    /// `maximumAllowedCPUCount`.
    pub max_cpus: u32,
    /// `minimumAllowedMemorySize`, in bytes.
    pub min_memory_bytes: u64,
    /// `maximumAllowedMemorySize`, in bytes.
    pub max_memory_bytes: u64,
}

/// Why a config cannot become a plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PlanError {
    /// CPU count outside the framework's range.
    #[error("{cpus} vCPUs is outside what Virtualization.framework allows on this Mac: use {min} to {max}")]
    Cpus {
        /// Requested.
        cpus: u32,
        /// `minimumAllowedCPUCount`.
        min: u32,
        /// `maximumAllowedCPUCount`.
        max: u32,
    },
    /// Memory outside the framework's range.
    #[error("{mib} MiB of memory is outside what Virtualization.framework allows on this Mac: use {min_mib} to {max_mib} MiB")]
    Memory {
        /// Requested.
        mib: u32,
        /// Minimum, rounded up to MiB.
        min_mib: u64,
        /// Maximum, rounded down to MiB.
        max_mib: u64,
    },
    /// The framework only runs guests of the host's architecture.
    #[error("Virtualization.framework runs only {host} guests on this Mac, not {guest}: build the {host} image (`vmcp image build --arch {host}`) or use QEMU (`--accel tcg`)")]
    Arch {
        /// Guest architecture asked for.
        guest: &'static str,
        /// Host architecture.
        host: &'static str,
    },
    /// The arm64 kernel is compressed.
    #[error("kernel {path} is {format}-compressed, but Virtualization.framework boots only the uncompressed arm64 `Image`: rebuild it with `vmcp image build --arch aarch64 --force`")]
    CompressedKernel {
        /// Kernel path.
        path: PathBuf,
        /// `gzip`, `zstd`, ...
        format: &'static str,
    },
    /// The arm64 kernel does not carry the arm64 Image magic.
    #[error("kernel {path} is not an arm64 Linux `Image` (no \"ARMd\" magic at offset 56): rebuild it with `vmcp image build --arch aarch64 --force`")]
    NotArm64Image {
        /// Kernel path.
        path: PathBuf,
    },
    /// A token or extra argument would break the command line.
    #[error("kernel command-line argument {0:?} is empty or contains whitespace")]
    CmdlineArg(String),
}

/// A virtio-block disk in the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// Raw image.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
}

/// Everything the framework configuration will hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VzPlan {
    /// `CPUCount`.
    pub cpus: u32,
    /// `memorySize` in bytes.
    pub memory_bytes: u64,
    /// `VZLinuxBootLoader.kernelURL`.
    pub kernel: PathBuf,
    /// `VZLinuxBootLoader.initialRamdiskURL`.
    pub initrd: PathBuf,
    /// `VZLinuxBootLoader.commandLine`.
    pub cmdline: String,
    /// Rootfs as virtio-block, if any.
    pub rootfs: Option<DiskPlan>,
    /// More virtio-block disks after the rootfs, in order (an image and its scratch disk).
    pub disks: Vec<DiskPlan>,
    /// File the virtio console writes to.
    pub console_log: PathBuf,
    /// vsock port the host listens on for the agent.
    pub agent_port: u32,
    /// Attach a NAT network device.
    pub network: bool,
}

/// What the plan builder needs besides the config.
#[derive(Debug, Clone, Copy)]
pub struct PlanInputs<'a> {
    /// Framework limits on this Mac.
    pub limits: VzLimits,
    /// Architecture of this Mac.
    pub host_arch: Arch,
    /// Channel token for `vmcp.token=`.
    pub token: &'a str,
    /// Console log when the config names none.
    pub default_console_log: &'a Path,
    /// The kernel's first bytes (at least 64 for the arm64 header check; fewer skips it).
    pub kernel_head: &'a [u8],
}

/// The framework's base command line: console on the virtio console port, no reboot loop,
/// quiet boot. vmcp's own arguments and the user's extras are appended.
const BASE_CMDLINE: &[&str] = &["console=hvc0", "panic=-1", "quiet"];

/// Builds the plan; the error names the field and the fix.
pub fn plan(config: &VmConfig, inputs: PlanInputs<'_>) -> Result<VzPlan, PlanError> {
    let l = inputs.limits;
    if config.cpus < l.min_cpus || config.cpus > l.max_cpus {
        return Err(PlanError::Cpus {
            cpus: config.cpus,
            min: l.min_cpus,
            max: l.max_cpus,
        });
    }
    let memory_bytes = u64::from(config.memory_mib) * MIB;
    if memory_bytes < l.min_memory_bytes || memory_bytes > l.max_memory_bytes {
        return Err(PlanError::Memory {
            mib: config.memory_mib,
            min_mib: l.min_memory_bytes.div_ceil(MIB),
            max_mib: l.max_memory_bytes / MIB,
        });
    }
    if config.arch != inputs.host_arch {
        return Err(PlanError::Arch {
            guest: config.arch.as_str(),
            host: inputs.host_arch.as_str(),
        });
    }
    if config.arch == Arch::Aarch64 {
        check_arm64_image(&config.kernel, inputs.kernel_head)?;
    }
    let mut extra = Vec::new();
    if let Some(disk) = &config.rootfs {
        // The one virtio-block device is the guest's first disk.
        extra.push("vmcp.rootfs=/dev/vda".to_string());
        extra.push(format!("vmcp.rootfs_ro={}", u8::from(disk.read_only)));
    }
    let mut disks = Vec::new();
    if let Some(image) = &config.image {
        // Validation keeps rootfs and image apart, so the image is the first disk.
        extra.push("vmcp.image=/dev/vda".to_string());
        extra.push("vmcp.scratch=/dev/vdb".to_string());
        if let Some((uid, gid)) = image.user {
            extra.push(format!("vmcp.user={uid}:{gid}"));
        }
        disks.push(DiskPlan {
            path: image.path.clone(),
            read_only: true,
        });
        disks.push(DiskPlan {
            path: image.scratch.clone(),
            read_only: false,
        });
    }
    let first = usize::from(config.rootfs.is_some()) + disks.len();
    for (i, share) in config.shares.iter().enumerate() {
        let mode = if share.writable { "rw" } else { "ro" };
        extra.push(format!(
            "vmcp.share={}:{}:{mode}",
            crate::qemu::cmdline::disk_device(first + i),
            share.guest_path
        ));
        disks.push(DiskPlan {
            path: share.disk.clone(),
            read_only: true,
        });
    }
    extra.extend(config.cmdline_extra.iter().cloned());
    let cmdline = cmdline(inputs.token, AGENT_VSOCK_PORT, &extra)?;
    Ok(VzPlan {
        cpus: config.cpus,
        memory_bytes,
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline,
        rootfs: config.rootfs.as_ref().map(|d| DiskPlan {
            path: d.path.clone(),
            read_only: d.read_only,
        }),
        disks,
        console_log: config
            .console_log
            .clone()
            .unwrap_or_else(|| inputs.default_console_log.to_path_buf()),
        agent_port: AGENT_VSOCK_PORT,
        network: config.net.has_device(),
    })
}

const MIB: u64 = 1024 * 1024;

/// The guest kernel command line: base, then vmcp's channel arguments, then `extra`.
pub fn cmdline(token: &str, port: u32, extra: &[String]) -> Result<String, PlanError> {
    let mut args: Vec<String> = BASE_CMDLINE.iter().map(|s| s.to_string()).collect();
    args.push(format!("vmcp.token={token}"));
    args.push(format!("vmcp.channel=vsock:{port}"));
    args.extend(extra.iter().cloned());
    for a in &args {
        if a.is_empty() || a.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PlanError::CmdlineArg(a.clone()));
        }
    }
    Ok(args.join(" "))
}

/// The value of `key=` on a command line (the last one wins, as in the kernel).
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|a| a.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// Offset of the arm64 Image header's magic (`ARM\x64`, little-endian 0x644d5241).
const ARM64_MAGIC_OFFSET: usize = 56;
const ARM64_MAGIC: &[u8; 4] = b"ARM\x64";

/// Checks that `head` (the kernel's first bytes) is an uncompressed arm64 `Image`. Fewer than
/// 64 bytes skips the check (the framework will then report it).
pub fn check_arm64_image(path: &Path, head: &[u8]) -> Result<(), PlanError> {
    let format = if head.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else {
        None
    };
    if let Some(format) = format {
        return Err(PlanError::CompressedKernel {
            path: path.to_path_buf(),
            format,
        });
    }
    match head.get(ARM64_MAGIC_OFFSET..ARM64_MAGIC_OFFSET + 4) {
        Some(m) if m == ARM64_MAGIC => Ok(()),
        Some(_) => Err(PlanError::NotArm64Image {
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    const LIMITS: VzLimits = VzLimits {
        min_cpus: 1,
        max_cpus: 8,
        min_memory_bytes: 128 * MIB,
        max_memory_bytes: 16 * 1024 * MIB,
    };

    fn arm64_head() -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[56..60].copy_from_slice(ARM64_MAGIC);
        h
    }

    fn inputs<'a>(head: &'a [u8], log: &'a Path) -> PlanInputs<'a> {
        PlanInputs {
            limits: LIMITS,
            host_arch: Arch::Aarch64,
            token: "tok123",
            default_console_log: log,
            kernel_head: head,
        }
    }

    fn config() -> VmConfig {
        let mut c = VmConfig::new("/img/Image", "/img/initrd");
        c.arch = Arch::Aarch64;
        c.cpus = 2;
        c.memory_mib = 512;
        c
    }

    #[test]
    fn image_attaches_base_read_only_and_scratch_read_write() {
        let head = arm64_head();
        let log = PathBuf::from("/run/vm/console.log");
        let mut c = config();
        let mut image = crate::ImageConfig::new("/c/rootfs.ext4", "oci-1", "/tmp/scratch");
        image.user = Some((1000, 1000));
        c.image = Some(image);
        let p = plan(&c, inputs(&head, &log)).unwrap();
        assert_eq!(p.rootfs, None);
        assert_eq!(
            p.disks,
            [
                DiskPlan {
                    path: "/c/rootfs.ext4".into(),
                    read_only: true
                },
                DiskPlan {
                    path: "/tmp/scratch".into(),
                    read_only: false
                }
            ]
        );
        assert!(p
            .cmdline
            .ends_with("vmcp.image=/dev/vda vmcp.scratch=/dev/vdb vmcp.user=1000:1000"));
    }

    #[test]
    fn plan_copies_config_and_adds_channel() {
        let head = arm64_head();
        let log = PathBuf::from("/run/vm/console.log");
        let mut c = config();
        c.cmdline_extra = vec!["loglevel=4".into()];
        c.rootfs = Some(DiskConfig {
            path: "/img/root.ext4".into(),
            read_only: true,
        });
        let p = plan(&c, inputs(&head, &log)).unwrap();
        assert_eq!(p.cpus, 2);
        assert_eq!(p.memory_bytes, 512 * MIB);
        assert_eq!(p.kernel, PathBuf::from("/img/Image"));
        assert_eq!(p.initrd, PathBuf::from("/img/initrd"));
        assert_eq!(p.console_log, log);
        assert_eq!(p.agent_port, AGENT_VSOCK_PORT);
        assert!(!p.network);
        assert_eq!(
            p.rootfs,
            Some(DiskPlan {
                path: "/img/root.ext4".into(),
                read_only: true
            })
        );
        assert_eq!(
            p.cmdline,
            "console=hvc0 panic=-1 quiet vmcp.token=tok123 vmcp.channel=vsock:7000 \
             vmcp.rootfs=/dev/vda vmcp.rootfs_ro=1 loglevel=4"
        );
        assert_eq!(cmdline_value(&p.cmdline, "vmcp.token"), Some("tok123"));
        assert_eq!(
            cmdline_value(&p.cmdline, "vmcp.channel"),
            Some("vsock:7000")
        );
    }

    #[test]
    fn explicit_console_log_and_network_kept() {
        let head = arm64_head();
        let log = PathBuf::from("/default.log");
        let mut c = config();
        c.console_log = Some("/tmp/mine.log".into());
        c.net.mode = crate::net::NetMode::Nat;
        c.rootfs = Some(DiskConfig {
            path: "/img/rw.ext4".into(),
            read_only: false,
        });
        let p = plan(&c, inputs(&head, &log)).unwrap();
        assert_eq!(p.console_log, PathBuf::from("/tmp/mine.log"));
        assert!(p.network);
        assert_eq!(cmdline_value(&p.cmdline, "vmcp.proxy"), None);
        assert_eq!(cmdline_value(&p.cmdline, "vmcp.rootfs_ro"), Some("0"));
        assert!(!p.cmdline.contains(
            "vmcp.token=tok123 vmcp.channel=vsock:7000 vmcp.rootfs=/dev/vda vmcp.rootfs_ro=1"
        ));
    }

    #[test]
    fn cpu_and_memory_limits_enforced_with_range_in_message() {
        let head = arm64_head();
        let log = PathBuf::from("/l");
        let mut c = config();
        c.cpus = 9;
        let e = plan(&c, inputs(&head, &log)).unwrap_err();
        assert_eq!(
            e,
            PlanError::Cpus {
                cpus: 9,
                min: 1,
                max: 8
            }
        );
        assert!(e.to_string().contains("use 1 to 8"), "{e}");

        let mut c = config();
        c.memory_mib = 64;
        let e = plan(&c, inputs(&head, &log)).unwrap_err();
        assert!(e.to_string().contains("use 128 to 16384 MiB"), "{e}");
        c.memory_mib = 128;
        plan(&c, inputs(&head, &log)).unwrap();
        c.memory_mib = 16 * 1024;
        plan(&c, inputs(&head, &log)).unwrap();
        c.memory_mib = 16 * 1024 + 1;
        assert!(matches!(
            plan(&c, inputs(&head, &log)),
            Err(PlanError::Memory { .. })
        ));
    }

    #[test]
    fn odd_byte_limits_round_inwards_in_message() {
        let head = arm64_head();
        let log = PathBuf::from("/l");
        let mut i = inputs(&head, &log);
        i.limits.min_memory_bytes = 100 * MIB + 1;
        i.limits.max_memory_bytes = 200 * MIB - 1;
        let mut c = config();
        c.memory_mib = 100;
        let e = plan(&c, i).unwrap_err();
        assert_eq!(
            e,
            PlanError::Memory {
                mib: 100,
                min_mib: 101,
                max_mib: 199
            }
        );
    }

    #[test]
    fn foreign_arch_rejected() {
        let head = arm64_head();
        let log = PathBuf::from("/l");
        let mut c = config();
        c.arch = Arch::X86_64;
        let e = plan(&c, inputs(&head, &log)).unwrap_err();
        assert!(
            e.to_string().contains("only aarch64 guests")
                && e.to_string().contains("--arch aarch64"),
            "{e}"
        );
    }

    #[test]
    fn x86_64_host_skips_arm64_header_check() {
        let log = PathBuf::from("/l");
        let mut i = inputs(&[0x1f, 0x8b, 0, 0], &log);
        i.host_arch = Arch::X86_64;
        let mut c = config();
        c.arch = Arch::X86_64;
        plan(&c, i).unwrap();
    }

    #[test]
    fn compressed_or_foreign_kernels_rejected() {
        let p = Path::new("/k");
        for (head, fmt) in [
            (vec![0x1f, 0x8b, 8, 0], "gzip"),
            (vec![0x28, 0xb5, 0x2f, 0xfd], "zstd"),
            (vec![0xfd, b'7', b'z', b'X', b'Z', 0], "xz"),
        ] {
            let e = check_arm64_image(p, &head).unwrap_err();
            assert!(e.to_string().contains(fmt), "{e}");
            assert!(e.to_string().contains("--arch aarch64"), "{e}");
        }
        let e = check_arm64_image(p, &[0u8; 64]).unwrap_err();
        assert_eq!(e, PlanError::NotArm64Image { path: p.into() });
        check_arm64_image(p, &arm64_head()).unwrap();
        // Too short to tell: left to the framework.
        check_arm64_image(p, &[0u8; 10]).unwrap();
    }

    #[test]
    fn bad_cmdline_args_rejected() {
        assert_eq!(
            cmdline("t", 1, &["a b".into()]),
            Err(PlanError::CmdlineArg("a b".into()))
        );
        assert!(cmdline("t", 1, &[String::new()]).is_err());
        assert!(cmdline("to ken", 1, &[]).is_err());
        let head = arm64_head();
        let log = PathBuf::from("/l");
        let mut c = config();
        c.cmdline_extra = vec!["x\ty".into()];
        assert!(matches!(
            plan(&c, inputs(&head, &log)),
            Err(PlanError::CmdlineArg(_))
        ));
    }

    #[test]
    fn cmdline_value_takes_last() {
        assert_eq!(cmdline_value("a=1 b=2 a=3", "a"), Some("3"));
        assert_eq!(cmdline_value("ab=1", "a"), None);
        assert_eq!(cmdline_value("a", "a"), None);
    }
}

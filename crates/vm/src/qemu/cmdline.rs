//! The QEMU command line as a pure function of a [`QemuPlan`].
//!
//! Nothing here touches the host: the plan says which binary, accelerator, host OS flavour,
//! files and channel endpoints to use, and [`QemuPlan::argv`] turns it into arguments. This
//! keeps every platform's command line unit-testable on every platform; the thin OS layers
//! only decide what goes *into* the plan (file descriptors on Linux, named pipes or loopback
//! TCP on Windows).
//!
//! Choices, and why:
//! - `microvm` on x86_64 (no firmware tables to walk, no PCI scan unless asked), `virt` on
//!   arm64. `-nodefaults -no-user-config -display none -no-reboot`: no default devices, no
//!   config files, no window, and a guest reboot ends QEMU instead of looping.
//! - The guest sees: one serial console, one virtio-serial port for the agent, optionally one
//!   virtio-blk disk and a user-mode network card. No other device, no host file sharing.
//! - `-sandbox` (seccomp) only where QEMU supports it (Linux). It denies spawning processes,
//!   except for a VM whose network goes through the egress proxy: QEMU's user-mode network
//!   starts one `vmcp __egress-pipe` per guest connection (`guestfwd=...-cmd:`, which forks,
//!   calls `setsid` and executes it), so there `spawn=allow,elevateprivileges=allow`, with
//!   QEMU under `no_new_privs` (see docs/network.md).
//! - Network (`-netdev user`, QEMU's slirp): none by default; `restrict=on` plus one
//!   `guestfwd` to the egress proxy for allow-listed egress; plain NAT on request;
//!   `hostfwd` for published ports.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::{Accel, Arch};

/// Host operating system the plan is for; decides device and option spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostOs {
    /// Linux (KVM or TCG).
    Linux,
    /// macOS (HVF or TCG).
    MacOs,
    /// Windows (WHPX or TCG).
    Windows,
}

/// How a file reaches QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRef {
    /// By path.
    Path(PathBuf),
    /// An open descriptor inherited by QEMU, opened again through `/dev/fd/N`. Lets an
    /// unprivileged QEMU read a file in a directory only vmcp can enter.
    Fd(i32),
}

impl FileRef {
    fn to_arg(&self) -> OsString {
        match self {
            FileRef::Path(p) => p.clone().into_os_string(),
            FileRef::Fd(fd) => format!("/dev/fd/{fd}").into(),
        }
    }
}

/// Where a disk image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskSource {
    /// By path.
    Path(PathBuf),
    /// Descriptors handed over with `-add-fd` as fd set `set` (QEMU picks the one whose
    /// access mode fits; read-write disks need a read-only and a read-write descriptor,
    /// since QEMU opens the image read-only first).
    FdSet {
        /// The fd set number.
        set: u32,
        /// Inherited descriptors in the set.
        fds: Vec<i32>,
    },
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    /// The raw image.
    pub source: DiskSource,
    /// Attach read-only.
    pub read_only: bool,
}

/// One end of a character device (QMP, console, agent channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// An already connected stream socket inherited by QEMU (a socketpair end). No path in the
    /// file system, so nothing else on the host can connect, and nothing is left behind.
    Fd(i32),
    /// QEMU connects to a Unix socket that vmcp listens on.
    UnixConnect(PathBuf),
    /// QEMU connects to a TCP address that vmcp listens on (loopback only; Windows).
    TcpConnect(SocketAddr),
    /// QEMU connects to a Windows named pipe vmcp created.
    NamedPipe(String),
}

impl Endpoint {
    fn chardev(&self, id: &str) -> String {
        match self {
            Endpoint::Fd(fd) => format!("socket,id={id},fd={fd}"),
            Endpoint::UnixConnect(p) => {
                format!("socket,id={id},path={}", escape_opt(&p.to_string_lossy()))
            }
            Endpoint::TcpConnect(a) => {
                format!("socket,id={id},host={},port={}", a.ip(), a.port())
            }
            Endpoint::NamedPipe(name) => format!("pipe,id={id},path={}", escape_opt(name)),
        }
    }
}

/// Guest RAM backed by a file instead of anonymous memory: what makes fast snapshots
/// possible (see `qemu/snapshot.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFile {
    /// The file (its size is the guest's memory).
    pub file: FileRef,
    /// `true`: mapped shared, guest writes land in the file (a VM whose memory becomes a
    /// snapshot). `false`: opened read-only and mapped copy-on-write, the guest's writes stay
    /// private to this QEMU (a VM restored from a snapshot; many share the file's pages).
    pub shared: bool,
}

/// How virtio devices are attached to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VirtioTransport {
    /// virtio-mmio (`virtio-*-device`): no PCI bus to scan; the kernel must have
    /// `virtio_mmio`.
    Mmio,
    /// virtio-pci (`virtio-*-pci`); on x86 `microvm` this turns on its PCIe host bridge.
    Pci,
}

/// Everything that decides one QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QemuPlan {
    /// QEMU binary (argv\[0\]).
    pub binary: PathBuf,
    /// Guest architecture.
    pub arch: Arch,
    /// Accelerator.
    pub accel: Accel,
    /// Host OS flavour.
    pub host: HostOs,
    /// vCPUs.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Kernel image.
    pub kernel: FileRef,
    /// Initramfs.
    pub initrd: FileRef,
    /// Full kernel command line (see [`KernelArgs`]).
    pub append: String,
    /// Root filesystem disk.
    pub rootfs: Option<DiskPlan>,
    /// More virtio-blk disks, attached after `rootfs` in this order (an image and its
    /// scratch disk).
    pub disks: Vec<DiskPlan>,
    /// QMP control channel.
    pub qmp: Endpoint,
    /// Serial console.
    pub console: Endpoint,
    /// Guest agent channel (a virtio-serial port).
    pub agent: Endpoint,
    /// Name of the agent's virtio-serial port (`/dev/virtio-ports/<name>` in the guest).
    pub agent_port: String,
    /// virtio transport.
    pub virtio: VirtioTransport,
    /// A user-mode network card, if any.
    pub network: Option<NetPlan>,
    /// Turn on QEMU's seccomp sandbox.
    pub sandbox: bool,
    /// Guest RAM from a file; `None`: anonymous memory.
    pub memory: Option<MemoryFile>,
    /// The agent token as a file QEMU reads once at start and offers the guest as fw_cfg
    /// `opt/vmcp/token` (see [`KernelArgs::token_in_fw_cfg`]).
    pub token_file: Option<FileRef>,
    /// Restore instead of boot: no kernel, initrd or command line (the guest's memory comes
    /// from a snapshot), and `-incoming defer` (the state is loaded over QMP).
    pub incoming: bool,
}

/// The user-mode network card of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NetPlan {
    /// `restrict=on`: the guest reaches nothing but `guestfwd`, and only published ports
    /// reach it.
    pub restrict: bool,
    /// The one forward out of a restricted network: guest connections to `addr:port` are
    /// handed to a new `command` each (stdin/stdout are the connection).
    pub guestfwd: Option<GuestForward>,
    /// Published ports.
    pub hostfwd: Vec<crate::net::PortForward>,
}

/// A `guestfwd` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestForward {
    /// Guest-side address.
    pub addr: std::net::Ipv4Addr,
    /// Guest-side port.
    pub port: u16,
    /// Program and arguments (each quoted for QEMU's shell-style split).
    pub command: Vec<String>,
}

impl NetPlan {
    /// The `-netdev` value.
    pub fn netdev(&self) -> String {
        let mut s = String::from("user,id=net0");
        if self.restrict {
            s.push_str(",restrict=on");
        }
        if let Some(g) = &self.guestfwd {
            let cmd: Vec<String> = g.command.iter().map(|a| shell_quote(a)).collect();
            s.push_str(&format!(
                ",guestfwd=tcp:{}:{}-cmd:{}",
                g.addr,
                g.port,
                escape_opt(&cmd.join(" "))
            ));
        }
        for f in &self.hostfwd {
            s.push_str(&format!(
                ",hostfwd=tcp:{}:{}-:{}",
                f.host.ip(),
                f.host.port(),
                f.guest_port
            ));
        }
        s
    }
}

/// Single-quotes `s` for GLib's shell-style argument split (`'` becomes `'\''`).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The `-sandbox` value: deny everything QEMU does not need once it runs.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The `-sandbox` value for a VM whose network spawns a forward helper per connection: QEMU's
/// user-mode network forks, calls `setsid` and executes the helper, so both spawning and the
/// set*id calls must be allowed. QEMU is started with `no_new_privs` (see
/// `platform_linux.rs`), so nothing it executes can gain privileges.
pub const SANDBOX_SPAWN: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny";

/// Default name of the agent's virtio-serial port.
pub const AGENT_PORT: &str = "vmcp.agent";
/// fw_cfg name of the agent token (the guest reads `/sys/firmware/qemu_fw_cfg/by_name/<it>/raw`).
pub const TOKEN_FW_CFG: &str = "opt/vmcp/token";

impl QemuPlan {
    /// Whether the host OS can sandbox QEMU with seccomp.
    pub fn sandbox_supported(host: HostOs) -> bool {
        host == HostOs::Linux
    }

    fn machine(&self) -> String {
        match self.arch {
            Arch::X86_64 => match self.virtio {
                VirtioTransport::Mmio => "microvm".into(),
                VirtioTransport::Pci => "microvm,pcie=on".into(),
            },
            Arch::Aarch64 => match self.accel {
                // GICv3 emulation is fine under TCG; with hardware virtualization let QEMU pick
                // what the host supports.
                Accel::Tcg => "virt,gic-version=3".into(),
                _ => "virt,gic-version=max".into(),
            },
        }
    }

    fn accel_arg(&self) -> String {
        accel_arg(self.accel)
    }

    fn cpu_model(&self) -> Option<&'static str> {
        match (self.arch, self.accel) {
            (_, Accel::Kvm | Accel::Hvf) => Some("host"),
            (Arch::Aarch64, _) => Some("max"),
            (Arch::X86_64, _) => None,
        }
    }

    fn device(&self, kind: &str) -> String {
        let suffix = match self.virtio {
            VirtioTransport::Mmio => "device",
            VirtioTransport::Pci => "pci",
        };
        format!("{kind}-{suffix}")
    }

    /// The full argument vector, `argv[0]` included.
    pub fn argv(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::with_capacity(48);
        let mut push = |s: &str| a.push(s.into());
        push("-accel");
        push(&self.accel_arg());
        push("-M");
        match &self.memory {
            Some(_) => push(&format!("{},memory-backend=mem", self.machine())),
            None => push(&self.machine()),
        }
        if let Some(cpu) = self.cpu_model() {
            push("-cpu");
            push(cpu);
        }
        for fixed in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            push(fixed);
        }
        push("-smp");
        push(&self.cpus.to_string());
        push("-m");
        push(&format!("{}M", self.memory_mib));
        if let Some(mem) = &self.memory {
            // A copy-on-write restore opens the file read-only; `rom=off` keeps the memory
            // writable for the guest (QEMU would otherwise make a read-only file a ROM).
            let mode = if mem.shared {
                "share=on"
            } else {
                "share=off,readonly=on,rom=off"
            };
            push("-object");
            push(&format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},{mode}",
                self.memory_mib,
                escape_opt(&mem.file.to_arg().to_string_lossy())
            ));
        }
        if let Some(token) = &self.token_file {
            push("-fw_cfg");
            push(&format!(
                "name={TOKEN_FW_CFG},file={}",
                escape_opt(&token.to_arg().to_string_lossy())
            ));
        }
        if self.sandbox {
            push("-sandbox");
            let spawns = self.network.as_ref().is_some_and(|n| n.guestfwd.is_some());
            push(if spawns { SANDBOX_SPAWN } else { SANDBOX });
        }
        // Control.
        push("-chardev");
        push(&self.qmp.chardev("qmp"));
        push("-mon");
        push("chardev=qmp,mode=control");
        // Console.
        push("-chardev");
        push(&self.console.chardev("console"));
        push("-serial");
        push("chardev:console");
        // Agent channel.
        push("-chardev");
        push(&self.agent.chardev("agent"));
        push("-device");
        push(&self.device("virtio-serial"));
        push("-device");
        push(&format!(
            "virtserialport,chardev=agent,name={}",
            escape_opt(&self.agent_port)
        ));
        let disks = self.rootfs.iter().map(|d| ("rootfs".to_string(), d));
        let extra = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("disk{}", i + 1), d));
        for (id, disk) in disks.chain(extra) {
            let file = match &disk.source {
                DiskSource::Path(p) => escape_opt(&p.to_string_lossy()),
                DiskSource::FdSet { set, fds } => {
                    for fd in fds {
                        push("-add-fd");
                        push(&format!("fd={fd},set={set}"));
                    }
                    format!("/dev/fdset/{set}")
                }
            };
            push("-drive");
            push(&format!(
                "file={file},format=raw,if=none,id={id},read-only={}",
                if disk.read_only { "on" } else { "off" }
            ));
            push("-device");
            push(&format!("{},drive={id}", self.device("virtio-blk")));
        }
        if let Some(net) = &self.network {
            push("-netdev");
            push(&net.netdev());
            push("-device");
            push(&format!("{},netdev=net0", self.device("virtio-net")));
        }
        let mut out = Vec::with_capacity(a.len() + 7);
        out.push(self.binary.clone().into_os_string());
        out.append(&mut a);
        if self.incoming {
            out.push("-incoming".into());
            out.push("defer".into());
            return out;
        }
        out.push("-kernel".into());
        out.push(self.kernel.to_arg());
        out.push("-initrd".into());
        out.push(self.initrd.to_arg());
        out.push("-append".into());
        out.push(self.append.clone().into());
        out
    }
}

/// Doubles commas, QEMU's escape inside `key=value,...` option strings.
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// The kernel command line vmcp passes: speed and console settings, then the agent contract
/// (`vmcp.*`, see `docs/guest.md`), then the caller's extra arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KernelArgs {
    /// Guest architecture (console device name).
    pub arch: Arch,
    /// Accelerator (timer settings differ under emulation).
    pub accel: Accel,
    /// Host TSC frequency in kHz, when known; lets an emulated x86 guest skip calibration.
    pub tsc_khz: Option<u64>,
    /// Channel token the agent must present.
    pub token: String,
    /// The token reaches the guest through QEMU's fw_cfg ([`QemuPlan::token_file`]), not this
    /// command line (which every local user can read in `/proc/<pid>/cmdline`): only
    /// `vmcp.token_fw_cfg=1` is written here.
    pub token_in_fw_cfg: bool,
    /// Agent port name.
    pub agent_port: String,
    /// Guest device of the root filesystem, when one is attached.
    pub rootfs: Option<RootfsArg>,
    /// Guest devices of an image and its scratch disk, when attached.
    pub image: Option<ImageArg>,
    /// Static network configuration of the guest (`vmcp.net`, `vmcp.gw`, `vmcp.dns`).
    pub net: Option<KernelNet>,
    /// The egress proxy every guest process is pointed at (`vmcp.proxy`; allow-list mode
    /// only): on the card's network, or on guest loopback when it travels over the channel.
    pub proxy: Option<std::net::SocketAddrV4>,
    /// Shared host directories (`vmcp.share=<dev>:<path>:<ro|rw>`).
    pub shares: Vec<ShareArg>,
    /// Caller's extra arguments (already validated: no whitespace).
    pub extra: Vec<String>,
}

/// The guest's network settings on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelNet {
    /// Address of the card.
    pub addr: std::net::Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway (NAT only).
    pub gateway: Option<std::net::Ipv4Addr>,
    /// The resolver the guest's `/etc/resolv.conf` names (NAT only).
    pub dns: Option<std::net::Ipv4Addr>,
}

/// The `vmcp.rootfs=` and `vmcp.rootfs_ro=` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsArg {
    /// Guest block device (`/dev/vda`).
    pub device: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// The `vmcp.image=`, `vmcp.scratch=` and `vmcp.user=` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageArg {
    /// Guest block device of the read-only image (`/dev/vda`).
    pub device: String,
    /// Guest block device of the writable layer (`/dev/vdb`).
    pub scratch: String,
    /// Default uid and gid of processes.
    pub user: Option<(u32, u32)>,
}

/// One `vmcp.share=` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareArg {
    /// Guest block device of the share's copy.
    pub device: String,
    /// Guest mount point.
    pub path: String,
    /// Writable (through a guest tmpfs layer).
    pub writable: bool,
}

/// Guest device name of the `n`th virtio-blk disk (0 → `/dev/vda`).
pub fn disk_device(n: usize) -> String {
    let letter = u8::try_from(n)
        .ok()
        .filter(|n| *n < 26)
        .map_or('z', |n| (b'a' + n) as char);
    format!("/dev/vd{letter}")
}

/// Initcalls that cost > 15 ms each under TCG and do nothing vmcp needs (measured, see
/// `qemu-tcg-baseline.md`).
const TCG_INITCALL_BLACKLIST: &str = "bpf_tcp_ca_kfunc_init,load_system_certificate_list,jent_mod_init,bpf_dummy_struct_ops_init,trace_eval_init,init_encrypted,crypto_kdf108_init,bpf_sockmap_iter_init,lockup_detector_check";

impl KernelArgs {
    /// The command line as one string.
    pub fn render(&self) -> String {
        let mut v: Vec<String> = Vec::with_capacity(24 + self.extra.len());
        let console = match self.arch {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        };
        v.push(format!("console={console}"));
        for s in [
            "quiet",
            "panic=-1",
            "mitigations=off",
            "random.trust_cpu=on",
        ] {
            v.push(s.into());
        }
        for s in ["cryptomgr.notests", "audit=0", "nokaslr"] {
            v.push(s.into());
        }
        if self.arch == Arch::X86_64 {
            for s in ["8250.nr_uarts=1", "i8042.noaux", "i8042.nokbd"] {
                v.push(s.into());
            }
            if self.accel == Accel::Tcg {
                if let Some(khz) = self.tsc_khz {
                    // Without a known TSC frequency, PIT calibration under TCG sometimes fails
                    // and hangs the boot; `tsc=reliable` keeps the watchdog from switching to
                    // jiffies later.
                    v.push(format!("tsc_early_khz={khz}"));
                    v.push("tsc=reliable".into());
                    v.push("no_timer_check".into());
                }
                v.push(format!("initcall_blacklist={TCG_INITCALL_BLACKLIST}"));
            }
        }
        if self.token_in_fw_cfg {
            v.push("vmcp.token_fw_cfg=1".into());
        } else {
            v.push(format!("vmcp.token={}", self.token));
        }
        v.push(format!("vmcp.channel=virtio-serial:{}", self.agent_port));
        if let Some(r) = &self.rootfs {
            v.push(format!("vmcp.rootfs={}", r.device));
            v.push(format!("vmcp.rootfs_ro={}", u8::from(r.read_only)));
        }
        if let Some(i) = &self.image {
            v.push(format!("vmcp.image={}", i.device));
            v.push(format!("vmcp.scratch={}", i.scratch));
            if let Some((uid, gid)) = i.user {
                v.push(format!("vmcp.user={uid}:{gid}"));
            }
        }
        if let Some(n) = &self.net {
            v.push(format!("vmcp.net={}/{}", n.addr, n.prefix));
            if let Some(gw) = n.gateway {
                v.push(format!("vmcp.gw={gw}"));
            }
            if let Some(d) = n.dns {
                v.push(format!("vmcp.dns={d}"));
            }
        }
        if let Some(p) = self.proxy {
            v.push(format!("vmcp.proxy={p}"));
        }
        for s in &self.shares {
            let mode = if s.writable { "rw" } else { "ro" };
            v.push(format!("vmcp.share={}:{}:{mode}", s.device, s.path));
        }
        v.extend(self.extra.iter().cloned());
        v.join(" ")
    }
}

/// The value of QEMU's `-accel` for `accel`. WHPX gets the userspace irqchip: QEMU's
/// in-kernel (Hyper-V) APIC emulation is the part of WHPX that fails most often with Linux
/// guests (unverified on real hardware from here; see docs/windows.md).
pub fn accel_arg(accel: Accel) -> String {
    match accel {
        Accel::Whpx => "whpx,kernel-irqchip=off".into(),
        other => other.as_str().into(),
    }
}

#[cfg(test)]
mod tests;

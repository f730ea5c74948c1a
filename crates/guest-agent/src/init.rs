//! PID-1 duties: early mounts, kernel modules, the root filesystem, the channel, power-off.
//!
//! Boot order, tuned for a fast start under TCG:
//! 1. mount `/proc`, `/sys`, `/dev` (devtmpfs, so device nodes appear without udev);
//! 2. read `/proc/cmdline` (see [`crate::cmdline`]);
//! 3. load the modules of [`crate::MODULES_LIST`] in order (missing or failing ones are
//!    reported on the console and skipped: a module may be built into the kernel). The disk
//!    and vsock modules wait until the channel is open unless this boot needs them first
//!    (a rootfs, a vsock channel), so a disk that is not the rootfs shows up a few
//!    milliseconds after the hello;
//! 4. if `vmcp.rootfs` is set: wait for the device, mount it, move `/dev`, `/proc`, `/sys`
//!    into it (creating a missing mount point; a read-only filesystem without one is a boot
//!    error) and make it `/` (`switch_root` without deleting the initramfs);
//! 5. mount tmpfs on `/tmp`, `/run`, `/dev/shm` and devpts on `/dev/pts`;
//! 6. open the channel (waiting up to [`CHANNEL_WAIT`] for it to appear), send the hello and
//!    serve. If the host closes the channel the agent reopens it and says hello again;
//!    after a power-off request it syncs and powers off.
//!
//! Any fatal error is printed to the console (which the host captures in its log) and the VM
//! powers off, since PID 1 must never exit.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::changes::ChangeRoots;
use crate::cmdline::{
    parse_cmdline, BootConfig, ChannelSpec, CmdlineError, ImageSpec, RootfsSpec, ShareSpec,
};
use crate::serve::{serve, ServeEnd, ServeOptions};
use crate::sys::linux::{
    self as os, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT,
};

/// How long the agent waits for its channel device or vsock listener.
pub const CHANNEL_WAIT: Duration = Duration::from_secs(10);
/// How long the agent waits for the network interface to appear.
pub const NET_WAIT: Duration = Duration::from_secs(5);
/// How long the agent waits for the root filesystem's block device.
pub const ROOTFS_WAIT: Duration = Duration::from_secs(10);

/// Errors that stop the boot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// An early mount failed.
    #[error("cannot mount {what} on {target}")]
    Mount {
        /// Filesystem.
        what: String,
        /// Mount point.
        target: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `/proc/cmdline` could not be read.
    #[error("cannot read /proc/cmdline")]
    ReadCmdline(#[source] io::Error),
    /// The kernel command line is invalid.
    #[error("bad kernel command line")]
    Cmdline(#[from] CmdlineError),
    /// The root filesystem could not be set up.
    #[error("cannot use root filesystem {device}: {reason}")]
    Rootfs {
        /// Device.
        device: String,
        /// What went wrong.
        reason: String,
    },
    /// The token was to come from fw_cfg (`vmcp.token_fw_cfg=1`) and could not be read.
    #[error("cannot read the agent token from {path}")]
    FwCfgToken {
        /// The sysfs file.
        path: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The channel to the host did not come up.
    #[error("cannot open channel {channel}: {reason}")]
    Channel {
        /// Channel spec.
        channel: String,
        /// What went wrong.
        reason: String,
    },
}

/// Entry point of `/init`.
pub fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("vmcp-agent {}", crate::AGENT_VERSION);
        return ExitCode::SUCCESS;
    }
    if std::process::id() != 1 {
        eprintln!(
            "vmcp-agent is the /init of a vmcp guest and only runs as PID 1 inside the VM \
             (`vmcp image build` installs it)"
        );
        return ExitCode::FAILURE;
    }
    if let Err(e) = boot() {
        let mut line = format!("vmcp-agent: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            line.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("{line}; powering off");
    }
    os::sync();
    // A read-write rootfs must be left clean (journal flushed, superblock marked clean), so the
    // next boot may attach the same image read-only. The processes the agent started are gone
    // by now; on the initramfs root this is harmless.
    if let Err(e) = os::mount("none", "/", None, MS_REMOUNT | MS_RDONLY, None) {
        eprintln!("vmcp-agent: cannot remount / read-only before power-off: {e}");
    }
    let err = os::power_off();
    eprintln!("vmcp-agent: power-off failed: {err}");
    // PID 1 must not exit (the kernel would panic); wait for the host to kill the VM.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn mount(
    what: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), InitError> {
    let _ = std::fs::create_dir_all(target);
    os::mount(what, target, Some(fstype), flags, data).map_err(|source| InitError::Mount {
        what: fstype.to_string(),
        target: target.to_string(),
        source,
    })
}

fn mount_early() -> Result<(), InitError> {
    let common = MS_NOSUID | MS_NODEV | MS_NOEXEC;
    mount("proc", "/proc", "proc", common, None)?;
    mount("sysfs", "/sys", "sysfs", common, None)?;
    mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, Some("mode=0755"))
}

/// Mounts that are nice to have; failures (e.g. a read-only rootfs without the mount point)
/// are reported and skipped.
fn mount_late() {
    let nosuid_nodev = MS_NOSUID | MS_NODEV;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 4] = [
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
    ];
    for (what, target, fstype, flags, data) in mounts {
        if let Err(e) = mount(what, target, fstype, flags, Some(data)) {
            eprintln!("vmcp-agent: warning: {e}: {}", source_text(&e));
        }
    }
}

fn source_text(e: &InitError) -> String {
    std::error::Error::source(e).map_or_else(String::new, ToString::to_string)
}

/// Modules that only a disk or a vsock channel needs. Unless this boot needs them before
/// the hello, they load in the background after the channel is open, which keeps ~15 ms of
/// TCG time off the critical path.
const DEFERRABLE: &[&str] = &[
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "overlay",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file)
}

fn needed_before_hello(name: &str, cfg: &BootConfig) -> bool {
    match name {
        "virtio_blk" => cfg.rootfs.is_some() || cfg.image.is_some() || !cfg.shares.is_empty(),
        "overlay" => cfg.image.is_some() || cfg.shares.iter().any(|s| s.writable),
        "failover" | "net_failover" | "virtio_net" => cfg.net.is_some(),
        "qemu_fw_cfg" => cfg.token_fw_cfg,
        n if n.contains("vsock") => matches!(cfg.channel, ChannelSpec::Vsock { .. }),
        n => !DEFERRABLE.contains(&n),
    }
}

/// Where the `qemu_fw_cfg` driver shows the host's `-fw_cfg name=opt/vmcp/token`.
const FW_CFG_TOKEN: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/vmcp/token/raw";
/// Longest token accepted from fw_cfg (the host sends 32 hex digits).
const MAX_TOKEN: u64 = 256;

/// Reads the token the host put in fw_cfg (its driver was loaded before this; the file shows
/// up as the driver probes, so a short wait covers a slow probe under emulation).
fn read_fw_cfg_token() -> Result<String, InitError> {
    use std::io::Read;
    let start = Instant::now();
    loop {
        let read = File::open(FW_CFG_TOKEN).and_then(|f| {
            let mut token = String::new();
            f.take(MAX_TOKEN).read_to_string(&mut token)?;
            Ok(token)
        });
        match read {
            Ok(token) => return Ok(token.trim().to_string()),
            Err(e) if start.elapsed() >= Duration::from_secs(2) => {
                return Err(InitError::FwCfgToken {
                    path: FW_CFG_TOKEN,
                    source: e,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A module file, opened before a root switch can hide the initramfs.
type ModuleFile = (String, io::Result<File>);

/// Reads the module list and splits it into (load now, load later).
fn plan_modules(cfg: &BootConfig) -> (Vec<ModuleFile>, Vec<ModuleFile>) {
    let Ok(list) = std::fs::read_to_string(crate::MODULES_LIST) else {
        return (Vec::new(), Vec::new());
    };
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|p| (p.to_string(), File::open(p)))
        .partition(|(p, _)| needed_before_hello(module_name(p), cfg))
}

fn load_modules(modules: Vec<ModuleFile>, debug: bool) {
    for (path, file) in modules {
        let t = Instant::now();
        let res = file.and_then(|f| os::finit_module(&f));
        match res {
            Ok(_) if debug => eprintln!("vmcp-agent: loaded {path} in {:?}", t.elapsed()),
            Ok(_) => {}
            Err(e) => eprintln!("vmcp-agent: warning: cannot load module {path}: {e}"),
        }
    }
}

/// The first network interface other than loopback (`eth0` on a vmcp guest).
fn first_ethernet() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Brings up loopback and, with `vmcp.net`, the VM's network card with its static address.
/// Failures are reported on the console: the VM still boots, without that network.
fn setup_network(cfg: &BootConfig) {
    if let Err(e) = os::set_up("lo") {
        eprintln!("vmcp-agent: warning: cannot bring up lo: {e}");
    }
    let Some(net) = cfg.net else {
        return;
    };
    let start = Instant::now();
    let name = loop {
        if let Some(n) = first_ethernet() {
            break n;
        }
        if start.elapsed() >= NET_WAIT {
            eprintln!(
                "vmcp-agent: warning: no network interface appeared within {} s (is virtio_net \
                 in the image?)",
                NET_WAIT.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if let Err(e) = os::configure_ipv4(&name, net.addr, net.prefix) {
        eprintln!(
            "vmcp-agent: warning: cannot configure {name} as {}/{}: {e}",
            net.addr, net.prefix
        );
        return;
    }
    if let Some(gw) = net.gateway {
        if let Err(e) = os::add_default_route(gw) {
            eprintln!("vmcp-agent: warning: cannot add a default route via {gw}: {e}");
        }
    }
    if let Some(dns) = net.dns {
        if let Err(e) = write_resolv_conf(std::path::Path::new("/etc"), dns) {
            eprintln!("vmcp-agent: warning: cannot write /etc/resolv.conf (nameserver {dns}): {e}");
        }
    }
    if cfg.debug {
        eprintln!(
            "vmcp-agent: {name} is {}/{} in {:?}",
            net.addr,
            net.prefix,
            start.elapsed()
        );
    }
}

/// Names `dns` as the only resolver in `etc/resolv.conf`, replacing whatever the image had
/// there (often a symlink into a systemd directory that does not exist in a sandbox).
fn write_resolv_conf(etc: &std::path::Path, dns: std::net::Ipv4Addr) -> std::io::Result<()> {
    std::fs::create_dir_all(etc)?;
    let path = etc.join("resolv.conf");
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::write(
        path,
        format!("# written by vmcp-agent (--net nat)\nnameserver {dns}\n"),
    )
}

fn wait_for(path: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

fn switch_root(spec: &RootfsSpec) -> Result<(), InitError> {
    let fail = |reason: String| InitError::Rootfs {
        device: spec.device.clone(),
        reason,
    };
    if !wait_for(&spec.device, ROOTFS_WAIT) {
        return Err(fail(format!(
            "the device did not appear within {} s (is the disk attached?)",
            ROOTFS_WAIT.as_secs()
        )));
    }
    let newroot = "/newroot";
    let _ = std::fs::create_dir_all(newroot);
    let flags = if spec.read_only { MS_RDONLY } else { 0 };
    os::mount(&spec.device, newroot, Some(&spec.fstype), flags, None)
        .map_err(|e| fail(format!("mount as {} failed: {e}", spec.fstype)))?;
    enter_root(newroot, &spec.device)
}

/// Moves `/dev`, `/proc`, `/sys` into the filesystem mounted at `newroot` and makes it `/`.
fn enter_root(newroot: &str, device: &str) -> Result<(), InitError> {
    let fail = |reason: String| InitError::Rootfs {
        device: device.to_string(),
        reason,
    };
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("{newroot}{m}");
        // Processes need /dev (even /dev/null for their stdin); create what is missing, or
        // refuse a read-only filesystem that lacks it rather than fail every exec later.
        if !Path::new(&target).is_dir() {
            std::fs::create_dir(&target).map_err(|e| {
                fail(format!(
                    "it has no {m} directory and it cannot be created ({e}): add {m} to the image"
                ))
            })?;
        }
        os::mount(m, &target, None, MS_MOVE, None)
            .map_err(|e| fail(format!("cannot move {m} into it: {e}")))?;
    }
    std::env::set_current_dir(newroot).map_err(|e| fail(e.to_string()))?;
    os::mount(".", "/", None, MS_MOVE, None)
        .map_err(|e| fail(format!("cannot move it to /: {e}")))?;
    os::chroot(".").map_err(|e| fail(format!("chroot failed: {e}")))
}

/// The layers of an image root, held open: after the switch they are only reachable
/// through these descriptors (`/proc/self/fd/N`).
struct ImageRoot {
    upper: File,
    lower: File,
}

impl ImageRoot {
    fn roots(&self) -> ChangeRoots {
        use std::os::fd::AsRawFd;
        ChangeRoots {
            upper: format!("/proc/self/fd/{}", self.upper.as_raw_fd()).into(),
            lower: format!("/proc/self/fd/{}", self.lower.as_raw_fd()).into(),
        }
    }
}

/// A shared host directory: its ext4 copy mounted read-only at `/shares/<n>/lower` and, for
/// a writable share, a tmpfs at `/shares/<n>/rw` for the overlay's upper and work
/// directories. Mounted in the initramfs before any root switch and held open, so the final
/// mounts at the share's path can name them as `/proc/self/fd/N` afterwards.
struct ShareMount {
    spec: ShareSpec,
    lower: File,
    rw: Option<File>,
}

impl ShareMount {
    fn fd_path(f: &File) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", f.as_raw_fd())
    }

    fn roots(&self) -> Option<ChangeRoots> {
        self.rw.as_ref().map(|rw| ChangeRoots {
            upper: format!("{}/upper", Self::fd_path(rw)).into(),
            lower: Self::fd_path(&self.lower).into(),
        })
    }
}

fn prepare_shares(specs: &[ShareSpec]) -> Result<Vec<ShareMount>, InitError> {
    let mut out = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let fail = |reason: String| InitError::Rootfs {
            device: spec.device.clone(),
            reason: format!("share {}: {reason}", spec.path),
        };
        if !wait_for(&spec.device, ROOTFS_WAIT) {
            return Err(fail(format!(
                "the device did not appear within {} s",
                ROOTFS_WAIT.as_secs()
            )));
        }
        let lower = format!("/shares/{i}/lower");
        std::fs::create_dir_all(&lower).map_err(|e| fail(e.to_string()))?;
        os::mount(
            &spec.device,
            &lower,
            Some("ext4"),
            MS_RDONLY | MS_NODEV,
            None,
        )
        .map_err(|e| fail(format!("mount as ext4 (read-only) failed: {e}")))?;
        let rw = if spec.writable {
            let rw = format!("/shares/{i}/rw");
            std::fs::create_dir_all(&rw).map_err(|e| fail(e.to_string()))?;
            os::mount("tmpfs", &rw, Some("tmpfs"), MS_NODEV, Some("mode=0755"))
                .map_err(|e| fail(format!("tmpfs for its writable layer: {e}")))?;
            for d in ["upper", "work"] {
                std::fs::create_dir(format!("{rw}/{d}")).map_err(|e| fail(e.to_string()))?;
            }
            Some(File::open(&rw).map_err(|e| fail(e.to_string()))?)
        } else {
            None
        };
        let lower = File::open(&lower).map_err(|e| fail(e.to_string()))?;
        out.push(ShareMount {
            spec: spec.clone(),
            lower,
            rw,
        });
    }
    Ok(out)
}

/// Mounts each share at its path in the final root (after the root switch and the tmpfs
/// mounts, so nothing hides them).
fn mount_shares(shares: &[ShareMount]) -> Result<(), InitError> {
    for s in shares {
        let fail = |reason: String| InitError::Rootfs {
            device: s.spec.device.clone(),
            reason: format!("share {}: {reason}", s.spec.path),
        };
        std::fs::create_dir_all(&s.spec.path)
            .map_err(|e| fail(format!("cannot create the mount point: {e}")))?;
        let lower = ShareMount::fd_path(&s.lower);
        match &s.rw {
            None => os::mount(&lower, &s.spec.path, None, libc::MS_BIND, None)
                .map_err(|e| fail(format!("bind mount failed: {e}")))?,
            Some(rw) => {
                let rw = ShareMount::fd_path(rw);
                let opts = format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work");
                os::mount(
                    "overlay",
                    &s.spec.path,
                    Some("overlay"),
                    MS_NODEV,
                    Some(&opts),
                )
                .map_err(|e| fail(format!("overlayfs mount failed: {e}")))?
            }
        }
    }
    Ok(())
}

/// Mounts the image read-only at `/lower`, the writable layer at `/scratch` (its ext4
/// device, or tmpfs), an overlayfs of the two at `/newroot`, and makes that `/`.
fn mount_image(spec: &ImageSpec) -> Result<ImageRoot, InitError> {
    let fail = |reason: String| InitError::Rootfs {
        device: spec.device.clone(),
        reason,
    };
    for dev in std::iter::once(&spec.device).chain(spec.scratch.iter()) {
        if !wait_for(dev, ROOTFS_WAIT) {
            return Err(fail(format!(
                "{dev} did not appear within {} s (is the disk attached?)",
                ROOTFS_WAIT.as_secs()
            )));
        }
    }
    let _ = std::fs::create_dir_all("/lower");
    os::mount(&spec.device, "/lower", Some("ext4"), MS_RDONLY, None)
        .map_err(|e| fail(format!("mount as ext4 (read-only) failed: {e}")))?;
    let _ = std::fs::create_dir_all("/scratch");
    match &spec.scratch {
        // No background zeroing of inode tables: the host made the file sparse and fresh.
        Some(dev) => os::mount(dev, "/scratch", Some("ext4"), 0, Some("noinit_itable"))
            .map_err(|e| fail(format!("mount of the writable layer {dev} failed: {e}")))?,
        None => os::mount("tmpfs", "/scratch", Some("tmpfs"), 0, Some("mode=0755"))
            .map_err(|e| fail(format!("mount of a tmpfs writable layer failed: {e}")))?,
    }
    for d in ["/scratch/upper", "/scratch/work"] {
        std::fs::create_dir_all(d).map_err(|e| fail(format!("cannot create {d}: {e}")))?;
    }
    let newroot = "/newroot";
    let _ = std::fs::create_dir_all(newroot);
    os::mount(
        "overlay",
        newroot,
        Some("overlay"),
        0,
        Some("lowerdir=/lower,upperdir=/scratch/upper,workdir=/scratch/work"),
    )
    .map_err(|e| {
        fail(format!(
            "overlayfs mount failed (is overlay.ko loaded?): {e}"
        ))
    })?;
    let open = |p: &str| File::open(p).map_err(|e| fail(format!("cannot open {p}: {e}")));
    let root = ImageRoot {
        upper: open("/scratch/upper")?,
        lower: open("/lower")?,
    };
    enter_root(newroot, &spec.device)?;
    Ok(root)
}

fn find_virtio_port(name: &str) -> Option<String> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end() == name {
            return Some(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    None
}

fn open_rw(path: &str) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Opens the channel, waiting up to `wait` ([`CHANNEL_WAIT`] at boot) for it to appear.
pub fn open_channel(spec: &ChannelSpec, wait: Duration) -> Result<File, InitError> {
    let fail = |reason: String| InitError::Channel {
        channel: spec.to_string(),
        reason,
    };
    let start = Instant::now();
    let mut last_err;
    loop {
        let res = match spec {
            ChannelSpec::VirtioSerial { name } => match find_virtio_port(name) {
                Some(dev) if Path::new(&dev).exists() => open_rw(&dev),
                Some(dev) => Err(io::Error::other(format!("{dev} has no device node yet"))),
                None => Err(io::Error::other(format!(
                    "no virtio-serial port named {name} (is the virtserialport device there, \
                     and virtio_console loaded?)"
                ))),
            },
            ChannelSpec::Vsock { cid, port } => os::vsock_connect(*cid, *port),
            ChannelSpec::Serial { path } => open_rw(path).and_then(|f| os::set_raw(&f).map(|()| f)),
        };
        match res {
            Ok(f) => return Ok(f),
            Err(e) => last_err = e.to_string(),
        }
        if start.elapsed() >= wait {
            return Err(fail(format!("{last_err} (gave up after {wait:?})")));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn boot() -> Result<(), InitError> {
    mount_early()?;
    let t_mounted = os::boottime_ns();
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(InitError::ReadCmdline)?;
    let mut cfg: BootConfig = parse_cmdline(&cmdline)?;
    for w in &cfg.warnings {
        eprintln!("vmcp-agent: warning: {w}");
    }
    let (now, mut later) = plan_modules(&cfg);
    load_modules(now, cfg.debug);
    if cfg.token_fw_cfg {
        cfg.token = read_fw_cfg_token()?;
    }
    let t_modules = os::boottime_ns();
    let shares = prepare_shares(&cfg.shares)?;
    if let Some(rootfs) = &cfg.rootfs {
        switch_root(rootfs)?;
    }
    let image = cfg.image.as_ref().map(mount_image).transpose()?;
    mount_late();
    mount_shares(&shares)?;
    setup_network(&cfg);
    // Outlives each channel: a re-key's token must be the one of every later hello.
    let token = std::sync::Arc::new(std::sync::Mutex::new(cfg.token.clone()));
    loop {
        let channel = open_channel(&cfg.channel, CHANNEL_WAIT)?;
        if !later.is_empty() {
            let paths = std::mem::take(&mut later);
            let debug = cfg.debug;
            // The host's snapshot store waits until no thread of PID 1 is called `modules`
            // before it saves a guest (crates/cli/src/snapshots.rs, `quiesce`): keep the name.
            let spawned = std::thread::Builder::new()
                .name("modules".into())
                .spawn(move || load_modules(paths, debug));
            if let Err(e) = spawned {
                eprintln!("vmcp-agent: warning: cannot load the remaining modules: {e}");
            }
        }
        let reader = channel.try_clone().map_err(|e| InitError::Channel {
            channel: cfg.channel.to_string(),
            reason: e.to_string(),
        })?;
        let mut hello = crate::hello(&cfg.token, cfg.rootfs.is_some() || image.is_some());
        if image.is_some() {
            hello.capabilities.0 |= vmcp_guest_proto::Capabilities::CHANGES;
        }
        if !shares.is_empty() {
            hello.capabilities.0 |= vmcp_guest_proto::Capabilities::SHARES;
        }
        hello.boot_ns = os::boottime_ns();
        if cfg.debug {
            eprintln!(
                "vmcp-agent: boot_ns mounted={t_mounted} modules={t_modules} hello={}",
                hello.boot_ns
            );
        }
        let mut options = ServeOptions::new(hello);
        options.token = std::sync::Arc::clone(&token);
        options.apply_rekey = Some(apply_rekey);
        options.reap_orphans = true;
        if let Some(proxy) = cfg.proxy {
            options.env.extend(vmcp_guest_proto::proxy_env(proxy));
        }
        options.debug = cfg.debug;
        options.user = cfg.user;
        options.changes = image.as_ref().map(ImageRoot::roots);
        options.shares = shares.iter().map(ShareMount::roots).collect();
        match serve(reader, channel, &options) {
            Ok(ServeEnd::Poweroff) => return Ok(()),
            Ok(_) => {
                if cfg.debug {
                    eprintln!("vmcp-agent: host closed the channel; reopening");
                }
            }
            Err(e) => {
                let cause =
                    std::error::Error::source(&e).map_or_else(String::new, |s| format!(": {s}"));
                eprintln!("vmcp-agent: channel failed: {e}{cause}; reopening");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A restored guest's new identity: the host's entropy mixed in and the CRNG reseeded
/// first (before anything else can draw from it), then the wall clock and the hostname.
/// Returns the boot clock for the new hello.
fn apply_rekey(r: &vmcp_guest_proto::Rekey) -> io::Result<u64> {
    os::add_entropy_and_reseed(&r.entropy)?;
    os::set_realtime(r.unix_time_ns)?;
    if !r.hostname.is_empty() {
        os::set_hostname(&r.hostname)?;
    }
    Ok(os::boottime_ns())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::parse_cmdline;

    #[test]
    fn disk_and_vsock_modules_wait_unless_needed() {
        let plain = parse_cmdline("quiet").unwrap();
        assert_eq!(module_name("/lib/modules/x/virtio_blk.ko"), "virtio_blk");
        assert!(needed_before_hello("virtio_console", &plain));
        assert!(needed_before_hello("virtio_pci", &plain));
        assert!(!needed_before_hello("virtio_blk", &plain));
        assert!(!needed_before_hello("vmw_vsock_virtio_transport", &plain));
        let disk = parse_cmdline("vmcp.rootfs=/dev/vda").unwrap();
        assert!(needed_before_hello("virtio_blk", &disk));
        assert!(!needed_before_hello("vsock", &disk));
        let vsock = parse_cmdline("vmcp.channel=vsock:1024").unwrap();
        assert!(needed_before_hello("vsock", &vsock));
        assert!(needed_before_hello(
            "vmw_vsock_virtio_transport_common",
            &vsock
        ));
        assert!(!needed_before_hello("virtio_blk", &vsock));
        assert!(!needed_before_hello("overlay", &disk));
        let image = parse_cmdline("vmcp.image=/dev/vda vmcp.scratch=/dev/vdb").unwrap();
        assert!(needed_before_hello("overlay", &image));
        assert!(needed_before_hello("virtio_blk", &image));
    }

    #[test]
    fn resolv_conf_replaces_a_dangling_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        std::os::unix::fs::symlink(
            "../run/systemd/resolve/stub-resolv.conf",
            etc.join("resolv.conf"),
        )
        .unwrap();
        write_resolv_conf(&etc, std::net::Ipv4Addr::new(10, 0, 2, 3)).unwrap();
        let text = std::fs::read_to_string(etc.join("resolv.conf")).unwrap();
        assert!(text.ends_with("nameserver 10.0.2.3\n"), "{text}");
        let fresh = dir.path().join("fresh");
        write_resolv_conf(&fresh, std::net::Ipv4Addr::new(10, 0, 2, 3)).unwrap();
        assert!(fresh.join("resolv.conf").is_file());
    }

    #[test]
    fn network_modules_load_first_only_with_a_network() {
        let plain = parse_cmdline("quiet").unwrap();
        let net = parse_cmdline("vmcp.net=10.0.2.15/24").unwrap();
        for m in ["failover", "net_failover", "virtio_net"] {
            assert!(!needed_before_hello(m, &plain), "{m}");
            assert!(needed_before_hello(m, &net), "{m}");
        }
    }

    #[test]
    fn absent_channels_fail_with_a_clear_error_after_the_wait() {
        let wait = Duration::from_millis(50);
        let specs = [
            ChannelSpec::VirtioSerial {
                name: "vmcp.no-such-port".into(),
            },
            ChannelSpec::Serial {
                path: "/nonexistent/tty".into(),
            },
            // Nothing listens on this port (or the host has no vsock at all).
            ChannelSpec::Vsock {
                cid: 2,
                port: 0x7fff_fff3,
            },
        ];
        for spec in specs {
            let t = Instant::now();
            let err = open_channel(&spec, wait).unwrap_err().to_string();
            assert!(t.elapsed() >= wait, "{spec}: gave up too early");
            assert!(
                err.contains(&spec.to_string()) && err.contains("gave up"),
                "{err}"
            );
        }
    }

    #[test]
    fn serial_channel_is_opened_raw() {
        // /dev/ptmx is a terminal any user can open; raw mode must apply to it.
        if !Path::new("/dev/ptmx").exists() {
            vmcp_test_support::skipped!("SKIPPED: no /dev/ptmx");
            return;
        }
        let spec = ChannelSpec::Serial {
            path: "/dev/ptmx".into(),
        };
        let f = open_channel(&spec, Duration::from_millis(50)).unwrap();
        drop(f);
    }
}

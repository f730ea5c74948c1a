//! QEMU backend: KVM or TCG on Linux now; HVF on macOS and WHPX on Windows reuse the same
//! command-line builder with their own OS layer.
//!
//! # Design
//! - [`cmdline`] turns a [`QemuPlan`] into argv as a pure function, and [`accel`] chooses the
//!   accelerator from injected [`HostFacts`]: both are unit-tested on every OS.
//! - The OS layer (`platform_linux.rs`, the only `unsafe` of the backend) spawns QEMU so it
//!   dies with its owner (parent-death signal, own process group, kill on drop), drops to an
//!   unprivileged user when vmcp is root, and hands QEMU pre-opened descriptors.
//! - All three channels to QEMU (QMP, serial console, agent virtio-serial port) are
//!   **socketpairs** made before the spawn; QEMU inherits one end as `-chardev socket,fd=N`.
//!   Compared to a listening socket in the file system this needs no connect/accept race
//!   handling or polling for the socket file, nothing else on the host can connect (the
//!   agent token is a second check), the unprivileged QEMU needs no access to the runtime
//!   directory, and a SIGKILLed vmcp leaves no socket file behind. Kernel, initrd and disk
//!   are also opened by vmcp and inherited.
//! - vmcp reads the console itself into `console.log` and an in-memory tail, which boot
//!   errors quote.
//! - Start = spawn + QMP handshake + `query-status` is `running` (so bad QEMU arguments fail
//!   in [`Vm::start`] with QEMU's own message); ready = the agent's hello with the right token
//!   on the virtio-serial port; graceful shutdown = the agent's poweroff request (the guest
//!   syncs and powers off; `-no-reboot` makes QEMU exit), then SIGKILL after the timeout.
//!
//! # Limits
//! - No vsock channel yet ([`VmCapabilities::vsock`] is false); virtio-serial works everywhere.
//! - Pause/resume are QMP `stop`/`cont`. Snapshots ([`snapshot`]) need the VM's RAM in a
//!   shared file ([`QemuMachine::set_memory_file`]) and work on Linux only.

pub mod accel;
pub mod binary;
pub mod cmdline;
pub mod console;
pub mod doctor;
pub mod host_windows;
pub mod qmp;
pub mod snapshot;
pub mod spawn;

#[cfg(target_os = "linux")]
mod platform_linux;
#[cfg(target_os = "linux")]
use platform_linux as platform;
#[cfg(not(target_os = "linux"))]
mod no_snapshot;
#[cfg(not(any(target_os = "linux", windows)))]
mod platform_unsupported;
#[cfg(not(any(target_os = "linux", windows)))]
use platform_unsupported as platform;
#[cfg(windows)]
mod platform_windows;
#[cfg(windows)]
use platform_windows as platform;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;

pub use accel::{AccelChoice, AccelError, HostFacts};
pub use cmdline::{
    DiskPlan, DiskSource, Endpoint, FileRef, GuestForward, HostOs, ImageArg, KernelArgs, KernelNet,
    MemoryFile, NetPlan, QemuPlan, RootfsArg, ShareArg, VirtioTransport, AGENT_PORT,
};

use crate::agent::AgentStream;
use crate::error::ConfigError;
use crate::lifecycle::{AgentConnect, Exit, LaunchError, Lifecycle, Machine, TAIL_LINES};
use crate::net::{self, NetMode};
use crate::{Arch, Backend, Probe, Vm, VmCapabilities, VmConfig, VmError};

const BACKEND: &str = "qemu";
/// How long QEMU may take to answer on QMP after it was started.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of QEMU's own stderr quoted in errors (before the console lines).
const STDERR_LINES: usize = 10;
/// How long a killed QEMU may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// `Ok` where this build can launch QEMU, else why not.
pub fn launch_supported() -> Result<(), &'static str> {
    platform::LAUNCH_SUPPORTED
}

/// Settings of the QEMU backend that are not per VM.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QemuOptions {
    /// virtio transport the guest kernel supports.
    pub virtio: VirtioTransport,
    /// Run QEMU as an unprivileged user when vmcp is root.
    pub drop_privileges: bool,
    /// Turn on QEMU's seccomp sandbox where supported.
    pub sandbox: bool,
    /// QEMU binary to use instead of searching `$VMCP_QEMU` and `PATH`.
    pub qemu_binary: Option<PathBuf>,
    /// How long QEMU may take to answer on QMP after it was started.
    pub qmp_timeout: Duration,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            virtio: VirtioTransport::Pci,
            drop_privileges: true,
            sandbox: true,
            qemu_binary: None,
            qmp_timeout: QMP_TIMEOUT,
        }
    }
}

/// The QEMU backend.
#[derive(Debug, Clone, Default)]
pub struct QemuBackend {
    options: QemuOptions,
}

impl QemuBackend {
    /// A backend with default options.
    pub fn new() -> Self {
        QemuBackend::default()
    }

    /// A backend with `options`.
    pub fn with_options(options: QemuOptions) -> Self {
        QemuBackend { options }
    }

    /// Facts about this host that decide the accelerator.
    pub fn host_facts(&self) -> HostFacts {
        accel::read_host_facts(platform::host_os(), Arch::host())
    }

    /// The accelerator a VM of `arch` would get, given an optional request.
    pub fn choose_accel(
        &self,
        arch: Arch,
        requested: Option<crate::Accel>,
    ) -> Result<AccelChoice, VmError> {
        self.host_facts()
            .choose(arch, requested)
            .map_err(|e| ConfigError::Unsupported(e.to_string()).into())
    }

    /// Like [`Backend::create`], returning the concrete type (for the QEMU pid and RSS).
    pub async fn create_qemu(&self, mut config: VmConfig) -> Result<QemuVm, VmError> {
        config.validate()?;
        platform::LAUNCH_SUPPORTED.map_err(|reason| VmError::Unavailable {
            backend: BACKEND,
            reason: reason.to_string(),
        })?;
        let facts = self.host_facts();
        adapt_net_to_host(&mut config.net, facts.os);
        let choice = facts
            .choose(config.arch, config.accel)
            .map_err(|e| ConfigError::Unsupported(e.to_string()))?;
        let binary = self.binary(config.arch)?;
        Lifecycle::prepare(&config, |prepared| {
            // The runtime directory was made private, with its owner file, and its stale
            // siblings swept, by `vmcp_host_process::RuntimeDir`.
            let runtime = prepared.dir;
            let console_log = config
                .console_log
                .clone()
                .unwrap_or_else(|| runtime.join("console.log"));
            let drop_to = (self.options.drop_privileges && vmcp_host_process::is_root())
                .then(|| spawn::unprivileged_ids(choice.accel == crate::Accel::Kvm));
            Ok(QemuMachine {
                config: config.clone(),
                binary,
                accel: choice.accel,
                tsc_khz: facts.cpu_khz,
                host: facts.os,
                options: self.options.clone(),
                drop_to,
                console_log,
                log: console::LogFile::default(),
                child: None,
                pid: None,
                qmp: None,
                agent_stream: None,
                console: console::Tail::default(),
                stderr: console::Tail::default(),
                tasks: Vec::new(),
                argv: Vec::new(),
                egress: None,
                memory_file: None,
                ram_in_file: false,
                ram_backend: false,
                runtime: runtime.path().to_path_buf(),
            })
        })
    }

    /// The QEMU binary for `arch`: the configured one, else found in `$VMCP_QEMU` and `PATH`.
    fn binary(&self, arch: Arch) -> Result<PathBuf, VmError> {
        match &self.options.qemu_binary {
            Some(b) => Ok(b.clone()),
            None => binary::find(arch).map_err(|e| VmError::Unavailable {
                backend: BACKEND,
                reason: e.to_string(),
            }),
        }
    }

    /// Probes the binary, its version and the accelerator.
    pub async fn probe_detail(&self, arch: Arch) -> Result<String, String> {
        platform::LAUNCH_SUPPORTED.map_err(str::to_string)?;
        let bin = binary::find(arch).map_err(|e| e.to_string())?;
        let version = binary::version(&bin, Duration::from_secs(10)).await?;
        let choice = self
            .host_facts()
            .choose(arch, None)
            .map_err(|e| e.to_string())?;
        Ok(format!(
            "qemu {version} ({}), accel {}",
            bin.display(),
            choice.accel
        ))
    }
}

#[async_trait]
impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn probe(&self) -> Probe {
        match self.probe_detail(Arch::host()).await {
            Ok(detail) => Probe::Usable { detail },
            Err(reason) => Probe::Unusable { reason },
        }
    }

    /// QEMU fits when it can launch here and its binary is found; the accelerator is the
    /// requested one if usable, else the host's hardware one, else TCG with a notice.
    async fn fit(&self, config: &VmConfig) -> Result<crate::select::Fit, VmError> {
        platform::LAUNCH_SUPPORTED.map_err(|reason| VmError::Unavailable {
            backend: BACKEND,
            reason: reason.to_string(),
        })?;
        self.binary(config.arch)?;
        let choice = self.choose_accel(config.arch, config.accel)?;
        Ok(crate::select::Fit::new(Some(choice.accel), choice.notice))
    }

    async fn checks(&self) -> crate::select::Section {
        doctor::section(self).await
    }

    async fn create(&self, config: VmConfig) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(self.create_qemu(config).await?))
    }
}

/// One QEMU VM: the lifecycle over a [`QemuMachine`]. Dropping it kills QEMU (and its
/// process group), reaps it and removes the runtime directory.
pub type QemuVm = Lifecycle<QemuMachine>;

/// The QEMU process of one VM and its channels. Dropping it kills and reaps QEMU.
pub struct QemuMachine {
    config: VmConfig,
    binary: PathBuf,
    accel: crate::Accel,
    tsc_khz: Option<u64>,
    host: HostOs,
    options: QemuOptions,
    drop_to: Option<platform::Ids>,
    console_log: PathBuf,
    /// The open console log (closed on drop, whatever the capture task does).
    log: console::LogFile,
    child: Option<vmcp_host_process::OwnedChild>,
    pid: Option<u32>,
    qmp: Option<qmp::QmpClient<platform::HostStream>>,
    agent_stream: Option<platform::HostStream>,
    console: console::Tail,
    stderr: console::Tail,
    tasks: Vec<JoinHandle<()>>,
    argv: Vec<OsString>,
    /// Guest RAM in this file, mapped shared, at the next boot (fast saves).
    memory_file: Option<PathBuf>,
    /// The running guest's RAM is `memory_file`, mapped shared (booted with one): a save
    /// copies it; otherwise the RAM goes into the state file.
    ram_in_file: bool,
    /// The running QEMU's RAM is a memory backend (`-M ...,memory-backend=mem`), not the
    /// machine's own anonymous RAM: QEMU's migration names the RAM block after it, so a
    /// restore from a state file that holds the RAM must use the same.
    ram_backend: bool,
    /// The VM's runtime directory (scratch files of a restore).
    runtime: PathBuf,
    /// The egress proxy of an allow-listed network and its loopback port; stopped with QEMU.
    egress: Option<(vmcp_egress::ProxyHandle, u16)>,
}

impl std::fmt::Debug for QemuMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuMachine")
            .field("accel", &self.accel)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// How QEMU starts: a boot, or a restore with the snapshot's memory file mapped
/// copy-on-write (`Some`) or with the RAM in the state file (`None`).
#[derive(Debug, Clone, Copy)]
enum Start<'a> {
    Boot,
    Restore(Option<&'a Path>),
}

/// Descriptors QEMU inherits for one start; closed in vmcp once QEMU has them.
struct Inherited {
    fds: Vec<platform::ChildFd>,
    /// fd sets handed out so far (each disk gets its own).
    disk_sets: u32,
}

impl Inherited {
    /// Keeps `fd` open until QEMU runs; returns how the plan names it (the platform decides:
    /// an inherited descriptor on Linux, a path or loopback address on Windows).
    fn file(&mut self, fd: platform::ChildFd) -> FileRef {
        let r = fd.file_ref();
        self.fds.push(fd);
        r
    }

    fn endpoint(&mut self, fd: platform::ChildFd) -> Endpoint {
        let e = fd.endpoint();
        self.fds.push(fd);
        e
    }

    fn disk(&mut self, fds: Vec<platform::ChildFd>) -> DiskSource {
        self.disk_sets += 1;
        let source = platform::disk_source(self.disk_sets, &fds);
        self.fds.extend(fds);
        source
    }
}

fn host_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Host { what, source }
}

impl QemuMachine {
    /// Puts the guest's RAM in the file `path` (created or truncated, sparse, the VM's
    /// memory size) instead of anonymous memory, which is what lets [`Vm::save_snapshot`]
    /// write only the device state plus a copy of the pages the guest touched. Takes effect
    /// at the next launch. Put the file on a fast file system (tmpfs or the snapshot
    /// store's); it is removed with the VM only if it is inside its runtime directory.
    pub fn set_memory_file(&mut self, path: PathBuf) {
        self.memory_file = Some(path);
    }

    /// QEMU's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The accelerator in use.
    pub fn accel(&self) -> crate::Accel {
        self.accel
    }

    /// The QEMU command line of the last start (empty before).
    pub fn command_line(&self) -> &[OsString] {
        &self.argv
    }

    /// Where the console log goes.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// QEMU's resident set size in KiB, while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        self.pid.and_then(vmcp_host_process::rss_kib)
    }

    /// Runs a QMP command without arguments, bounded by the QMP timeout.
    async fn qmp_command(&mut self, command: &'static str) -> Result<(), VmError> {
        let timeout = self.options.qmp_timeout;
        let qmp_err = |source| VmError::Qmp { command, source };
        let Some(q) = self.qmp.as_mut() else {
            return Err(qmp_err(qmp::QmpError::Closed));
        };
        match tokio::time::timeout(timeout, q.execute(command, None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(qmp_err(e)),
            Err(_) => Err(qmp_err(qmp::QmpError::Timeout(timeout))),
        }
    }

    fn kernel_args(&self, token: &str, token_in_fw_cfg: bool) -> KernelArgs {
        KernelArgs {
            arch: self.config.arch,
            accel: self.accel,
            tsc_khz: self.tsc_khz,
            token: token.to_string(),
            token_in_fw_cfg,
            agent_port: AGENT_PORT.to_string(),
            rootfs: self.config.rootfs.as_ref().map(|d| RootfsArg {
                device: "/dev/vda".into(),
                read_only: d.read_only,
            }),
            // The image and its scratch disk are the first and second disks (no rootfs then).
            image: self.config.image.as_ref().map(|i| ImageArg {
                device: "/dev/vda".into(),
                scratch: "/dev/vdb".into(),
                user: i.user,
            }),
            net: self.config.net.has_device().then(|| {
                let nat = matches!(self.config.net.mode, NetMode::Nat);
                KernelNet {
                    addr: net::GUEST_ADDR,
                    prefix: net::GUEST_PREFIX,
                    gateway: nat.then_some(net::GATEWAY),
                    dns: nat.then_some(net::DNS),
                }
            }),
            proxy: self.config.net.kernel_proxy(),
            // Shares follow the rootfs or the image's two disks.
            shares: {
                let first = if self.config.image.is_some() {
                    2
                } else {
                    usize::from(self.config.rootfs.is_some())
                };
                self.config
                    .shares
                    .iter()
                    .enumerate()
                    .map(|(i, s)| ShareArg {
                        device: cmdline::disk_device(first + i),
                        path: s.guest_path.clone(),
                        writable: s.writable,
                    })
                    .collect()
            },
            extra: self.config.cmdline_extra.clone(),
        }
    }

    /// Starts the VM's egress proxy on host loopback (allow-list mode through the card
    /// only; over the agent channel the lifecycle runs it).
    async fn start_egress(&mut self) -> Result<(), VmError> {
        self.egress = None;
        let NetMode::Allow(policy) = &self.config.net.mode else {
            return Ok(());
        };
        if !self.config.net.card {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(host_err("listen for the egress proxy on 127.0.0.1"))?;
        let port = listener
            .local_addr()
            .map_err(host_err("read the egress proxy's address"))?
            .port();
        let proxy = net::egress_proxy(
            policy,
            self.config.net.gate.as_ref(),
            vmcp_egress::Limits::default().max_connections,
        );
        let handle = proxy.spawn(listener);
        self.egress = Some((handle, port));
        Ok(())
    }

    fn net_plan(&self) -> Result<Option<NetPlan>, VmError> {
        let net = &self.config.net;
        if !net.has_device() {
            return Ok(None);
        }
        let guestfwd = match &self.egress {
            None => None,
            Some((_, port)) => {
                let program = match &net.pipe_program {
                    Some(p) => p.clone(),
                    None => std::env::current_exe()
                        .map_err(host_err("find the vmcp executable for the egress forward"))?,
                };
                Some(GuestForward {
                    addr: net::PROXY_ADDR,
                    port: net::PROXY_PORT,
                    command: vec![
                        program.to_string_lossy().into_owned(),
                        vmcp_egress::pipe::ARG.into(),
                        format!("127.0.0.1:{port}"),
                    ],
                })
            }
        };
        Ok(Some(NetPlan {
            restrict: !matches!(net.mode, NetMode::Nat),
            guestfwd,
            hostfwd: net.publish.clone(),
        }))
    }

    /// Marks QEMU as gone.
    fn reaped(&mut self) {
        self.child = None;
        self.pid = None;
        self.qmp = None;
        self.agent_stream = None;
        self.egress = None;
    }

    /// After QEMU exited with `status`: let the capture tasks drain what QEMU wrote before it
    /// died, and describe the exit.
    async fn exited(&mut self, status: std::io::Result<std::process::ExitStatus>) -> Exit {
        self.reaped();
        for t in &mut self.tasks {
            let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
        }
        Exit::new(match status {
            Ok(s) => format!("QEMU {s}"),
            Err(e) => format!("QEMU status unknown: {e}"),
        })
    }

    async fn kill_now(&mut self) -> Result<(), VmError> {
        if let Some(child) = self.child.as_mut() {
            // Kills QEMU's whole process group, then reaps QEMU.
            child
                .kill_and_wait(REAP_TIMEOUT)
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::TimedOut => VmError::Hypervisor {
                        backend: BACKEND,
                        what: format!("QEMU did not exit within {REAP_TIMEOUT:?} of SIGKILL"),
                    },
                    _ => host_err("reap QEMU")(e),
                })?;
        }
        self.reaped();
        crate::timing::mark("qemu: killed and reaped");
        Ok(())
    }

    fn plan(
        &self,
        token: &str,
        inherited: &mut Inherited,
        start: Start<'_>,
    ) -> Result<(QemuPlan, [platform::HostStream; 3]), VmError> {
        let (kernel, initrd, memory) = match start {
            // A restore whose RAM comes in the state file: anonymous memory, no kernel.
            Start::Restore(None) => (
                FileRef::Path(self.config.kernel.clone()),
                FileRef::Path(self.config.initrd.clone()),
                None,
            ),
            // A restore boots nothing: the guest's memory already holds the kernel.
            Start::Restore(Some(memory)) => {
                let fd = platform::open_for_child(memory, false)
                    .map_err(host_err(format!("open {}", memory.display())))?;
                (
                    FileRef::Path(self.config.kernel.clone()),
                    FileRef::Path(self.config.initrd.clone()),
                    Some(MemoryFile {
                        file: inherited.file(fd),
                        shared: false,
                    }),
                )
            }
            Start::Boot => {
                let kernel = platform::open_for_child(&self.config.kernel, false).map_err(
                    host_err(format!("open kernel {}", self.config.kernel.display())),
                )?;
                let initrd = platform::open_for_child(&self.config.initrd, false).map_err(
                    host_err(format!("open initrd {}", self.config.initrd.display())),
                )?;
                let memory = match &self.memory_file {
                    Some(path) => {
                        let bytes = u64::from(self.config.memory_mib) << 20;
                        let fd = platform::create_memory_file(path, bytes, self.drop_to.as_ref())
                            .map_err(host_err(format!("create {}", path.display())))?;
                        Some(MemoryFile {
                            file: inherited.file(fd),
                            shared: true,
                        })
                    }
                    None => None,
                };
                (inherited.file(kernel), inherited.file(initrd), memory)
            }
        };
        let rootfs = match &self.config.rootfs {
            None => None,
            Some(d) => {
                let what = format!("open rootfs {}", d.path.display());
                let mut fds =
                    vec![platform::open_for_child(&d.path, false).map_err(host_err(&what))?];
                if !d.read_only {
                    fds.push(platform::open_for_child(&d.path, true).map_err(host_err(&what))?);
                }
                Some(DiskPlan {
                    source: inherited.disk(fds),
                    read_only: d.read_only,
                })
            }
        };
        let mut disks = Vec::new();
        if let Some(image) = &self.config.image {
            let what = format!("open image {}", image.path.display());
            let base = platform::open_for_child(&image.path, false).map_err(host_err(&what))?;
            disks.push(DiskPlan {
                source: inherited.disk(vec![base]),
                read_only: true,
            });
            let what = format!("open scratch disk {}", image.scratch.display());
            let fds = vec![
                platform::open_for_child(&image.scratch, false).map_err(host_err(&what))?,
                platform::open_for_child(&image.scratch, true).map_err(host_err(&what))?,
            ];
            disks.push(DiskPlan {
                source: inherited.disk(fds),
                read_only: false,
            });
        }
        for share in &self.config.shares {
            // Always read-only: a writable share writes to a layer in the guest, and the host
            // copies the changes back itself.
            let what = format!("open share disk {}", share.disk.display());
            let fd = platform::open_for_child(&share.disk, false).map_err(host_err(&what))?;
            disks.push(DiskPlan {
                source: inherited.disk(vec![fd]),
                read_only: true,
            });
        }
        let mut endpoint = |name: &str| {
            let (host, child) =
                platform::stream_pair().map_err(host_err(format!("create the {name} channel")))?;
            Ok::<_, VmError>((host, inherited.endpoint(child)))
        };
        let (qmp_host, qmp) = endpoint("QMP")?;
        let (console_host, console) = endpoint("console")?;
        let (agent_host, agent) = endpoint("agent")?;
        // The token goes where only QEMU reads it (fw_cfg from an inherited memfd) where the
        // guest image has the fw_cfg driver (x86_64), else on the kernel command line.
        let token_file = match self.config.arch {
            Arch::X86_64 => platform::token_file(token)
                .map_err(host_err("pass the agent token to QEMU"))?
                .map(|fd| inherited.file(fd)),
            Arch::Aarch64 => None,
        };
        let plan = QemuPlan {
            binary: self.binary.clone(),
            arch: self.config.arch,
            accel: self.accel,
            host: self.host,
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            kernel,
            initrd,
            append: self.kernel_args(token, token_file.is_some()).render(),
            rootfs,
            disks,
            qmp,
            console,
            agent,
            agent_port: AGENT_PORT.to_string(),
            virtio: self.options.virtio,
            network: self.net_plan()?,
            sandbox: self.options.sandbox && QemuPlan::sandbox_supported(self.host),
            memory,
            incoming: matches!(start, Start::Restore(_)),
            token_file,
        };
        Ok((plan, [qmp_host, console_host, agent_host]))
    }
}

#[async_trait]
impl Machine for QemuMachine {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn capabilities(&self) -> VmCapabilities {
        VmCapabilities {
            pause: true,
            snapshot: self.snapshot_support().is_ok(),
            ..VmCapabilities::default()
        }
    }

    /// QEMU's own stderr first (bad arguments, accelerator failures), then the console.
    fn console_tail(&self, lines: usize) -> String {
        let stderr = self.stderr.lines(STDERR_LINES);
        let console = self.console.lines(lines);
        match (stderr.is_empty(), console.is_empty()) {
            (true, true) => "(no console output)".into(),
            (false, true) => stderr,
            (true, false) => console,
            (false, false) => format!("{stderr}\n{console}"),
        }
    }

    /// Start = spawn + QMP handshake + `query-status` is `running`, so bad QEMU arguments fail
    /// here with QEMU's own message.
    async fn launch(&mut self, token: &str) -> Result<(), LaunchError> {
        self.spawn_qemu(token, Start::Boot).await
    }

    /// The same QEMU settings, console log in `prepared`'s runtime directory, and no memory
    /// file: it is only ever restored (its saves carry the RAM in the state file).
    fn sibling(&self, prepared: crate::lifecycle::Prepared<'_>) -> Result<Self, VmError> {
        let mut config = self.config.clone();
        config.console_log = None;
        Ok(QemuMachine {
            config,
            binary: self.binary.clone(),
            accel: self.accel,
            tsc_khz: self.tsc_khz,
            host: self.host,
            options: self.options.clone(),
            drop_to: self.drop_to.clone(),
            console_log: prepared.dir.join("console.log"),
            log: console::LogFile::default(),
            child: None,
            pid: None,
            qmp: None,
            agent_stream: None,
            console: console::Tail::default(),
            stderr: console::Tail::default(),
            tasks: Vec::new(),
            argv: Vec::new(),
            egress: None,
            memory_file: None,
            ram_in_file: false,
            ram_backend: false,
            runtime: prepared.dir.path().to_path_buf(),
        })
    }

    fn agent_stream(&mut self) -> AgentConnect {
        let stream = self.agent_stream.take();
        Box::pin(async move {
            stream
                .map(|s| Box::new(s) as Box<dyn AgentStream>)
                .ok_or(VmError::Hypervisor {
                    backend: BACKEND,
                    what: "the agent channel was already handed out".into(),
                })
        })
    }

    async fn wait_exit(&mut self) -> Exit {
        let Some(child) = self.child.as_mut() else {
            return Exit::new("QEMU is not running");
        };
        let status = child.wait().await;
        self.exited(status).await
    }

    async fn kill(&mut self) -> Result<(), VmError> {
        self.kill_now().await
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        self.qmp_command("stop").await
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.qmp_command("cont").await
    }

    /// Linux only; and the guest's state must be all in its memory: a writable disk (the
    /// rootfs with `--rootfs-rw`, an image's writable layer) is not part of a snapshot, and
    /// restoring a network card onto a new netdev and egress proxy is untested, so VMs with
    /// either are refused.
    fn snapshot_support(&self) -> Result<(), VmError> {
        if self.host != HostOs::Linux {
            return Err(VmError::Unsupported(
                "save or restore a QEMU snapshot on this OS (Linux only so far)",
            ));
        }
        if self.config.rootfs.as_ref().is_some_and(|d| !d.read_only) || self.config.image.is_some()
        {
            return Err(VmError::Unsupported(
                "save, checkpoint or restore a VM with a writable disk (--rootfs-rw, or an \
                 --image's writable layer): the disk is not part of a snapshot",
            ));
        }
        if self.config.net.has_device() {
            return Err(VmError::Unsupported(
                "save, checkpoint or restore a VM with a network card (use --net none, or an \
                 allow-list over the agent channel)",
            ));
        }
        if !self.config.net.publish.is_empty() {
            return Err(VmError::Unsupported(
                "save, checkpoint or restore a VM with published ports (a fork could not have \
                 the same host ports)",
            ));
        }
        Ok(())
    }

    fn channel_net(&self) -> crate::net::ChannelNet {
        self.config.net.channel_net()
    }

    fn egress_stats(&self) -> Option<std::sync::Arc<vmcp_egress::Stats>> {
        self.egress
            .as_ref()
            .map(|(handle, _)| handle.shared_stats())
    }

    /// The saved guest's agent is idle in a read of its virtio-serial port, which stays
    /// connected across the restore: it says nothing until the lifecycle re-keys it.
    fn agent_hello_after_load(&self) -> bool {
        false
    }

    /// Writes the snapshot directory `path`: the device state (QEMU stopped by the
    /// lifecycle) and a sparse copy of the memory file, so the VM can go on running.
    /// A VM whose RAM is not in a shared file (booted without one, or restored) has its
    /// RAM written into the state file instead: slower, and its restores do not share
    /// memory, but every VM can be saved.
    async fn save_state(&mut self, path: &Path) -> Result<(), VmError> {
        let memory = self.memory_file.clone().filter(|_| self.ram_in_file);
        std::fs::create_dir_all(path).map_err(host_err(format!("create {}", path.display())))?;
        let files = snapshot::SnapshotFiles::in_dir(path);
        let state = std::fs::File::create(&files.state)
            .map_err(host_err(format!("create {}", files.state.display())))?;
        let Some(q) = self.qmp.as_mut() else {
            return Err(VmError::Qmp {
                command: "migrate",
                source: qmp::QmpError::Closed,
            });
        };
        snapshot::save(q, &state, false)
            .await
            .map_err(VmError::SnapshotSave)?;
        let Some(memory) = memory else {
            return files
                .mark_ram_in_state(self.ram_backend)
                .map_err(host_err(format!("write {}", files.ram_marker.display())));
        };
        let (from, to) = (memory.clone(), files.memory.clone());
        tokio::task::spawn_blocking(move || platform::copy_sparse(&from, &to))
            .await
            .map_err(|e| host_err("copy the memory file")(std::io::Error::other(e)))?
            .map_err(host_err(format!(
                "copy {} to {}",
                memory.display(),
                files.memory.display()
            )))?;
        platform::seal_memory_file(&files.memory, self.drop_to.as_ref())
            .map_err(host_err(format!("seal {}", files.memory.display())))
    }

    /// QEMU with the snapshot's memory mapped copy-on-write and no kernel; the device state
    /// loaded over QMP; the guest running.
    async fn load_state(&mut self, path: &Path, token: &str) -> Result<(), LaunchError> {
        let files = snapshot::SnapshotFiles::in_dir(path);
        let state = files
            .check(self.config.memory_mib)
            .map_err(VmError::SnapshotRestore)?;
        // RAM in the state file: loaded into memory of the same kind as the saved VM's (a
        // private mapping of an empty file stands for a memory backend); else the memory
        // file mapped copy-on-write.
        let empty = match files.ram_in_state_backend() {
            None => None,
            Some(false) => Some(None),
            Some(true) => {
                let path = self
                    .runtime
                    .join(format!("empty-ram-{:016x}", rand::random::<u64>()));
                let bytes = u64::from(self.config.memory_mib) << 20;
                platform::create_memory_file(&path, bytes, self.drop_to.as_ref())
                    .map_err(host_err(format!("create {}", path.display())))?;
                Some(Some(path))
            }
        };
        let memory = match &empty {
            None => Some(files.memory.as_path()),
            Some(path) => path.as_deref(),
        };
        crate::timing::mark("qemu: snapshot files checked");
        let spawned = self.spawn_qemu(token, Start::Restore(memory)).await;
        if let Some(Some(path)) = &empty {
            // QEMU has it mapped (or failed); the name is not needed any more.
            let _ = std::fs::remove_file(path);
        }
        spawned?;
        tracing::debug!("QEMU answers on QMP; loading the device state");
        let (Some(q), Some(child)) = (self.qmp.as_mut(), self.child.as_mut()) else {
            return Err(LaunchError::Failed(VmError::Qmp {
                command: "migrate-incoming",
                source: qmp::QmpError::Closed,
            }));
        };
        let loaded = tokio::select! {
            r = snapshot::load(q, &state) => Ok(r),
            status = child.wait() => Err(status),
        };
        match loaded {
            Ok(Ok(())) => {
                tracing::debug!("device state loaded, guest running");
                Ok(())
            }
            Ok(Err(e)) => {
                let _ = self.kill_now().await;
                Err(LaunchError::Failed(VmError::SnapshotRestore(e)))
            }
            Err(status) => Err(LaunchError::Exited(self.exited(status).await)),
        }
    }
}

impl QemuMachine {
    /// Spawns QEMU and checks it over QMP: `running` after a boot, `inmigrate` when
    /// restoring (the state is loaded next).
    async fn spawn_qemu(&mut self, token: &str, start: Start<'_>) -> Result<(), LaunchError> {
        self.ram_in_file = matches!(start, Start::Boot) && self.memory_file.is_some();
        self.ram_backend = match start {
            Start::Boot => self.memory_file.is_some(),
            Start::Restore(memory) => memory.is_some(),
        };
        let restoring = matches!(start, Start::Restore(_));
        let expected = if restoring { "inmigrate" } else { "running" };
        // Opened once, before QEMU starts, so a refused path (a symlink, another user's file)
        // fails the start with its reason.
        let log = console::LogFile::open(&self.console_log).map_err(host_err(format!(
            "open the console log {}",
            self.console_log.display()
        )))?;
        self.log.close();
        self.log = log.clone();
        self.start_egress().await?;
        let mut inherited = Inherited {
            fds: Vec::new(),
            disk_sets: 0,
        };
        let (plan, [qmp_host, console_host, agent_host]) =
            self.plan(token, &mut inherited, start)?;
        self.argv = plan.argv();
        crate::timing::mark("qemu: files opened, command line built");
        tracing::debug!(argv = ?self.argv, "starting QEMU");
        let mut child = platform::spawn(platform::SpawnSpec {
            argv: self.argv.clone(),
            inherit: inherited.fds.iter().map(platform::ChildFd::raw).collect(),
            drop_to: self.drop_to.clone(),
        })
        .await
        .map_err(VmError::Spawn)?;
        crate::timing::mark("qemu: process spawned");
        drop(inherited);
        self.pid = child.id();
        let tail = self.console.clone();
        self.tasks.push(tokio::spawn(async move {
            console::capture(console_host, tail, Some(log)).await;
        }));
        if let Some(stderr) = child.take_stderr() {
            let tail = self.stderr.clone();
            self.tasks.push(tokio::spawn(async move {
                console::capture(stderr, tail, None).await
            }));
        }
        self.agent_stream = Some(agent_host);
        let handshake = async {
            let mut q = qmp::QmpClient::connect(qmp_host).await?;
            crate::timing::mark("qemu: QMP greeting and capabilities");
            // A restore skips the round trip: `migrate-incoming`, sent next, fails with QEMU's
            // own message when QEMU is not waiting for an incoming migration.
            let status = if restoring {
                expected.to_string()
            } else {
                q.query_status().await?
            };
            Ok::<_, qmp::QmpError>((q, status))
        };
        let qmp_timeout = self.options.qmp_timeout;
        let result = tokio::select! {
            r = tokio::time::timeout(qmp_timeout, handshake) => r,
            status = child.wait() => {
                self.child = Some(child);
                return Err(LaunchError::Exited(self.exited(status).await));
            }
        };
        self.child = Some(child);
        let failure = match result {
            Ok(Ok((q, status))) if status == expected => {
                self.qmp = Some(q);
                return Ok(());
            }
            Ok(Ok((_, status))) => VmError::Hypervisor {
                backend: BACKEND,
                what: format!("QEMU reports state {status:?} after start"),
            },
            Ok(Err(source)) => VmError::Qmp {
                command: "qmp_capabilities and query-status",
                source,
            },
            Err(_) => VmError::Qmp {
                command: "qmp_capabilities and query-status",
                source: qmp::QmpError::Timeout(qmp_timeout),
            },
        };
        // QEMU is up but not as expected, or died mid-handshake: report its exit if it is
        // exiting, else kill it and report what QMP said.
        if let Some(child) = self.child.as_mut() {
            if let Ok(status) = tokio::time::timeout(Duration::from_millis(500), child.wait()).await
            {
                return Err(LaunchError::Exited(self.exited(status).await));
            }
        }
        let _ = self.kill_now().await;
        Err(failure.into())
    }
}

impl Drop for QemuMachine {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.log.close();
        // Dropping the owned child kills QEMU's process group and reaps QEMU (bounded). The
        // runtime directory is removed after this.
    }
}

/// QEMU on Windows starts no helper per guest connection (`guestfwd=...-cmd:`): there an
/// allow-list travels over the agent channel.
fn adapt_net_to_host(net: &mut crate::net::NetConfig, os: HostOs) {
    if os == HostOs::Windows && matches!(net.mode, NetMode::Allow(_)) {
        net.card = false;
    }
}

/// QEMU-specific queries on a QEMU VM.
impl Lifecycle<QemuMachine> {
    /// Where the VM's egress proxy listens on host loopback while QEMU runs (allow-list
    /// network only).
    pub fn egress_proxy_addr(&self) -> Option<std::net::SocketAddr> {
        self.machine()
            .egress
            .as_ref()
            .map(|(_, port)| std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, *port)))
    }

    /// QEMU's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.machine().pid()
    }

    /// The accelerator in use.
    pub fn accel(&self) -> crate::Accel {
        self.machine().accel()
    }

    /// The QEMU command line of the last start (empty before).
    pub fn command_line(&self) -> &[OsString] {
        self.machine().command_line()
    }

    /// Where the console log goes.
    pub fn console_log(&self) -> &Path {
        self.machine().console_log()
    }

    /// The last console lines (QEMU's stderr first).
    pub fn console_tail(&self) -> String {
        self.machine().console_tail(TAIL_LINES)
    }

    /// QEMU's resident set size in KiB, while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        self.machine().rss_kib()
    }

    /// See [`QemuMachine::set_memory_file`]; call before [`Vm::start`].
    pub fn set_memory_file(&mut self, path: PathBuf) {
        self.machine_mut().set_memory_file(path);
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests;

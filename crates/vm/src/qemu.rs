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
//! - Pause/resume are QMP `stop`/`cont`; no snapshot through this API yet.

pub mod accel;
pub mod binary;
pub mod cmdline;
pub mod console;
pub mod qmp;
pub mod spawn;

#[cfg(target_os = "linux")]
mod platform_linux;
#[cfg(target_os = "linux")]
use platform_linux as platform;
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
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::task::JoinHandle;

pub use accel::{AccelChoice, AccelError, HostFacts};
pub use cmdline::{
    DiskPlan, DiskSource, Endpoint, FileRef, HostOs, KernelArgs, QemuPlan, RootfsArg,
    VirtioTransport, AGENT_PORT,
};

use crate::agent::{AgentClient, AgentError};
use crate::error::ConfigError;
use crate::{
    AgentInfo, Arch, Backend, Probe, RuntimeDir, ShutdownOutcome, Vm, VmCapabilities, VmConfig,
    VmError, VmState,
};

const BACKEND: &str = "qemu";
/// How long QEMU may take to answer on QMP after it was started.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Console lines quoted in boot errors.
const TAIL_LINES: usize = 25;
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
    pub async fn create_qemu(&self, config: VmConfig) -> Result<QemuVm, VmError> {
        config.validate()?;
        platform::LAUNCH_SUPPORTED.map_err(|reason| VmError::Unavailable {
            backend: BACKEND,
            reason: reason.to_string(),
        })?;
        let facts = self.host_facts();
        let choice = facts
            .choose(config.arch, config.accel)
            .map_err(|e| ConfigError::Unsupported(e.to_string()))?;
        let binary = match &self.options.qemu_binary {
            Some(b) => b.clone(),
            None => binary::find(config.arch).map_err(|e| VmError::Unavailable {
                backend: BACKEND,
                reason: e.to_string(),
            })?,
        };
        let id = crate::new_vm_id();
        let runtime = RuntimeDir::create(&id)?;
        let console_log = config
            .console_log
            .clone()
            .unwrap_or_else(|| runtime.join("console.log"));
        let drop_to = (self.options.drop_privileges && vmcp_host_process::is_root())
            .then(|| spawn::unprivileged_ids(choice.accel == crate::Accel::Kvm));
        Ok(QemuVm {
            id,
            config,
            binary,
            accel: choice.accel,
            tsc_khz: facts.cpu_khz,
            host: facts.os,
            options: self.options.clone(),
            token: new_token(),
            drop_to,
            runtime,
            console_log,
            state: VmState::Created,
            child: None,
            pid: None,
            qmp: None,
            agent_stream: None,
            agent: None,
            console: console::Tail::default(),
            stderr: console::Tail::default(),
            tasks: Vec::new(),
            started_at: None,
            argv: Vec::new(),
        })
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

    async fn create(&self, config: VmConfig) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(self.create_qemu(config).await?))
    }
}

/// A random per-VM channel token (128 bits, hex).
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// One QEMU VM. Dropping it kills QEMU (and its process group), reaps it and removes the
/// runtime directory.
pub struct QemuVm {
    id: String,
    config: VmConfig,
    binary: PathBuf,
    accel: crate::Accel,
    tsc_khz: Option<u64>,
    host: HostOs,
    options: QemuOptions,
    token: String,
    drop_to: Option<vmcp_host_process::Ids>,
    runtime: RuntimeDir,
    console_log: PathBuf,
    state: VmState,
    child: Option<vmcp_host_process::OwnedChild>,
    pid: Option<u32>,
    qmp: Option<qmp::QmpClient<platform::HostStream>>,
    agent_stream: Option<platform::HostStream>,
    agent: Option<AgentClient>,
    console: console::Tail,
    stderr: console::Tail,
    tasks: Vec<JoinHandle<()>>,
    started_at: Option<Instant>,
    argv: Vec<OsString>,
}

impl std::fmt::Debug for QemuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuVm")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("accel", &self.accel)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// Descriptors QEMU inherits for one start; closed in vmcp once QEMU has them.
struct Inherited {
    fds: Vec<platform::ChildFd>,
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
        let source = platform::disk_source(1, &fds);
        self.fds.extend(fds);
        source
    }
}

fn host_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Host { what, source }
}

impl QemuVm {
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

    /// The last console lines.
    pub fn console_tail(&self) -> String {
        self.console.lines(TAIL_LINES)
    }

    /// QEMU's resident set size in KiB, while it runs.
    pub fn rss_kib(&self) -> Option<u64> {
        self.pid.and_then(vmcp_host_process::rss_kib)
    }

    /// Runs a QMP command without arguments, bounded by the QMP timeout.
    async fn qmp_command(&mut self, command: &str) -> Result<(), VmError> {
        let timeout = self.options.qmp_timeout;
        let Some(q) = self.qmp.as_mut() else {
            return Err(VmError::Backend {
                backend: BACKEND,
                message: format!("no QMP connection for {command}"),
            });
        };
        match tokio::time::timeout(timeout, q.execute(command, None)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(VmError::Backend {
                backend: BACKEND,
                message: e.to_string(),
            }),
            Err(_) => Err(VmError::Backend {
                backend: BACKEND,
                message: format!("QEMU did not answer {command} within {timeout:?}"),
            }),
        }
    }

    fn kernel_args(&self) -> KernelArgs {
        KernelArgs {
            arch: self.config.arch,
            accel: self.accel,
            tsc_khz: self.tsc_khz,
            token: self.token.clone(),
            agent_port: AGENT_PORT.to_string(),
            rootfs: self.config.rootfs.as_ref().map(|d| RootfsArg {
                device: "/dev/vda".into(),
                read_only: d.read_only,
            }),
            extra: self.config.cmdline_extra.clone(),
        }
    }

    /// Error text for QEMU having exited: its stderr, then the console tail.
    fn exit_tails(&self) -> String {
        let stderr = self.stderr.lines(10);
        let console = self.console.lines(TAIL_LINES);
        match (stderr.is_empty(), console.is_empty()) {
            (true, true) => "(no console output)".into(),
            (false, true) => stderr,
            (true, false) => console,
            (false, false) => format!("{stderr}\n{console}"),
        }
    }

    async fn early_exit(&mut self, status: std::io::Result<std::process::ExitStatus>) -> VmError {
        self.reaped();
        // Let the capture tasks drain what QEMU wrote before it died.
        for t in &mut self.tasks {
            let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
        }
        VmError::EarlyExit {
            status: match status {
                Ok(s) => format!("QEMU {s}"),
                Err(e) => format!("QEMU status unknown: {e}"),
            },
            console_tail: self.exit_tails(),
        }
    }

    /// Marks QEMU as gone.
    fn reaped(&mut self) {
        self.child = None;
        self.pid = None;
        self.qmp = None;
        self.agent_stream = None;
        self.state = VmState::Stopped;
    }

    /// Waits up to `timeout` for QEMU to exit; true if it did.
    async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(_) => {
                self.reaped();
                true
            }
            Err(_) => false,
        }
    }

    async fn kill_now(&mut self) -> Result<(), VmError> {
        if let Some(child) = self.child.as_mut() {
            child
                .kill_and_wait(REAP_TIMEOUT)
                .await
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::TimedOut => VmError::Backend {
                        backend: BACKEND,
                        message: format!("QEMU did not exit within {REAP_TIMEOUT:?} of SIGKILL"),
                    },
                    _ => host_err("reap QEMU")(e),
                })?;
        }
        self.reaped();
        Ok(())
    }

    fn plan(
        &self,
        inherited: &mut Inherited,
    ) -> Result<(QemuPlan, Vec<platform::HostStream>), VmError> {
        let kernel = platform::open_for_child(&self.config.kernel, false).map_err(host_err(
            format!("open kernel {}", self.config.kernel.display()),
        ))?;
        let initrd = platform::open_for_child(&self.config.initrd, false).map_err(host_err(
            format!("open initrd {}", self.config.initrd.display()),
        ))?;
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
        let mut hosts = Vec::with_capacity(3);
        let mut endpoint = |name: &str| -> Result<Endpoint, VmError> {
            let (host, child) =
                platform::stream_pair().map_err(host_err(format!("create the {name} channel")))?;
            hosts.push(host);
            Ok(inherited.endpoint(child))
        };
        let qmp = endpoint("QMP")?;
        let console = endpoint("console")?;
        let agent = endpoint("agent")?;
        let plan = QemuPlan {
            binary: self.binary.clone(),
            arch: self.config.arch,
            accel: self.accel,
            host: self.host,
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            kernel: inherited.file(kernel),
            initrd: inherited.file(initrd),
            append: self.kernel_args().render(),
            rootfs,
            qmp,
            console,
            agent,
            agent_port: AGENT_PORT.to_string(),
            virtio: self.options.virtio,
            network: self.config.network,
            sandbox: self.options.sandbox && QemuPlan::sandbox_supported(self.host),
        };
        Ok((plan, hosts))
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> VmState {
        self.state
    }

    fn capabilities(&self) -> VmCapabilities {
        VmCapabilities {
            pause: true,
            ..VmCapabilities::default()
        }
    }

    fn runtime_dir(&self) -> &Path {
        self.runtime.path()
    }

    async fn start(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Created {
            return Err(VmError::InvalidState {
                op: "start",
                state: self.state,
            });
        }
        let mut inherited = Inherited { fds: Vec::new() };
        let (plan, hosts) = self.plan(&mut inherited)?;
        let mut hosts = hosts.into_iter();
        let (Some(qmp_host), Some(console_host), Some(agent_host)) =
            (hosts.next(), hosts.next(), hosts.next())
        else {
            return Err(VmError::Backend {
                backend: BACKEND,
                message: "channel setup incomplete".into(),
            });
        };
        self.argv = plan.argv();
        tracing::debug!(argv = ?self.argv, "starting QEMU");
        self.started_at = Some(Instant::now());
        let mut child = platform::spawn(platform::SpawnSpec {
            argv: self.argv.clone(),
            inherit: inherited.fds.iter().map(platform::ChildFd::raw).collect(),
            drop_to: self.drop_to.clone(),
        })
        .await
        .map_err(VmError::Spawn)?;
        drop(inherited);
        self.pid = child.id();
        let log = self.console_log.clone();
        let tail = self.console.clone();
        self.tasks.push(tokio::spawn(async move {
            console::capture(console_host, tail, Some(&log)).await;
        }));
        if let Some(stderr) = child.take_stderr() {
            let tail = self.stderr.clone();
            self.tasks.push(tokio::spawn(async move {
                console::capture(stderr, tail, None).await
            }));
        }
        self.child = Some(child);
        self.agent_stream = Some(agent_host);
        self.state = VmState::Starting;

        let handshake = async {
            let mut q = qmp::QmpClient::connect(qmp_host).await?;
            let status = q.query_status().await?;
            Ok::<_, qmp::QmpError>((q, status))
        };
        let Some(child) = self.child.as_mut() else {
            return Err(VmError::InvalidState {
                op: "start",
                state: self.state,
            });
        };
        let result = tokio::select! {
            r = tokio::time::timeout(self.options.qmp_timeout, handshake) => r,
            status = child.wait() => return Err(self.early_exit(status).await),
        };
        match result {
            Ok(Ok((q, status))) if status == "running" => {
                self.qmp = Some(q);
                Ok(())
            }
            other => {
                // QEMU is up but not as expected, or died mid-handshake: report its exit if
                // it is exiting, else kill it and report what QMP said.
                if let Some(child) = self.child.as_mut() {
                    if let Ok(status) =
                        tokio::time::timeout(Duration::from_millis(500), child.wait()).await
                    {
                        return Err(self.early_exit(status).await);
                    }
                }
                let _ = self.kill_now().await;
                let message = match other {
                    Ok(Ok((_, status))) => format!("QEMU reports state {status:?} after start"),
                    Ok(Err(e)) => format!("QMP handshake failed: {e}"),
                    Err(_) => format!(
                        "QEMU did not answer on QMP within {:?}",
                        self.options.qmp_timeout
                    ),
                };
                Err(VmError::Backend {
                    backend: BACKEND,
                    message,
                })
            }
        }
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<AgentInfo, VmError> {
        let stream = match (self.state, self.agent_stream.take()) {
            (VmState::Starting, Some(s)) => s,
            (state, s) => {
                self.agent_stream = s;
                return Err(VmError::InvalidState {
                    op: "wait for the agent of",
                    state,
                });
            }
        };
        let Some(child) = self.child.as_mut() else {
            return Err(VmError::InvalidState {
                op: "wait for the agent of",
                state: self.state,
            });
        };
        let token = self.token.clone();
        let result = tokio::select! {
            r = AgentClient::connect(stream, &token, timeout) => r,
            status = child.wait() => return Err(self.early_exit(status).await),
        };
        match result {
            Ok(client) => {
                let info = client.info(self.started_at.map(|t| t.elapsed()).unwrap_or_default());
                self.agent = Some(client);
                self.state = VmState::Running;
                Ok(info)
            }
            Err(AgentError::HelloTimeout(_)) => Err(VmError::ReadyTimeout {
                timeout,
                console_tail: self.console.lines(TAIL_LINES),
            }),
            Err(AgentError::Closed) => {
                // The channel closes when QEMU exits; report the exit if that is what happened.
                if let Some(child) = self.child.as_mut() {
                    if let Ok(status) =
                        tokio::time::timeout(Duration::from_secs(2), child.wait()).await
                    {
                        return Err(self.early_exit(status).await);
                    }
                }
                Err(AgentError::Closed.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn agent(&self) -> Result<AgentClient, VmError> {
        match (&self.agent, self.state) {
            (Some(a), VmState::Running) => Ok(a.clone()),
            (_, state) => Err(VmError::InvalidState {
                op: "talk to the agent of",
                state,
            }),
        }
    }

    async fn shutdown(&mut self, timeout: Duration) -> Result<ShutdownOutcome, VmError> {
        if self.child.is_none() {
            self.state = VmState::Stopped;
            return Ok(ShutdownOutcome::AlreadyStopped);
        }
        self.state = VmState::Stopping;
        let deadline = Instant::now() + timeout;
        let Some(agent) = self.agent.take() else {
            // No agent to ask (not ready yet): nothing would power the guest off.
            self.kill_now().await?;
            return Ok(ShutdownOutcome::Killed);
        };
        match tokio::time::timeout(timeout, agent.poweroff()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::info!(error = %e, "the guest refused to power off"),
            Err(_) => tracing::info!("the guest did not accept the poweroff request in time"),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if self.wait_exit(left).await {
            return Ok(ShutdownOutcome::Graceful);
        }
        self.kill_now().await?;
        Ok(ShutdownOutcome::Killed)
    }

    async fn kill(&mut self) -> Result<(), VmError> {
        self.agent = None;
        self.kill_now().await
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Running {
            return Err(VmError::InvalidState {
                op: "pause",
                state: self.state,
            });
        }
        self.qmp_command("stop").await?;
        self.state = VmState::Paused;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::InvalidState {
                op: "resume",
                state: self.state,
            });
        }
        self.qmp_command("cont").await?;
        self.state = VmState::Running;
        Ok(())
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Dropping the owned child kills QEMU's process group and reaps QEMU (bounded). The
        // runtime directory is removed after this.
        drop(self.child.take());
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests;

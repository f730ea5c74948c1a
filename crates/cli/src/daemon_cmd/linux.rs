//! `vmcp daemon` on Linux: QEMU snapshot restores as the pool's source, and the client side
//! of `vmcp run`.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use vmcp_pool::client::{self, Acquired, ClientError};
use vmcp_pool::proto::{VmRequest, MAX_PROFILES};
use vmcp_pool::server::{self, Handout, Resolve, ServerOptions};
use vmcp_pool::{Pool, ProfileSpec, Source};
use vmcp_vm::agent::{
    exec_detached, new_identity, rekey_detached, AgentClient, AgentStream, ExecSpec,
};
use vmcp_vm::lifecycle::Machine;
use vmcp_vm::qemu::{QemuBackend, QemuVm};
use vmcp_vm::{Accel, Arch, DiskConfig, Vm, VmConfig};

use super::{DaemonArgs, DaemonCommand, ProfileArg};
use crate::run::RunArgs;
use crate::snapshots;

/// How long one restore for the pool may take (QEMU start, state load, re-key).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a snapshot build may take to boot.
const BUILD_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Each socket step of `vmcp run`'s request to the daemon.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// `vmcp run`'s re-key of a handed-out VM.
const CLIENT_REKEY_TIMEOUT: Duration = Duration::from_secs(10);
/// What each pooled VM runs once before it is handed out (see [`QemuSource::restore`]).
const WARM_UP: [&str; 1] = ["true"];
/// How long the image lookup of a request is reused.
const IMAGE_LOOKUP_TTL: Duration = Duration::from_secs(1);

/// A restored, re-keyed VM whose agent channel nobody serves yet.
pub struct PooledVm {
    vm: QemuVm,
    channel: OwnedFd,
    token: String,
}

impl Handout for PooledVm {
    fn vm_id(&self) -> &str {
        self.vm.id()
    }
    fn token(&self) -> &str {
        &self.token
    }
    fn channel(&self) -> BorrowedFd<'_> {
        self.channel.as_fd()
    }
    fn alive(&self) -> bool {
        self.vm.state() != vmcp_vm::VmState::Stopped
    }
}

/// One profile: the VM config `vmcp run` would use and its automatic snapshot.
struct Profile {
    name: String,
    config: VmConfig,
    snapshot: PathBuf,
}

type SelectionKey = (Option<String>, Option<String>);
/// The built image's kernel and initrd, if any, and when that was looked up.
type ImageLookup = Option<(Instant, Option<(PathBuf, PathBuf)>)>;

/// Restores the profiles' snapshots; resolves requests to profiles as `vmcp run` names its
/// automatic snapshot.
struct QemuSource {
    profiles: Vec<Profile>,
    /// Backend and accelerator choices by (`--backend`, `--accel`): probing is not free.
    selections: Mutex<HashMap<SelectionKey, Option<Accel>>>,
    image: Mutex<ImageLookup>,
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

impl QemuSource {
    fn new() -> Self {
        QemuSource {
            profiles: Vec::new(),
            selections: Mutex::new(HashMap::new()),
            image: Mutex::new(None),
        }
    }

    fn built_image(&self) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
        let mut cached = self.image.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, found)) = cached.as_ref() {
            if at.elapsed() < IMAGE_LOOKUP_TTL {
                return Ok(found.clone());
            }
        }
        let found = crate::run::find_image(Arch::host())?;
        *cached = Some((Instant::now(), found.clone()));
        Ok(found)
    }

    /// The config, automatic snapshot record and profile name of `req`.
    async fn resolve(
        &self,
        req: &VmRequest,
    ) -> anyhow::Result<(String, VmConfig, snapshots::Record)> {
        let (kernel, initrd) = match (&req.kernel, &req.initrd) {
            (Some(k), Some(i)) => (PathBuf::from(k), PathBuf::from(i)),
            (None, None) => self
                .built_image()?
                .context("the guest image is not built (run `vmcp image build`)")?,
            _ => anyhow::bail!("a kernel needs an initrd and the other way round"),
        };
        let mut config = VmConfig::new(kernel, initrd);
        config.cpus = req.cpus;
        config.memory_mib = req.memory_mib;
        config.rootfs = req.rootfs.as_ref().map(|p| DiskConfig {
            path: PathBuf::from(p),
            read_only: true,
        });
        config.backend = req
            .backend
            .as_deref()
            .map(crate::run::parse_backend)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        config.accel = req
            .accel
            .as_deref()
            .map(crate::run::parse_accel)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        config.validate()?;
        let key = (req.backend.clone(), req.accel.clone());
        let cached = self
            .selections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .copied();
        let accel = match cached {
            Some(a) => a,
            None => {
                let selection = vmcp_vm::select::select(&config).await?;
                anyhow::ensure!(
                    selection.backend.name() == "qemu",
                    "the daemon pools QEMU VMs; this VM runs on {}",
                    selection.backend.name()
                );
                self.selections
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, selection.accel);
                selection.accel
            }
        };
        config.accel = accel;
        let bin = vmcp_vm::qemu::binary::find(config.arch)?;
        let record = snapshots::Record::for_config(&config, &bin)?;
        Ok((record.auto_name(), config, record))
    }

    async fn restore(&self, p: &Profile) -> anyhow::Result<PooledVm> {
        let mut vm = QemuBackend::new().create_qemu(p.config.clone()).await?;
        vm.restore_snapshot(&p.snapshot)
            .await
            .with_context(|| format!("cannot restore snapshot {}", p.name))?;
        let mut stream: Box<dyn AgentStream> = vm.machine_mut().agent_stream().await?;
        let token = format!("{:032x}", rand::random::<u128>());
        let identity = new_identity(&token, &format!("vmcp-{}", vm.id()));
        rekey_detached(&mut stream, identity, RESTORE_TIMEOUT)
            .await
            .context("the restored agent did not take its new identity")?;
        // Warm up: the first process start in a freshly restored QEMU costs hundreds of
        // milliseconds under TCG (cold translation cache, copy-on-write faults); the
        // client's program should not pay for it.
        // Both stdin paths `vmcp run` takes (/dev/null, and a pipe), the pipe one twice:
        // each new code path is translated on its first use.
        for stdin in [false, true, true] {
            let warm = exec_detached(&mut stream, &WARM_UP, stdin, RESTORE_TIMEOUT)
                .await
                .context("the warm-up program failed")?;
            anyhow::ensure!(
                warm == vmcp_guest_proto::ExitStatus::Code(0),
                "the warm-up program ended with {warm:?}"
            );
        }
        let unix = stream
            .into_any()
            .downcast::<tokio::net::UnixStream>()
            .map_err(|_| anyhow::anyhow!("the agent channel is not a Unix socket"))?;
        let channel: OwnedFd = unix.into_std()?.into();
        Ok(PooledVm { vm, channel, token })
    }
}

#[async_trait]
impl Source for QemuSource {
    type Vm = PooledVm;

    async fn make(&self, spec: &ProfileSpec) -> Result<PooledVm, String> {
        let p = self
            .profiles
            .iter()
            .find(|p| p.name == spec.name)
            .ok_or_else(|| format!("no profile {}", spec.name))?;
        match tokio::time::timeout(RESTORE_TIMEOUT, self.restore(p)).await {
            Ok(Ok(vm)) => Ok(vm),
            Ok(Err(e)) => Err(chain(&e)),
            Err(_) => Err(format!(
                "the restore did not finish within {RESTORE_TIMEOUT:?}"
            )),
        }
    }

    async fn destroy(&self, mut vm: PooledVm) {
        if let Err(e) = vm.vm.kill().await {
            tracing::warn!(error = %e, "killing a pooled VM failed");
        }
    }
}

#[async_trait]
impl Resolve for QemuSource {
    async fn profile_for(&self, req: &VmRequest) -> Result<String, String> {
        self.resolve(req).await.map(|r| r.0).map_err(|e| chain(&e))
    }
}

fn absolute(p: &Path) -> anyhow::Result<String> {
    let canon =
        std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))?;
    Ok(canon.to_string_lossy().into_owned())
}

fn request_of(p: &ProfileArg) -> anyhow::Result<VmRequest> {
    let mut r = VmRequest::new(p.cpus, p.memory_mib);
    r.rootfs = p.rootfs.as_deref().map(absolute).transpose()?;
    r.kernel = p.kernel.as_deref().map(absolute).transpose()?;
    r.initrd = p.initrd.as_deref().map(absolute).transpose()?;
    r.accel = p.accel.clone();
    r.backend = p.backend.clone();
    Ok(r)
}

/// Runs `vmcp daemon` or `vmcp daemon status`.
pub async fn run(args: DaemonArgs) -> anyhow::Result<ExitCode> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(client::default_socket_path);
    if let Some(DaemonCommand::Status) = args.command {
        return status(&socket);
    }
    let wanted = if args.profiles.is_empty() {
        vec![ProfileArg::default()]
    } else {
        args.profiles.clone()
    };
    anyhow::ensure!(
        wanted.len() <= MAX_PROFILES,
        "at most {MAX_PROFILES} profiles"
    );
    // A second daemon fails before it builds anything.
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        anyhow::bail!("a daemon already listens on {}", socket.display());
    }
    let store = snapshots::store_dir()?;
    let mut source = QemuSource::new();
    let mut specs = Vec::new();
    for p in &wanted {
        let req = request_of(p)?;
        if req.kernel.is_none() {
            crate::run::ensure_image(Arch::host()).await?;
        }
        let (name, config, record) = source
            .resolve(&req)
            .await
            .with_context(|| format!("cannot pool VMs of --profile {p:?}"))?;
        if specs.iter().any(|s: &ProfileSpec| s.name == name) {
            eprintln!("vmcp daemon: notice: two --profile flags describe {name}; keeping one");
            continue;
        }
        let usable = snapshots::find(&store, &name)?.filter(|s| {
            s.record
                .as_ref()
                .is_ok_and(|r| r.differences(&record).is_empty())
        });
        let stored = match usable {
            Some(s) => s,
            None => {
                eprintln!("vmcp daemon: building snapshot {name} (one time)");
                snapshots::sweep_builds(&store, Duration::from_secs(3600));
                let mut vm =
                    snapshots::create(&store, &name, &config, &record, BUILD_READY_TIMEOUT)
                        .await
                        .with_context(|| format!("cannot build snapshot {name}"))?;
                let _ = vm.kill().await;
                snapshots::find(&store, &name)?
                    .with_context(|| format!("snapshot {name} vanished after its build"))?
            }
        };
        let target = p.pool.unwrap_or(args.pool);
        specs.push(ProfileSpec::new(&name, p.cpus, p.memory_mib, target));
        source.profiles.push(Profile {
            name,
            config,
            snapshot: stored.vm_path(),
        });
    }
    let need: u64 = specs
        .iter()
        .map(|s| s.target as u64 * u64::from(s.memory_mib))
        .sum();
    if need > args.memory_budget {
        eprintln!(
            "vmcp daemon: notice: the pools want {need} MiB of guest memory, the budget is {} MiB (--memory-budget): some stay below their size",
            args.memory_budget
        );
    }
    // Listen once the snapshots exist: a client never waits for a build.
    let listener = server::bind(&socket)?;
    let source = Arc::new(source);
    let pool = Pool::new(
        Arc::clone(&source),
        specs,
        args.memory_budget,
        args.parallel,
    );
    eprintln!(
        "vmcp daemon: listening on {} (pid {}); profiles: {}",
        listener.path().display(),
        std::process::id(),
        pool.profiles().join(", ")
    );
    let refill = tokio::spawn(Arc::clone(&pool).run());
    let reporter = tokio::spawn(report(Arc::clone(&pool)));
    let mut options = ServerOptions::default();
    options.log = Arc::new(|line: &str| eprintln!("vmcp daemon: {line}"));
    server::serve(Arc::clone(&pool), source, listener, options, async {
        let sig = crate::run::signal::termination().await;
        eprintln!("vmcp daemon: got {}, stopping", sig.name);
    })
    .await;
    reporter.abort();
    pool.shutdown().await;
    let _ = refill.await;
    // Handed-out VMs (their connections were dropped) and restores in flight end now.
    let deadline = Instant::now() + RESTORE_TIMEOUT;
    while (pool.used_mib() > 0 || pool.filling() > 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("vmcp daemon: stopped; its VMs are destroyed");
    Ok(ExitCode::SUCCESS)
}

/// One stderr line whenever a pool reaches its size, or drops from it after a failure.
async fn report(pool: Arc<Pool<QemuSource>>) {
    let mut full: HashMap<String, bool> = HashMap::new();
    let mut failures: HashMap<String, u64> = HashMap::new();
    loop {
        for p in pool.status() {
            let now_full = p.ready >= p.target;
            if full.insert(p.name.clone(), now_full) != Some(now_full) && now_full {
                eprintln!(
                    "vmcp daemon: pool {}: {} of {} ready",
                    p.name, p.ready, p.target
                );
            }
            if failures.insert(p.name.clone(), p.failures) != Some(p.failures) && p.failures > 0 {
                eprintln!(
                    "vmcp daemon: pool {}: restore failed ({} so far): {}",
                    p.name,
                    p.failures,
                    p.last_error.as_deref().unwrap_or("")
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn status(socket: &Path) -> anyhow::Result<ExitCode> {
    let s = client::status(socket, CLIENT_TIMEOUT)?;
    println!(
        "daemon pid {}, guest memory {} of {} MiB",
        s.pid, s.used_mib, s.budget_mib
    );
    for p in &s.profiles {
        println!(
            "{}: {} vCPU, {} MiB: {} of {} ready, {} restoring, {} in use, {} handed out, {} failed restores{}",
            p.name,
            p.cpus,
            p.memory_mib,
            p.ready,
            p.target,
            p.filling,
            p.leased,
            p.handed_out,
            p.failures,
            p.last_error
                .as_deref()
                .map(|e| format!(" (last: {})", vmcp_sanitize::sanitize(e, 200)))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The daemon request for this `vmcp run`, or `None` when its flags need a VM of its own
/// (`--no-daemon`, `--cold`, `--snapshot`, `--image`, `--share`, a writable root disk, a
/// console log, NAT, a network card, published ports, or an allow-list under an approval
/// policy). An allow-list over the agent channel runs in a pooled VM: the proxy runs here.
fn request_for_run(args: &RunArgs) -> Option<VmRequest> {
    let network_of_its_own = match args.net {
        vmcp_vm::NetMode::None => false,
        vmcp_vm::NetMode::Allow(_) => {
            args.net_via == Some(true)
                || args.approval.policy.is_some()
                || args.approval.approval_ui.is_some()
        }
        _ => true,
    };
    let own_vm = args.no_daemon
        || args.cold
        || args.snapshot.is_some()
        || args.image.is_some()
        || !args.share.is_empty()
        || args.rootfs_rw
        || args.console_log.is_some()
        || network_of_its_own
        || !args.publish.is_empty();
    if own_vm {
        return None;
    }
    let p = ProfileArg {
        cpus: args.cpus,
        memory_mib: args.memory,
        rootfs: args.rootfs.clone(),
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        accel: args.accel.map(|a| a.to_string()),
        backend: args.backend.map(|b| b.as_str().to_string()),
        pool: None,
    };
    // A path that does not resolve gets its error from the normal path.
    request_of(&p).ok()
}

/// `vmcp run` through a running daemon: `Ok(None)` when there is none, it has no VM for
/// these flags, or its VM does not answer (then `vmcp run` starts its own, silently).
pub async fn try_run(args: &RunArgs, forward_stdin: bool) -> anyhow::Result<Option<ExitCode>> {
    let Some(req) = request_for_run(args) else {
        return Ok(None);
    };
    let socket = client::default_socket_path();
    let (granted, channel, session) = match client::acquire(&socket, &req, CLIENT_TIMEOUT) {
        Ok(Acquired::Granted {
            granted,
            channel,
            session,
        }) => (granted, channel, session),
        Ok(Acquired::NoVm(reason)) => {
            tracing::debug!(%reason, "the daemon has no VM for this run");
            return Ok(None);
        }
        Ok(_) | Err(ClientError::NotRunning(_)) => return Ok(None),
        Err(e @ ClientError::Foreign { .. }) => {
            // Someone else's process on our socket path: say so, never use it.
            eprintln!("vmcp: notice: {e}");
            return Ok(None);
        }
        Err(e) => {
            tracing::info!(error = %e, "cannot use the daemon; starting a VM here");
            return Ok(None);
        }
    };
    let std_stream = std::os::unix::net::UnixStream::from(channel);
    std_stream.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std_stream)?;
    let token = format!("{:032x}", rand::random::<u128>());
    let agent = match AgentClient::connect_restored(
        stream,
        new_identity(&token, ""),
        None,
        CLIENT_REKEY_TIMEOUT,
    )
    .await
    {
        Ok(a) => a,
        Err(e) => {
            // Nothing ran yet: a VM of our own is as good.
            tracing::warn!(vm = %granted.vm_id, error = %e, "the daemon's VM did not answer; starting a VM here");
            drop(session);
            return Ok(None);
        }
    };
    // An allow-list: this process runs the VM's egress proxy over the channel, as the
    // lifecycle does for a VM of its own.
    let mut net = vmcp_vm::NetConfig::default();
    net.mode = args.net.clone();
    let _net = match vmcp_vm::net::serve_over_channel(&agent, net.channel_net()).await {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!(vm = %granted.vm_id, error = %e, "the daemon's VM cannot serve the network; starting a VM here");
            drop(session);
            return Ok(None);
        }
    };
    tracing::debug!(vm = %granted.vm_id, profile = %granted.profile, "running in a VM from the daemon");
    let spec = ExecSpec {
        argv: args.command.clone(),
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        stdin: forward_stdin,
    };
    let program = args.command.first().cloned().unwrap_or_default();
    let code = match args.timeout {
        Some(t) => match tokio::time::timeout(t, crate::run::exec(&agent, spec, &program)).await {
            Ok(r) => r?,
            Err(_) => {
                drop(agent);
                drop(session);
                eprintln!(
                    "vmcp: {program} still ran after the {}s timeout; destroyed the VM",
                    t.as_secs_f64()
                );
                return Ok(Some(ExitCode::from(crate::run::EXIT_TIMEOUT)));
            }
        },
        None => crate::run::exec(&agent, spec, &program).await?,
    };
    drop(agent);
    session.done();
    Ok(Some(ExitCode::from(code)))
}

/// For `vmcp bench`: ready VMs, wanted VMs and VMs handed out, over all pools of the daemon at
/// `socket`; `None` when it does not answer.
pub fn pool_counts(socket: &Path) -> Option<(u32, u32, u64)> {
    let s = client::status(socket, CLIENT_TIMEOUT).ok()?;
    Some(s.profiles.iter().fold((0, 0, 0), |(r, t, h), p| {
        (r + p.ready, t + p.target, h + p.handed_out)
    }))
}

/// For `vmcp bench`: the time to get a VM (its agent channel) from the daemon at `socket`
/// for a request of `memory_mib`, `kernel`, `initrd` and `accel`; the VM is given back at
/// once (the daemon destroys it). `Ok(None)` when the daemon had no VM.
pub fn time_acquire(
    socket: &Path,
    memory_mib: u32,
    kernel: &Path,
    initrd: &Path,
    accel: Option<Accel>,
) -> anyhow::Result<Option<Duration>> {
    let p = ProfileArg {
        memory_mib,
        kernel: Some(kernel.to_path_buf()),
        initrd: Some(initrd.to_path_buf()),
        accel: accel.map(|a| a.to_string()),
        ..ProfileArg::default()
    };
    let req = request_of(&p)?;
    let t = Instant::now();
    match client::acquire(socket, &req, CLIENT_TIMEOUT)? {
        Acquired::Granted { session, .. } => {
            let took = t.elapsed();
            session.done();
            Ok(Some(took))
        }
        _ => Ok(None),
    }
}

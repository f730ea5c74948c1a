//! One VM lifecycle over many hypervisors.
//!
//! A backend implements [`Machine`]: what differs per hypervisor (launch it or load saved
//! state into it, hand out the byte stream to the agent, pause, resume, save state, stop,
//! kill, say when it exited). [`Lifecycle`] is the one [`Vm`] implementation over any
//! `Machine`; it owns everything that is the same everywhere:
//!
//! - the state machine and its checks (below);
//! - the per-VM agent token (128 random bits), given to the machine for the guest's kernel
//!   command line and checked in the agent's hello;
//! - the handshake through [`AgentClient`], raced against the hypervisor exiting early, so a
//!   guest that dies while booting is an [`VmError::EarlyExit`] with the console tail, not a
//!   timeout;
//! - graceful shutdown: the agent's poweroff (or the machine's own stop request when there is
//!   no agent), then a kill when the guest is not down by the deadline;
//! - snapshots: pause, [`Machine::save_state`], resume, and a backend-neutral
//!   [`SnapshotManifest`] beside the state file; restore is [`Machine::load_state`] with the
//!   manifest's token (the saved guest's kernel command line), then the wait for the agent
//!   **re-keys** it: a restore is a new VM, so the agent gets this VM's own token, fresh
//!   entropy for its kernel RNG, the host's wall clock and the hostname `vmcp-<id>`
//!   ([`AgentClient::connect_restored`]); the token in the snapshot's memory opens nothing.
//!
//! ```text
//! Created --start--> Starting --wait_ready--> Running <--pause/resume--> Paused
//!    |                   ^                       |
//!    +--restore_snapshot-+                       +--shutdown--> Stopping --> Stopped
//!        (kill from any state, any failure of start / wait_ready) ---------> Stopped
//! ```
//!
//! A new hypervisor (a native KVM or WHP VMM) is "implement [`Machine`]" plus a [`Backend`]
//! that builds it with [`Lifecycle::prepare`].
//!
//! [`Backend`]: crate::Backend

mod checkpoint;
#[cfg(test)]
mod checkpoint_tests;
mod manifest;
#[cfg(test)]
mod tests;

pub use checkpoint::{Checkpoint, MAX_CHECKPOINTS, MAX_FORKS};
pub use manifest::{ManifestError, SnapshotManifest};

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::agent::{AgentClient, AgentError, AgentStream};
use crate::{
    new_vm_id, AgentInfo, Arch, RuntimeDir, ShutdownOutcome, Vm, VmCapabilities, VmConfig, VmError,
    VmState,
};

/// Console lines quoted in boot errors.
pub const TAIL_LINES: usize = 25;
/// How long a machine whose agent channel closed may take to show that it exited.
const CLOSED_EXIT_GRACE: Duration = Duration::from_secs(2);

/// How a machine ended, as the hypervisor reports it (`"QEMU exit status: 1"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The status, in words.
    pub status: String,
}

impl Exit {
    /// An exit described by `status`.
    pub fn new(status: impl Into<String>) -> Self {
        Exit {
            status: status.into(),
        }
    }
}

/// Why [`Machine::launch`] or [`Machine::load_state`] failed.
#[derive(Debug)]
pub enum LaunchError {
    /// The hypervisor exited while starting; the lifecycle adds the console tail.
    Exited(Exit),
    /// Anything else; the machine has cleaned up what it started.
    Failed(VmError),
}

impl From<VmError> for LaunchError {
    fn from(e: VmError) -> Self {
        LaunchError::Failed(e)
    }
}

/// The future [`Machine::agent_stream`] returns: it borrows nothing from the machine, so the
/// lifecycle can race it against [`Machine::wait_exit`].
pub type AgentConnect =
    Pin<Box<dyn Future<Output = Result<Box<dyn AgentStream>, VmError>> + Send + 'static>>;

/// What differs per hypervisor. Dropping a machine must stop whatever it started at once
/// (kill and reap the hypervisor process, stop the framework VM).
#[async_trait]
pub trait Machine: Send + Sync + 'static {
    /// The backend's name (`"qemu"`, `"vz"`, `"fake"`); written into snapshot manifests.
    fn backend(&self) -> &'static str;
    /// Optional features of this machine.
    fn capabilities(&self) -> VmCapabilities;
    /// The last `lines` lines of the guest console (and of the hypervisor's own error output
    /// where it has one), for error messages. Empty when there is none.
    fn console_tail(&self, lines: usize) -> String;
    /// Whether the hypervisor is known to be gone (e.g. the guest powered itself off). Cheap,
    /// does not wait; `false` when the backend cannot tell without waiting.
    fn is_down(&self) -> bool {
        false
    }
    /// Starts the hypervisor with `token` on the guest's kernel command line; returns when it
    /// runs. On failure everything started is stopped again.
    async fn launch(&mut self, token: &str) -> Result<(), LaunchError>;
    /// The byte stream to the guest agent, once per launch or load; the returned future
    /// resolves when the guest has connected (at once for channels made before the launch).
    fn agent_stream(&mut self) -> AgentConnect;
    /// Resolves when the hypervisor has exited (at once if it never ran). Must be
    /// cancel-safe: the lifecycle races it against the agent's hello and against deadlines.
    async fn wait_exit(&mut self) -> Exit;
    /// Asks the guest to power off without the agent (ACPI, `requestStop`). `Ok(false)`:
    /// this machine has no such request, the lifecycle kills instead.
    async fn request_stop(&mut self) -> Result<bool, VmError> {
        Ok(false)
    }
    /// Stops the hypervisor at once and waits until it is gone.
    async fn kill(&mut self) -> Result<(), VmError>;
    /// Freezes the vCPUs.
    async fn pause(&mut self) -> Result<(), VmError> {
        Err(VmError::Unsupported("pause a VM"))
    }
    /// Lets paused vCPUs run again.
    async fn resume(&mut self) -> Result<(), VmError> {
        Err(VmError::Unsupported("resume a VM"))
    }
    /// `Ok` when [`Machine::save_state`] and [`Machine::load_state`] can work here, else the
    /// error to report (checked before any other snapshot step).
    fn snapshot_support(&self) -> Result<(), VmError> {
        Err(VmError::Unsupported("save or restore a VM snapshot"))
    }
    /// Writes the state of the paused VM to `path` (the lifecycle pauses and resumes).
    async fn save_state(&mut self, path: &Path) -> Result<(), VmError> {
        let _ = path;
        Err(VmError::Unsupported("save a VM snapshot"))
    }
    /// Whether the agent of a machine brought up by [`Machine::load_state`] says hello again
    /// (with the token it was saved with) before it is re-keyed: `true` where the channel
    /// reconnects (vsock), `false` where it stays connected across the restore.
    fn agent_hello_after_load(&self) -> bool {
        true
    }
    /// Instead of [`Machine::launch`]: brings the machine up from the state at `path`,
    /// running, with the guest's kernel command line carrying `token` (the token the saved
    /// guest knows). The agent then reconnects through [`Machine::agent_stream`].
    async fn load_state(&mut self, path: &Path, token: &str) -> Result<(), LaunchError> {
        let _ = (path, token);
        Err(LaunchError::Failed(VmError::Unsupported(
            "restore a VM snapshot",
        )))
    }
    /// A new machine like this one (same configuration, nothing running) for the VM of
    /// `prepared`: the same VM for a rewind, a new one for a fork. It is brought up with
    /// [`Machine::load_state`] only, so it needs no boot-only settings. The default: this
    /// backend cannot rewind or fork.
    fn sibling(&self, prepared: Prepared<'_>) -> Result<Self, VmError>
    where
        Self: Sized,
    {
        let _ = prepared;
        Err(VmError::Unsupported("rewind or fork a VM"))
    }
    /// What the lifecycle serves over the agent channel once the agent is ready (egress
    /// proxy, published ports); see [`crate::net::NetConfig::tunnel`]. Default: nothing.
    fn channel_net(&self) -> crate::net::ChannelNet {
        crate::net::ChannelNet::default()
    }
    /// The counters of an egress proxy the machine runs itself (one fed by a network card).
    fn egress_stats(&self) -> Option<Arc<vmcp_egress::Stats>> {
        None
    }
}

/// What a backend gets to build its machine in [`Lifecycle::prepare`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Prepared<'a> {
    /// The VM's id.
    pub id: &'a str,
    /// Its private runtime directory (removed after the machine is dropped).
    pub dir: &'a RuntimeDir,
    /// The agent token of a fresh start.
    pub token: &'a str,
}

/// A random per-VM channel token (128 bits, hex).
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The VM lifecycle over machine `M`; implements [`Vm`].
pub struct Lifecycle<M: Machine> {
    // Field order is drop order: the machine (and its hypervisor) goes before the directory.
    machine: M,
    /// Shared with the machine a rewind brings up until it replaces this one.
    dir: Arc<RuntimeDir>,
    id: String,
    arch: Arch,
    memory_mib: u32,
    cpus: u32,
    token: String,
    state: VmState,
    agent: Option<AgentClient>,
    started: Option<Instant>,
    /// Brought up from a snapshot whose guest knows this token: re-key before ready.
    restored_from: Option<String>,
    /// Checkpoints of this VM alive (bounded by [`MAX_CHECKPOINTS`]).
    checkpoints: Arc<AtomicUsize>,
    /// Number of the last checkpoint taken (names its directory).
    checkpoint_seq: u64,
    /// Networking over the agent channel while the agent is up.
    channel_net: Option<crate::net::ChannelNetHandle>,
    /// The counters of the last channel egress proxy (readable after it stopped).
    channel_egress_stats: Option<Arc<vmcp_egress::Stats>>,
}

impl<M: Machine> std::fmt::Debug for Lifecycle<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("backend", &self.machine.backend())
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

enum Waited {
    Ready(AgentClient),
    TimedOut,
    Agent(AgentError),
    Failed(VmError),
    Exited(Exit),
}

impl<M: Machine> Lifecycle<M> {
    /// Validates `config`, makes the VM's id, runtime directory and token, and lets `make`
    /// build the machine from them. Starts nothing.
    pub fn prepare(
        config: &VmConfig,
        make: impl FnOnce(Prepared<'_>) -> Result<M, VmError>,
    ) -> Result<Self, VmError> {
        config.validate()?;
        let id = new_vm_id();
        let dir = RuntimeDir::create(&id)?;
        let token = new_token();
        let machine = make(Prepared {
            id: &id,
            dir: &dir,
            token: &token,
        })?;
        Ok(Lifecycle {
            machine,
            dir: Arc::new(dir),
            id,
            arch: config.arch,
            memory_mib: config.memory_mib,
            cpus: config.cpus,
            token,
            state: VmState::Created,
            agent: None,
            started: None,
            restored_from: None,
            checkpoints: Arc::default(),
            checkpoint_seq: 0,
            channel_net: None,
            channel_egress_stats: None,
        })
    }

    /// A VM like this one, not started, with a machine from [`Machine::sibling`]: in `dir`
    /// under `id` (this VM's own for a rewind, new ones for a fork) with a new token.
    fn sibling(&self, id: String, dir: Arc<RuntimeDir>) -> Result<Self, VmError> {
        let token = new_token();
        let machine = self.machine.sibling(Prepared {
            id: &id,
            dir: &dir,
            token: &token,
        })?;
        Ok(Lifecycle {
            machine,
            dir,
            id,
            arch: self.arch,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            token,
            state: VmState::Created,
            agent: None,
            started: None,
            restored_from: None,
            checkpoints: Arc::default(),
            checkpoint_seq: 0,
            channel_net: None,
            channel_egress_stats: None,
        })
    }

    fn own_checkpoint(&self, checkpoint: &Checkpoint, op: &str) -> Result<(), VmError> {
        if checkpoint.vm_id() == self.id {
            return Ok(());
        }
        Err(VmError::Checkpoint(format!(
            "checkpoint {} was taken of VM {}, not of VM {}: {op} through the VM it was taken of",
            checkpoint.id(),
            checkpoint.vm_id(),
            self.id
        )))
    }

    /// [`Vm::fork`] with the concrete type: `n` new VMs restored from `checkpoint` (taken of
    /// this VM), each re-keyed and ready, in the order they became ready. All or nothing:
    /// when one fails the others are stopped and the first error is returned.
    pub async fn fork_into(
        &self,
        checkpoint: &Checkpoint,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Lifecycle<M>>, VmError> {
        if n == 0 || n > MAX_FORKS {
            return Err(VmError::Checkpoint(format!(
                "cannot fork into {n} VMs: ask for 1 to {MAX_FORKS}"
            )));
        }
        self.own_checkpoint(checkpoint, "fork")?;
        self.machine.snapshot_support()?;
        let path = checkpoint.state_path();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let id = new_vm_id();
            let dir = Arc::new(RuntimeDir::create(&id)?);
            let mut vm = self.sibling(id, dir)?;
            let path = path.clone();
            set.spawn(async move {
                vm.restore_snapshot(&path).await?;
                vm.wait_ready(timeout).await?;
                Ok::<_, VmError>(vm)
            });
        }
        let mut forks = Vec::with_capacity(n);
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(Ok(vm)) => forks.push(vm),
                // Dropping the set and the forks made so far stops every other VM.
                Ok(Err(e)) => return Err(e),
                Err(e) => {
                    return Err(VmError::Hypervisor {
                        backend: self.machine.backend(),
                        what: format!("a fork's restore task failed: {e}"),
                    })
                }
            }
        }
        Ok(forks)
    }

    /// The backend's machine (for backend-specific queries such as QEMU's pid).
    pub fn machine(&self) -> &M {
        &self.machine
    }

    /// The backend's machine, for backend-specific settings before a start.
    pub fn machine_mut(&mut self) -> &mut M {
        &mut self.machine
    }

    /// Whether this VM was brought up from a snapshot.
    pub fn is_restored(&self) -> bool {
        self.restored_from.is_some()
    }

    fn expect_state(&self, op: &'static str, ok: &[VmState]) -> Result<VmState, VmError> {
        let state = self.state();
        if ok.contains(&state) {
            Ok(state)
        } else {
            Err(VmError::InvalidState { op, state })
        }
    }

    fn launched(&self) -> bool {
        !matches!(self.state, VmState::Created | VmState::Stopped)
    }

    fn early_exit(&self, exit: Exit) -> VmError {
        VmError::EarlyExit {
            status: exit.status,
            console_tail: self.machine.console_tail(TAIL_LINES),
        }
    }

    /// After a failed launch or load: make sure nothing runs, then report.
    async fn launch_failed(&mut self, e: LaunchError) -> VmError {
        let err = match e {
            LaunchError::Exited(exit) => self.early_exit(exit),
            LaunchError::Failed(e) => {
                if let Err(k) = self.machine.kill().await {
                    tracing::warn!(error = %k, "cleanup after a failed start failed");
                }
                e
            }
        };
        self.state = VmState::Stopped;
        err
    }

    /// After a failed wait for the agent: nothing useful runs any more.
    async fn stop_after(&mut self, err: VmError) -> VmError {
        if let Err(k) = self.machine.kill().await {
            tracing::warn!(error = %k, "kill after a failed boot failed");
        }
        self.agent = None;
        self.channel_net = None;
        self.state = VmState::Stopped;
        err
    }

    fn manifest(&self) -> SnapshotManifest {
        SnapshotManifest::new(
            self.machine.backend(),
            self.arch,
            self.cpus,
            self.memory_mib,
            &self.token,
        )
    }
}

#[async_trait]
impl<M: Machine> Vm for Lifecycle<M> {
    fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> VmState {
        // The guest may power itself off, or the hypervisor die, at any time.
        match self.state {
            VmState::Created | VmState::Stopped => self.state,
            _ if self.machine.is_down() => VmState::Stopped,
            state => state,
        }
    }

    fn capabilities(&self) -> VmCapabilities {
        self.machine.capabilities()
    }

    fn runtime_dir(&self) -> &Path {
        self.dir.path()
    }

    fn egress_stats(&self) -> Option<Arc<vmcp_egress::Stats>> {
        self.channel_egress_stats
            .clone()
            .or_else(|| self.machine.egress_stats())
    }

    async fn start(&mut self) -> Result<(), VmError> {
        self.expect_state("start", &[VmState::Created])?;
        self.started = Some(Instant::now());
        match self.machine.launch(&self.token).await {
            Ok(()) => {
                self.state = VmState::Starting;
                Ok(())
            }
            Err(e) => Err(self.launch_failed(e).await),
        }
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<AgentInfo, VmError> {
        // The recorded state, not `state()`: a machine that went down while booting is
        // reported below as an early exit with its console, not as a state error.
        if self.state != VmState::Starting {
            return Err(VmError::InvalidState {
                op: "wait for the agent of",
                state: self.state(),
            });
        }
        let deadline = Instant::now() + timeout;
        let connect = self.machine.agent_stream();
        let token = self.token.clone();
        // A restored guest: its old hello (where the channel reconnects), then the re-key.
        let rekey = self.restored_from.clone().map(|old| {
            let old_hello = self.machine.agent_hello_after_load().then_some(old);
            let identity = crate::agent::new_identity(&token, &format!("vmcp-{}", self.id));
            (identity, old_hello)
        });
        let hello = async move {
            let stream = match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Waited::Failed(e),
                Err(_) => return Waited::TimedOut,
            };
            crate::timing::mark("lifecycle: agent channel connected");
            let left = deadline.saturating_duration_since(Instant::now());
            let connected = match rekey {
                Some((identity, old_hello)) => {
                    AgentClient::connect_restored(stream, identity, old_hello.as_deref(), left)
                        .await
                }
                None => AgentClient::connect(stream, &token, left).await,
            };
            match connected {
                Ok(client) => Waited::Ready(client),
                Err(AgentError::HelloTimeout(_)) => Waited::TimedOut,
                Err(e) => Waited::Agent(e),
            }
        };
        let waited = tokio::select! {
            w = hello => w,
            exit = self.machine.wait_exit() => Waited::Exited(exit),
        };
        match waited {
            Waited::Ready(client) => {
                tracing::debug!(restored = self.restored_from.is_some(), "agent ready");
                let info = client.info(self.started.map(|t| t.elapsed()).unwrap_or_default());
                match crate::net::serve_over_channel(&client, self.machine.channel_net()).await {
                    Ok(tasks) => {
                        self.channel_egress_stats = tasks.egress_stats();
                        self.channel_net = Some(tasks);
                    }
                    Err(e) => return Err(self.stop_after(e).await),
                }
                self.agent = Some(client);
                self.state = VmState::Running;
                Ok(info)
            }
            Waited::TimedOut => {
                let err = VmError::ReadyTimeout {
                    timeout,
                    console_tail: self.machine.console_tail(TAIL_LINES),
                };
                Err(self.stop_after(err).await)
            }
            Waited::Exited(exit) => {
                self.state = VmState::Stopped;
                Err(self.early_exit(exit))
            }
            Waited::Agent(AgentError::Closed) => {
                // The channel closes when the hypervisor exits: report the exit if that is
                // what happened.
                match tokio::time::timeout(CLOSED_EXIT_GRACE, self.machine.wait_exit()).await {
                    Ok(exit) => {
                        self.state = VmState::Stopped;
                        Err(self.early_exit(exit))
                    }
                    Err(_) => Err(self.stop_after(AgentError::Closed.into()).await),
                }
            }
            Waited::Agent(e) => Err(self.stop_after(e.into()).await),
            Waited::Failed(e) => Err(self.stop_after(e).await),
        }
    }

    fn agent(&self) -> Result<AgentClient, VmError> {
        match (&self.agent, self.state()) {
            (Some(a), VmState::Running) => Ok(a.clone()),
            (_, state) => Err(VmError::InvalidState {
                op: "talk to the agent of",
                state,
            }),
        }
    }

    async fn shutdown(&mut self, timeout: Duration) -> Result<ShutdownOutcome, VmError> {
        let was = self.state();
        if matches!(was, VmState::Created | VmState::Stopped) {
            self.agent = None;
            self.channel_net = None;
            self.state = VmState::Stopped;
            return Ok(ShutdownOutcome::AlreadyStopped);
        }
        let deadline = Instant::now() + timeout;
        self.state = VmState::Stopping;
        let mut asked = false;
        if let (Some(agent), VmState::Running) = (self.agent.take(), was) {
            match tokio::time::timeout(timeout, agent.poweroff()).await {
                Ok(Ok(())) => asked = true,
                Ok(Err(e)) => tracing::info!(error = %e, "the guest refused to power off"),
                Err(_) => tracing::info!("the guest did not accept the poweroff request in time"),
            }
        }
        if !asked {
            asked = match self.machine.request_stop().await {
                Ok(asked) => asked,
                Err(e) => {
                    tracing::debug!(error = %e, "the stop request failed; killing the VM");
                    false
                }
            };
        }
        // Nothing asked the guest to stop: only a guest that is already down counts as
        // graceful; otherwise kill at once rather than wait for nothing.
        let wait = if asked {
            deadline.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        let outcome = match tokio::time::timeout(wait, self.machine.wait_exit()).await {
            Ok(_) => ShutdownOutcome::Graceful,
            Err(_) => {
                self.machine.kill().await?;
                ShutdownOutcome::Killed
            }
        };
        self.agent = None;
        self.channel_net = None;
        self.state = VmState::Stopped;
        Ok(outcome)
    }

    async fn kill(&mut self) -> Result<(), VmError> {
        self.agent = None;
        self.channel_net = None;
        if self.launched() {
            self.machine.kill().await?;
        }
        self.state = VmState::Stopped;
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        self.expect_state("pause", &[VmState::Running])?;
        self.machine.pause().await?;
        self.state = VmState::Paused;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.expect_state("resume", &[VmState::Paused])?;
        self.machine.resume().await?;
        self.state = VmState::Running;
        Ok(())
    }

    async fn save_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        let was = self.expect_state("snapshot", &[VmState::Running, VmState::Paused])?;
        self.machine.snapshot_support()?;
        let was_running = was == VmState::Running;
        if was_running {
            self.machine.pause().await?;
        }
        let saved = self.machine.save_state(path).await;
        if was_running {
            self.machine.resume().await?;
        }
        saved?;
        self.manifest().write(path)?;
        Ok(())
    }

    async fn restore_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        self.expect_state("restore", &[VmState::Created])?;
        self.machine.snapshot_support()?;
        let manifest = SnapshotManifest::read(path)?;
        manifest.check_fits(path, &self.manifest())?;
        self.started = Some(Instant::now());
        crate::timing::mark("lifecycle: snapshot manifest read");
        match self.machine.load_state(path, &manifest.token).await {
            Ok(()) => {
                // The restored guest knows the token it was saved with; `wait_ready` gives it
                // this VM's own.
                self.restored_from = Some(manifest.token);
                self.state = VmState::Starting;
                Ok(())
            }
            Err(e) => Err(self.launch_failed(e).await),
        }
    }

    async fn checkpoint(&mut self) -> Result<Checkpoint, VmError> {
        let was = self.expect_state("checkpoint", &[VmState::Running, VmState::Paused])?;
        self.machine.snapshot_support()?;
        if self.checkpoints.load(Ordering::SeqCst) >= MAX_CHECKPOINTS {
            return Err(VmError::Checkpoint(format!(
                "VM {} already holds {MAX_CHECKPOINTS} checkpoints: drop one first",
                self.id
            )));
        }
        self.checkpoint_seq += 1;
        let dir = self
            .dir
            .path()
            .join(format!("checkpoint-{}", self.checkpoint_seq));
        std::fs::create_dir(&dir).map_err(|source| VmError::Host {
            what: format!("create {}", dir.display()),
            source,
        })?;
        // From here on the handle owns the directory: any failure below removes it.
        let checkpoint = Checkpoint::new(
            dir,
            &self.id,
            self.checkpoint_seq,
            Arc::clone(&self.checkpoints),
        );
        let path = checkpoint.state_path();
        let was_running = was == VmState::Running;
        if was_running {
            self.machine.pause().await?;
        }
        let saved = self.machine.save_state(&path).await;
        if was_running {
            if let Err(e) = self.machine.resume().await {
                // A guest that stays frozen is no use to anyone: stop it for good.
                tracing::warn!(error = %e, "the VM did not resume after a checkpoint; killing it");
                let _ = self.kill().await;
                return Err(e);
            }
        }
        saved?;
        self.manifest().write(&path)?;
        Ok(checkpoint)
    }

    async fn rewind(
        &mut self,
        checkpoint: &Checkpoint,
        timeout: Duration,
    ) -> Result<AgentInfo, VmError> {
        self.expect_state("rewind", &[VmState::Running, VmState::Paused])?;
        self.own_checkpoint(checkpoint, "rewind")?;
        self.machine.snapshot_support()?;
        let mut next = self.sibling(self.id.clone(), Arc::clone(&self.dir))?;
        // The new machine is this VM once it is ready; until then this one runs on, so a
        // failed rewind leaves the VM as it was (the failed machine was stopped already).
        next.restore_snapshot(&checkpoint.state_path()).await?;
        let info = next.wait_ready(timeout).await?;
        next.checkpoints = Arc::clone(&self.checkpoints);
        next.checkpoint_seq = self.checkpoint_seq;
        std::mem::swap(self, &mut next);
        if let Err(e) = Vm::kill(&mut next).await {
            tracing::warn!(error = %e, "stopping the machine a rewind replaced failed");
        }
        Ok(info)
    }

    async fn fork(
        &self,
        checkpoint: &Checkpoint,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Box<dyn Vm>>, VmError> {
        let forks = self.fork_into(checkpoint, n, timeout).await?;
        Ok(forks
            .into_iter()
            .map(|vm| Box::new(vm) as Box<dyn Vm>)
            .collect())
    }
}

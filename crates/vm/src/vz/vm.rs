//! The VZ lifecycle state machine and backend, generic over the [`Framework`] seam.
//!
//! ```text
//! Created --start--> Starting --wait_ready--> Running <--pause/resume--> Paused
//!    |                   ^                       |
//!    +--restore_snapshot-+                       +--shutdown--> Stopping --> Stopped
//!                                  (kill from any started state) ---------> Stopped
//! ```
//!
//! Graceful shutdown asks the agent to power off (or, without an agent, `requestStop`), polls
//! the framework state until the guest is down, and after the timeout stops the VM hard. A
//! snapshot is the framework's saved machine state plus a small sidecar file
//! (`<snapshot>.vmcp`) holding the channel token, which is part of the guest's memory and
//! kernel command line; the restored VM is built with that token so the configuration matches
//! and the reconnecting agent's hello is accepted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::framework::{Framework, FwError, FwState, Machine};
use super::plan::{plan, PlanError, PlanInputs, VzPlan};
use crate::agent::AgentClient;
use crate::config::{Arch, VmConfig};
use crate::error::{ConfigError, VmError};
use crate::{new_vm_id, RuntimeDir};
use crate::{AgentInfo, Backend, Probe, ShutdownOutcome, Vm, VmCapabilities, VmState};

/// Backend name.
pub const NAME: &str = "vz";
/// How often the framework state is polled while waiting for the guest to go down.
const POLL: Duration = Duration::from_millis(20);
/// Lines of console log quoted in errors.
const CONSOLE_TAIL_LINES: usize = 20;

impl From<FwError> for VmError {
    fn from(e: FwError) -> Self {
        match e {
            FwError::Entitlement | FwError::NotAvailable(_) => VmError::Unavailable {
                backend: NAME,
                reason: e.to_string(),
            },
            FwError::Host { what, source } => VmError::Host { what, source },
            other => VmError::Backend {
                backend: NAME,
                message: other.to_string(),
            },
        }
    }
}

impl From<PlanError> for VmError {
    fn from(e: PlanError) -> Self {
        VmError::Config(ConfigError::Unsupported(e.to_string()))
    }
}

/// The Virtualization.framework backend over framework `F`.
pub struct VzBackend<F: Framework> {
    framework: Arc<F>,
    host_arch: Arch,
}

impl<F: Framework> VzBackend<F> {
    /// A backend using `framework`, on a host of architecture `host_arch`.
    pub fn new(framework: F, host_arch: Arch) -> Self {
        VzBackend {
            framework: Arc::new(framework),
            host_arch,
        }
    }

    /// The framework layer.
    pub fn framework(&self) -> &F {
        &self.framework
    }

    fn plan_for(
        &self,
        config: &VmConfig,
        dir: &RuntimeDir,
        token: &str,
    ) -> Result<VzPlan, VmError> {
        let limits = self.framework.limits()?;
        let head = read_head(&config.kernel, 64)?;
        let default_log = dir.join("console.log");
        Ok(plan(
            config,
            PlanInputs {
                limits,
                host_arch: self.host_arch,
                token,
                default_console_log: &default_log,
                kernel_head: &head,
            },
        )?)
    }
}

#[async_trait]
impl<F: Framework> Backend for VzBackend<F> {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn probe(&self) -> Probe {
        match self.framework.limits() {
            Ok(l) => {
                let snap = match self.framework.save_restore_support() {
                    Ok(()) => "snapshots".to_string(),
                    Err(why) => format!("no snapshots: {why}"),
                };
                Probe::Usable {
                    detail: format!(
                        "Virtualization.framework, {} guests, {}-{} vCPUs, {}-{} MiB, {snap}",
                        self.host_arch.as_str(),
                        l.min_cpus,
                        l.max_cpus,
                        l.min_memory_bytes.div_ceil(1 << 20),
                        l.max_memory_bytes >> 20
                    ),
                }
            }
            Err(e) => Probe::Unusable {
                reason: e.to_string(),
            },
        }
    }

    async fn create(&self, config: VmConfig) -> Result<Box<dyn Vm>, VmError> {
        Ok(Box::new(self.create_vz(config)?))
    }
}

impl<F: Framework> VzBackend<F> {
    /// [`Backend::create`] with the concrete type (for framework-specific calls).
    pub fn create_vz(&self, config: VmConfig) -> Result<VzVm<F>, VmError> {
        config.validate()?;
        let id = new_vm_id();
        let dir = RuntimeDir::create(&id)?;
        let token = new_token();
        let plan = self.plan_for(&config, &dir, &token)?;
        Ok(VzVm {
            id,
            framework: Arc::clone(&self.framework),
            backend_arch: self.host_arch,
            config,
            dir,
            token,
            plan,
            machine: None,
            state: VmState::Created,
            agent: None,
            started: None,
        })
    }
}

/// One VM on Virtualization.framework.
pub struct VzVm<F: Framework> {
    id: String,
    framework: Arc<F>,
    backend_arch: Arch,
    config: VmConfig,
    dir: RuntimeDir,
    token: String,
    plan: VzPlan,
    machine: Option<F::Machine>,
    state: VmState,
    agent: Option<AgentClient>,
    started: Option<Instant>,
}

impl<F: Framework> VzVm<F> {
    /// The plan the framework configuration was built from.
    pub fn plan(&self) -> &VzPlan {
        &self.plan
    }

    /// The framework VM, once started or restored.
    pub fn framework_machine(&self) -> Option<&F::Machine> {
        self.machine.as_ref()
    }

    fn machine(&self, op: &'static str) -> Result<&F::Machine, VmError> {
        self.machine.as_ref().ok_or(VmError::InvalidState {
            op,
            state: self.state,
        })
    }

    fn expect_state(&self, op: &'static str, ok: &[VmState]) -> Result<(), VmError> {
        if ok.contains(&self.state) {
            Ok(())
        } else {
            Err(VmError::InvalidState {
                op,
                state: self.state,
            })
        }
    }

    fn console_tail(&self) -> String {
        console_tail(&self.plan.console_log, CONSOLE_TAIL_LINES)
    }

    /// Builds the framework VM from the plan (after validation) and records it.
    fn build(&mut self) -> Result<&F::Machine, VmError> {
        let machine = self.framework.build(&self.plan)?;
        Ok(self.machine.insert(machine))
    }

    /// Waits until the framework reports the guest down, at most until `deadline`.
    async fn wait_down(&self, deadline: Instant) -> bool {
        let Some(m) = self.machine.as_ref() else {
            return true;
        };
        loop {
            if m.state().is_down() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[async_trait]
impl<F: Framework> Vm for VzVm<F> {
    fn id(&self) -> &str {
        &self.id
    }

    fn state(&self) -> VmState {
        // The guest may power itself off or the framework may fail at any time.
        match (self.state, self.machine.as_ref().map(|m| m.state())) {
            (VmState::Created | VmState::Stopped, _) => self.state,
            (_, Some(s)) if s.is_down() => VmState::Stopped,
            (state, _) => state,
        }
    }

    fn capabilities(&self) -> VmCapabilities {
        VmCapabilities {
            snapshot: self.framework.save_restore_support().is_ok(),
            pause: true,
            vsock: true,
        }
    }

    fn runtime_dir(&self) -> &Path {
        self.dir.path()
    }

    async fn start(&mut self) -> Result<(), VmError> {
        self.expect_state("start", &[VmState::Created])?;
        let started = Instant::now();
        let machine = self.build()?;
        if let Err(e) = machine.start().await {
            self.state = VmState::Stopped;
            return Err(e.into());
        }
        self.started = Some(started);
        self.state = VmState::Starting;
        Ok(())
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<AgentInfo, VmError> {
        self.expect_state("wait for the agent of", &[VmState::Starting])?;
        let deadline = Instant::now() + timeout;
        let machine = self.machine("wait for the agent of")?;
        let watch = async {
            loop {
                let s = machine.state();
                if s.is_down() {
                    return s;
                }
                tokio::time::sleep(POLL).await;
            }
        };
        enum Waited {
            Conn(Result<Box<dyn crate::agent::AgentStream>, FwError>),
            TimedOut,
            Down(FwState),
        }
        let waited = tokio::select! {
            conn = tokio::time::timeout(timeout, machine.accept()) => match conn {
                Ok(conn) => Waited::Conn(conn),
                Err(_) => Waited::TimedOut,
            },
            s = watch => Waited::Down(s),
        };
        let stream = match waited {
            Waited::Conn(conn) => conn?,
            Waited::TimedOut => {
                return Err(VmError::ReadyTimeout {
                    timeout,
                    console_tail: self.console_tail(),
                })
            }
            Waited::Down(s) => {
                self.state = VmState::Stopped;
                return Err(VmError::EarlyExit {
                    status: format!("framework state {s:?}"),
                    console_tail: self.console_tail(),
                });
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let client = AgentClient::connect(stream, &self.token, left).await?;
        let info = client.info(self.started.map(|t| t.elapsed()).unwrap_or_default());
        self.agent = Some(client);
        self.state = VmState::Running;
        Ok(info)
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
        if self.machine.is_none() || self.state() == VmState::Stopped {
            self.state = VmState::Stopped;
            return Ok(ShutdownOutcome::AlreadyStopped);
        }
        let deadline = Instant::now() + timeout;
        let was = self.state;
        self.state = VmState::Stopping;
        let mut asked = false;
        if let (Some(agent), VmState::Running) = (self.agent.as_ref(), was) {
            let left = deadline.saturating_duration_since(Instant::now());
            asked = matches!(
                tokio::time::timeout(left, agent.poweroff()).await,
                Ok(Ok(()))
            );
        }
        if !asked {
            if let Some(m) = self.machine.as_ref() {
                if let Err(e) = m.request_stop() {
                    tracing::debug!(error = %e, "requestStop failed; will stop the VM");
                }
            }
        }
        let outcome = if self.wait_down(deadline).await {
            ShutdownOutcome::Graceful
        } else {
            self.machine("stop")?.stop().await?;
            ShutdownOutcome::Killed
        };
        self.agent = None;
        self.state = VmState::Stopped;
        Ok(outcome)
    }

    async fn kill(&mut self) -> Result<(), VmError> {
        if let Some(m) = self.machine.as_ref() {
            if !m.state().is_down() {
                m.stop().await?;
            }
        }
        self.agent = None;
        self.state = VmState::Stopped;
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        self.expect_state("pause", &[VmState::Running])?;
        self.machine("pause")?.pause().await?;
        self.state = VmState::Paused;
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        self.expect_state("resume", &[VmState::Paused])?;
        self.machine("resume")?.resume().await?;
        self.state = VmState::Running;
        Ok(())
    }

    async fn save_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        self.expect_state("snapshot", &[VmState::Running, VmState::Paused])?;
        if let Err(reason) = self.framework.save_restore_support() {
            return Err(FwError::Unsupported {
                op: "saving a VM snapshot",
                reason,
            }
            .into());
        }
        let was_running = self.state == VmState::Running;
        let machine = self.machine("snapshot")?;
        if was_running {
            machine.pause().await?;
        }
        let saved = machine.save(path).await;
        if was_running {
            machine.resume().await?;
        }
        saved?;
        Sidecar {
            token: self.token.clone(),
            arch: self.config.arch.as_str().to_string(),
        }
        .write(path)
    }

    async fn restore_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        self.expect_state("restore", &[VmState::Created])?;
        if let Err(reason) = self.framework.save_restore_support() {
            return Err(FwError::Unsupported {
                op: "restoring a VM snapshot",
                reason,
            }
            .into());
        }
        let sidecar = Sidecar::read(path)?;
        if sidecar.arch != self.backend_arch.as_str() {
            return Err(VmError::Backend {
                backend: NAME,
                message: format!(
                    "snapshot {} holds an {} guest; this Mac runs {} guests",
                    path.display(),
                    sidecar.arch,
                    self.backend_arch.as_str()
                ),
            });
        }
        // Same token → same command line → a configuration compatible with the saved state.
        let default_log = self.dir.join("console.log");
        let head = read_head(&self.config.kernel, 64)?;
        self.plan = plan(
            &self.config,
            PlanInputs {
                limits: self.framework.limits()?,
                host_arch: self.backend_arch,
                token: &sidecar.token,
                default_console_log: &default_log,
                kernel_head: &head,
            },
        )?;
        self.token = sidecar.token;
        let started = Instant::now();
        let machine = self.build()?;
        machine.restore(path).await?;
        machine.resume().await?;
        self.started = Some(started);
        self.state = VmState::Starting;
        Ok(())
    }
}

impl<F: Framework> Drop for VzVm<F> {
    fn drop(&mut self) {
        if let Some(m) = self.machine.as_ref() {
            if !m.state().is_down() {
                m.stop_detached();
            }
        }
    }
}

/// What a snapshot needs besides the framework's state file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Sidecar {
    token: String,
    arch: String,
}

impl Sidecar {
    fn path(snapshot: &Path) -> PathBuf {
        let mut p = snapshot.as_os_str().to_owned();
        p.push(".vmcp");
        PathBuf::from(p)
    }

    fn write(&self, snapshot: &Path) -> Result<(), VmError> {
        let p = Self::path(snapshot);
        let json = serde_json::to_vec(self).map_err(|e| VmError::Host {
            what: format!("encode {}", p.display()),
            source: e.into(),
        })?;
        std::fs::write(&p, json).map_err(|source| VmError::Host {
            what: format!("write {}", p.display()),
            source,
        })
    }

    fn read(snapshot: &Path) -> Result<Sidecar, VmError> {
        let p = Self::path(snapshot);
        let bytes = std::fs::read(&p).map_err(|source| VmError::Host {
            what: format!(
                "read {} (snapshots need the sidecar vmcp wrote beside them)",
                p.display()
            ),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| VmError::Host {
            what: format!("parse {}", p.display()),
            source: e.into(),
        })
    }
}

/// A new channel token (128 random bits, hex).
fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn read_head(path: &Path, n: usize) -> Result<Vec<u8>, VmError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(n);
    std::fs::File::open(path)
        .and_then(|f| f.take(n as u64).read_to_end(&mut head))
        .map_err(|source| VmError::Host {
            what: format!("read kernel {}", path.display()),
            source,
        })?;
    Ok(head)
}

/// The last `lines` lines of the console log (empty if it cannot be read).
fn console_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! The VZ backend and its [`Machine`], generic over the [`Framework`] seam; the lifecycle
//! itself (states, agent token and handshake, shutdown, snapshot manifest) is the shared
//! [`Lifecycle`].
//!
//! Machine specifics: the framework VM is built from the plan at launch (the plan is made and
//! checked against the framework's limits at create, so a bad config fails early); the agent
//! connects over vsock through [`FwMachine::accept`]; "exited" is the framework state going
//! to stopped or error, polled; a stop without the agent is `requestStop`. State save/restore
//! is the framework's own; a restore rebuilds the VM from a plan carrying the snapshot's
//! token, so the configuration matches the saved one and the reconnecting agent's hello is
//! accepted.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::framework::{Framework, FwError, FwMachine};
use super::plan::{plan, PlanError, PlanInputs, VzPlan};
use crate::agent::AgentStream;
use crate::config::{Arch, VmConfig};
use crate::error::{ConfigError, VmError};
use crate::lifecycle::{AgentConnect, Exit, LaunchError, Lifecycle, Machine};
use crate::{Backend, Probe, Vm, VmCapabilities};

/// Backend name.
pub const NAME: &str = "vz";
/// How often the framework state is polled while waiting for the guest to go down.
const POLL: Duration = Duration::from_millis(20);

impl From<FwError> for VmError {
    fn from(e: FwError) -> Self {
        match e {
            FwError::Entitlement | FwError::NotAvailable(_) => VmError::Unavailable {
                backend: NAME,
                reason: e.to_string(),
            },
            FwError::Host { what, source } => VmError::Host { what, source },
            other
            @ (FwError::Invalid(_) | FwError::Failed { .. } | FwError::Unsupported { .. }) => {
                VmError::Framework(other)
            }
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

/// One VZ VM: the lifecycle over a [`VzMachine`].
pub type VzVm<F> = Lifecycle<VzMachine<F>>;

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

    /// [`Backend::create`] with the concrete type (for framework-specific calls).
    pub fn create_vz(&self, mut config: VmConfig) -> Result<VzVm<F>, VmError> {
        // VZ's NAT attachment has no per-connection forward: an allow-list and published
        // ports travel over the agent channel (see `crate::net`).
        config.net.card = false;
        Lifecycle::prepare(&config, |prepared| {
            let default_console_log = prepared.dir.join("console.log");
            let plan = plan_for(
                self.framework.as_ref(),
                self.host_arch,
                &config,
                &default_console_log,
                prepared.token,
            )?;
            Ok(VzMachine {
                framework: Arc::clone(&self.framework),
                host_arch: self.host_arch,
                default_console_log,
                config: config.clone(),
                plan,
                vm: None,
            })
        })
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

/// One framework VM and the plan it is built from.
pub struct VzMachine<F: Framework> {
    framework: Arc<F>,
    host_arch: Arch,
    default_console_log: std::path::PathBuf,
    config: VmConfig,
    plan: VzPlan,
    vm: Option<Arc<F::Machine>>,
}

impl<F: Framework> VzMachine<F> {
    /// The plan the framework configuration is built from.
    pub fn plan(&self) -> &VzPlan {
        &self.plan
    }

    /// The framework VM, once started or restored.
    pub fn framework_machine(&self) -> Option<&F::Machine> {
        self.vm.as_deref()
    }

    /// Builds the framework VM from a plan for `token` (re-planned when the token differs
    /// from the one at create, as after a restore).
    fn build(&mut self, token: &str) -> Result<Arc<F::Machine>, VmError> {
        if super::plan::cmdline_value(&self.plan.cmdline, "vmcp.token") != Some(token) {
            self.plan = plan_for(
                self.framework.as_ref(),
                self.host_arch,
                &self.config,
                &self.default_console_log,
                token,
            )?;
        }
        let vm = Arc::new(self.framework.build(&self.plan)?);
        self.vm = Some(Arc::clone(&vm));
        Ok(vm)
    }

    fn running(&self, op: &'static str) -> Result<&F::Machine, VmError> {
        self.vm.as_deref().ok_or(VmError::InvalidState {
            op,
            state: crate::VmState::Created,
        })
    }
}

#[async_trait]
impl<F: Framework> Machine for VzMachine<F> {
    fn backend(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> VmCapabilities {
        VmCapabilities {
            snapshot: self.framework.save_restore_support().is_ok(),
            pause: true,
            vsock: true,
        }
    }

    fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read(&self.plan.console_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn is_down(&self) -> bool {
        self.vm.as_ref().is_some_and(|m| m.state().is_down())
    }

    async fn launch(&mut self, token: &str) -> Result<(), LaunchError> {
        let vm = self.build(token)?;
        vm.start().await.map_err(VmError::from)?;
        Ok(())
    }

    fn agent_stream(&mut self) -> AgentConnect {
        let vm = self.vm.clone();
        Box::pin(async move {
            let Some(vm) = vm else {
                return Err(VmError::InvalidState {
                    op: "wait for the agent of",
                    state: crate::VmState::Created,
                });
            };
            let stream: Box<dyn AgentStream> = vm.accept().await?;
            Ok(stream)
        })
    }

    async fn wait_exit(&mut self) -> Exit {
        let Some(vm) = self.vm.as_ref() else {
            return Exit::new("the VM was never started");
        };
        loop {
            let s = vm.state();
            if s.is_down() {
                return Exit::new(format!("framework state {s:?}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn request_stop(&mut self) -> Result<bool, VmError> {
        self.running("stop")?.request_stop()?;
        Ok(true)
    }

    async fn kill(&mut self) -> Result<(), VmError> {
        if let Some(vm) = self.vm.as_ref() {
            if !vm.state().is_down() {
                vm.stop().await?;
            }
        }
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmError> {
        Ok(self.running("pause")?.pause().await?)
    }

    async fn resume(&mut self) -> Result<(), VmError> {
        Ok(self.running("resume")?.resume().await?)
    }

    fn snapshot_support(&self) -> Result<(), VmError> {
        if !self.config.net.publish.is_empty() {
            return Err(VmError::Unsupported(
                "save, checkpoint or restore a VM with published ports (a fork could not have \
                 the same host ports)",
            ));
        }
        self.framework.save_restore_support().map_err(|reason| {
            FwError::Unsupported {
                op: "saving or restoring a VM snapshot",
                reason,
            }
            .into()
        })
    }

    fn channel_net(&self) -> crate::net::ChannelNet {
        self.config.net.channel_net()
    }

    async fn save_state(&mut self, path: &Path) -> Result<(), VmError> {
        Ok(self.running("snapshot")?.save(path).await?)
    }

    async fn load_state(&mut self, path: &Path, token: &str) -> Result<(), LaunchError> {
        // Same token → same command line → a configuration compatible with the saved state.
        let vm = self.build(token)?;
        vm.restore(path).await.map_err(VmError::from)?;
        vm.resume().await.map_err(VmError::from)?;
        Ok(())
    }
}

impl<F: Framework> Drop for VzMachine<F> {
    fn drop(&mut self) {
        if let Some(m) = self.vm.as_ref() {
            if !m.state().is_down() {
                m.stop_detached();
            }
        }
    }
}

/// VZ-specific queries on a VZ VM.
impl<F: Framework> Lifecycle<VzMachine<F>> {
    /// The plan the framework configuration is built from.
    pub fn plan(&self) -> &VzPlan {
        self.machine().plan()
    }

    /// The framework VM, once started or restored.
    pub fn framework_machine(&self) -> Option<&F::Machine> {
        self.machine().framework_machine()
    }
}

/// Plans a VM of `config` for `token`, checked against the framework's limits.
fn plan_for<F: Framework>(
    framework: &F,
    host_arch: Arch,
    config: &VmConfig,
    default_console_log: &Path,
    token: &str,
) -> Result<VzPlan, VmError> {
    let limits = framework.limits()?;
    let head = read_head(&config.kernel, 64)?;
    Ok(plan(
        config,
        PlanInputs {
            limits,
            host_arch,
            token,
            default_console_log,
            kernel_head: &head,
        },
    )?)
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

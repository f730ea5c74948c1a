//! The VM lifecycle API of vmcp.
//!
//! A [`VmConfig`] goes in, a running VM with a guest agent comes out:
//!
//! ```text
//! Backend::probe()        -> is this backend usable here, and if not why
//! Backend::create(config) -> Box<dyn Vm>      (validated, runtime dir made, nothing running)
//! Vm::start()                                 (hypervisor process / framework VM running)
//! Vm::wait_ready(timeout) -> AgentInfo        (guest agent said hello on the channel)
//! Vm::agent()             -> AgentClient      (exec, files, ping; cheap to clone, concurrent)
//! Vm::shutdown(timeout)                       (poweroff request, hard kill on timeout)
//! drop                                        (kills whatever still runs, removes runtime dir)
//! ```
//!
//! Backends live in one module each, compiled only where they can run (`cfg` on the `mod` line):
//! [`qemu`] everywhere QEMU exists (KVM/TCG on Linux, HVF on macOS, WHPX on Windows). The
//! macOS Virtualization.framework and Windows Hypervisor Platform backends implement the same
//! traits. [`fake`] is an in-process backend for tests of the generic logic.
//!
//! The host side of the guest channel, [`agent::AgentClient`], is backend-neutral: a backend
//! hands it a byte stream (Unix socket, vsock, TCP, named pipe) and it does the handshake and
//! multiplexes requests.

pub mod agent;
mod config;
mod disk_image;
mod error;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod lifecycle;
pub mod net;
pub mod qemu;
pub mod select;
pub mod timing;
pub mod vz;

pub use config::{
    Accel, Arch, BackendKind, DiskConfig, ImageConfig, ShareConfig, VmConfig, MIN_MEMORY_MIB,
};
pub use error::{ErrorClass, VmError};
pub use lifecycle::Checkpoint;
pub use net::{EgressGate, NetConfig, NetMode, PortForward};
pub use vmcp_host_process::{new_vm_id, RuntimeDir};

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

/// Whether a backend can run VMs on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Probe {
    /// Usable; `detail` says how (e.g. `"qemu 10.0.2, accel tcg"`).
    Usable {
        /// Human-readable details.
        detail: String,
    },
    /// Not usable here, with the reason and what to do about it.
    Unusable {
        /// Why not, and the fix, in one sentence.
        reason: String,
    },
}

/// A hypervisor backend: probes the host and creates VMs.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Short stable name (`"qemu"`, `"vz"`, `"whp"`, `"fake"`).
    fn name(&self) -> &'static str;
    /// Whether this backend can run VMs here.
    async fn probe(&self) -> Probe;
    /// Whether this backend can run `config` here, and with which accelerator; the error says
    /// why not (for [`select::select`]). The default suits backends without an accelerator
    /// choice: usable when [`Backend::probe`] says so, and only without
    /// [`VmConfig::accel`].
    async fn fit(&self, config: &VmConfig) -> Result<select::Fit, VmError> {
        if let Some(accel) = config.accel {
            return Err(error::ConfigError::Unsupported(format!(
                "backend {} has no accelerator choice (--accel {accel} is for QEMU)",
                self.name()
            ))
            .into());
        }
        match self.probe().await {
            Probe::Usable { .. } => Ok(select::Fit::default()),
            Probe::Unusable { reason } => Err(VmError::Unavailable {
                backend: self.name(),
                reason,
            }),
        }
    }
    /// This backend's section of `vmcp doctor`. The default is the probe as one check.
    async fn checks(&self) -> select::Section {
        let check = match self.probe().await {
            Probe::Usable { detail } => select::Check::new(self.name(), true, detail),
            Probe::Unusable { reason } => select::Check::new(self.name(), false, reason),
        };
        select::Section::new(format!("{} backend", self.name()), vec![check])
    }
    /// Validates `config` and prepares a VM (runtime directory, command line); starts nothing.
    async fn create(&self, config: VmConfig) -> Result<Box<dyn Vm>, VmError>;
}

/// Lifecycle state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum VmState {
    /// Created, not started.
    Created,
    /// Hypervisor running, agent not ready yet.
    Starting,
    /// Agent ready.
    Running,
    /// Paused (where supported).
    Paused,
    /// Shutting down.
    Stopping,
    /// Stopped (cleanly or killed).
    Stopped,
}

/// Optional features of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct VmCapabilities {
    /// Snapshot save/restore.
    pub snapshot: bool,
    /// Pause/resume.
    pub pause: bool,
    /// Agent channel over vsock (else virtio-serial or similar).
    pub vsock: bool,
}

/// What the guest agent announced when it became ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Agent protocol version.
    pub protocol_version: u16,
    /// Agent build version.
    pub agent_version: String,
    /// Agent capabilities.
    pub capabilities: vmcp_guest_proto::Capabilities,
    /// Guest boot clock when the agent said hello.
    pub guest_boot: Duration,
    /// Host wall time from [`Vm::start`] to the hello.
    pub ready_after: Duration,
}

/// How [`Vm::shutdown`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest powered off by itself after the request.
    Graceful,
    /// The guest did not stop in time (or could not be asked) and was killed.
    Killed,
    /// It was not running.
    AlreadyStopped,
}

/// One VM. Dropping it kills the VM and removes its runtime directory.
#[async_trait]
pub trait Vm: Send + Sync {
    /// Unique id (also the runtime directory's name).
    fn id(&self) -> &str;
    /// Current state.
    fn state(&self) -> VmState;
    /// Optional features.
    fn capabilities(&self) -> VmCapabilities;
    /// The VM's private runtime directory (sockets, logs).
    fn runtime_dir(&self) -> &Path;
    /// The counters and recent refusals of the VM's egress proxy (allow-list network only;
    /// they stay readable after the proxy stopped). The default: no proxy.
    fn egress_stats(&self) -> Option<std::sync::Arc<vmcp_egress::Stats>> {
        None
    }
    /// Starts the VM.
    async fn start(&mut self) -> Result<(), VmError>;
    /// Waits until the guest agent is ready, at most `timeout`.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<AgentInfo, VmError>;
    /// A session with the guest agent; cheap to clone, usable concurrently.
    fn agent(&self) -> Result<agent::AgentClient, VmError>;
    /// Asks the guest to power off; kills the VM if it has not stopped after `timeout`.
    async fn shutdown(&mut self, timeout: Duration) -> Result<ShutdownOutcome, VmError>;
    /// Stops the VM at once.
    async fn kill(&mut self) -> Result<(), VmError>;
    /// Freezes the guest's vCPUs (capability `pause`). The default says the backend cannot.
    async fn pause(&mut self) -> Result<(), VmError> {
        Err(VmError::Unsupported("pause a VM"))
    }
    /// Lets a paused guest run again (capability `pause`).
    async fn resume(&mut self) -> Result<(), VmError> {
        Err(VmError::Unsupported("resume a VM"))
    }
    /// Writes the state of a running or paused VM to `path` (capability `snapshot`); the VM
    /// is left in the state it was in. The snapshot can only be restored by a VM created from
    /// the same [`VmConfig`] on the same host.
    async fn save_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        let _ = path;
        Err(VmError::Unsupported("save a VM snapshot"))
    }
    /// Instead of [`Vm::start`]: brings a VM that was never started up from a snapshot written
    /// by [`Vm::save_snapshot`]. Follow with [`Vm::wait_ready`]: the restored agent reconnects
    /// its channel and says hello again.
    async fn restore_snapshot(&mut self, path: &Path) -> Result<(), VmError> {
        let _ = path;
        Err(VmError::Unsupported("restore a VM snapshot"))
    }
    /// Saves the running (or paused) VM as a [`Checkpoint`], pausing it only while the state
    /// is written, and leaves it in the state it was in (capability `snapshot`). The files
    /// live in the VM's runtime directory until the handle (all its clones) or the VM is
    /// dropped; a VM holds at most [`lifecycle::MAX_CHECKPOINTS`].
    async fn checkpoint(&mut self) -> Result<Checkpoint, VmError> {
        Err(VmError::Unsupported("checkpoint a VM"))
    }
    /// Brings this VM back to `checkpoint` (taken of it): the same id, runtime directory and
    /// hostname, a new agent token (open agent sessions end; take a new one with
    /// [`Vm::agent`]), a reseeded guest RNG and the host's clock. Files the guest wrote
    /// after the checkpoint are gone. On failure the VM runs on as it was.
    async fn rewind(
        &mut self,
        checkpoint: &Checkpoint,
        timeout: Duration,
    ) -> Result<AgentInfo, VmError> {
        let _ = (checkpoint, timeout);
        Err(VmError::Unsupported("rewind a VM"))
    }
    /// `n` (1 to [`lifecycle::MAX_FORKS`]) new VMs that continue from `checkpoint` (taken of
    /// this VM), each ready, with its own id, runtime directory, agent token, reseeded RNG
    /// and hostname. All or nothing. This VM is not touched.
    async fn fork(
        &self,
        checkpoint: &Checkpoint,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Box<dyn Vm>>, VmError> {
        let _ = (checkpoint, n, timeout);
        Err(VmError::Unsupported("fork a VM"))
    }
}

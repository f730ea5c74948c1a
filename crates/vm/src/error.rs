//! Errors of the VM lifecycle API.

use std::path::PathBuf;
use std::time::Duration;

/// A problem with a [`crate::VmConfig`] or a command-line value that feeds it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The network settings cannot be used (with this backend or host).
    #[error("network: {0}")]
    Network(String),
    /// vCPU count out of range.
    #[error("invalid vCPU count {0}: use 1 to {max}", max = crate::config::MAX_CPUS)]
    Cpus(u32),
    /// Memory below the minimum.
    #[error("memory of {0} MiB is too small: the guest image needs at least {min} MiB", min = crate::MIN_MEMORY_MIB)]
    MemoryTooSmall(u32),
    /// A file the VM needs is missing or unreadable.
    #[error("{what} {path} cannot be read (run `vmcp image build`, or check the path)")]
    Missing {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A path that must be a regular file is not.
    #[error("{what} {path} is not a regular file")]
    NotAFile {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// The root filesystem image is not a usable ext4 image.
    #[error("rootfs {path}: {problem}")]
    BadRootfs {
        /// Its path.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A kernel command-line argument is empty or has whitespace.
    #[error("kernel command-line argument {0:?} is empty or contains whitespace")]
    CmdlineArg(String),
    /// Unknown accelerator name.
    #[error("unknown accelerator {0:?}: use kvm or tcg (Linux), whpx or tcg (Windows)")]
    UnknownAccel(String),
    /// Unknown backend name.
    #[error("unknown backend {0:?}: use qemu (Linux, Windows) or vz (macOS)")]
    UnknownBackend(String),
    /// The named backend is not part of this build for this OS.
    #[error("backend {backend} does not exist on this OS: this build has {compiled}")]
    BackendNotHere {
        /// The backend asked for.
        backend: crate::BackendKind,
        /// The backends this build has.
        compiled: String,
    },
    /// Unknown architecture name.
    #[error("unknown architecture {0:?}: use x86_64 or aarch64")]
    UnknownArch(String),
    /// The backend cannot honour a setting.
    #[error("{0}")]
    Unsupported(String),
}

/// Errors of the VM lifecycle.
///
/// Each variant names the step that failed and keeps its cause as the `source`, so callers can
/// tell "QEMU is missing" ([`ErrorClass::HostSetup`]) from "the guest crashed"
/// ([`ErrorClass::Guest`]) from "bad configuration" ([`ErrorClass::Config`]): see
/// [`VmError::class`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid VM configuration")]
    Config(#[from] ConfigError),
    /// The backend cannot run here.
    #[error("backend {backend} is unavailable: {reason}")]
    Unavailable {
        /// Backend name.
        backend: &'static str,
        /// Why, and what to do.
        reason: String,
    },
    /// The operation is not valid in the VM's current state.
    #[error("cannot {op} a VM that is {state:?}")]
    InvalidState {
        /// Operation.
        op: &'static str,
        /// State at the time.
        state: crate::VmState,
    },
    /// Preparing the runtime directory or another host resource failed.
    #[error("cannot {what}")]
    Host {
        /// What was being done.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The VM's private runtime directory could not be made.
    #[error(transparent)]
    RuntimeDir(#[from] vmcp_host_process::RuntimeDirError),
    /// Starting the hypervisor failed.
    #[error("cannot start the hypervisor")]
    Spawn(#[source] std::io::Error),
    /// The hypervisor exited before the agent was ready.
    #[error(
        "the VM stopped before its agent was ready ({status}); last console lines:\n{console_tail}"
    )]
    EarlyExit {
        /// Exit status description.
        status: String,
        /// End of the console log.
        console_tail: String,
    },
    /// The agent did not become ready in time.
    #[error(
        "the guest agent was not ready after {timeout:?}; last console lines:\n{console_tail}"
    )]
    ReadyTimeout {
        /// How long we waited.
        timeout: Duration,
        /// End of the console log.
        console_tail: String,
    },
    /// The agent channel failed.
    #[error("guest agent channel failed")]
    Agent(#[from] crate::agent::AgentError),
    /// The backend (or this OS version) does not offer the operation; see
    /// [`crate::VmCapabilities`].
    #[error("this backend cannot {0} here")]
    Unsupported(&'static str),
    /// QEMU did not carry out a QMP command.
    #[error("QEMU did not carry out {command}")]
    Qmp {
        /// The QMP command (`stop`, `cont`, `query-status`, ...).
        command: &'static str,
        /// What QMP said or how the connection failed.
        source: crate::qemu::qmp::QmpError,
    },
    /// A Virtualization.framework call failed.
    #[error("the vz backend failed")]
    Framework(#[source] crate::vz::FwError),
    /// The hypervisor did something the lifecycle cannot work with (reported a wrong state,
    /// did not die when killed); `what` says what, there is no further cause.
    #[error("{backend}: {what}")]
    Hypervisor {
        /// Backend name.
        backend: &'static str,
        /// What happened.
        what: String,
    },
    /// Saving a snapshot's state failed.
    #[error("cannot save the VM snapshot")]
    SnapshotSave(#[source] crate::qemu::snapshot::SnapshotError),
    /// Restoring a snapshot's state failed.
    #[error("cannot restore the VM snapshot")]
    SnapshotRestore(#[source] crate::qemu::snapshot::SnapshotError),
    /// A snapshot's manifest is missing, unreadable or does not fit this VM.
    #[error("cannot use snapshot {path}", path = .0.snapshot().display())]
    Snapshot(#[from] crate::lifecycle::ManifestError),
    /// A checkpoint, rewind or fork request that cannot be carried out as asked (a bound, a
    /// checkpoint of another VM); the text says what to do.
    #[error("{0}")]
    Checkpoint(String),
}

/// `error` and its sources on one line: `a: b: c`.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// What kind of problem a [`VmError`] is, for callers that react differently (retry with
/// another backend, report a guest crash, ask the user to fix the input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The input (VM config, snapshot file, command-line value) is wrong: fix it.
    Config,
    /// This host lacks something (hypervisor, QEMU, entitlement, permissions, disk space).
    HostSetup,
    /// The guest crashed, hung, or spoke the protocol wrongly.
    Guest,
    /// The hypervisor misbehaved or refused an operation.
    Hypervisor,
    /// The caller asked for something the VM cannot do now (wrong state, unsupported).
    Usage,
}

impl VmError {
    /// The kind of problem. Every variant is classified here without a wildcard, so a new
    /// variant forces a decision.
    pub fn class(&self) -> ErrorClass {
        match self {
            VmError::Config(_) | VmError::Snapshot(_) => ErrorClass::Config,
            VmError::SnapshotSave(e) | VmError::SnapshotRestore(e) => e.class(),
            VmError::Unavailable { .. }
            | VmError::Host { .. }
            | VmError::RuntimeDir(_)
            | VmError::Spawn(_) => ErrorClass::HostSetup,
            VmError::EarlyExit { .. } | VmError::ReadyTimeout { .. } | VmError::Agent(_) => {
                ErrorClass::Guest
            }
            VmError::InvalidState { .. } | VmError::Unsupported(_) | VmError::Checkpoint(_) => {
                ErrorClass::Usage
            }
            VmError::Qmp { .. } | VmError::Hypervisor { .. } => ErrorClass::Hypervisor,
            VmError::Framework(e) => match e {
                crate::vz::FwError::Entitlement
                | crate::vz::FwError::NotAvailable(_)
                | crate::vz::FwError::Host { .. } => ErrorClass::HostSetup,
                crate::vz::FwError::Invalid(_) => ErrorClass::Config,
                crate::vz::FwError::Failed { .. } => ErrorClass::Hypervisor,
                crate::vz::FwError::Unsupported { .. } => ErrorClass::Usage,
            },
        }
    }

    /// The guest crashed, hung or misbehaved (not the host's or the caller's fault).
    pub fn is_guest_fault(&self) -> bool {
        self.class() == ErrorClass::Guest
    }

    /// Something is missing or broken on this host; another backend may work.
    pub fn is_host_setup(&self) -> bool {
        self.class() == ErrorClass::HostSetup
    }

    /// The input is wrong; retrying the same input cannot help.
    pub fn is_config(&self) -> bool {
        self.class() == ErrorClass::Config
    }
}

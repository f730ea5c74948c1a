//! Errors of the VM lifecycle API.

use std::path::PathBuf;
use std::time::Duration;

/// A problem with a [`crate::VmConfig`] or a command-line value that feeds it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
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
    /// A kernel command-line argument is empty or has whitespace.
    #[error("kernel command-line argument {0:?} is empty or contains whitespace")]
    CmdlineArg(String),
    /// Unknown accelerator name.
    #[error("unknown accelerator {0:?}: use kvm, tcg, hvf or whpx")]
    UnknownAccel(String),
    /// Unknown architecture name.
    #[error("unknown architecture {0:?}: use x86_64 or aarch64")]
    UnknownArch(String),
    /// The backend cannot honour a setting.
    #[error("{0}")]
    Unsupported(String),
}

/// Errors of the VM lifecycle.
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
    /// A hypervisor-specific failure.
    #[error("{backend}: {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

//! The seam between the VZ lifecycle logic and Virtualization.framework.
//!
//! [`Framework`] and [`FwMachine`] are what the Objective-C layer (`objc.rs`, macOS only)
//! implements, one small safe method per framework call; the VZ machine in `vm.rs` (and over
//! it the generic lifecycle) is generic over them, so a fault-injecting fake drives it in tests on any OS.
//!
//! Every asynchronous framework call (`start`, `stop`, `pause`, `resume`, save, restore) is
//! an `async fn` here: the macOS layer issues it on the VM's own serial dispatch queue and
//! bridges its completion handler to a tokio oneshot channel. Guest connections to the agent
//! port arrive through [`FwMachine::accept`].

use std::path::Path;

use async_trait::async_trait;

use super::plan::{VzLimits, VzPlan};
use crate::agent::AgentStream;

/// `VZVirtualMachineState`, as Rust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwState {
    /// Not started, or stopped.
    Stopped,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// The framework hit an internal error; the VM is gone.
    Error,
    /// Starting.
    Starting,
    /// Pausing.
    Pausing,
    /// Resuming.
    Resuming,
    /// Stopping.
    Stopping,
    /// Saving its state.
    Saving,
    /// Restoring its state.
    Restoring,
}

impl FwState {
    /// The guest is gone: stopped, or failed inside the framework.
    pub fn is_down(self) -> bool {
        matches!(self, FwState::Stopped | FwState::Error)
    }
}

/// A failed framework call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FwError {
    /// The process lacks the virtualization entitlement.
    #[error("this vmcp binary is not signed with the com.apple.security.virtualization entitlement: sign it with `packaging/macos/codesign.sh <path-to-vmcp>` (docs/macos.md)")]
    Entitlement,
    /// Virtualization is not available on this Mac at all.
    #[error("Virtualization.framework is not available on this Mac ({0}); vmcp has no other backend that runs VMs on macOS")]
    NotAvailable(String),
    /// `validateWithError` or a device initialiser rejected the configuration.
    #[error("Virtualization.framework rejected the VM configuration: {0}")]
    Invalid(String),
    /// An operation failed.
    #[error("Virtualization.framework could not {op}: {message}")]
    Failed {
        /// What was attempted (`"start the VM"`).
        op: &'static str,
        /// The framework's description.
        message: String,
    },
    /// The operation needs a newer macOS, or this configuration cannot do it.
    #[error("{op} is not available here: {reason}")]
    Unsupported {
        /// What was attempted.
        op: &'static str,
        /// Why not.
        reason: String,
    },
    /// A host-side resource (console log file, vsock descriptor) failed.
    #[error("cannot {what}")]
    Host {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// `VZErrorInvalidVirtualMachineConfiguration`.
pub const VZ_ERROR_INVALID_CONFIGURATION: i64 = 2;
/// `VZErrorNotSupported`.
pub const VZ_ERROR_NOT_SUPPORTED: i64 = 10;

/// Turns an `NSError` (code, localized description and failure reason) from the framework
/// into an [`FwError`]: a missing entitlement is recognised by the entitlement's name in the
/// text, which is how the framework reports it.
pub fn classify(op: &'static str, code: i64, description: &str, reason: Option<&str>) -> FwError {
    let message = match reason {
        Some(r) if !r.is_empty() && !description.contains(r) => format!("{description} ({r})"),
        _ => description.to_string(),
    };
    if message.contains("com.apple.security.virtualization") {
        return FwError::Entitlement;
    }
    match code {
        VZ_ERROR_INVALID_CONFIGURATION => FwError::Invalid(message),
        VZ_ERROR_NOT_SUPPORTED => FwError::Unsupported {
            op,
            reason: message,
        },
        _ => FwError::Failed { op, message },
    }
}

/// Virtualization.framework on this machine.
pub trait Framework: Send + Sync + 'static {
    /// The VM type it builds.
    type Machine: FwMachine;
    /// The framework's limits, or why virtualization is unavailable here.
    fn limits(&self) -> Result<VzLimits, FwError>;
    /// Whether this OS can save and restore VM state (macOS 14+), or why not.
    fn save_restore_support(&self) -> Result<(), String>;
    /// Builds and validates the configuration from `plan`, creates the VM on its own queue and
    /// listens on the agent port. Starts nothing.
    fn build(&self, plan: &VzPlan) -> Result<Self::Machine, FwError>;
}

/// One framework VM (`VZVirtualMachine`, its queue and its vsock listener).
#[async_trait]
pub trait FwMachine: Send + Sync + 'static {
    /// `state`.
    fn state(&self) -> FwState;
    /// `startWithCompletionHandler:`.
    async fn start(&self) -> Result<(), FwError>;
    /// `requestStopWithError:` (asks the guest to power off; returns at once).
    fn request_stop(&self) -> Result<(), FwError>;
    /// `stopWithCompletionHandler:` (hard stop).
    async fn stop(&self) -> Result<(), FwError>;
    /// Issues a hard stop without waiting (for `Drop`).
    fn stop_detached(&self);
    /// `pauseWithCompletionHandler:`.
    async fn pause(&self) -> Result<(), FwError>;
    /// `resumeWithCompletionHandler:`.
    async fn resume(&self) -> Result<(), FwError>;
    /// `saveMachineStateToURL:completionHandler:` (VM must be paused).
    async fn save(&self, path: &Path) -> Result<(), FwError>;
    /// `restoreMachineStateFromURL:completionHandler:` (VM must be stopped; ends paused).
    async fn restore(&self, path: &Path) -> Result<(), FwError>;
    /// The next connection the guest made to the agent port.
    async fn accept(&self) -> Result<Box<dyn AgentStream>, FwError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_entitlement_recognised_anywhere_in_the_text() {
        let e = classify(
            "create the VM",
            VZ_ERROR_INVALID_CONFIGURATION,
            "Invalid virtual machine configuration.",
            Some("The process doesn’t have the “com.apple.security.virtualization” entitlement."),
        );
        assert!(matches!(e, FwError::Entitlement));
        assert!(e.to_string().contains("codesign.sh"), "{e}");
        let e = classify(
            "start the VM",
            1,
            "lacks com.apple.security.virtualization",
            None,
        );
        assert!(matches!(e, FwError::Entitlement));
    }

    #[test]
    fn codes_map_to_variants_with_readable_messages() {
        let e = classify(
            "validate the configuration",
            VZ_ERROR_INVALID_CONFIGURATION,
            "Invalid virtual machine configuration.",
            Some("The memory size must be a multiple of 1 MB."),
        );
        assert_eq!(
            e.to_string(),
            "Virtualization.framework rejected the VM configuration: Invalid virtual machine configuration. (The memory size must be a multiple of 1 MB.)"
        );
        let e = classify("save the VM state", VZ_ERROR_NOT_SUPPORTED, "no", None);
        assert!(matches!(
            e,
            FwError::Unsupported {
                op: "save the VM state",
                ..
            }
        ));
        let e = classify(
            "start the VM",
            1,
            "Internal error.",
            Some("Internal error."),
        );
        assert_eq!(
            e.to_string(),
            "Virtualization.framework could not start the VM: Internal error."
        );
    }

    #[test]
    fn down_states() {
        assert!(FwState::Stopped.is_down());
        assert!(FwState::Error.is_down());
        for s in [
            FwState::Running,
            FwState::Paused,
            FwState::Starting,
            FwState::Pausing,
            FwState::Resuming,
            FwState::Stopping,
            FwState::Saving,
            FwState::Restoring,
        ] {
            assert!(!s.is_down(), "{s:?}");
        }
    }
}

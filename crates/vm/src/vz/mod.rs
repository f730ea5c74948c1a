//! Backend on Apple's Virtualization.framework (macOS 13+, Apple Silicon and Intel).
//!
//! Three layers, only the last of which is macOS-specific:
//!
//! 1. [`plan`]: [`crate::VmConfig`] → [`plan::VzPlan`], pure Rust, checked against the
//!    framework's limits; compiled and tested everywhere.
//! 2. [`VzBackend`] / [`VzMachine`]: the lifecycle's [`crate::lifecycle::Machine`] for the
//!    framework (build and start, vsock agent stream, requestStop, hard stop, pause/resume,
//!    state save/restore), generic over the [`Framework`] / [`FwMachine`] seam, so a
//!    fault-injecting fake drives it, and the shared lifecycle over it, in tests on Linux.
//! 3. `objc` (macOS only): the seam implemented over `objc2-virtualization`. It builds the
//!    `VZVirtualMachineConfiguration` from the plan, creates the `VZVirtualMachine` on its own
//!    serial dispatch queue, runs every call on that queue and bridges completion handlers to
//!    tokio oneshot channels; the guest's vsock connections to the agent port arrive through a
//!    `VZVirtioSocketListener` delegate as file descriptors wrapped in tokio streams. All of
//!    the crate's Objective-C `unsafe` is in that one module.
//!
//! # Limits
//! - The framework runs guests of the host's architecture only, and on arm64 it boots only an
//!   uncompressed `Image` kernel (the plan checks both).
//! - The process needs the `com.apple.security.virtualization` entitlement (see
//!   `packaging/macos/` and `docs/macos.md`); without it the framework's refusal is turned into
//!   an [`crate::VmError::Unavailable`] that says how to sign the binary.
//! - Save/restore needs macOS 14; on macOS 13 the `snapshot` capability is off and the calls
//!   return an error naming the OS requirement.
//! - The VM runs in a framework-owned helper process that ends with the vmcp process, so no
//!   VM outlives vmcp; dropping a [`VzVm`] also issues a hard stop.
//!
//! Everything in layer 3 is compile-checked for `aarch64-apple-darwin` and
//! `x86_64-apple-darwin` on Linux CI; it has not been run on a Mac by this project's CI.

mod framework;
pub mod plan;
mod vm;

#[cfg(all(unix, any(target_os = "macos", test)))]
mod channel;
#[cfg(test)]
mod fake;
#[cfg(target_os = "macos")]
mod objc;
#[cfg(test)]
mod tests;

#[cfg(not(target_os = "macos"))]
pub use elsewhere::native_backends;
pub use framework::{classify, Framework, FwError, FwMachine, FwState};
#[cfg(target_os = "macos")]
pub use objc::{apple_backend, native_backends, AppleFramework};

/// Off macOS there is no Virtualization.framework.
#[cfg(not(target_os = "macos"))]
mod elsewhere {
    /// The framework backends of this OS, for [`crate::select::backends`]: none here.
    pub fn native_backends() -> Vec<Box<dyn crate::Backend>> {
        Vec::new()
    }
}
pub use vm::{VzBackend, VzMachine, VzVm, NAME};

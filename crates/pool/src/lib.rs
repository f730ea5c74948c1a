//! The warm pool behind `vmcp daemon`, and the daemon's socket protocol.
//!
//! - [`pool`]: ready VMs per profile, refilled in the background within a memory budget, each
//!   handed out once and destroyed after use; generic over a [`pool::Source`] (the daemon's
//!   restores QEMU snapshots, tests use a fake). Every platform.
//! - [`proto`]: versioned, length-prefixed, bounded frames between `vmcp run` and the daemon
//!   (sans-IO). Every platform.
//! - `server` and `client` (Linux): a private Unix socket with a peer-credential check; the
//!   daemon passes a pooled VM's agent channel to the client with `SCM_RIGHTS`, and the
//!   client runs its program over the guest protocol directly (no relay through the daemon).
//!
//! ```
//! use vmcp_pool::proto::{encode, split_frame, decode_request, Request, VmRequest, MAX_REQUEST};
//! let frame = encode(&Request::Acquire(VmRequest::new(1, 256)), MAX_REQUEST).unwrap();
//! let (payload, _) = split_frame(&frame, MAX_REQUEST).unwrap().unwrap();
//! assert_eq!(decode_request(payload).unwrap(), Request::Acquire(VmRequest::new(1, 256)));
//! ```

pub mod pool;
pub mod proto;

#[cfg(target_os = "linux")]
pub mod client;
#[cfg(target_os = "linux")]
pub mod server;
#[cfg(target_os = "linux")]
#[path = "sys_linux.rs"]
pub mod sys;

pub use pool::{Lease, NoVm, Pool, ProfileSpec, Source};

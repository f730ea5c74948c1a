//! The vmcp guest agent: `/init` of the micro-VM and the server of host requests.
//!
//! The `vmcp-agent` binary is a static musl executable that the image builder installs as
//! `/init` of the initramfs. As PID 1 it mounts `/proc`, `/sys`, `/dev` (devtmpfs), `/tmp`,
//! `/run` and `/dev/shm`, loads the kernel modules listed in [`MODULES_LIST`] (in that
//! order, with `finit_module`; there is no `modules.dep` in the image), mounts the root
//! filesystem if one is attached and switches into it, opens the channel to the host, sends
//! a [`vmcp_guest_proto::Hello`] and serves [`vmcp_guest_proto::HostMsg`] requests until the
//! host asks for power-off (then it syncs and powers the VM off). It reaps every zombie.
//!
//! # Kernel command line
//!
//! The host tells the agent what to do through `vmcp.*` kernel parameters; see [`cmdline`]
//! for the full table. A typical QEMU line ends with
//! `-append "... vmcp.token=<random> vmcp.channel=virtio-serial:vmcp.agent"` and has a
//! `virtserialport` named `vmcp.agent`.
//!
//! # Using the server in-process
//!
//! [`serve`] is the whole request logic, independent of PID-1 duties, so host tests can run
//! a real agent over a socket pair:
//!
//! ```no_run
//! # #[cfg(unix)] {
//! use std::os::unix::net::UnixStream;
//! use vmcp_guest_agent::{hello, serve, ServeOptions};
//!
//! let (host_end, guest_end) = UnixStream::pair().unwrap();
//! let reader = guest_end.try_clone().unwrap();
//! std::thread::spawn(move || {
//!     let options = ServeOptions::new(hello("token", false));
//!     serve(reader, guest_end, &options)
//! });
//! // talk vmcp-guest-proto frames over `host_end`
//! # drop(host_end); }
//! ```
//!
//! # Platforms
//!
//! `/init` duties are Linux-only. The request server builds on every Unix. On other
//! systems the binary only prints that it runs inside a Linux guest.

#[cfg(unix)]
pub mod changes;
pub mod cmdline;
#[cfg(unix)]
pub mod export;
#[cfg(target_os = "linux")]
pub mod init;
#[cfg(unix)]
mod program_path;
#[cfg(unix)]
mod serve;
#[cfg(unix)]
mod sys;
#[cfg(unix)]
mod threads;
#[cfg(not(target_os = "linux"))]
mod unsupported;

#[cfg(target_os = "linux")]
pub use init::main;
#[cfg(unix)]
pub use serve::{
    serve, RekeyFn, ServeEnd, ServeError, ServeOptions, DEFAULT_PATH, LINGER, MAX_HOSTNAME,
    MAX_TUNNEL_CONNECTIONS, MAX_TUNNEL_PORTS, MAX_WAITING_ACCEPTS, MIN_REKEY_ENTROPY,
};
#[cfg(not(target_os = "linux"))]
pub use unsupported::main;

use vmcp_guest_proto::{Capabilities, Hello, PROTOCOL_VERSION};

/// Path (in the initramfs) of the list of kernel modules to load, one path per line, in
/// load order. Written by the image builder.
pub const MODULES_LIST: &str = "/etc/vmcp/modules";

/// Version of this agent, sent in the hello.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Capabilities of this agent build.
pub fn capabilities(rootfs: bool) -> Capabilities {
    let mut bits = Capabilities::EXEC
        | Capabilities::FILES
        | Capabilities::POWEROFF
        | Capabilities::SIGNAL
        | Capabilities::REKEY
        | Capabilities::TCP;
    if rootfs {
        bits |= Capabilities::ROOTFS;
    }
    Capabilities(bits)
}

/// A hello for this agent with `token`; `boot_ns` is 0 (the `/init` path fills it in).
pub fn hello(token: &str, rootfs: bool) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: AGENT_VERSION.to_string(),
        capabilities: capabilities(rootfs),
        token: token.to_string(),
        boot_ns: 0,
    }
}

//! The sandbox tools of `vmcp mcp serve`: micro-VMs an agent creates, runs commands in,
//! reads and writes files of, and destroys, through MCP tool calls.
//!
//! - [`manager::Manager`]: live sandboxes within limits (count, memory budget), owned by
//!   client sessions, reaped on idle timeout, lifetime, and end of session (after a grace
//!   period for reconnects); background processes with bounded, cursor-addressed output.
//! - [`tools::SandboxTools`]: the [`vmcp_mcp_server::ToolSet`] with the tool schemas.
//! - [`manager::VmFactory`]: where VMs come from (the CLI boots the built guest image on
//!   QEMU; tests use `vmcp_vm::fake`).
//!
//! Platforms: wherever the vm crate has a backend; the logic is tested with the fake backend.
//!
//! ```no_run
//! # async fn demo(factory: std::sync::Arc<dyn vmcp_sandbox::manager::VmFactory>) -> Result<(), Box<dyn std::error::Error>> {
//! use vmcp_sandbox::manager::{Limits, Manager};
//! use vmcp_sandbox::tools::SandboxTools;
//! let manager = Manager::new(factory, Limits::default());
//! let server = vmcp_mcp_server::Server::new(SandboxTools::new(manager.clone()), Default::default())?;
//! vmcp_mcp_server::stdio::serve(&server, tokio::io::stdin(), tokio::io::stdout(), &Default::default()).await?;
//! manager.shutdown_all().await;
//! # Ok(()) }
//! ```

pub mod manager;
pub mod output;
pub mod tools;

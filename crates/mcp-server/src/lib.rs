//! vmcp's MCP server core: the protocol side of `vmcp mcp serve`, with no VM in it.
//!
//! - [`server::Server`]: lifecycle of both protocol generations (2025 revisions with
//!   `initialize` and sessions; stateless 2026-07-28 with `server/discover`), `tools/list`,
//!   `tools/call` with arguments validated against the published schema ([`schema`]),
//!   progress, cancellation.
//! - [`tool::ToolSet`]: the seam to what the tools do (the sandbox tools live in the
//!   `vmcp-sandbox` crate; tests use small fakes).
//! - Transports: [`stdio::serve`] and [`http::HttpServer`] (Streamable HTTP with `Host`/`Origin`
//!   checks and an optional bearer token).
//!
//! It reuses the client crate's JSON-RPC and MCP types (`vmcp_mcp::jsonrpc`,
//! `vmcp_mcp::model`). Platforms: everything tokio and hyper run on.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use vmcp_mcp_server::server::{Server, ServerConfig};
//! use vmcp_mcp_server::tool::{BoxFuture, CallContext, ToolDef, ToolOutput, ToolSet, Annotations};
//! struct Echo;
//! impl ToolSet for Echo {
//!     fn tools(&self) -> Vec<ToolDef> {
//!         vec![ToolDef::new("echo", "Echo", "Echoes", serde_json::json!({"type": "object"}), None, Annotations::read_only())]
//!     }
//!     fn call(&self, _: &str, args: serde_json::Map<String, serde_json::Value>, _: CallContext) -> BoxFuture<ToolOutput> {
//!         Box::pin(async move { ToolOutput::json(args.into()) })
//!     }
//! }
//! let server = Server::new(Echo, ServerConfig::default())?;
//! vmcp_mcp_server::stdio::serve(&server, tokio::io::stdin(), tokio::io::stdout(), &Default::default()).await?;
//! # Ok(()) }
//! ```

pub mod elicit;
pub mod http;
pub mod schema;
pub mod server;
pub mod stdio;
pub mod tool;

pub use server::{Server, ServerConfig};
pub use tool::{CallContext, ToolDef, ToolOutput, ToolSet};

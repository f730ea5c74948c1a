//! MCP client: JSON-RPC over stdio and Streamable HTTP(S).
//!
//! Layers, each behind its own seam:
//! - [`jsonrpc`] and [`model`]: messages and the MCP types a client needs (our own types).
//! - [`transport::Transport`]: send a message, receive the next one, close; each transport
//!   has its own error type, and [`transport::BoxTransport`] holds any of them. The same seam
//!   serves both roles: [`stdio::LineTransport`] frames newline-delimited JSON over any byte
//!   stream ([`stdio::StdioTransport`] is a child process for the client; the
//!   `vmcp-mcp-server` crate reads its stdin through it), and
//!   [`http::StreamableHttpTransport`] (both protocol generations: session-based 2025-03-26
//!   .. 2025-11-25 and stateless 2026-07-28) runs over the [`http::HttpClient`] seam with
//!   [`retry`], [`balance`] and [`tls`] policies, keeping everything HTTP-specific inside.
//! - [`client::Client`]: lifecycle (initialize / discover / detect), request matching,
//!   timeouts and cancellation, server requests and notifications.
//!
//! Platforms: Linux, macOS, Windows (stdio child death-with-parent is strongest on Linux).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use vmcp_mcp::client::{Client, ClientConfig};
//! use vmcp_mcp::stdio::{StdioConfig, StdioTransport};
//! let transport = StdioTransport::spawn(&StdioConfig::new("my-mcp-server", ["--stdio"]))?;
//! let client = Client::connect(transport, ClientConfig::default()).await?;
//! for tool in client.list_tools().await? {
//!     println!("{}", tool.name);
//! }
//! let result = client.call_tool("echo", Some(&serde_json::json!({"message": "hi"}))).await?;
//! println!("{:?}", result.content);
//! client.close().await;
//! # Ok(()) }
//! ```

pub mod balance;
pub mod client;
pub mod http;
pub mod jsonrpc;
pub mod limits;
pub mod model;
pub mod param_headers;
pub mod retry;
pub mod sanitize;
pub mod sse;
pub mod stdio;
pub mod tls;
pub mod transport;

pub use client::{Client, ClientConfig, ClientError, Lifecycle};
pub use limits::Limits;
pub use model::Era;
pub use transport::{BoxTransport, Transport, TransportError};

//! MCP client: JSON-RPC over stdio and Streamable HTTP(S).

pub mod balance;
pub mod retry;
pub mod tls;

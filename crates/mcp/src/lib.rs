//! MCP client: JSON-RPC over stdio and Streamable HTTP(S).

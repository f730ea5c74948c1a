//! The transport seam: send a message, receive the next message, close.
//!
//! [`Transport::send`] may be called from many tasks at once; [`Transport::receive`] is called
//! by one task at a time (the client's dispatcher) and returns `None` once the transport is
//! closed or the peer went away. Implementations: [`crate::stdio::StdioTransport`] (a child
//! process, newline-delimited JSON) and [`crate::http::StreamableHttpTransport`].
//!
//! On Streamable HTTP a request's answer arrives on the HTTP response of its own POST, so
//! `send` of a request returns only once that response has been read, and the answer has
//! then been queued for `receive`. An error of the POST itself (refused, status 5xx, may have
//! reached the server...) is returned by `send`, so the caller learns it directly.
//!
//! The client tells the transport which protocol generation is in use with
//! [`Transport::set_protocol`]; the HTTP transport needs it for its headers, and reports a
//! generation it detected earlier for the same backend through [`Transport::known_era`].

use std::future::Future;

use crate::jsonrpc::{self, Message};

/// Which protocol generation a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Era {
    /// 2025-03-26 .. 2025-11-25: `initialize` handshake, sessions.
    Legacy,
    /// 2026-07-28 and later: stateless, per-request metadata.
    Modern,
}

/// The protocol state the client has settled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolState {
    /// Generation.
    pub era: Era,
    /// Version string (for the `MCP-Protocol-Version` header); `None` before `initialize`
    /// answered.
    pub version: Option<String>,
}

/// Errors of a transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// Reading or writing the byte stream failed.
    #[error("I/O error on the MCP connection")]
    Io(#[from] std::io::Error),
    /// The peer sent bytes that are no JSON-RPC message.
    #[error("the MCP server sent an invalid message")]
    Parse(#[from] jsonrpc::Error),
    /// The transport is closed.
    #[error("the MCP connection is closed")]
    Closed,
    /// Starting the server process failed.
    #[error("cannot start MCP server {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An HTTP-level failure.
    #[error(transparent)]
    Http(#[from] crate::http::HttpTransportError),
}

/// A bidirectional JSON-RPC message channel to one MCP server.
pub trait Transport: Send + Sync + 'static {
    /// Sends one message. May run concurrently with other sends.
    fn send(&self, msg: &Message) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Sends one message with extra transport headers (HTTP: `Mcp-Param-*`). Transports
    /// without headers ignore them.
    fn send_with_headers(
        &self,
        msg: &Message,
        _headers: &[(String, String)],
    ) -> impl Future<Output = Result<(), TransportError>> + Send {
        self.send(msg)
    }

    /// The next message from the server; `None` at the end. One caller at a time.
    fn receive(&self) -> impl Future<Output = Option<Result<Message, TransportError>>> + Send;

    /// Closes the transport: ends the session, stops the child. Idempotent.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Tells the transport which protocol the client speaks from now on.
    fn set_protocol(&self, _state: &ProtocolState) {}

    /// The generation this transport already knows the server speaks (detected earlier).
    fn known_era(&self) -> Option<Era> {
        None
    }

    /// True when a server of the old generation may stay silent on a request it does not
    /// know (stdio), so protocol detection needs a time limit. HTTP always answers.
    fn may_ignore_unknown_requests(&self) -> bool {
        true
    }

    /// True when `tools/call` must mirror `x-mcp-header` parameters (2026-07-28 HTTP).
    fn mirrors_param_headers(&self) -> bool {
        false
    }

    /// True when the server closing a request's own stream is the cancellation signal (no
    /// `notifications/cancelled` needed).
    fn cancels_by_disconnect(&self) -> bool {
        false
    }
}

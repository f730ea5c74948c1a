//! The transport seam, the same for both roles: send a message, receive the next one, close.
//!
//! [`Transport::send`] may be called from many tasks at once; [`Transport::receive`] is called
//! by one task at a time (the dispatcher of a client or of a server connection) and returns
//! `None` once the transport is closed or the peer went away. Each transport has its own error
//! type; code that holds transports of several kinds uses [`BoxTransport`], whose error is the
//! type-erased [`TransportError`]. Implementations: [`crate::stdio::LineTransport`]
//! (newline-delimited JSON over any byte stream: a child process's pipes for the client,
//! stdin/stdout for a server) and [`crate::http::StreamableHttpTransport`] (client side).
//!
//! What a transport knows about MCP stays inside it. The Streamable HTTP transport reads the
//! protocol generation and version from the messages it carries (`initialize` and its answer,
//! the `_meta` of `server/discover`), mirrors `x-mcp-header` parameters into headers from the
//! `tools/list` answers it saw, answers `server/discover` itself with "method not found" for an
//! endpoint it already knows to be of the old generation, and drops client notifications where
//! the 2026-07-28 protocol has none (closing a request's stream is its cancellation there).
//!
//! On Streamable HTTP a request's answer arrives on the HTTP response of its own POST, so
//! `send` of a request returns only once that response has been read, and the answer has
//! then been queued for `receive`. An error of the POST itself (refused, status 5xx, may have
//! reached the server...) is returned by `send`, so the caller learns it directly. A client
//! that waits a limited time for a peer that may ignore a request (protocol detection on
//! stdio) therefore counts that time from the end of `send`.

use std::future::Future;
use std::pin::Pin;

use crate::jsonrpc::Message;

pub use crate::model::Era;

/// A bidirectional JSON-RPC message channel to one peer (a server for a client, a client for
/// a server).
pub trait Transport: Send + Sync + 'static {
    /// What can go wrong sending or receiving.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Sends one message. May run concurrently with other sends.
    fn send(&self, msg: &Message) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// The next message from the peer; `None` at the end. One caller at a time.
    fn receive(&self) -> impl Future<Output = Option<Result<Message, Self::Error>>> + Send;

    /// Closes the transport (ends the session, stops a child process). Idempotent.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// The error of a [`BoxTransport`]: any transport's error, type-erased. Its message is the
/// inner error's; [`TransportError::downcast_ref`] gets the inner error back.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct TransportError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl TransportError {
    /// Wraps a transport's error (a `TransportError` is not wrapped twice).
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        let boxed: Box<dyn std::error::Error + Send + Sync + 'static> = Box::new(e);
        match boxed.downcast::<TransportError>() {
            Ok(already) => *already,
            Err(other) => TransportError(other),
        }
    }

    /// The inner error, if it is an `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref::<E>()
    }
}

/// A boxed future, for the object-safe [`DynTransport`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe form of [`Transport`]; every transport implements it. Use it through
/// [`BoxTransport`].
pub trait DynTransport: Send + Sync + 'static {
    /// [`Transport::send`].
    fn send_dyn<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Result<(), TransportError>>;
    /// [`Transport::receive`].
    fn receive_dyn(&self) -> BoxFuture<'_, Option<Result<Message, TransportError>>>;
    /// [`Transport::close`].
    fn close_dyn(&self) -> BoxFuture<'_, ()>;
}

impl<T: Transport> DynTransport for T {
    fn send_dyn<'a>(&'a self, msg: &'a Message) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move { self.send(msg).await.map_err(TransportError::new) })
    }
    fn receive_dyn(&self) -> BoxFuture<'_, Option<Result<Message, TransportError>>> {
        Box::pin(async move { self.receive().await.map(|r| r.map_err(TransportError::new)) })
    }
    fn close_dyn(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.close())
    }
}

/// Any transport behind one type (one allocation per call), so a program that picks stdio or
/// HTTP at run time holds one `Client<BoxTransport>`.
pub struct BoxTransport(Box<dyn DynTransport>);

impl BoxTransport {
    /// Boxes `transport`.
    pub fn new(transport: impl Transport) -> Self {
        BoxTransport(Box::new(transport))
    }
}

impl std::fmt::Debug for BoxTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxTransport")
    }
}

impl Transport for BoxTransport {
    type Error = TransportError;

    async fn send(&self, msg: &Message) -> Result<(), TransportError> {
        self.0.send_dyn(msg).await
    }
    async fn receive(&self) -> Option<Result<Message, TransportError>> {
        self.0.receive_dyn().await
    }
    async fn close(&self) {
        self.0.close_dyn().await
    }
}

//! The HTTP client seam: one request in, status + headers + a body stream out.
//!
//! [`StreamableHttpTransport`](super::StreamableHttpTransport) is generic over [`HttpClient`],
//! so tests can put a fault-injecting client under it and other stacks (hyper directly) can
//! replace [`ReqwestClient`](super::ReqwestClient). Every failure says whether the request
//! demonstrably did not reach the server ([`Delivery::NotSent`]: refused, DNS or TLS failure,
//! nothing written) or may have ([`Delivery::MaybeSent`]): the retry rules depend on it.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

/// One HTTP request.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// Method (POST, GET, DELETE).
    pub method: Method,
    /// Absolute URL.
    pub url: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Time limit for the response head (the body is read under the caller's deadline).
    pub timeout: Option<Duration>,
}

/// The head of a response and its body.
pub struct HttpResponse<B> {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body chunks.
    pub body: B,
}

/// A response body read chunk by chunk.
pub trait HttpBody: Send + 'static {
    /// The next chunk; `None` at the end.
    fn chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, HttpError>> + Send;
}

/// Whether a failed request may have reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// Demonstrably not sent: connection refused, name resolution or TLS handshake failed.
    NotSent,
    /// The request (or part of it) may have been received and acted on.
    MaybeSent,
}

/// What kind of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpErrorKind {
    /// Could not connect (refused, unreachable, DNS).
    Connect,
    /// The TLS handshake failed (certificate rejected...).
    Tls,
    /// No answer in time.
    Timeout,
    /// The connection broke (reset, closed early).
    Io,
    /// Anything else (bad URL, ...).
    Other,
}

/// A failed HTTP exchange.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(*.kind, *.delivery))]
pub struct HttpError {
    /// Kind.
    pub kind: HttpErrorKind,
    /// Whether it may have reached the server.
    pub delivery: Delivery,
    /// The underlying error.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

fn describe(kind: HttpErrorKind, delivery: Delivery) -> &'static str {
    match (kind, delivery) {
        (HttpErrorKind::Connect, _) => "cannot connect",
        (HttpErrorKind::Tls, _) => "TLS handshake failed",
        (HttpErrorKind::Timeout, Delivery::NotSent) => "timed out connecting",
        (HttpErrorKind::Timeout, Delivery::MaybeSent) => "timed out waiting for the answer",
        (HttpErrorKind::Io, Delivery::NotSent) => "connection failed before the request was sent",
        (HttpErrorKind::Io, Delivery::MaybeSent) => "connection broke",
        (HttpErrorKind::Other, _) => "HTTP request failed",
    }
}

impl HttpError {
    /// An error without a source.
    pub fn new(kind: HttpErrorKind, delivery: Delivery) -> Self {
        HttpError {
            kind,
            delivery,
            source: None,
        }
    }

    /// An error with a source.
    pub fn with_source(
        kind: HttpErrorKind,
        delivery: Delivery,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        HttpError {
            kind,
            delivery,
            source: Some(source.into()),
        }
    }
}

/// Sends HTTP requests. Implementations keep a connection pool; clones share it.
pub trait HttpClient: Send + Sync + 'static {
    /// The body type.
    type Body: HttpBody;
    /// Sends a request and returns the response head once it arrived.
    fn send(
        &self,
        req: HttpRequest,
    ) -> impl Future<Output = Result<HttpResponse<Self::Body>, HttpError>> + Send;
}

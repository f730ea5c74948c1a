//! Errors of the Streamable HTTP transport and how a given-up retry is reported.

use std::time::Duration;

use super::super::client::HttpError;
use crate::balance::BalanceError;
use crate::jsonrpc;
use crate::sse;

/// Errors of the HTTP transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpTransportError {
    /// The HTTP exchange failed.
    #[error("{}", shown(url))]
    Request {
        /// Endpoint.
        url: String,
        /// What failed.
        #[source]
        source: HttpError,
    },
    /// A request that is not safe to repeat failed after it may have reached the server.
    #[error(
        "{method} to {} may have reached the server, so it was not re-sent (it is not safe to repeat)", shown(url)
    )]
    NotResent {
        /// JSON-RPC method.
        method: String,
        /// Endpoint.
        url: String,
        /// What failed.
        #[source]
        source: HttpError,
    },
    /// The server answered with an HTTP error status and no JSON-RPC error.
    #[error("{} answered HTTP {status}{}", shown(url), if body.is_empty() { String::new() } else { format!(": {}", crate::sanitize::for_display(body, crate::limits::MAX_PRINTED_CHARS)) })]
    Status {
        /// Endpoint.
        url: String,
        /// Status.
        status: u16,
        /// Start of the body.
        body: String,
    },
    /// No endpoint is available.
    #[error("no MCP endpoint is available")]
    AllBackendsDown(#[source] BalanceError),
    /// The retry policy gave up.
    #[error("{method} failed {attempts} times; giving up")]
    RetriesExhausted {
        /// JSON-RPC method.
        method: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        last: Box<HttpTransportError>,
    },
    /// The overall deadline left no room for another attempt.
    #[error("{method} did not succeed within its deadline of {:.1} s", budget.as_secs_f64())]
    Deadline {
        /// JSON-RPC method.
        method: String,
        /// The deadline.
        budget: Duration,
        /// The last failure.
        #[source]
        last: Box<HttpTransportError>,
    },
    /// The server asked to wait longer than allowed.
    #[error("the server asked to retry in {:.0} s, longer than the {:.0} s limit", wait.as_secs_f64(), limit.as_secs_f64())]
    RetryAfterTooLong {
        /// What it asked for.
        wait: Duration,
        /// Our limit.
        limit: Duration,
        /// The answer.
        #[source]
        last: Box<HttpTransportError>,
    },
    /// The response stream ended before the answer.
    #[error(
        "{} ended the response without answering request {}",
        shown(url),
        crate::sanitize::for_display(id, 60)
    )]
    NoAnswer {
        /// Endpoint.
        url: String,
        /// Request id.
        id: String,
    },
    /// The response has a content type we cannot read.
    #[error("{} answered with content type {}, expected JSON or an event stream", shown(url), crate::sanitize::for_display(&format!("{content_type:?}"), 80))]
    ContentType {
        /// Endpoint.
        url: String,
        /// What it sent.
        content_type: String,
    },
    /// An SSE stream was malformed.
    #[error("bad event stream from {}", shown(url))]
    Sse {
        /// Endpoint.
        url: String,
        /// Why.
        #[source]
        source: sse::SseError,
    },
    /// A JSON body was malformed.
    #[error("bad JSON-RPC message from {}", shown(url))]
    Parse {
        /// Endpoint.
        url: String,
        /// Why.
        #[source]
        source: jsonrpc::Error,
    },
    /// The session expired and could not be re-established.
    #[error(
        "the MCP session expired and initialize cannot be replayed (the client never sent one)"
    )]
    NoInitialize,
    /// A configured header is invalid (only its name is kept: the value may be a secret).
    #[error("invalid header {}: want 'Name: value' with a valid name and a visible-ASCII value (the value is not shown)", crate::sanitize::for_display(&format!("{:?}", .0), 80))]
    BadHeader(String),
    /// A response body is larger than allowed (not retried: it would be again).
    #[error("{} sent a response larger than {limit} bytes", shown(url))]
    TooLarge {
        /// Endpoint.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// An unsafe request was refused with a status that does not promise it was not
    /// processed, or without a `Retry-After` saying when to come back.
    #[error("{method} was not re-sent: it is not safe to repeat, and the server did not ask for a retry (HTTP 429 or 503 with Retry-After)")]
    UnsafeNotResent {
        /// JSON-RPC method.
        method: String,
        /// The answer.
        #[source]
        last: Box<HttpTransportError>,
    },
    /// The retry policy's time limits ended the call during an attempt.
    #[error("{method} did not complete within its time limit of {:.1} s", after.as_secs_f64())]
    OutOfTime {
        /// JSON-RPC method.
        method: String,
        /// The limit that ended it.
        after: Duration,
    },
    /// The transport is closed.
    #[error("the MCP connection is closed")]
    Closed,
    /// No endpoint configured.
    #[error("no MCP endpoint URL given")]
    NoEndpoint,
    /// An endpoint URL is not an absolute http(s) URL.
    #[error("{} is not an http:// or https:// URL", shown(.0))]
    BadUrl(String),
}

/// An endpoint URL as shown in messages: no credentials, no query.
pub(super) fn shown(url: &str) -> String {
    crate::sanitize::url_for_display(url)
}

/// `a: b: c` for an error and its sources.
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The start of a server's error body for a message: control characters escaped, cut.
pub(super) fn snippet(text: &str) -> String {
    crate::sanitize::for_display(text.trim(), crate::limits::MAX_PRINTED_CHARS)
}

//! Streamable HTTP(S): the transport and the HTTP client seam it runs on.
//!
//! Layers, top to bottom: [`StreamableHttpTransport`] (MCP semantics of both protocol
//! generations, sessions, retries via [`crate::retry`], endpoint choice via
//! [`crate::balance`]) over an [`HttpClient`] ([`ReqwestClient`] in production, with the
//! rustls configuration from [`crate::tls`]).

mod client;
pub mod redirect;
mod reqwest_client;
mod streamable;

pub use client::{
    Delivery, HttpBody, HttpClient, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
};
pub use reqwest_client::{ReqwestBody, ReqwestClient, ReqwestClientError, ReqwestOptions};
pub use streamable::{
    decode_header_value, encode_header_value, EraCache, HttpConfig, HttpTransportError,
    StreamableHttpTransport, HEADER_LAST_EVENT_ID, HEADER_METHOD, HEADER_NAME,
    HEADER_PROTOCOL_VERSION, HEADER_SESSION_ID,
};

//! Streamable HTTP, both generations, over any [`HttpClient`].
//!
//! Every message is its own POST; the answer to a request comes back on that POST as
//! `application/json` or as an SSE stream that may first carry notifications and server
//! requests. What differs by generation:
//!
//! * **Legacy** (2025-03-26 .. 2025-11-25): the `initialize` POST may return an
//!   `Mcp-Session-Id`, sent back on every later request together with `MCP-Protocol-Version`.
//!   After `notifications/initialized` a GET opens the stream for server-initiated messages
//!   (405 = the server has none); it is reopened with `Last-Event-ID` when it drops. A POST
//!   stream that ends before its answer is resumed with a GET carrying `Last-Event-ID`. HTTP
//!   404 on a session means it expired: the transport replays `initialize` +
//!   `notifications/initialized` (remembered from the client's first handshake) and sends
//!   the request again (a 404 says it was not processed). `close` sends DELETE.
//! * **Modern** (2026-07-28): no session, no GET stream; every POST carries
//!   `MCP-Protocol-Version`, `Mcp-Method` and, for `tools/call`, `resources/read` and
//!   `prompts/get`, `Mcp-Name` (Base64-sentinel encoded when not plain ASCII). The client puts
//!   the per-request `_meta`. Client notifications are not sent (closing a request's stream is
//!   the cancellation).
//!
//! Which generation a backend speaks is remembered in an [`EraCache`] shared by all
//! transports built from the same configuration.
//!
//! Failures and retries: a request is re-sent only when it demonstrably did not take effect
//! (connection refused, TLS/DNS failure, nothing written; HTTP 429/503 or 404 on an expired
//! session), or when its method is safe to repeat (`ping`, `*/list`, `resources/read`,
//! `prompts/get`, `initialize`, `server/discover`) and it failed by timeout or reset. A
//! `tools/call` that may have reached the server is never re-sent: the error says so. Backoff
//! and limits come from [`crate::retry`]; the choice of endpoint from [`crate::balance`].

mod config;
mod error;
mod post;
mod resend;
mod session;
mod stream;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;

use super::client::HttpClient;
use crate::balance::{Balancer, HealthChecks};
use crate::jsonrpc::Message;
use crate::param_headers::ParamHeader;
use crate::transport::{Era, Transport};

pub use config::{EraCache, HttpConfig};
pub use error::HttpTransportError;
use error::{error_chain, shown, snippet};
pub use session::{decode_header_value, encode_header_value};

/// `Mcp-Session-Id`.
pub const HEADER_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
/// `MCP-Protocol-Version`.
pub const HEADER_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
/// `Mcp-Method` (2026-07-28).
pub const HEADER_METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// `Mcp-Name` (2026-07-28).
pub const HEADER_NAME: HeaderName = HeaderName::from_static("mcp-name");
/// `Last-Event-ID`.
pub const HEADER_LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

const ACCEPT_BOTH: HeaderValue = HeaderValue::from_static("application/json, text/event-stream");
const ACCEPT_SSE: HeaderValue = HeaderValue::from_static("text/event-stream");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The protocol state read from the messages (see `session.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProtocolState {
    /// Generation.
    era: Era,
    /// Version string (for the `MCP-Protocol-Version` header); `None` before `initialize`
    /// answered.
    version: Option<String>,
}

struct Session {
    id: HeaderValue,
    backend: usize,
}

#[derive(Default)]
struct State {
    protocol: Option<ProtocolState>,
    version_header: Option<HeaderValue>,
    session: Option<Session>,
    /// Bumped whenever the session changes; a request that saw an older one retries freely.
    generation: u64,
    /// The client's `initialize` params, replayed when a session must be re-established.
    init_params: Option<Box<serde_json::value::RawValue>>,
    get_task: Option<tokio::task::JoinHandle<()>>,
    closed: bool,
    /// `x-mcp-header` annotations per tool, from the `tools/list` answers (2026-07-28).
    param_specs: std::collections::HashMap<String, Vec<ParamHeader>>,
}

struct Shared<C> {
    client: C,
    config: HttpConfig,
    base_headers: HeaderMap,
    balancer: Arc<Balancer<String>>,
    health: Mutex<Option<HealthChecks>>,
    state: Mutex<State>,
    reinit: tokio::sync::Mutex<()>,
    tx: mpsc::Sender<Queued>,
    /// Bytes the receive queue may still hold.
    queue_bytes: Arc<tokio::sync::Semaphore>,
    next_internal_id: AtomicU64,
}

/// A message in the receive queue, holding its share of the byte budget until it is taken.
struct Queued {
    msg: Message,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The Streamable HTTP transport.
pub struct StreamableHttpTransport<C: HttpClient> {
    shared: Arc<Shared<C>>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Queued>>,
    closing: tokio::sync::Notify,
}

impl<C: HttpClient> StreamableHttpTransport<C> {
    /// A transport over `client` to the configured endpoints.
    pub fn new(client: C, config: HttpConfig) -> Result<Self, HttpTransportError> {
        if config.endpoints.is_empty() {
            return Err(HttpTransportError::NoEndpoint);
        }
        for url in &config.endpoints {
            let ok = url.parse::<http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(HttpTransportError::BadUrl(url.clone()));
            }
        }
        let mut base_headers = config.headers.clone();
        base_headers.insert(ACCEPT, ACCEPT_BOTH);
        base_headers.insert(CONTENT_TYPE, JSON);
        let (tx, rx) = mpsc::channel(config.limits.receive_queue_messages.max(1));
        let queue_bytes = Arc::new(tokio::sync::Semaphore::new(
            config
                .limits
                .receive_queue_bytes
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        ));
        // The balancer shows endpoints in messages: it gets them without secrets; probes map
        // them back by position.
        let balancer = Arc::new(
            Balancer::new(
                config.endpoints.iter().map(|u| shown(u)).collect(),
                config.balance.clone(),
            )
            .map_err(HttpTransportError::AllBackendsDown)?,
        );
        Ok(StreamableHttpTransport {
            shared: Arc::new(Shared {
                client,
                config,
                base_headers,
                balancer,
                health: Mutex::new(None),
                state: Mutex::new(State::default()),
                reinit: tokio::sync::Mutex::new(()),
                tx,
                queue_bytes,
                next_internal_id: AtomicU64::new(1),
            }),
            rx: tokio::sync::Mutex::new(rx),
            closing: tokio::sync::Notify::new(),
        })
    }

    /// The load balancer (health state of the endpoints).
    pub fn balancer(&self) -> &Balancer<String> {
        &self.shared.balancer
    }

    /// Starts active health checks of every endpoint (a `ping` POST each
    /// `config.balance.health_check.interval`; any HTTP answer below 500 counts as alive).
    /// They stop when the transport is dropped or closed.
    pub fn start_health_checks(&self) {
        let weak = Arc::downgrade(&self.shared);
        let checks = crate::balance::spawn_health_checks(
            self.shared.balancer.clone(),
            Arc::new(crate::retry::TokioClock),
            move |url: String| {
                let weak = weak.clone();
                async move {
                    let Some(shared) = weak.upgrade() else {
                        return Err("transport dropped".to_owned());
                    };
                    let Some(pos) = shared.balancer.endpoints().iter().position(|e| *e == url)
                    else {
                        return Err("unknown endpoint".to_owned());
                    };
                    let real = shared.config.endpoints[pos].clone();
                    shared.probe(real).await
                }
            },
        );
        if let Ok(mut h) = self.shared.health.lock() {
            *h = Some(checks);
        }
    }

    /// The current session id (legacy), if any.
    pub fn session_id(&self) -> Option<String> {
        let st = self.shared.lock();
        st.session
            .as_ref()
            .and_then(|s| s.id.to_str().ok().map(str::to_owned))
    }
}

impl<C: HttpClient> Shared<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn era(&self) -> Option<Era> {
        self.lock().protocol.as_ref().map(|p| p.era)
    }
}

impl<C: HttpClient> Transport for StreamableHttpTransport<C> {
    type Error = HttpTransportError;

    async fn send(&self, msg: &Message) -> Result<(), HttpTransportError> {
        if self.shared.lock().closed {
            return Err(HttpTransportError::Closed);
        }
        self.shared.send(msg).await
    }

    async fn receive(&self) -> Option<Result<Message, HttpTransportError>> {
        let mut rx = self.rx.lock().await;
        if self.shared.lock().closed {
            return None;
        }
        tokio::select! {
            m = rx.recv() => m.map(|q| Ok(q.msg)),
            () = self.closing.notified() => None,
        }
    }

    async fn close(&self) {
        self.shared.close().await;
        // Wakes the receiver (or the next one: notify_one keeps a permit).
        self.closing.notify_one();
    }
}

impl<C: HttpClient> Drop for StreamableHttpTransport<C> {
    fn drop(&mut self) {
        if let Some(t) = self.shared.lock().get_task.take() {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::session::mcp_name;
    use super::*;
    use crate::jsonrpc;

    #[test]
    fn header_values() {
        assert_eq!(encode_header_value("echo"), "echo");
        assert_eq!(
            encode_header_value("Hello, 世界"),
            "=?base64?SGVsbG8sIOS4lueVjA==?="
        );
        assert_eq!(encode_header_value(" padded "), "=?base64?IHBhZGRlZCA=?=");
        assert_eq!(
            encode_header_value("line1\nline2"),
            "=?base64?bGluZTEKbGluZTI=?="
        );
        assert_eq!(
            encode_header_value("=?base64?literal?="),
            "=?base64?PT9iYXNlNjQ/bGl0ZXJhbD89?="
        );
        for v in ["echo", "Hello, 世界", " padded ", "=?base64?literal?="] {
            assert_eq!(decode_header_value(&encode_header_value(v)), v);
        }
        assert_eq!(decode_header_value("=?base64?%%?="), "=?base64?%%?=");
    }

    #[test]
    fn names() {
        let p = jsonrpc::to_raw(&serde_json::json!({"name":"echo","arguments":{}})).unwrap();
        assert_eq!(mcp_name("tools/call", Some(&p)).as_deref(), Some("echo"));
        assert_eq!(mcp_name("tools/list", Some(&p)), None);
        let p = jsonrpc::to_raw(&serde_json::json!({"uri":"file:///a b"})).unwrap();
        assert_eq!(
            mcp_name("resources/read", Some(&p)).as_deref(),
            Some("file:///a b")
        );
    }

    #[test]
    fn header_lines() {
        let c = HttpConfig::new(["http://x/mcp"])
            .with_header_line("Authorization: Bearer abc")
            .unwrap();
        assert_eq!(c.headers["authorization"], "Bearer abc");
        assert!(HttpConfig::new(["http://x"])
            .with_header_line("nocolon")
            .is_err());
        assert!(HttpConfig::new(["http://x"])
            .with_header_line("bad name: v")
            .is_err());
        assert_eq!(snippet(" a\nb "), "a\\nb");
    }

    #[test]
    fn era_cache() {
        let c = EraCache::default();
        c.set("u", Era::Modern);
        assert_eq!(c.get("u"), Some(Era::Modern));
        c.forget("u");
        assert_eq!(c.get("u"), None);
    }
}

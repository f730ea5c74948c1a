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

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::client::{Delivery, HttpBody, HttpClient, HttpError, HttpRequest, HttpResponse};
use crate::balance::{BalanceError, Balancer, BalancerConfig, EndpointId, HealthChecks};
use crate::jsonrpc::{self, ErrorResponse, Message, RequestId};
use crate::limits::{Limits, RateLimitedWarning};
use crate::model::is_modern;
use crate::retry::{self, Decision, Failure, GiveUp, Phase, RequestKind, RetryAfter, RetryPolicy};
use crate::sse;
use crate::transport::{Era, ProtocolState, Transport, TransportError};

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
    /// No endpoint configured.
    #[error("no MCP endpoint URL given")]
    NoEndpoint,
    /// An endpoint URL is not an absolute http(s) URL.
    #[error("{} is not an http:// or https:// URL", shown(.0))]
    BadUrl(String),
}

/// An endpoint URL as shown in messages: no credentials, no query.
fn shown(url: &str) -> String {
    crate::sanitize::url_for_display(url)
}

/// Remembers which generation each endpoint speaks. Clones share the map.
#[derive(Debug, Clone, Default)]
pub struct EraCache(Arc<Mutex<HashMap<String, Era>>>);

impl EraCache {
    /// The remembered generation of `url`.
    pub fn get(&self, url: &str) -> Option<Era> {
        self.0.lock().ok().and_then(|m| m.get(url).copied())
    }

    /// Remembers the generation of `url`.
    pub fn set(&self, url: &str, era: Era) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(url.to_owned(), era);
        }
    }

    /// Forgets `url` (the cached assumption failed).
    pub fn forget(&self, url: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(url);
        }
    }
}

/// Configuration of a [`StreamableHttpTransport`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Endpoint URLs of one logical server (several = load balancing).
    pub endpoints: Vec<String>,
    /// Extra headers on every request (e.g. `Authorization`).
    pub headers: HeaderMap,
    /// Open the GET stream for server-initiated messages (legacy sessions).
    pub get_stream: bool,
    /// Bounds: message size, batch items, receive queue, SSE reconnect timing, redirects.
    pub limits: Limits,
    /// Retry rules (backoff, limits, per-attempt timeout, overall deadline).
    pub retry: RetryPolicy,
    /// Load-balancing rules.
    pub balance: BalancerConfig,
    /// Generation cache (share it between transports to the same servers).
    pub era_cache: EraCache,
}

impl HttpConfig {
    /// A configuration for these endpoints with the defaults.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        HttpConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            headers: HeaderMap::new(),
            get_stream: true,
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            balance: BalancerConfig::default(),
            era_cache: EraCache::default(),
        }
    }

    /// Sets the bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Adds a header given as `Name: value`. Errors name the header, never its value.
    pub fn with_header_line(mut self, line: &str) -> Result<Self, HttpTransportError> {
        let Some((name, value)) = line.split_once(':') else {
            // No colon: the whole text may be a token given without its name.
            return Err(HttpTransportError::BadHeader(format!(
                "<{} characters without a ':'>",
                line.chars().count()
            )));
        };
        let bad = || HttpTransportError::BadHeader(name.trim().to_owned());
        let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
        let mut value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
        value.set_sensitive(true);
        self.headers.append(name, value);
        Ok(self)
    }
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

/// Roughly what a queued message costs in memory.
fn message_cost(m: &Message) -> usize {
    let raw =
        |p: &Option<Box<serde_json::value::RawValue>>| p.as_ref().map_or(0, |p| p.get().len());
    64 + match m {
        Message::Request(r) => r.method.len() + raw(&r.params),
        Message::Notification(n) => n.method.len() + raw(&n.params),
        Message::Response(r) => r.result.get().len(),
        Message::Error(e) => e.error.message.len(),
    }
}

/// The Streamable HTTP transport.
pub struct StreamableHttpTransport<C: HttpClient> {
    shared: Arc<Shared<C>>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Queued>>,
    closing: tokio::sync::Notify,
}

/// Where a message goes while a response is read.
enum Sink<'a> {
    /// Into the receive queue.
    Queue,
    /// The answer to `id` is returned to the caller; everything else is queued.
    Capture(&'a RequestId, &'a mut Option<Message>),
}

/// How one attempt ended.
enum Attempt {
    Done,
    Retry(AttemptFailure),
    Fatal(HttpTransportError),
}

/// A failure that the retry policy may act on.
struct AttemptFailure {
    error: HttpTransportError,
    /// What it means for retrying.
    failure: Failure,
    /// The endpoint is unusable (count against it).
    backend_failed: bool,
    /// The session expired: re-establish it, then resend at once.
    reinit: bool,
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

    /// Sends one message with retries; queues what comes back.
    async fn post(
        self: &Arc<Self>,
        msg: &Message,
        extra: &[(String, String)],
    ) -> Result<(), HttpTransportError> {
        let method = msg.method();
        let era = self.era();
        if era == Some(Era::Modern) && matches!(msg, Message::Notification(_)) {
            // 2026-07-28 defines no client notifications over HTTP.
            return Ok(());
        }
        if let Message::Request(r) = msg {
            if r.method == "initialize" {
                self.lock().init_params = r.params.clone();
            }
        }
        let body = Bytes::from(msg.to_vec());
        let kind = match method {
            Some(m) => RequestKind::method(m),
            // A response to a server request: repeating it is harmless to us but we cannot
            // know what the server does with a duplicate, so it counts as unsafe.
            None => RequestKind::new("response", retry::Safety::Unsafe),
        };
        let policy = &self.config.retry;
        let start = Instant::now();
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let (backend, generation) = self.pick_backend()?;
            let outcome = match policy.attempt_timeout {
                Some(t) => {
                    match tokio::time::timeout(
                        t,
                        self.attempt(msg, method, &body, backend, None, extra),
                    )
                    .await
                    {
                        Ok(o) => o,
                        Err(_) => Attempt::Retry(AttemptFailure {
                            error: HttpTransportError::Request {
                                url: shown(&self.config.endpoints[backend]),
                                source: HttpError::new(
                                    super::client::HttpErrorKind::Timeout,
                                    Delivery::MaybeSent,
                                ),
                            },
                            failure: Failure::Timeout(Phase::MaybeSent),
                            backend_failed: true,
                            reinit: false,
                        }),
                    }
                }
                None => self.attempt(msg, method, &body, backend, None, extra).await,
            };
            let f = match outcome {
                Attempt::Done => {
                    self.balancer.report_success(EndpointId(backend));
                    if let (Message::Notification(n), Some(Era::Legacy)) = (msg, self.era()) {
                        if n.method == "notifications/initialized" {
                            self.start_get_stream();
                        }
                    }
                    return Ok(());
                }
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(f) => f,
            };
            let legacy = self.era() == Some(Era::Legacy);
            if f.reinit && attempts <= policy.max_retries + 1 {
                // Expired session: the request was not processed; set up a new one and resend.
                self.reinitialize(generation, None).await?;
                continue;
            }
            if f.backend_failed {
                self.balancer.report_failure(
                    EndpointId(backend),
                    Instant::now(),
                    &error_chain(&f.error),
                );
            }
            let decision = retry::classify(
                policy,
                &kind,
                &f.failure,
                attempts,
                start.elapsed(),
                SystemTime::now(),
                rand::random::<f64>(),
            );
            let delay = match decision {
                Decision::RetryAfter(d) => d,
                Decision::GiveUp(why) => return Err(give_up(why, &kind.name, f.error)),
            };
            // Another endpoint can take the retry at once when this one failed to connect.
            let other_available = f.backend_failed
                && self.config.endpoints.len() > 1
                && self
                    .balancer
                    .any_available(Instant::now(), &[EndpointId(backend)]);
            tracing::debug!(
                "retrying {} (attempt {}): {}",
                kind.name,
                attempts + 1,
                f.error
            );
            if legacy && f.backend_failed && self.session_backend() == Some(backend) {
                // The session's endpoint failed: move the session elsewhere if we can.
                if other_available {
                    let _ = self.reinitialize(generation, Some(backend)).await;
                    continue;
                }
            } else if other_available {
                continue;
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One health probe: a `ping` POST; alive if the server answers below 500.
    async fn probe(&self, url: String) -> Result<(), String> {
        let ping = Message::Request(jsonrpc::Request {
            id: RequestId::String("vmcp-health".into()),
            method: "ping".into(),
            params: None,
        });
        let mut headers = self.base_headers.clone();
        if let Some(v) = &self.lock().version_header {
            headers.insert(HEADER_PROTOCOL_VERSION, v.clone());
        }
        if self.era() == Some(Era::Modern) {
            headers.insert(HEADER_METHOD, HeaderValue::from_static("ping"));
        }
        let resp = self
            .client
            .send(HttpRequest {
                method: Method::POST,
                url,
                headers,
                body: Bytes::from(ping.to_vec()),
                timeout: Some(self.config.balance.health_check.timeout),
            })
            .await
            .map_err(|e| error_chain(&e))?;
        let status = resp.status;
        let _ = read_limited(resp.body, 4096).await;
        if status.is_server_error() {
            Err(format!("HTTP {status}"))
        } else {
            Ok(())
        }
    }

    fn session_backend(&self) -> Option<usize> {
        self.lock().session.as_ref().map(|s| s.backend)
    }

    /// The endpoint for the next request: the session's, else the balancer's choice.
    fn pick_backend(&self) -> Result<(usize, u64), HttpTransportError> {
        let (sticky, generation) = {
            let st = self.lock();
            (st.session.as_ref().map(|s| s.backend), st.generation)
        };
        match sticky {
            Some(b) => Ok((b, generation)),
            // One endpoint: nothing to choose; its failures are reported by the retries.
            None if self.config.endpoints.len() == 1 => Ok((0, generation)),
            None => self
                .balancer
                .pick(Instant::now())
                .map(|(id, _)| (id.0, generation))
                .map_err(HttpTransportError::AllBackendsDown),
        }
    }

    fn request_headers(&self, msg: &Message, method: Option<&str>) -> HeaderMap {
        let mut h = self.base_headers.clone();
        let st = self.lock();
        if let Some(v) = &st.version_header {
            h.insert(HEADER_PROTOCOL_VERSION, v.clone());
        }
        if let Some(s) = &st.session {
            h.insert(HEADER_SESSION_ID, s.id.clone());
        }
        let modern = st.protocol.as_ref().is_some_and(|p| p.era == Era::Modern);
        drop(st);
        if modern {
            if let Some(m) = method {
                if let Ok(v) = HeaderValue::from_str(m) {
                    h.insert(HEADER_METHOD, v);
                }
                if let Message::Request(r) = msg {
                    if let Some(name) = mcp_name(m, r.params.as_deref()) {
                        if let Ok(v) = HeaderValue::from_str(&encode_header_value(&name)) {
                            h.insert(HEADER_NAME, v);
                        }
                    }
                }
            }
        }
        h
    }

    /// One POST to one endpoint. `capture`: return the answer to this id instead of queueing.
    async fn attempt(
        self: &Arc<Self>,
        msg: &Message,
        method: Option<&str>,
        body: &Bytes,
        backend: usize,
        capture: Option<(&RequestId, &mut Option<Message>)>,
        extra: &[(String, String)],
    ) -> Attempt {
        let url = self.config.endpoints[backend].clone();
        let had_session = self.lock().session.is_some();
        let req = HttpRequest {
            method: Method::POST,
            url: url.clone(),
            headers: {
                let mut h = self.request_headers(msg, method);
                for (k, v) in extra {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        h.insert(k, v);
                    }
                }
                h
            },
            body: body.clone(),
            timeout: None,
        };
        let resp = match self.client.send(req).await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(transport_failure(url, e)),
        };
        let status = resp.status;
        if status == StatusCode::ACCEPTED {
            return Attempt::Done;
        }
        if status.is_success() {
            if let (Message::Request(r), Some(id)) = (msg, resp.headers.get(&HEADER_SESSION_ID)) {
                if r.method == "initialize" {
                    let mut st = self.lock();
                    st.session = Some(Session {
                        id: id.clone(),
                        backend,
                    });
                    st.generation += 1;
                }
            }
            let expect = match msg {
                Message::Request(r) => Some(&r.id),
                _ => None,
            };
            let mut sink = match capture {
                Some((id, slot)) => Sink::Capture(id, slot),
                None => Sink::Queue,
            };
            return match self.read_response(&url, resp, expect, &mut sink).await {
                Ok(()) => Attempt::Done,
                Err(f) => f,
            };
        }
        // Error statuses.
        let retry_after = resp
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(RetryAfter::parse);
        let is_json = content_type(&resp.headers).starts_with("application/json");
        let text = read_limited(resp.body, 64 << 10).await.unwrap_or_default();
        if status == StatusCode::NOT_FOUND && had_session && self.era() == Some(Era::Legacy) {
            return Attempt::Retry(AttemptFailure {
                error: HttpTransportError::Status {
                    url: shown(&url),
                    status: 404,
                    body: "session expired".into(),
                },
                failure: Failure::NotProcessed {
                    status: 404,
                    retry_after: None,
                },
                backend_failed: false,
                reinit: true,
            });
        }
        let failure = Failure::from_status(status.as_u16(), retry_after);
        if let Some(f @ Failure::NotProcessed { .. }) = &failure {
            return Attempt::Retry(AttemptFailure {
                error: HttpTransportError::Status {
                    url: shown(&url),
                    status: status.as_u16(),
                    body: snippet(&text),
                },
                failure: f.clone(),
                backend_failed: status == StatusCode::SERVICE_UNAVAILABLE,
                reinit: false,
            });
        }
        // A JSON-RPC error in the body answers the request.
        if is_json || text.trim_start().starts_with('{') {
            if let Ok(Message::Error(mut e)) = jsonrpc::parse_message(text.as_bytes()) {
                if let Message::Request(r) = msg {
                    if e.id.is_none() {
                        e.id = Some(r.id.clone());
                    }
                }
                let m = Message::Error(e);
                match capture {
                    Some((id, slot)) if matches!(&m, Message::Error(ErrorResponse { id: Some(i), .. }) if i == id) => {
                        *slot = Some(m)
                    }
                    _ => self.enqueue(m).await,
                }
                return Attempt::Done;
            }
        }
        let error = HttpTransportError::Status {
            url: shown(&url),
            status: status.as_u16(),
            body: snippet(&text),
        };
        if let Some(f @ Failure::MaybeProcessed { .. }) = failure {
            // 502/504: a gateway failed; the request may or may not have been processed.
            return Attempt::Retry(AttemptFailure {
                error,
                failure: f,
                backend_failed: true,
                reinit: false,
            });
        }
        Attempt::Fatal(error)
    }

    /// Reads a 2xx response: JSON or SSE. Legacy SSE streams that break before the answer
    /// are resumed with GET + Last-Event-ID.
    async fn read_response(
        self: &Arc<Self>,
        url: &str,
        resp: HttpResponse<C::Body>,
        expect: Option<&RequestId>,
        sink: &mut Sink<'_>,
    ) -> Result<(), Attempt> {
        let ct = content_type(&resp.headers);
        if ct.starts_with("application/json") {
            let limit = self.config.limits.max_message_bytes;
            let bytes = match read_all(resp.body, limit).await {
                Ok(Some(b)) => b,
                // Too large: it would be again, so it is not retried.
                Ok(None) => {
                    return Err(Attempt::Fatal(HttpTransportError::TooLarge {
                        url: shown(url),
                        limit,
                    }))
                }
                Err(e) => return Err(Attempt::Retry(body_failure(url, e))),
            };
            if bytes.is_empty() {
                return if expect.is_some() {
                    Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                        url: shown(url),
                        id: expect.map(|i| i.to_string()).unwrap_or_default(),
                    }))
                } else {
                    Ok(())
                };
            }
            let mut messages = Vec::new();
            let parsed =
                jsonrpc::parse_messages_limited(&bytes, self.config.limits.max_batch_items, |m| {
                    messages.push(m)
                });
            drop(bytes);
            if let Err(source) = parsed {
                return Err(Attempt::Fatal(HttpTransportError::Parse {
                    url: shown(url),
                    source,
                }));
            }
            let mut answered = expect.is_none();
            for m in messages {
                if expect.is_some() && answer_id(&m) == expect {
                    answered = true;
                }
                self.deliver(m, sink).await;
            }
            // A JSON answer is the whole answer: without our id in it, nothing will come.
            return if answered {
                Ok(())
            } else {
                Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                    url: shown(url),
                    id: expect.map(|i| i.to_string()).unwrap_or_default(),
                }))
            };
        }
        if ct.starts_with("text/event-stream") {
            let mut parser = sse::Parser::new(self.config.limits.max_message_bytes);
            let mut answered = expect.is_none();
            let mut body = resp.body;
            let mut resumes = 0u32;
            loop {
                match self
                    .read_sse(url, &mut body, &mut parser, expect, &mut answered, sink)
                    .await
                {
                    Ok(()) if answered => {
                        finish_body(body);
                        return Ok(());
                    }
                    Ok(()) => {}
                    Err(SseFailure::Bad(e)) => return Err(Attempt::Fatal(e)),
                    Err(SseFailure::Broken(e)) => {
                        if answered {
                            return Ok(());
                        }
                        if parser.last_event_id().is_none() || self.era() != Some(Era::Legacy) {
                            return Err(Attempt::Retry(body_failure(url, e)));
                        }
                    }
                }
                // Ended or broke before the answer: resume if the server gave event ids.
                let Some(last) = parser.last_event_id().map(str::to_owned) else {
                    return Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                        url: shown(url),
                        id: expect.map(|i| i.to_string()).unwrap_or_default(),
                    }));
                };
                resumes += 1;
                if resumes > self.config.retry.max_retries.max(1) + 2 {
                    return Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                        url: shown(url),
                        id: expect.map(|i| i.to_string()).unwrap_or_default(),
                    }));
                }
                tokio::time::sleep(reconnect_delay(
                    &self.config.limits,
                    parser.retry_ms(),
                    resumes - 1,
                ))
                .await;
                match self.open_get(url, Some(&last)).await {
                    Ok(Some(b)) => body = b,
                    Ok(None) | Err(_) => {
                        return Err(Attempt::Fatal(HttpTransportError::NoAnswer {
                            url: shown(url),
                            id: expect.map(|i| i.to_string()).unwrap_or_default(),
                        }))
                    }
                }
            }
        }
        if expect.is_none() {
            return Ok(());
        }
        Err(Attempt::Fatal(HttpTransportError::ContentType {
            url: shown(url),
            content_type: ct.to_owned(),
        }))
    }

    async fn read_sse(
        &self,
        url: &str,
        body: &mut C::Body,
        parser: &mut sse::Parser,
        expect: Option<&RequestId>,
        answered: &mut bool,
        sink: &mut Sink<'_>,
    ) -> Result<(), SseFailure> {
        loop {
            let chunk = match body.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => return Ok(()),
                Err(e) => return Err(SseFailure::Broken(e)),
            };
            let mut bad = None;
            let mut messages = Vec::new();
            let max_items = self.config.limits.max_batch_items;
            parser
                .feed(&chunk, |ev| {
                    if ev.data.is_empty() || bad.is_some() {
                        return;
                    }
                    match jsonrpc::parse_messages_limited(ev.data.as_bytes(), max_items, |m| {
                        if let Some(id) = expect {
                            if answer_id(&m) == Some(id) {
                                *answered = true;
                            }
                        }
                        messages.push(m);
                    }) {
                        Ok(()) => {}
                        Err(source) => {
                            bad = Some(HttpTransportError::Parse {
                                url: shown(url),
                                source,
                            })
                        }
                    }
                })
                .map_err(|source| {
                    SseFailure::Bad(HttpTransportError::Sse {
                        url: shown(url),
                        source,
                    })
                })?;
            // Waits while the receive queue is full: the server is slowed to our pace.
            for m in messages {
                self.deliver(m, sink).await;
            }
            if let Some(e) = bad {
                return Err(SseFailure::Bad(e));
            }
            if expect.is_some() && *answered {
                // The answer is in: do not wait for a server that keeps the stream open.
                return Ok(());
            }
        }
    }

    async fn deliver(&self, m: Message, sink: &mut Sink<'_>) {
        if let Sink::Capture(id, slot) = sink {
            if answer_id(&m) == Some(*id) {
                **slot = Some(m);
                return;
            }
        }
        self.enqueue(m).await;
    }

    /// Puts a message into the receive queue, waiting while the queue is full (in messages
    /// or bytes). Never fails: when the receiver is gone the message is dropped.
    async fn enqueue(&self, msg: Message) {
        let budget = self.config.limits.receive_queue_bytes.max(1);
        let cost = u32::try_from(message_cost(&msg).min(budget)).unwrap_or(u32::MAX);
        let permit = self.queue_bytes.clone().acquire_many_owned(cost).await.ok();
        if self.tx.is_closed() {
            return;
        }
        if self.tx.capacity() == 0 {
            QUEUE_FULL.warn(format_args!(
                "the MCP receive queue is full ({} messages); reading from the server pauses",
                self.config.limits.receive_queue_messages
            ));
        }
        let _ = self
            .tx
            .send(Queued {
                msg,
                _bytes: permit,
            })
            .await;
    }

    /// GET on the endpoint: `Ok(None)` when the server offers no stream (405 and the like).
    async fn open_get(
        &self,
        url: &str,
        last_event_id: Option<&str>,
    ) -> Result<Option<C::Body>, HttpError> {
        let mut headers = self.config.headers.clone();
        headers.insert(ACCEPT, ACCEPT_SSE);
        {
            let st = self.lock();
            if let Some(v) = &st.version_header {
                headers.insert(HEADER_PROTOCOL_VERSION, v.clone());
            }
            if let Some(s) = &st.session {
                headers.insert(HEADER_SESSION_ID, s.id.clone());
            }
        }
        if let Some(id) = last_event_id.and_then(|l| HeaderValue::from_str(l).ok()) {
            headers.insert(HEADER_LAST_EVENT_ID, id);
        }
        let resp = self
            .client
            .send(HttpRequest {
                method: Method::GET,
                url: shown(url),
                headers,
                body: Bytes::new(),
                timeout: None,
            })
            .await?;
        if resp.status.is_success() && content_type(&resp.headers).starts_with("text/event-stream")
        {
            Ok(Some(resp.body))
        } else {
            Ok(None)
        }
    }

    /// Opens (or reopens) the GET stream for server-initiated messages of the current session.
    fn start_get_stream(self: &Arc<Self>) {
        if !self.config.get_stream {
            return;
        }
        let mut st = self.lock();
        let Some(session) = &st.session else {
            return;
        };
        if st.closed {
            return;
        }
        let url = self.config.endpoints[session.backend].clone();
        let generation = st.generation;
        if let Some(t) = st.get_task.take() {
            t.abort();
        }
        let weak = Arc::downgrade(self);
        st.get_task = Some(tokio::spawn(async move {
            let mut parser: Option<sse::Parser> = None;
            let mut failures = 0u32;
            // Reopenings in a row of streams that ended soon after opening (backoff).
            let mut quick_ends = 0u32;
            loop {
                let Some(me) = weak.upgrade() else { return };
                if me.lock().generation != generation {
                    return;
                }
                let last = parser
                    .as_ref()
                    .and_then(|p| p.last_event_id().map(str::to_owned));
                let mut body = match me.open_get(&url, last.as_deref()).await {
                    Ok(Some(b)) => b,
                    Ok(None) => return,
                    Err(e) => {
                        failures += 1;
                        tracing::debug!("GET stream to {} failed: {e}", shown(&url));
                        if failures > 5 {
                            return;
                        }
                        drop(me);
                        tokio::time::sleep(Duration::from_secs(1 << failures.min(5))).await;
                        continue;
                    }
                };
                let p = parser
                    .get_or_insert_with(|| sse::Parser::new(me.config.limits.max_message_bytes));
                let mut answered = true;
                let opened = Instant::now();
                let r = me
                    .read_sse(&url, &mut body, p, None, &mut answered, &mut Sink::Queue)
                    .await;
                if let Err(SseFailure::Bad(e)) = r {
                    tracing::warn!("dropping the server's GET stream: {e}");
                    return;
                }
                // A stream that lived long was fine: start the backoff over.
                if opened.elapsed() > me.config.limits.sse_max_reconnect {
                    quick_ends = 0;
                }
                let wait = reconnect_delay(&me.config.limits, p.retry_ms(), quick_ends);
                quick_ends = quick_ends.saturating_add(1);
                drop(me);
                failures = 0;
                tokio::time::sleep(wait).await;
            }
        }));
    }

    /// Replays `initialize` + `notifications/initialized` to get a new session: on the old
    /// endpoint after a 404, on another one when `dead` names the old one. Skipped if another
    /// task already did it since `seen_generation`.
    async fn reinitialize(
        self: &Arc<Self>,
        seen_generation: u64,
        dead: Option<usize>,
    ) -> Result<(), HttpTransportError> {
        let _guard = self.reinit.lock().await;
        let (params, old_backend) = {
            let mut st = self.lock();
            if st.generation != seen_generation {
                return Ok(());
            }
            let old = st.session.take().map(|s| s.backend);
            st.generation += 1;
            if let Some(t) = st.get_task.take() {
                t.abort();
            }
            (st.init_params.clone(), old)
        };
        let Some(params) = params else {
            return Err(HttpTransportError::NoInitialize);
        };
        let mut exclude: Vec<EndpointId> = Vec::new();
        let mut backend = match (dead, old_backend) {
            (None, Some(b)) => b,
            (Some(d), _) => {
                exclude.push(EndpointId(d));
                self.balancer
                    .fail_over(EndpointId(d), Instant::now(), "session endpoint failed")
                    .map_err(HttpTransportError::AllBackendsDown)?
                    .0
                     .0
            }
            (None, None) => {
                self.balancer
                    .pick(Instant::now())
                    .map_err(HttpTransportError::AllBackendsDown)?
                    .0
                     .0
            }
        };
        loop {
            let n = self.next_internal_id.fetch_add(1, Ordering::Relaxed);
            let id = RequestId::String(format!("vmcp-reinit-{n}"));
            let init = Message::Request(jsonrpc::Request {
                id: id.clone(),
                method: "initialize".into(),
                params: Some(params.clone()),
            });
            let body = Bytes::from(init.to_vec());
            let mut answer = None;
            let err = match self
                .attempt(
                    &init,
                    Some("initialize"),
                    &body,
                    backend,
                    Some((&id, &mut answer)),
                    &[],
                )
                .await
            {
                Attempt::Done if matches!(answer, Some(Message::Response(_))) => {
                    let note = Message::notification("notifications/initialized", None);
                    let nbody = Bytes::from(note.to_vec());
                    let _ = self
                        .attempt(&note, note.method(), &nbody, backend, None, &[])
                        .await;
                    tracing::info!(
                        "re-established the MCP session on {}",
                        shown(&self.config.endpoints[backend])
                    );
                    self.start_get_stream();
                    return Ok(());
                }
                Attempt::Done => HttpTransportError::NoAnswer {
                    url: shown(&self.config.endpoints[backend]),
                    id: id.to_string(),
                },
                Attempt::Retry(f) => {
                    if f.backend_failed {
                        let _ = self.balancer.fail_over(
                            EndpointId(backend),
                            Instant::now(),
                            &error_chain(&f.error),
                        );
                    }
                    f.error
                }
                Attempt::Fatal(e) => e,
            };
            exclude.push(EndpointId(backend));
            match self.balancer.pick_excluding(Instant::now(), &exclude) {
                Ok((next, _)) => backend = next.0,
                Err(_) => return Err(err),
            }
        }
    }

    async fn close(&self) {
        let (session, task) = {
            let mut st = self.lock();
            st.closed = true;
            (st.session.take(), st.get_task.take())
        };
        if let Ok(mut h) = self.health.lock() {
            h.take();
        }
        if let Some(t) = task {
            t.abort();
        }
        let Some(session) = session else { return };
        let mut headers = self.config.headers.clone();
        headers.insert(HEADER_SESSION_ID, session.id);
        if let Some(v) = self.lock().version_header.clone() {
            headers.insert(HEADER_PROTOCOL_VERSION, v);
        }
        let req = HttpRequest {
            method: Method::DELETE,
            url: self.config.endpoints[session.backend].clone(),
            headers,
            body: Bytes::new(),
            timeout: Some(Duration::from_secs(2)),
        };
        match self.client.send(req).await {
            Ok(mut r) => while let Ok(Some(_)) = r.body.chunk().await {},
            Err(e) => tracing::debug!("DELETE of the MCP session failed: {e}"),
        }
    }
}

enum SseFailure {
    /// The stream broke (I/O).
    Broken(HttpError),
    /// The stream carried garbage.
    Bad(HttpTransportError),
}

/// `a: b: c` for an error and its sources.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn answer_id(m: &Message) -> Option<&RequestId> {
    match m {
        Message::Response(r) => Some(&r.id),
        Message::Error(e) => e.id.as_ref(),
        Message::Request(_) | Message::Notification(_) => None,
    }
}

fn transport_failure(url: String, e: HttpError) -> AttemptFailure {
    // A rejected certificate will be rejected again: no retry.
    let rejection = crate::tls::TlsRejection::find(&e);
    let failure = match (&rejection, e.delivery, e.kind) {
        (Some(r), _, _) if r.is_permanent() => Failure::Permanent,
        (_, _, super::client::HttpErrorKind::Other) => Failure::Permanent,
        (_, Delivery::NotSent, _) => Failure::NotSent,
        (_, _, super::client::HttpErrorKind::Timeout) => Failure::Timeout(Phase::MaybeSent),
        _ => Failure::Reset(Phase::MaybeSent),
    };
    AttemptFailure {
        error: HttpTransportError::Request {
            url: shown(&url),
            source: e,
        },
        failure,
        // A certificate problem is not a dead endpoint.
        backend_failed: rejection.is_none(),
        reinit: false,
    }
}

fn body_failure(url: &str, e: HttpError) -> AttemptFailure {
    let failure = if e.kind == super::client::HttpErrorKind::Timeout {
        Failure::Timeout(Phase::MaybeSent)
    } else {
        Failure::Reset(Phase::MaybeSent)
    };
    AttemptFailure {
        error: HttpTransportError::Request {
            url: shown(url),
            source: HttpError {
                delivery: Delivery::MaybeSent,
                ..e
            },
        },
        failure,
        backend_failed: true,
        reinit: false,
    }
}

fn give_up(why: GiveUp, method: &str, error: HttpTransportError) -> HttpTransportError {
    let last = Box::new(error);
    match why {
        GiveUp::Permanent => *last,
        GiveUp::NotRepeatable => match *last {
            HttpTransportError::Request { url, source } => HttpTransportError::NotResent {
                method: method.to_owned(),
                url,
                source,
            },
            other => other,
        },
        // One attempt in all (no retries configured): the failure itself says it best.
        GiveUp::Exhausted { attempts: 1 } => *last,
        GiveUp::Exhausted { attempts } => HttpTransportError::RetriesExhausted {
            method: method.to_owned(),
            attempts,
            last,
        },
        GiveUp::Deadline { budget } => HttpTransportError::Deadline {
            method: method.to_owned(),
            budget,
            last,
        },
        GiveUp::RetryAfterTooLong { wait, limit } => {
            HttpTransportError::RetryAfterTooLong { wait, limit, last }
        }
        GiveUp::NotInvited => HttpTransportError::UnsafeNotResent {
            method: method.to_owned(),
            last,
        },
    }
}

/// Polls a future once without a real waker: `Some` when it was ready at once.
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Reads what is left of an answered SSE stream so its connection can be reused: at once
/// when the end is already buffered (the usual case), else in a background task for at
/// most 10 s. Anything after the answer is discarded.
fn finish_body<B: HttpBody>(mut body: B) {
    loop {
        match poll_once(body.chunk()) {
            Some(Ok(Some(_))) => continue,
            Some(Ok(None) | Err(_)) => return,
            None => break,
        }
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let drain = async { while let Ok(Some(_)) = body.chunk().await {} };
            let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
        });
    }
}

fn content_type(h: &HeaderMap) -> &str {
    h.get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The start of a server's error body for a message: control characters escaped, cut.
fn snippet(text: &str) -> String {
    crate::sanitize::for_display(text.trim(), crate::limits::MAX_PRINTED_CHARS)
}

/// The whole body, or `None` when it is larger than `limit` bytes (reading stops there).
async fn read_all<B: HttpBody>(mut body: B, limit: usize) -> Result<Option<Vec<u8>>, HttpError> {
    let mut out = Vec::new();
    while let Some(c) = body.chunk().await? {
        if out.len().saturating_add(c.len()) > limit {
            return Ok(None);
        }
        out.extend_from_slice(&c);
    }
    Ok(Some(out))
}

/// Warned when a server fills the receive queue (at most every 5 s).
static QUEUE_FULL: RateLimitedWarning = RateLimitedWarning::new(Duration::from_secs(5));

/// The wait before reopening an SSE stream: the server's `retry:` but at least
/// `sse_min_reconnect`, doubled for each of `attempt` quick reopenings in a row, at most
/// `sse_max_reconnect`.
pub(crate) fn reconnect_delay(limits: &Limits, retry_ms: Option<u64>, attempt: u32) -> Duration {
    let asked = Duration::from_millis(retry_ms.unwrap_or(1000));
    let base = asked.max(limits.sse_min_reconnect);
    base.saturating_mul(1u32 << attempt.min(16))
        .min(limits.sse_max_reconnect.max(limits.sse_min_reconnect))
}

async fn read_limited<B: HttpBody>(mut body: B, limit: usize) -> Option<String> {
    let mut out = Vec::new();
    while let Ok(Some(c)) = body.chunk().await {
        out.extend_from_slice(&c);
        if out.len() >= limit {
            break;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[derive(Deserialize)]
struct NameProbe<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    uri: Option<Cow<'a, str>>,
}

/// The `Mcp-Name` value of a request, if its method has one.
fn mcp_name(method: &str, params: Option<&serde_json::value::RawValue>) -> Option<String> {
    let params = params?;
    let probe: NameProbe<'_> = serde_json::from_str(params.get()).ok()?;
    match method {
        "tools/call" | "prompts/get" => probe.name.map(Cow::into_owned),
        "resources/read" => probe.uri.map(Cow::into_owned),
        _ => None,
    }
}

/// Encodes a header value per 2026-07-28: plain when it is visible ASCII without leading or
/// trailing whitespace and not sentinel-shaped, else `=?base64?...?=`.
pub fn encode_header_value(value: &str) -> Cow<'_, str> {
    let plain = !value.is_empty()
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) || b == b'\t')
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t'])
        && (!value.starts_with("=?base64?") || !value.ends_with("?="));
    if plain {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(value.as_bytes())
        ))
    }
}

impl<C: HttpClient> Transport for StreamableHttpTransport<C> {
    async fn send(&self, msg: &Message) -> Result<(), TransportError> {
        if self.shared.lock().closed {
            return Err(TransportError::Closed);
        }
        self.shared
            .post(msg, &[])
            .await
            .map_err(TransportError::Http)
    }

    async fn send_with_headers(
        &self,
        msg: &Message,
        headers: &[(String, String)],
    ) -> Result<(), TransportError> {
        if self.shared.lock().closed {
            return Err(TransportError::Closed);
        }
        self.shared
            .post(msg, headers)
            .await
            .map_err(TransportError::Http)
    }

    fn mirrors_param_headers(&self) -> bool {
        self.shared.era() == Some(Era::Modern)
    }

    async fn receive(&self) -> Option<Result<Message, TransportError>> {
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

    fn set_protocol(&self, state: &ProtocolState) {
        let mut st = self.shared.lock();
        st.version_header = state
            .version
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok());
        if let Some(v) = &state.version {
            let era = if is_modern(v) {
                Era::Modern
            } else {
                Era::Legacy
            };
            if state.era == era {
                for url in &self.shared.config.endpoints {
                    self.shared.config.era_cache.set(url, era);
                }
            }
        }
        st.protocol = Some(state.clone());
    }

    fn known_era(&self) -> Option<Era> {
        let cache = &self.shared.config.era_cache;
        let mut eras = self.shared.config.endpoints.iter().map(|u| cache.get(u));
        let first = eras.next().flatten()?;
        eras.all(|e| e == Some(first)).then_some(first)
    }

    fn may_ignore_unknown_requests(&self) -> bool {
        false
    }

    fn cancels_by_disconnect(&self) -> bool {
        self.shared.era() == Some(Era::Modern)
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
    use super::*;

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

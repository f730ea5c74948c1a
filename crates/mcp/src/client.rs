//! The MCP client: lifecycle, request/response matching, server requests and notifications.
//!
//! [`Client::connect`] takes any [`Transport`], starts one dispatcher task that reads every
//! incoming message, and runs the lifecycle ([`Lifecycle`]):
//!
//! * `Initialize` (legacy, 2025-03-26 .. 2025-11-25): `initialize`, then
//!   `notifications/initialized`.
//! * `Discover` (2026-07-28): `server/discover`; every later request carries the per-request
//!   `_meta` (protocol version, client info, capabilities). An `UnsupportedProtocolVersion`
//!   answer is retried with a version from its `supported` list if we speak one.
//! * `Auto`: `Discover`, falling back to `Initialize` when the answer is not a modern one (a
//!   JSON-RPC error with a non-modern code, or no answer within [`ClientConfig::probe_timeout`]
//!   of the request being sent: a stdio server of the old generation may stay silent). The
//!   HTTP transport turns an HTTP 4xx without a JSON-RPC error into "method not found", and
//!   answers `server/discover` itself for an endpoint it already knows to be of the old
//!   generation, so the fallback costs no round trip there.
//!
//! Requests: each gets a fresh integer id and a slot in the pending map; the dispatcher
//! completes the slot when the answer arrives. [`ClientConfig::request_timeout`] bounds each
//! call; when it expires, or when the caller drops the call's future, the slot is removed and
//! `notifications/cancelled` is sent (except on transports where closing the request's own
//! stream is the cancellation, i.e. 2026-07-28 over HTTP: that transport drops the
//! notification).
//!
//! Server-to-client requests (`ping`, `roots/list`, `sampling/createMessage`,
//! `elicitation/create`, ...) are answered by the [`ServerRequestHandler`] if one is set;
//! `ping` is always answered; anything unhandled gets JSON-RPC error -32601 (method not
//! found). Notifications are logged (`notifications/message` at the level the server gave,
//! progress at debug) and forwarded to [`Client::notifications`] if taken.
//!
//! Multi round-trip requests (2026-07-28): an `input_required` result of `tools/call`,
//! `prompts/get` or `resources/read` has its `inputRequests` served by the handler and the
//! request is retried with `inputResponses` and the echoed `requestState` (new id, at most
//! [`MRTR_MAX_ROUNDS`] rounds); input the handler does not serve is
//! [`ClientError::InputRequired`].
//!
//! Bounds (see [`crate::limits`]): `*/list` calls go through [`Pager`] (pages, items, bytes,
//! JSON values, time; a repeated cursor ends the call with an error); every answer is checked
//! against a JSON-value budget before it is decoded; at most
//! [`Limits::max_server_requests`] server requests are handled at once, the next
//! [`Limits::max_server_rejects`] are answered "busy" (-32000) and further ones dropped with
//! a rate-limited warning; notifications wait in a bounded queue.
//!
//! Limits: no `subscriptions/listen`.
//! `x-mcp-header` parameters (HTTP only) are the HTTP transport's business: it mirrors them
//! into `Mcp-Param-*` headers from the `tools/list` answers it carried and drops tools whose
//! annotations are invalid (see [`crate::param_headers`]); on a header mismatch (-32020) the
//! client lists the tools again and retries the call once.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::jsonrpc::{
    self, ErrorResponse, Message, Notification, Request, RequestId, Response, RpcError,
};
use crate::limits::{LimitError, Limits, Page, Pager, RateLimitedWarning};
use crate::model::Era;
use crate::model::{
    self, CallToolParams, CallToolResult, GetPromptResult, Implementation, InitializeParams,
    ListPromptsResult, ListResourcesResult, ListToolsResult, Prompt, ReadResourceResult, Resource,
    ServerInfo, Tool,
};
use crate::transport::{Transport, TransportError};

/// How the client starts talking to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Lifecycle {
    /// Legacy `initialize` handshake (protocol 2025-11-25 requested).
    Initialize,
    /// 2026-07-28 `server/discover`, stateless.
    Discover,
    /// Detect: the known generation, else discover with fallback to initialize.
    #[default]
    Auto,
}

/// A boxed future answering a server request.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>>;

/// Answers requests the server sends to the client.
pub trait ServerRequestHandler: Send + Sync + 'static {
    /// The answer to `request`, or `None` when this handler does not serve its method (the
    /// client then answers "method not found").
    fn handle(&self, request: &Request) -> Option<HandlerFuture>;
}

/// Client settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Our name and version.
    pub client_info: Implementation,
    /// Our capabilities (advertise only what the handler serves).
    pub capabilities: Value,
    /// How to start.
    pub lifecycle: Lifecycle,
    /// Time limit of each request, end to end; `None` = unlimited.
    pub request_timeout: Option<Duration>,
    /// How long `Auto` waits for a `server/discover` answer on transports where a legacy
    /// server may stay silent.
    pub probe_timeout: Duration,
    /// Server request handler.
    pub handler: Option<Arc<dyn ServerRequestHandler>>,
    /// Bounds on what the server can make the client hold and do.
    pub limits: Limits,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            client_info: Implementation::vmcp(),
            capabilities: Value::Object(serde_json::Map::new()),
            lifecycle: Lifecycle::Auto,
            request_timeout: Some(Duration::from_secs(60)),
            probe_timeout: Duration::from_secs(5),
            handler: None,
            limits: Limits::default(),
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("client_info", &self.client_info)
            .field("lifecycle", &self.lifecycle)
            .field("request_timeout", &self.request_timeout)
            .field("handler", &self.handler.is_some())
            .field("limits", &self.limits)
            .finish()
    }
}

impl ClientConfig {
    /// Sets the lifecycle.
    pub fn with_lifecycle(mut self, lifecycle: Lifecycle) -> Self {
        self.lifecycle = lifecycle;
        self
    }

    /// Sets the per-request timeout.
    pub fn with_request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets the bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the server request handler and the capabilities it serves.
    pub fn with_handler(
        mut self,
        handler: Arc<dyn ServerRequestHandler>,
        capabilities: Value,
    ) -> Self {
        self.handler = Some(handler);
        self.capabilities = capabilities;
        self
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The server answered with a JSON-RPC error.
    #[error("the server answered {method} with error {}: {}", error.code, crate::sanitize::for_display(&error.message, crate::limits::MAX_PRINTED_CHARS))]
    Rpc {
        /// The request's method.
        method: String,
        /// The error.
        error: RpcError,
    },
    /// No answer in time.
    #[error("{method} got no answer within {:.1} s (cancelled)", after.as_secs_f64())]
    Timeout {
        /// The request's method.
        method: String,
        /// The limit.
        after: Duration,
    },
    /// The connection ended before the answer.
    #[error("the MCP connection closed before {method} was answered")]
    Closed {
        /// The request's method.
        method: String,
    },
    /// The answer does not have the expected shape.
    #[error("the server's answer to {method} is malformed")]
    Decode {
        /// The request's method.
        method: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// No protocol version both sides speak.
    #[error("the server speaks protocol versions {server:?}; this client speaks {client:?}")]
    NoCommonVersion {
        /// The server's versions.
        server: Vec<String>,
        /// Ours.
        client: Vec<String>,
    },
    /// The server asked for client input (2026-07-28 multi-round-trip), unsupported here.
    #[error("the server needs client input to complete {method} (multi round-trip requests are not supported)")]
    InputRequired {
        /// The request's method.
        method: String,
    },
    /// A bound of [`crate::limits`] was hit.
    #[error("{method} stopped")]
    Limit {
        /// The request's method.
        method: String,
        /// Which bound.
        #[source]
        source: LimitError,
    },
    /// A peer that may ignore requests did not answer a probe in time (protocol detection).
    #[error("{method} got no answer within {:.1} s of being sent", after.as_secs_f64())]
    Silent {
        /// The request's method.
        method: String,
        /// The limit.
        after: Duration,
    },
    /// The server's result has a `resultType` this client does not know.
    #[error("the server's answer to {method} has unknown resultType {}", crate::sanitize::for_display(&format!("{result_type:?}"), 60))]
    UnknownResultType {
        /// The request's method.
        method: String,
        /// What it said.
        result_type: String,
    },
}

type Slot = oneshot::Sender<Result<Box<RawValue>, RpcError>>;

struct Inner<T> {
    transport: T,
    pending: Mutex<HashMap<i64, Slot>>,
    next_id: AtomicI64,
    config: ClientConfig,
    /// `"_meta":{...}` for 2026-07-28 requests, set once discovery chose the version.
    meta: OnceLock<String>,
    modern: std::sync::atomic::AtomicBool,
    notifications: Mutex<Option<mpsc::Sender<Notification>>>,
    /// Server requests being handled, and being rejected as busy.
    handling: Arc<tokio::sync::Semaphore>,
    rejecting: Arc<tokio::sync::Semaphore>,
    /// Warnings a server can trigger at will.
    overload_warning: RateLimitedWarning,
}

/// A connected MCP client. Cheap to clone; all clones share the connection.
pub struct Client<T: Transport> {
    inner: Arc<Inner<T>>,
    server: Arc<ServerInfo>,
    dispatcher: Arc<DispatcherGuard>,
}

impl<T: Transport> Clone for Client<T> {
    fn clone(&self) -> Self {
        Client {
            inner: self.inner.clone(),
            server: self.server.clone(),
            dispatcher: self.dispatcher.clone(),
        }
    }
}

struct DispatcherGuard(tokio::task::JoinHandle<()>);

impl Drop for DispatcherGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T: Transport> Client<T> {
    /// Starts the dispatcher and runs the lifecycle.
    pub async fn connect(transport: T, config: ClientConfig) -> Result<Self, ClientError> {
        let inner = Arc::new(Inner {
            transport,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicI64::new(1),
            meta: OnceLock::new(),
            modern: std::sync::atomic::AtomicBool::new(false),
            notifications: Mutex::new(None),
            handling: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_server_requests.max(1),
            )),
            rejecting: Arc::new(tokio::sync::Semaphore::new(
                config.limits.max_server_rejects,
            )),
            overload_warning: RateLimitedWarning::new(Duration::from_secs(5)),
            config,
        });
        let dispatcher = Arc::new(DispatcherGuard(tokio::spawn(dispatch(Arc::downgrade(
            &inner,
        )))));
        let server = match lifecycle(&inner).await {
            Ok(s) => s,
            Err(e) => {
                inner.transport.close().await;
                return Err(e);
            }
        };
        Ok(Client {
            inner,
            server: Arc::new(server),
            dispatcher,
        })
    }

    /// What the server said about itself.
    pub fn server_info(&self) -> &ServerInfo {
        &self.server
    }

    /// The generation in use.
    pub fn era(&self) -> Era {
        if self.inner.modern.load(Ordering::Relaxed) {
            Era::Modern
        } else {
            Era::Legacy
        }
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.inner.transport
    }

    /// Notifications from the server, from now on (one receiver; a second call replaces it).
    /// At most [`Limits::notification_queue`] wait to be read; newer ones are dropped (with a
    /// rate-limited warning) while the queue is full.
    pub fn notifications(&self) -> mpsc::Receiver<Notification> {
        let (tx, rx) = mpsc::channel(self.inner.config.limits.notification_queue.max(1));
        if let Ok(mut n) = self.inner.notifications.lock() {
            *n = Some(tx);
        }
        rx
    }

    /// Sends a request with raw params and returns the raw result.
    pub async fn request_raw(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
    ) -> Result<Box<RawValue>, ClientError> {
        request(&self.inner, method, params).await
    }

    /// Sends a request and parses the result.
    pub async fn request<P: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        params: &P,
    ) -> Result<R, ClientError> {
        let raw = jsonrpc::to_raw(params).map_err(|source| ClientError::Decode {
            method: method.to_owned(),
            source,
        })?;
        let result = request(&self.inner, method, Some(raw)).await?;
        self.decode(method, &result)
    }

    /// Decodes a result after checking it against the JSON-value budget.
    fn decode<R: DeserializeOwned>(&self, method: &str, raw: &RawValue) -> Result<R, ClientError> {
        decode_bounded(method, raw, self.inner.config.limits.max_result_nodes).map(|(r, _)| r)
    }

    /// Fetches every page of a `*/list` method under the [`Pager`]'s bounds; `items` takes a
    /// page apart into its items and its `nextCursor`.
    async fn list_all<P: DeserializeOwned, I>(
        &self,
        method: &str,
        items: impl Fn(P) -> (Vec<I>, Option<String>),
    ) -> Result<Vec<I>, ClientError> {
        let limits = &self.inner.config.limits;
        let limit_err = |source| ClientError::Limit {
            method: method.to_owned(),
            source,
        };
        let started = tokio::time::Instant::now();
        let fetch_all = async {
            let mut pager = Pager::new(limits);
            let mut out = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let params = jsonrpc::to_raw(&Cursor::new(&cursor)).map_err(|source| {
                    ClientError::Decode {
                        method: method.to_owned(),
                        source,
                    }
                })?;
                let raw = request(&self.inner, method, Some(params)).await?;
                let bytes = raw.get().len();
                if bytes > pager.bytes_left() {
                    return Err(limit_err(LimitError::Bytes(limits.max_list_bytes)));
                }
                let (page, nodes) = decode_bounded::<P>(method, &raw, pager.nodes_left())?;
                drop(raw);
                let (page_items, next) = items(page);
                let n = page_items.len();
                out.extend(page_items);
                let step = pager.page(
                    Page {
                        items: n,
                        bytes,
                        nodes,
                        next_cursor: next.as_deref(),
                    },
                    started.elapsed(),
                );
                match step.map_err(limit_err)? {
                    Some(next) => cursor = Some(next),
                    None => return Ok(out),
                }
            }
        };
        match tokio::time::timeout(limits.max_list_time, fetch_all).await {
            Ok(r) => r,
            Err(_) => Err(limit_err(LimitError::Time(limits.max_list_time))),
        }
    }

    /// Sends a notification.
    pub async fn notify(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
    ) -> Result<(), ClientError> {
        self.inner
            .transport
            .send(&Message::notification(method, params))
            .await
            .map_err(|e| ClientError::Transport(TransportError::new(e)))
    }

    /// `ping`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        request(&self.inner, "ping", None).await.map(|_| ())
    }

    /// `tools/list`, all pages.
    pub async fn list_tools(&self) -> Result<Vec<Tool>, ClientError> {
        self.list_all("tools/list", |p: ListToolsResult| (p.tools, p.next_cursor))
            .await
    }

    /// `tools/call`, the raw result (for printing it as the server sent it).
    pub async fn call_tool_raw(
        &self,
        name: &str,
        arguments: Option<&Value>,
    ) -> Result<Box<RawValue>, ClientError> {
        let params = jsonrpc::to_raw(&CallToolParams { name, arguments }).map_err(|source| {
            ClientError::Decode {
                method: "tools/call".into(),
                source,
            }
        })?;
        match request(&self.inner, "tools/call", Some(params.clone())).await {
            Err(ClientError::Rpc { error, .. })
                if error.code == jsonrpc::HEADER_MISMATCH
                    && self.inner.modern.load(Ordering::Relaxed) =>
            {
                // The tool's x-mcp-header annotations may have changed: list again (the HTTP
                // transport learns them from the answer), retry once.
                self.list_tools().await?;
                request(&self.inner, "tools/call", Some(params)).await
            }
            other => other,
        }
    }

    /// `tools/call`.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: Option<&Value>,
    ) -> Result<CallToolResult, ClientError> {
        let raw = self.call_tool_raw(name, arguments).await?;
        self.decode("tools/call", &raw)
    }

    /// `resources/list`, all pages.
    pub async fn list_resources(&self) -> Result<Vec<Resource>, ClientError> {
        self.list_all("resources/list", |p: ListResourcesResult| {
            (p.resources, p.next_cursor)
        })
        .await
    }

    /// `resources/read`.
    pub async fn read_resource(&self, uri: &str) -> Result<ReadResourceResult, ClientError> {
        self.request("resources/read", &serde_json::json!({ "uri": uri }))
            .await
    }

    /// `prompts/list`, all pages.
    pub async fn list_prompts(&self) -> Result<Vec<Prompt>, ClientError> {
        self.list_all("prompts/list", |p: ListPromptsResult| {
            (p.prompts, p.next_cursor)
        })
        .await
    }

    /// `prompts/get`.
    pub async fn get_prompt(
        &self,
        name: &str,
        arguments: Option<&Value>,
    ) -> Result<GetPromptResult, ClientError> {
        let mut p = serde_json::json!({ "name": name });
        if let (Some(a), Value::Object(m)) = (arguments, &mut p) {
            m.insert("arguments".into(), a.clone());
        }
        self.request("prompts/get", &p).await
    }

    /// Closes the connection (ends the session, stops a stdio server).
    pub async fn close(&self) {
        self.inner.transport.close().await;
    }
}

#[derive(Serialize)]
struct Cursor<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a str>,
}

impl<'a> Cursor<'a> {
    fn new(c: &'a Option<String>) -> Self {
        Cursor {
            cursor: c.as_deref(),
        }
    }
}

/// Decodes `raw` as `R` if it has at most `max_nodes` JSON values; also returns the count.
pub fn decode_bounded<R: DeserializeOwned>(
    method: &str,
    raw: &RawValue,
    max_nodes: usize,
) -> Result<(R, usize), ClientError> {
    let nodes =
        crate::limits::json_nodes(raw.get(), max_nodes).map_err(|source| ClientError::Limit {
            method: method.to_owned(),
            source,
        })?;
    decode(method, raw).map(|r| (r, nodes))
}

fn decode<R: DeserializeOwned>(method: &str, raw: &RawValue) -> Result<R, ClientError> {
    serde_json::from_str(raw.get()).map_err(|source| ClientError::Decode {
        method: method.to_owned(),
        source,
    })
}

/// Removes the pending slot when a call ends early (timeout, dropped future) and tells the
/// server to stop.
struct PendingGuard<'a, T: Transport> {
    inner: &'a Arc<Inner<T>>,
    id: i64,
    done: bool,
}

impl<T: Transport> Drop for PendingGuard<'_, T> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let removed = self
            .inner
            .pending
            .lock()
            .map(|mut p| p.remove(&self.id).is_some())
            .unwrap_or(false);
        if removed {
            let inner = self.inner.clone();
            let id = self.id;
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let params = jsonrpc::to_raw(&serde_json::json!({
                        "requestId": id,
                        "reason": "cancelled by the client"
                    }))
                    .ok();
                    let _ = inner
                        .transport
                        .send(&Message::notification("notifications/cancelled", params))
                        .await;
                });
            }
        }
    }
}

async fn request<T: Transport>(
    inner: &Arc<Inner<T>>,
    method: &str,
    params: Option<Box<RawValue>>,
) -> Result<Box<RawValue>, ClientError> {
    // Only the MRTR methods need the params again.
    let params_for_retry = if MRTR_METHODS.contains(&method) && inner.modern.load(Ordering::Relaxed)
    {
        params.clone()
    } else {
        None
    };
    let result = request_once(inner, method, params, None).await?;
    if !inner.modern.load(Ordering::Relaxed) {
        return Ok(result);
    }
    match check_result_type(method, &result) {
        Err(ClientError::InputRequired { .. }) if MRTR_METHODS.contains(&method) => {
            mrtr(inner, method, params_for_retry, result).await
        }
        Err(e) => Err(e),
        Ok(()) => Ok(result),
    }
}

/// One request, one answer (no multi round-trip handling, no result type check).
/// `answer_limit`: how long to wait for the answer once the request is sent (a probe of a
/// peer that may ignore it); its expiry is [`Silent`].
async fn request_once<T: Transport>(
    inner: &Arc<Inner<T>>,
    method: &str,
    params: Option<Box<RawValue>>,
    answer_limit: Option<Duration>,
) -> Result<Box<RawValue>, ClientError> {
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let params = match inner.meta.get() {
        Some(meta) => Some(with_meta(params, meta)),
        None => params,
    };
    let (tx, rx) = oneshot::channel();
    if let Ok(mut p) = inner.pending.lock() {
        p.insert(id, tx);
    }
    let mut guard = PendingGuard {
        inner,
        id,
        done: false,
    };
    let msg = Message::request(id, method, params);
    let exchange = async {
        inner
            .transport
            .send(&msg)
            .await
            .map_err(TransportError::new)?;
        match answer_limit {
            None => Ok(Some(rx.await)),
            Some(limit) => Ok(tokio::time::timeout(limit, rx).await.ok()),
        }
    };
    let outcome = match inner.config.request_timeout {
        Some(t) => match tokio::time::timeout(t, exchange).await {
            Ok(r) => r,
            Err(_) => {
                return Err(ClientError::Timeout {
                    method: method.to_owned(),
                    after: t,
                })
            }
        },
        None => exchange.await,
    };
    let answer = match outcome {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(ClientError::Silent {
                method: method.to_owned(),
                after: answer_limit.unwrap_or_default(),
            })
        }
        Err(e) => {
            // The send failed: nothing to cancel.
            guard.done = true;
            if let Ok(mut p) = inner.pending.lock() {
                p.remove(&id);
            }
            return Err(ClientError::Transport(e));
        }
    };
    guard.done = true;
    let result = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(error)) => {
            return Err(ClientError::Rpc {
                method: method.to_owned(),
                error,
            })
        }
        Err(_) => {
            return Err(ClientError::Closed {
                method: method.to_owned(),
            })
        }
    };
    Ok(result)
}

/// Methods whose result may be `input_required` (2026-07-28 multi round-trip requests).
const MRTR_METHODS: &[&str] = &["tools/call", "prompts/get", "resources/read"];

/// Most rounds of input a request may go through.
pub const MRTR_MAX_ROUNDS: usize = 10;

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct InputRequired {
    #[serde(default)]
    input_requests: serde_json::Map<String, Value>,
    #[serde(default)]
    request_state: Option<String>,
}

/// Serves the input requests of an `input_required` result with the handler and retries the
/// original request (new id, `inputResponses`, the echoed `requestState`), up to
/// [`MRTR_MAX_ROUNDS`] times.
fn mrtr<'a, T: Transport>(
    inner: &'a Arc<Inner<T>>,
    method: &'a str,
    original: Option<Box<RawValue>>,
    first: Box<RawValue>,
) -> Pin<Box<dyn Future<Output = Result<Box<RawValue>, ClientError>> + Send + 'a>> {
    Box::pin(async move {
        let base: serde_json::Map<String, Value> = match original.as_deref() {
            Some(p) => serde_json::from_str(p.get()).map_err(|source| ClientError::Decode {
                method: method.to_owned(),
                source,
            })?,
            None => serde_json::Map::new(),
        };
        let mut answer = first;
        for _ in 0..MRTR_MAX_ROUNDS {
            let want: InputRequired = decode(method, &answer)?;
            let mut responses = serde_json::Map::new();
            for (key, req) in want.input_requests {
                let request = Request {
                    id: RequestId::String(key.clone()),
                    method: req
                        .get("method")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    params: req.get("params").and_then(|p| jsonrpc::to_raw(p).ok()),
                };
                let fut = inner
                    .config
                    .handler
                    .as_ref()
                    .and_then(|h| h.handle(&request));
                let Some(fut) = fut else {
                    return Err(ClientError::InputRequired {
                        method: method.to_owned(),
                    });
                };
                let value = fut.await.map_err(|error| ClientError::Rpc {
                    method: request.method.clone(),
                    error,
                })?;
                responses.insert(key, value);
            }
            // `base` is the caller's params: our `_meta` is spliced in again by request_once.
            let mut params = base.clone();
            params.insert("inputResponses".into(), Value::Object(responses));
            if let Some(state) = want.request_state {
                params.insert("requestState".into(), Value::String(state));
            }
            let raw = jsonrpc::to_raw(&params).map_err(|source| ClientError::Decode {
                method: method.to_owned(),
                source,
            })?;
            let result = request_once(inner, method, Some(raw), None).await?;
            match check_result_type(method, &result) {
                Err(ClientError::InputRequired { .. }) => answer = result,
                Err(e) => return Err(e),
                Ok(()) => return Ok(result),
            }
        }
        Err(ClientError::InputRequired {
            method: method.to_owned(),
        })
    })
}

fn check_result_type(method: &str, result: &RawValue) -> Result<(), ClientError> {
    let probe: model::ResultTypeProbe<'_> =
        serde_json::from_str(result.get()).map_err(|source| ClientError::Decode {
            method: method.to_owned(),
            source,
        })?;
    match probe.result_type {
        None | Some("complete") => Ok(()),
        Some("input_required") => Err(ClientError::InputRequired {
            method: method.to_owned(),
        }),
        Some(other) => Err(ClientError::UnknownResultType {
            method: method.to_owned(),
            result_type: other.to_owned(),
        }),
    }
}

/// Puts `"_meta":{...}` (given as `meta`, without braces around it) into a params object.
fn with_meta(params: Option<Box<RawValue>>, meta: &str) -> Box<RawValue> {
    let raw = params.as_deref().map(RawValue::get).unwrap_or("{}");
    let trimmed = raw.trim_start();
    let spliced = if raw.contains("\"_meta\"") || !trimmed.starts_with('{') {
        merge_meta(raw, meta)
    } else {
        let body = trimmed[1..].trim_start();
        if body.starts_with('}') {
            format!("{{{meta}}}")
        } else {
            format!("{{{meta},{body}")
        }
    };
    RawValue::from_string(spliced)
        .or_else(|_| RawValue::from_string(format!("{{{meta}}}")))
        .unwrap_or_else(|_| params.unwrap_or_default())
}

/// Slow path: params that already have `_meta` (or are not an object).
fn merge_meta(raw: &str, meta: &str) -> String {
    let ours: Value = serde_json::from_str(&format!("{{{meta}}}")).unwrap_or_default();
    let mut params: Value =
        serde_json::from_str(raw).unwrap_or_else(|_| Value::Object(Default::default()));
    if let (Value::Object(p), Some(Value::Object(add))) = (&mut params, ours.get("_meta")) {
        let entry = p
            .entry("_meta")
            .or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(m) = entry {
            for (k, v) in add {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    params.to_string()
}

fn meta_fragment(version: &str, config: &ClientConfig) -> String {
    let meta = serde_json::json!({
        model::META_PROTOCOL_VERSION: version,
        model::META_CLIENT_INFO: config.client_info,
        model::META_CLIENT_CAPABILITIES: config.capabilities,
    });
    format!("\"_meta\":{meta}")
}

async fn lifecycle<T: Transport>(inner: &Arc<Inner<T>>) -> Result<ServerInfo, ClientError> {
    match inner.config.lifecycle {
        Lifecycle::Initialize => initialize(inner).await,
        Lifecycle::Discover => discover(inner, None).await,
        Lifecycle::Auto => match discover(inner, Some(inner.config.probe_timeout)).await {
            Ok(info) => Ok(info),
            Err(ClientError::Silent { .. }) => {
                tracing::debug!("no answer to server/discover; falling back to initialize");
                match initialize(inner).await {
                    // The server was only slow (a stdio server still starting): it took the
                    // probe after all and now speaks 2026-07-28, so discover again, unhurried.
                    Err(ClientError::Rpc { error, .. })
                        if error.code == jsonrpc::UNSUPPORTED_PROTOCOL_VERSION =>
                    {
                        tracing::debug!("the server answered initialize with 2026-07-28 only; discovering again");
                        discover(inner, None).await
                    }
                    other => other,
                }
            }
            Err(e) if is_legacy_sign(&e) => {
                tracing::debug!("server/discover failed ({e}); falling back to initialize");
                initialize(inner).await
            }
            Err(e) => Err(e),
        },
    }
}

/// Does this failure of `server/discover` say the server is legacy?
fn is_legacy_sign(e: &ClientError) -> bool {
    match e {
        ClientError::Rpc { error, .. } => !error.is_modern_error(),
        ClientError::Decode { .. } => true,
        _ => false,
    }
}

async fn initialize<T: Transport>(inner: &Arc<Inner<T>>) -> Result<ServerInfo, ClientError> {
    let params = InitializeParams {
        protocol_version: model::V_2025_11_25,
        capabilities: &inner.config.capabilities,
        client_info: &inner.config.client_info,
    };
    let raw = jsonrpc::to_raw(&params).map_err(|source| ClientError::Decode {
        method: "initialize".into(),
        source,
    })?;
    let result = request(inner, "initialize", Some(raw)).await?;
    let (info, _): (ServerInfo, _) =
        decode_bounded("initialize", &result, inner.config.limits.max_result_nodes)?;
    if !model::LEGACY_VERSIONS.contains(&info.protocol_version.as_str()) {
        return Err(ClientError::NoCommonVersion {
            server: vec![info.protocol_version.clone()],
            client: model::LEGACY_VERSIONS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        });
    }
    inner
        .transport
        .send(&Message::notification("notifications/initialized", None))
        .await
        .map_err(TransportError::new)?;
    Ok(info)
}

/// `server/discover` (the version travels in `_meta`, where transports that need it read it).
/// `probe`: how long to wait for an answer once sent, when the peer may ignore the request.
async fn discover<T: Transport>(
    inner: &Arc<Inner<T>>,
    probe: Option<Duration>,
) -> Result<ServerInfo, ClientError> {
    let mut version = model::V_2026_07_28.to_owned();
    for _ in 0..2 {
        let meta = meta_fragment(&version, &inner.config);
        let params = with_meta(None, &meta);
        match request_once(inner, "server/discover", Some(params), probe).await {
            Ok(raw) => {
                let (mut info, _): (ServerInfo, _) = decode_bounded(
                    "server/discover",
                    &raw,
                    inner.config.limits.max_result_nodes,
                )?;
                if !info.supported_versions.is_empty()
                    && !info.supported_versions.contains(&version)
                {
                    let Some(v) = pick_modern(&info.supported_versions) else {
                        return Err(no_common(info.supported_versions));
                    };
                    version = v;
                    continue;
                }
                info.protocol_version = version.clone();
                let _ = inner.meta.set(meta);
                inner.modern.store(true, Ordering::Relaxed);
                return Ok(info);
            }
            Err(ClientError::Rpc { error, .. })
                if error.code == jsonrpc::UNSUPPORTED_PROTOCOL_VERSION =>
            {
                let supported: Vec<String> = error
                    .data
                    .as_ref()
                    .and_then(|d| d.get("supported"))
                    .and_then(|s| serde_json::from_value(s.clone()).ok())
                    .unwrap_or_default();
                match pick_modern(&supported) {
                    Some(v) if v != version => version = v,
                    _ => return Err(no_common(supported)),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(no_common(Vec::new()))
}

fn pick_modern(supported: &[String]) -> Option<String> {
    model::MODERN_VERSIONS
        .iter()
        .find(|v| supported.iter().any(|s| s == *v))
        .map(|v| (*v).to_owned())
}

fn no_common(server: Vec<String>) -> ClientError {
    ClientError::NoCommonVersion {
        server,
        client: model::MODERN_VERSIONS
            .iter()
            .chain(model::LEGACY_VERSIONS)
            .map(|s| (*s).to_owned())
            .collect(),
    }
}

/// Reads every incoming message until the transport ends.
async fn dispatch<T: Transport>(weak: std::sync::Weak<Inner<T>>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let Some(item) = inner.transport.receive().await else {
            break;
        };
        match item {
            Ok(Message::Response(Response { id, result })) => complete(&inner, &id, Ok(result)),
            Ok(Message::Error(ErrorResponse {
                id: Some(id),
                error,
            })) => complete(&inner, &id, Err(error)),
            Ok(Message::Error(ErrorResponse { id: None, error })) => {
                tracing::warn!("MCP server reported an error: {error}");
            }
            Ok(Message::Request(req)) => on_request(&inner, req),
            Ok(Message::Notification(n)) => on_notification(&inner, n),
            Err(e) => tracing::warn!("MCP transport: {e}"),
        }
    }
    // The connection ended: fail everything still waiting.
    if let Some(inner) = weak.upgrade() {
        if let Ok(mut p) = inner.pending.lock() {
            p.clear();
        }
    }
}

fn complete<T: Transport>(
    inner: &Inner<T>,
    id: &RequestId,
    result: Result<Box<RawValue>, RpcError>,
) {
    let RequestId::Number(n) = id else {
        tracing::debug!("ignoring an answer to unknown request {id}");
        return;
    };
    let slot = inner.pending.lock().ok().and_then(|mut p| p.remove(n));
    match slot {
        Some(tx) => {
            let _ = tx.send(result);
        }
        None => tracing::debug!("ignoring an answer to unknown or cancelled request {id}"),
    }
}

/// Starts handling a server request if a handler slot is free; else answers "busy" if a
/// reject slot is free; else drops it with a rate-limited warning. Never waits, so the
/// dispatcher keeps reading answers to our own requests whatever the server sends.
fn on_request<T: Transport>(inner: &Arc<Inner<T>>, req: Request) {
    if let Ok(permit) = inner.handling.clone().try_acquire_owned() {
        let inner = inner.clone();
        tokio::spawn(async move {
            answer(&inner, req).await;
            drop(permit);
        });
        return;
    }
    let limit = inner.config.limits.max_server_requests;
    inner.overload_warning.warn(format_args!(
        "the MCP server sent more than {limit} requests at once; refusing {}",
        crate::sanitize::for_display(&req.method, 60)
    ));
    if let Ok(permit) = inner.rejecting.clone().try_acquire_owned() {
        let inner = inner.clone();
        tokio::spawn(async move {
            let msg = Message::Error(ErrorResponse {
                id: Some(req.id),
                error: RpcError::new(
                    SERVER_BUSY,
                    format!("client busy: more than {limit} server requests at once"),
                ),
            });
            let _ = inner.transport.send(&msg).await;
            drop(permit);
        });
    }
}

/// JSON-RPC error code of the answer to a server request refused for overload.
pub const SERVER_BUSY: i64 = -32000;

async fn answer<T: Transport>(inner: &Arc<Inner<T>>, req: Request) {
    let result = if req.method == "ping" {
        Ok(Value::Object(Default::default()))
    } else {
        match inner.config.handler.as_ref().and_then(|h| h.handle(&req)) {
            Some(fut) => fut.await,
            None => Err(RpcError::new(
                jsonrpc::METHOD_NOT_FOUND,
                format!("method not found: {}", req.method),
            )),
        }
    };
    let msg = match result.and_then(|v| {
        jsonrpc::to_raw(&v).map_err(|e| RpcError::new(jsonrpc::INTERNAL_ERROR, e.to_string()))
    }) {
        Ok(result) => Message::Response(Response { id: req.id, result }),
        Err(error) => Message::Error(ErrorResponse {
            id: Some(req.id),
            error,
        }),
    };
    if let Err(e) = inner.transport.send(&msg).await {
        tracing::warn!(
            "cannot answer the server's {} request: {e}",
            crate::sanitize::for_display(&req.method, 60)
        );
    }
}

fn on_notification<T: Transport>(inner: &Inner<T>, n: Notification) {
    match n.method.as_str() {
        "notifications/message" => {
            let text = n.params.as_ref().map(|p| p.get()).unwrap_or("");
            tracing::info!(
                target: "vmcp_mcp::server_log",
                "{}",
                crate::sanitize::for_display(text, 1000)
            );
        }
        "notifications/progress" => {
            tracing::debug!(
                "progress: {}",
                crate::sanitize::for_display(
                    n.params.as_ref().map(|p| p.get()).unwrap_or(""),
                    crate::limits::MAX_PRINTED_CHARS
                )
            );
        }
        "notifications/cancelled" => {
            tracing::debug!("the server cancelled one of its requests");
        }
        _ => tracing::debug!(
            "notification {}",
            crate::sanitize::for_display(&n.method, 60)
        ),
    }
    let tx = inner.notifications.lock().ok().and_then(|g| g.clone());
    if let Some(tx) = tx {
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(n) {
            inner.overload_warning.warn(format_args!(
                "dropping an MCP server notification: {} are waiting to be read",
                inner.config.limits.notification_queue
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_splice() {
        let meta = "\"_meta\":{\"k\":1}";
        assert_eq!(with_meta(None, meta).get(), "{\"_meta\":{\"k\":1}}");
        let p = jsonrpc::to_raw(&serde_json::json!({"name":"x"})).unwrap();
        assert_eq!(
            with_meta(Some(p), meta).get(),
            "{\"_meta\":{\"k\":1},\"name\":\"x\"}"
        );
        let p =
            jsonrpc::to_raw(&serde_json::json!({"_meta":{"progressToken":3},"name":"x"})).unwrap();
        let v: Value = serde_json::from_str(with_meta(Some(p), meta).get()).unwrap();
        assert_eq!(v["_meta"]["progressToken"], 3);
        assert_eq!(v["_meta"]["k"], 1);
        assert_eq!(v["name"], "x");
    }

    #[test]
    fn result_types() {
        let ok = RawValue::from_string("{\"resultType\":\"complete\"}".into()).unwrap();
        assert!(check_result_type("m", &ok).is_ok());
        let ir = RawValue::from_string("{\"resultType\":\"input_required\"}".into()).unwrap();
        assert!(matches!(
            check_result_type("m", &ir),
            Err(ClientError::InputRequired { .. })
        ));
        let odd = RawValue::from_string("{\"resultType\":\"odd\"}".into()).unwrap();
        assert!(matches!(
            check_result_type("m", &odd),
            Err(ClientError::UnknownResultType { .. })
        ));
    }

    #[test]
    fn legacy_signs() {
        let rpc = |code| ClientError::Rpc {
            method: "server/discover".into(),
            error: RpcError::new(code, "x"),
        };
        assert!(is_legacy_sign(&rpc(jsonrpc::METHOD_NOT_FOUND)));
        assert!(!is_legacy_sign(&rpc(jsonrpc::HEADER_MISMATCH)));
        assert!(pick_modern(&["2026-07-28".into()]).is_some());
        assert!(pick_modern(&["2025-11-25".into()]).is_none());
    }
}

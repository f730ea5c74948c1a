//! Streamable HTTP server (one endpoint, default `/mcp`), both protocol generations.
//!
//! Per request, in this order: path; `Host` and `Origin` ([`guard`], DNS-rebinding
//! protection); bearer token when one is configured; method (`POST`; `DELETE` ends a session;
//! `GET` is answered 405, since this server sends nothing outside a request's own stream);
//! `Content-Type: application/json`; body size; then the JSON-RPC message.
//!
//! - **2025 revisions**: `initialize` creates a session (`Mcp-Session-Id`, 128 random bits);
//!   later requests must carry it (missing: 400, unknown or expired: 404, so the client
//!   re-initializes). A session ends on `DELETE`, or after [`HttpConfig::session_idle`]
//!   without requests and with no call in flight.
//! - **2026-07-28**: no session; `MCP-Protocol-Version`, `Mcp-Method` and (for `tools/call`)
//!   `Mcp-Name` must match the body, else 400 with error -32020 (HeaderMismatch).
//!
//! Answers: quick methods get one `application/json` body. A `tools/call` gets its response
//! head at once and its body when the tool finishes: `text/event-stream` (progress
//! notifications, then the answer) when the client accepts it and sent a `progressToken`,
//! else one JSON body. When the client drops the connection before the answer, the call is
//! cancelled (this is the 2026-07-28 cancellation signal; 2025 clients may also send
//! `notifications/cancelled`). Sockets get `TCP_NODELAY` (an SSE answer is several writes).
//!
//! Limits (all in [`HttpConfig`]): request body [`HttpConfig::max_body`] (413 beyond),
//! sessions [`HttpConfig::max_sessions`] (503 beyond), connections
//! [`HttpConfig::max_connections`] (further ones are closed at once), SSE queue
//! [`HttpConfig::sse_queue`] messages per call (progress beyond it is dropped).

pub mod guard;
pub mod relay;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, HOST, ORIGIN};
use http::{Method, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use vmcp_mcp::http::{
    decode_header_value, HEADER_METHOD, HEADER_NAME, HEADER_PROTOCOL_VERSION, HEADER_SESSION_ID,
};
use vmcp_mcp::jsonrpc::{
    self, Message, RequestId, RpcError, HEADER_MISMATCH, INVALID_REQUEST, PARSE_ERROR,
};
use vmcp_mcp::model::{self, LEGACY_VERSIONS, MODERN_VERSIONS};

use crate::server::{error, Connection, Discard, Handled, Outbound, Server};

/// Settings of the HTTP endpoint.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Path of the MCP endpoint.
    pub path: String,
    /// Bearer token every request must present; required for a non-loopback address.
    pub token: Option<String>,
    /// Host names accepted in `Host`/`Origin` besides the loopback names and the bound IP.
    pub allowed_hosts: Vec<String>,
    /// Whole origins accepted besides those of allowed hosts.
    pub allowed_origins: Vec<String>,
    /// Largest request body.
    pub max_body: usize,
    /// Sessions (2025 revisions) alive at once.
    pub max_sessions: usize,
    /// A session idle this long (no request, no call in flight) ends.
    pub session_idle: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Messages queued per SSE answer.
    pub sse_queue: usize,
}

impl HttpConfig {
    /// Defaults for `addr`: `/mcp`, no token, 4 MiB bodies, 64 sessions idle-ended after 30
    /// minutes, 256 connections, 64 queued SSE messages.
    pub fn new(addr: SocketAddr) -> Self {
        HttpConfig {
            addr,
            path: "/mcp".into(),
            token: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_body: 4 << 20,
            max_sessions: 64,
            session_idle: Duration::from_secs(30 * 60),
            max_connections: 256,
            sse_queue: 64,
        }
    }
}

/// Errors starting the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// A non-loopback address without a token.
    #[error("refusing to listen on {0} without a bearer token: anyone who can reach it could run commands in sandboxes (give --token-file, or listen on 127.0.0.1)")]
    NoToken(SocketAddr),
    /// Binding failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token is empty.
    #[error("the bearer token is empty")]
    EmptyToken,
}

struct Session {
    conn: Arc<Connection>,
    last_seen: Mutex<Instant>,
}

struct State {
    server: Server,
    front: Front,
    sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
}

impl State {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn end_session(&self, id: &Arc<str>) -> bool {
        let removed = self.sessions().remove(id);
        match removed {
            Some(s) => {
                s.conn.cancel_all();
                self.server.tools().session_ended(id);
                true
            }
            None => false,
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        let idle = self.front.config.session_idle;
        let expired: Vec<Arc<str>> = self
            .sessions()
            .iter()
            .filter(|(_, s)| {
                s.conn.in_flight() == 0
                    && now
                        .duration_since(*s.last_seen.lock().unwrap_or_else(PoisonError::into_inner))
                        >= idle
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            tracing::info!(session = %id, "MCP session idle for {idle:?}; ended it");
            self.end_session(&id);
        }
    }
}

/// What differs between the tool server and the relay behind the shared front (path,
/// `Host`/`Origin`, token, method, body checks): what a POST, a DELETE, the idle sweep and the
/// final shutdown do.
trait Endpoint: Send + Sync + 'static {
    fn front(&self) -> &Front;
    fn post<'a>(
        &'a self,
        req: hyper::Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Resp> + Send + 'a>>;
    fn delete(&self, session: &str) -> bool;
    fn sweep(&self);
    fn end_all(&self);
}

/// The settings the front checks use.
struct Front {
    config: HttpConfig,
    allowed: guard::Allowed,
}

impl Endpoint for State {
    fn front(&self) -> &Front {
        &self.front
    }
    fn post<'a>(
        &'a self,
        req: hyper::Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Resp> + Send + 'a>> {
        Box::pin(post(self, req))
    }
    fn delete(&self, session: &str) -> bool {
        self.end_session(&Arc::from(session))
    }
    fn sweep(&self) {
        State::sweep(self);
    }
    fn end_all(&self) {
        let ids: Vec<Arc<str>> = self.sessions().keys().cloned().collect();
        for id in ids {
            self.end_session(&id);
        }
    }
}

/// A bound HTTP endpoint, not serving yet.
pub struct HttpServer {
    listener: TcpListener,
    config: HttpConfig,
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("addr", &self.local_addr())
            .finish()
    }
}

impl HttpServer {
    /// Binds the address; refuses a non-loopback address without a token.
    pub async fn bind(config: HttpConfig) -> Result<Self, HttpError> {
        match &config.token {
            Some(t) if t.is_empty() => return Err(HttpError::EmptyToken),
            None if !config.addr.ip().is_loopback() => return Err(HttpError::NoToken(config.addr)),
            _ => {}
        }
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| HttpError::Bind {
                addr: config.addr,
                source,
            })?;
        Ok(HttpServer { listener, config })
    }

    /// The address actually bound (port 0 picks one).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves; then ends every session (so its sandboxes go) and
    /// closes every connection.
    pub async fn serve(self, server: Server, shutdown: impl Future<Output = ()>) {
        let front = self.front();
        let state = State {
            server,
            front,
            sessions: Mutex::new(HashMap::new()),
        };
        serve_endpoint(self.listener, Arc::new(state), shutdown).await;
    }

    /// Serves as a relay (`vmcp mcp wrap --http`): every client session gets its own stdio
    /// server from `upstream` ([`relay`]), ended with the session. Until `shutdown`
    /// resolves; then ends every session.
    pub async fn relay(
        self,
        upstream: Arc<dyn relay::Upstream>,
        shutdown: impl Future<Output = ()>,
    ) {
        let front = self.front();
        let state = relay::Relay::new(front, upstream);
        serve_endpoint(self.listener, Arc::new(state), shutdown).await;
    }

    fn front(&self) -> Front {
        let bound = self.local_addr().unwrap_or(self.config.addr);
        let allowed = guard::Allowed::new(
            bound.ip(),
            &self.config.allowed_hosts,
            &self.config.allowed_origins,
        );
        Front {
            config: self.config.clone(),
            allowed,
        }
    }
}

async fn serve_endpoint<E: Endpoint>(
    listener: TcpListener,
    state: Arc<E>,
    shutdown: impl Future<Output = ()>,
) {
    let config = &state.front().config;
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let max_connections = config.max_connections;
    let mut conns = tokio::task::JoinSet::new();
    let sweep_every =
        (config.session_idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
    let mut sweep = tokio::time::interval(sweep_every);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = sweep.tick() => state.sweep(),
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many connections ({max_connections}); closed this one");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(&*st, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    }
                    drop(permit);
                });
            }
        }
    }
    conns.abort_all();
    state.end_all();
}

type Body = BoxBody<Bytes, Infallible>;
type Resp = hyper::Response<Body>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn simple(status: StatusCode, text: &str) -> Resp {
    let mut r = hyper::Response::new(full(text.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_resp(status: StatusCode, msg: &Message) -> Resp {
    let mut r = hyper::Response::new(full(msg.to_vec()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn rpc_error(status: StatusCode, id: Option<RequestId>, code: i64, text: String) -> Resp {
    json_resp(status, &error(id, RpcError::new(code, text)))
}

fn header(req: &hyper::Request<Incoming>, name: impl http::header::AsHeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A response body fed by a channel (SSE events, or one JSON body that comes later).
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn sse_event(msg: &Message) -> Bytes {
    Bytes::from(vmcp_mcp::sse::encode_message(msg))
}

struct SseOut(mpsc::Sender<Bytes>);

impl Outbound for SseOut {
    fn notify(&self, msg: Message) -> bool {
        self.0.try_send(sse_event(&msg)).is_ok()
    }
}

async fn handle<E: Endpoint>(ep: &E, req: hyper::Request<Incoming>) -> Resp {
    let st = ep.front();
    if req.uri().path() != st.config.path {
        return simple(
            StatusCode::NOT_FOUND,
            &format!("not found: the MCP endpoint is {}", st.config.path),
        );
    }
    let host = req
        .headers()
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Err(e) = st.allowed.check_host(host) {
        return rpc_error(StatusCode::FORBIDDEN, None, INVALID_REQUEST, e);
    }
    if let Err(e) = st
        .allowed
        .check_origin(req.headers().get(ORIGIN).and_then(|v| v.to_str().ok()))
    {
        return rpc_error(StatusCode::FORBIDDEN, None, INVALID_REQUEST, e);
    }
    if let Some(token) = &st.config.token {
        let auth = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if !guard::check_bearer(token, auth) {
            let mut r = rpc_error(
                StatusCode::UNAUTHORIZED,
                None,
                INVALID_REQUEST,
                "missing or wrong bearer token (Authorization: Bearer ...)".into(),
            );
            r.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    match *req.method() {
        Method::POST => ep.post(req).await,
        Method::DELETE => {
            let Some(id) = header(&req, HEADER_SESSION_ID) else {
                return simple(
                    StatusCode::BAD_REQUEST,
                    "DELETE needs an Mcp-Session-Id header",
                );
            };
            if ep.delete(id) {
                simple(StatusCode::OK, "session ended")
            } else {
                simple(StatusCode::NOT_FOUND, "no such session")
            }
        }
        _ => {
            let mut r = simple(
                StatusCode::METHOD_NOT_ALLOWED,
                "use POST (this server sends no messages outside a request's own answer, so it offers no GET stream)",
            );
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST, DELETE"));
            r
        }
    }
}

fn accepts(req: &hyper::Request<Incoming>, what: &str) -> bool {
    req.headers().get_all(ACCEPT).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|part| {
                let t = part.split(';').next().unwrap_or("").trim();
                t.eq_ignore_ascii_case(what)
                    || t == "*/*"
                    || t.eq_ignore_ascii_case("application/*") && what.starts_with("application/")
            })
        })
    }) || req.headers().get(ACCEPT).is_none()
}

/// A POSTed message that passed the shared checks.
struct PostIn {
    msg: Message,
    /// The body as received.
    raw: Bytes,
    /// The request's id, if it is a request.
    id: Option<RequestId>,
    version_header: Option<String>,
    mcp_method: Option<String>,
    mcp_name: Option<String>,
    session_header: Option<String>,
    /// The client accepts `application/json` / `text/event-stream` answers.
    want_json: bool,
    want_sse: bool,
}

impl PostIn {
    /// The answer is an SSE stream: the client takes one and wants progress, or takes
    /// nothing else.
    fn streams(&self) -> bool {
        let progress = matches!(&self.msg, Message::Request(r) if r.params.as_deref().is_some_and(|p| p.get().contains("progressToken")));
        self.want_sse && (progress || !self.want_json)
    }
}

/// The checks every POST goes through: content type, accepted answer types, body size,
/// one JSON-RPC message (no batch), a known protocol version header.
async fn read_post(front: &Front, req: hyper::Request<Incoming>) -> Result<PostIn, Resp> {
    let ct = header(&req, "content-type").unwrap_or("");
    if !ct
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
    {
        return Err(simple(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let want_json = accepts(&req, "application/json");
    let want_sse = accepts(&req, "text/event-stream");
    if !want_json && !want_sse {
        return Err(simple(
            StatusCode::NOT_ACCEPTABLE,
            "accept application/json or text/event-stream",
        ));
    }
    let version_header = header(&req, HEADER_PROTOCOL_VERSION).map(str::to_owned);
    let mcp_method = header(&req, HEADER_METHOD).map(str::to_owned);
    let mcp_name = header(&req, HEADER_NAME).map(str::to_owned);
    let session_header = header(&req, HEADER_SESSION_ID).map(str::to_owned);
    let max = front.config.max_body;
    if req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > max as u64)
    {
        return Err(too_large(max));
    }
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(too_large(max));
            }
            return Err(simple(
                StatusCode::BAD_REQUEST,
                "cannot read the request body",
            ));
        }
    };
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(rpc_error(
            StatusCode::BAD_REQUEST,
            None,
            INVALID_REQUEST,
            "JSON-RPC batches are not supported".into(),
        ));
    }
    let msg = match jsonrpc::parse_message(&body) {
        Ok(m) => m,
        Err(e) => {
            let code = match e {
                jsonrpc::Error::Json(_) => PARSE_ERROR,
                _ => INVALID_REQUEST,
            };
            return Err(rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                code,
                e.to_string(),
            ));
        }
    };
    let id = match &msg {
        Message::Request(r) => Some(r.id.clone()),
        _ => None,
    };
    if let Some(v) = &version_header {
        if !LEGACY_VERSIONS.contains(&v.as_str()) && !MODERN_VERSIONS.contains(&v.as_str()) {
            return Err(rpc_error(
                StatusCode::BAD_REQUEST,
                id,
                INVALID_REQUEST,
                format!(
                    "unsupported MCP-Protocol-Version {v:?} (supported: {})",
                    MODERN_VERSIONS
                        .iter()
                        .chain(LEGACY_VERSIONS)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(PostIn {
        msg,
        raw: body,
        id,
        version_header,
        mcp_method,
        mcp_name,
        session_header,
        want_json,
        want_sse,
    })
}

async fn post(st: &State, req: hyper::Request<Incoming>) -> Resp {
    let p = match read_post(&st.front, req).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let stream = p.streams();
    let want_sse = p.want_sse;
    let PostIn {
        msg,
        id,
        version_header,
        mcp_method,
        mcp_name,
        session_header,
        ..
    } = p;
    let modern = version_header.as_deref().is_some_and(model::is_modern);
    let conn = if modern {
        if let Err(e) = check_modern_headers(&msg, mcp_method.as_deref(), mcp_name.as_deref()) {
            return rpc_error(StatusCode::BAD_REQUEST, id, HEADER_MISMATCH, e);
        }
        Connection::new(None)
    } else if msg.method() == Some("initialize") && id.is_some() {
        if st.sessions().len() >= st.front.config.max_sessions {
            st.sweep();
            if st.sessions().len() >= st.front.config.max_sessions {
                return rpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    id,
                    jsonrpc::INTERNAL_ERROR,
                    format!(
                        "too many MCP sessions ({}); end one (HTTP DELETE) or wait for one to expire",
                        st.front.config.max_sessions
                    ),
                );
            }
        }
        let sid: Arc<str> = Arc::from(format!("{:032x}", rand::random::<u128>()).as_str());
        let conn = Connection::new(Some(sid.clone()));
        let answer = st.server.handle_now(msg, &conn, Arc::new(Discard)).await;
        let Some(answer) = answer else {
            return simple(StatusCode::ACCEPTED, "");
        };
        let ok = matches!(answer, Message::Response(_));
        let mut r = json_resp(StatusCode::OK, &answer);
        if ok {
            st.sessions().insert(
                sid.clone(),
                Arc::new(Session {
                    conn,
                    last_seen: Mutex::new(Instant::now()),
                }),
            );
            if let Ok(v) = HeaderValue::from_str(&sid) {
                r.headers_mut().insert(HEADER_SESSION_ID, v);
            }
        }
        return r;
    } else {
        let Some(sid) = session_header else {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                id,
                INVALID_REQUEST,
                "missing Mcp-Session-Id: initialize first (or use protocol 2026-07-28)".into(),
            );
        };
        let session = st.sessions().get(sid.as_str()).cloned();
        let Some(session) = session else {
            return rpc_error(
                StatusCode::NOT_FOUND,
                id,
                INVALID_REQUEST,
                "unknown or expired MCP session; initialize again".into(),
            );
        };
        *session
            .last_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        session.conn.clone()
    };
    // A call that may ask the client's user (elicitation) needs a stream for the question.
    let may_ask = msg.method() == Some("tools/call") && conn.supports_elicitation();
    let stream = stream || (want_sse && may_ask);
    let (tx, rx) = mpsc::channel::<Bytes>(if stream {
        st.front.config.sse_queue.max(2)
    } else {
        1
    });
    let out: Arc<dyn Outbound> = if stream {
        Arc::new(SseOut(tx.clone()))
    } else {
        Arc::new(Discard)
    };
    match st.server.handle(msg, &conn, out) {
        Handled::Nothing => simple(StatusCode::ACCEPTED, ""),
        Handled::Reply(m) => {
            if stream {
                sse_resp(full(sse_event(&m)))
            } else {
                json_resp(StatusCode::OK, &m)
            }
        }
        Handled::Later(mut fut) => {
            let call_id = id;
            tokio::spawn(async move {
                tokio::select! {
                    answer = &mut fut => {
                        if let Some(m) = answer {
                            let bytes = if stream { sse_event(&m) } else { Bytes::from(m.to_vec()) };
                            let _ = tx.send(bytes).await;
                        }
                    }
                    () = tx.closed() => {
                        // The client went away: that cancels the call.
                        if let Some(id) = &call_id {
                            conn.cancel(id);
                        }
                        let _ = tokio::time::timeout(Duration::from_secs(10), fut).await;
                    }
                }
            });
            let body = ChannelBody(rx).boxed();
            if stream {
                sse_resp(body)
            } else {
                let mut r = hyper::Response::new(body);
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r
            }
        }
    }
}

fn sse_resp(body: Body) -> Resp {
    let mut r = hyper::Response::new(body);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

fn too_large(max: usize) -> Resp {
    simple(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("the request body is larger than {max} bytes"),
    )
}

fn check_modern_headers(
    msg: &Message,
    method: Option<&str>,
    name: Option<&str>,
) -> Result<(), String> {
    let Some(m) = msg.method() else {
        return Ok(());
    };
    if let Some(h) = method {
        if h != m {
            return Err(format!(
                "Mcp-Method {h:?} does not match the body's method {m:?}"
            ));
        }
    }
    if let (Some(h), Message::Request(r)) = (name, msg) {
        if matches!(m, "tools/call" | "resources/read" | "prompts/get") {
            let body_name = r
                .params
                .as_deref()
                .and_then(|p| serde_json::from_str::<serde_json::Value>(p.get()).ok())
                .and_then(|v| {
                    v.get("name")
                        .or_else(|| v.get("uri"))
                        .and_then(|n| n.as_str().map(str::to_owned))
                });
            let decoded = decode_header_value(h);
            if body_name.as_deref() != Some(decoded.as_ref()) {
                return Err(format!("Mcp-Name {h:?} does not match the body"));
            }
        }
    }
    Ok(())
}

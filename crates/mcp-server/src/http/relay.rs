//! Relay: Streamable HTTP on the outside, one stdio MCP server per client session on the
//! inside (`vmcp mcp wrap --http`, where each server runs in its own VM).
//!
//! The shared front of [`super`] admits each request (path, `Host`/`Origin`, bearer token,
//! content type, body size, one JSON-RPC message). Then:
//! - `initialize` without a session asks the [`Upstream`] for a new server (a VM boot), sends
//!   it the request and answers with its response and a new `Mcp-Session-Id`; the session
//!   ends on `DELETE`, after [`super::HttpConfig::session_idle`] without requests and with
//!   nothing in flight, when the server exits, or when the relay stops. Ending a session
//!   drops its [`Pipe`], which is the upstream's signal to stop the server.
//! - Later messages go to that session's server. A request's answer is the server's response
//!   with the same id: one JSON body, or an SSE stream (same rule as the tool server) that
//!   also carries what the server sends meanwhile (progress, logs, its own requests). If
//!   the client drops the connection first, the server gets `notifications/cancelled`.
//! - Messages are passed through, not re-encoded: a client body goes to the server as it
//!   came (re-encoded only if it spans lines, which the stdio framing forbids), a server line
//!   becomes a JSON body or an SSE `data:` line as it is. Each line is parsed once, to route
//!   it by id.
//! - Server-to-client messages outside a request: they go to the newest SSE answer in flight;
//!   with none, a notification is dropped and a request is answered with an error (this
//!   relay offers no `GET` stream).
//! - The 2026-07-28 stateless generation has no session to tie a server to: such requests
//!   get a 400 that says to use a 2025 revision.
//!
//! Bounds: one line from the server is at most [`super::HttpConfig::max_body`] bytes (beyond,
//! the session ends); SSE answers queue [`super::HttpConfig::sse_queue`] messages (beyond,
//! notifications are dropped); sessions are at most [`super::HttpConfig::max_sessions`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use vmcp_mcp::jsonrpc::{self, Message, RequestId, INTERNAL_ERROR, INVALID_REQUEST};
use vmcp_mcp::model;

use super::{read_post, rpc_error, simple, sse_resp, ChannelBody, Endpoint, Front, PostIn, Resp};

/// A boxed future, as [`Upstream::open`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The byte streams of one stdio MCP server.
#[derive(Debug)]
pub struct Pipe {
    /// Lines for the server's stdin, each ending in `\n`. Dropping this sender is the signal
    /// to stop the server (the session ended).
    pub input: mpsc::Sender<Bytes>,
    /// The server's stdout in chunks as they come; `None` once it exited.
    pub output: mpsc::Receiver<Bytes>,
}

/// Starts stdio MCP servers, one per client session.
pub trait Upstream: Send + Sync + 'static {
    /// Starts a server for a new session; the error text is shown to the client.
    fn open(&self) -> BoxFuture<Result<Pipe, String>>;
}

/// What the reader sends to the answer of one request.
enum Out {
    /// A message the server sent meanwhile (SSE answers only).
    Note(Bytes),
    /// The response; `true` when it is a success.
    Final(Bytes, bool),
}

struct Waiter {
    tx: mpsc::Sender<Out>,
    stream: bool,
    seq: u64,
}

struct RelaySession {
    id: Arc<str>,
    /// Taken (dropped) when the session ends: the upstream's signal to stop the server.
    input: Mutex<Option<mpsc::Sender<Bytes>>>,
    waiters: Mutex<HashMap<RequestId, Waiter>>,
    last_seen: Mutex<Instant>,
}

impl RelaySession {
    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Waiter>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
    /// Sends a line to the server; false when the session ended or the server is gone.
    async fn send(&self, line: Bytes) -> bool {
        let tx = self
            .input
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match tx {
            Some(tx) => tx.send(line).await.is_ok(),
            None => false,
        }
    }
    fn try_send(&self, line: Bytes) {
        if let Some(tx) = &*self.input.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = tx.try_send(line);
        }
    }
    fn touch(&self) {
        *self
            .last_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }
}

/// The relay endpoint.
pub(super) struct Relay {
    front: Front,
    upstream: Arc<dyn Upstream>,
    sessions: Arc<Mutex<HashMap<Arc<str>, Arc<RelaySession>>>>,
    seq: std::sync::atomic::AtomicU64,
}

type Sessions = Arc<Mutex<HashMap<Arc<str>, Arc<RelaySession>>>>;

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<RelaySession>>> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A JSON-RPC error response line for `id`.
fn error_line(id: Option<RequestId>, code: i64, text: &str) -> Bytes {
    Bytes::from(super::error(id, jsonrpc::RpcError::new(code, text)).to_vec())
}

fn raw_json(status: StatusCode, body: Bytes) -> Resp {
    let mut r = hyper::Response::new(super::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn sse_line(line: &[u8]) -> Bytes {
    Bytes::from(vmcp_mcp::sse::encode_json_line(line))
}

impl Relay {
    pub(super) fn new(front: Front, upstream: Arc<dyn Upstream>) -> Self {
        Relay {
            front,
            upstream,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Ends a session: its waiters get an error, its pipe is dropped.
    fn end(sessions: &Sessions, id: &str, why: &str) -> bool {
        let removed = lock(sessions).remove(id);
        let Some(s) = removed else { return false };
        drop(
            s.input
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let waiters: Vec<(RequestId, Waiter)> = s.waiters().drain().collect();
        for (rid, w) in waiters {
            let _ = w.tx.try_send(Out::Final(
                error_line(Some(rid), INTERNAL_ERROR, why),
                false,
            ));
        }
        tracing::info!(session = %s.id, "relay session ended: {why}");
        true
    }

    async fn handle_post(&self, req: hyper::Request<Incoming>) -> Resp {
        let p = match read_post(&self.front, req).await {
            Ok(p) => p,
            Err(r) => return r,
        };
        if p.version_header.as_deref().is_some_and(model::is_modern) {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                p.id.clone(),
                INVALID_REQUEST,
                "this relay serves the session-based protocol revisions (2025-xx): \
                 initialize with one of them (a stateless 2026-07-28 request has no session \
                 to tie its server to)"
                    .into(),
            );
        }
        let session = match p.session_header.as_deref() {
            None if p.msg.method() == Some("initialize") && p.id.is_some() => {
                match self.open_session().await {
                    Ok(s) => s,
                    Err(r) => return r,
                }
            }
            None => {
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    p.id.clone(),
                    INVALID_REQUEST,
                    "missing Mcp-Session-Id: initialize first".into(),
                )
            }
            Some(sid) => match lock(&self.sessions).get(sid).cloned() {
                Some(s) => s,
                None => {
                    return rpc_error(
                        StatusCode::NOT_FOUND,
                        p.id.clone(),
                        INVALID_REQUEST,
                        "unknown or ended MCP session; initialize again".into(),
                    )
                }
            },
        };
        session.touch();
        let initialize = p.session_header.is_none();
        let (mut resp, ok) = self.forward(&session, p).await;
        if initialize {
            if ok {
                if let Ok(v) = HeaderValue::from_str(&session.id) {
                    resp.headers_mut().insert(super::HEADER_SESSION_ID, v);
                }
            } else {
                Self::end(&self.sessions, &session.id, "initialize failed");
            }
        }
        resp
    }

    async fn open_session(&self) -> Result<Arc<RelaySession>, Resp> {
        let max = self.front.config.max_sessions;
        if lock(&self.sessions).len() >= max {
            self.sweep_idle();
            if lock(&self.sessions).len() >= max {
                return Err(rpc_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    INTERNAL_ERROR,
                    format!("too many MCP sessions ({max}); end one (HTTP DELETE) or wait for one to expire"),
                ));
            }
        }
        let pipe = self.upstream.open().await.map_err(|e| {
            rpc_error(
                StatusCode::BAD_GATEWAY,
                None,
                INTERNAL_ERROR,
                format!("cannot start the MCP server: {e}"),
            )
        })?;
        let id: Arc<str> = Arc::from(format!("{:032x}", rand::random::<u128>()).as_str());
        let session = Arc::new(RelaySession {
            id: id.clone(),
            input: Mutex::new(Some(pipe.input)),
            waiters: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(Instant::now()),
        });
        lock(&self.sessions).insert(id.clone(), session.clone());
        let sessions = self.sessions.clone();
        let max_line = self.front.config.max_body;
        let reader_session = session.clone();
        tokio::spawn(async move {
            let why = read_server(&reader_session, pipe.output, max_line).await;
            Self::end(&sessions, &reader_session.id, why);
        });
        Ok(session)
    }

    /// Sends one client message to the server and answers the POST; false when the answer
    /// is known to be an error.
    async fn forward(&self, s: &Arc<RelaySession>, p: PostIn) -> (Resp, bool) {
        let stream = p.streams();
        let mut line = if p.raw.contains(&b'\n') || p.raw.contains(&b'\r') {
            // Stdio framing is one message per line: this body has to be re-encoded, params
            // included (they are kept raw, line breaks and all, by the parser).
            match serde_json::from_slice::<serde_json::Value>(&p.raw)
                .and_then(|v| serde_json::to_vec(&v))
            {
                Ok(v) => BytesMut::from(&v[..]),
                Err(_) => BytesMut::from(&p.msg.to_vec()[..]),
            }
        } else {
            BytesMut::from(&p.raw[..])
        };
        line.extend_from_slice(b"\n");
        let Some(id) = p.id else {
            // Notifications and the client's responses to server requests: no answer.
            if !s.send(line.freeze()).await {
                return (
                    simple(
                        StatusCode::NOT_FOUND,
                        "the MCP server of this session ended",
                    ),
                    false,
                );
            }
            return (simple(StatusCode::ACCEPTED, ""), true);
        };
        let (tx, mut rx) = mpsc::channel::<Out>(if stream {
            self.front.config.sse_queue.max(2)
        } else {
            1
        });
        {
            let mut w = s.waiters();
            if w.contains_key(&id) {
                return (
                    rpc_error(
                        StatusCode::BAD_REQUEST,
                        Some(id),
                        INVALID_REQUEST,
                        "a request with this id is already in flight".into(),
                    ),
                    false,
                );
            }
            let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            w.insert(id.clone(), Waiter { tx, stream, seq });
        }
        if !s.send(line.freeze()).await {
            s.waiters().remove(&id);
            return (
                rpc_error(
                    StatusCode::NOT_FOUND,
                    Some(id),
                    INVALID_REQUEST,
                    "the MCP server of this session ended; initialize again".into(),
                ),
                false,
            );
        }
        if !stream {
            // One JSON body: wait here (the client's connection going away drops this
            // future; the guard below then cancels the request at the server).
            let guard = CancelGuard {
                session: s.clone(),
                id: Some(id),
            };
            let answer = loop {
                match rx.recv().await {
                    Some(Out::Final(b, ok)) => break Some((b, ok)),
                    Some(Out::Note(_)) => continue,
                    None => break None,
                }
            };
            guard.disarm();
            return match answer {
                Some((b, ok)) => (raw_json(StatusCode::OK, b), ok),
                None => (
                    simple(StatusCode::BAD_GATEWAY, "the MCP server ended"),
                    false,
                ),
            };
        }
        // SSE: the first event decides the status (an initialize that failed is not OK).
        let (btx, brx) = mpsc::channel::<Bytes>(self.front.config.sse_queue.max(2));
        let first = {
            let guard = CancelGuard {
                session: s.clone(),
                id: Some(id.clone()),
            };
            let first = rx.recv().await;
            guard.disarm();
            first
        };
        match first {
            None => {
                return (
                    simple(StatusCode::BAD_GATEWAY, "the MCP server ended"),
                    false,
                )
            }
            Some(Out::Final(b, ok)) => return (sse_resp(super::full(sse_line(&b))), ok),
            Some(Out::Note(b)) => {
                let _ = btx.try_send(sse_line(&b));
            }
        }
        let session = s.clone();
        tokio::spawn(async move {
            let mut guard = CancelGuard {
                session,
                id: Some(id),
            };
            loop {
                tokio::select! {
                    out = rx.recv() => match out {
                        Some(Out::Note(b)) => {
                            let _ = btx.try_send(sse_line(&b));
                        }
                        Some(Out::Final(b, _)) => {
                            guard.id = None;
                            let _ = btx.send(sse_line(&b)).await;
                            return;
                        }
                        None => return,
                    },
                    () = btx.closed() => return, // the guard cancels it
                }
            }
        });
        (sse_resp(ChannelBody(brx).boxed()), true)
    }

    fn sweep_idle(&self) {
        let idle = self.front.config.session_idle;
        let now = Instant::now();
        let expired: Vec<Arc<str>> = lock(&self.sessions)
            .iter()
            .filter(|(_, s)| {
                s.waiters().is_empty()
                    && now
                        .duration_since(*s.last_seen.lock().unwrap_or_else(PoisonError::into_inner))
                        >= idle
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            Self::end(&self.sessions, &id, "idle");
        }
    }
}

/// Cancels a request at the server when its answer is abandoned (the client went away).
struct CancelGuard {
    session: Arc<RelaySession>,
    id: Option<RequestId>,
}

impl CancelGuard {
    fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        if self.session.waiters().remove(&id).is_none() {
            return;
        }
        let params = serde_json::json!({"requestId": id, "reason": "the HTTP client went away"});
        let mut line =
            Message::notification("notifications/cancelled", jsonrpc::to_raw(&params).ok())
                .to_vec();
        line.push(b'\n');
        self.session.try_send(Bytes::from(line));
    }
}

/// Reads the server's stdout, splits it into lines and routes each; returns why it stopped.
async fn read_server(
    s: &RelaySession,
    mut output: mpsc::Receiver<Bytes>,
    max_line: usize,
) -> &'static str {
    let mut buf = BytesMut::new();
    while let Some(chunk) = output.recv().await {
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let mut line = buf.split_to(nl + 1);
            line.truncate(nl);
            if line.last() == Some(&b'\r') {
                line.truncate(nl - 1);
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            route(s, line.freeze()).await;
        }
        if buf.len() > max_line {
            tracing::warn!(session = %s.id, "the MCP server sent a line longer than {max_line} bytes");
            return "the MCP server sent a line over the size limit";
        }
    }
    "the MCP server exited"
}

/// Delivers one line from the server.
async fn route(s: &RelaySession, line: Bytes) {
    let msg = match jsonrpc::parse_message(&line) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(session = %s.id, error = %e, "the MCP server wrote a line that is not a JSON-RPC message; dropped it");
            return;
        }
    };
    match msg {
        Message::Response(jsonrpc::Response { id, .. }) => deliver_final(s, &id, line, true),
        Message::Error(jsonrpc::ErrorResponse { id: Some(id), .. }) => {
            deliver_final(s, &id, line, false);
        }
        Message::Error(_) => {
            tracing::warn!(session = %s.id, "the MCP server sent an error without an id");
        }
        Message::Request(r) => {
            if !deliver_note(s, line) {
                let mut answer = error_line(
                    Some(r.id),
                    jsonrpc::METHOD_NOT_FOUND,
                    "the client cannot be reached outside a request's answer (vmcp mcp wrap --http has no GET stream)",
                )
                .to_vec();
                answer.push(b'\n');
                s.send(Bytes::from(answer)).await;
            }
        }
        Message::Notification(_) => {
            if !deliver_note(s, line) {
                tracing::debug!(session = %s.id, "no SSE answer open for a server notification; dropped it");
            }
        }
    }
}

fn deliver_final(s: &RelaySession, id: &RequestId, line: Bytes, ok: bool) {
    let waiter = s.waiters().remove(id);
    match waiter {
        Some(w) => {
            let _ = w.tx.try_send(Out::Final(line, ok));
        }
        None => tracing::debug!(session = %s.id, %id, "a response nobody waits for; dropped it"),
    }
}

/// Gives a server message to the newest SSE answer in flight; false when there is none.
fn deliver_note(s: &RelaySession, line: Bytes) -> bool {
    let w = s.waiters();
    let newest = w.values().filter(|w| w.stream).max_by_key(|w| w.seq);
    match newest {
        Some(w) => {
            let _ = w.tx.try_send(Out::Note(line));
            true
        }
        None => false,
    }
}

impl Endpoint for Relay {
    fn front(&self) -> &Front {
        &self.front
    }
    fn post<'a>(
        &'a self,
        req: hyper::Request<Incoming>,
    ) -> Pin<Box<dyn Future<Output = Resp> + Send + 'a>> {
        Box::pin(self.handle_post(req))
    }
    fn delete(&self, session: &str) -> bool {
        Self::end(&self.sessions, session, "the client ended it (DELETE)")
    }
    fn sweep(&self) {
        self.sweep_idle();
    }
    fn end_all(&self) {
        let ids: Vec<Arc<str>> = lock(&self.sessions).keys().cloned().collect();
        for id in ids {
            Self::end(&self.sessions, &id, "the relay stopped");
        }
    }
}

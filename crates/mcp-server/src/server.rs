//! The protocol core: one [`Server`] answers JSON-RPC messages for any transport.
//!
//! Both protocol generations are served by the same code:
//! - **2025 revisions** (2025-03-26, 2025-06-18, 2025-11-25): `initialize` picks the version
//!   (the client's if we speak it, else 2025-11-25), `notifications/initialized`, then requests.
//!   The transport keeps a [`Connection`] per session (stdio: one; HTTP: one per
//!   `Mcp-Session-Id`).
//! - **2026-07-28** (stateless): `server/discover`, and every request carries its protocol
//!   version in `params._meta["io.modelcontextprotocol/protocolVersion"]`; an unknown version
//!   is answered with error -32022 and the `supported` list; results carry
//!   `"resultType": "complete"`, and the cacheable ones (`tools/list`, `server/discover`)
//!   `"ttlMs": 0, "cacheScope": "private"`.
//!
//! `tools/call` arguments are validated against the tool's published `inputSchema`
//! ([`crate::schema`]); a bad argument is a tool error (`isError: true`) naming the field, an
//! unknown tool a JSON-RPC error -32602. A call runs as its own future ([`Handled::Later`]);
//! `notifications/cancelled` fires its [`crate::tool::CancelToken`] and suppresses its answer,
//! as the spec asks. Progress goes to the [`Outbound`] of the call (stdout, or the request's SSE
//! stream).
//!
//! Limits: at most [`ServerConfig::max_in_flight`] calls run at once per connection (more get
//! error -32603 naming the limit).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::value::RawValue;
use serde_json::{Map, Value};
use vmcp_mcp::jsonrpc::{
    self, ErrorResponse, Message, Request, RequestId, Response, RpcError, INTERNAL_ERROR,
    INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, UNSUPPORTED_PROTOCOL_VERSION,
};
use vmcp_mcp::model::{self, LEGACY_VERSIONS, MODERN_VERSIONS, V_2025_11_25};

use crate::schema;
use crate::tool::{
    BoxFuture, CallContext, Canceller, Progress, SessionKey, ToolDef, ToolOutput, ToolSet,
};

/// Where server-initiated messages of one call or connection go.
pub trait Outbound: Send + Sync + 'static {
    /// Queues a notification. Returns false when it was dropped (queue full or closed).
    fn notify(&self, msg: Message) -> bool;
}

/// An [`Outbound`] that drops everything (HTTP calls that cannot stream).
#[derive(Debug, Clone, Copy)]
pub struct Discard;

impl Outbound for Discard {
    fn notify(&self, _msg: Message) -> bool {
        false
    }
}

/// Server identity and limits.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// `serverInfo.name`.
    pub name: String,
    /// `serverInfo.version`.
    pub version: String,
    /// `instructions` for the model.
    pub instructions: Option<String>,
    /// Calls running at once per connection.
    pub max_in_flight: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            name: "vmcp".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            instructions: None,
            max_in_flight: 64,
        }
    }
}

impl ServerConfig {
    /// Sets the instructions.
    pub fn with_instructions(mut self, text: impl Into<String>) -> Self {
        self.instructions = Some(text.into());
        self
    }
    /// Sets the per-connection limit of calls in flight.
    pub fn with_max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }
}

/// Errors building a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A tool's schema uses a keyword the validator does not implement.
    #[error("tool {tool:?} publishes a schema the server cannot check")]
    Schema {
        /// Tool name.
        tool: String,
        /// Which keyword.
        #[source]
        source: schema::Unsupported,
    },
    /// Two tools share a name.
    #[error("two tools are named {0:?}")]
    Duplicate(String),
}

/// How the server dealt with one incoming message.
pub enum Handled {
    /// Answer now.
    Reply(Message),
    /// Answer when the future completes; `None` = no answer (the call was cancelled).
    Later(BoxFuture<Option<Message>>),
    /// Nothing to answer (a notification or a response).
    Nothing,
}

impl std::fmt::Debug for Handled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handled::Reply(m) => f.debug_tuple("Reply").field(m).finish(),
            Handled::Later(_) => f.write_str("Later(..)"),
            Handled::Nothing => f.write_str("Nothing"),
        }
    }
}

/// One client's state: its session, the calls in flight (for cancellation), the version
/// `initialize` settled on.
#[derive(Debug)]
pub struct Connection {
    session: SessionKey,
    in_flight: Mutex<HashMap<RequestId, Canceller>>,
    version: Mutex<Option<String>>,
    /// The client's `initialize` capabilities (2025 revisions).
    client_caps: Mutex<Option<Value>>,
    /// Our requests to the client (elicitation) waiting for answers.
    pending: Arc<crate::elicit::Pending>,
}

impl Connection {
    /// A connection belonging to `session`.
    pub fn new(session: SessionKey) -> Arc<Connection> {
        Arc::new(Connection {
            session,
            in_flight: Mutex::new(HashMap::new()),
            version: Mutex::new(None),
            client_caps: Mutex::new(None),
            pending: Arc::default(),
        })
    }

    /// Whether the client declared form-mode elicitation in `initialize`.
    pub fn supports_elicitation(&self) -> bool {
        self.client_caps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(crate::elicit::supports_form)
    }

    /// An elicitor asking through `out`, when the client supports elicitation.
    pub fn elicitor(&self, out: Arc<dyn Outbound>) -> Option<crate::elicit::Elicitor> {
        self.supports_elicitation()
            .then(|| crate::elicit::Elicitor::new(self.pending.clone(), out))
    }

    /// The session.
    pub fn session(&self) -> &SessionKey {
        &self.session
    }

    /// The version `initialize` settled on (2025 revisions).
    pub fn version(&self) -> Option<String> {
        self.version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.calls().len()
    }

    /// Cancels every call in flight (the client went away).
    pub fn cancel_all(&self) {
        for (_, c) in self.calls().drain() {
            c.cancel();
        }
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Canceller>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn cancel(&self, id: &RequestId) -> bool {
        match self.calls().remove(id) {
            Some(c) => {
                c.cancel();
                true
            }
            None => false,
        }
    }
}

struct Inner {
    tools: Arc<dyn ToolSet>,
    defs: HashMap<&'static str, ToolDef>,
    list: Value,
    config: ServerConfig,
}

/// The MCP server core. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("tools", &self.inner.defs.len())
            .finish()
    }
}

/// The parts of a request's params the server itself reads.
struct Envelope {
    params: Map<String, Value>,
    modern_version: Option<String>,
    progress_token: Option<Value>,
}

fn envelope(params: Option<&RawValue>) -> Result<Envelope, RpcError> {
    let params: Map<String, Value> = match params {
        None => Map::new(),
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| RpcError::new(INVALID_PARAMS, "params must be a JSON object"))?,
    };
    let meta = params.get("_meta").and_then(Value::as_object);
    let modern_version = meta
        .and_then(|m| m.get(model::META_PROTOCOL_VERSION))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let progress_token = meta
        .and_then(|m| m.get("progressToken"))
        .filter(|t| t.is_string() || t.is_number())
        .cloned();
    Ok(Envelope {
        params,
        modern_version,
        progress_token,
    })
}

fn reply(id: RequestId, result: &Value) -> Message {
    match jsonrpc::to_raw(result) {
        Ok(result) => Message::Response(Response { id, result }),
        Err(e) => error(
            Some(id),
            RpcError::new(INTERNAL_ERROR, format!("cannot encode the result: {e}")),
        ),
    }
}

/// An error response.
pub fn error(id: Option<RequestId>, error: RpcError) -> Message {
    Message::Error(ErrorResponse { id, error })
}

impl Server {
    /// A server offering `tools`; fails when a tool's schema cannot be checked.
    pub fn new(tools: impl ToolSet, config: ServerConfig) -> Result<Server, ServerError> {
        Self::from_arc(Arc::new(tools), config)
    }

    /// Like [`Server::new`] for a shared tool set.
    pub fn from_arc(tools: Arc<dyn ToolSet>, config: ServerConfig) -> Result<Server, ServerError> {
        let mut defs = HashMap::new();
        let mut list = Vec::new();
        for def in tools.tools() {
            for s in std::iter::once(&def.input_schema).chain(def.output_schema.as_ref()) {
                schema::check_supported(s).map_err(|source| ServerError::Schema {
                    tool: def.name.into(),
                    source,
                })?;
            }
            list.push(def.to_json());
            if defs.insert(def.name, def.clone()).is_some() {
                return Err(ServerError::Duplicate(def.name.into()));
            }
        }
        Ok(Server {
            inner: Arc::new(Inner {
                tools,
                defs,
                list: serde_json::json!({ "tools": list }),
                config,
            }),
        })
    }

    /// The tool set.
    pub fn tools(&self) -> &Arc<dyn ToolSet> {
        &self.inner.tools
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    fn capabilities() -> Value {
        serde_json::json!({ "tools": { "listChanged": false } })
    }

    fn server_info(&self) -> Value {
        serde_json::json!({
            "name": self.inner.config.name,
            "version": self.inner.config.version,
            "title": "vmcp sandbox server",
        })
    }

    /// Handles one message from the client on `conn`; server-initiated messages of a call
    /// (progress) go to `out`.
    pub fn handle(&self, msg: Message, conn: &Arc<Connection>, out: Arc<dyn Outbound>) -> Handled {
        match msg {
            Message::Request(req) => self.request(req, conn, out),
            Message::Notification(n) => {
                if n.method == "notifications/cancelled" {
                    if let Some(id) = n
                        .params
                        .as_deref()
                        .and_then(|p| serde_json::from_str::<Value>(p.get()).ok())
                        .and_then(|v| v.get("requestId").cloned())
                        .and_then(|v| serde_json::from_value::<RequestId>(v).ok())
                    {
                        if conn.cancel(&id) {
                            tracing::debug!(%id, "call cancelled by the client");
                        }
                    }
                }
                Handled::Nothing
            }
            // Answers to our elicitation requests; anything else is ignored.
            Message::Response(r) => {
                let value = serde_json::from_str::<Value>(r.result.get()).unwrap_or(Value::Null);
                conn.pending.answer(&r.id, Ok(value));
                Handled::Nothing
            }
            Message::Error(e) => {
                if let Some(id) = &e.id {
                    conn.pending.answer(id, Err(e.error));
                }
                Handled::Nothing
            }
        }
    }

    fn request(&self, req: Request, conn: &Arc<Connection>, out: Arc<dyn Outbound>) -> Handled {
        let Request { id, method, params } = req;
        let env = match envelope(params.as_deref()) {
            Ok(e) => e,
            Err(e) => return Handled::Reply(error(Some(id), e)),
        };
        let modern = match &env.modern_version {
            Some(v) if MODERN_VERSIONS.contains(&v.as_str()) => true,
            Some(v) if model::is_modern(v) || method == "server/discover" => {
                return Handled::Reply(unsupported_version(id, v));
            }
            _ => false,
        };
        let result = match method.as_str() {
            "initialize" => {
                let asked = env
                    .params
                    .get("protocolVersion")
                    .and_then(Value::as_str)
                    .unwrap_or(V_2025_11_25);
                let version = if LEGACY_VERSIONS.contains(&asked) {
                    asked
                } else {
                    V_2025_11_25
                };
                *conn.version.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(version.to_owned());
                *conn
                    .client_caps
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    env.params.get("capabilities").cloned();
                let mut r = serde_json::json!({
                    "protocolVersion": version,
                    "capabilities": Self::capabilities(),
                    "serverInfo": self.server_info(),
                });
                if let Some(i) = &self.inner.config.instructions {
                    r["instructions"] = i.clone().into();
                }
                r
            }
            "server/discover" => {
                let mut r = serde_json::json!({
                    "supportedVersions": MODERN_VERSIONS,
                    "capabilities": Self::capabilities(),
                    "serverInfo": self.server_info(),
                });
                if let Some(i) = &self.inner.config.instructions {
                    r["instructions"] = i.clone().into();
                }
                r
            }
            "ping" => serde_json::json!({}),
            "tools/list" => self.inner.list.clone(),
            "tools/call" => return self.call(id, env, modern, conn, out),
            other => {
                return Handled::Reply(error(
                    Some(id),
                    RpcError::new(METHOD_NOT_FOUND, format!("method not found: {other}")),
                ))
            }
        };
        let mut result = finish(result, modern);
        if modern && matches!(method.as_str(), "tools/list" | "server/discover") {
            // 2026-07-28 cacheable results: required caching hints. Private, and stale at once
            // (the tool list never changes while we run, but a client must not share it).
            if let Value::Object(m) = &mut result {
                m.insert("ttlMs".into(), 0.into());
                m.insert("cacheScope".into(), "private".into());
            }
        }
        Handled::Reply(reply(id, &result))
    }

    fn call(
        &self,
        id: RequestId,
        mut env: Envelope,
        modern: bool,
        conn: &Arc<Connection>,
        out: Arc<dyn Outbound>,
    ) -> Handled {
        let Some(name) = env.params.get("name").and_then(Value::as_str) else {
            return Handled::Reply(error(
                Some(id),
                RpcError::new(INVALID_PARAMS, "tools/call needs a tool \"name\""),
            ));
        };
        let Some(def) = self.inner.defs.get(name) else {
            return Handled::Reply(error(
                Some(id),
                RpcError::new(INVALID_PARAMS, format!("unknown tool: {name}")),
            ));
        };
        let args = match env.params.remove("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(v) => v,
        };
        if let Err(msg) = schema::validate(&def.input_schema, &args) {
            let out = ToolOutput::error(format!("invalid arguments for {}: {msg}", def.name));
            return Handled::Reply(reply(id, &finish(out.to_result(), modern)));
        }
        let Value::Object(args) = args else {
            return Handled::Reply(error(
                Some(id),
                RpcError::new(INVALID_PARAMS, "arguments must be an object"),
            ));
        };
        let (canceller, token) = Canceller::new();
        {
            let mut calls = conn.calls();
            if calls.len() >= self.inner.config.max_in_flight {
                return Handled::Reply(error(
                    Some(id),
                    RpcError::new(
                        INTERNAL_ERROR,
                        format!(
                            "too many calls in flight on this connection (limit {}); wait for one to finish",
                            self.inner.config.max_in_flight
                        ),
                    ),
                ));
            }
            if calls.contains_key(&id) {
                return Handled::Reply(error(
                    Some(id),
                    RpcError::new(INVALID_REQUEST, "a call with this id is already running"),
                ));
            }
            calls.insert(id.clone(), canceller);
        }
        // The stateless generation has no server-to-client requests.
        let elicit = if modern {
            None
        } else {
            conn.elicitor(out.clone())
        };
        let ctx = CallContext {
            session: conn.session.clone(),
            progress: env.progress_token.map(|t| Progress::new(t, out)),
            cancel: token.clone(),
            elicit,
        };
        let fut = self.inner.tools.call(def.name, args, ctx);
        let conn = conn.clone();
        Handled::Later(Box::pin(async move {
            let output = fut.await;
            conn.calls().remove(&id);
            if token.is_cancelled() {
                return None;
            }
            Some(reply(id, &finish(output.to_result(), modern)))
        }))
    }

    /// Runs one message to completion (tests and simple transports): the answer, if any.
    pub async fn handle_now(
        &self,
        msg: Message,
        conn: &Arc<Connection>,
        out: Arc<dyn Outbound>,
    ) -> Option<Message> {
        match self.handle(msg, conn, out) {
            Handled::Reply(m) => Some(m),
            Handled::Later(f) => f.await,
            Handled::Nothing => None,
        }
    }
}

fn finish(mut result: Value, modern: bool) -> Value {
    if modern {
        if let Value::Object(m) = &mut result {
            m.insert("resultType".into(), "complete".into());
        }
    }
    result
}

fn unsupported_version(id: RequestId, asked: &str) -> Message {
    let mut e = RpcError::new(
        UNSUPPORTED_PROTOCOL_VERSION,
        format!("unsupported protocol version {asked:?}"),
    );
    e.data = Some(serde_json::json!({ "supported": MODERN_VERSIONS, "requested": asked }));
    error(Some(id), e)
}

#[cfg(test)]
mod tests;

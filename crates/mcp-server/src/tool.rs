//! The seam between the MCP protocol and what the tools do: [`ToolSet`].
//!
//! The server owns the protocol (lifecycle, validation, progress, cancellation); a [`ToolSet`]
//! publishes [`ToolDef`]s and runs calls whose arguments were already checked against the
//! published `inputSchema`. A call gets a [`CallContext`]: the session it belongs to, a
//! [`Progress`] reporter (when the client asked for progress) and a [`CancelToken`] that fires
//! on `notifications/cancelled` or when the client went away.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::server::Outbound;

/// A boxed, sendable future (what [`ToolSet::call`] returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Which client session a call belongs to. Stdio has one session; Streamable HTTP has one per
/// `Mcp-Session-Id` (2025 revisions); stateless (2026-07-28) calls have none.
pub type SessionKey = Option<Arc<str>>;

/// Behaviour hints of a tool (`annotations` in `tools/list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Annotations {
    /// The tool does not change its environment.
    pub read_only: bool,
    /// The tool may destroy or overwrite state (meaningful when not read-only).
    pub destructive: bool,
    /// Calling it twice with the same arguments has no further effect.
    pub idempotent: bool,
    /// The tool reaches beyond a closed world (network, other systems).
    pub open_world: bool,
}

impl Annotations {
    /// A read-only tool.
    pub fn read_only() -> Self {
        Annotations {
            read_only: true,
            idempotent: true,
            ..Default::default()
        }
    }
    /// A tool that changes state but destroys nothing.
    pub fn additive() -> Self {
        Annotations::default()
    }
    /// A tool that may destroy or overwrite state.
    pub fn destructive() -> Self {
        Annotations {
            destructive: true,
            ..Default::default()
        }
    }
    /// Sets the idempotent hint.
    pub fn with_idempotent(mut self, yes: bool) -> Self {
        self.idempotent = yes;
        self
    }
    /// Sets the open-world hint.
    pub fn with_open_world(mut self, yes: bool) -> Self {
        self.open_world = yes;
        self
    }
}

/// One published tool.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ToolDef {
    /// Name (`sandbox_exec`).
    pub name: &'static str,
    /// Human-readable title.
    pub title: &'static str,
    /// Description for the model.
    pub description: String,
    /// JSON Schema of the arguments (an object schema); every call is validated against it.
    pub input_schema: Value,
    /// JSON Schema of `structuredContent` on success, if the tool returns structured output.
    pub output_schema: Option<Value>,
    /// Behaviour hints.
    pub annotations: Annotations,
}

impl ToolDef {
    /// A tool definition.
    pub fn new(
        name: &'static str,
        title: &'static str,
        description: impl Into<String>,
        input_schema: Value,
        output_schema: Option<Value>,
        annotations: Annotations,
    ) -> Self {
        ToolDef {
            name,
            title,
            description: description.into(),
            input_schema,
            output_schema,
            annotations,
        }
    }

    /// The `tools/list` entry.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), self.name.into());
        m.insert("title".into(), self.title.into());
        m.insert("description".into(), self.description.clone().into());
        m.insert("inputSchema".into(), self.input_schema.clone());
        if let Some(o) = &self.output_schema {
            m.insert("outputSchema".into(), o.clone());
        }
        let a = self.annotations;
        let mut ann = Map::new();
        ann.insert("title".into(), self.title.into());
        ann.insert("readOnlyHint".into(), a.read_only.into());
        if !a.read_only {
            ann.insert("destructiveHint".into(), a.destructive.into());
        }
        ann.insert("idempotentHint".into(), a.idempotent.into());
        ann.insert("openWorldHint".into(), a.open_world.into());
        m.insert("annotations".into(), Value::Object(ann));
        Value::Object(m)
    }
}

/// What a tool call produced.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ToolOutput {
    /// Success: `structured` becomes `structuredContent` (it must match the tool's
    /// `outputSchema`), `text` the text content block.
    Ok {
        /// Structured result.
        structured: Value,
        /// Text for the model (often the JSON of `structured`, or a readable summary).
        text: String,
    },
    /// The tool failed: `isError: true` with this message.
    Err(String),
}

impl ToolOutput {
    /// Success whose text is the JSON of `structured`.
    pub fn json(structured: Value) -> Self {
        let text = structured.to_string();
        ToolOutput::Ok { structured, text }
    }

    /// A tool error.
    pub fn error(message: impl Into<String>) -> Self {
        ToolOutput::Err(message.into())
    }

    /// The `tools/call` result object.
    pub fn to_result(&self) -> Value {
        match self {
            ToolOutput::Ok { structured, text } => serde_json::json!({
                "content": [{"type": "text", "text": text}],
                "structuredContent": structured,
                "isError": false,
            }),
            ToolOutput::Err(msg) => serde_json::json!({
                "content": [{"type": "text", "text": msg}],
                "isError": true,
            }),
        }
    }
}

/// Fires when a call should stop (`notifications/cancelled`, client gone, server ending).
#[derive(Debug, Clone)]
pub struct CancelToken(watch::Receiver<bool>);

/// The sending side of a [`CancelToken`].
#[derive(Debug)]
pub struct Canceller(watch::Sender<bool>);

impl Canceller {
    /// A new pair.
    pub fn new() -> (Canceller, CancelToken) {
        let (tx, rx) = watch::channel(false);
        (Canceller(tx), CancelToken(rx))
    }
    /// Cancels every token of this pair.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }
}

impl CancelToken {
    /// A token that never fires.
    pub fn never() -> CancelToken {
        // A channel whose sender is gone never changes: `cancelled` then waits forever.
        let (tx, rx) = watch::channel(false);
        drop(tx);
        CancelToken(rx)
    }
    /// Whether it fired.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }
    /// Resolves when it fires (never, if its [`Canceller`] was dropped without firing).
    pub async fn cancelled(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Sends `notifications/progress` for one call. Progress values increase by one per report.
#[derive(Clone)]
pub struct Progress {
    token: Value,
    out: Arc<dyn Outbound>,
    count: Arc<AtomicU64>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("token", &self.token)
            .finish()
    }
}

impl Progress {
    pub(crate) fn new(token: Value, out: Arc<dyn Outbound>) -> Self {
        Progress {
            token,
            out,
            count: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Reports a step with a message. Lossy: when the client reads slower than the tool
    /// reports, reports are dropped (a bounded queue never grows).
    pub fn report(&self, message: &str) {
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        let params = serde_json::json!({
            "progressToken": self.token,
            "progress": n,
            "message": message,
        });
        if let Ok(raw) = vmcp_mcp::jsonrpc::to_raw(&params) {
            self.out.notify(vmcp_mcp::jsonrpc::Message::notification(
                "notifications/progress",
                Some(raw),
            ));
        }
    }
}

/// What a call knows about its surroundings.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The session the call belongs to.
    pub session: SessionKey,
    /// Progress reporter, when the client sent a `progressToken`.
    pub progress: Option<Progress>,
    /// Fires when the call should stop.
    pub cancel: CancelToken,
    /// Asks the client's user (MCP elicitation, form mode), when the client supports it.
    pub elicit: Option<crate::elicit::Elicitor>,
}

impl CallContext {
    /// A context with no session, no progress and no cancellation (tests, direct use).
    pub fn detached() -> Self {
        CallContext {
            session: None,
            progress: None,
            cancel: CancelToken::never(),
            elicit: None,
        }
    }

    /// Reports progress if the client asked for it.
    pub fn progress(&self, message: &str) {
        if let Some(p) = &self.progress {
            p.report(message);
        }
    }
}

/// The tools a server offers.
pub trait ToolSet: Send + Sync + 'static {
    /// The published tools (called once when the server is built).
    fn tools(&self) -> Vec<ToolDef>;

    /// Runs tool `name` with arguments already validated against its `inputSchema`.
    fn call(&self, name: &str, args: Map<String, Value>, ctx: CallContext)
        -> BoxFuture<ToolOutput>;

    /// A client session ended (stdio closed, HTTP session deleted or expired).
    fn session_ended(&self, session: &Arc<str>) {
        let _ = session;
    }
}

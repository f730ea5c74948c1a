//! Asking the connected client's user a question: MCP elicitation, form mode.
//!
//! A call gets an [`Elicitor`] in its [`crate::tool::CallContext`] when the client declared
//! the `elicitation` capability in `initialize` with form mode (`{}` or `{"form": {}}`, as the
//! 2025-06-18 and 2025-11-25 revisions spell it). [`Elicitor::ask`] sends an
//! `elicitation/create` request (`mode: "form"`, a message and a flat `requestedSchema`) on
//! the call's outbound stream (stdout, or the call's SSE stream) and waits for the client's
//! answer, which the transport hands to [`crate::server::Server::handle`] like any message.
//!
//! Bounds: at most [`MAX_PENDING`] questions wait per connection (more are refused, never
//! queued); an answer whose id matches no question is ignored; a question forgotten by its
//! caller (timeout, cancellation) is removed from the table when its future is dropped. The
//! stateless 2026-07-28 generation has no server-to-client requests: calls there get no
//! elicitor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};
use tokio::sync::oneshot;
use vmcp_mcp::jsonrpc::{Message, Request, RequestId, RpcError};

use crate::server::Outbound;

/// Questions waiting for an answer on one connection, at most.
pub const MAX_PENDING: usize = 32;

/// What the client's user answered.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Answer {
    /// Submitted the form, with its content.
    Accept(Map<String, Value>),
    /// Explicitly declined.
    Decline,
    /// Dismissed without choosing.
    Cancel,
}

/// Why a question got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElicitError {
    /// Too many questions wait on this connection.
    #[error("{MAX_PENDING} questions already wait for this client")]
    TooMany,
    /// The question could not be queued to the client.
    #[error("cannot send the question to the client")]
    NotSent,
    /// The client answered with an error.
    #[error("the client refused the question: {0}")]
    Client(String),
    /// The client's answer is not an elicitation result.
    #[error("the client's answer is malformed: {0}")]
    Malformed(String),
    /// The connection ended before an answer came.
    #[error("the client went away before answering")]
    Gone,
}

type Waiter = oneshot::Sender<Result<Value, RpcError>>;

/// The server-to-client requests of one connection that wait for answers.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    next: AtomicU64,
    waiting: Mutex<HashMap<RequestId, Waiter>>,
}

impl Pending {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Waiter>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open(&self) -> Result<(RequestId, oneshot::Receiver<Result<Value, RpcError>>), ElicitError> {
        let mut t = self.table();
        if t.len() >= MAX_PENDING {
            return Err(ElicitError::TooMany);
        }
        let id = RequestId::String(format!(
            "vmcp-elicit-{}",
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        let (tx, rx) = oneshot::channel();
        t.insert(id.clone(), tx);
        Ok((id, rx))
    }

    fn forget(&self, id: &RequestId) {
        self.table().remove(id);
    }

    /// Hands an answer to its question; false when no question has that id.
    pub(crate) fn answer(&self, id: &RequestId, result: Result<Value, RpcError>) -> bool {
        match self.table().remove(id) {
            Some(tx) => {
                let _ = tx.send(result);
                true
            }
            None => false,
        }
    }
}

/// Whether an `initialize` `capabilities` object offers form-mode elicitation.
pub fn supports_form(client_capabilities: &Value) -> bool {
    match client_capabilities.get("elicitation") {
        Some(Value::Object(m)) => m.is_empty() || m.contains_key("form"),
        _ => false,
    }
}

/// Asks questions through one call's outbound stream.
#[derive(Clone)]
pub struct Elicitor {
    pending: Arc<Pending>,
    out: Arc<dyn Outbound>,
}

impl std::fmt::Debug for Elicitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Elicitor")
    }
}

struct Forget<'a>(&'a Pending, RequestId);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(&self.1);
    }
}

impl Elicitor {
    pub(crate) fn new(pending: Arc<Pending>, out: Arc<dyn Outbound>) -> Elicitor {
        Elicitor { pending, out }
    }

    /// Sends a form-mode `elicitation/create` with `message` and `requested_schema` (an
    /// object schema of primitive properties) and waits for the answer. No timeout here: the
    /// caller bounds the wait (dropping the future forgets the question).
    pub async fn ask(&self, message: &str, requested_schema: Value) -> Result<Answer, ElicitError> {
        let (id, rx) = self.pending.open()?;
        let _forget = Forget(&self.pending, id.clone());
        let params = serde_json::json!({
            "mode": "form",
            "message": message,
            "requestedSchema": requested_schema,
        });
        let params = vmcp_mcp::jsonrpc::to_raw(&params).map_err(|_| ElicitError::NotSent)?;
        let req = Message::Request(Request {
            id,
            method: "elicitation/create".into(),
            params: Some(params),
        });
        if !self.out.notify(req) {
            return Err(ElicitError::NotSent);
        }
        let result = rx
            .await
            .map_err(|_| ElicitError::Gone)?
            .map_err(|e| ElicitError::Client(e.message))?;
        parse_answer(&result)
    }
}

fn parse_answer(v: &Value) -> Result<Answer, ElicitError> {
    match v.get("action").and_then(Value::as_str) {
        Some("accept") => match v.get("content") {
            Some(Value::Object(m)) => Ok(Answer::Accept(m.clone())),
            None | Some(Value::Null) => Ok(Answer::Accept(Map::new())),
            Some(_) => Err(ElicitError::Malformed("content is not an object".into())),
        },
        Some("decline") => Ok(Answer::Decline),
        Some("cancel") => Ok(Answer::Cancel),
        Some(other) => Err(ElicitError::Malformed(format!(
            "unknown action {:?}",
            crate::elicit::clip(other)
        ))),
        None => Err(ElicitError::Malformed("no action".into())),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_forms() {
        assert!(supports_form(&serde_json::json!({"elicitation": {}})));
        assert!(supports_form(
            &serde_json::json!({"elicitation": {"form": {}, "url": {}}})
        ));
        assert!(!supports_form(
            &serde_json::json!({"elicitation": {"url": {}}})
        ));
        assert!(!supports_form(&serde_json::json!({"sampling": {}})));
        assert!(!supports_form(&serde_json::json!({"elicitation": true})));
    }

    #[test]
    fn answers_parse() {
        let a = parse_answer(&serde_json::json!({"action": "accept", "content": {"ok": true}}));
        assert!(matches!(a, Ok(Answer::Accept(m)) if m["ok"] == true));
        assert_eq!(
            parse_answer(&serde_json::json!({"action": "decline"})).unwrap(),
            Answer::Decline
        );
        assert!(parse_answer(&serde_json::json!({"action": "accept", "content": 3})).is_err());
        assert!(parse_answer(&serde_json::json!({"action": "maybe"})).is_err());
    }

    struct Sink(Mutex<Vec<Message>>);
    impl Outbound for Sink {
        fn notify(&self, msg: Message) -> bool {
            self.0.lock().unwrap().push(msg);
            true
        }
    }

    #[tokio::test]
    async fn ask_routes_the_answer_and_bounds_the_table() {
        let pending = Arc::new(Pending::default());
        let sink = Arc::new(Sink(Mutex::new(Vec::new())));
        let e = Elicitor::new(pending.clone(), sink.clone());
        let ask = tokio::spawn({
            let e = e.clone();
            async move { e.ask("ok?", serde_json::json!({"type": "object"})).await }
        });
        let id = loop {
            if let Some(Message::Request(r)) = sink.0.lock().unwrap().first() {
                assert_eq!(r.method, "elicitation/create");
                break r.id.clone();
            }
            tokio::task::yield_now().await;
        };
        assert!(!pending.answer(&RequestId::Number(99), Ok(Value::Null)));
        assert!(pending.answer(&id, Ok(serde_json::json!({"action": "decline"}))));
        assert_eq!(ask.await.unwrap().unwrap(), Answer::Decline);
        assert!(pending.table().is_empty());
        // Dropped questions are forgotten; the table never holds more than MAX_PENDING.
        let mut held = Vec::new();
        for _ in 0..MAX_PENDING {
            held.push(pending.open().unwrap());
        }
        assert!(matches!(pending.open(), Err(ElicitError::TooMany)));
        let fut = e.ask("x", serde_json::json!({}));
        assert!(matches!(fut.await, Err(ElicitError::TooMany)));
    }
}

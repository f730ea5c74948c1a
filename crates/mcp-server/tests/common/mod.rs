//! A fake tool set and helpers shared by the transport tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use vmcp_mcp_server::tool::{Annotations, BoxFuture};
use vmcp_mcp_server::{CallContext, ToolDef, ToolOutput, ToolSet};

/// Counters the fake tools update.
#[derive(Default)]
pub struct Counters {
    pub cancelled: AtomicUsize,
    pub ended: AtomicUsize,
}

pub struct Fake(pub Arc<Counters>);

impl ToolSet for Fake {
    fn tools(&self) -> Vec<ToolDef> {
        vec![
            ToolDef::new(
                "add",
                "Add",
                "Adds two integers",
                json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "maximum": 10}},
                       "required": ["a", "b"], "additionalProperties": false}),
                Some(
                    json!({"type": "object", "properties": {"sum": {"type": "integer"}}, "required": ["sum"]}),
                ),
                Annotations::read_only(),
            ),
            ToolDef::new(
                "slow",
                "Slow",
                "Reports progress three times, then waits until cancelled or `ms` passed",
                json!({"type": "object", "properties": {"ms": {"type": "integer", "minimum": 0}}}),
                None,
                Annotations::destructive(),
            ),
        ]
    }

    fn call(
        &self,
        name: &str,
        args: Map<String, Value>,
        ctx: CallContext,
    ) -> BoxFuture<ToolOutput> {
        let name = name.to_owned();
        let counters = self.0.clone();
        Box::pin(async move {
            match name.as_str() {
                "add" => {
                    let s = args["a"].as_i64().unwrap_or(0) + args["b"].as_i64().unwrap_or(0);
                    ToolOutput::json(json!({"sum": s}))
                }
                _ => {
                    for i in 0..3 {
                        ctx.progress(&format!("step {i}"));
                    }
                    let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(60_000);
                    tokio::select! {
                        () = ctx.cancel.cancelled() => {
                            counters.cancelled.fetch_add(1, Ordering::SeqCst);
                            ToolOutput::error("cancelled")
                        }
                        () = tokio::time::sleep(Duration::from_millis(ms)) => ToolOutput::json(json!({"slept": ms})),
                    }
                }
            }
        })
    }

    fn session_ended(&self, _session: &Arc<str>) {
        self.0.ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// Waits until `f` holds (at most 5 s).
pub async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f(), "timed out waiting for: {what}");
}

/// Calls the fake's `slow` tool with a progress token and checks the answer and that its three
/// progress notifications arrived before it.
pub async fn slow_call_reports_progress<T: vmcp_mcp::Transport>(c: &vmcp_mcp::Client<T>) {
    let mut notes = c.notifications();
    let params = vmcp_mcp::jsonrpc::to_raw(
        &json!({"name": "slow", "arguments": {"ms": 1}, "_meta": {"progressToken": "tok"}}),
    )
    .unwrap();
    let r: Value = serde_json::from_str(
        c.request_raw("tools/call", Some(params))
            .await
            .unwrap()
            .get(),
    )
    .unwrap();
    assert_eq!(r["structuredContent"]["slept"], 1);
    let mut msgs = Vec::new();
    while let Ok(n) = notes.try_recv() {
        msgs.push(
            serde_json::from_str::<Value>(n.params.unwrap().get()).unwrap()["message"].clone(),
        );
    }
    assert_eq!(msgs, [json!("step 0"), json!("step 1"), json!("step 2")]);
}

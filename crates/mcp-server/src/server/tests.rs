use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::tool::Annotations;

/// A tool set with a quick tool, a slow cancellable one and a progress reporter.
pub(crate) struct Fake {
    pub ended: Arc<AtomicUsize>,
}

impl ToolSet for Fake {
    fn tools(&self) -> Vec<ToolDef> {
        vec![
            ToolDef::new(
                "add",
                "Add",
                "Adds",
                json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "maximum": 10}},
                       "required": ["a", "b"], "additionalProperties": false}),
                Some(json!({"type": "object", "properties": {"sum": {"type": "integer"}}})),
                Annotations::read_only(),
            ),
            ToolDef::new(
                "sleep",
                "Sleep",
                "Sleeps until cancelled",
                json!({"type": "object"}),
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
        Box::pin(async move {
            match name.as_str() {
                "add" => {
                    ctx.progress("adding");
                    let s = args["a"].as_i64().unwrap() + args["b"].as_i64().unwrap();
                    ToolOutput::json(json!({"sum": s}))
                }
                _ => {
                    ctx.cancel.cancelled().await;
                    ToolOutput::error("cancelled")
                }
            }
        })
    }

    fn session_ended(&self, _session: &Arc<str>) {
        self.ended.fetch_add(1, Ordering::SeqCst);
    }
}

struct Collect(Mutex<Vec<Message>>);
impl Outbound for Collect {
    fn notify(&self, msg: Message) -> bool {
        self.0.lock().unwrap().push(msg);
        true
    }
}

fn server() -> Server {
    Server::new(
        Fake {
            ended: Arc::new(AtomicUsize::new(0)),
        },
        ServerConfig::default().with_max_in_flight(2),
    )
    .unwrap()
}

fn req(id: i64, method: &str, params: Value) -> Message {
    Message::request(id, method, Some(jsonrpc::to_raw(&params).unwrap()))
}

fn result(m: Option<Message>) -> Value {
    match m {
        Some(Message::Response(r)) => serde_json::from_str(r.result.get()).unwrap(),
        other => panic!("not a result: {other:?}"),
    }
}

fn rpc_err(m: Option<Message>) -> RpcError {
    match m {
        Some(Message::Error(e)) => e.error,
        other => panic!("not an error: {other:?}"),
    }
}

#[tokio::test]
async fn legacy_lifecycle_and_tools() {
    let s = server();
    let c = Connection::new(None);
    let init = result(
        s.handle_now(
            req(1, "initialize", json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}})),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(init["protocolVersion"], "2025-06-18");
    assert_eq!(init["capabilities"]["tools"]["listChanged"], false);
    assert_eq!(c.version().as_deref(), Some("2025-06-18"));
    // An unknown version gets our newest legacy one.
    let init = result(
        s.handle_now(
            req(2, "initialize", json!({"protocolVersion": "1999-01-01"})),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(init["protocolVersion"], "2025-11-25");
    let list = result(
        s.handle_now(req(3, "tools/list", json!({})), &c, Arc::new(Discard))
            .await,
    );
    let tools = list["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 2);
    assert_eq!(tools[0]["annotations"]["readOnlyHint"], true);
    assert_eq!(tools[1]["annotations"]["destructiveHint"], true);
    assert!(tools[0]["outputSchema"].is_object());
    assert!(list.get("resultType").is_none());
    let r = result(
        s.handle_now(
            req(
                4,
                "tools/call",
                json!({"name": "add", "arguments": {"a": 1, "b": 2}}),
            ),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(r["structuredContent"]["sum"], 3);
    assert_eq!(r["isError"], false);
    assert_eq!(r["content"][0]["text"], "{\"sum\":3}");
}

#[tokio::test]
async fn invalid_arguments_are_tool_errors_naming_the_field() {
    let s = server();
    let c = Connection::new(None);
    for (args, want) in [
        (json!({"a": 1}), "invalid arguments for add: b: is required"),
        (
            json!({"a": 1, "b": 11}),
            "invalid arguments for add: b: must be <= 10, got 11",
        ),
        (
            json!({"a": "x", "b": 1}),
            "invalid arguments for add: a: expected an integer, got a string",
        ),
        (
            json!({"a": 1, "b": 1, "c": 1}),
            "invalid arguments for add: c: unknown argument (known: a, b)",
        ),
        (
            json!([1]),
            "invalid arguments for add: the arguments: expected an object, got an array",
        ),
    ] {
        let r = result(
            s.handle_now(
                req(1, "tools/call", json!({"name": "add", "arguments": args})),
                &c,
                Arc::new(Discard),
            )
            .await,
        );
        assert_eq!(r["isError"], true);
        assert_eq!(r["content"][0]["text"], want);
    }
    let e = rpc_err(
        s.handle_now(
            req(2, "tools/call", json!({"name": "nope"})),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(e.code, INVALID_PARAMS);
    assert!(e.message.contains("unknown tool: nope"));
    let e = rpc_err(
        s.handle_now(req(3, "resources/list", json!({})), &c, Arc::new(Discard))
            .await,
    );
    assert_eq!(e.code, METHOD_NOT_FOUND);
    let e = rpc_err(
        s.handle_now(
            Message::request(4, "tools/list", Some(jsonrpc::to_raw(&json!([1])).unwrap())),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(e.code, INVALID_PARAMS);
}

#[tokio::test]
async fn modern_requests() {
    let s = server();
    let c = Connection::new(None);
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28"});
    let d = result(
        s.handle_now(
            req(1, "server/discover", json!({"_meta": meta})),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(d["supportedVersions"], json!(["2026-07-28"]));
    assert_eq!(d["resultType"], "complete");
    assert_eq!(
        (d["ttlMs"].clone(), d["cacheScope"].clone()),
        (json!(0), json!("private"))
    );
    let l = result(
        s.handle_now(
            req(5, "tools/list", json!({"_meta": meta})),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(
        (
            l["ttlMs"].clone(),
            l["cacheScope"].clone(),
            l["resultType"].clone()
        ),
        (json!(0), json!("private"), json!("complete"))
    );
    let r = result(
        s.handle_now(
            req(
                2,
                "tools/call",
                json!({"_meta": meta, "name": "add", "arguments": {"a": 2, "b": 2}}),
            ),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(r["resultType"], "complete");
    assert_eq!(r["structuredContent"]["sum"], 4);
    let e = rpc_err(
        s.handle_now(
            req(
                3,
                "tools/list",
                json!({"_meta": {"io.modelcontextprotocol/protocolVersion": "2027-01-01"}}),
            ),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert_eq!(e.code, UNSUPPORTED_PROTOCOL_VERSION);
    assert_eq!(e.data.unwrap()["supported"], json!(["2026-07-28"]));
}

#[tokio::test]
async fn progress_goes_to_the_outbound() {
    let s = server();
    let c = Connection::new(None);
    let out = Arc::new(Collect(Mutex::new(Vec::new())));
    let r = result(
        s.handle_now(
            req(1, "tools/call", json!({"name": "add", "arguments": {"a": 1, "b": 1}, "_meta": {"progressToken": "p1"}})),
            &c,
            out.clone(),
        )
        .await,
    );
    assert_eq!(r["structuredContent"]["sum"], 2);
    let got = out.0.lock().unwrap();
    assert_eq!(got.len(), 1);
    let Message::Notification(n) = &got[0] else {
        panic!()
    };
    assert_eq!(n.method, "notifications/progress");
    let p: Value = serde_json::from_str(n.params.as_ref().unwrap().get()).unwrap();
    assert_eq!(
        p,
        json!({"progressToken": "p1", "progress": 1, "message": "adding"})
    );
}

#[tokio::test]
async fn cancellation_stops_the_call_and_suppresses_the_answer() {
    let s = server();
    let c = Connection::new(None);
    let Handled::Later(fut) = s.handle(
        req(7, "tools/call", json!({"name": "sleep"})),
        &c,
        Arc::new(Discard),
    ) else {
        panic!()
    };
    let task = tokio::spawn(fut);
    assert_eq!(c.in_flight(), 1);
    // A cancellation for another id changes nothing.
    s.handle(
        Message::notification(
            "notifications/cancelled",
            Some(jsonrpc::to_raw(&json!({"requestId": 8})).unwrap()),
        ),
        &c,
        Arc::new(Discard),
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!task.is_finished());
    s.handle(
        Message::notification(
            "notifications/cancelled",
            Some(jsonrpc::to_raw(&json!({"requestId": 7, "reason": "user"})).unwrap()),
        ),
        &c,
        Arc::new(Discard),
    );
    let answer = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(answer.is_none());
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn in_flight_limit_is_enforced() {
    let s = server();
    let c = Connection::new(None);
    let mut held = Vec::new();
    for id in 0..2 {
        match s.handle(
            req(id, "tools/call", json!({"name": "sleep"})),
            &c,
            Arc::new(Discard),
        ) {
            Handled::Later(f) => held.push(tokio::spawn(f)),
            other => panic!("{other:?}"),
        }
    }
    let e = rpc_err(
        s.handle_now(
            req(9, "tools/call", json!({"name": "sleep"})),
            &c,
            Arc::new(Discard),
        )
        .await,
    );
    assert!(
        e.message
            .contains("too many calls in flight on this connection (limit 2)"),
        "{}",
        e.message
    );
    c.cancel_all();
    for h in held {
        assert!(h.await.unwrap().is_none());
    }
}

#[test]
fn schemas_must_be_checkable() {
    struct Bad;
    impl ToolSet for Bad {
        fn tools(&self) -> Vec<ToolDef> {
            vec![ToolDef::new(
                "x",
                "X",
                "x",
                json!({"type": "object", "oneOf": []}),
                None,
                Annotations::read_only(),
            )]
        }
        fn call(&self, _: &str, _: Map<String, Value>, _: CallContext) -> BoxFuture<ToolOutput> {
            Box::pin(async { ToolOutput::error("no") })
        }
    }
    let e = Server::new(Bad, ServerConfig::default()).unwrap_err();
    assert!(vmcp_test_support::error_chain(&e).contains("\"oneOf\""));
}

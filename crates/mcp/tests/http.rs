//! Streamable HTTP transport against real loopback servers (tests/common/mcp_server.rs):
//! both protocol generations, JSON and SSE, server requests mid-stream, session expiry,
//! 503 + Retry-After, resets before and after the request was processed (a tools/call runs at
//! most once), timeouts and cancellation, SSE resumption, round-robin, failover, re-admission.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mcp_server.rs"]
mod mcp_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_server::{Fault, McpServer, Options, Speaks};
use serde_json::{json, Value};
use vmcp_mcp::balance::BalancerConfig;
use vmcp_mcp::client::{HandlerFuture, ServerRequestHandler};
use vmcp_mcp::http::{
    EraCache, HttpConfig, HttpTransportError, ReqwestClient, ReqwestOptions,
    StreamableHttpTransport,
};
use vmcp_mcp::jsonrpc::Request;
use vmcp_mcp::retry::RetryPolicy;
use vmcp_mcp::{Client, ClientConfig, ClientError, Era, Lifecycle};

type HttpClient = Client<StreamableHttpTransport<ReqwestClient>>;

fn http_config(urls: &[&str]) -> HttpConfig {
    let mut c = HttpConfig::new(urls.iter().map(|u| u.to_string()));
    c.retry =
        RetryPolicy::new().with_backoff(Duration::from_millis(20), 2, Duration::from_millis(200));
    c
}

fn transport(config: HttpConfig) -> StreamableHttpTransport<ReqwestClient> {
    let http = ReqwestClient::new(&ReqwestOptions::default().with_proxy_from_env(false)).unwrap();
    StreamableHttpTransport::new(http, config).unwrap()
}

async fn connect_with(config: HttpConfig, client: ClientConfig) -> HttpClient {
    Client::connect(transport(config), client).await.unwrap()
}

async fn connect(urls: &[&str]) -> HttpClient {
    connect_with(http_config(urls), ClientConfig::default()).await
}

fn opts(speaks: Speaks, sse: bool) -> Options {
    Options {
        speaks,
        sse,
        ..Options::default()
    }
}

async fn echo(c: &HttpClient, msg: &str) -> String {
    let r = c
        .call_tool("echo", Some(&json!({ "message": msg })))
        .await
        .unwrap();
    assert!(!r.is_error());
    r.content[0].as_text().unwrap().to_owned()
}

fn header(s: &McpServer, method: &str, name: &str) -> Option<String> {
    s.requests()
        .iter()
        .rev()
        .find(|r| r.body["method"] == method)
        .and_then(|r| r.headers.get(name).cloned())
}

async fn legacy_session(sse: bool) {
    let s = McpServer::start(opts(Speaks::Legacy, sse)).await;
    let cfg = http_config(&[&s.url])
        .with_header_line("Authorization: Bearer t0k")
        .unwrap();
    let c = connect_with(cfg, ClientConfig::default()).await;
    assert_eq!(c.era(), Era::Legacy);
    assert_eq!(c.server_info().protocol_version, "2025-11-25");
    assert_eq!(echo(&c, "hi").await, "hi@test-server");
    let tools = c.list_tools().await.unwrap();
    assert_eq!(tools[0].name, "echo");
    c.ping().await.unwrap();
    assert_eq!(c.list_resources().await.unwrap()[0].uri, "mem://a");
    assert_eq!(
        c.read_resource("mem://a").await.unwrap().contents[0]
            .text
            .as_deref(),
        Some("contents")
    );
    assert_eq!(c.list_prompts().await.unwrap()[0].name, "p");
    assert_eq!(c.get_prompt("p", None).await.unwrap().messages.len(), 1);
    // The session headers ride on every request after initialize.
    let sid = c.transport().session_id().unwrap();
    assert_eq!(header(&s, "tools/call", "mcp-session-id"), Some(sid));
    assert_eq!(
        header(&s, "tools/call", "mcp-protocol-version").as_deref(),
        Some("2025-11-25")
    );
    assert_eq!(
        header(&s, "tools/call", "accept").as_deref(),
        Some("application/json, text/event-stream")
    );
    // Custom headers and the user agent ride on every request, the GET stream and DELETE too.
    assert!(s
        .requests()
        .iter()
        .all(|r| r.headers.get("authorization").map(String::as_str) == Some("Bearer t0k")));
    assert!(header(&s, "tools/call", "user-agent")
        .unwrap()
        .starts_with("vmcp/"));
    // Auto detection tried server/discover first, then initialize + initialized.
    let m = s.methods();
    assert_eq!(
        &m[..3],
        ["server/discover", "initialize", "notifications/initialized"]
    );
    c.close().await;
    assert_eq!(s.state.deletes.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn legacy_session_with_sse_answers() {
    legacy_session(true).await;
}

#[tokio::test]
async fn legacy_session_with_json_answers() {
    legacy_session(false).await;
}

#[tokio::test]
async fn legacy_get_stream_delivers_server_notifications() {
    let s = McpServer::start(opts(Speaks::Legacy, false)).await;
    let c = connect_with(
        http_config(&[&s.url]),
        ClientConfig::default().with_lifecycle(Lifecycle::Initialize),
    )
    .await;
    let mut notes = c.notifications();
    // The GET stream opens after notifications/initialized and sends one log message.
    let n = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.method, "notifications/message");
    assert!(n.params.unwrap().get().contains("from the GET stream"));
    assert_eq!(s.state.gets.load(std::sync::atomic::Ordering::SeqCst), 1);
    let get = s
        .requests()
        .into_iter()
        .find(|r| r.method == "GET")
        .unwrap();
    assert_eq!(
        get.headers.get("accept").map(String::as_str),
        Some("text/event-stream")
    );
    assert!(get.headers.contains_key("mcp-session-id"));
}

async fn modern(sse: bool, speaks: Speaks) {
    let s = McpServer::start(opts(speaks, sse)).await;
    let c = connect(&[&s.url]).await;
    assert_eq!(c.era(), Era::Modern);
    assert_eq!(c.server_info().protocol_version, "2026-07-28");
    assert_eq!(echo(&c, "hi").await, "hi@test-server");
    // The tool with an invalid x-mcp-header is dropped (2026-07-28 over HTTP).
    let names: Vec<String> = c
        .list_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["echo", "ask", "region"]);
    // x-mcp-header: the argument is mirrored into Mcp-Param-Region, Base64 when not ASCII.
    let r = c
        .call_tool("region", Some(&json!({"region":"Zürich","q":"x"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("region=Zürich"));
    assert_eq!(
        header(&s, "tools/call", "mcp-param-region").as_deref(),
        Some("=?base64?WsO8cmljaA==?=")
    );
    assert_eq!(c.read_resource("mem://a").await.unwrap().contents.len(), 1);
    assert_eq!(
        c.get_prompt("p", Some(&json!({})))
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
    // Per-request headers; no session, no initialize, no GET stream.
    assert_eq!(
        header(&s, "tools/call", "mcp-method").as_deref(),
        Some("tools/call")
    );
    assert_eq!(
        header(&s, "tools/call", "mcp-name").as_deref(),
        Some("region")
    );
    assert_eq!(
        header(&s, "resources/read", "mcp-name").as_deref(),
        Some("mem://a")
    );
    assert_eq!(
        header(&s, "tools/call", "mcp-protocol-version").as_deref(),
        Some("2026-07-28")
    );
    assert!(header(&s, "tools/call", "mcp-session-id").is_none());
    let call = s
        .requests()
        .into_iter()
        .find(|r| r.body["method"] == "tools/call")
        .unwrap();
    assert_eq!(
        call.body["params"]["_meta"]["io.modelcontextprotocol/clientInfo"]["name"],
        "vmcp"
    );
    assert!(!s.methods().contains(&"initialize".to_owned()));
    c.close().await;
    assert_eq!(s.state.gets.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(s.state.deletes.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn modern_stateless_json() {
    modern(false, Speaks::Modern).await;
}

#[tokio::test]
async fn modern_stateless_sse() {
    modern(true, Speaks::Modern).await;
}

#[tokio::test]
async fn dual_era_server_is_spoken_to_in_the_modern_protocol() {
    modern(false, Speaks::Both).await;
}

#[tokio::test]
async fn detected_generation_is_cached_per_endpoint() {
    let s = McpServer::start(opts(Speaks::Legacy, false)).await;
    let cache = EraCache::default();
    let mut cfg = http_config(&[&s.url]);
    cfg.era_cache = cache.clone();
    let c = connect_with(cfg.clone(), ClientConfig::default()).await;
    c.close().await;
    assert_eq!(cache.get(&s.url), Some(Era::Legacy));
    let before = s.methods().len();
    let c2 = connect_with(cfg, ClientConfig::default()).await;
    assert_eq!(c2.era(), Era::Legacy);
    // The second connection went straight to initialize.
    assert_eq!(s.methods()[before], "initialize");
}

#[tokio::test]
async fn explicit_modern_against_legacy_server_fails_clearly() {
    let s = McpServer::start(opts(Speaks::Legacy, false)).await;
    let err = Client::connect(
        transport(http_config(&[&s.url])),
        ClientConfig::default().with_lifecycle(Lifecycle::Discover),
    )
    .await
    .err()
    .unwrap();
    assert!(
        matches!(err, ClientError::Rpc { ref method, .. } if method == "server/discover"),
        "{err}"
    );
}

struct Roots;
impl ServerRequestHandler for Roots {
    fn handle(&self, request: &Request) -> Option<HandlerFuture> {
        (request.method == "roots/list").then(|| -> HandlerFuture {
            Box::pin(async { Ok(json!({"roots":[{"uri":"file:///work","name":"work"}]})) })
        })
    }
}

#[tokio::test]
async fn server_requests_and_notifications_mid_stream() {
    let s = McpServer::start(opts(Speaks::Legacy, true)).await;
    let c = connect_with(
        http_config(&[&s.url]),
        ClientConfig::default()
            .with_lifecycle(Lifecycle::Initialize)
            .with_handler(Arc::new(Roots), json!({"roots":{}})),
    )
    .await;
    let mut notes = c.notifications();
    let r = c.call_tool("ask", None).await.unwrap();
    let answers: Value = serde_json::from_str(r.content[0].as_text().unwrap()).unwrap();
    // roots/list answered by our handler; sampling unhandled -> method not found.
    assert_eq!(
        answers["roots"]["result"]["roots"][0]["uri"],
        "file:///work"
    );
    assert_eq!(answers["sampling"]["error"]["code"], -32601);
    let mut methods = Vec::new();
    while let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(300), notes.recv()).await {
        methods.push(n.method);
    }
    assert!(
        methods.contains(&"notifications/progress".to_owned()),
        "{methods:?}"
    );
}

#[tokio::test]
async fn expired_session_is_reinitialized_and_the_call_resent() {
    let s = McpServer::start(opts(Speaks::Legacy, true)).await;
    let c = connect(&[&s.url]).await;
    let first = c.transport().session_id().unwrap();
    assert_eq!(echo(&c, "a").await, "a@test-server");
    s.expire_sessions();
    assert_eq!(echo(&c, "b").await, "b@test-server");
    assert_ne!(c.transport().session_id().unwrap(), first);
    // The 404ed call was not processed: exactly two executions.
    assert_eq!(s.calls(), 2);
    assert_eq!(s.methods().iter().filter(|m| *m == "initialize").count(), 2);
}

#[tokio::test]
async fn unavailable_503_with_retry_after_is_retried_even_for_tools_call() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let c = connect(&[&s.url]).await;
    s.fault(Some("tools/call"), Fault::Status(503, Some(1)));
    let t = Instant::now();
    assert_eq!(echo(&c, "x").await, "x@test-server");
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "Retry-After honoured: {:?}",
        t.elapsed()
    );
    assert_eq!(s.calls(), 1);
    s.fault(Some("tools/call"), Fault::Status(429, Some(0)));
    assert_eq!(echo(&c, "y").await, "y@test-server");
    assert_eq!(s.calls(), 2);
}

#[tokio::test]
async fn retries_give_up_after_three() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let c = connect(&[&s.url]).await;
    for _ in 0..4 {
        s.fault(Some("tools/list"), Fault::Status(503, None));
    }
    let err = c.list_tools().await.unwrap_err();
    let ClientError::Transport(ref t) = err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            t.downcast_ref::<HttpTransportError>(),
            Some(HttpTransportError::RetriesExhausted { attempts: 4, .. })
        ),
        "{err}"
    );
}

#[tokio::test]
async fn tools_call_reset_after_execution_is_not_resent() {
    for speaks in [Speaks::Legacy, Speaks::Modern] {
        let s = McpServer::start(opts(speaks, false)).await;
        let c = connect(&[&s.url]).await;
        s.fault(Some("tools/call"), Fault::ResetAfterExecute);
        let err = c
            .call_tool("echo", Some(&json!({"message":"once"})))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("may have reached the server") && text.contains("not re-sent"),
            "{text}"
        );
        assert_eq!(s.calls(), 1, "executed exactly once, never re-sent");
        // The connection is usable afterwards.
        assert_eq!(echo(&c, "again").await, "again@test-server");
    }
}

#[tokio::test]
async fn tools_call_reset_before_read_is_not_resent() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let c = connect(&[&s.url]).await;
    s.fault(None, Fault::ResetBeforeRead);
    let err = c
        .call_tool("echo", Some(&json!({"message":"x"})))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("may have reached the server"),
        "{err}"
    );
    assert_eq!(s.calls(), 0);
}

#[tokio::test]
async fn safe_requests_are_retried_after_resets() {
    let s = McpServer::start(opts(Speaks::Modern, true)).await;
    let c = connect(&[&s.url]).await;
    s.fault(Some("tools/list"), Fault::ResetAfterExecute);
    assert_eq!(c.list_tools().await.unwrap().len(), 3);
    s.fault(None, Fault::ResetBeforeRead);
    c.ping().await.unwrap();
    assert_eq!(s.methods().iter().filter(|m| *m == "tools/list").count(), 2);
}

#[tokio::test]
async fn slow_server_times_out_and_the_call_is_cancelled() {
    let s = McpServer::start(opts(Speaks::Legacy, false)).await;
    let c = connect_with(
        http_config(&[&s.url]),
        ClientConfig::default().with_request_timeout(Some(Duration::from_millis(300))),
    )
    .await;
    let t = Instant::now();
    let err = c
        .call_tool("slow", Some(&json!({"ms": 3000})))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2));
    // Legacy: notifications/cancelled names the request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let call_id = s
        .requests()
        .iter()
        .find(|r| r.body["method"] == "tools/call")
        .unwrap()
        .body["id"]
        .clone();
    let cancelled = s
        .requests()
        .into_iter()
        .find(|r| r.body["method"] == "notifications/cancelled")
        .expect("notifications/cancelled sent");
    assert_eq!(cancelled.body["params"]["requestId"], call_id);
    // The client still works.
    assert_eq!(echo(&c, "z").await, "z@test-server");
}

#[tokio::test]
async fn modern_timeout_cancels_by_closing_the_stream() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let c = connect_with(
        http_config(&[&s.url]),
        ClientConfig::default().with_request_timeout(Some(Duration::from_millis(300))),
    )
    .await;
    let err = c
        .call_tool("slow", Some(&json!({"ms": 2000})))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!s.methods().contains(&"notifications/cancelled".to_owned()));
}

#[tokio::test]
async fn attempt_timeout_retries_safe_requests_only() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let mut cfg = http_config(&[&s.url]);
    cfg.retry = cfg
        .retry
        .clone()
        .with_attempt_timeout(Some(Duration::from_millis(300)));
    let c = connect_with(cfg, ClientConfig::default()).await;
    s.fault(Some("tools/list"), Fault::Delay(Duration::from_secs(3)));
    let t = Instant::now();
    assert_eq!(c.list_tools().await.unwrap().len(), 3);
    assert!(t.elapsed() < Duration::from_secs(2));
    s.fault(Some("tools/call"), Fault::Delay(Duration::from_secs(3)));
    let err = c
        .call_tool("echo", Some(&json!({"message":"x"})))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("may have reached the server"),
        "{err}"
    );
}

#[tokio::test]
async fn dropped_sse_stream_is_resumed_with_last_event_id() {
    let s = McpServer::start(opts(Speaks::Legacy, true)).await;
    let c = connect(&[&s.url]).await;
    s.fault(Some("tools/call"), Fault::DropAfterPriming);
    assert_eq!(echo(&c, "r").await, "r@test-server");
    assert_eq!(s.calls(), 1);
    let resume = s
        .requests()
        .into_iter()
        .find(|r| r.method == "GET" && r.headers.contains_key("last-event-id"))
        .expect("a GET with Last-Event-ID");
    assert_eq!(resume.headers["last-event-id"], "p0");
}

#[tokio::test]
async fn json_rpc_errors_and_tool_errors_are_reported() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let c = connect(&[&s.url]).await;
    let err = c.call_tool("nope", None).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rpc { ref error, .. } if error.code == -32602),
        "{err}"
    );
    let r = c.call_tool("fail", None).await.unwrap();
    assert!(r.is_error());
}

#[tokio::test]
async fn stateless_requests_are_spread_round_robin() {
    let a = McpServer::start(Options {
        name: "a".into(),
        ..opts(Speaks::Modern, false)
    })
    .await;
    let b = McpServer::start(Options {
        name: "b".into(),
        ..opts(Speaks::Modern, false)
    })
    .await;
    let c = connect(&[&a.url, &b.url]).await;
    for i in 0..10 {
        echo(&c, &i.to_string()).await;
    }
    assert_eq!(a.calls() + b.calls(), 10);
    assert_eq!(a.calls(), 5);
    assert_eq!(b.calls(), 5);
}

async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", l.local_addr().unwrap());
    drop(l);
    url
}

#[tokio::test]
async fn refused_endpoint_fails_over_and_each_call_runs_once() {
    let a = McpServer::start(opts(Speaks::Modern, false)).await;
    let dead = dead_url().await;
    let c = connect(&[&dead, &a.url]).await;
    for i in 0..6 {
        echo(&c, &i.to_string()).await;
    }
    assert_eq!(a.calls(), 6);
}

#[tokio::test]
async fn all_endpoints_down_is_one_clear_error() {
    let d1 = dead_url().await;
    let d2 = dead_url().await;
    let err = Client::connect(transport(http_config(&[&d1, &d2])), ClientConfig::default())
        .await
        .err()
        .unwrap();
    let mut text = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    assert!(
        text.contains("unavailable") || text.contains("giving up"),
        "{text}"
    );
    assert!(text.contains(&d1) || text.contains(&d2), "{text}");
}

#[tokio::test]
async fn legacy_session_moves_to_another_backend_when_its_own_dies() {
    let a = McpServer::start(Options {
        name: "a".into(),
        ..opts(Speaks::Legacy, true)
    })
    .await;
    let b = McpServer::start(Options {
        name: "b".into(),
        ..opts(Speaks::Legacy, true)
    })
    .await;
    let mut cfg = http_config(&[&a.url, &b.url]);
    cfg.get_stream = false;
    let c = connect_with(
        cfg,
        ClientConfig::default().with_lifecycle(Lifecycle::Initialize),
    )
    .await;
    // The session lives on the endpoint that created it.
    let first = echo(&c, "1").await;
    let owner = if first.ends_with("@a") { 0 } else { 1 };
    let name = ["a", "b"][owner];
    assert_eq!(echo(&c, "2").await, format!("2@{name}"));
    let mut servers = [Some(a), Some(b)];
    // Kill that endpoint.
    servers[owner] = None;
    let other = servers[1 - owner].as_ref().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = echo(&c, "3").await;
    assert_eq!(r, format!("3@{}", other.state.opts.name));
    assert_eq!(
        other
            .methods()
            .iter()
            .filter(|m| *m == "initialize")
            .count(),
        1
    );
    assert_eq!(other.calls(), 1);
}

#[tokio::test]
async fn ejected_endpoint_is_readmitted_after_cooldown() {
    let a = McpServer::start(Options {
        name: "a".into(),
        ..opts(Speaks::Modern, false)
    })
    .await;
    let b = McpServer::start(Options {
        name: "b".into(),
        ..opts(Speaks::Modern, false)
    })
    .await;
    let a_addr = a.addr.to_string();
    let mut cfg = http_config(&[&a.url, &b.url]);
    cfg.balance = BalancerConfig::default().with_ejection(1, Duration::from_millis(300));
    let c = connect_with(cfg, ClientConfig::default()).await;
    drop(a);
    // While a is down every call lands on b.
    for i in 0..4 {
        assert!(echo(&c, &i.to_string()).await.ends_with("@b"));
    }
    // a comes back on the same port; after the cooldown it takes traffic again.
    let a2 = McpServer::start_on(
        &a_addr,
        Options {
            name: "a".into(),
            ..opts(Speaks::Modern, false)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    for i in 0..4 {
        echo(&c, &i.to_string()).await;
    }
    assert!(a2.calls() >= 1, "a re-admitted");
}

#[tokio::test]
async fn header_mismatch_lists_tools_and_retries_once() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let c = connect(&[&s.url]).await;
    // No tools/list yet: the first attempt lacks Mcp-Param-Region, the server says
    // HeaderMismatch, the client lists the tools and retries with the header.
    let r = c
        .call_tool("region", Some(&json!({"region":"eu"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("region=eu"));
    let m = s.methods();
    assert_eq!(
        &m[m.len() - 3..],
        ["tools/call", "tools/list", "tools/call"]
    );
    assert_eq!(s.calls(), 1);
}

#[tokio::test]
async fn answer_on_a_stream_the_server_keeps_open_returns_at_once() {
    let s = McpServer::start(opts(Speaks::Legacy, true)).await;
    let c = connect_with(
        http_config(&[&s.url]),
        ClientConfig::default().with_request_timeout(Some(Duration::from_secs(10))),
    )
    .await;
    s.fault(Some("tools/call"), Fault::KeepOpen);
    let t = Instant::now();
    assert_eq!(echo(&c, "open").await, "open@test-server");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(echo(&c, "next").await, "next@test-server");
}

#[tokio::test]
async fn dropping_a_call_cancels_it() {
    let s = McpServer::start(opts(Speaks::Legacy, false)).await;
    let c = connect(&[&s.url]).await;
    let args = json!({"ms": 3000});
    tokio::select! {
        _ = c.call_tool("slow", Some(&args)) => panic!("the slow call finished first"),
        () = tokio::time::sleep(Duration::from_millis(200)) => {}
    }
    // The dropped call's slot is gone and the server is told.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !s.methods().contains(&"notifications/cancelled".to_owned()) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(s.methods().contains(&"notifications/cancelled".to_owned()));
    assert_eq!(echo(&c, "after").await, "after@test-server");
}

struct Elicit;
impl ServerRequestHandler for Elicit {
    fn handle(&self, request: &Request) -> Option<HandlerFuture> {
        (request.method == "elicitation/create").then(|| -> HandlerFuture {
            Box::pin(async { Ok(json!({"action":"accept","content":{}})) })
        })
    }
}

#[tokio::test]
async fn multi_round_trip_input_is_served_by_the_handler() {
    let s = McpServer::start(opts(Speaks::Modern, false)).await;
    let c = connect_with(
        http_config(&[&s.url]),
        ClientConfig::default().with_handler(Arc::new(Elicit), json!({"elicitation":{}})),
    )
    .await;
    let r = c.call_tool("confirm", None).await.unwrap();
    assert_eq!(r.content[0].as_text(), Some("confirmed: accept"));
    let calls: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.body["method"] == "tools/call")
        .collect();
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0].body["id"], calls[1].body["id"]);
    assert_eq!(calls[1].body["params"]["requestState"], "st-1");
    assert!(calls[1].body["params"]["_meta"].is_object());
    assert_eq!(s.calls(), 1);

    // Without a handler for the requested input the call fails clearly.
    let c2 = connect(&[&s.url]).await;
    let err = c2.call_tool("confirm", None).await.unwrap_err();
    assert!(matches!(err, ClientError::InputRequired { .. }), "{err}");
}

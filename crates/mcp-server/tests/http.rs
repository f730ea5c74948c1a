//! The Streamable HTTP server against our own client (both generations) and raw requests
//! (guards, limits, sessions, cancellation by disconnect).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Counters, Fake};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vmcp_mcp::http::{
    HttpConfig as ClientHttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport,
};
use vmcp_mcp::{Client, ClientConfig, Era, Lifecycle};
use vmcp_mcp_server::http::{HttpConfig, HttpError, HttpServer};
use vmcp_mcp_server::{Server, ServerConfig};

struct Running {
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn start(tweak: impl FnOnce(&mut HttpConfig)) -> Running {
    let counters = Arc::new(Counters::default());
    let server = Server::new(Fake(counters.clone()), ServerConfig::default()).unwrap();
    let mut config = HttpConfig::new("127.0.0.1:0".parse().unwrap());
    tweak(&mut config);
    let http = HttpServer::bind(config).await.unwrap();
    let addr = http.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(http.serve(server, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        counters,
        stop: Some(tx),
        task,
    }
}

async fn client(url: &str, lifecycle: Lifecycle) -> Client<StreamableHttpTransport<ReqwestClient>> {
    let http = ReqwestClient::new(&ReqwestOptions::default()).unwrap();
    let t = StreamableHttpTransport::new(http, ClientHttpConfig::new([url.to_owned()])).unwrap();
    Client::connect(t, ClientConfig::default().with_lifecycle(lifecycle))
        .await
        .unwrap()
}

#[tokio::test]
async fn our_client_lists_and_calls_in_both_generations() {
    let s = start(|_| {}).await;
    for (lifecycle, era) in [
        (Lifecycle::Initialize, Era::Legacy),
        (Lifecycle::Discover, Era::Modern),
        (Lifecycle::Auto, Era::Modern),
    ] {
        let c = client(&s.url(), lifecycle).await;
        assert_eq!(c.era(), era);
        let tools = c.list_tools().await.unwrap();
        assert_eq!(
            tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["add", "slow"]
        );
        assert_eq!(tools[0].extra["annotations"]["readOnlyHint"], true);
        let r = c
            .call_tool("add", Some(&json!({"a": 2, "b": 3})))
            .await
            .unwrap();
        assert_eq!(r.structured_content.unwrap()["sum"], 5);
        let r = c
            .call_tool("add", Some(&json!({"a": 2, "b": 30})))
            .await
            .unwrap();
        assert!(r.is_error());
        assert_eq!(
            r.content[0].as_text().unwrap(),
            "invalid arguments for add: b: must be <= 10, got 30"
        );
        c.ping().await.unwrap();
        c.close().await;
    }
    // The legacy client's DELETE ended its session.
    eventually("the legacy session ended", || {
        s.counters.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn progress_arrives_on_the_sse_answer() {
    let s = start(|_| {}).await;
    for lifecycle in [Lifecycle::Initialize, Lifecycle::Discover] {
        let c = client(&s.url(), lifecycle).await;
        common::slow_call_reports_progress(&c).await;
        c.close().await;
    }
    s.stop().await;
}

/// One raw HTTP/1.1 request; returns status, head and body.
async fn raw(addr: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (h, b) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = h.split(' ').nth(1).unwrap().parse().unwrap();
    (status, h.to_ascii_lowercase(), b.to_owned())
}

fn post(host: &str, extra: &str) -> String {
    format!("POST /mcp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream{extra}")
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#;

#[tokio::test]
async fn dns_rebinding_protection() {
    let s = start(|_| {}).await;
    let (st, _, _) = raw(s.addr, &post("localhost", ""), INIT).await;
    assert_eq!(st, 200);
    let (st, _, body) = raw(s.addr, &post("evil.example:80", ""), INIT).await;
    assert_eq!(st, 403);
    assert!(body.contains("DNS-rebinding"), "{body}");
    let (st, _, body) = raw(
        s.addr,
        &post("localhost", "\r\nOrigin: http://evil.example"),
        INIT,
    )
    .await;
    assert_eq!(st, 403);
    assert!(body.contains("Origin"), "{body}");
    let (st, _, _) = raw(
        s.addr,
        &post("127.0.0.1", "\r\nOrigin: http://localhost:3000"),
        INIT,
    )
    .await;
    assert_eq!(st, 200);
    s.stop().await;
}

#[tokio::test]
async fn bearer_token() {
    let s = start(|c| c.token = Some("s3cret".into())).await;
    let (st, head, _) = raw(s.addr, &post("localhost", ""), INIT).await;
    assert_eq!(st, 401);
    assert!(head.contains("www-authenticate: bearer"));
    let (st, _, _) = raw(
        s.addr,
        &post("localhost", "\r\nAuthorization: Bearer wrong"),
        INIT,
    )
    .await;
    assert_eq!(st, 401);
    let (st, _, _) = raw(
        s.addr,
        &post("localhost", "\r\nAuthorization: Bearer s3cret"),
        INIT,
    )
    .await;
    assert_eq!(st, 200);
    s.stop().await;
}

#[tokio::test]
async fn refuses_a_public_address_without_a_token() {
    let e = HttpServer::bind(HttpConfig::new("0.0.0.0:0".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::NoToken(_)));
    assert!(e.to_string().contains("--token-file"), "{e}");
}

#[tokio::test]
async fn limits_and_protocol_errors() {
    let s = start(|c| {
        c.max_body = 1000;
        c.max_sessions = 2;
    })
    .await;
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#,
        "a".repeat(2000)
    );
    let (st, _, body) = raw(s.addr, &post("localhost", ""), &big).await;
    assert_eq!(st, 413);
    assert!(body.contains("larger than 1000 bytes"));
    // Sessions: two fit, the third is refused with the limit named.
    let mut sids = Vec::new();
    for _ in 0..2 {
        let (st, head, _) = raw(s.addr, &post("localhost", ""), INIT).await;
        assert_eq!(st, 200);
        let sid = head
            .lines()
            .find_map(|l| l.strip_prefix("mcp-session-id: "))
            .unwrap()
            .to_owned();
        sids.push(sid);
    }
    let (st, _, body) = raw(s.addr, &post("localhost", ""), INIT).await;
    assert_eq!(st, 503);
    assert!(body.contains("too many MCP sessions (2)"), "{body}");
    let ping = r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#;
    let (st, _, body) = raw(
        s.addr,
        &post(
            "localhost",
            &format!(
                "\r\nMcp-Session-Id: {}\r\nMCP-Protocol-Version: 2025-11-25",
                sids[0]
            ),
        ),
        ping,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, _, _) = raw(s.addr, &post("localhost", "\r\nMcp-Session-Id: nope"), ping).await;
    assert_eq!(st, 404);
    let (st, _, body) = raw(s.addr, &post("localhost", ""), ping).await;
    assert_eq!(st, 400);
    assert!(body.contains("missing Mcp-Session-Id"));
    // DELETE ends one; a new one fits again.
    let (st, _, _) = raw(
        s.addr,
        &format!(
            "DELETE /mcp HTTP/1.1\r\nHost: localhost\r\nMcp-Session-Id: {}",
            sids[0]
        ),
        "",
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(s.counters.ended.load(Ordering::SeqCst), 1);
    let (st, _, _) = raw(s.addr, &post("localhost", ""), INIT).await;
    assert_eq!(st, 200);
    // Other protocol errors.
    let (st, _, body) = raw(s.addr, &post("localhost", ""), "{not json").await;
    assert_eq!(st, 400);
    assert!(body.contains("-32700"));
    let (st, _, body) = raw(s.addr, &post("localhost", ""), &format!("[{INIT}]")).await;
    assert_eq!(st, 400);
    assert!(body.contains("batches are not supported"));
    let (st, head, _) = raw(
        s.addr,
        "GET /mcp HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream",
        "",
    )
    .await;
    assert_eq!(st, 405);
    assert!(head.contains("allow: post, delete"));
    let (st, _, _) = raw(
        s.addr,
        "POST /mcp HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/plain",
        INIT,
    )
    .await;
    assert_eq!(st, 415);
    let (st, _, _) = raw(
        s.addr,
        "POST /other HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json",
        INIT,
    )
    .await;
    assert_eq!(st, 404);
    let modern = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1,"b":1},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let (st, _, body) = raw(
        s.addr,
        &post(
            "localhost",
            "\r\nMCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/list",
        ),
        modern,
    )
    .await;
    assert_eq!(st, 400);
    assert!(body.contains("-32020"), "{body}");
    let (st, _, body) = raw(
        s.addr,
        &post(
            "localhost",
            "\r\nMCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: other",
        ),
        modern,
    )
    .await;
    assert_eq!(st, 400);
    assert!(body.contains("Mcp-Name"), "{body}");
    let (st, _, body) = raw(
        s.addr,
        &post(
            "localhost",
            "\r\nMCP-Protocol-Version: 2026-07-28\r\nMcp-Method: tools/call\r\nMcp-Name: add",
        ),
        modern,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"resultType\":\"complete\""), "{body}");
    let (st, _, body) = raw(
        s.addr,
        &post("localhost", "\r\nMCP-Protocol-Version: 1999-01-01"),
        ping,
    )
    .await;
    assert_eq!(st, 400);
    assert!(body.contains("unsupported MCP-Protocol-Version"), "{body}");
    s.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_cancels_the_call() {
    let s = start(|_| {}).await;
    let modern = r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"slow","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
    let mut conn = TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "{}\r\nMCP-Protocol-Version: 2026-07-28\r\nContent-Length: {}\r\n\r\n{modern}",
        post("localhost", ""),
        modern.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 512];
    // The head comes at once; the body waits for the tool.
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_eq!(s.counters.cancelled.load(Ordering::SeqCst), 0);
    drop(conn);
    eventually("the call was cancelled", || {
        s.counters.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn notifications_cancelled_stops_a_legacy_call() {
    let s = start(|_| {}).await;
    let c = Arc::new(client(&s.url(), Lifecycle::Initialize).await);
    let c2 = c.clone();
    let call = tokio::spawn(async move { c2.call_tool("slow", None).await });
    eventually("the call runs", || !call.is_finished()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    call.abort();
    // Dropping the call future makes our client send notifications/cancelled.
    eventually("the call was cancelled", || {
        s.counters.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    c.close().await;
    s.stop().await;
}

#[tokio::test]
async fn idle_sessions_end() {
    let s = start(|c| c.session_idle = Duration::from_millis(200)).await;
    let (st, _, _) = raw(s.addr, &post("localhost", ""), INIT).await;
    assert_eq!(st, 200);
    eventually("the idle session ended", || {
        s.counters.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    s.stop().await;
}

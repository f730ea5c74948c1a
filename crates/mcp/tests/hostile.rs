//! Hostile MCP servers on loopback (tests/common/hostile_server.rs), one misbehaviour per
//! test, each of which broke the client before the bounds of `vmcp_mcp::limits` (issue 11):
//! endless pagination, a flood of server requests, huge batches and bodies, cross-origin
//! redirects, a proxy-style 503 on `tools/call`, secrets and terminal escapes in messages, an
//! answer without our id, `retry: 0` on the GET stream. Every test has its own time limit, so
//! a client that loops fails instead of hanging.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/hostile_server.rs"]
mod hostile_server;

use std::sync::atomic::Ordering;
use std::time::Duration;

use hostile_server::{handshake, HostileServer};
use serde_json::json;
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::limits::{self, Limits};
use vmcp_mcp::retry::RetryPolicy;
use vmcp_mcp::{Client, ClientConfig, ClientError, Lifecycle};

type HttpClient = Client<StreamableHttpTransport<ReqwestClient>>;

fn config(url: &str) -> HttpConfig {
    let mut c = HttpConfig::new([url.to_owned()]);
    c.retry =
        RetryPolicy::new().with_backoff(Duration::from_millis(20), 2, Duration::from_millis(100));
    c
}

fn transport(c: HttpConfig) -> StreamableHttpTransport<ReqwestClient> {
    let http = ReqwestClient::new(&ReqwestOptions::default().with_proxy_from_env(false)).unwrap();
    StreamableHttpTransport::new(http, c).unwrap()
}

async fn connect_cfg(c: HttpConfig, cc: ClientConfig) -> HttpClient {
    Client::connect(transport(c), cc.with_lifecycle(Lifecycle::Initialize))
        .await
        .unwrap()
}

async fn connect(url: &str) -> HttpClient {
    connect_cfg(config(url), ClientConfig::default()).await
}

/// Runs `f` under a time limit: a client that loops or hangs fails the test.
async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not end within {secs} s"),
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    vmcp_test_support::error_chain(e)
}

fn tools_page(id: serde_json::Value, cursor: Option<&str>) -> serde_json::Value {
    let mut result = json!({"tools":[{"name":"t","inputSchema":{"type":"object"}}]});
    if let Some(c) = cursor {
        result["nextCursor"] = json!(c);
    }
    json!({"jsonrpc":"2.0","id":id,"result":result})
}

#[tokio::test]
async fn alternating_cursors_end_with_a_loop_error() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if handshake(&req, &mut conn).await {
            return;
        }
        // a, b, a, b, ...: the old check (same as the one just before) never fired.
        let next = match req.json["params"]["cursor"].as_str() {
            Some("a") => "b",
            _ => "a",
        };
        conn.json(&tools_page(req.id(), Some(next))).await;
    }))
    .await;
    let c = connect(&server.url).await;
    let err = within(20, "tools/list", c.list_tools()).await.unwrap_err();
    let text = chain(&err);
    assert!(
        matches!(
            &err,
            ClientError::Limit {
                source: limits::LimitError::RepeatedCursor(_),
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("pagination loop"), "{text}");
    assert_eq!(server.stats.count("tools/list"), 3, "a, b, then a again");
}

#[tokio::test]
async fn fresh_cursors_stop_at_the_page_limit() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if handshake(&req, &mut conn).await {
            return;
        }
        let n = stats.count("tools/list");
        conn.json(&tools_page(req.id(), Some(&format!("c{n}"))))
            .await;
    }))
    .await;
    let limits = Limits::default().with_list(25, 1_000, 1 << 20, Duration::from_secs(60));
    let c = connect_cfg(
        config(&server.url),
        ClientConfig::default().with_limits(limits),
    )
    .await;
    let err = within(20, "tools/list", c.list_tools()).await.unwrap_err();
    assert!(
        chain(&err).contains("more than 25 pages"),
        "{}",
        chain(&err)
    );
    assert_eq!(server.stats.count("tools/list"), 25);
}

#[tokio::test]
async fn list_items_and_values_are_capped() {
    // One page with 5 000 tools whose schemas are deep arrays: refused before decoding.
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if handshake(&req, &mut conn).await {
            return;
        }
        let tool = json!({"name":"t","inputSchema":{"type":"object","x":[[0,0,0,0,0,0,0,0,0,0]]}});
        let tools = vec![tool; 5_000];
        conn.json(&json!({"jsonrpc":"2.0","id":req.id(),"result":{"tools":tools}}))
            .await;
    }))
    .await;
    let limits = Limits::default().with_list(10, 1_000, 8 << 20, Duration::from_secs(60));
    let c = connect_cfg(
        config(&server.url),
        ClientConfig::default().with_limits(limits),
    )
    .await;
    let err = within(20, "tools/list", c.list_tools()).await.unwrap_err();
    assert!(
        chain(&err).contains("more than 1000 items"),
        "{}",
        chain(&err)
    );
    // Default item limit, but 5 000 x 15 JSON values > a 50 000 budget.
    let mut limits = Limits::default();
    limits.max_result_nodes = 50_000;
    let c = connect_cfg(
        config(&server.url),
        ClientConfig::default().with_limits(limits),
    )
    .await;
    let err = within(20, "tools/list", c.list_tools()).await.unwrap_err();
    assert!(
        chain(&err).contains("more than 50000 JSON values"),
        "{}",
        chain(&err)
    );
}

#[tokio::test]
async fn server_request_flood_is_bounded() {
    // The GET stream carries 20 000 pings as fast as the socket takes them; each answer POST
    // is held 200 ms by the server, so unbounded answering shows as many POSTs at once.
    let server = HostileServer::start(handler!(|req, conn, stats| {
        match (req.method.as_str(), req.rpc()) {
            ("GET", _) => {
                conn.sse_start().await;
                for i in 0..20_000 {
                    let ping = json!({"jsonrpc":"2.0","id":format!("p{i}"),"method":"ping"});
                    if !conn.event(&ping).await {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            (_, "") => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                conn.accepted().await;
            }
            _ => {
                if !handshake(&req, &mut conn).await {
                    conn.json(&tools_page(req.id(), None)).await;
                }
            }
        }
    }))
    .await;
    let c = connect(&server.url).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The client still answers its own calls during the flood.
    within(10, "tools/list during a flood", c.list_tools())
        .await
        .unwrap();
    let answers = server.stats.count("response");
    let most = server.stats.max_in_flight.load(Ordering::SeqCst);
    let bound = limits::MAX_SERVER_REQUESTS + limits::MAX_SERVER_REJECTS;
    // + the GET stream itself and the tools/list POST.
    assert!(
        most <= bound + 2,
        "{most} requests at once on the server (bound {bound} + 2); {answers} answers"
    );
    assert!(answers > 0, "pings are still answered");
    c.close().await;
}

#[tokio::test]
async fn huge_batches_are_refused_while_parsing() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if handshake(&req, &mut conn).await {
            return;
        }
        // 100 000 messages in one batch (3 MB).
        let one = r#"{"jsonrpc":"2.0","method":"notifications/progress"},"#;
        let mut body = String::from("[");
        body.push_str(&one.repeat(100_000));
        body.push_str(&tools_page(req.id(), None).to_string());
        body.push(']');
        conn.respond(
            200,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await;
    }))
    .await;
    let c = connect(&server.url).await;
    let err = within(20, "tools/list", c.list_tools()).await.unwrap_err();
    let text = chain(&err);
    assert!(
        text.contains(&format!("batch of more than {}", limits::MAX_BATCH_ITEMS)),
        "{text}"
    );
    assert_eq!(server.stats.count("tools/list"), 1, "not retried");
}

#[tokio::test]
async fn oversized_bodies_are_refused_and_not_retried() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if handshake(&req, &mut conn).await {
            return;
        }
        // A valid answer, one byte over the limit.
        let pad = "x".repeat(limits::MAX_MESSAGE_BYTES);
        let body = json!({"jsonrpc":"2.0","id":req.id(),"result":{"tools":[],"pad":pad}});
        conn.json(&body).await;
    }))
    .await;
    let c = connect(&server.url).await;
    let err = within(20, "tools/list", c.list_tools()).await.unwrap_err();
    let text = chain(&err);
    assert!(
        text.contains(&format!("larger than {} bytes", limits::MAX_MESSAGE_BYTES)),
        "{text}"
    );
    assert_eq!(server.stats.count("tools/list"), 1, "not retried: {text}");
}

#[tokio::test]
async fn redirects_to_another_origin_are_not_followed() {
    let other = HostileServer::start(handler!(|req, conn, stats| {
        if !handshake(&req, &mut conn).await {
            conn.json(&json!({"jsonrpc":"2.0","id":req.id(),"result":{"content":[]}}))
                .await;
        }
    }))
    .await;
    let target: &'static str = Box::leak(other.url.clone().into_boxed_str());
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if req.rpc() == "tools/call" {
            conn.respond(307, &[("Location", target)], b"").await;
        } else {
            handshake(&req, &mut conn).await;
        }
    }))
    .await;
    let c = connect_cfg(
        config(&server.url)
            .with_header_line("X-Api-Key: s3cret")
            .unwrap(),
        ClientConfig::default(),
    )
    .await;
    let err = within(20, "tools/call", c.call_tool("t", Some(&json!({}))))
        .await
        .unwrap_err();
    let text = chain(&err);
    assert_eq!(
        other.stats.total(),
        0,
        "the other origin got a request: {text}"
    );
    assert!(text.contains("redirect"), "{text}");
    assert_eq!(server.stats.count("tools/call"), 1);
}

#[tokio::test]
async fn same_origin_redirects_are_followed_a_few_times() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if req.rpc() == "tools/list" {
            match req.path.as_str() {
                "/mcp" => conn.respond(307, &[("Location", "/mcp2")], b"").await,
                "/mcp2" => conn.json(&tools_page(req.id(), None)).await,
                // /loop -> /loop -> ...
                _ => conn.respond(308, &[("Location", "/loop")], b"").await,
            }
        } else {
            handshake(&req, &mut conn).await;
        }
    }))
    .await;
    let c = connect(&server.url).await;
    let tools = within(20, "tools/list", c.list_tools()).await.unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(server.stats.count("tools/list"), 2);
    // A redirect loop stops after a few hops.
    let url = server.url.replace("/mcp", "/loop");
    let c = connect(&url).await;
    let before = server.stats.count("tools/list");
    let err = within(20, "tools/list", c.list_tools()).await.unwrap_err();
    assert!(chain(&err).contains("redirect"), "{}", chain(&err));
    let hops = server.stats.count("tools/list") - before;
    assert_eq!(hops, 1 + limits::MAX_REDIRECTS, "{}", chain(&err));
}

#[tokio::test]
async fn a_proxy_503_on_tools_call_is_not_resent() {
    for (status, retry_after) in [(503, None), (408, None), (429, None), (425, None)] {
        let server = HostileServer::start(handler!(|req, conn, stats| {
            if req.rpc() == "tools/call" {
                // Like a proxy that gave up while the server went on executing the call.
                let mut h = vec![("Content-Type", "text/plain")];
                if let Some(r) = retry_after {
                    h.push(("Retry-After", r));
                }
                conn.respond(status, &h, b"upstream timed out").await;
            } else {
                handshake(&req, &mut conn).await;
            }
        }))
        .await;
        let c = connect(&server.url).await;
        let err = within(20, "tools/call", c.call_tool("t", Some(&json!({}))))
            .await
            .unwrap_err();
        let text = chain(&err);
        assert_eq!(server.stats.count("tools/call"), 1, "{status}: {text}");
        assert!(text.contains("not re-sent"), "{text}");
        assert!(text.contains(&format!("HTTP {status}")), "{text}");
        // A safe request answered so is still retried.
        let err = within(20, "tools/list", c.list_tools()).await;
        drop(err);
    }
}

#[tokio::test]
async fn urls_and_headers_in_errors_carry_no_secrets() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let url = format!("http://user:pw-s3cret@127.0.0.1:{port}/mcp?token=tok-s3cret");
    let mut c = config(&url);
    c.retry = RetryPolicy::no_retries();
    let err = Client::connect(transport(c), ClientConfig::default())
        .await
        .err()
        .unwrap();
    let text = format!("{} | {err:?}", chain(&err));
    assert!(!text.contains("s3cret"), "{text}");
    assert!(
        text.contains(&format!("http://127.0.0.1:{port}/mcp")),
        "{text}"
    );
    for line in [
        "Authorization Bearer tok-s3cret",
        "Authorization: Bearer tok-s3cret\u{1}",
    ] {
        let err = HttpConfig::new(["http://h/"])
            .with_header_line(line)
            .unwrap_err();
        let text = format!("{} | {err:?}", chain(&err));
        assert!(!text.contains("s3cret"), "{text}");
    }
    let err = StreamableHttpTransport::new(
        ReqwestClient::new(&ReqwestOptions::default()).unwrap(),
        HttpConfig::new(["ftp://u:s3cret@h/x"]),
    )
    .err()
    .unwrap();
    assert!(!chain(&err).contains("s3cret"), "{}", chain(&err));
}

#[tokio::test]
async fn terminal_escapes_from_the_server_are_not_printed() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        match req.rpc() {
            "tools/list" => {
                let body = "\x1b]0;owned\x07\x1b[2J\u{202e}".repeat(100);
                conn.respond(500, &[("Content-Type", "text/plain")], body.as_bytes())
                    .await;
            }
            "tools/call" => {
                let e = json!({"jsonrpc":"2.0","id":req.id(),
                    "error":{"code":-32000,"message":"\x1b[31mred\x1b]8;;http://evil\x07"}});
                conn.json(&e).await;
            }
            _ => {
                handshake(&req, &mut conn).await;
            }
        }
    }))
    .await;
    let c = connect(&server.url).await;
    for err in [
        within(20, "tools/list", c.list_tools()).await.unwrap_err(),
        within(20, "tools/call", c.call_tool("t", None))
            .await
            .unwrap_err(),
    ] {
        let text = chain(&err);
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        assert!(!text.contains('\u{202e}'), "{text:?}");
        assert!(text.len() < 1_000, "{} bytes", text.len());
    }
}

#[tokio::test]
async fn a_json_answer_without_our_id_fails_at_once() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if !handshake(&req, &mut conn).await {
            conn.json(&tools_page(json!(424242), None)).await;
        }
    }))
    .await;
    // No request timeout at all: the call must still end.
    let c = connect_cfg(
        config(&server.url),
        ClientConfig::default().with_request_timeout(None),
    )
    .await;
    let err = within(10, "tools/list", c.list_tools()).await.unwrap_err();
    assert!(
        chain(&err).contains("without answering request"),
        "{}",
        chain(&err)
    );
}

#[tokio::test]
async fn retry_zero_on_the_get_stream_does_not_spin() {
    let server = HostileServer::start(handler!(|req, conn, stats| {
        if req.method == "GET" {
            conn.sse_start().await;
            conn.write(b"retry: 0\n\n").await;
        } else {
            handshake(&req, &mut conn).await;
        }
    }))
    .await;
    let c = connect(&server.url).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let gets = server.stats.count("GET");
    // 500 ms floor, doubling: 0, 0.5, 1.5, 3.5 s -> at most 4 in 3 s.
    assert!((1..=4).contains(&gets), "{gets} GETs in 3 s");
    c.close().await;
}

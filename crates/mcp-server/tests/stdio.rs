//! The stdio transport over an in-memory pipe.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{Counters, Fake};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vmcp_mcp_server::stdio::{serve, StdioError, StdioLimits};
use vmcp_mcp_server::{Server, ServerConfig};

#[tokio::test]
async fn serves_lines_cancels_and_ends_the_session() {
    let counters = Arc::new(Counters::default());
    let server = Server::new(Fake(counters.clone()), ServerConfig::default()).unwrap();
    let (mut client_w, server_r) = tokio::io::duplex(1 << 16);
    let (server_w, client_r) = tokio::io::duplex(1 << 16);
    let task =
        tokio::spawn(
            async move { serve(&server, server_r, server_w, &StdioLimits::default()).await },
        );
    let mut lines = BufReader::new(client_r).lines();
    let mut next = async || -> Value {
        let l = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        serde_json::from_str(&l).unwrap()
    };
    for m in [
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
    ] {
        client_w
            .write_all(format!("{m}\n").as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(next().await["result"]["protocolVersion"], "2025-11-25");
    assert_eq!(next().await["result"]["tools"][1]["name"], "slow");
    // A slow call with progress, then a quick one that overtakes it, then its cancellation.
    client_w
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"tools/call\",\"params\":{\"name\":\"slow\",\"_meta\":{\"progressToken\":9}}}\n")
        .await
        .unwrap();
    for i in 0..3 {
        let p = next().await;
        assert_eq!(p["method"], "notifications/progress");
        assert_eq!(p["params"]["progressToken"], 9);
        assert_eq!(p["params"]["message"], format!("step {i}"));
    }
    client_w
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":4,\"method\":\"tools/call\",\"params\":{\"name\":\"add\",\"arguments\":{\"a\":1,\"b\":2}}}\n")
        .await
        .unwrap();
    assert_eq!(next().await["result"]["structuredContent"]["sum"], 3);
    client_w
        .write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/cancelled\",\"params\":{\"requestId\":3}}\n")
        .await
        .unwrap();
    // Garbage gets a parse error, not the end of the session.
    client_w.write_all(b"not json\n").await.unwrap();
    let e = next().await;
    assert_eq!(e["error"]["code"], -32700);
    assert_eq!(e["id"], Value::Null);
    common::eventually("cancelled", || {
        counters.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(client_w);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(counters.ended.load(Ordering::SeqCst), 1);
    // The cancelled call got no answer: the stream ends here.
    assert!(lines.next_line().await.unwrap().is_none());
}

#[tokio::test]
async fn a_too_long_line_ends_the_session_with_an_error() {
    let counters = Arc::new(Counters::default());
    let server = Server::new(Fake(counters.clone()), ServerConfig::default()).unwrap();
    let (mut client_w, server_r) = tokio::io::duplex(1 << 16);
    let (server_w, _client_r) = tokio::io::duplex(1 << 16);
    let mut limits = StdioLimits::default();
    limits.max_line = 100;
    let task = tokio::spawn(async move { serve(&server, server_r, server_w, &limits).await });
    client_w.write_all(&[b'x'; 500]).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(r, Err(StdioError::LineTooLong(100))));
    assert_eq!(counters.ended.load(Ordering::SeqCst), 1);
    let _ = json!(null);
}

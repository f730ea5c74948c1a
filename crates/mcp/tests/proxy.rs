//! Proxies from the standard environment variables (its own test binary: it sets process
//! environment). The loopback test server also serves absolute-form requests, so it can play
//! the forward proxy: a request for an unreachable host that arrives there went through it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mcp_server.rs"]
mod mcp_server;

use mcp_server::{McpServer, Options, Speaks};
use serde_json::json;
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::{Client, ClientConfig};

async fn client(url: &str) -> Client<StreamableHttpTransport<ReqwestClient>> {
    let http = ReqwestClient::new(&ReqwestOptions::default()).unwrap();
    let t = StreamableHttpTransport::new(http, HttpConfig::new([url.to_owned()])).unwrap();
    Client::connect(t, ClientConfig::default()).await.unwrap()
}

#[tokio::test]
async fn http_proxy_and_no_proxy_from_the_environment() {
    let proxy = McpServer::start(Options {
        speaks: Speaks::Modern,
        sse: false,
        name: "proxy".into(),
        ..Options::default()
    })
    .await;
    let direct = McpServer::start(Options {
        speaks: Speaks::Modern,
        sse: false,
        name: "direct".into(),
        ..Options::default()
    })
    .await;
    for k in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        std::env::remove_var(k);
    }
    std::env::set_var("HTTP_PROXY", format!("http://{}", proxy.addr));
    std::env::set_var("NO_PROXY", "127.0.0.1");

    // A host only the proxy can "reach".
    let c = client("http://mcp.example.invalid/mcp").await;
    let r = c
        .call_tool("echo", Some(&json!({"message":"via"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("via@proxy"));
    let req = proxy
        .requests()
        .into_iter()
        .find(|r| r.body["method"] == "tools/call")
        .unwrap();
    assert_eq!(
        req.headers.get("host").map(String::as_str),
        Some("mcp.example.invalid")
    );

    // NO_PROXY: 127.0.0.1 is reached directly.
    let c = client(&direct.url).await;
    let r = c
        .call_tool("echo", Some(&json!({"message":"d"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("d@direct"));
    assert_eq!(proxy.calls(), 1);
}

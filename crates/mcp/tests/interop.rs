//! Interoperability with the official reference MCP servers: the TypeScript SDK's
//! `server-everything` and a small server on the Python SDK (`tests/interop/py_server.py`),
//! over stdio and over Streamable HTTP on loopback, both protocol generations where the server
//! has them. Installed by scripts/install.d/40-mcp-interop.sh; without them each test prints
//! `SKIPPED: ...`, and fails instead when `VMCP_REQUIRE_INTEROP=1` (as in CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/interop_servers.rs"]
mod servers;

use std::time::Duration;

use serde_json::{json, Value};
use servers::{HttpMode, HttpServer, Sdk};
use vmcp_mcp::client::{Client, ClientConfig, Lifecycle};
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::stdio::{StdioConfig, StdioTransport};
use vmcp_mcp::{Era, Transport};

fn config(lifecycle: Lifecycle) -> ClientConfig {
    ClientConfig::default()
        .with_lifecycle(lifecycle)
        .with_request_timeout(Some(Duration::from_secs(30)))
}

async fn call_json<T: Transport>(client: &Client<T>, tool: &str, args: Value) -> Value {
    let raw = client.call_tool_raw(tool, Some(&args)).await.unwrap();
    serde_json::from_str(raw.get()).unwrap()
}

fn first_text(result: &Value) -> &str {
    result["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text content in {result}"))
}

/// The checks every server passes: ping, tools, a call, resources, prompts.
async fn exercise<T: Transport>(sdk: Sdk, client: &Client<T>) {
    // 2026-07-28 removed `ping` with the rest of the lifecycle methods: only older servers have it.
    let legacy = client.era() == Era::Legacy;
    if legacy {
        client.ping().await.unwrap();
    }
    let tools = client.list_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    match sdk {
        Sdk::TypeScript => {
            assert!(names.contains(&"echo"), "{names:?}");
            assert!(names.contains(&"get-sum"), "{names:?}");
            let r = call_json(client, "echo", json!({"message": "hi from vmcp"})).await;
            assert_eq!(first_text(&r), "Echo: hi from vmcp", "{r}");
            let r = call_json(client, "get-sum", json!({"a": 2, "b": 40})).await;
            assert!(first_text(&r).contains("42"), "{r}");
        }
        Sdk::Python => {
            assert!(
                names.contains(&"add") && names.contains(&"echo"),
                "{names:?}"
            );
            let r = call_json(client, "add", json!({"a": 2, "b": 40})).await;
            assert_eq!(first_text(&r), "42", "{r}");
            let r = call_json(client, "echo", json!({"message": "ünïcødé ✓"})).await;
            assert_eq!(first_text(&r), "ünïcødé ✓", "{r}");
        }
    }

    let resources = client.list_resources().await.unwrap();
    assert!(!resources.is_empty(), "no resources");
    let uri = match sdk {
        Sdk::Python => "interop://greeting".to_owned(),
        Sdk::TypeScript => resources[0].uri.clone(),
    };
    let read = client.read_resource(&uri).await.unwrap();
    assert_eq!(read.contents[0].uri, uri);
    if sdk == Sdk::Python {
        assert_eq!(
            read.contents[0].text.as_deref(),
            Some("hello from the python sdk")
        );
    } else {
        assert!(read.contents[0].text.is_some() || read.contents[0].blob.is_some());
    }

    let prompts = client.list_prompts().await.unwrap();
    let (name, args) = match sdk {
        Sdk::TypeScript => ("simple-prompt", None),
        Sdk::Python => ("review", Some(json!({"code": "fn main() {}"}))),
    };
    assert!(prompts.iter().any(|p| p.name == name), "{prompts:?}");
    let prompt = client.get_prompt(name, args.as_ref()).await.unwrap();
    assert!(!prompt.messages.is_empty());
    let text = serde_json::to_value(&prompt.messages[0].content).unwrap();
    let expected = match sdk {
        Sdk::TypeScript => "This is a simple prompt without arguments.",
        Sdk::Python => "Please review this code: fn main() {}",
    };
    assert_eq!(text["text"], expected, "{text}");

    // An unknown tool is an error (a JSON-RPC error, or a result with isError), and the
    // connection stays usable.
    match client.call_tool_raw("no-such-tool", Some(&json!({}))).await {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(raw) => {
            let v: Value = serde_json::from_str(raw.get()).unwrap();
            assert_eq!(v["isError"], true, "{v}");
        }
    }
    assert_eq!(client.list_tools().await.unwrap().len(), tools.len());
}

async fn stdio(sdk: Sdk) {
    let (program, args) = match servers::stdio_command(sdk) {
        Ok(c) => c,
        Err(reason) => return servers::skip(&reason),
    };
    let transport = StdioTransport::spawn(&StdioConfig::new(program, args)).unwrap();
    let client = Client::connect(transport, config(Lifecycle::Auto))
        .await
        .unwrap();
    // server-everything speaks the session-based protocol; the Python SDK 2.x also speaks
    // 2026-07-28 over stdio, which detection must pick.
    let expected = match sdk {
        Sdk::TypeScript => Era::Legacy,
        Sdk::Python => Era::Modern,
    };
    assert_eq!(client.era(), expected);
    exercise(sdk, &client).await;
    client.close().await;
}

async fn http(sdk: Sdk, mode: HttpMode, lifecycle: Lifecycle) -> Option<Era> {
    let server = match HttpServer::start(sdk, mode).await {
        Ok(s) => s,
        Err(reason) => {
            servers::skip(&reason);
            return None;
        }
    };
    let client = ReqwestClient::new(&ReqwestOptions::default()).unwrap();
    let transport =
        StreamableHttpTransport::new(client, HttpConfig::new([server.url.clone()])).unwrap();
    let client = Client::connect(transport, config(lifecycle)).await.unwrap();
    let era = client.era();
    exercise(sdk, &client).await;
    client.close().await;
    Some(era)
}

#[tokio::test]
async fn typescript_everything_over_stdio() {
    stdio(Sdk::TypeScript).await;
}

#[tokio::test]
async fn python_sdk_over_stdio() {
    stdio(Sdk::Python).await;
}

#[tokio::test]
async fn typescript_everything_over_streamable_http() {
    if let Some(era) = http(Sdk::TypeScript, HttpMode::Sessions, Lifecycle::Auto).await {
        assert_eq!(era, Era::Legacy);
    }
}

#[tokio::test]
async fn python_sdk_over_streamable_http_detects_the_stateless_revision() {
    // The Python SDK serves both generations on one endpoint; detection picks the newer.
    if let Some(era) = http(Sdk::Python, HttpMode::Sessions, Lifecycle::Auto).await {
        assert_eq!(era, Era::Modern);
    }
}

#[tokio::test]
async fn python_sdk_over_streamable_http_with_sessions() {
    if let Some(era) = http(Sdk::Python, HttpMode::Sessions, Lifecycle::Initialize).await {
        assert_eq!(era, Era::Legacy);
    }
}

#[tokio::test]
async fn python_sdk_stateless_http_mode() {
    if let Some(era) = http(Sdk::Python, HttpMode::Stateless, Lifecycle::Initialize).await {
        assert_eq!(era, Era::Legacy);
    }
}

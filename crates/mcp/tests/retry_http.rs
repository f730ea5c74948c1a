//! Retry rules end to end: the MCP client over Streamable HTTP against a loopback server that
//! answers 503/429 with Retry-After, or drops the connection before or after processing.
//! A tools/call is executed at most once, whatever happens.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mcp_http_server.rs"]
mod mcp_server;

use std::time::{Duration, Instant, SystemTime};

use mcp_server::{Action, McpHttpServer};
use serde_json::json;
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::retry::RetryPolicy;
use vmcp_mcp::{Client, ClientConfig, ClientError, Lifecycle};

type HttpClient = Client<StreamableHttpTransport<ReqwestClient>>;

async fn setup() -> (McpHttpServer, HttpClient) {
    setup_with_timeout(Duration::from_secs(5)).await
}

async fn setup_with_timeout(timeout: Duration) -> (McpHttpServer, HttpClient) {
    let server = McpHttpServer::start("s", "127.0.0.1", None).await;
    let mut config = HttpConfig::new([server.url.clone()]);
    config.retry =
        RetryPolicy::new().with_backoff(Duration::from_millis(20), 2, Duration::from_millis(200));
    let http = ReqwestClient::new(&ReqwestOptions::default().with_proxy_from_env(false)).unwrap();
    let transport = StreamableHttpTransport::new(http, config).unwrap();
    let client = Client::connect(
        transport,
        ClientConfig::default()
            .with_lifecycle(Lifecycle::Initialize)
            .with_request_timeout(Some(timeout)),
    )
    .await
    .unwrap();
    (server, client)
}

async fn call(client: &HttpClient) -> Result<(), ClientError> {
    client
        .call_tool("whoami", Some(&json!({})))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn service_unavailable_with_retry_after_seconds_is_waited_out() {
    let (server, client) = setup().await;
    server.script("tools/call", vec![Action::Status(503, Some("1".into()))]);
    let t = Instant::now();
    call(&client).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn too_many_requests_with_an_http_date_is_waited_out() {
    let (server, client) = setup().await;
    let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(2));
    server.script("tools/call", vec![Action::Status(429, Some(at))]);
    let t = Instant::now();
    call(&client).await.unwrap();
    // HTTP dates have one-second resolution: at least ~1 s of the 2 s remain.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn not_processed_answers_are_retried_with_backoff_then_give_up() {
    // A tools/call is re-sent only when the server asks for it (503 + Retry-After).
    let (server, client) = setup().await;
    let asked = Action::Status(503, Some("0".into()));
    server.script("tools/call", vec![asked.clone(); 3]);
    call(&client).await.unwrap();
    assert_eq!(server.calls(), 1);

    server.script("tools/call", vec![asked; 10]);
    let err = call(&client).await.unwrap_err();
    let msg = vmcp_test_support::error_chain(&err);
    assert!(msg.contains("tools/call failed 4 times"), "{msg}");
    assert!(msg.contains("503"), "{msg}");
    assert_eq!(server.calls(), 1);

    // Without Retry-After the 503 may come from a proxy whose server went on: not re-sent.
    server.script("tools/call", vec![Action::Status(503, None); 3]);
    let err = call(&client).await.unwrap_err();
    let msg = vmcp_test_support::error_chain(&err);
    assert!(msg.contains("tools/call was not re-sent"), "{msg}");
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn a_retry_after_beyond_the_limit_fails_at_once() {
    let (server, client) = setup().await;
    server.script("tools/call", vec![Action::Status(503, Some("3600".into()))]);
    let t = Instant::now();
    let err = call(&client).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    let msg = vmcp_test_support::error_chain(&err);
    assert!(msg.contains("the server asked to retry in 3600 s"), "{msg}");
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn tools_call_lost_after_processing_is_not_repeated() {
    let (server, client) = setup().await;
    server.script("tools/call", vec![Action::ProcessThenClose]);
    let err = call(&client).await.unwrap_err();
    let msg = vmcp_test_support::error_chain(&err);
    assert!(msg.contains("tools/call"), "{msg}");
    assert!(msg.contains("may have reached the server"), "{msg}");
    assert!(!msg.contains('\n'));
    assert_eq!(server.calls(), 1, "executed exactly once");
    // The connection is still usable afterwards.
    call(&client).await.unwrap();
    assert_eq!(server.calls(), 2);
}

#[tokio::test]
async fn safe_requests_are_repeated_after_a_lost_answer() {
    let (server, client) = setup().await;
    server.script("tools/list", vec![Action::ProcessThenClose]);
    let tools = client.list_tools().await.unwrap();
    assert_eq!(tools[0].name, "whoami");
}

#[tokio::test]
async fn a_reset_before_the_body_runs_the_call_at_most_once() {
    let (server, client) = setup().await;
    server.script("", vec![Action::CloseBeforeBody]);
    // Whether the client could tell that nothing was processed depends on timing; either it
    // retried (and the call ran once) or it refused to (and the call ran zero times).
    match call(&client).await {
        Ok(()) => assert_eq!(server.calls(), 1),
        Err(e) => {
            let msg = vmcp_test_support::error_chain(&e);
            assert!(msg.contains("may have reached the server"), "{msg}");
            assert_eq!(server.calls(), 0);
        }
    }
}

#[tokio::test]
async fn a_hung_server_times_out() {
    let (server, client) = setup_with_timeout(Duration::from_secs(1)).await;
    server.script("tools/call", vec![Action::Hang]);
    let t = Instant::now();
    let err = call(&client).await.unwrap_err();
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let msg = vmcp_test_support::error_chain(&err);
    assert!(msg.contains("no answer within 1.0 s"), "{msg}");
    assert_eq!(server.calls(), 0);
}

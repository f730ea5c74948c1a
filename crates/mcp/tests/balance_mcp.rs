//! Load balancing end to end: the MCP client over Streamable HTTP with several loopback
//! backends. Stateless (2026-07-28) requests spread round-robin; a dead backend is failed
//! over and later re-admitted by health checks; a session (2025-xx) moves to another backend
//! when its own dies. Every tools/call runs exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mcp_http_server.rs"]
mod mcp_server;

use std::time::{Duration, Instant};

use mcp_server::{Generation, McpHttpServer};
use serde_json::json;
use vmcp_mcp::balance::{BalancerConfig, EndpointState, HealthCheckConfig};
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::retry::RetryPolicy;
use vmcp_mcp::{Client, ClientConfig, Era, Lifecycle};

type HttpClient = Client<StreamableHttpTransport<ReqwestClient>>;

async fn backends(n: usize, generation: Generation) -> Vec<McpHttpServer> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(McpHttpServer::start_gen(&format!("b{i}"), "127.0.0.1", None, generation).await);
    }
    v
}

async fn connect(servers: &[McpHttpServer], lifecycle: Lifecycle) -> HttpClient {
    let mut config = HttpConfig::new(servers.iter().map(|s| s.url.clone()));
    config.balance = BalancerConfig::default()
        .with_ejection(2, Duration::from_secs(60))
        .with_health_check(
            HealthCheckConfig::default()
                .with_timing(Duration::from_millis(50), Duration::from_millis(500))
                .with_thresholds(2, 2),
        );
    config.retry =
        RetryPolicy::new().with_backoff(Duration::from_millis(10), 2, Duration::from_millis(100));
    let http = ReqwestClient::new(&ReqwestOptions::default().with_proxy_from_env(false)).unwrap();
    let transport = StreamableHttpTransport::new(http, config).unwrap();
    transport.start_health_checks();
    let client_config = ClientConfig::default()
        .with_lifecycle(lifecycle)
        .with_request_timeout(Some(Duration::from_secs(20)));
    Client::connect(transport, client_config).await.unwrap()
}

async fn whoami(client: &HttpClient) -> String {
    let r = client.call_tool("whoami", Some(&json!({}))).await.unwrap();
    serde_json::to_value(&r.content[0]).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn calls(servers: &[McpHttpServer]) -> Vec<usize> {
    servers.iter().map(McpHttpServer::calls).collect()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stateless_requests_spread_round_robin() {
    let servers = backends(3, Generation::Modern).await;
    let client = connect(&servers, Lifecycle::Auto).await;
    assert_eq!(client.era(), Era::Modern);
    for _ in 0..30 {
        whoami(&client).await;
    }
    assert_eq!(calls(&servers), [10, 10, 10]);
    client.close().await;
}

#[tokio::test]
async fn failover_and_readmission_with_stateless_requests() {
    let mut servers = backends(3, Generation::Modern).await;
    let client = connect(&servers, Lifecycle::Auto).await;

    servers[1].stop().await;
    for _ in 0..20 {
        assert_ne!(whoami(&client).await, "b1");
    }
    let c = calls(&servers);
    assert_eq!(
        (c[0] + c[2], c[1]),
        (20, 0),
        "{c:?}: every call ran once, none on the dead one"
    );
    let balancer = client.transport().balancer();
    wait_for("b1 is marked down", || {
        !matches!(
            balancer.status(Instant::now())[1].state,
            EndpointState::Available
        )
    })
    .await;

    servers[1].restart().await;
    wait_for("b1 is re-admitted", || {
        balancer.status(Instant::now())[1].state == EndpointState::Available
    })
    .await;
    let before = calls(&servers);
    for _ in 0..30 {
        whoami(&client).await;
    }
    let after = calls(&servers);
    let delta: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta, [10, 10, 10], "spread again after re-admission");
    client.close().await;
}

#[tokio::test]
async fn a_session_moves_when_its_backend_dies() {
    let mut servers = backends(2, Generation::Legacy).await;
    let client = connect(&servers, Lifecycle::Initialize).await;
    assert_eq!(client.era(), Era::Legacy);
    // A session stays on the backend that created it.
    let home = whoami(&client).await;
    for _ in 0..5 {
        assert_eq!(whoami(&client).await, home);
    }
    let (dead, other) = if home == "b0" { (0, 1) } else { (1, 0) };
    servers[dead].stop().await;
    // The next call is re-established on the other backend, and runs exactly once.
    let before = calls(&servers);
    assert_eq!(whoami(&client).await, format!("b{other}"));
    let after = calls(&servers);
    assert_eq!(after[other], before[other] + 1);
    assert_eq!(after[dead], before[dead]);
    assert!(
        servers[other]
            .counters
            .sessions
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    for _ in 0..3 {
        assert_eq!(whoami(&client).await, format!("b{other}"));
    }
    client.close().await;
}

#[tokio::test]
async fn all_backends_down_is_one_clear_error() {
    let mut servers = backends(2, Generation::Modern).await;
    let client = connect(&servers, Lifecycle::Auto).await;
    for s in servers.iter_mut() {
        s.stop().await;
    }
    let err = client
        .call_tool("whoami", Some(&json!({})))
        .await
        .unwrap_err();
    let mut msg = err.to_string();
    let mut src = std::error::Error::source(&err);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.contains("unavailable") || msg.contains("refused"),
        "{msg}"
    );
    assert_eq!(calls(&servers), [0, 0]);
}

//! TLS end to end: the MCP client over Streamable HTTPS against a loopback MCP server with a
//! certificate from a test CA. A rejected certificate is a one-line error, and is not retried.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mcp_http_server.rs"]
mod mcp_server;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/tls_server.rs"]
mod tls_server;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mcp_server::McpHttpServer;
use pki::{Pki, Validity};
use serde_json::json;
use tls_server::{server_config, ServerOpts};
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::tls::{self, ClientIdentity, TlsOptions, TlsRejection};
use vmcp_mcp::{Client, ClientConfig, ClientError, Lifecycle};

type HttpClient = Client<StreamableHttpTransport<ReqwestClient>>;

async fn connect(url: &str, opts: &TlsOptions) -> Result<HttpClient, ClientError> {
    let tls = tls::client_config(opts).unwrap();
    let http = ReqwestClient::new(
        &ReqwestOptions::default()
            .with_tls(tls)
            .with_proxy_from_env(false),
    )
    .unwrap();
    let transport = StreamableHttpTransport::new(http, HttpConfig::new([url])).unwrap();
    let config = ClientConfig::default()
        .with_lifecycle(Lifecycle::Auto)
        .with_request_timeout(Some(Duration::from_secs(20)));
    Client::connect(transport, config).await
}

async fn whoami(client: &HttpClient) -> String {
    let r = client.call_tool("whoami", Some(&json!({}))).await.unwrap();
    serde_json::to_value(&r.content[0]).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Starts an HTTPS MCP server for `sans`, reachable as `host`.
async fn https_server(
    pki: &Pki,
    ca: &pki::Ca,
    sans: &[&str],
    host: &str,
    validity: Validity,
    client_ca: Option<&pki::Ca>,
) -> McpHttpServer {
    let leaf = ca.server(sans, validity);
    let config = server_config(ServerOpts {
        chain: leaf.chain(),
        key: leaf.key(),
        client_ca: client_ca.map(|c| c.cert_der.clone()),
        tls12_only: false,
    });
    let _ = pki;
    McpHttpServer::start("secure", host, Some(config)).await
}

/// The connection must fail with this TLS rejection, in one line, after one handshake.
async fn assert_rejected(server: &McpHttpServer, opts: &TlsOptions, expected: TlsRejection) {
    let err = match connect(&server.url, opts).await {
        Ok(_) => panic!("connected to {} although TLS should reject it", server.url),
        Err(e) => e,
    };
    assert_eq!(TlsRejection::find(&err), Some(expected.clone()), "{err:?}");
    let line = vmcp_test_support::error_chain(&err);
    assert!(!line.contains('\n'), "{line}");
    // Certificate problems are permanent: no retry, so exactly one handshake reached the server.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        server.counters.tls_failures.load(Ordering::SeqCst),
        1,
        "TLS rejection was retried: {line}"
    );
    assert_eq!(server.counters.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn https_with_the_test_ca_works() {
    let pki = Pki::new();
    let ca = pki.ca("mcp");
    let server = https_server(&pki, &ca, &["localhost"], "localhost", Validity::Good, None).await;
    let client = connect(
        &server.url,
        &TlsOptions::new().with_extra_ca_file(&ca.cert_file),
    )
    .await
    .unwrap();
    assert_eq!(whoami(&client).await, "secure");
    client.close().await;
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn unknown_ca_is_rejected_once() {
    let pki = Pki::new();
    let ca = pki.ca("mcp");
    let server = https_server(&pki, &ca, &["localhost"], "localhost", Validity::Good, None).await;
    assert_rejected(&server, &TlsOptions::new(), TlsRejection::UnknownIssuer).await;
}

#[tokio::test]
async fn wrong_hostname_is_rejected_once() {
    let pki = Pki::new();
    let ca = pki.ca("mcp");
    // The certificate names localhost; the URL says 127.0.0.1.
    let server = https_server(&pki, &ca, &["localhost"], "127.0.0.1", Validity::Good, None).await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_rejected(&server, &opts, TlsRejection::WrongHostname).await;
}

#[tokio::test]
async fn expired_certificate_is_rejected_once() {
    let pki = Pki::new();
    let ca = pki.ca("mcp");
    let server = https_server(
        &pki,
        &ca,
        &["localhost"],
        "localhost",
        Validity::Expired,
        None,
    )
    .await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_rejected(&server, &opts, TlsRejection::Expired).await;
}

#[tokio::test]
async fn mtls_with_and_without_a_client_certificate() {
    let pki = Pki::new();
    let ca = pki.ca("mcp");
    let client_ca = pki.ca("clients");
    let server = https_server(
        &pki,
        &ca,
        &["localhost"],
        "localhost",
        Validity::Good,
        Some(&client_ca),
    )
    .await;

    let id = client_ca.client("agent");
    let with = TlsOptions::new()
        .with_extra_ca_file(&ca.cert_file)
        .with_client_identity(ClientIdentity::new(&id.cert_file, &id.key_file));
    let client = connect(&server.url, &with).await.unwrap();
    assert_eq!(whoami(&client).await, "secure");
    client.close().await;

    let without = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    let err = match connect(&server.url, &without).await {
        Ok(_) => panic!("connected without a client certificate"),
        Err(e) => e,
    };
    assert_eq!(
        TlsRejection::find(&err),
        Some(TlsRejection::ClientCertificateRequired),
        "{err:?}"
    );
    // Not retried either: one failed handshake.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.counters.tls_failures.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn danger_mode_connects_and_warns_on_each_connection() {
    let pki = Pki::new();
    let ca = pki.ca("mcp");
    let server = https_server(
        &pki,
        &ca,
        &["elsewhere.test"],
        "localhost",
        Validity::Expired,
        None,
    )
    .await;
    let warnings = Arc::new(std::sync::Mutex::new(0usize));
    let w = warnings.clone();
    let opts = TlsOptions::new()
        .danger_accept_invalid_certs(true)
        .with_warning_sink(Arc::new(move |_m: &str| *w.lock().unwrap() += 1));
    let client = connect(&server.url, &opts).await.unwrap();
    assert_eq!(whoami(&client).await, "secure");
    client.close().await;
    assert!(*warnings.lock().unwrap() >= 1);
}

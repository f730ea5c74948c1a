//! Streamable HTTPS end to end: the MCP test server behind a TLS front (rustls, a CA made in
//! the test), reached through the whole client stack (reqwest + `tls::client_config`). Good CA,
//! unknown CA (rejected, not retried), wrong host name, expired certificate, mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mcp_server.rs"]
mod mcp_server;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/tls_server.rs"]
mod tls_server;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mcp_server::{McpServer, Options, Speaks};
use pki::{Pki, Validity};
use serde_json::json;
use tls_server::{server_config, ServerOpts};
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::tls::{self, ClientIdentity, RootSource, TlsOptions, TlsRejection};
use vmcp_mcp::{Client, ClientConfig};

/// Terminates TLS and forwards the bytes to `backend`.
struct TlsFront {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn front(opts: ServerOpts, backend: SocketAddr) -> TlsFront {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(opts));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    TlsFront { addr, task }
}

async fn connect(
    url: &str,
    tls: TlsOptions,
) -> Result<Client<StreamableHttpTransport<ReqwestClient>>, vmcp_mcp::ClientError> {
    let config = tls::client_config(&tls).unwrap();
    let http = ReqwestClient::new(
        &ReqwestOptions::default()
            .with_tls(config)
            .with_proxy_from_env(false),
    )
    .unwrap();
    let mut hc = HttpConfig::new([url.to_owned()]);
    hc.retry = hc
        .retry
        .clone()
        .with_backoff(Duration::from_secs(5), 2, Duration::from_secs(10));
    Client::connect(
        StreamableHttpTransport::new(http, hc).unwrap(),
        ClientConfig::default(),
    )
    .await
}

fn strict(ca: &pki::Ca) -> TlsOptions {
    TlsOptions::new()
        .with_roots(RootSource::None)
        .with_extra_ca_file(&ca.cert_file)
}

#[tokio::test]
async fn https_with_the_right_ca_works_and_bad_certificates_are_rejected_at_once() {
    let backend = McpServer::start(Options {
        speaks: Speaks::Modern,
        sse: true,
        ..Options::default()
    })
    .await;
    let pki = Pki::new();
    let ca = pki.ca("good");
    let other = pki.ca("other");
    let leaf = ca.server(&["localhost"], Validity::Good);
    let f = front(
        ServerOpts {
            chain: leaf.chain(),
            key: leaf.key(),
            client_ca: None,
            tls12_only: false,
        },
        backend.addr,
    )
    .await;
    let url = format!("https://localhost:{}/mcp", f.addr.port());

    let c = connect(&url, strict(&ca)).await.unwrap();
    let r = c
        .call_tool("echo", Some(&json!({"message":"tls"})))
        .await
        .unwrap();
    assert_eq!(r.content[0].as_text(), Some("tls@test-server"));

    // Unknown CA: a permanent rejection, so no backoff retries (one would wait >= 5 s; the
    // bound below leaves a loaded machine ample time for the handshakes themselves).
    let t = Instant::now();
    let err = connect(&url, strict(&other)).await.err().unwrap();
    assert_eq!(
        TlsRejection::find(&err),
        Some(TlsRejection::UnknownIssuer),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "not retried: {:?}",
        t.elapsed()
    );

    // Wrong host name: the certificate names localhost, we connect to 127.0.0.1.
    let by_ip = format!("https://127.0.0.1:{}/mcp", f.addr.port());
    let err = connect(&by_ip, strict(&ca)).await.err().unwrap();
    assert_eq!(
        TlsRejection::find(&err),
        Some(TlsRejection::WrongHostname),
        "{err}"
    );
}

#[tokio::test]
async fn expired_certificate_is_rejected() {
    let backend = McpServer::start(Options {
        speaks: Speaks::Modern,
        sse: false,
        ..Options::default()
    })
    .await;
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let leaf = ca.server(&["localhost"], Validity::Expired);
    let f = front(
        ServerOpts {
            chain: leaf.chain(),
            key: leaf.key(),
            client_ca: None,
            tls12_only: false,
        },
        backend.addr,
    )
    .await;
    let err = connect(
        &format!("https://localhost:{}/mcp", f.addr.port()),
        strict(&ca),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        TlsRejection::find(&err),
        Some(TlsRejection::Expired),
        "{err}"
    );
}

#[tokio::test]
async fn mutual_tls() {
    let backend = McpServer::start(Options {
        speaks: Speaks::Legacy,
        sse: true,
        ..Options::default()
    })
    .await;
    let pki = Pki::new();
    let ca = pki.ca("ca");
    let leaf = ca.server(&["localhost"], Validity::Good);
    let client = ca.client("me");
    let f = front(
        ServerOpts {
            chain: leaf.chain(),
            key: leaf.key(),
            client_ca: Some(ca.cert_der.clone()),
            tls12_only: false,
        },
        backend.addr,
    )
    .await;
    let url = format!("https://localhost:{}/mcp", f.addr.port());
    let with_cert =
        strict(&ca).with_client_identity(ClientIdentity::new(&client.cert_file, &client.key_file));
    let c = connect(&url, with_cert).await.unwrap();
    assert_eq!(c.list_tools().await.unwrap().len(), 4);
    // Without a client certificate the server refuses the handshake.
    assert!(connect(&url, strict(&ca)).await.is_err());
}

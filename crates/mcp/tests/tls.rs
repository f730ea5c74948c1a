//! TLS policy against real loopback TLS servers with a CA made in the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/pki.rs"]
mod pki;
#[path = "common/tls_server.rs"]
mod tls_server;

use std::sync::Arc;

use pki::{Pki, Validity};
use rustls::pki_types::ServerName;
use tls_server::{ServerOpts, TlsServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vmcp_mcp::tls::{self, ClientIdentity, RootSource, TlsError, TlsOptions, TlsRejection};

/// Connects to `server` as `name`, sends one line and returns the answer.
async fn talk(server: &TlsServer, name: &str, opts: &TlsOptions) -> Result<String, std::io::Error> {
    let config = tls::client_config(opts).expect("client config");
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::net::TcpStream::connect(server.addr).await?;
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let stream = connector.connect(name, tcp).await?;
    let (r, mut w) = tokio::io::split(stream);
    w.write_all(b"hello\n").await?;
    w.flush().await?;
    let mut line = String::new();
    let n = BufReader::new(r).read_line(&mut line).await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed",
        ));
    }
    Ok(line.trim_end().to_owned())
}

fn rejection(res: Result<String, std::io::Error>) -> TlsRejection {
    let err = res.expect_err("handshake should fail");
    TlsRejection::find(&err).unwrap_or_else(|| panic!("no TLS error in {err:?}"))
}

async fn server_for(pki: &Pki, sans: &[&str], validity: Validity) -> (pki::Ca, TlsServer) {
    let ca = pki.ca("test");
    let leaf = ca.server(sans, validity);
    let server = TlsServer::start(ServerOpts {
        chain: leaf.chain(),
        key: leaf.key(),
        client_ca: None,
        tls12_only: false,
    })
    .await;
    (ca, server)
}

#[tokio::test]
async fn good_ca_is_accepted() {
    let pki = Pki::new();
    let (ca, server) = server_for(&pki, &["localhost"], Validity::Good).await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_eq!(talk(&server, "localhost", &opts).await.unwrap(), "ok hello");
    // The test CA alone (no platform roots) works too.
    let only = TlsOptions::new()
        .with_roots(RootSource::None)
        .with_extra_ca_file(&ca.cert_file);
    assert_eq!(talk(&server, "localhost", &only).await.unwrap(), "ok hello");
}

#[tokio::test]
async fn ip_address_names_are_verified() {
    let pki = Pki::new();
    let (ca, server) = server_for(&pki, &["127.0.0.1"], Validity::Good).await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_eq!(talk(&server, "127.0.0.1", &opts).await.unwrap(), "ok hello");
    assert_eq!(
        rejection(talk(&server, "localhost", &opts).await),
        TlsRejection::WrongHostname
    );
}

#[tokio::test]
async fn unknown_ca_is_rejected() {
    let pki = Pki::new();
    let (_ca, server) = server_for(&pki, &["localhost"], Validity::Good).await;
    let r = rejection(talk(&server, "localhost", &TlsOptions::new()).await);
    assert_eq!(r, TlsRejection::UnknownIssuer);
    assert!(r.is_permanent());
    assert_eq!(
        r.to_string(),
        "TLS: the server certificate is signed by an unknown authority (trust its CA with --ca-file)"
    );
    // Another CA does not help either.
    let other = pki.ca("other");
    let opts = TlsOptions::new().with_extra_ca_file(&other.cert_file);
    assert_eq!(
        rejection(talk(&server, "localhost", &opts).await),
        TlsRejection::UnknownIssuer
    );
    // The bundled public roots do not know the test CA.
    let bundled = TlsOptions::new().with_roots(RootSource::Bundled);
    assert_eq!(
        rejection(talk(&server, "localhost", &bundled).await),
        TlsRejection::UnknownIssuer
    );
}

#[tokio::test]
async fn wrong_hostname_is_rejected() {
    let pki = Pki::new();
    let (ca, server) = server_for(&pki, &["service.test"], Validity::Good).await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_eq!(
        talk(&server, "service.test", &opts).await.unwrap(),
        "ok hello"
    );
    assert_eq!(
        rejection(talk(&server, "localhost", &opts).await),
        TlsRejection::WrongHostname
    );
}

#[tokio::test]
async fn expired_and_future_certificates_are_rejected() {
    let pki = Pki::new();
    let (ca, server) = server_for(&pki, &["localhost"], Validity::Expired).await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_eq!(
        rejection(talk(&server, "localhost", &opts).await),
        TlsRejection::Expired
    );

    let (ca, server) = server_for(&pki, &["localhost"], Validity::NotYetValid).await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_eq!(
        rejection(talk(&server, "localhost", &opts).await),
        TlsRejection::NotValidYet
    );
}

#[tokio::test]
async fn tls12_servers_are_accepted() {
    let pki = Pki::new();
    let ca = pki.ca("t12");
    let leaf = ca.server(&["localhost"], Validity::Good);
    let server = TlsServer::start(ServerOpts {
        chain: leaf.chain(),
        key: leaf.key(),
        client_ca: None,
        tls12_only: true,
    })
    .await;
    let opts = TlsOptions::new().with_extra_ca_file(&ca.cert_file);
    assert_eq!(talk(&server, "localhost", &opts).await.unwrap(), "ok hello");
}

async fn mtls_server(pki: &Pki, tls12_only: bool) -> (pki::Ca, pki::Ca, TlsServer) {
    let server_ca = pki.ca(if tls12_only { "srv12" } else { "srv" });
    let client_ca = pki.ca(if tls12_only { "cli12" } else { "cli" });
    let leaf = server_ca.server(&["localhost"], Validity::Good);
    let server = TlsServer::start(ServerOpts {
        chain: leaf.chain(),
        key: leaf.key(),
        client_ca: Some(client_ca.cert_der.clone()),
        tls12_only,
    })
    .await;
    (server_ca, client_ca, server)
}

#[tokio::test]
async fn mtls_with_client_certificate_succeeds() {
    for tls12_only in [false, true] {
        let pki = Pki::new();
        let (server_ca, client_ca, server) = mtls_server(&pki, tls12_only).await;
        let client = client_ca.client("agent");
        let opts = TlsOptions::new()
            .with_extra_ca_file(&server_ca.cert_file)
            .with_client_identity(ClientIdentity::new(&client.cert_file, &client.key_file));
        assert_eq!(talk(&server, "localhost", &opts).await.unwrap(), "ok hello");
        assert_eq!(server.handshakes.lock().unwrap().as_slice(), &[Ok(())]);
    }
}

#[tokio::test]
async fn mtls_without_client_certificate_is_rejected() {
    for tls12_only in [false, true] {
        let pki = Pki::new();
        let (server_ca, _client_ca, server) = mtls_server(&pki, tls12_only).await;
        let opts = TlsOptions::new().with_extra_ca_file(&server_ca.cert_file);
        // rustls servers send `certificate_required` with TLS 1.3 and 1.2 alike.
        let r = rejection(talk(&server, "localhost", &opts).await);
        assert_eq!(
            r,
            TlsRejection::ClientCertificateRequired,
            "tls12_only={tls12_only}"
        );
        let log = server.handshakes.lock().unwrap().clone();
        assert_eq!(log.len(), 1);
        assert!(log[0].is_err(), "{log:?}");
    }
}

#[tokio::test]
async fn mtls_with_a_certificate_from_another_ca_is_rejected() {
    let pki = Pki::new();
    let (server_ca, _client_ca, server) = mtls_server(&pki, false).await;
    let stranger = pki.ca("stranger").client("mallory");
    let opts = TlsOptions::new()
        .with_extra_ca_file(&server_ca.cert_file)
        .with_client_identity(ClientIdentity::new(&stranger.cert_file, &stranger.key_file));
    assert_eq!(
        rejection(talk(&server, "localhost", &opts).await),
        TlsRejection::ClientCertificateRejected
    );
}

#[tokio::test]
async fn danger_mode_accepts_anything_and_warns_on_every_handshake() {
    let pki = Pki::new();
    let (_ca, server) = server_for(&pki, &["somewhere.else"], Validity::Expired).await;
    let warnings = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = warnings.clone();
    let opts = TlsOptions::new()
        .danger_accept_invalid_certs(true)
        .with_warning_sink(Arc::new(move |m: &str| {
            sink.lock().unwrap().push(m.to_owned())
        }));
    // Unknown CA, expired, wrong name: all accepted, each handshake warns (no resumption).
    let config = tls::client_config(&opts).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (r, mut w) = tokio::io::split(stream);
        w.write_all(b"x\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        assert_eq!(line, "ok x\n");
    }
    let warnings = warnings.lock().unwrap().clone();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].starts_with("WARNING: TLS certificate verification is OFF"));
    assert!(warnings[0].contains("localhost"));
}

#[tokio::test]
async fn danger_mode_with_the_default_sink_still_connects() {
    // With no sink the warning goes to stderr (visible in the test output).
    let pki = Pki::new();
    let (_ca, server) = server_for(&pki, &["localhost"], Validity::Good).await;
    let opts = TlsOptions::new().danger_accept_invalid_certs(true);
    assert_eq!(talk(&server, "localhost", &opts).await.unwrap(), "ok hello");
}

#[test]
fn file_errors_are_clear() {
    let pki = Pki::new();
    let ca = pki.ca("files");
    let a = ca.client("a");
    let b = ca.client("b");
    let not_pem = pki.write("garbage.pem", b"this is not a certificate\n");
    let truncated = pki.write("truncated.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n");
    let d = pki.path().display();

    let err = |opts: TlsOptions| tls::client_config(&opts).unwrap_err();

    let e = err(TlsOptions::new().with_extra_ca_file(&not_pem));
    assert!(matches!(e, TlsError::NoCertificate { .. }));
    assert_eq!(
        e.to_string(),
        format!("CA file {d}/garbage.pem holds no PEM certificate (expected a '-----BEGIN CERTIFICATE-----' block)")
    );

    let e = err(TlsOptions::new().with_extra_ca_file(&truncated));
    assert_eq!(
        e.to_string(),
        format!("CA file {d}/truncated.pem is not valid PEM")
    );

    let e =
        err(TlsOptions::new().with_client_identity(ClientIdentity::new(&a.cert_file, &b.key_file)));
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "client key {} does not match client certificate {}",
            b.key_file.display(),
            a.cert_file.display()
        )
    );

    let e = err(
        TlsOptions::new().with_client_identity(ClientIdentity::new(&a.cert_file, &a.cert_file))
    );
    assert!(matches!(e, TlsError::NoPrivateKey { .. }), "{e:?}");

    let e =
        err(TlsOptions::new().with_client_identity(ClientIdentity::new(&a.key_file, &a.key_file)));
    assert!(
        matches!(
            e,
            TlsError::NoCertificate {
                what: "client certificate",
                ..
            }
        ),
        "{e:?}"
    );

    let e = err(TlsOptions::new().with_client_identity(ClientIdentity::new(
        pki.path().join("missing.pem"),
        &a.key_file,
    )));
    assert_eq!(
        e.to_string(),
        format!("cannot read client certificate {d}/missing.pem")
    );

    let e = err(TlsOptions::new().with_roots(RootSource::None));
    assert!(matches!(e, TlsError::NoRoots));

    // A good identity builds.
    tls::client_config(
        &TlsOptions::new().with_client_identity(ClientIdentity::new(&a.cert_file, &a.key_file)),
    )
    .unwrap();
}

#[test]
fn alpn_is_passed_through() {
    let cfg = tls::client_config(
        &TlsOptions::new().with_alpn_protocols(vec![b"h2".to_vec(), b"http/1.1".to_vec()]),
    )
    .unwrap();
    assert_eq!(
        cfg.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
    let dbg = format!(
        "{:?}",
        TlsOptions::new().with_warning_sink(Arc::new(|_: &str| {}))
    );
    assert!(dbg.contains("warning_sink: Some(\"custom\")"), "{dbg}");
}

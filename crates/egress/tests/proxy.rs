//! The egress proxy end to end, on loopback only, against servers the tests make.
//!
//! Names resolve through an injected resolver; "public" addresses the policy sees are
//! redirected by an injected dialer to the test servers on 127.0.0.1, so the policy is checked
//! exactly as for a real host while no packet leaves the machine. Tests that need the real
//! resolver and dialer list 127.0.0.1 literally.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vmcp_egress::{Dial, Limits, Policy, Proxy, ProxyHandle, Resolve};

struct FakeDns(HashMap<String, Vec<IpAddr>>);

impl Resolve for FakeDns {
    fn resolve(
        &self,
        name: &str,
        _port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>> {
        let r =
            self.0.get(name).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no such name {name}"))
            });
        Box::pin(async move { r })
    }
}

/// Sends connections for "public" addresses to local test servers; refuses the rest so a test
/// notices any connection the policy should not have allowed.
struct Redirect {
    map: HashMap<SocketAddr, SocketAddr>,
    dials: Arc<AtomicUsize>,
}

impl Dial for Redirect {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        self.dials.fetch_add(1, Ordering::SeqCst);
        let to = self.map.get(&addr).copied().unwrap_or(addr);
        Box::pin(TcpStream::connect(to))
    }
}

const PUBLIC: &str = "93.184.216.34";

struct Setup {
    proxy: SocketAddr,
    handle: ProxyHandle,
    dials: Arc<AtomicUsize>,
}

async fn start(
    policy: &str,
    names: &[(&str, &str)],
    redirects: &[(u16, SocketAddr)],
    limits: Limits,
) -> Setup {
    let policy: Policy = policy.parse().unwrap();
    let dns = names
        .iter()
        .map(|(n, a)| {
            (
                n.to_string(),
                a.split(',').map(|a| a.parse().unwrap()).collect(),
            )
        })
        .collect();
    let dials = Arc::new(AtomicUsize::new(0));
    let map = redirects
        .iter()
        .map(|(port, to)| (SocketAddr::new(PUBLIC.parse().unwrap(), *port), *to))
        .collect();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let handle = Proxy::new(policy, limits)
        .with_resolver(Arc::new(FakeDns(dns)))
        .with_dialer(Arc::new(Redirect {
            map,
            dials: Arc::clone(&dials),
        }))
        .spawn(listener);
    Setup {
        proxy,
        handle,
        dials,
    }
}

/// A one-shot-per-connection HTTP server that answers with the request line and Host header.
async fn http_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = Arc::clone(&hits);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let line = head.lines().next().unwrap_or_default().to_string();
                let host = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("host: ")
                            .or_else(|| l.strip_prefix("Host: "))
                    })
                    .unwrap_or_default()
                    .to_string();
                let body = format!("{line}|{host}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, hits)
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => buf.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends `req` to the proxy and returns (status line + headers, body until close).
async fn exchange(proxy: SocketAddr, req: &str) -> (String, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body)).await;
    (head, String::from_utf8_lossy(&body).into_owned())
}

fn status(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

struct Tls {
    addr: SocketAddr,
    got_bytes: Arc<AtomicUsize>,
    client: Arc<rustls::ClientConfig>,
}

/// A TLS server for `name` that answers "hello over tls"; counts bytes it received.
async fn tls_server(name: &str) -> Tls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(AtomicUsize::new(0));
    let g = Arc::clone(&got);
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let g = Arc::clone(&g);
            tokio::spawn(async move {
                let mut peek = [0u8; 1];
                if s.peek(&mut peek).await.unwrap_or(0) > 0 {
                    g.fetch_add(1, Ordering::SeqCst);
                }
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = read_head(&mut tls).await;
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\nConnection: close\r\n\r\nhello over tls")
                        .await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    Tls {
        addr,
        got_bytes: got,
        client: Arc::new(client),
    }
}

async fn connect_tunnel(proxy: SocketAddr, target: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

async fn tls_get(s: TcpStream, sni: &str, client: Arc<rustls::ClientConfig>) -> io::Result<String> {
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = connector.connect(name, s).await?;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn allowed_name_is_reachable_over_connect_and_tls() {
    let tls = tls_server("api.test").await;
    let s = start(
        "api.test:443",
        &[("api.test", PUBLIC)],
        &[(443, tls.addr)],
        Limits::default(),
    )
    .await;
    let (tunnel, head) = connect_tunnel(s.proxy, "api.test:443").await;
    assert_eq!(status(&head), 200, "{head}");
    let out = tls_get(tunnel, "api.test", tls.client).await.unwrap();
    assert!(out.ends_with("hello over tls"), "{out}");
    assert_eq!(s.handle.stats().allowed(), 1);
    assert_eq!(s.handle.stats().denied(), 0);
}

#[tokio::test]
async fn allowed_name_is_reachable_over_plain_http() {
    let (srv, hits) = http_server().await;
    let s = start(
        "api.test:80",
        &[("api.test", PUBLIC)],
        &[(80, srv)],
        Limits::default(),
    )
    .await;
    let (head, body) = exchange(
        s.proxy,
        "GET http://api.test/v1/x?q=1 HTTP/1.1\r\nHost: api.test\r\nProxy-Authorization: Basic eA==\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, "GET /v1/x?q=1 HTTP/1.1|api.test");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn literal_loopback_rule_reaches_a_real_local_server() {
    let (srv, hits) = http_server().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let policy: Policy = format!("127.0.0.1:{}", srv.port()).parse().unwrap();
    let _h = Proxy::new(policy, Limits::default()).spawn(listener);
    let (head, body) = exchange(
        proxy,
        &format!("GET http://{srv}/ HTTP/1.1\r\nHost: {srv}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(body.starts_with("GET / HTTP/1.1|"), "{body}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // Another port on the same address is not open.
    let (head, body) = exchange(
        proxy,
        &format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", srv.port() ^ 1),
    )
    .await;
    assert_eq!(status(&head), 403, "{head}");
    assert!(body.contains("allows another port"), "{body}");
}

#[tokio::test]
async fn other_hosts_private_ranges_and_metadata_are_refused_with_a_reason() {
    let s = start(
        "api.test:443,*",
        &[("other.test", PUBLIC)],
        &[],
        Limits::default(),
    )
    .await;
    // `*` opens any name but no address literal.
    for (req, check, words) in [
        ("CONNECT evil.test:443 HTTP/1.1\r\n\r\n", "no-rule", "cannot resolve"),
        ("CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n", "no-rule", "no rule allows 10.0.0.1:443"),
        ("CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n", "no-rule", "no rule allows 169.254.169.254:80"),
        (
            "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
            "no-rule",
            "no rule allows 169.254.169.254:80",
        ),
    ] {
        let (head, body) = exchange(s.proxy, req).await;
        if words == "cannot resolve" {
            assert_eq!(status(&head), 502, "{head}");
            assert!(body.contains(words), "{body}");
            continue;
        }
        assert_eq!(status(&head), 403, "{req}: {head}");
        assert!(head.to_ascii_lowercase().contains(&format!("x-vmcp-egress-check: {check}")), "{head}");
        assert!(body.contains(words), "{body}");
    }
    assert_eq!(
        s.dials.load(Ordering::SeqCst),
        0,
        "a refused target was dialled"
    );

    // Even a rule for everything public keeps private, loopback and metadata closed.
    let s = start("0.0.0.0/0", &[], &[], Limits::default()).await;
    for t in [
        "10.0.0.1:443",
        "192.168.1.1:80",
        "169.254.169.254:80",
        "127.0.0.1:22",
    ] {
        let (head, body) = exchange(s.proxy, &format!("CONNECT {t} HTTP/1.1\r\n\r\n")).await;
        assert_eq!(status(&head), 403, "{t}: {head}");
        assert!(body.contains("no rule lists it literally"), "{body}");
    }
    assert_eq!(s.dials.load(Ordering::SeqCst), 0);
    let recent = s.handle.recent_denials();
    assert_eq!(recent.len(), 4);
    assert!(recent.iter().all(|d| d.check == "special-address"));
}

#[tokio::test]
async fn a_name_rebound_to_a_private_or_loopback_address_is_refused() {
    // A real server on loopback that the rebinding answer points at: it must see nothing.
    let (srv, hits) = http_server().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let policy: Policy = "api.test".parse().unwrap();
    let dns = HashMap::from([
        ("api.test".to_string(), vec!["127.0.0.1".parse().unwrap()]),
        (
            "meta.api.test".to_string(),
            vec!["169.254.169.254".parse().unwrap()],
        ),
    ]);
    let h = Proxy::new(policy, Limits::default())
        .with_resolver(Arc::new(FakeDns(dns)))
        .spawn(listener);
    let port = srv.port();
    let (head, body) = exchange(proxy, &format!("CONNECT api.test:{port} HTTP/1.1\r\n\r\n")).await;
    assert_eq!(status(&head), 403, "{head}");
    assert!(
        body.contains("resolved to 127.0.0.1, a loopback address"),
        "{body}"
    );
    let (head, _) = exchange(
        proxy,
        &format!("GET http://api.test:{port}/ HTTP/1.1\r\nHost: api.test:{port}\r\n\r\n"),
    )
    .await;
    assert_eq!(status(&head), 403, "{head}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the rebound address was contacted"
    );
    assert_eq!(h.stats().denied(), 2);
}

#[tokio::test]
async fn mixed_answers_use_only_the_public_addresses() {
    let (srv, _) = http_server().await;
    let s = start(
        "api.test:80",
        &[("api.test", &format!("10.0.0.7,{PUBLIC}"))],
        &[(80, srv)],
        Limits::default(),
    )
    .await;
    let (head, _) = exchange(
        s.proxy,
        "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    // The dropped private answer is logged as a refusal of its own.
    let recent = s.handle.recent_denials();
    assert_eq!(recent.len(), 1);
    assert!(recent[0].reason.contains("10.0.0.7"), "{recent:?}");
    assert_eq!(s.dials.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connect_whose_tls_server_name_differs_is_refused_before_any_byte_reaches_the_server() {
    let tls = tls_server("api.test").await;
    let s = start(
        "api.test:443",
        &[("api.test", PUBLIC)],
        &[(443, tls.addr)],
        Limits::default(),
    )
    .await;
    let (tunnel, head) = connect_tunnel(s.proxy, "api.test:443").await;
    assert_eq!(status(&head), 200, "{head}");
    let err = tls_get(tunnel, "evil.test", Arc::clone(&tls.client))
        .await
        .unwrap_err();
    assert!(
        err.to_string().to_ascii_lowercase().contains("access"),
        "{err}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        tls.got_bytes.load(Ordering::SeqCst),
        0,
        "the server saw the ClientHello"
    );
    let recent = s.handle.recent_denials();
    assert_eq!(recent.len(), 1, "{recent:?}");
    assert_eq!(recent[0].check, "sni-mismatch");
    assert!(recent[0].reason.contains("\"evil.test\""), "{recent:?}");
}

#[tokio::test]
async fn host_header_that_differs_from_the_request_line_is_refused() {
    let (srv, hits) = http_server().await;
    let s = start(
        "api.test:80",
        &[("api.test", PUBLIC)],
        &[(80, srv)],
        Limits::default(),
    )
    .await;
    let (head, body) = exchange(
        s.proxy,
        "GET http://api.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 403, "{head}");
    assert!(body.contains("Host header \"evil.test\" differs"), "{body}");
    // Origin-form requests use Host.
    let (head, _) = exchange(s.proxy, "GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n").await;
    assert_eq!(status(&head), 403, "{head}");
    let (head, _) = exchange(
        s.proxy,
        "GET https://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 403, "{head}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn oversized_heads_and_too_many_connections_are_bounded() {
    let mut limits = Limits::default();
    limits.max_connections = 2;
    limits.max_header_bytes = 8192;
    let s = start("api.test", &[], &[], limits).await;
    // A head larger than the bound gets an error status, not unbounded buffering.
    let big = format!(
        "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut c = TcpStream::connect(s.proxy).await.unwrap();
    let _ = c.write_all(big.as_bytes()).await;
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut c))
        .await
        .unwrap();
    assert!(
        head.is_empty() || status(&head) == 431 || status(&head) == 400,
        "{head}"
    );
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Two idle connections take both slots; the third is told why and closed.
    let a = TcpStream::connect(s.proxy).await.unwrap();
    let b = TcpStream::connect(s.proxy).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (head, body) = exchange(
        s.proxy,
        "GET http://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n",
    )
    .await;
    assert_eq!(status(&head), 503, "{head}");
    assert!(body.contains("too many connections (at most 2"), "{body}");
    drop((a, b));
}

#[tokio::test]
async fn idle_and_slow_clients_are_closed() {
    let mut limits = Limits::default();
    limits.header_timeout = Duration::from_millis(300);
    limits.idle_timeout = Duration::from_millis(600);
    limits.first_bytes_wait = Duration::from_millis(100);
    let (srv, _) = http_server().await;
    let s = start("api.test", &[("api.test", PUBLIC)], &[(80, srv)], limits).await;
    // A client that never finishes its head.
    let mut slow = TcpStream::connect(s.proxy).await.unwrap();
    slow.write_all(b"GET http://api.test/ HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "slow head not closed");
    // A silent tunnel: spliced after first_bytes_wait, closed after idle_timeout.
    let (mut t, head) = connect_tunnel(s.proxy, "api.test:80").await;
    assert_eq!(status(&head), 200, "{head}");
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "idle tunnel not closed");
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn dropping_the_handle_closes_open_tunnels() {
    let tls = tls_server("api.test").await;
    let s = start(
        "api.test:443",
        &[("api.test", PUBLIC)],
        &[(443, tls.addr)],
        Limits::default(),
    )
    .await;
    let (mut tunnel, head) = connect_tunnel(s.proxy, "api.test:443").await;
    assert_eq!(status(&head), 200, "{head}");
    drop(s.handle);
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "tunnel survived the proxy");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(s.proxy).await.is_err(),
        "listener survived the proxy"
    );
}

/// A gate that approves `yes.test`, refuses `no.test` with a reason, approves `later.test`
/// and refuses `nolater.test` after 300 ms, never answers for the rest, and counts how often
/// it was asked.
struct TestGate(Arc<AtomicUsize>);

impl vmcp_egress::Gate for TestGate {
    fn decide(
        &self,
        target: &vmcp_egress::Target,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        let host = target.host.to_string();
        Box::pin(async move {
            match host.as_str() {
                "yes.test" | "10.0.0.1" => Ok(()),
                "no.test" => Err("denied by policy rule 2 (host = \"no.*\")".into()),
                "later.test" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(())
                }
                "nolater.test" => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Err("a person said no".into())
                }
                _ => std::future::pending().await,
            }
        })
    }
}

#[tokio::test]
async fn the_gate_decides_targets_off_the_allow_list_within_a_bounded_wait() {
    let (srv, hits) = http_server().await;
    let mut limits = Limits::default();
    limits.gate_timeout = Duration::from_millis(300);
    let asked = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let dns = [
        ("yes.test", PUBLIC),
        ("no.test", PUBLIC),
        ("slow.test", PUBLIC),
    ]
    .iter()
    .map(|(n, a)| (n.to_string(), vec![a.parse().unwrap()]))
    .collect();
    let _h = Proxy::new("api.test:80".parse().unwrap(), limits)
        .with_resolver(Arc::new(FakeDns(dns)))
        .with_dialer(Arc::new(Redirect {
            map: [(SocketAddr::new(PUBLIC.parse().unwrap(), 80), srv)].into(),
            dials: Arc::new(AtomicUsize::new(0)),
        }))
        .with_gate(Arc::new(TestGate(asked.clone())))
        .spawn(listener);
    let get = |host: &str| {
        format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    // Approved: goes through, and the approval is remembered (asked once for two requests).
    for _ in 0..2 {
        let (head, body) = exchange(proxy, &get("yes.test")).await;
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, "GET / HTTP/1.1|yes.test");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    // Refused with the gate's reason.
    let (head, body) = exchange(proxy, &get("no.test")).await;
    assert_eq!(status(&head), 403, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-vmcp-egress-check: approval"),
        "{head}"
    );
    assert!(
        body.contains("was not approved: denied by policy rule 2"),
        "{body}"
    );
    // No answer: refused after the bounded wait.
    let started = std::time::Instant::now();
    let (head, body) = exchange(proxy, "CONNECT slow.test:443 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&head), 403, "{head}");
    assert!(body.contains("no decision within"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // An approved special address stays closed: approval is not a literal rule.
    let (head, body) = exchange(proxy, "CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status(&head), 403, "{head}");
    assert!(body.contains("no rule lists it literally"), "{body}");
    // Targets on the allow list never reach the gate.
    let before = asked.load(Ordering::SeqCst);
    let _ = exchange(proxy, &get("api.test")).await;
    assert_eq!(asked.load(Ordering::SeqCst), before);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

/// Many connections to one target the gate is still deciding about make one question, not
/// one each (a guest retrying or opening parallel connections must not flood a person with
/// the same question); all of them get its answer.
#[tokio::test]
async fn concurrent_connections_to_one_target_make_one_question() {
    let (srv, hits) = http_server().await;
    let asked = Arc::new(AtomicUsize::new(0));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let dns = [("later.test", PUBLIC), ("nolater.test", PUBLIC)]
        .iter()
        .map(|(n, a)| (n.to_string(), vec![a.parse().unwrap()]))
        .collect();
    let _h = Proxy::new("api.test:80".parse().unwrap(), Limits::default())
        .with_resolver(Arc::new(FakeDns(dns)))
        .with_dialer(Arc::new(Redirect {
            map: [(SocketAddr::new(PUBLIC.parse().unwrap(), 80), srv)].into(),
            dials: Arc::new(AtomicUsize::new(0)),
        }))
        .with_gate(Arc::new(TestGate(asked.clone())))
        .spawn(listener);
    for (host, want) in [("later.test", 200), ("nolater.test", 403)] {
        let before = asked.load(Ordering::SeqCst);
        let req =
            format!("GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let all = (0..5).map(|_| {
            let req = req.clone();
            tokio::spawn(async move { exchange(proxy, &req).await })
        });
        for t in all.collect::<Vec<_>>() {
            let (head, body) = t.await.unwrap();
            assert_eq!(status(&head), want, "{host}: {head}{body}");
        }
        assert_eq!(
            asked.load(Ordering::SeqCst) - before,
            1,
            "{host}: asked more than once"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 5);
}

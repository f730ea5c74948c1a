//! The relay (`vmcp mcp wrap --http` without the VM): Streamable HTTP outside, one stdio
//! server per session inside (here our own server over in-memory pipes), driven by our
//! client and by raw requests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{eventually, Counters, Fake};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use vmcp_mcp::http::{
    HttpConfig as ClientHttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport,
};
use vmcp_mcp::{Client, ClientConfig, Lifecycle};
use vmcp_mcp_server::http::relay::{BoxFuture, Pipe, Upstream};
use vmcp_mcp_server::http::{HttpConfig, HttpServer};
use vmcp_mcp_server::{Server, ServerConfig};

/// Starts our fake tool server on in-memory pipes for each session; counts opens and ends.
#[derive(Default)]
struct Fakes {
    opened: AtomicUsize,
    ended: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    /// Servers that write this line first (tests of hostile output).
    prelude: Option<Vec<u8>>,
}

struct Up(Arc<Fakes>);

impl Upstream for Up {
    fn open(&self) -> BoxFuture<Result<Pipe, String>> {
        let me = self.0.clone();
        Box::pin(async move {
            me.opened.fetch_add(1, Ordering::SeqCst);
            let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(16);
            let (out_tx, out_rx) = mpsc::channel::<Bytes>(16);
            let (mut stdin_w, stdin_r) = tokio::io::duplex(1 << 16);
            let (stdout_w, mut stdout_r) = tokio::io::duplex(1 << 16);
            let server = Server::new(Fake(me.counters.clone()), ServerConfig::default()).unwrap();
            let ended = me.ended.clone();
            tokio::spawn(async move {
                let _ =
                    vmcp_mcp_server::stdio::serve(&server, stdin_r, stdout_w, &Default::default())
                        .await;
                ended.fetch_add(1, Ordering::SeqCst);
            });
            tokio::spawn(async move {
                while let Some(line) = in_rx.recv().await {
                    if stdin_w.write_all(&line).await.is_err() {
                        return;
                    }
                }
                // The relay dropped the session: close the server's stdin.
            });
            let prelude = me.prelude.clone();
            tokio::spawn(async move {
                if let Some(p) = prelude {
                    if out_tx.send(Bytes::from(p)).await.is_err() {
                        return;
                    }
                }
                let mut buf = vec![0u8; 4096];
                loop {
                    match stdout_r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if out_tx
                                .send(Bytes::copy_from_slice(&buf[..n]))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
            Ok(Pipe {
                input: in_tx,
                output: out_rx,
            })
        })
    }
}

struct Running {
    addr: SocketAddr,
    fakes: Arc<Fakes>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}/mcp", self.addr)
    }
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn start(fakes: Fakes, tweak: impl FnOnce(&mut HttpConfig)) -> Running {
    let fakes = Arc::new(fakes);
    let mut config = HttpConfig::new("127.0.0.1:0".parse().unwrap());
    tweak(&mut config);
    let http = HttpServer::bind(config).await.unwrap();
    let addr = http.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let upstream: Arc<dyn Upstream> = Arc::new(Up(fakes.clone()));
    let task = tokio::spawn(http.relay(upstream, async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        fakes,
        stop: Some(tx),
        task,
    }
}

async fn client(url: &str) -> Client<StreamableHttpTransport<ReqwestClient>> {
    let http = ReqwestClient::new(&ReqwestOptions::default()).unwrap();
    let t = StreamableHttpTransport::new(http, ClientHttpConfig::new([url.to_owned()])).unwrap();
    Client::connect(
        t,
        ClientConfig::default().with_lifecycle(Lifecycle::Initialize),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn each_session_gets_its_own_server_and_ends_it() {
    let s = start(Fakes::default(), |_| {}).await;
    let a = client(&s.url()).await;
    let b = client(&s.url()).await;
    assert_eq!(s.fakes.opened.load(Ordering::SeqCst), 2);
    let tools = a.list_tools().await.unwrap();
    assert_eq!(
        tools.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["add", "slow"]
    );
    let r = b
        .call_tool("add", Some(&json!({"a": 2, "b": 3})))
        .await
        .unwrap();
    assert_eq!(r.structured_content.unwrap()["sum"], 5);
    a.ping().await.unwrap();
    // Progress from the server travels on the SSE answer of its call.
    common::slow_call_reports_progress(&a).await;
    // Closing a client (DELETE) ends its server only.
    a.close().await;
    eventually("a's server ended", || {
        s.fakes.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    let r = b
        .call_tool("add", Some(&json!({"a": 1, "b": 1})))
        .await
        .unwrap();
    assert_eq!(r.structured_content.unwrap()["sum"], 2);
    // Stopping the relay ends the rest.
    let fakes = s.fakes.clone();
    s.stop().await;
    eventually("b's server ended", || {
        fakes.ended.load(Ordering::SeqCst) == 2
    })
    .await;
}

/// One raw POST; returns status, headers and body.
async fn post(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json, text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(20), c.read_to_string(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no answer to {body}"))
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#;

#[tokio::test]
async fn raw_requests_the_guards_and_the_generations() {
    let s = start(Fakes::default(), |c| c.token = Some("s3cret".into())).await;
    let auth = ("authorization", "Bearer s3cret");
    // The shared front: token and Host checks.
    let (st, _, _) = post(s.addr, &[], INIT).await;
    assert_eq!(st, 401);
    let (st, _, body) = post(s.addr, &[auth, ("origin", "http://evil.example")], INIT).await;
    assert_eq!(st, 403, "{body}");
    assert_eq!(
        s.fakes.opened.load(Ordering::SeqCst),
        0,
        "no server for refused requests"
    );
    // Stateless requests have no session to tie a server to.
    let (st, _, body) = post(
        s.addr,
        &[
            auth,
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/list"),
        ],
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await;
    assert_eq!(st, 400);
    assert!(body.contains("session-based"), "{body}");
    // Not initialize and no session.
    let (st, _, _) = post(
        s.addr,
        &[auth],
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#,
    )
    .await;
    assert_eq!(st, 400);
    // A pretty-printed body (spans lines) is re-encoded onto one line for the server.
    let pretty =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(INIT).unwrap()).unwrap();
    let (st, head, body) = post(s.addr, &[auth], &pretty).await;
    assert_eq!(st, 200, "{body}");
    let sid = head
        .lines()
        .find_map(|l| l.strip_prefix("mcp-session-id: "))
        .unwrap()
        .trim()
        .to_owned();
    assert!(body.contains("\"serverInfo\""), "{body}");
    let h = [
        auth,
        ("mcp-session-id", sid.as_str()),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    let (st, _, _) = post(
        s.addr,
        &h,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await;
    assert_eq!(st, 202);
    let (st, _, body) = post(
        s.addr,
        &h,
        r#"{"jsonrpc":"2.0","id":"x","method":"tools/list"}"#,
    )
    .await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], "x");
    assert_eq!(v["result"]["tools"][0]["name"], "add");
    // An unknown session: 404, so the client initializes again.
    let bad = [auth, ("mcp-session-id", "nope")];
    let (st, _, _) = post(s.addr, &bad, r#"{"jsonrpc":"2.0","id":2,"method":"ping"}"#).await;
    assert_eq!(st, 404);
    s.stop().await;
}

#[tokio::test]
async fn a_server_line_over_the_limit_ends_the_session() {
    // 64 KiB without a newline, against a 16 KiB line limit.
    let fakes = Fakes {
        prelude: Some(vec![b'x'; 64 << 10]),
        ..Fakes::default()
    };
    let s = start(fakes, |c| c.max_body = 16 << 10).await;
    let (st, _, body) = post(s.addr, &[], INIT).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("size limit"), "{body}");
    assert!(body.contains("\"error\""), "{body}");
    eventually("the server was told to stop", || {
        s.fakes.ended.load(Ordering::SeqCst) == 1
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn a_dropped_call_is_cancelled_at_the_server() {
    let s = start(Fakes::default(), |_| {}).await;
    let (_, head, _) = post(s.addr, &[], INIT).await;
    let sid = head
        .lines()
        .find_map(|l| l.strip_prefix("mcp-session-id: "))
        .unwrap()
        .trim()
        .to_owned();
    let body = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"slow","arguments":{"ms":60000}}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\naccept: application/json\r\nmcp-session-id: {sid}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(c);
    eventually("the slow call was cancelled", || {
        s.fakes.counters.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    s.stop().await;
}

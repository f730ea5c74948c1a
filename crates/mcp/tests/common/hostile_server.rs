//! A scriptable loopback HTTP/1.1 server for hostile-peer tests: the test gives one async
//! handler that sees every request (method, headers, JSON body) and writes whatever bytes it
//! likes on the connection (one request per connection, `Connection: close`). Helpers answer
//! the legacy handshake so a handler only scripts the misbehaviour it is about.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The body as JSON, if it is.
    pub json: Value,
}

impl Req {
    /// The JSON-RPC method of the body, or "" (GET, DELETE, responses).
    pub fn rpc(&self) -> &str {
        self.json
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn id(&self) -> Value {
        self.json.get("id").cloned().unwrap_or(Value::Null)
    }
}

/// The connection, for the handler to answer on.
pub struct Conn {
    pub stream: TcpStream,
}

impl Conn {
    /// A full response with a body.
    pub async fn respond(&mut self, status: u16, headers: &[(&str, &str)], body: &[u8]) {
        let mut head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = self.stream.write_all(head.as_bytes()).await;
        let _ = self.stream.write_all(body).await;
        let _ = self.stream.flush().await;
    }

    /// A JSON body with status 200.
    pub async fn json(&mut self, v: &Value) {
        self.respond(
            200,
            &[("Content-Type", "application/json")],
            v.to_string().as_bytes(),
        )
        .await;
    }

    /// 202 Accepted, no body.
    pub async fn accepted(&mut self) {
        self.respond(202, &[], b"").await;
    }

    /// Starts an SSE response (no length: the body ends when the connection closes).
    pub async fn sse_start(&mut self) {
        let head =
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
        let _ = self.stream.write_all(head.as_bytes()).await;
    }

    /// Writes raw bytes; false when the peer is gone.
    pub async fn write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }

    /// Writes one SSE event with this JSON data.
    pub async fn event(&mut self, v: &Value) -> bool {
        self.write(format!("data: {v}\n\n").as_bytes()).await
    }
}

pub type Handler =
    Arc<dyn Fn(Req, Conn, Arc<Stats>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the server saw.
#[derive(Default)]
pub struct Stats {
    /// Requests per JSON-RPC method ("GET", "DELETE" for those HTTP methods, "response" for
    /// JSON-RPC responses).
    pub by_method: Mutex<HashMap<String, usize>>,
    /// Requests being handled now, and the most at once.
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Every request's headers, in order.
    pub headers: Mutex<Vec<HashMap<String, String>>>,
}

impl Stats {
    pub fn count(&self, method: &str) -> usize {
        self.by_method
            .lock()
            .unwrap()
            .get(method)
            .copied()
            .unwrap_or(0)
    }
    pub fn total(&self) -> usize {
        self.by_method.lock().unwrap().values().sum()
    }
}

pub struct HostileServer {
    pub addr: SocketAddr,
    pub url: String,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostileServer {
    pub async fn start(handler: Handler) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let handler = handler.clone();
                let st = st.clone();
                conns.spawn(async move {
                    let mut r = BufReader::new(tcp);
                    let Some(req) = read_request(&mut r).await else {
                        return;
                    };
                    let key = match (req.method.as_str(), req.rpc()) {
                        ("GET", _) => "GET".to_owned(),
                        ("DELETE", _) => "DELETE".to_owned(),
                        (_, "") => "response".to_owned(),
                        (_, m) => m.to_owned(),
                    };
                    *st.by_method.lock().unwrap().entry(key).or_default() += 1;
                    st.headers.lock().unwrap().push(req.headers.clone());
                    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
                    handler(
                        req,
                        Conn {
                            stream: r.into_inner(),
                        },
                        st.clone(),
                    )
                    .await;
                    st.in_flight.fetch_sub(1, Ordering::SeqCst);
                });
                while conns.try_join_next().is_some() {}
            }
        });
        HostileServer {
            addr,
            url: format!("http://127.0.0.1:{}/mcp", addr.port()),
            stats,
            task,
        }
    }
}

/// Makes a [`Handler`] from an async closure.
#[macro_export]
macro_rules! handler {
    (|$req:ident, $conn:ident, $stats:ident| $body:expr) => {
        std::sync::Arc::new(
            move |$req: $crate::hostile_server::Req,
                  mut $conn: $crate::hostile_server::Conn,
                  $stats: std::sync::Arc<$crate::hostile_server::Stats>| {
                let _ = &$stats;
                Box::pin(async move {
                    let _ = &mut $conn;
                    $body
                }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
            },
        ) as $crate::hostile_server::Handler
    };
}

/// Answers the legacy handshake, notifications, responses, GET (405) and DELETE; returns
/// false when the request is something else, for the handler to script.
pub async fn handshake(req: &Req, conn: &mut Conn) -> bool {
    match (req.method.as_str(), req.rpc()) {
        ("GET", _) => conn.respond(405, &[], b"").await,
        ("DELETE", _) => conn.respond(200, &[], b"").await,
        (_, "server/discover") => conn.respond(400, &[], b"unknown method").await,
        (_, "initialize") => {
            let body = json!({"jsonrpc":"2.0","id":req.id(),"result":{
                "protocolVersion":"2025-11-25","capabilities":{"tools":{}},
                "serverInfo":{"name":"hostile","version":"1"}}});
            conn.respond(
                200,
                &[
                    ("Content-Type", "application/json"),
                    ("Mcp-Session-Id", "s1"),
                ],
                body.to_string().as_bytes(),
            )
            .await
        }
        (_, "") => conn.accepted().await,
        (_, m) if m.starts_with("notifications/") => conn.accepted().await,
        _ => return false,
    }
    true
}

async fn read_request(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    r.read_line(&mut line).await.ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(Req {
        method,
        path,
        headers,
        body,
        json,
    })
}

//! A small session-based (2025-xx) Streamable HTTP MCP server for tests, over plain HTTP or
//! TLS, on a fixed loopback port that can be stopped and restarted: `initialize` (with an
//! `Mcp-Session-Id`), `ping`, `tools/list` (one tool, `whoami`), `tools/call` (answers the
//! server's name and counts the call), JSON responses, 202 for notifications, 405 for the GET
//! stream, 200 for DELETE. `server/discover` gets a 400, as from a server that predates it,
//! unless the server is started as [`Generation::Modern`] (2026-07-28: `server/discover`
//! answered, no sessions, no `ping`).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::ServerConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    Legacy,
    Modern,
}

/// What the server does with the next scripted POST (see [`McpHttpServer::script`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer with this status (and Retry-After) without processing the request.
    Status(u16, Option<String>),
    /// Process the request (a tools/call counts), then close without answering.
    ProcessThenClose,
    /// Close the connection without reading the body or answering.
    CloseBeforeBody,
    /// Read the request and never answer.
    Hang,
}

#[derive(Default)]
pub struct Counters {
    pub calls: AtomicUsize,
    pub requests: AtomicUsize,
    pub sessions: AtomicUsize,
    pub tls_failures: AtomicUsize,
    /// Actions for the next POSTs whose JSON-RPC method is `script_method`.
    pub script: std::sync::Mutex<std::collections::VecDeque<Action>>,
    pub script_method: std::sync::Mutex<String>,
}

pub struct McpHttpServer {
    pub name: String,
    pub addr: SocketAddr,
    pub url: String,
    pub counters: Arc<Counters>,
    tls: Option<Arc<ServerConfig>>,
    generation: Generation,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl McpHttpServer {
    /// Starts on 127.0.0.1 (plain HTTP when `tls` is None). `host` is the name in the URL.
    pub async fn start(name: &str, host: &str, tls: Option<Arc<ServerConfig>>) -> Self {
        Self::start_gen(name, host, tls, Generation::Legacy).await
    }

    /// Like [`Self::start`], speaking the given protocol generation.
    pub async fn start_gen(
        name: &str,
        host: &str,
        tls: Option<Arc<ServerConfig>>,
        generation: Generation,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut s = Self {
            name: name.to_owned(),
            addr,
            url: format!("{scheme}://{host}:{}/mcp", addr.port()),
            counters: Arc::new(Counters::default()),
            tls,
            generation,
            task: None,
        };
        s.serve(listener);
        s
    }

    /// The next POSTs of `method` get these actions, in order; later ones are served normally.
    pub fn script(&self, method: &str, actions: Vec<Action>) {
        *self.counters.script_method.lock().unwrap() = method.to_owned();
        *self.counters.script.lock().unwrap() = actions.into();
    }

    pub fn calls(&self) -> usize {
        self.counters.calls.load(Ordering::SeqCst)
    }

    fn serve(&mut self, listener: TcpListener) {
        let counters = self.counters.clone();
        let name = self.name.clone();
        let generation = self.generation;
        let acceptor = self.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let counters = counters.clone();
                let name = name.clone();
                let acceptor = acceptor.clone();
                // Connections live in the JoinSet, so stopping the server drops them too.
                conns.spawn(async move {
                    match acceptor {
                        None => serve_conn(tcp, &name, generation, &counters).await,
                        Some(a) => match a.accept(tcp).await {
                            Ok(tls) => serve_conn(tls, &name, generation, &counters).await,
                            Err(_) => {
                                counters.tls_failures.fetch_add(1, Ordering::SeqCst);
                            }
                        },
                    }
                });
            }
        }));
    }

    /// Stops listening and drops every open connection.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for McpHttpServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    name: &str,
    generation: Generation,
    counters: &Counters,
) {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let method = line.split_whitespace().next().unwrap_or("").to_owned();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        if method == "POST" {
            let mut script = counters.script.lock().unwrap();
            if script.front() == Some(&Action::CloseBeforeBody) {
                script.pop_front();
                return;
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        counters.requests.fetch_add(1, Ordering::SeqCst);
        let action = if method == "POST" {
            let rpc = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["method"].as_str().map(str::to_owned))
                .unwrap_or_default();
            if *counters.script_method.lock().unwrap() == rpc {
                counters.script.lock().unwrap().pop_front()
            } else {
                None
            }
        } else {
            None
        };
        let (status, headers, payload) = match (method.as_str(), action) {
            (_, Some(Action::Status(code, retry_after))) => (
                code,
                retry_after
                    .map(|r| format!("retry-after: {r}\r\n"))
                    .unwrap_or_default(),
                String::new(),
            ),
            (_, Some(Action::ProcessThenClose)) => {
                let _ = answer(&body, name, generation, counters);
                return;
            }
            (_, Some(Action::Hang)) => {
                std::future::pending::<()>().await;
                return;
            }
            ("POST", _) => answer(&body, name, generation, counters),
            ("DELETE", _) => (200, String::new(), String::new()),
            _ => (405, String::new(), String::new()),
        };
        let reason = match status {
            200 => "OK",
            202 => "Accepted",
            400 => "Bad Request",
            429 => "Too Many Requests",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "Method Not Allowed",
        };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\n{headers}{}\r\n{payload}",
            payload.len(),
            if payload.is_empty() {
                ""
            } else {
                "content-type: application/json\r\n"
            }
        );
        if w.write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn answer(
    body: &[u8],
    name: &str,
    generation: Generation,
    counters: &Counters,
) -> (u16, String, String) {
    let Ok(msg) = serde_json::from_slice::<Value>(body) else {
        return (400, String::new(), String::new());
    };
    let Some(id) = msg.get("id").cloned() else {
        return (202, String::new(), String::new()); // notification or response
    };
    let ok = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string();
    let modern = generation == Generation::Modern;
    match msg["method"].as_str().unwrap_or("") {
        "server/discover" if modern => (
            200,
            String::new(),
            ok(json!({
                "supportedVersions": ["2026-07-28"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": name, "version": "1.0.0"}
            })),
        ),
        "initialize" if !modern => {
            let n = counters.sessions.fetch_add(1, Ordering::SeqCst);
            let version = msg["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18");
            (
                200,
                format!("mcp-session-id: {name}-{n}\r\n"),
                ok(json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": name, "version": "1.0.0"}
                })),
            )
        }
        "ping" if !modern => (200, String::new(), ok(json!({}))),
        "tools/list" => (
            200,
            String::new(),
            ok(json!({"tools": [{"name": "whoami", "inputSchema": {"type": "object"}}]})),
        ),
        "tools/call" => {
            counters.calls.fetch_add(1, Ordering::SeqCst);
            (
                200,
                String::new(),
                ok(json!({"content": [{"type": "text", "text": name}]})),
            )
        }
        _ => (
            400,
            String::new(),
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "Method not found"}})
                .to_string(),
        ),
    }
}

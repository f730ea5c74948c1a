//! A real loopback MCP server over HTTP/1.1 for the transport tests, written by hand on
//! tokio so that every byte, delay and connection reset is under the test's control.
//!
//! Speaks the legacy session protocol (initialize, `Mcp-Session-Id`, GET stream, DELETE),
//! the 2026-07-28 stateless protocol (`server/discover`, header checks), or both, answering
//! with JSON or multi-event SSE. Faults can be queued for the next POSTs: HTTP statuses with
//! `Retry-After`, resets before reading or after executing, delays, session expiry, an SSE
//! stream that drops after its first event (to be resumed with `Last-Event-ID`).
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Which protocol generations the server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speaks {
    Legacy,
    Modern,
    Both,
}

/// A fault for one POST.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status (and Retry-After seconds) without processing.
    Status(u16, Option<u64>),
    /// Close the connection (RST) before reading the request.
    ResetBeforeRead,
    /// Read and execute the request, then close the connection (RST) without answering.
    ResetAfterExecute,
    /// Wait this long before answering.
    Delay(Duration),
    /// Forget every session, then handle the request (-> 404).
    ExpireSessions,
    /// Send the SSE priming event, then close the stream; the answer is kept for a GET with
    /// `Last-Event-ID`.
    DropAfterPriming,
    /// Send the SSE answer, then keep the stream open for 30 s.
    KeepOpen,
}

/// One recorded HTTP request.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

pub struct Options {
    pub speaks: Speaks,
    /// Answer requests with SSE (else JSON).
    pub sse: bool,
    /// Offer the GET stream (legacy).
    pub get_stream: bool,
    pub name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            speaks: Speaks::Legacy,
            sse: true,
            get_stream: true,
            name: "test-server".into(),
        }
    }
}

pub struct State {
    pub opts: Options,
    /// tools/call executions.
    pub calls: AtomicUsize,
    pub requests: Mutex<Vec<Recorded>>,
    faults: Mutex<VecDeque<(Option<String>, Fault)>>,
    sessions: Mutex<HashSet<String>>,
    next_session: AtomicUsize,
    /// Answers the client sent to our server->client requests, by id.
    answers: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// Answers withheld by DropAfterPriming, by event id.
    parked: Mutex<HashMap<String, String>>,
    pub deletes: AtomicUsize,
    pub gets: AtomicUsize,
}

pub struct McpServer {
    pub url: String,
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for McpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl McpServer {
    pub async fn start(opts: Options) -> McpServer {
        Self::start_on("127.0.0.1:0", opts).await
    }

    pub async fn start_on(addr: &str, opts: Options) -> McpServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            opts,
            calls: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(VecDeque::new()),
            sessions: Mutex::new(HashSet::new()),
            next_session: AtomicUsize::new(1),
            answers: Mutex::new(HashMap::new()),
            parked: Mutex::new(HashMap::new()),
            deletes: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            let mut conns = Vec::new();
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let _ = sock.set_nodelay(true);
                let st = st.clone();
                conns.push(AbortOnDrop(tokio::spawn(
                    async move { serve(sock, st).await },
                )));
            }
        });
        McpServer {
            url: format!("http://{addr}/mcp"),
            addr,
            state,
            task,
        }
    }

    /// Queues a fault for the next POST (whose JSON-RPC method is `method`, if given).
    pub fn fault(&self, method: Option<&str>, fault: Fault) {
        self.state
            .faults
            .lock()
            .unwrap()
            .push_back((method.map(str::to_owned), fault));
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    /// POST bodies' JSON-RPC methods, in order.
    pub fn methods(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.body["method"].as_str().unwrap_or("<response>").to_owned())
            .collect()
    }

    pub fn expire_sessions(&self) {
        self.state.sessions.lock().unwrap().clear();
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Req {
    method: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut line = String::new();
    if r.read_line(&mut line).await.ok()? == 0 {
        return None;
    }
    let method = line.split_whitespace().next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).await.ok()?;
    Some(Req {
        method,
        headers,
        body,
    })
}

fn reset(sock: TcpStream) {
    // SO_LINGER 0: close sends RST.
    #[allow(deprecated)] // blocking on drop is harmless with a zero linger
    let _ = sock.set_linger(Some(Duration::ZERO));
    drop(sock);
}

async fn serve(sock: TcpStream, st: Arc<State>) {
    let mut r = BufReader::new(sock);
    loop {
        // Wait for the next request's first bytes; a queued ResetBeforeRead then resets the
        // connection with the request unread.
        match r.fill_buf().await {
            Ok([]) | Err(_) => return,
            Ok(_) => {}
        }
        {
            let mut f = st.faults.lock().unwrap();
            if matches!(f.front(), Some((None, Fault::ResetBeforeRead))) {
                f.pop_front();
                drop(f);
                reset(r.into_inner());
                return;
            }
        }
        let Some(req) = read_request(&mut r).await else {
            return;
        };
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        st.requests.lock().unwrap().push(Recorded {
            method: req.method.clone(),
            headers: req.headers.clone(),
            body: body.clone(),
        });
        let keep = match req.method.as_str() {
            "POST" => {
                let mut reset_now = false;
                let keep = post(&mut r, &st, &req, body, &mut reset_now).await;
                if reset_now {
                    reset(r.into_inner());
                    return;
                }
                keep
            }
            "GET" => get(&mut r, &st, &req).await,
            "DELETE" => {
                st.deletes.fetch_add(1, Ordering::SeqCst);
                if let Some(s) = req.headers.get("mcp-session-id") {
                    st.sessions.lock().unwrap().remove(s);
                }
                write_simple(&mut r, 200, &[], "").await
            }
            _ => write_simple(&mut r, 405, &[], "").await,
        };
        if !keep {
            return;
        }
    }
}

async fn write_simple(
    r: &mut BufReader<TcpStream>,
    status: u16,
    headers: &[(&str, String)],
    body: &str,
) -> bool {
    let mut head = format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str("content-type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(body);
    r.get_mut().write_all(head.as_bytes()).await.is_ok()
}

async fn sse_head(r: &mut BufReader<TcpStream>, headers: &[(&str, String)]) -> bool {
    let mut head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            .to_owned();
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    r.get_mut().write_all(head.as_bytes()).await.is_ok()
}

async fn sse_event(r: &mut BufReader<TcpStream>, id: Option<&str>, data: &str) -> bool {
    let mut ev = String::new();
    if let Some(id) = id {
        ev.push_str(&format!("id: {id}\n"));
    }
    // Multi-line data exercises the parser's joining.
    for line in data.split('\n') {
        ev.push_str(&format!("data: {line}\n"));
    }
    ev.push('\n');
    let chunk = format!("{:x}\r\n{ev}\r\n", ev.len());
    let w = r.get_mut();
    w.write_all(chunk.as_bytes()).await.is_ok() && w.flush().await.is_ok()
}

async fn sse_end(r: &mut BufReader<TcpStream>) -> bool {
    r.get_mut().write_all(b"0\r\n\r\n").await.is_ok()
}

fn rpc_error(id: &Value, code: i64, msg: &str) -> String {
    json!({"jsonrpc":"2.0","id":id,"error":{"code":code,"message":msg}}).to_string()
}

fn take_fault(st: &State, method: &str) -> Option<Fault> {
    let mut f = st.faults.lock().unwrap();
    let pos = f
        .iter()
        .position(|(m, _)| m.as_deref().is_none_or(|m| m == method))?;
    f.remove(pos).map(|(_, f)| f)
}

/// Returns false when the connection must close.
async fn post(
    r: &mut BufReader<TcpStream>,
    st: &Arc<State>,
    req: &Req,
    body: Value,
    reset_now: &mut bool,
) -> bool {
    let method = body["method"].as_str().unwrap_or("").to_owned();
    let id = body.get("id").cloned().unwrap_or(Value::Null);
    // A response from the client to one of our requests.
    if method.is_empty() && (body.get("result").is_some() || body.get("error").is_some()) {
        let key = id.to_string();
        if let Some(tx) = st.answers.lock().unwrap().remove(&key) {
            let _ = tx.send(body.clone());
        }
        return write_simple(r, 202, &[], "").await;
    }
    let mut reset_after = false;
    let mut drop_after_priming = false;
    let mut keep_open = false;
    match take_fault(st, &method) {
        Some(Fault::Status(code, retry_after)) => {
            let h: Vec<(&str, String)> = retry_after
                .map(|s| ("retry-after", s.to_string()))
                .into_iter()
                .collect();
            return write_simple(r, code, &h, "").await;
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::ExpireSessions) => st.sessions.lock().unwrap().clear(),
        Some(Fault::ResetAfterExecute) => reset_after = true,
        Some(Fault::DropAfterPriming) => drop_after_priming = true,
        Some(Fault::KeepOpen) => keep_open = true,
        Some(Fault::ResetBeforeRead) | None => {}
    }
    let version = req.headers.get("mcp-protocol-version").cloned();
    let modern = version.as_deref() == Some("2026-07-28")
        || body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"].is_string();
    let mut extra_headers: Vec<(&str, String)> = Vec::new();
    if modern {
        if st.opts.speaks == Speaks::Legacy {
            // A legacy server: no such method, no session.
            return write_simple(
                r,
                400,
                &[],
                &rpc_error(&id, -32600, "Bad Request: no valid session"),
            )
            .await;
        }
        // Header checks of 2026-07-28.
        let meta_v = body["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"].as_str();
        let name_src = body["params"]["name"]
            .as_str()
            .or(body["params"]["uri"].as_str());
        let bad = version.as_deref() != Some("2026-07-28")
            || meta_v != Some("2026-07-28")
            || req.headers.get("mcp-method").map(String::as_str) != Some(method.as_str())
            || (matches!(
                method.as_str(),
                "tools/call" | "resources/read" | "prompts/get"
            ) && req.headers.get("mcp-name").map(String::as_str) != name_src)
            || req.headers.contains_key("mcp-session-id");
        // x-mcp-header: the region tool's argument must be mirrored (Base64 sentinel decoded).
        let param_bad = method == "tools/call"
            && body["params"]["name"] == "region"
            && req
                .headers
                .get("mcp-param-region")
                .map(|v| decode_sentinel(v))
                != body["params"]["arguments"]["region"]
                    .as_str()
                    .map(str::to_owned);
        if bad || param_bad {
            return write_simple(r, 400, &[], &rpc_error(&id, -32020, "header mismatch")).await;
        }
    } else if method != "initialize" && !method.starts_with("notifications/") {
        if st.opts.speaks == Speaks::Modern {
            return write_simple(
                r,
                400,
                &[],
                &rpc_error(&id, -32022, "unsupported protocol version"),
            )
            .await;
        }
        match req.headers.get("mcp-session-id") {
            None => {
                return write_simple(r, 400, &[], &rpc_error(&id, -32600, "missing session")).await
            }
            Some(s) if !st.sessions.lock().unwrap().contains(s) => {
                return write_simple(r, 404, &[], "").await
            }
            Some(_) => {}
        }
        if version.is_none() {
            return write_simple(
                r,
                400,
                &[],
                &rpc_error(&id, -32600, "missing MCP-Protocol-Version"),
            )
            .await;
        }
    }
    if method.starts_with("notifications/") {
        return write_simple(r, 202, &[], "").await;
    }
    let mut before: Vec<String> = Vec::new();
    let result = match method.as_str() {
        "initialize" => {
            if st.opts.speaks == Speaks::Modern {
                return write_simple(
                    r,
                    400,
                    &[],
                    &rpc_error(&id, -32022, "unsupported protocol version"),
                )
                .await;
            }
            let n = st.next_session.fetch_add(1, Ordering::SeqCst);
            let sid = format!("session-{n}");
            st.sessions.lock().unwrap().insert(sid.clone());
            extra_headers.push(("mcp-session-id", sid));
            json!({"protocolVersion":"2025-11-25","capabilities":{"tools":{}},
                   "serverInfo":{"name":st.opts.name,"version":"1"}})
        }
        "server/discover" => json!({"supportedVersions":["2026-07-28"],"capabilities":{"tools":{}},
                   "serverInfo":{"name":st.opts.name,"version":"1"},"resultType":"complete"}),
        "ping" => json!({}),
        "tools/list" => json!({"tools":[
            {"name":"echo","description":"Echo","inputSchema":{"type":"object"}},
            {"name":"ask","description":"Asks the client for its roots","inputSchema":{"type":"object"}},
            {"name":"region","description":"Needs Mcp-Param-Region (2026-07-28)","inputSchema":{"type":"object",
                "properties":{"region":{"type":"string","x-mcp-header":"Region"},"q":{"type":"string"}}}},
            {"name":"bad","description":"Invalid x-mcp-header under items","inputSchema":{"type":"object",
                "properties":{"xs":{"type":"array","items":{"type":"string","x-mcp-header":"X"}}}}}]}),
        "resources/list" => json!({"resources":[{"uri":"mem://a","name":"a"}]}),
        "resources/read" => json!({"contents":[{"uri":body["params"]["uri"],"text":"contents"}]}),
        "prompts/list" => json!({"prompts":[{"name":"p","arguments":[]}]}),
        "prompts/get" => {
            json!({"messages":[{"role":"user","content":{"type":"text","text":"prompt"}}]})
        }
        "tools/call" => {
            st.calls.fetch_add(1, Ordering::SeqCst);
            let args = &body["params"]["arguments"];
            match body["params"]["name"].as_str() {
                Some("echo") => {
                    let text = format!(
                        "{}@{}",
                        args["message"].as_str().unwrap_or(""),
                        st.opts.name
                    );
                    json!({"content":[{"type":"text","text":text}],"isError":false})
                }
                Some("slow") => {
                    tokio::time::sleep(Duration::from_millis(args["ms"].as_u64().unwrap_or(0)))
                        .await;
                    json!({"content":[{"type":"text","text":"slow done"}]})
                }
                Some("region") => {
                    json!({"content":[{"type":"text","text":format!("region={}", args["region"].as_str().unwrap_or(""))}]})
                }
                Some("confirm") => {
                    // 2026-07-28 multi round-trip: ask for an elicitation, then finish.
                    let p = &body["params"];
                    match (&p["inputResponses"]["ok"], p["requestState"].as_str()) {
                        (Value::Object(resp), Some("st-1")) => json!({"content":[{"type":"text",
                            "text":format!("confirmed: {}", resp.get("action").and_then(Value::as_str).unwrap_or("?"))}]}),
                        _ => {
                            st.calls.fetch_sub(1, Ordering::SeqCst);
                            json!({"resultType":"input_required","requestState":"st-1","inputRequests":{
                                "ok":{"method":"elicitation/create","params":{"mode":"form","message":"Sure?",
                                "requestedSchema":{"type":"object","properties":{}}}}}})
                        }
                    }
                }
                Some("fail") => {
                    json!({"content":[{"type":"text","text":"it broke"}],"isError":true})
                }
                Some("ask") => {
                    // Mid-stream: a progress notification and a server->client request.
                    before.push(
                        json!({"jsonrpc":"2.0","method":"notifications/progress",
                        "params":{"progressToken":1,"progress":0.5}})
                        .to_string(),
                    );
                    before.push(
                        json!({"jsonrpc":"2.0","id":"srv-1","method":"roots/list"}).to_string(),
                    );
                    before.push(json!({"jsonrpc":"2.0","id":"srv-2","method":"sampling/createMessage","params":{}}).to_string());
                    json!(null)
                }
                _ => {
                    return write_simple(
                        r,
                        200,
                        &extra_headers,
                        &rpc_error(&id, -32602, "unknown tool"),
                    )
                    .await
                }
            }
        }
        _ => {
            return write_simple(
                r,
                200,
                &extra_headers,
                &rpc_error(&id, -32601, "method not found"),
            )
            .await
        }
    };
    if reset_after {
        *reset_now = true;
        return false;
    }
    let mut result = result;
    if method == "tools/call" && body["params"]["name"] == "ask" {
        // Needs SSE: send the requests, wait for both answers, report them.
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        st.answers.lock().unwrap().insert("\"srv-1\"".into(), tx1);
        st.answers.lock().unwrap().insert("\"srv-2\"".into(), tx2);
        if !sse_head(r, &extra_headers).await {
            return false;
        }
        for (i, m) in before.iter().enumerate() {
            sse_event(r, Some(&format!("e{i}")), m).await;
        }
        let a1 = tokio::time::timeout(Duration::from_secs(5), rx1)
            .await
            .ok()
            .and_then(Result::ok);
        let a2 = tokio::time::timeout(Duration::from_secs(5), rx2)
            .await
            .ok()
            .and_then(Result::ok);
        result = json!({"content":[{"type":"text","text":
            json!({"roots": a1, "sampling": a2}).to_string()}]});
        let msg = json!({"jsonrpc":"2.0","id":id,"result":result}).to_string();
        sse_event(r, Some("e9"), &msg).await;
        return sse_end(r).await;
    }
    if modern {
        if let Value::Object(m) = &mut result {
            m.entry("resultType").or_insert(json!("complete"));
        }
    }
    let msg = json!({"jsonrpc":"2.0","id":id,"result":result}).to_string();
    if st.opts.sse {
        if !sse_head(r, &extra_headers).await {
            return false;
        }
        // A priming event with an id and no data, then a log notification, then the answer
        // (split over two data lines when it is long enough to test joining).
        sse_event(r, Some("p0"), "").await;
        if drop_after_priming {
            st.parked.lock().unwrap().insert("p0".into(), msg);
            let _ = sse_end(r).await;
            return true;
        }
        sse_event(
            r,
            Some("p1"),
            &json!({"jsonrpc":"2.0","method":"notifications/message",
            "params":{"level":"info","data":"working"}})
            .to_string(),
        )
        .await;
        sse_event(r, Some("p2"), &msg).await;
        if keep_open {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        sse_end(r).await
    } else {
        write_simple(r, 200, &extra_headers, &msg).await
    }
}

async fn get(r: &mut BufReader<TcpStream>, st: &Arc<State>, req: &Req) -> bool {
    st.gets.fetch_add(1, Ordering::SeqCst);
    if st.opts.speaks == Speaks::Modern || !st.opts.get_stream {
        return write_simple(r, 405, &[], "").await;
    }
    match req.headers.get("mcp-session-id") {
        Some(s) if st.sessions.lock().unwrap().contains(s) => {}
        _ => return write_simple(r, 404, &[], "").await,
    }
    // Resumption of a dropped POST stream.
    if let Some(last) = req.headers.get("last-event-id") {
        let parked = st.parked.lock().unwrap().remove(last);
        if let Some(msg) = parked {
            if !sse_head(r, &[]).await {
                return false;
            }
            sse_event(r, Some("p2"), &msg).await;
            return sse_end(r).await;
        }
    }
    if !sse_head(r, &[]).await {
        return false;
    }
    sse_event(
        r,
        Some("g1"),
        &json!({"jsonrpc":"2.0","method":"notifications/message",
        "params":{"level":"info","data":"from the GET stream"}})
        .to_string(),
    )
    .await;
    // Keep the stream open until the client goes away.
    let mut buf = [0u8; 1];
    let _ = r.get_mut().read(&mut buf).await;
    false
}

fn decode_sentinel(v: &str) -> String {
    use base64::Engine as _;
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b) => {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
        }
        None => v.to_owned(),
    }
}

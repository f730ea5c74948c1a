//! The HTTP side of the approval page: binding, the guard (loopback, `Host`, `Origin`, token)
//! and the routes.
//!
//! Routes (every one needs the token, as `Authorization: Bearer TOKEN` or `?token=TOKEN`):
//!
//! | method | path                           | what                                              |
//! |--------|--------------------------------|---------------------------------------------------|
//! | GET    | `/`                            | the page (server-rendered, a small inline script) |
//! | GET    | `/fragment?since=G`            | the page's live part; waits up to 25 s for a change after generation `G` |
//! | GET    | `/api/pending`                 | pending items as JSON                             |
//! | GET    | `/api/history`                 | decided items as JSON, newest first               |
//! | GET    | `/api/snapshot?since=G`        | `{generation, pending, history}`; waits like `/fragment` |
//! | POST   | `/api/pending/{id}/approve`    | approve; body `{"files": [...]}` approves only those files |
//! | POST   | `/api/pending/{id}/deny`       | deny; body `{"reason": "..."}` optional           |
//!
//! Defences: the listener must be a loopback address ([`ApprovalUi::start`] refuses others);
//! `Host` must name the loopback address or `localhost` with the bound port and `Origin`, when
//! sent, must be that same origin (DNS rebinding, cross-site requests); the token is 256 random
//! bits compared in constant time; request bodies are capped at [`MAX_BODY`]; at most
//! [`MAX_CONNECTIONS`] connections are served at once, one request each (no keep-alive), and
//! headers must arrive within 10 s.
//! Pages carry a strict Content-Security-Policy (only the page's own nonce'd script runs),
//! `Referrer-Policy: no-referrer` (the token is in the URL), `X-Frame-Options: DENY` and
//! `Cache-Control: no-store`. Everything from a sandbox is HTML-escaped where it is rendered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::broker::Broker;
use crate::crossing::Decision;

use super::page;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024;
/// Most connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 32;
/// Longest wait of a long poll.
const LONG_POLL: Duration = Duration::from_secs(25);

/// The approval page could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UiError {
    /// The address is not a loopback address.
    #[error("the approval page listens on loopback addresses only (127.0.0.1 or [::1]), not {0}")]
    NotLoopback(SocketAddr),
    /// Binding failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A running approval page; stops when dropped.
#[derive(Debug)]
pub struct ApprovalUi {
    addr: SocketAddr,
    token: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApprovalUi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    broker: Broker,
    token: String,
    addr: SocketAddr,
}

impl ApprovalUi {
    /// Listens on `addr` (loopback only; port 0 picks one) and serves `broker`'s items. Must be
    /// called inside a tokio runtime.
    pub async fn start(addr: SocketAddr, broker: Broker) -> Result<Self, UiError> {
        if !addr.ip().is_loopback() {
            return Err(UiError::NotLoopback(addr));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| UiError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| UiError::Bind { addr, source })?;
        let token = {
            let bytes: [u8; 32] = rand::random();
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let shared = Arc::new(Shared {
            broker,
            token: token.clone(),
            addr: bound,
        });
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(ApprovalUi {
            addr: bound,
            token,
            task,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The page's URL with the token, to print at start.
    pub fn url(&self) -> String {
        format!("http://{}/?token={}", self.addr, self.token)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("approval page: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                // One request per connection: an idle kept-alive connection would hold one of
                // the MAX_CONNECTIONS slots with no timeout.
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!("approval page: connection ended: {e}");
            }
        });
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        if let Ok(v) = http::HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    }
    r
}

fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    respond(status, "application/json", value.to_string())
}

fn error(status: StatusCode, msg: &str) -> Resp {
    json(status, &serde_json::json!({ "error": msg }))
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then_some(v)
    })
}

fn eq_ct(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which of the bound address's names a `Host` or origin authority may use.
fn authority_ok(authority: &str, addr: SocketAddr) -> bool {
    let a = authority.to_ascii_lowercase();
    let port = addr.port();
    let mut names = vec![format!("localhost:{port}"), addr.to_string()];
    if addr.ip().is_ipv4() {
        names.push(format!("127.0.0.1:{port}"));
    } else {
        names.push(format!("[::1]:{port}"));
    }
    names.contains(&a)
}

/// The request guard: `Err(response)` to refuse. Public in the crate for the unit tests.
pub(crate) fn check(
    headers: &http::HeaderMap,
    query: Option<&str>,
    token: &str,
    addr: SocketAddr,
) -> Result<(), (StatusCode, String)> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !authority_ok(host, addr) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "Host {:?} is not this page's address (DNS-rebinding protection); open http://{addr}/",
                vmcp_sanitize::sanitize(host, 100)
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let o = origin.to_str().unwrap_or("");
        let ok = o
            .strip_prefix("http://")
            .is_some_and(|rest| authority_ok(rest.trim_end_matches('/'), addr));
        if !ok {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "Origin {:?} may not use this page (cross-site request refused)",
                    vmcp_sanitize::sanitize(o, 100)
                ),
            ));
        }
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, t) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| t.trim())
        });
    let given = bearer.or_else(|| query_param(query, "token"));
    match given {
        Some(t) if eq_ct(t.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err((StatusCode::UNAUTHORIZED, "wrong token".into())),
        None => Err((
            StatusCode::UNAUTHORIZED,
            "no token: open the URL vmcp printed at start (it ends in ?token=...), or send Authorization: Bearer TOKEN".into(),
        )),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    files: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DenyBody {
    reason: Option<String>,
}

async fn read_body<T: for<'de> Deserialize<'de> + Default>(body: Incoming) -> Result<T, Resp> {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the request body is larger than {MAX_BODY} bytes or broken"),
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad JSON body: {e}")))
}

async fn wait_for_change(broker: &Broker, since: Option<u64>) {
    let Some(since) = since else { return };
    let mut rx = broker.subscribe();
    if *rx.borrow_and_update() != since {
        return;
    }
    let _ = tokio::time::timeout(LONG_POLL, rx.changed()).await;
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Resp {
    let query = req.uri().query().map(str::to_owned);
    if let Err((status, msg)) = check(req.headers(), query.as_deref(), &shared.token, shared.addr) {
        if req.uri().path() == "/" && req.method() == Method::GET {
            return respond(status, "text/html; charset=utf-8", page::refusal(&msg));
        }
        return error(status, &msg);
    }
    let since = query_param(query.as_deref(), "since").and_then(|s| s.parse().ok());
    let by = if req
        .headers()
        .get("x-vmcp-client")
        .is_some_and(|v| v.as_bytes() == b"page")
    {
        "page"
    } else {
        "api"
    };
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method().clone(), segs.as_slice()) {
        (Method::GET, [""]) => {
            let nonce = {
                let b: [u8; 16] = rand::random();
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            };
            let mut r = respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page::page(&shared.broker.snapshot(), &shared.token, &nonce),
            );
            let csp = format!(
                "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            );
            if let Ok(v) = http::HeaderValue::from_str(&csp) {
                r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
            }
            r
        }
        (Method::GET, ["fragment"]) => {
            wait_for_change(&shared.broker, since).await;
            let snap = shared.broker.snapshot();
            let mut r = respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page::fragment(&snap),
            );
            if let Ok(v) = http::HeaderValue::from_str(&snap.generation.to_string()) {
                r.headers_mut().insert("x-generation", v);
            }
            r
        }
        (Method::GET, ["api", "pending"]) => json(
            StatusCode::OK,
            &serde_json::to_value(shared.broker.pending()).unwrap_or_default(),
        ),
        (Method::GET, ["api", "history"]) => json(
            StatusCode::OK,
            &serde_json::to_value(shared.broker.history()).unwrap_or_default(),
        ),
        (Method::GET, ["api", "snapshot"]) => {
            wait_for_change(&shared.broker, since).await;
            json(
                StatusCode::OK,
                &serde_json::to_value(shared.broker.snapshot()).unwrap_or_default(),
            )
        }
        (Method::POST, ["api", "pending", id, verb @ ("approve" | "deny")]) => {
            let id = (*id).to_owned();
            let decision = if *verb == "approve" {
                match read_body::<ApproveBody>(req.into_body()).await {
                    Ok(ApproveBody { files: None }) => Decision::Approved,
                    Ok(ApproveBody { files: Some(f) }) => Decision::ApprovedFiles {
                        files: f.into_iter().collect(),
                    },
                    Err(r) => return r,
                }
            } else {
                match read_body::<DenyBody>(req.into_body()).await {
                    Ok(b) => Decision::deny(
                        b.reason
                            .filter(|r| !r.trim().is_empty())
                            .unwrap_or_else(|| format!("denied on the approval page ({by})")),
                    ),
                    Err(r) => return r,
                }
            };
            match shared.broker.decide(&id, decision.clone(), by) {
                Ok(()) => json(
                    StatusCode::OK,
                    &serde_json::json!({ "ok": true, "id": id, "decision": decision }),
                ),
                Err(e @ crate::broker::BrokerError::NotPending(_)) => {
                    error(StatusCode::NOT_FOUND, &e.to_string())
                }
                Err(e) => error(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        }
        (_, ["" | "fragment"] | ["api", ..]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here")
        }
        _ => error(StatusCode::NOT_FOUND, "no such page"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn guard() {
        let addr: SocketAddr = "127.0.0.1:8123".parse().unwrap();
        let ok = |h: &[(&str, &str)], q: Option<&str>| check(&headers(h), q, "tok", addr);
        ok(&[("host", "127.0.0.1:8123")], Some("token=tok")).unwrap();
        ok(
            &[("host", "localhost:8123"), ("authorization", "Bearer tok")],
            None,
        )
        .unwrap();
        ok(
            &[
                ("host", "127.0.0.1:8123"),
                ("origin", "http://127.0.0.1:8123"),
            ],
            Some("a=b&token=tok"),
        )
        .unwrap();
        for (h, q, status) in [
            (vec![("host", "evil.example:8123")], Some("token=tok"), 403),
            (vec![("host", "127.0.0.1:8124")], Some("token=tok"), 403),
            (vec![], Some("token=tok"), 403),
            (
                vec![
                    ("host", "127.0.0.1:8123"),
                    ("origin", "http://evil.example"),
                ],
                Some("token=tok"),
                403,
            ),
            (
                vec![("host", "127.0.0.1:8123"), ("origin", "null")],
                Some("token=tok"),
                403,
            ),
            (
                vec![
                    ("host", "127.0.0.1:8123"),
                    ("origin", "https://127.0.0.1:8123"),
                ],
                Some("token=tok"),
                403,
            ),
            (vec![("host", "127.0.0.1:8123")], None, 401),
            (vec![("host", "127.0.0.1:8123")], Some("token=to"), 401),
            (vec![("host", "127.0.0.1:8123")], Some("token=tokk"), 401),
            (
                vec![("host", "127.0.0.1:8123"), ("authorization", "Basic tok")],
                None,
                401,
            ),
        ] {
            let (s, msg) = ok(&h, q).unwrap_err();
            assert_eq!(s.as_u16(), status, "{h:?} {q:?}: {msg}");
        }
    }
}

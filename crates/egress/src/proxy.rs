//! The per-VM egress proxy: HTTP CONNECT and plain HTTP, enforcing a [`Policy`].
//!
//! # Data path
//! - HTTP/1.1 parsing on the client side is hyper's (`http1` server with upgrades), bounded by
//!   [`Limits::max_header_bytes`] and [`Limits::header_timeout`].
//! - `CONNECT host:port`: the target must match a rule; a name is resolved **on the host**
//!   (the guest has no resolver that reaches out), and the proxy connects only to resolved
//!   addresses that pass the address rule. Then it answers `200`, reads the client's first
//!   bytes and, if they are a TLS ClientHello, requires its server name to equal the CONNECT
//!   host (a mismatch gets a TLS `access_denied` alert and the tunnel is closed before any
//!   byte reaches the server). A client that sends nothing for [`Limits::first_bytes_wait`]
//!   is taken for a server-speaks-first protocol (SSH, SMTP) and spliced as is: the address
//!   rule still holds.
//! - Plain HTTP (`GET http://host/path`): the target comes from the request line, or from
//!   `Host` for origin-form requests; a `Host` header that names another host than the request
//!   line is refused. One upstream connection per request (no pooling), hop-by-hop headers
//!   dropped, bodies streamed both ways.
//! - **Gate** ([`Proxy::with_gate`]): a target that no rule allows is not refused at once but
//!   handed to the gate (an approval policy that may ask a person); the connection waits at
//!   most [`Limits::gate_timeout`] for its answer. Connections to a target the gate is
//!   already deciding about wait for that answer instead of asking again (one question per
//!   target, however many connections a guest opens). Approved targets are remembered for the
//!   proxy's life (an address-literal rule for the approved `host:port` only); the address
//!   rule still holds for them (a special address needs a literal rule). A refusal names the
//!   gate's reason.
//! - Refusals answer `403` with `X-Vmcp-Egress: denied`, `X-Vmcp-Egress-Check: <check>` and
//!   a one-line reason in the body, so a tool can show the user why; each is logged (rate
//!   limited) and kept in a short in-memory list ([`ProxyHandle::recent_denials`]).
//!
//! # Bounds
//! Concurrent client connections ([`Limits::max_connections`]; more are answered `503` and
//! closed), request head size, header read time, ClientHello size
//! ([`crate::sni::MAX_PEEK`]), connect time, idle time of every connection and tunnel. Dropping
//! the [`ProxyHandle`] stops the listener and every connection and tunnel.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::idle::{Activity, Tracked};
use crate::policy::{Denial, Host, Policy, Target};
use crate::ratelimit::RateLimit;
use crate::sni::{self, Peek};

/// Bounds of one proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Client connections served at once (tunnels included).
    pub max_connections: usize,
    /// Largest request head (hyper's read buffer; at least 8 KiB).
    pub max_header_bytes: usize,
    /// Time allowed for a request head to arrive.
    pub header_timeout: Duration,
    /// Time allowed for name resolution.
    pub resolve_timeout: Duration,
    /// Time allowed to connect to the upstream server (over all its addresses).
    pub connect_timeout: Duration,
    /// How long to wait for a tunnel client's first bytes before splicing unchecked.
    pub first_bytes_wait: Duration,
    /// A connection or tunnel with no byte moving for this long is closed.
    pub idle_timeout: Duration,
    /// How long a connection waits for the [`Gate`]'s answer before it is refused.
    pub gate_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            resolve_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            first_bytes_wait: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(300),
            gate_timeout: Duration::from_secs(120),
        }
    }
}

/// Name resolution on the host. Tests inject answers (e.g. a rebinding one).
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `name`.
    fn resolve(
        &self,
        name: &str,
        port: u16,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>>;
}

/// The system resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(
        &self,
        name: &str,
        port: u16,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + '_>> {
        let query = format!("{name}:{port}");
        Box::pin(async move {
            Ok(tokio::net::lookup_host(query)
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Opens upstream connections. Tests redirect addresses to their own servers.
pub trait Dial: Send + Sync + 'static {
    /// A TCP connection to `addr` (an address the policy allowed).
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>>;
}

/// Plain `TcpStream::connect`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemDialer;

impl Dial for SystemDialer {
    fn dial(
        &self,
        addr: SocketAddr,
    ) -> std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send + '_>> {
        Box::pin(TcpStream::connect(addr))
    }
}

/// Decides about targets no rule allows (an approval policy; may ask a person).
pub trait Gate: Send + Sync + 'static {
    /// `Ok(())` lets `target` through (and every later connection to it); `Err(reason)`
    /// refuses this connection with the reason shown to the client. The proxy bounds the
    /// wait ([`Limits::gate_timeout`]).
    fn decide(
        &self,
        target: &Target,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;
}

/// A listener the proxy accepts client connections from.
pub trait Accept: Send + 'static {
    /// A client connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next client.
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Accept for TcpListener {
    type Io = TcpStream;
    async fn accept(&mut self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// A gate's decision: `Err` holds the reason shown to the client.
type GateAnswer = Result<(), String>;

/// Removes a target's in-progress decision from the map when its decider is done or gone.
struct DecidingEntry<'a> {
    map: &'a Mutex<std::collections::HashMap<Target, watch::Receiver<Option<GateAnswer>>>>,
    target: &'a Target,
}

impl Drop for DecidingEntry<'_> {
    fn drop(&mut self) {
        lock(self.map).remove(self.target);
    }
}

/// One refused attempt, as kept in [`ProxyHandle::recent_denials`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DenialRecord {
    /// When.
    pub at: SystemTime,
    /// `CONNECT` or the HTTP method.
    pub method: String,
    /// The check that refused (`no-rule`, `special-address`, `sni-mismatch`, ...).
    pub check: &'static str,
    /// The user-facing reason.
    pub reason: String,
    /// The `HOST:PORT` asked for, when the request named one.
    pub target: Option<String>,
    /// Its number: the proxy's refusal count after it (1 for the first), so a reader can
    /// ask for the refusals after the last one it saw.
    pub seq: u64,
}

/// Denials kept in memory.
pub const RECENT_DENIALS: usize = 64;

/// Counters of one proxy.
#[derive(Debug, Default)]
pub struct Stats {
    allowed: AtomicU64,
    denied: AtomicU64,
    recent: Mutex<VecDeque<DenialRecord>>,
}

impl Stats {
    /// Connections and requests let through.
    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }
    /// Connections and requests refused by the policy.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }
    /// The last [`RECENT_DENIALS`] refusals, oldest first.
    pub fn recent_denials(&self) -> Vec<DenialRecord> {
        lock(&self.recent).iter().cloned().collect()
    }
}

struct Ctx {
    policy: Policy,
    limits: Limits,
    resolver: Arc<dyn Resolve>,
    dialer: Arc<dyn Dial>,
    gate: Option<Arc<dyn Gate>>,
    /// Targets the gate approved, with the one-target policy that lets them through.
    approved: Mutex<std::collections::HashMap<Target, Policy>>,
    /// Targets the gate is deciding about; the answer (once there) for the connections that
    /// wait for it. At most one entry per target; entries go when their decision ends.
    deciding: Mutex<std::collections::HashMap<Target, watch::Receiver<Option<GateAnswer>>>>,
    stats: Arc<Stats>,
    log_limit: Mutex<RateLimit>,
    shutdown: watch::Receiver<()>,
}

/// A proxy not yet listening.
pub struct Proxy {
    policy: Policy,
    limits: Limits,
    resolver: Arc<dyn Resolve>,
    dialer: Arc<dyn Dial>,
    gate: Option<Arc<dyn Gate>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("policy", &self.policy.to_string())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A running proxy; dropping it stops the listener and every connection.
#[derive(Debug)]
pub struct ProxyHandle {
    stats: Arc<Stats>,
    task: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl ProxyHandle {
    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
    /// The last [`RECENT_DENIALS`] refusals, oldest first.
    pub fn recent_denials(&self) -> Vec<DenialRecord> {
        self.stats.recent_denials()
    }
    /// The counters, shared: they stay readable after the proxy stopped.
    pub fn shared_stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Proxy {
    /// A proxy for `policy` with the system resolver and dialer.
    pub fn new(policy: Policy, limits: Limits) -> Proxy {
        Proxy {
            policy,
            limits,
            resolver: Arc::new(SystemResolver),
            dialer: Arc::new(SystemDialer),
            gate: None,
        }
    }

    /// Hands targets no rule allows to `gate` instead of refusing them.
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Proxy {
        self.gate = Some(gate);
        self
    }

    /// Replaces the resolver.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolve>) -> Proxy {
        self.resolver = resolver;
        self
    }

    /// Replaces the dialer.
    pub fn with_dialer(mut self, dialer: Arc<dyn Dial>) -> Proxy {
        self.dialer = dialer;
        self
    }

    /// Serves clients from `listener` until the handle is dropped. Needs a tokio runtime.
    pub fn spawn<L: Accept>(self, mut listener: L) -> ProxyHandle {
        let (tx, rx) = watch::channel(());
        let stats = Arc::new(Stats::default());
        let ctx = Arc::new(Ctx {
            policy: self.policy,
            limits: self.limits,
            resolver: self.resolver,
            dialer: self.dialer,
            gate: self.gate,
            approved: Mutex::new(std::collections::HashMap::new()),
            deciding: Mutex::new(std::collections::HashMap::new()),
            stats: Arc::clone(&stats),
            log_limit: Mutex::new(RateLimit::new(20, Duration::from_secs(3))),
            shutdown: rx,
        });
        let slots = Arc::new(Semaphore::new(ctx.limits.max_connections));
        let task = tokio::spawn(async move {
            loop {
                let io = match listener.accept().await {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::warn!(target: "vmcp::egress", "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let ctx = Arc::clone(&ctx);
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(permit) => {
                        tokio::spawn(serve_client(ctx, io, Arc::new(permit)));
                    }
                    Err(_) => {
                        tokio::spawn(refuse_busy(io, ctx.limits.max_connections));
                    }
                }
            }
        });
        ProxyHandle {
            stats,
            task,
            _shutdown: tx,
        }
    }
}

async fn refuse_busy<T: AsyncWrite + Unpin>(mut io: T, max: usize) {
    let body = format!("vmcp egress proxy: too many connections (at most {max} at once)\n");
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\nX-Vmcp-Egress: busy\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), io.write_all(msg.as_bytes())).await;
    let _ = io.shutdown().await;
}

/// Runs `fut` until it ends, `activity` is idle for `idle`, or the proxy shuts down.
async fn guarded<F: Future<Output = ()>>(
    fut: F,
    activity: &Activity,
    idle: Duration,
    mut shutdown: watch::Receiver<()>,
) {
    tokio::select! {
        () = fut => {}
        () = activity.expired(idle) => {}
        _ = shutdown.changed() => {}
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

async fn serve_client<T>(ctx: Arc<Ctx>, io: T, permit: Arc<OwnedSemaphorePermit>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = TokioIo::new(Tracked::new(io, activity.clone()));
    let svc_ctx = Arc::clone(&ctx);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = Arc::clone(&svc_ctx);
        let permit = Arc::clone(&permit);
        async move { Ok::<_, Infallible>(handle(ctx, req, permit).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(ctx.limits.max_header_bytes.max(8192))
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.limits.header_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    let run = async {
        if let Err(e) = conn.await {
            tracing::debug!(target: "vmcp::egress", "client connection ended: {e}");
        }
    };
    guarded(
        run,
        &activity,
        ctx.limits.idle_timeout,
        ctx.shutdown.clone(),
    )
    .await;
}

fn text_response(status: StatusCode, headers: &[(&str, &str)], body: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(*k), HeaderValue::try_from(*v)) {
            h.insert(k, v);
        }
    }
    resp
}

impl Ctx {
    fn deny(&self, method: &str, denial: &Denial) -> Response<Body> {
        self.record_denial(method, denial);
        text_response(
            StatusCode::FORBIDDEN,
            &[
                ("x-vmcp-egress", "denied"),
                ("x-vmcp-egress-check", denial.check()),
                ("connection", "close"),
            ],
            format!(
                "vmcp egress proxy refused {method}: {denial}\nallow list: {}\n",
                self.policy
            ),
        )
    }

    fn record_denial(&self, method: &str, denial: &Denial) {
        let seq = self.stats.denied.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut recent = lock(&self.stats.recent);
            if recent.len() == RECENT_DENIALS {
                recent.pop_front();
            }
            recent.push_back(DenialRecord {
                at: SystemTime::now(),
                method: method.to_string(),
                check: denial.check(),
                reason: denial.to_string(),
                target: denial.target().map(ToString::to_string),
                seq,
            });
        }
        let admitted = lock(&self.log_limit).admit(Instant::now());
        if let Some(suppressed) = admitted {
            let more = if suppressed > 0 {
                format!(" ({suppressed} more refusals not logged)")
            } else {
                String::new()
            };
            tracing::warn!(
                target: "vmcp::egress",
                check = denial.check(),
                "egress refused {method}: {denial}{more}"
            );
        }
    }

    fn error(&self, status: StatusCode, what: String) -> Response<Body> {
        tracing::info!(target: "vmcp::egress", "{what}");
        text_response(
            status,
            &[("x-vmcp-egress", "error"), ("connection", "close")],
            format!("vmcp egress proxy: {what}\n"),
        )
    }

    /// Policy check, host-side resolution, address check. `Err` is the response to send.
    /// The policy for `target`: the allow list, or the one-target policy of an approval.
    /// Targets no rule allows go to the gate (bounded wait).
    async fn policy_for(&self, method: &str, target: &Target) -> Result<Policy, Response<Body>> {
        let denial = match self.policy.match_target(target) {
            Ok(_) => return Ok(self.policy.clone()),
            Err(d) => d,
        };
        let Some(gate) = &self.gate else {
            return Err(self.deny(method, &denial));
        };
        let waited = self.gate_answer(gate, target).await;
        let reason = match waited {
            Ok(()) => {
                if let Some(p) = lock(&self.approved).get(target) {
                    tracing::info!(target: "vmcp::egress", "{method} {target} approved through the gate");
                    return Ok(p.clone());
                }
                // Approved, then forgotten: cannot happen (approvals are never removed).
                "the approval was lost".to_string()
            }
            Err(reason) => reason,
        };
        Err(self.deny(
            method,
            &Denial::Gated {
                target: target.clone(),
                reason,
            },
        ))
    }

    /// The gate's answer for `target`: from the decision already in progress for it, or from
    /// a new one (bounded by [`Limits::gate_timeout`]); an approval is recorded before the
    /// waiting connections hear of it.
    async fn gate_answer(&self, gate: &Arc<dyn Gate>, target: &Target) -> GateAnswer {
        let deadline = tokio::time::Instant::now() + self.limits.gate_timeout;
        let timed_out = || {
            Err(format!(
                "no decision within {}s (denied)",
                self.limits.gate_timeout.as_secs()
            ))
        };
        loop {
            if lock(&self.approved).contains_key(target) {
                return Ok(());
            }
            let joined = {
                let mut deciding = lock(&self.deciding);
                match deciding.get(target) {
                    Some(rx) => Ok(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        deciding.insert(target.clone(), rx);
                        Err(tx)
                    }
                }
            };
            match joined {
                Ok(mut rx) => {
                    let waited =
                        tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await;
                    match waited {
                        Ok(Ok(answer)) => return answer.clone().unwrap_or_else(timed_out),
                        // The deciding connection went away before the answer: ask anew.
                        Ok(Err(_)) => continue,
                        Err(_) => return timed_out(),
                    }
                }
                Err(tx) => {
                    // Removes the entry however this ends (also if the connection is dropped).
                    let _entry = DecidingEntry {
                        map: &self.deciding,
                        target,
                    };
                    let answer = match tokio::time::timeout_at(deadline, gate.decide(target)).await
                    {
                        Ok(answer) => answer,
                        Err(_) => timed_out(),
                    };
                    if answer.is_ok() {
                        let p = self.one_target_policy(target);
                        lock(&self.approved).insert(target.clone(), p);
                    }
                    let _ = tx.send(Some(answer.clone()));
                    return answer;
                }
            }
        }
    }

    fn one_target_policy(&self, target: &Target) -> Policy {
        let host = match &target.host {
            Host::Name(n) => crate::policy::HostPattern::Name(n.clone()),
            // Not the address itself: a literal rule would open a special address (private,
            // loopback, metadata), which an approval of the target must not do.
            Host::Ip(a) => {
                let any = if a.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
                match any.parse::<crate::addr::Cidr>() {
                    Ok(c) => crate::policy::HostPattern::Range(c),
                    Err(_) => return self.policy.with_rules(Vec::new()),
                }
            }
        };
        self.policy.with_rules(vec![crate::policy::Rule {
            host,
            port: Some(target.port),
        }])
    }

    async fn vet(&self, method: &str, target: &Target) -> Result<Vec<SocketAddr>, Response<Body>> {
        let policy = self.policy_for(method, target).await?;
        let resolved = match &target.host {
            Host::Ip(_) => Vec::new(),
            Host::Name(name) => {
                let lookup = self.resolver.resolve(name, target.port);
                match tokio::time::timeout(self.limits.resolve_timeout, lookup).await {
                    Ok(Ok(addrs)) => addrs,
                    Ok(Err(e)) => {
                        return Err(self.error(
                            StatusCode::BAD_GATEWAY,
                            format!("cannot resolve {name}: {e}"),
                        ))
                    }
                    Err(_) => {
                        return Err(self.error(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!(
                                "resolving {name} took longer than {:?}",
                                self.limits.resolve_timeout
                            ),
                        ))
                    }
                }
            }
        };
        match policy.decide(target, &resolved) {
            Ok(allowed) => {
                for d in &allowed.dropped {
                    self.record_denial(method, d);
                }
                self.stats.allowed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "vmcp::egress", "allowed {method} {target} by rule {}", allowed.rule);
                Ok(allowed.addrs)
            }
            Err(d) => Err(self.deny(method, &d)),
        }
    }

    async fn dial(
        &self,
        target: &Target,
        addrs: &[SocketAddr],
    ) -> Result<TcpStream, Response<Body>> {
        let attempt = async {
            let mut last = None;
            for a in addrs {
                match self.dialer.dial(*a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(format!("{a}: {e}")),
                }
            }
            Err(last.unwrap_or_else(|| "no address".into()))
        };
        match tokio::time::timeout(self.limits.connect_timeout, attempt).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(self.error(
                StatusCode::BAD_GATEWAY,
                format!("cannot connect to {target}: {e}"),
            )),
            Err(_) => Err(self.error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "connecting to {target} took longer than {:?}",
                    self.limits.connect_timeout
                ),
            )),
        }
    }
}

async fn handle(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    if req.method() == Method::CONNECT {
        connect(ctx, req, permit).await
    } else {
        forward(ctx, req).await
    }
}

async fn connect(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    permit: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    let method = "CONNECT";
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) else {
        return ctx.deny(
            method,
            &Denial::BadTarget(format!(
                "CONNECT needs host:port, got {:?}",
                req.uri().to_string()
            )),
        );
    };
    let target = match Target::parse_authority(&authority, None) {
        Ok(t) => t,
        Err(e) => return ctx.deny(method, &Denial::BadTarget(e.to_string())),
    };
    let addrs = match ctx.vet(method, &target).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let upstream = match ctx.dial(&target, &addrs).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let tunnel_ctx = Arc::clone(&ctx);
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(target: "vmcp::egress", "CONNECT {target}: upgrade failed: {e}");
                return;
            }
        };
        let activity = Activity::new();
        let idle = tunnel_ctx.limits.idle_timeout;
        let shutdown = tunnel_ctx.shutdown.clone();
        let client = Tracked::new(TokioIo::new(upgraded), activity.clone());
        let upstream = Tracked::new(upstream, activity.clone());
        guarded(
            tunnel(tunnel_ctx, target, client, upstream),
            &activity,
            idle,
            shutdown,
        )
        .await;
    });
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never: Infallible| match never {})
            .boxed(),
    )
}

/// Copy buffer per direction of a tunnel (tokio's default 8 KiB costs throughput on fast links).
const TUNNEL_BUF: usize = 64 * 1024;

/// TLS alert record: fatal `access_denied`.
const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

async fn tunnel<C, U>(ctx: Arc<Ctx>, target: Target, mut client: C, mut upstream: U)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    // Read the client's first bytes, up to a whole ClientHello.
    let mut first = Vec::with_capacity(2048);
    let deadline = tokio::time::Instant::now() + ctx.limits.first_bytes_wait;
    let mut need = 1usize;
    let verdict = loop {
        if first.len() >= need {
            match sni::peek(&first) {
                Ok(Peek::Incomplete(n)) => need = n,
                Ok(Peek::NotTls) => break Ok(None),
                Ok(Peek::Hello(name)) => break Ok(name),
                Err(e) => break Err(Denial::BadTarget(format!("CONNECT {target}: {e}"))),
            }
        }
        let mut chunk = [0u8; 4096];
        let want = (need - first.len()).min(chunk.len());
        let read = if first.is_empty() {
            // Silent client: a server-speaks-first protocol.
            match tokio::time::timeout_at(deadline, client.read(&mut chunk[..want])).await {
                Ok(r) => r,
                Err(_) => break Ok(None),
            }
        } else {
            match tokio::time::timeout(ctx.limits.header_timeout, client.read(&mut chunk[..want]))
                .await
            {
                Ok(r) => r,
                Err(_) => return,
            }
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => first.extend_from_slice(&chunk[..n]),
        }
    };
    let check = match verdict {
        Ok(Some(sni)) => {
            let same = match (&target.host, crate::policy::normalize_name(&sni)) {
                (Host::Name(n), Some(s)) => *n == s,
                _ => false,
            };
            if same {
                Ok(())
            } else {
                Err(Denial::SniMismatch {
                    target: target.clone(),
                    sni,
                })
            }
        }
        Ok(None) => Ok(()),
        Err(d) => Err(d),
    };
    if let Err(d) = check {
        ctx.record_denial("CONNECT", &d);
        let _ = client.write_all(&TLS_ACCESS_DENIED).await;
        let _ = client.shutdown().await;
        return;
    }
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        TUNNEL_BUF,
        TUNNEL_BUF,
    )
    .await;
}

/// Headers that belong to one hop and are not forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::try_from(n.trim()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

fn http_target(req: &Request<Incoming>) -> Result<Target, Denial> {
    let host_header = match req
        .headers()
        .get_all(header::HOST)
        .iter()
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => None,
        [one] => Some(
            one.to_str()
                .map_err(|_| Denial::BadTarget("Host header is not ASCII".into()))?
                .to_string(),
        ),
        _ => return Err(Denial::BadTarget("more than one Host header".into())),
    };
    let uri = req.uri();
    match uri.authority() {
        Some(auth) => {
            if uri.scheme_str() != Some("http") {
                return Err(Denial::BadTarget(format!(
                    "only http:// URLs go through as plain requests; use CONNECT for {uri}"
                )));
            }
            let target = Target::parse_authority(auth.as_str(), Some(80))
                .map_err(|e| Denial::BadTarget(e.to_string()))?;
            if let Some(h) = host_header {
                let same = Target::parse_authority(&h, Some(80)).is_ok_and(|t| t == target);
                if !same {
                    return Err(Denial::HostMismatch { target, header: h });
                }
            }
            Ok(target)
        }
        None => {
            let h = host_header.ok_or_else(|| Denial::BadTarget("no Host header".into()))?;
            Target::parse_authority(&h, Some(80)).map_err(|e| Denial::BadTarget(e.to_string()))
        }
    }
}

async fn forward(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().as_str().to_string();
    let target = match http_target(&req) {
        Ok(t) => t,
        Err(d) => return ctx.deny(&method, &d),
    };
    let addrs = match ctx.vet(&method, &target).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let stream = match ctx.dial(&target, &addrs).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let activity = Activity::new();
    let io = TokioIo::new(Tracked::new(stream, activity.clone()));
    let (mut sender, conn) = match hyper::client::conn::http1::handshake::<_, Incoming>(io).await {
        Ok(pair) => pair,
        Err(e) => {
            return ctx.error(
                StatusCode::BAD_GATEWAY,
                format!("cannot talk HTTP to {target}: {e}"),
            )
        }
    };
    let idle = ctx.limits.idle_timeout;
    let shutdown = ctx.shutdown.clone();
    tokio::spawn(async move {
        let run = async {
            let _ = conn.await;
        };
        guarded(run, &activity, idle, shutdown).await;
    });
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    parts.uri = match Uri::try_from(path) {
        Ok(u) => u,
        Err(e) => return ctx.deny(&method, &Denial::BadTarget(e.to_string())),
    };
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::try_from(target.to_string()) {
        let host = if target.port == 80 {
            HeaderValue::try_from(target.host.to_string()).unwrap_or(v)
        } else {
            v
        };
        parts.headers.insert(header::HOST, host);
    }
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => ctx.error(StatusCode::BAD_GATEWAY, format!("{target} failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }
}

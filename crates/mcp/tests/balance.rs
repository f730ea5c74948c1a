//! The balancer against real loopback HTTP servers: round-robin spread, failover when a
//! backend dies, re-admission by active health checks when it returns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vmcp_mcp::balance::{
    spawn_health_checks, Balancer, BalancerConfig, EndpointState, HealthCheckConfig,
};
use vmcp_mcp::retry::TokioClock;

/// A minimal HTTP/1.1 server on a fixed loopback port that can be stopped and restarted.
struct Backend {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut b = Backend {
            addr,
            served: Arc::new(AtomicUsize::new(0)),
            task: None,
        };
        b.serve(listener);
        b
    }

    fn serve(&mut self, listener: TcpListener) {
        let served = self.served.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let served = served.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let mut req = Vec::new();
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    if req.starts_with(b"GET /request ") {
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = tcp
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                });
            }
        }));
    }

    /// Stops listening: new connections are refused.
    async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// One HTTP GET; Err(reason) on any failure.
async fn get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let fut = async {
        let mut tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut resp = Vec::new();
        tcp.read_to_end(&mut resp)
            .await
            .map_err(|e| e.to_string())?;
        if resp.starts_with(b"HTTP/1.1 200") {
            Ok(())
        } else {
            Err(format!("bad answer {:?}", String::from_utf8_lossy(&resp)))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "timeout".to_owned())?
}

/// A request the way the HTTP transport makes one: pick, try, report; on a transport failure
/// report it and try the next endpoint, until every endpoint was tried once.
async fn request(b: &Balancer<SocketAddr>) -> Result<SocketAddr, String> {
    let mut tried = Vec::new();
    loop {
        let (id, addr) = b
            .pick_excluding(Instant::now(), &tried)
            .map_err(|e| e.to_string())?;
        match get(addr, "/request").await {
            Ok(()) => {
                b.report_success(id);
                return Ok(addr);
            }
            Err(e) => {
                b.report_failure(id, Instant::now(), &e);
                tried.push(id);
            }
        }
    }
}

fn config(cooldown: Duration) -> BalancerConfig {
    BalancerConfig::default()
        .with_ejection(2, cooldown)
        .with_health_check(
            HealthCheckConfig::default()
                .with_timing(Duration::from_millis(50), Duration::from_millis(500))
                .with_thresholds(2, 2),
        )
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let b = Balancer::new(
        backends.iter().map(|s| s.addr).collect(),
        config(Duration::from_secs(60)),
    )
    .unwrap();
    for _ in 0..30 {
        request(&b).await.unwrap();
    }
    let served: Vec<usize> = backends.iter().map(Backend::served).collect();
    assert_eq!(served, [10, 10, 10]);
}

#[tokio::test]
async fn failover_when_a_backend_dies_and_readmission_when_it_returns() {
    let mut backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let b = Arc::new(
        Balancer::new(
            backends.iter().map(|s| s.addr).collect(),
            config(Duration::from_secs(60)),
        )
        .unwrap(),
    );
    let _checks = spawn_health_checks(
        b.clone(),
        Arc::new(TokioClock),
        |addr: SocketAddr| async move { get(addr, "/health").await },
    );

    // Backend 1 dies: every request still succeeds, on the others.
    backends[1].stop().await;
    for _ in 0..20 {
        let addr = request(&b).await.unwrap();
        assert_ne!(addr, backends[1].addr);
    }
    assert_eq!(backends[1].served(), 0);
    assert_eq!(backends[0].served() + backends[2].served(), 20);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.status(Instant::now())[1].state == EndpointState::Available {
        assert!(Instant::now() < deadline, "backend 1 never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = &b.status(Instant::now())[1];
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("refused"),
        "{status:?}"
    );

    // It returns: health checks re-admit it long before the 60 s ejection cooldown.
    backends[1].restart().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.status(Instant::now())[1].state != EndpointState::Available {
        assert!(
            Instant::now() < deadline,
            "backend 1 not re-admitted: {:?}",
            b.status(Instant::now())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = backends.iter().map(Backend::served).collect::<Vec<_>>();
    for _ in 0..30 {
        request(&b).await.unwrap();
    }
    let after: Vec<usize> = backends.iter().map(Backend::served).collect();
    let delta: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta, [10, 10, 10], "spread after re-admission");
}

#[tokio::test]
async fn all_backends_down_gives_one_clear_error() {
    let mut backends = [Backend::start().await, Backend::start().await];
    let b = Balancer::new(
        backends.iter().map(|s| s.addr).collect(),
        config(Duration::from_secs(60)),
    )
    .unwrap();
    for s in backends.iter_mut() {
        s.stop().await;
    }
    let err = request(&b).await.unwrap_err();
    assert!(
        err.starts_with("all 2 endpoints are unavailable: 127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("refused"), "{err}");
    assert!(!err.contains('\n'));
}

#[tokio::test]
async fn passive_cooldown_readmits_without_health_checks() {
    let mut backends = [Backend::start().await, Backend::start().await];
    let b = Balancer::new(
        backends.iter().map(|s| s.addr).collect(),
        config(Duration::from_millis(300)),
    )
    .unwrap();
    backends[0].stop().await;
    for _ in 0..6 {
        request(&b).await.unwrap();
    }
    assert!(matches!(
        b.status(Instant::now())[0].state,
        EndpointState::Ejected { .. }
    ));
    backends[0].restart().await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(b.status(Instant::now())[0].state, EndpointState::Probation);
    for _ in 0..4 {
        request(&b).await.unwrap();
    }
    assert_eq!(backends[0].served(), 2);
    assert_eq!(b.status(Instant::now())[0].state, EndpointState::Available);
}

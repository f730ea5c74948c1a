//! `vmcp mcp` against hostile input and hostile loopback servers (the mcp crate's
//! tests/common/hostile_server.rs): clear one-line errors, no panic, no secrets echoed, the
//! `--timeout` deadline named in retry errors. The soak (`#[ignore]`, run by
//! scripts/mcp-soak) mixes every hostile behaviour for 60 s and reports the peak RSS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../mcp/tests/common/hostile_server.rs"]
mod hostile_server;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hostile_server::{handshake, HostileServer};
use serde_json::json;

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn vmcp(args: &[&str]) -> Output {
    Command::new(VMCP).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn bad_options_give_clear_errors_without_secrets() {
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "mcp",
                "list-tools",
                "--url",
                "http://127.0.0.1:1/mcp",
                "--timeout",
                "1e30",
            ],
            "--timeout must be at most",
        ),
        (
            &[
                "mcp",
                "list-tools",
                "--url",
                "http://127.0.0.1:1/mcp",
                "--timeout",
                "NaN",
            ],
            "--timeout must be a positive",
        ),
        (
            &[
                "mcp",
                "list-tools",
                "--url",
                "http://127.0.0.1:1/mcp",
                "--header",
                "Authorization Bearer tok-s3cret",
            ],
            "--header",
        ),
        (
            &[
                "mcp",
                "list-tools",
                "--url",
                "http://user:pw-s3cret@127.0.0.1:1/mcp?token=tok-s3cret",
                "--timeout",
                "3",
            ],
            "http://127.0.0.1:1/mcp",
        ),
    ];
    for (args, needle) in cases {
        let out = vmcp(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("s3cret"), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    }
}

#[test]
fn the_timeout_is_the_retry_deadline() {
    let rt = runtime();
    // tools/list always 503 + Retry-After 1: retries would go on past --timeout.
    let server = rt.block_on(HostileServer::start(handler!(|req, conn, stats| {
        if req.rpc() == "tools/list" {
            conn.respond(503, &[("Retry-After", "1")], b"busy").await;
        } else {
            handshake(&req, &mut conn).await;
        }
    })));
    let t = Instant::now();
    let out = vmcp(&[
        "mcp",
        "list-tools",
        "--url",
        &server.url,
        "--protocol",
        "legacy",
        "--timeout",
        "2.5",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("deadline of 2.5 s"), "{err}");
    assert!(err.contains("HTTP 503"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn server_text_cannot_drive_the_terminal() {
    let rt = runtime();
    let server = rt.block_on(HostileServer::start(handler!(|req, conn, stats| {
        if req.rpc() == "tools/list" {
            let tool = json!({"name":"t\u{1b}]0;owned\u{7}","description":"\u{1b}[2Jwiped\u{202e}",
                "inputSchema":{"type":"object"}});
            conn.json(&json!({"jsonrpc":"2.0","id":req.id(),"result":{"tools":[tool]}}))
                .await;
        } else if req.rpc() == "tools/call" {
            conn.respond(500, &[], "\u{1b}[31mboom\u{1b}]8;;x\u{7}".as_bytes())
                .await;
        } else {
            handshake(&req, &mut conn).await;
        }
    })));
    let out = vmcp(&[
        "mcp",
        "list-tools",
        "--url",
        &server.url,
        "--protocol",
        "legacy",
    ]);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !shown.contains('\u{1b}') && !shown.contains('\u{202e}'),
        "{shown:?}"
    );
    assert!(shown.contains("wiped"), "{shown:?}");
    let out = vmcp(&[
        "mcp",
        "call",
        "t",
        "--url",
        &server.url,
        "--protocol",
        "legacy",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
    assert!(err.contains("boom"), "{err:?}");
}

/// Peak RSS (VmHWM) of a running process in KiB, from /proc (Linux).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `vmcp` with `args`, sampling its peak RSS every 50 ms; returns (output, peak KiB,
/// seconds).
fn run_measured(args: &[&str], limit: Duration) -> (Output, u64, f64) {
    let mut child = Command::new(VMCP)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    let mut peak = 0;
    // Read both pipes in threads so a chatty child cannot block on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("vmcp {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let secs = start.elapsed().as_secs_f64();
    let output = Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    (output, peak, secs)
}

/// The soak server: every hostile behaviour that does not end a call at once, for ~60 s, and
/// then the `*/list` byte bound ends `tools/list` with a clear error.
/// - GET stream: `retry: 0`, then a flood of `ping` requests (16 KiB params each) and
///   notifications, closed every 2 s (reconnects at the floor, with backoff);
/// - answers to the pings held 100 ms each (so they pile up without the concurrency bound);
/// - `tools/list`: fresh cursors forever, a page every ~0.5 s of 40 tools with 4 KiB
///   descriptions and nested schemas, alternately as SSE with server requests and
///   notifications before the answer and as a JSON batch of 200 messages; every 7th page
///   first gets a bare 503 (retried: `tools/list` is safe).
fn soak_handler() -> hostile_server::Handler {
    handler!(|req, conn, stats| {
        match (req.method.as_str(), req.rpc()) {
            ("GET", _) => {
                conn.sse_start().await;
                if !conn.write(b"retry: 0\n\n").await {
                    return;
                }
                let pad = "p".repeat(16 << 10);
                let t = Instant::now();
                let mut i = 0u64;
                while t.elapsed() < Duration::from_secs(2) {
                    i += 1;
                    let ping = json!({"jsonrpc":"2.0","id":format!("g{i}"),"method":"ping",
                        "params":{"pad":pad}});
                    let note = json!({"jsonrpc":"2.0","method":"notifications/message",
                        "params":{"level":"info","data":"\u{1b}[2Jflood"}});
                    if !conn.event(&ping).await || !conn.event(&note).await {
                        return;
                    }
                }
            }
            (_, "") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                conn.accepted().await;
            }
            (_, "tools/list") => {
                let n = stats.count("tools/list");
                if n % 7 == 0 {
                    conn.respond(503, &[], b"\x1b]0;proxy\x07 upstream timed out")
                        .await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
                let desc = "d".repeat(4 << 10);
                let tool = json!({"name":"t","description":desc,
                    "inputSchema":{"type":"object","properties":{"a":{"type":"array","items":[1,2,3]}}}});
                let page = json!({"jsonrpc":"2.0","id":req.id(),
                    "result":{"tools":vec![tool; 40],"nextCursor":format!("c{n}")}});
                if n % 2 == 0 {
                    conn.sse_start().await;
                    for i in 0..50 {
                        let r =
                            json!({"jsonrpc":"2.0","id":format!("s{n}-{i}"),"method":"roots/list"});
                        conn.event(&r).await;
                        conn.event(&json!({"jsonrpc":"2.0","method":"notifications/progress",
                            "params":{"progressToken":1,"progress":i}}))
                            .await;
                    }
                    conn.event(&page).await;
                } else {
                    let note = json!({"jsonrpc":"2.0","method":"notifications/progress",
                        "params":{"progressToken":1,"progress":0}});
                    let mut batch = vec![note; 199];
                    batch.push(page);
                    conn.json(&json!(batch)).await;
                }
            }
            _ => {
                handshake(&req, &mut conn).await;
            }
        }
    })
}

/// One-shot hostile behaviours that end a call at once (each run measured too).
fn fatal_handler(kind: &'static str, other: &'static str) -> hostile_server::Handler {
    handler!(|req, conn, stats| {
        if req.rpc() != "tools/list" {
            handshake(&req, &mut conn).await;
            return;
        }
        match kind {
            "cursor-loop" => {
                let next = if req.json["params"]["cursor"] == "a" {
                    "b"
                } else {
                    "a"
                };
                let r =
                    json!({"jsonrpc":"2.0","id":req.id(),"result":{"tools":[],"nextCursor":next}});
                conn.json(&r).await;
            }
            "huge-batch" => {
                // 30 MB: 10M empty objects.
                let mut body = Vec::with_capacity(30 << 20);
                body.push(b'[');
                for _ in 0..10_000_000 {
                    body.extend_from_slice(b"{},");
                }
                body.extend_from_slice(b"{}]");
                conn.respond(200, &[("Content-Type", "application/json")], &body)
                    .await;
            }
            "huge-array" => {
                // 60 MB: one 30M-element array.
                let mut body = Vec::with_capacity(60 << 20);
                body.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
                body.extend_from_slice(req.id().to_string().as_bytes());
                body.extend_from_slice(br#","result":{"tools":[],"x":["#);
                for _ in 0..30_000_000 {
                    body.extend_from_slice(b"0,");
                }
                body.extend_from_slice(b"0]}}");
                conn.respond(200, &[("Content-Type", "application/json")], &body)
                    .await;
            }
            "redirect" => conn.respond(307, &[("Location", other)], b"").await,
            "foreign-id" => {
                let r = json!({"jsonrpc":"2.0","id":987654,"result":{"tools":[]}});
                conn.json(&r).await;
            }
            _ => conn.respond(500, &[], b"?").await,
        }
    })
}

/// `scripts/mcp-soak`: prints the peak RSS of `vmcp mcp list-tools` against the soak server
/// (60 s) and against each one-shot hostile behaviour; fails above 64 MiB or without a clear
/// error.
#[test]
#[ignore = "60 s soak; run with scripts/mcp-soak (release build)"]
fn soak_hostile_server() {
    const LIMIT_KIB: u64 = 64 << 10;
    let rt = runtime();
    let server = rt.block_on(HostileServer::start(soak_handler()));
    let (out, peak, secs) = run_measured(
        &[
            "mcp",
            "list-tools",
            "--url",
            &server.url,
            "--protocol",
            "legacy",
        ],
        Duration::from_secs(180),
    );
    let err = text(&out.stderr);
    let last = err.trim().lines().last().unwrap_or("").to_owned();
    println!(
        "soak: {secs:.1} s, peak RSS {:.1} MiB, {} tools/list POSTs, {} ping answers, {} GETs, exit {:?}: {last}",
        peak as f64 / 1024.0,
        server.stats.count("tools/list"),
        server.stats.count("response"),
        server.stats.count("GET"),
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(last.contains("tools/list stopped: more than"), "{last}");
    assert!(
        secs >= 30.0,
        "the soak ended early after {secs:.1} s: {last}"
    );
    assert!(peak < LIMIT_KIB, "peak RSS {peak} KiB");
    // (vmcp's own log lines may be coloured; the server's escapes must not get through.)
    for evil in ["\u{1b}[2J", "\u{1b}]0;"] {
        assert!(!err.contains(evil), "server escape printed: {err:?}");
    }

    let elsewhere = rt.block_on(HostileServer::start(fatal_handler("none", "")));
    let other: &'static str = Box::leak(elsewhere.url.clone().into_boxed_str());
    for kind in [
        "cursor-loop",
        "huge-batch",
        "huge-array",
        "redirect",
        "foreign-id",
    ] {
        let server = rt.block_on(HostileServer::start(fatal_handler(kind, other)));
        let (out, peak, secs) = run_measured(
            &[
                "mcp",
                "list-tools",
                "--url",
                &server.url,
                "--protocol",
                "legacy",
            ],
            Duration::from_secs(120),
        );
        let err = text(&out.stderr);
        let rss = if peak == 0 {
            "not sampled (ended within 50 ms)".to_owned()
        } else {
            format!("{:.1} MiB", peak as f64 / 1024.0)
        };
        println!(
            "{kind}: {secs:.1} s, peak RSS {rss}, exit {:?}: {}",
            out.status.code(),
            err.trim()
        );
        assert_eq!(out.status.code(), Some(125), "{kind}: {err}");
        assert!(peak < LIMIT_KIB, "{kind}: peak RSS {peak} KiB");
    }
    assert_eq!(
        elsewhere.stats.total(),
        0,
        "the redirect target was reached"
    );
}

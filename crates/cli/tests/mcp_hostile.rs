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

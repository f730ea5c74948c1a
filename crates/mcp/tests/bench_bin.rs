//! The benchmark client (`vmcp-mcp-bench`) speaks the anchor's candidate protocol: one JSON
//! line per phase with the required numeric fields, against HTTP (both generations) and stdio.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "common/mcp_server.rs"]
mod mcp_server;

use std::path::PathBuf;

use mcp_server::{McpServer, Options, Speaks};
use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_vmcp-mcp-bench");

async fn run(args: &[&str]) -> Vec<Value> {
    let out = tokio::process::Command::new(BENCH)
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn check(lines: &[Value], concs: &[u64], calls: u64) {
    assert_eq!(lines.len(), concs.len());
    for (l, c) in lines.iter().zip(concs) {
        assert_eq!(l["conc"], *c);
        assert_eq!(l["calls"], calls);
        assert_eq!(l["errors"], 0);
        for k in ["rate", "p50_ms", "p99_ms", "secs"] {
            assert!(l[k].is_number(), "{k} in {l}");
        }
    }
}

#[tokio::test]
async fn bench_client_over_http_both_modes() {
    for (speaks, sse, mode) in [
        (Speaks::Legacy, true, "legacy"),
        (Speaks::Modern, false, "2026-07-28"),
    ] {
        let s = McpServer::start(Options {
            speaks,
            sse,
            ..Options::default()
        })
        .await;
        let lines = run(&[
            "--url", &s.url, "--mode", mode, "--n", "40", "--secs", "10", "--conc", "1,4",
            "--warmup", "3",
        ])
        .await;
        check(&lines, &[1, 4], 40);
        assert_eq!(s.calls(), 3 + 40 + 40);
    }
}

#[tokio::test]
async fn bench_client_over_stdio() {
    let Some(py) = ["python3", "python"].into_iter().find(|p| {
        std::process::Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        vmcp_test_support::skipped!("SKIPPED: no python3 for the stdio test server");
        return;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/common/stdio_server.py");
    let script = script.to_str().unwrap();
    let lines = run(&[
        "--stdio", "--mode", "legacy", "--n", "30", "--secs", "10", "--conc", "1", "--", py, script,
    ])
    .await;
    check(&lines, &[1], 30);
}

#[tokio::test]
async fn bench_client_rejects_bad_flags() {
    for args in [
        &["--mode", "x", "--url", "http://h/"][..],
        &["--n"],
        &[],
        &["--url", "http://h/", "--", "cmd"],
    ] {
        let out = tokio::process::Command::new(BENCH)
            .args(args)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("vmcp-mcp-bench: "));
    }
}

//! `vmcp mcp list-tools` and `vmcp mcp call` as a user runs them: the real binary against the
//! stdio test server of the mcp crate (Python) and against closed ports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Output};

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn python() -> Option<&'static str> {
    ["python3", "python"].into_iter().find(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn server() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mcp/tests/common/stdio_server.py")
        .to_string_lossy()
        .into_owned()
}

fn vmcp(args: &[&str]) -> Output {
    Command::new(VMCP).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn list_and_call_over_stdio() {
    let Some(py) = python() else {
        vmcp_test_support::skipped!("SKIPPED: no python3 for the stdio test server");
        return;
    };
    let srv = server();
    for mode in ["legacy", "modern"] {
        let out = vmcp(&["mcp", "list-tools", "--stdio", "--", py, &srv, mode]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "echo");

        let out = vmcp(&[
            "mcp",
            "call",
            "echo",
            "--args",
            r#"{"message":"hi"}"#,
            "--stdio",
            "--",
            py,
            &srv,
            mode,
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "hi");

        let out = vmcp(&[
            "mcp",
            "call",
            "echo",
            "--json",
            "--args",
            r#"{"message":"hi"}"#,
            "--stdio",
            "--",
            py,
            &srv,
            mode,
        ]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["content"][0]["text"], "hi");
    }
    let out = vmcp(&["mcp", "list-tools", "--json", "--stdio", "--", py, &srv]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "echo");
}

#[test]
fn failures_are_one_line_and_non_zero() {
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["mcp".into(), "list-tools".into()], "--url"),
        (
            vec![
                "mcp".into(),
                "call".into(),
                "x".into(),
                "--args".into(),
                "[1]".into(),
                "--stdio".into(),
                "--".into(),
                "true".into(),
            ],
            "JSON object",
        ),
        (
            vec![
                "mcp".into(),
                "call".into(),
                "x".into(),
                "--args".into(),
                "{".into(),
                "--stdio".into(),
                "--".into(),
                "true".into(),
            ],
            "not valid JSON",
        ),
        (
            vec![
                "mcp".into(),
                "list-tools".into(),
                "--stdio".into(),
                "--".into(),
                "/nonexistent/srv".into(),
            ],
            "/nonexistent/srv",
        ),
        (
            vec![
                "mcp".into(),
                "list-tools".into(),
                "--url".into(),
                "not a url".into(),
            ],
            "not an http",
        ),
        (
            vec![
                "mcp".into(),
                "list-tools".into(),
                "--url".into(),
                "http://127.0.0.1:1/mcp".into(),
                "--header".into(),
                "nocolon".into(),
            ],
            "--header",
        ),
        (
            vec![
                "mcp".into(),
                "list-tools".into(),
                "--url".into(),
                "https://127.0.0.1:1/mcp".into(),
                "--ca-file".into(),
                "/nonexistent.pem".into(),
            ],
            "/nonexistent.pem",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = vmcp(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
    }
}

#[test]
fn tool_errors_and_rpc_errors_exit_non_zero() {
    let Some(py) = python() else {
        vmcp_test_support::skipped!("SKIPPED: no python3 for the stdio test server");
        return;
    };
    let srv = server();
    let out = vmcp(&["mcp", "call", "nope", "--stdio", "--", py, &srv]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("-32602"),
        "{}",
        text(&out.stderr)
    );
}

//! `vmcp mcp list-tools` / `call` against the official reference servers (TypeScript SDK's
//! server-everything, Python SDK), over stdio and Streamable HTTP. Skips loudly without them
//! (scripts/install.d/40-mcp-interop.sh), fails with VMCP_REQUIRE_INTEROP=1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../mcp/tests/common/interop_servers.rs"]
mod servers;

use servers::{HttpMode, HttpServer, Sdk};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn vmcp(args: &[String]) -> Out {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmcp"))
        .args(args)
        .env("NO_PROXY", "*")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn stdio_call(sdk: Sdk, tool: &str, json: &str) -> Option<Out> {
    let (program, server_args) = match servers::stdio_command(sdk) {
        Ok(c) => c,
        Err(reason) => {
            servers::skip(&reason);
            return None;
        }
    };
    let mut a = args(&["mcp", "call", tool, "--args", json, "--stdio", "--"]);
    a.push(program.display().to_string());
    a.extend(server_args);
    Some(vmcp(&a).await)
}

#[tokio::test]
async fn cli_calls_typescript_everything_over_stdio_and_http() {
    let Some(out) = stdio_call(Sdk::TypeScript, "echo", r#"{"message":"hi"}"#).await else {
        return;
    };
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "Echo: hi");

    let server = match HttpServer::start(Sdk::TypeScript, HttpMode::Sessions).await {
        Ok(s) => s,
        Err(reason) => return servers::skip(&reason),
    };
    let out = vmcp(&args(&["mcp", "list-tools", "--url", &server.url])).await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("echo")),
        "{}",
        out.stdout
    );
    let out = vmcp(&args(&[
        "mcp",
        "call",
        "get-sum",
        "--args",
        r#"{"a":2,"b":40}"#,
        "--url",
        &server.url,
    ]))
    .await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert!(out.stdout.contains("42"), "{}", out.stdout);
}

#[tokio::test]
async fn cli_calls_the_python_sdk_over_stdio_and_http() {
    let Some(out) = stdio_call(Sdk::Python, "add", r#"{"a":2,"b":40}"#).await else {
        return;
    };
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "42");

    let server = match HttpServer::start(Sdk::Python, HttpMode::Sessions).await {
        Ok(s) => s,
        Err(reason) => return servers::skip(&reason),
    };
    for protocol in ["auto", "legacy"] {
        let out = vmcp(&args(&[
            "mcp",
            "call",
            "echo",
            "--args",
            r#"{"message":"über"}"#,
            "--url",
            &server.url,
            "--protocol",
            protocol,
        ]))
        .await;
        assert_eq!(out.code, 0, "--protocol {protocol}: stderr: {}", out.stderr);
        assert_eq!(out.stdout.trim(), "über");
    }
    // An unknown tool: non-zero exit, one line on stderr.
    let out = vmcp(&args(&["mcp", "call", "nope", "--url", &server.url])).await;
    assert_ne!(out.code, 0);
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

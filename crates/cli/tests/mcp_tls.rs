//! `vmcp mcp` over HTTPS against a loopback MCP server whose certificate comes from a CA made
//! in the test: a rejected certificate ends the command with one line on stderr and a
//! non-zero exit; the right --ca-file / --client-cert makes it work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../mcp/tests/common/mcp_http_server.rs"]
mod mcp_server;
#[path = "../../mcp/tests/common/pki.rs"]
mod pki;
#[path = "../../mcp/tests/common/tls_server.rs"]
mod tls_server;

use std::path::Path;

use mcp_server::McpHttpServer;
use pki::{Pki, Validity};
use tls_server::{server_config, ServerOpts};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn vmcp(args: &[&str]) -> Out {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmcp"))
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
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

async fn https(ca: &pki::Ca, validity: Validity, client_ca: Option<&pki::Ca>) -> McpHttpServer {
    let leaf = ca.server(&["localhost"], validity);
    let config = server_config(ServerOpts {
        chain: leaf.chain(),
        key: leaf.key(),
        client_ca: client_ca.map(|c| c.cert_der.clone()),
        tls12_only: false,
    });
    McpHttpServer::start("secure", "localhost", Some(config)).await
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// One line on stderr, starting with `vmcp:`, containing `needle`; non-zero exit.
fn assert_one_line_error(out: &Out, needle: &str) {
    assert_ne!(out.code, 0, "stdout: {}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {}", out.stderr);
    assert!(lines[0].starts_with("vmcp: "), "{}", lines[0]);
    assert!(lines[0].contains(needle), "{}", lines[0]);
}

#[tokio::test]
async fn call_over_https_with_ca_file() {
    let pki = Pki::new();
    let ca = pki.ca("cli");
    let server = https(&ca, Validity::Good, None).await;
    let out = vmcp(&[
        "mcp",
        "call",
        "whoami",
        "--url",
        &server.url,
        "--ca-file",
        p(&ca.cert_file),
    ])
    .await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "secure");
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn unknown_ca_is_one_line_error() {
    let pki = Pki::new();
    let ca = pki.ca("cli");
    let server = https(&ca, Validity::Good, None).await;
    let out = vmcp(&["mcp", "list-tools", "--url", &server.url]).await;
    assert_one_line_error(&out, "unknown authority");
    assert!(out.stderr.contains("--ca-file"), "{}", out.stderr);
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn expired_certificate_is_one_line_error() {
    let pki = Pki::new();
    let ca = pki.ca("cli");
    let server = https(&ca, Validity::Expired, None).await;
    let out = vmcp(&[
        "mcp",
        "call",
        "whoami",
        "--url",
        &server.url,
        "--ca-file",
        p(&ca.cert_file),
    ])
    .await;
    assert_one_line_error(&out, "expired");
    assert_eq!(server.calls(), 0);
}

#[tokio::test]
async fn mtls_through_the_cli() {
    let pki = Pki::new();
    let ca = pki.ca("cli");
    let clients = pki.ca("clients");
    let server = https(&ca, Validity::Good, Some(&clients)).await;
    let id = clients.client("agent");
    let ok = vmcp(&[
        "mcp",
        "call",
        "whoami",
        "--url",
        &server.url,
        "--ca-file",
        p(&ca.cert_file),
        "--client-cert",
        p(&id.cert_file),
        "--client-key",
        p(&id.key_file),
    ])
    .await;
    assert_eq!(ok.code, 0, "stderr: {}", ok.stderr);
    assert_eq!(ok.stdout.trim(), "secure");

    let without = vmcp(&[
        "mcp",
        "call",
        "whoami",
        "--url",
        &server.url,
        "--ca-file",
        p(&ca.cert_file),
    ])
    .await;
    assert_one_line_error(&without, "client certificate");
    assert_eq!(server.calls(), 1);
}

#[tokio::test]
async fn bad_tls_files_are_one_line_errors() {
    let pki = Pki::new();
    let ca = pki.ca("cli");
    let server = https(&ca, Validity::Good, None).await;
    let missing = pki.path().join("nope.pem");
    let out = vmcp(&[
        "mcp",
        "list-tools",
        "--url",
        &server.url,
        "--ca-file",
        p(&missing),
    ])
    .await;
    assert_one_line_error(&out, "cannot read CA file");
    let a = ca.client("a");
    let b = ca.client("b");
    let out = vmcp(&[
        "mcp",
        "list-tools",
        "--url",
        &server.url,
        "--ca-file",
        p(&ca.cert_file),
        "--client-cert",
        p(&a.cert_file),
        "--client-key",
        p(&b.key_file),
    ])
    .await;
    assert_one_line_error(&out, "does not match");
}

#[tokio::test]
async fn insecure_flag_works_and_warns() {
    let pki = Pki::new();
    let ca = pki.ca("cli");
    let server = https(&ca, Validity::Expired, None).await;
    let out = vmcp(&[
        "mcp",
        "call",
        "whoami",
        "--url",
        &server.url,
        "--insecure-skip-tls-verify",
    ])
    .await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout.trim(), "secure");
    assert!(
        out.stderr
            .contains("WARNING: TLS certificate verification is OFF"),
        "{}",
        out.stderr
    );
}

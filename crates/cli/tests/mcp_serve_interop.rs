//! The reference SDK clients against `vmcp mcp serve`: the Python SDK (`mcp`, pinned in
//! scripts/install.d/40-mcp-interop.sh) lists every tool and calls them over stdio and
//! Streamable HTTP, in both protocol generations (`legacy` = initialize; `auto` = discover,
//! which picks 2026-07-28). VM-free runs boot nothing (sandbox_list, an invalid argument, a
//! not-yet tool); one run over HTTP drives every VM tool when VMs can boot here. Without the
//! SDK the tests print `SKIPPED` (fail under `VMCP_REQUIRE_INTEROP=1`). The TypeScript SDK client
//! (2025 generation only) lists and calls over stdio and HTTP too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn serve_http(runtime: &Path, extra: &[String]) -> (Child, String) {
    vmcp_test_support::mcp_serve_http(VMCP, runtime, extra)
}

fn prefix() -> PathBuf {
    std::env::var_os("VMCP_INTEROP_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/vmcp-interop"))
}

fn skip(reason: &str) {
    if std::env::var_os("VMCP_REQUIRE_INTEROP").is_some_and(|v| v == "1") {
        panic!("VMCP_REQUIRE_INTEROP=1 but {reason}");
    }
    vmcp_test_support::skipped!(
        "SKIPPED: {reason} (run scripts/install-deps, or set VMCP_INTEROP_PREFIX)"
    );
}

fn python() -> Option<PathBuf> {
    let p = prefix().join("py/bin/python3");
    if p.is_file() {
        Some(p)
    } else {
        skip(&format!("no Python MCP SDK at {}", p.display()));
        None
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/py_client.py")
}

/// Dummy boot files: enough for a server that boots nothing.
fn dummy_image(dir: &Path) -> Vec<String> {
    std::fs::write(dir.join("kernel"), b"k").unwrap();
    std::fs::write(dir.join("initrd"), b"i").unwrap();
    vec![
        "--kernel".into(),
        dir.join("kernel").display().to_string(),
        "--initrd".into(),
        dir.join("initrd").display().to_string(),
    ]
}

fn run_client(py: &Path, args: &[String]) -> String {
    let out = Command::new(py)
        .arg(script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "py_client {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn python_sdk_client_over_stdio_both_generations() {
    let Some(py) = python() else { return };
    let runtime = tempfile::tempdir().unwrap();
    let image = dummy_image(runtime.path());
    for (mode, version) in [("legacy", "2025-11-25"), ("auto", "2026-07-28")] {
        let mut args: Vec<String> = vec![
            "stdio".into(),
            mode.into(),
            "novm".into(),
            VMCP.into(),
            "mcp".into(),
            "serve".into(),
        ];
        args.extend(image.clone());
        let out = run_client(&py, &args);
        assert!(out.contains("tools listed: 15"), "{out}");
        assert!(out.contains("invalid argument ok: invalid arguments for sandbox_create: cpus: must be <= 4, got 1000"), "{out}");
        assert!(out.trim_end().ends_with(&format!("OK {version}")), "{out}");
    }
}

#[test]
fn python_sdk_client_over_http_both_generations() {
    let Some(py) = python() else { return };
    let runtime = tempfile::tempdir().unwrap();
    let image = dummy_image(runtime.path());
    let (mut child, url) = serve_http(runtime.path(), &image);
    for (mode, version) in [("legacy", "2025-11-25"), ("auto", "2026-07-28")] {
        let out = run_client(
            &py,
            &["http".into(), mode.into(), "novm".into(), url.clone()],
        );
        assert!(out.contains("sandbox_list ok"), "{out}");
        assert!(out.trim_end().ends_with(&format!("OK {version}")), "{out}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn python_sdk_client_drives_every_vm_tool_over_http() {
    let Some(py) = python() else { return };
    if !vmcp_test_support::vm::ready(VMCP) {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let (mut child, url) = serve_http(runtime.path(), &[]);
    let out = run_client(&py, &["http".into(), "auto".into(), "vm".into(), url]);
    assert!(out.contains("vm tools ok"), "{out}");
    let sent = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(sent.success());
    assert_eq!(child.wait().unwrap().code(), Some(143));
    assert!(std::fs::read_dir(runtime.path()).unwrap().next().is_none());
}

/// The TypeScript SDK (`@modelcontextprotocol/sdk`, the version `server-everything` pins, 1.32.2
/// with 2026.8.31) speaks the 2025 generation only.
#[test]
fn typescript_sdk_client_over_stdio_and_http() {
    let sdk = prefix().join("ts/node_modules/@modelcontextprotocol/sdk");
    if !sdk.join("package.json").is_file() {
        skip(&format!("no TypeScript MCP SDK at {}", sdk.display()));
        return;
    }
    if Command::new("node").arg("--version").output().is_err() {
        skip("no node");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/ts_client.mjs");
    let runtime = tempfile::tempdir().unwrap();
    let image = dummy_image(runtime.path());
    let node = |args: Vec<String>| {
        let out = Command::new("node")
            .arg(&script)
            .arg(&sdk)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ts_client {args:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("tools listed: 15") && stdout.contains("invalid argument ok"),
            "{stdout}"
        );
        stdout
    };
    let mut args: Vec<String> = vec!["stdio".into(), VMCP.into(), "mcp".into(), "serve".into()];
    args.extend(image.clone());
    node(args);
    let (mut child, url) = serve_http(runtime.path(), &image);
    let out = node(vec!["http".into(), url]);
    assert!(out.trim_end().ends_with("OK 2025-11-25"), "{out}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The official conformance harness (`@modelcontextprotocol/conformance`, pinned in
/// scripts/install.d/40-mcp-interop.sh) in server mode against `vmcp mcp serve --http`: the
/// scenarios of issue 14, which need no VM (initialize, ping, tools/list, concurrent POST
/// streams on one session, DNS-rebinding protection). The harness runs locally and needs no
/// network. All scenarios run at once against one server.
#[test]
fn conformance_harness_server_scenarios() {
    const SCENARIOS: [&str; 5] = [
        "server-initialize",
        "ping",
        "tools-list",
        "server-sse-multiple-streams",
        "dns-rebinding-protection",
    ];
    let cli =
        prefix().join("conformance/node_modules/@modelcontextprotocol/conformance/dist/index.js");
    if !cli.is_file() {
        skip(&format!("no MCP conformance harness at {}", cli.display()));
        return;
    }
    if Command::new("node").arg("--version").output().is_err() {
        skip("no node (the MCP conformance harness is a Node.js program)");
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let image = dummy_image(runtime.path());
    let (mut child, url) = serve_http(runtime.path(), &image);
    let runs: Vec<_> = SCENARIOS
        .iter()
        .map(|scenario| {
            let (cli, url) = (cli.clone(), url.clone());
            std::thread::spawn(move || {
                let out = Command::new("node")
                    .arg(&cli)
                    .args(["server", "--url", &url, "--scenario", scenario])
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .output()
                    .unwrap();
                (scenario, out)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for run in runs {
        let (scenario, out) = run.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // "Passed: 1/1, 0 failed, 0 warnings": no failure and no warning.
        let clean = stdout.contains(", 0 failed, 0 warnings");
        if !out.status.success() || !clean {
            failures.push(format!(
                "{scenario}: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n----\n"));
}

/// MCP elicitation through the Python SDK's elicitation callback: a `tool` rule that asks is
/// approved (the call runs) or denied (a tool error says so), a `deny` rule refuses without
/// asking, and every decision lands in the audit log. VM-free: the gated tools need no VM.
#[test]
fn python_sdk_client_answers_elicitation_approve_and_deny() {
    let Some(py) = python() else { return };
    let runtime = tempfile::tempdir().unwrap();
    let image = dummy_image(runtime.path());
    let policy = runtime.path().join("policy.toml");
    std::fs::write(
        &policy,
        "default = \"allow\"\n[[rule]]\naction = \"ask\"\ntool = \"sandbox_list\"\n[[rule]]\naction = \"deny\"\ntool = \"sandbox_destroy\"\n",
    )
    .unwrap();
    let audit = runtime.path().join("audit.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/py_elicit.py");
    for answer in ["approve", "deny"] {
        let mut args: Vec<String> = vec![
            answer.into(),
            VMCP.into(),
            "mcp".into(),
            "serve".into(),
            "--policy".into(),
            policy.display().to_string(),
            "--audit-log".into(),
            audit.display().to_string(),
        ];
        args.extend(image.clone());
        let out = Command::new(&py)
            .arg(&script)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "py_elicit {answer}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("asked: "), "{stdout}");
        assert!(stdout.trim_end().ends_with("OK"), "{stdout}");
    }
    // Over Streamable HTTP: the question travels on the call's SSE stream.
    let mut extra: Vec<String> = vec![
        "--policy".into(),
        policy.display().to_string(),
        "--audit-log".into(),
        audit.display().to_string(),
    ];
    extra.extend(image.clone());
    let (mut child, url) = serve_http(runtime.path(), &extra);
    let out = Command::new(&py)
        .arg(&script)
        .args(["approve", "http", &url])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "py_elicit over http:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2]["decision"], "approved");
    assert_eq!(lines[0]["kind"], "tool_call");
    assert_eq!(lines[0]["decision"], "approved");
    assert_eq!(lines[0]["by"], "elicitation");
    assert_eq!(lines[1]["decision"], "denied");
}

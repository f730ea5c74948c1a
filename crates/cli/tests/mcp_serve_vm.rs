//! `vmcp mcp serve` with real VMs (TCG here): our client drives every tool over stdio and
//! HTTP; SIGTERM and SIGKILL of the server leave no VM and (after the next start) no runtime
//! directory. Each test gives vmcp its own `XDG_RUNTIME_DIR`; without QEMU or a built image
//! they print `SKIPPED: <reason>` (fail under `VMCP_REQUIRE_VM=1`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::stdio::{StderrMode, StdioConfig, StdioTransport};
use vmcp_mcp::{Client, ClientConfig, Lifecycle, Transport};

use vmcp_test_support::{http_server, vm};

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn assert_clean(dir: &Path) {
    let left: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn qemu_children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid: u32 = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == parent && stat[open + 1..close].starts_with("qemu-system") {
            found.push(pid);
        }
    }
    found
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

async fn call<T: Transport>(c: &Client<T>, tool: &str, args: Value) -> Value {
    let r = c.call_tool(tool, Some(&args)).await.unwrap();
    assert!(!r.is_error(), "{tool} failed: {:?}", r.content);
    r.structured_content.unwrap()
}

/// Every working tool, in the order an agent would use them; checkpoint, fork and rewind only
/// with `snapshots` (once per run: they take a few seconds under TCG).
async fn drive<T: Transport>(c: &Client<T>, snapshots: bool) {
    let names: Vec<String> = c
        .list_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(names.len() >= 15, "{names:?}");
    let id = call(c, "sandbox_create", json!({"memory_mib": 256})).await["sandbox_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = call(
        c,
        "sandbox_exec",
        json!({"sandbox_id": id, "command": "echo $X; echo e >&2; exit 4", "env": {"X": "hi"}}),
    )
    .await;
    assert_eq!(
        (
            r["stdout"].clone(),
            r["stderr"].clone(),
            r["exit_code"].clone()
        ),
        (json!("hi\n"), json!("e\n"), json!(4))
    );
    let r = call(
        c,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["tr", "a-z", "A-Z"], "stdin": "up", "cwd": "/tmp"}),
    )
    .await;
    assert_eq!(r["stdout"], "UP");
    call(
        c,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": "/tmp/f.txt", "content": "state kept"}),
    )
    .await;
    let r = call(
        c,
        "sandbox_exec",
        json!({"sandbox_id": id, "command": "cat /tmp/f.txt"}),
    )
    .await;
    assert_eq!(r["stdout"], "state kept");
    let r = call(
        c,
        "sandbox_read_file",
        json!({"sandbox_id": id, "path": "/tmp/f.txt"}),
    )
    .await;
    assert_eq!(r["content"], "state kept");
    let r = call(
        c,
        "sandbox_list_files",
        json!({"sandbox_id": id, "path": "/tmp"}),
    )
    .await;
    assert!(
        r["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "f.txt" && e["size"] == 10 && e["type"] == "file"),
        "{r}"
    );
    let p = call(
        c,
        "sandbox_exec_start",
        json!({"sandbox_id": id, "command": "read x; echo got $x; sleep 600", "stdin_open": true}),
    )
    .await;
    let pid = p["process_id"].as_str().unwrap().to_owned();
    call(
        c,
        "sandbox_exec_write_stdin",
        json!({"sandbox_id": id, "process_id": pid, "data": "line\n"}),
    )
    .await;
    let mut cursor = 0;
    let mut seen = String::new();
    for _ in 0..20 {
        let r = call(
            c,
            "sandbox_exec_poll",
            json!({"sandbox_id": id, "process_id": pid, "cursor": cursor, "wait_ms": 2000}),
        )
        .await;
        seen.push_str(r["stdout"].as_str().unwrap());
        cursor = r["next_cursor"].as_u64().unwrap();
        if seen.contains("got line") {
            break;
        }
    }
    assert_eq!(seen, "got line\n");
    call(
        c,
        "sandbox_exec_signal",
        json!({"sandbox_id": id, "process_id": pid, "signal": "SIGKILL"}),
    )
    .await;
    let r = call(
        c,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": pid, "cursor": cursor, "wait_ms": 10000}),
    )
    .await;
    assert_eq!(
        (r["running"].clone(), r["signal"].clone()),
        (json!(false), json!(9)),
        "{r}"
    );
    let r = call(
        c,
        "sandbox_exec",
        json!({"sandbox_id": id, "command": "sleep 30", "timeout_secs": 0.5}),
    )
    .await;
    assert_eq!(r["timed_out"], true);
    // Checkpoint, fork and rewind of the real VM: A was written before the checkpoint, B after.
    let sh = |cmd: &str| json!({"sandbox_id": id, "command": cmd});
    if snapshots {
        call(c, "sandbox_exec", sh("echo A > /root/a")).await;
        let r = call(c, "sandbox_checkpoint", json!({"sandbox_id": id})).await;
        let ck = r["checkpoint_id"].as_str().unwrap().to_owned();
        call(c, "sandbox_exec", sh("echo B > /root/b")).await;
        let r = call(c, "sandbox_fork", json!({"checkpoint_id": ck})).await;
        let fork = r["sandbox_ids"][0].as_str().unwrap().to_owned();
        let files = json!({"sandbox_id": fork, "command": "ls /root; hostname"});
        let r = call(c, "sandbox_exec", files).await;
        let out = r["stdout"].as_str().unwrap();
        assert!(out.starts_with("a\nvmcp-"), "{r}");
        let r = call(c, "sandbox_exec", sh("hostname")).await;
        assert!(
            !out.ends_with(r["stdout"].as_str().unwrap()),
            "own hostname"
        );
        call(
            c,
            "sandbox_rewind",
            json!({"sandbox_id": id, "checkpoint_id": ck}),
        )
        .await;
        let r = call(c, "sandbox_exec", sh("ls /root")).await;
        assert_eq!(r["stdout"], "a\n", "{r}");
        call(c, "sandbox_destroy", json!({"sandbox_id": fork})).await;
    }
    let r = call(c, "sandbox_list", json!({})).await;
    assert_eq!(r["sandboxes"][0]["sandbox_id"], json!(id));
    call(c, "sandbox_destroy", json!({"sandbox_id": id})).await;
    let r = call(c, "run", json!({"argv": ["true"]})).await;
    assert_eq!(r["exit_code"], 0);
    let r = c
        .call_tool("sandbox_fork", Some(&json!({"sandbox_id": id})))
        .await
        .unwrap();
    assert!(r.is_error());
    assert!(r.content[0].as_text().unwrap().contains("no sandbox"));
}

#[test]
fn our_client_drives_every_tool_over_stdio() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = stdio_client(runtime.path(), &[]).await;
        drive(&c, true).await;
        // A sandbox left alive is killed when the session ends (stdin closed).
        call(&c, "sandbox_create", json!({})).await;
        c.close().await;
    });
    assert_clean(runtime.path());
}

/// `vmcp mcp serve FLAGS` (with the test image) over stdio, its runtime directory
/// `runtime`, initialized.
async fn stdio_client(runtime: &Path, flags: &[&str]) -> Client<StdioTransport> {
    let mut args: Vec<String> = ["mcp", "serve"]
        .into_iter()
        .chain(flags.iter().copied())
        .map(String::from)
        .collect();
    args.extend(vm::image_args());
    let cfg = StdioConfig::new(VMCP, args)
        .with_env("XDG_RUNTIME_DIR", runtime)
        .with_stderr(StderrMode::Null);
    Client::connect(
        StdioTransport::spawn(&cfg).unwrap(),
        ClientConfig::default().with_lifecycle(Lifecycle::Initialize),
    )
    .await
    .unwrap()
}

async fn http_client(
    url: &str,
    lifecycle: Lifecycle,
) -> Client<StreamableHttpTransport<ReqwestClient>> {
    let http = ReqwestClient::new(&ReqwestOptions::default()).unwrap();
    let t = StreamableHttpTransport::new(http, HttpConfig::new([url.to_owned()])).unwrap();
    Client::connect(t, ClientConfig::default().with_lifecycle(lifecycle))
        .await
        .unwrap()
}

#[test]
fn http_both_generations_then_sigterm_destroys_every_sandbox() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let (mut child, url) =
        vmcp_test_support::mcp_serve_http(VMCP, runtime.path(), &vm::image_args());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let modern = http_client(&url, Lifecycle::Discover).await;
        drive(&modern, false).await;
        let legacy = http_client(&url, Lifecycle::Initialize).await;
        let id = call(&legacy, "sandbox_create", json!({})).await["sandbox_id"]
            .as_str()
            .unwrap()
            .to_owned();
        // The stateless client sees and uses the legacy session's sandbox by id.
        let r = call(
            &modern,
            "sandbox_exec",
            json!({"sandbox_id": id, "argv": ["echo", "shared"]}),
        )
        .await;
        assert_eq!(r["stdout"], "shared\n");
    });
    let qemu = qemu_children(child.id());
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    // The shell's builtin `kill`: no procps needed.
    let sent = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert!(gone_within(qemu[0], Duration::from_secs(5)));
    assert_clean(runtime.path());
}

#[test]
fn sigkill_of_the_server_takes_its_vms_down_and_the_next_start_sweeps() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let runtime = tempfile::tempdir().unwrap();
    let (mut child, url) =
        vmcp_test_support::mcp_serve_http(VMCP, runtime.path(), &vm::image_args());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = http_client(&url, Lifecycle::Auto).await;
        call(&c, "sandbox_create", json!({})).await;
    });
    let qemu = qemu_children(child.id());
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    assert!(
        gone_within(qemu[0], Duration::from_secs(5)),
        "QEMU outlived the SIGKILLed server"
    );
    // Its runtime directory is left; the next start sweeps it.
    assert!(std::fs::read_dir(runtime.path()).unwrap().next().is_some());
    let out = Command::new(VMCP)
        .args(["run"])
        .args(vm::image_args())
        .args(["--", "true"])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean(runtime.path());
}

/// `network` within the server's `--net-allow` ceiling: the allowed host is reached, a
/// widening request is refused naming the rule, and each refused connection (of the exec
/// itself, and of a background process before it) is listed in the next exec's result.
#[test]
fn sandbox_network_stays_within_the_ceiling_and_reports_refusals() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let (allowed, allowed_hits) = http_server("allowed-body");
    let (other, other_hits) = http_server("other-body");
    let runtime = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let flags = ["--net-allow", "127.0.0.1", "--net-via", "card"];
        let c = stdio_client(runtime.path(), &flags).await;
        for (net, want) in [
            ("allow=127.0.0.0/8", "network: 127.0.0.0/8 is not within the allow list this server permits (127.0.0.1)"),
            ("nat", "network: nat (unrestricted network) is not permitted by this server"),
        ] {
            let r = c
                .call_tool("sandbox_create", Some(&json!({"network": net})))
                .await
                .unwrap();
            assert!(r.is_error(), "{net}");
            let text = r.content[0].as_text().unwrap();
            assert!(text.contains(want), "{net}: {text}");
        }
        let created = call(
            &c,
            "sandbox_create",
            json!({"network": format!("allow=127.0.0.1:{allowed}")}),
        )
        .await;
        assert_eq!(created["network"], format!("allow=127.0.0.1:{allowed}"));
        assert!(
            created["notices"][0]
                .as_str()
                .unwrap()
                .contains("booted cold: a VM with a network card"),
            "{created}"
        );
        let id = created["sandbox_id"].as_str().unwrap().to_owned();
        // A background process is refused first; its refusal shows in a poll.
        let p = call(
            &c,
            "sandbox_exec_start",
            json!({"sandbox_id": id, "command": format!("NO_PROXY= no_proxy= wget -q -O - http://127.0.0.1:{other}/bg")}),
        )
        .await;
        let pid = p["process_id"].as_str().unwrap().to_owned();
        let mut cursor = 0;
        let mut polled_denials = Vec::new();
        for _ in 0..20 {
            let polled = call(
                &c,
                "sandbox_exec_poll",
                json!({"sandbox_id": id, "process_id": pid, "cursor": cursor, "wait_ms": 2000}),
            )
            .await;
            cursor = polled["next_cursor"].as_u64().unwrap();
            polled_denials.extend(polled["egress_denied"].as_array().unwrap().iter().cloned());
            if polled["running"] == false {
                assert_ne!(polled["exit_code"], 0, "{polled}");
                break;
            }
        }
        let script = format!(
            "export NO_PROXY= no_proxy=
             wget -q -O - http://127.0.0.1:{allowed}/
             wget -q -O - http://127.0.0.1:{other}/ >/dev/null 2>&1; echo \" B:$?\""
        );
        let r = call(&c, "sandbox_exec", json!({"sandbox_id": id, "command": script})).await;
        let stdout = r["stdout"].as_str().unwrap();
        assert!(stdout.starts_with("allowed-body"), "{r}");
        assert!(!stdout.contains(" B:0"), "{r}");
        let line = format!(
            "connection to 127.0.0.1:{other} (GET request) refused by egress policy (no-rule): no rule allows 127.0.0.1:{other} (127.0.0.1:{allowed} allows another port)"
        );
        assert_eq!(polled_denials, vec![json!(line.clone())]);
        assert_eq!(r["egress_denied"], json!([line]), "{r}");
        // Reported once: the next exec lists nothing new.
        let r = call(&c, "sandbox_exec", json!({"sandbox_id": id, "argv": ["true"]})).await;
        assert_eq!(r["egress_denied"], json!([]), "{r}");
        c.close().await;
    });
    assert_eq!(allowed_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(other_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_clean(runtime.path());
}

/// `--net-via channel`: a sandbox's allow-list travels over the agent channel (no card), so
/// it starts from the snapshot and the agent can fork it; the fork reaches the allowed host
/// through its own proxy and its refusals are reported in its own results.
#[test]
fn networked_sandbox_over_the_agent_channel_can_be_forked() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let (allowed, allowed_hits) = http_server("allowed-body");
    let (other, other_hits) = http_server("other-body");
    let runtime = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let flags = ["--net-allow", "127.0.0.1", "--net-via", "channel"];
        let c = stdio_client(runtime.path(), &flags).await;
        let created = call(
            &c,
            "sandbox_create",
            json!({"network": format!("allow=127.0.0.1:{allowed}")}),
        )
        .await;
        // No network setting is in the guest's boot state: it starts from the snapshot.
        assert!(
            !created["notices"].to_string().contains("booted cold"),
            "{created}"
        );
        let id = created["sandbox_id"].as_str().unwrap().to_owned();
        let script = format!(
            "export NO_PROXY= no_proxy=; ls /sys/class/net
             wget -q -O - http://127.0.0.1:{allowed}/
             wget -q -O - http://127.0.0.1:{other}/ >/dev/null 2>&1; echo \" B:$?\""
        );
        let refused = format!(
            "connection to 127.0.0.1:{other} (GET request) refused by egress policy (no-rule): no rule allows 127.0.0.1:{other} (127.0.0.1:{allowed} allows another port)"
        );
        for sandbox in [id.clone(), String::new()] {
            let sandbox = if sandbox.is_empty() {
                let r = call(&c, "sandbox_fork", json!({"sandbox_id": id})).await;
                r["sandbox_ids"][0].as_str().unwrap().to_owned()
            } else {
                sandbox
            };
            let r = call(&c, "sandbox_exec", json!({"sandbox_id": sandbox, "command": script})).await;
            let stdout = r["stdout"].as_str().unwrap();
            assert!(stdout.starts_with("lo\nallowed-body"), "{r}");
            assert!(!stdout.contains(" B:0"), "{r}");
            assert_eq!(r["egress_denied"], json!([refused.clone()]), "{r}");
        }
        c.close().await;
    });
    assert_eq!(allowed_hits.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(other_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_clean(runtime.path());
}

//! The sandbox tools over the fake backend: every tool, limits, timeouts, ownership and
//! cleanup. Outputs are checked against each tool's published outputSchema.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{call, create, ctx, eventually, tools, FakeFactory};
use serde_json::json;
use vmcp_mcp_server::tool::Canceller;
use vmcp_mcp_server::ToolSet;
use vmcp_sandbox::tools::SandboxTools;
use vmcp_vm::fake::Faults;

/// A call with no session that must succeed.
async fn ok(t: &SandboxTools, tool: &str, args: serde_json::Value) -> serde_json::Value {
    call(t, tool, args, ctx(None)).await.unwrap()
}

/// A call with no session that must fail; its error text.
async fn fail(t: &SandboxTools, tool: &str, args: serde_json::Value) -> String {
    call(t, tool, args, ctx(None)).await.unwrap_err()
}

#[tokio::test]
async fn create_exec_files_destroy() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |_| {});
    let id = create(&t, Some("s1")).await;
    assert!(id.starts_with("sb-") && id.len() == 27, "{id}");
    let r = call(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["echo", "hi", "there"]}),
        ctx(Some("s1")),
    )
    .await
    .unwrap();
    assert_eq!(r["stdout"], "hi there\n");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["signal"], json!(null));
    let r = call(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "command": "fail"}),
        ctx(Some("s1")),
    )
    .await
    .unwrap();
    assert_eq!(
        (r["exit_code"].clone(), r["stderr"].clone()),
        (json!(1), json!("boom\n"))
    );
    let r = ok(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["cat"], "stdin": "fed"}),
    )
    .await;
    assert_eq!(r["stdout"], "fed");
    let r = ok(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["env"], "env": {"A": "1"}}),
    )
    .await;
    assert_eq!(r["stdout"], "A=1\n");
    let r = ok(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["pwd"], "cwd": "/tmp"}),
    )
    .await;
    assert_eq!(r["stdout"], "/tmp\n");
    let e = fail(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["nope"]}),
    )
    .await;
    assert!(
        e.contains("cannot run nope in the sandbox: not found"),
        "{e}"
    );
    // Files, text and base64.
    ok(
        &t,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": "/tmp/a", "content": "hello"}),
    )
    .await;
    let r = ok(
        &t,
        "sandbox_read_file",
        json!({"sandbox_id": id, "path": "/tmp/a"}),
    )
    .await;
    assert_eq!(
        (r["content"].clone(), r["size"].clone()),
        (json!("hello"), json!(5))
    );
    ok(
        &t,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": "/tmp/b", "content": "AAEC/w==", "encoding": "base64"}),
    )
    .await;
    let r = ok(
        &t,
        "sandbox_read_file",
        json!({"sandbox_id": id, "path": "/tmp/b", "encoding": "base64"}),
    )
    .await;
    assert_eq!(r["content"], "AAEC/w==");
    let e = fail(
        &t,
        "sandbox_read_file",
        json!({"sandbox_id": id, "path": "/nope"}),
    )
    .await;
    assert!(
        e.contains("cannot read /nope") && e.contains("no such file"),
        "{e}"
    );
    let e = fail(
        &t,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": "/ro/x", "content": ""}),
    )
    .await;
    assert!(e.contains("read-only"), "{e}");
    let e = fail(
        &t,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": "rel", "content": ""}),
    )
    .await;
    assert!(e.contains("path: must be an absolute path"), "{e}");
    let e = fail(
        &t,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": "/x", "content": "!!", "encoding": "base64"}),
    )
    .await;
    assert!(e.contains("content: not valid base64"), "{e}");
    let r = ok(
        &t,
        "sandbox_list_files",
        json!({"sandbox_id": id, "path": "/etc"}),
    )
    .await;
    assert_eq!(
        r["entries"][0],
        json!({"name": "hosts", "type": "file", "size": 5, "mode": "644", "mtime_unix": 1_700_000_000})
    );
    assert_eq!(r["entries"][1]["type"], "dir");
    let e = fail(
        &t,
        "sandbox_list_files",
        json!({"sandbox_id": id, "path": "/missing"}),
    )
    .await;
    assert!(
        e.contains("cannot list /missing: find: /missing: No such file"),
        "{e}"
    );
    // List, destroy.
    let r = ok(&t, "sandbox_list", json!({})).await;
    assert_eq!(r["sandboxes"][0]["sandbox_id"], json!(id));
    assert_eq!(r["limits"]["sandboxes_in_use"], 1);
    assert_eq!(f.alive(), 1);
    ok(&t, "sandbox_destroy", json!({"sandbox_id": id})).await;
    assert_eq!(f.alive(), 0);
    let e = fail(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "command": "echo"}),
    )
    .await;
    assert!(
        e.contains("no sandbox") && e.contains("sandbox_list"),
        "{e}"
    );
    let e = fail(&t, "sandbox_destroy", json!({"sandbox_id": id})).await;
    assert!(e.contains("no sandbox"), "{e}");
}

#[tokio::test]
async fn argument_errors_name_the_field() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.max_cpus = 2);
    let e = fail(&t, "sandbox_create", json!({"cpus": 3})).await;
    assert_eq!(e, "cpus: must be <= 2, got 3");
    let e = fail(&t, "sandbox_create", json!({"network": true})).await;
    assert!(e.starts_with("network: say which network"), "{e}");
    let e = fail(&t, "sandbox_create", json!({"image": "python"})).await;
    assert!(e.starts_with("image: not available yet"), "{e}");
    let id = create(&t, None).await;
    let e = fail(&t, "sandbox_exec", json!({"sandbox_id": id})).await;
    assert!(e.starts_with("command, argv: one is required"), "{e}");
    let e = fail(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "command": "x", "argv": ["x"]}),
    )
    .await;
    assert!(e.contains("not both"), "{e}");
    let e = fail(&t, "sandbox_exec", json!({"sandbox_id": id, "argv": []})).await;
    assert!(e.starts_with("argv: must name a program"), "{e}");
    let e = fail(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["echo"], "cwd": "tmp"}),
    )
    .await;
    assert!(e.starts_with("cwd: must be an absolute path"), "{e}");
    let e = fail(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["echo"], "env": {"A=B": "1"}}),
    )
    .await;
    assert!(e.starts_with("env.A=B: not a valid variable name"), "{e}");
    let e = fail(
        &t,
        "sandbox_fork",
        json!({"sandbox_id": id, "checkpoint_id": "ck-1"}),
    )
    .await;
    assert!(e.contains("give one of them"), "{e}");
    let e = fail(&t, "sandbox_fork", json!({})).await;
    assert!(e.contains("one is required"), "{e}");
    let e = fail(&t, "sandbox_rewind", json!({"sandbox_id": id})).await;
    assert!(e.contains("checkpoint_id"), "{e}");
    // Every published schema is one the server accepts.
    vmcp_mcp_server::Server::new(t.clone(), Default::default()).unwrap();
}

#[tokio::test]
async fn network_requests_stay_within_what_the_server_permits() {
    // No flag: no network at all, whatever the client asks.
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |_| {});
    for (net, want) in [
        (
            "allow=api.test:443",
            "network: this server permits no network",
        ),
        (
            "nat",
            "network: nat (unrestricted network) is not permitted",
        ),
        (
            "open",
            "network: bad \"open\": expected none, nat or allow=",
        ),
        ("allow=a..b", "network: bad allow list: bad host \"a..b\""),
    ] {
        let e = fail(&t, "sandbox_create", json!({"network": net})).await;
        assert!(e.starts_with(want), "{net}: {e}");
    }
    // A ceiling: an allow list within it passes, one entry beyond it is named.
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| {
        l.net_ceiling = Some("*.example.com:443,203.0.113.0/24".parse().unwrap());
        l.allow_nat = true;
    });
    let e = fail(
        &t,
        "sandbox_create",
        json!({"network": "allow=a.example.com:443,203.0.113.9,10.0.0.1:443"}),
    )
    .await;
    assert_eq!(
        e,
        "network: 10.0.0.1:443 is not within the allow list this server permits (*.example.com:443,203.0.113.0/24); ask only for hosts inside it"
    );
    let e = fail(
        &t,
        "sandbox_create",
        json!({"network": "allow=*.example.com"}),
    )
    .await;
    assert!(e.contains("*.example.com is not within"), "{e}");
    let r = ok(
        &t,
        "sandbox_create",
        json!({"network": "allow=a.example.com:443,203.0.113.9"}),
    )
    .await;
    assert_eq!(r["network"], "allow=a.example.com:443,203.0.113.9");
    assert_eq!(r["notices"], json!([]));
    let r = ok(&t, "sandbox_create", json!({"network": "nat"})).await;
    assert!(
        r["notices"][0].as_str().unwrap().contains("unrestricted"),
        "{r}"
    );
    let r = ok(&t, "sandbox_create", json!({"network": false})).await;
    assert_eq!(r["network"], "none");
    assert_eq!(
        *f.nets.lock().unwrap(),
        ["allow=a.example.com:443,203.0.113.9", "nat", "none"]
    );
}

#[tokio::test]
async fn output_is_capped_with_a_marker() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.max_output = 1000);
    let id = create(&t, None).await;
    let r = ok(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "command": "flood 250000"}),
    )
    .await;
    assert_eq!(r["stdout_truncated_bytes"], 249_000);
    let out = r["stdout"].as_str().unwrap();
    assert!(out.starts_with(&"x".repeat(1000)));
    assert!(
        out.ends_with("\n[vmcp: stdout truncated: 249000 more bytes not shown (limit 1000 bytes)]"),
        "{out}"
    );
}

#[tokio::test]
async fn file_size_limit() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.max_file = 5000);
    let id = create(&t, None).await;
    let e = fail(
        &t,
        "sandbox_read_file",
        json!({"sandbox_id": id, "path": "/big"}),
    )
    .await;
    assert_eq!(e, "cannot read /big: the file is larger than 5000 bytes");
    // The channel still works after the abandoned read.
    let r = ok(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["echo", "ok"]}),
    )
    .await;
    assert_eq!(r["stdout"], "ok\n");
    let e = fail(
        &t,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": "/x", "content": "y".repeat(5001)}),
    )
    .await;
    assert_eq!(
        e,
        "content: 5001 bytes is more than the limit of 5000 bytes"
    );
}

#[tokio::test]
async fn limits_are_enforced_with_clear_errors() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| {
        l.max_sandboxes = 2;
        l.memory_budget_mib = 600;
    });
    let a = create(&t, None).await;
    let e = fail(&t, "sandbox_create", json!({"memory_mib": 512})).await;
    assert_eq!(e, "the memory budget is used up: 256 of 600 MiB are taken and 512 MiB were asked for; destroy a sandbox or ask for less memory");
    create(&t, None).await;
    let e = fail(&t, "sandbox_create", json!({})).await;
    assert_eq!(
        e,
        "too many sandboxes: 2 of 2 are alive; destroy one with sandbox_destroy first"
    );
    let e = fail(&t, "run", json!({"command": "echo"})).await;
    assert!(e.starts_with("too many sandboxes"), "{e}");
    ok(&t, "sandbox_destroy", json!({"sandbox_id": a})).await;
    create(&t, None).await;
    // A VM that never boots does not keep its slot.
    let mut faults = Faults::default();
    faults.start_fails = true;
    let f = FakeFactory::new(faults);
    let t = tools(f.clone(), |l| l.max_sandboxes = 1);
    for _ in 0..3 {
        let e = fail(&t, "sandbox_create", json!({})).await;
        assert!(e.starts_with("the VM did not boot: "), "{e}");
    }
    assert_eq!(f.alive(), 0);
}

#[tokio::test]
async fn run_boots_runs_and_destroys() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |_| {});
    let r = call(&t, "run", json!({"argv": ["echo", "once"]}), ctx(Some("s")))
        .await
        .unwrap();
    assert_eq!(r["stdout"], "once\n");
    eventually("the run VM is gone", || f.alive() == 0).await;
    assert_eq!(f.created.load(std::sync::atomic::Ordering::SeqCst), 1);
    let r = ok(&t, "sandbox_list", json!({})).await;
    assert_eq!(r["sandboxes"], json!([]));
    // A failing program still destroys the VM.
    let e = fail(&t, "run", json!({"argv": ["nope"]})).await;
    assert!(e.contains("not found"));
    eventually("the run VM is gone", || f.alive() == 0).await;
}

#[tokio::test]
async fn background_process_poll_stdin_signal() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.process_buffer = 8);
    let id = create(&t, Some("a")).await;
    let p = call(
        &t,
        "sandbox_exec_start",
        json!({"sandbox_id": id, "argv": ["cat"], "stdin_open": true}),
        ctx(Some("a")),
    )
    .await
    .unwrap();
    let pid = p["process_id"].as_str().unwrap().to_owned();
    assert_eq!(pid, "p1");
    let r = ok(
        &t,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": pid}),
    )
    .await;
    assert_eq!(
        (
            r["stdout"].clone(),
            r["next_cursor"].clone(),
            r["running"].clone()
        ),
        (json!(""), json!(0), json!(true))
    );
    ok(
        &t,
        "sandbox_exec_write_stdin",
        json!({"sandbox_id": id, "process_id": pid, "data": "abc"}),
    )
    .await;
    let r = ok(
        &t,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": pid, "wait_ms": 2000}),
    )
    .await;
    assert_eq!(
        (r["stdout"].clone(), r["next_cursor"].clone()),
        (json!("abc"), json!(3))
    );
    // The same cursor again gives the same output (a client that lost the answer).
    let again = ok(
        &t,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": pid}),
    )
    .await;
    assert_eq!(again["stdout"], "abc");
    // More than the 8-byte buffer between polls: the oldest bytes are reported missed.
    ok(
        &t,
        "sandbox_exec_write_stdin",
        json!({"sandbox_id": id, "process_id": pid, "data": "0123456789"}),
    )
    .await;
    let r = ok(
        &t,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": pid, "cursor": 3, "wait_ms": 2000}),
    )
    .await;
    eventually("all bytes arrived", || true).await;
    assert_eq!(r["missed_bytes"], 2, "{r}");
    assert_eq!(r["stdout"], "23456789");
    assert_eq!(r["next_cursor"], 13);
    // A long poll returns when the process ends.
    let t2 = t.clone();
    let (id2, pid2) = (id.clone(), pid.clone());
    let waiter = tokio::spawn(async move {
        call(
            &t2,
            "sandbox_exec_poll",
            json!({"sandbox_id": id2, "process_id": pid2, "cursor": 13, "wait_ms": 10000}),
            ctx(None),
        )
        .await
        .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    ok(
        &t,
        "sandbox_exec_write_stdin",
        json!({"sandbox_id": id, "process_id": pid, "close": true}),
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r["running"].clone(), r["exit_code"].clone()),
        (json!(false), json!(0)),
        "{r}"
    );
    let e = fail(
        &t,
        "sandbox_exec_write_stdin",
        json!({"sandbox_id": id, "process_id": pid, "data": "x"}),
    )
    .await;
    assert!(e.contains("has ended"), "{e}");
    // Signals.
    let p = ok(
        &t,
        "sandbox_exec_start",
        json!({"sandbox_id": id, "command": "sleep 100"}),
    )
    .await;
    let pid = p["process_id"].as_str().unwrap().to_owned();
    let e = fail(
        &t,
        "sandbox_exec_write_stdin",
        json!({"sandbox_id": id, "process_id": pid, "data": "x"}),
    )
    .await;
    assert!(e.contains("started without stdin_open"), "{e}");
    let r = ok(
        &t,
        "sandbox_exec_signal",
        json!({"sandbox_id": id, "process_id": pid, "signal": "SIGKILL"}),
    )
    .await;
    assert_eq!(r["signal"], 9);
    let r = ok(
        &t,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": pid, "wait_ms": 2000}),
    )
    .await;
    assert_eq!(
        (r["signal"].clone(), r["exit_code"].clone()),
        (json!(9), json!(null))
    );
    let e = fail(
        &t,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": "p99"}),
    )
    .await;
    assert!(e.contains("no process \"p99\""), "{e}");
    let e = fail(
        &t,
        "sandbox_exec_signal",
        json!({"sandbox_id": id, "process_id": pid, "signal": "SIGFOO"}),
    )
    .await;
    assert!(e.starts_with("signal: must be one of"), "{e}");
}

#[tokio::test]
async fn process_limit() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.max_processes = 2);
    let id = create(&t, None).await;
    for _ in 0..2 {
        ok(
            &t,
            "sandbox_exec_start",
            json!({"sandbox_id": id, "argv": ["sleep"]}),
        )
        .await;
    }
    let e = fail(
        &t,
        "sandbox_exec_start",
        json!({"sandbox_id": id, "argv": ["sleep"]}),
    )
    .await;
    assert!(
        e.starts_with("too many background processes in this sandbox (2)"),
        "{e}"
    );
    ok(
        &t,
        "sandbox_exec_signal",
        json!({"sandbox_id": id, "process_id": "p1"}),
    )
    .await;
    ok(
        &t,
        "sandbox_exec_poll",
        json!({"sandbox_id": id, "process_id": "p1", "wait_ms": 2000}),
    )
    .await;
    // The finished one is forgotten to make room.
    let p = ok(
        &t,
        "sandbox_exec_start",
        json!({"sandbox_id": id, "argv": ["sleep"]}),
    )
    .await;
    assert_eq!(p["process_id"], "p3");
}

#[tokio::test]
async fn exec_timeout_and_cancellation_kill_the_process() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |_| {});
    let id = create(&t, None).await;
    let r = ok(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": id, "argv": ["sleep"], "timeout_secs": 0.1}),
    )
    .await;
    assert_eq!(
        (r["timed_out"].clone(), r["signal"].clone()),
        (json!(true), json!(9))
    );
    let (canceller, token) = Canceller::new();
    let mut c = ctx(None);
    c.cancel = token;
    let t2 = t.clone();
    let id2 = id.clone();
    let task = tokio::spawn(async move {
        call(
            &t2,
            "sandbox_exec",
            json!({"sandbox_id": id2, "argv": ["sleep"]}),
            c,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!task.is_finished());
    canceller.cancel();
    let e = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(e.contains("cancelled; the process was killed"), "{e}");
}

#[tokio::test]
async fn idle_timeout_and_lifetime_end_sandboxes() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |_| {});
    ok(&t, "sandbox_create", json!({"idle_timeout_secs": 1})).await;
    ok(&t, "sandbox_create", json!({"timeout_secs": 1})).await;
    let keep = create(&t, None).await;
    assert_eq!(f.alive(), 3);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    eventually("two sandboxes timed out", || f.alive() == 1).await;
    let r = ok(&t, "sandbox_list", json!({})).await;
    assert_eq!(r["sandboxes"][0]["sandbox_id"], json!(keep));
}

#[tokio::test]
async fn session_end_grace_and_takeover() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.session_grace = Duration::from_millis(300));
    let a = create(&t, Some("old")).await;
    let b = create(&t, Some("old")).await;
    let other = create(&t, Some("other")).await;
    let stateless = create(&t, None).await;
    t.session_ended(&Arc::from("old"));
    // A new session of the same client uses `a` within the grace: it is taken over.
    call(
        &t,
        "sandbox_exec",
        json!({"sandbox_id": a, "argv": ["echo"]}),
        ctx(Some("new")),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    eventually("b ended after the grace", || f.alive() == 3).await;
    let r = ok(&t, "sandbox_list", json!({})).await;
    let mut ids: Vec<String> = r["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandbox_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut want = vec![a.clone(), other, stateless];
    want.sort();
    assert_eq!(ids, want);
    assert!(!ids.contains(&b));
    // The new owner's session ending ends `a` too.
    t.session_ended(&Arc::from("new"));
    eventually("a ended", || f.alive() == 2).await;
}

#[tokio::test]
async fn shutdown_and_drop_leave_no_vm() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |_| {});
    for _ in 0..3 {
        create(&t, None).await;
    }
    let id = create(&t, None).await;
    ok(
        &t,
        "sandbox_exec_start",
        json!({"sandbox_id": id, "argv": ["sleep"]}),
    )
    .await;
    assert_eq!(f.alive(), 4);
    t.manager().shutdown_all().await;
    assert_eq!(f.alive(), 0);
    let e = call(&t, "sandbox_create", json!({}), ctx(None)).await;
    assert!(e.is_ok(), "slots were released: {e:?}");
    drop(t);
    eventually("dropping the manager killed the VM", || f.alive() == 0).await;
}

#[tokio::test]
async fn boot_progress_and_exec_output_progress() {
    use vmcp_mcp::jsonrpc::Message;
    use vmcp_mcp_server::server::{Connection, Outbound};
    struct Collect(std::sync::Mutex<Vec<String>>);
    impl Outbound for Collect {
        fn notify(&self, msg: Message) -> bool {
            if let Message::Notification(n) = msg {
                let v: serde_json::Value = serde_json::from_str(n.params.unwrap().get()).unwrap();
                self.0
                    .lock()
                    .unwrap()
                    .push(v["message"].as_str().unwrap().to_owned());
            }
            true
        }
    }
    let f = FakeFactory::new(Faults::default());
    let server =
        vmcp_mcp_server::Server::new(tools(f.clone(), |_| {}), Default::default()).unwrap();
    let conn = Connection::new(None);
    let out = Arc::new(Collect(Default::default()));
    let params = json!({"name": "run", "arguments": {"command": "echo streamed"}, "_meta": {"progressToken": 1}});
    let msg = Message::request(
        1,
        "tools/call",
        Some(vmcp_mcp::jsonrpc::to_raw(&params).unwrap()),
    );
    let answer = server.handle_now(msg, &conn, out.clone()).await.unwrap();
    assert!(matches!(answer, Message::Response(_)));
    let got = out.0.lock().unwrap().clone();
    assert_eq!(got[0], "starting a VM (1 vCPU, 256 MiB, network none)");
    assert!(got[1].starts_with("VM ready after "), "{got:?}");
    assert_eq!(got[2], "stdout: streamed\n");
    // What the factory says while it starts the VM (a snapshot build, a cold boot) goes out
    // as progress and comes back in the result's notices.
    *f.boot_note.lock().unwrap() = Some("booted cold: the snapshot is broken".into());
    out.0.lock().unwrap().clear();
    let msg = Message::request(
        2,
        "tools/call",
        Some(vmcp_mcp::jsonrpc::to_raw(&params).unwrap()),
    );
    let Message::Response(r) = server.handle_now(msg, &conn, out.clone()).await.unwrap() else {
        panic!("no response");
    };
    let v: serde_json::Value = serde_json::from_str(r.result.get()).unwrap();
    assert_eq!(
        v["structuredContent"]["notices"],
        json!(["booted cold: the snapshot is broken"]),
        "{v}"
    );
    let got = out.0.lock().unwrap().clone();
    assert_eq!(got[1], "booted cold: the snapshot is broken", "{got:?}");
}

async fn read(
    t: &vmcp_sandbox::tools::SandboxTools,
    id: &str,
    path: &str,
) -> Result<String, String> {
    call(
        t,
        "sandbox_read_file",
        json!({"sandbox_id": id, "path": path}),
        ctx(None),
    )
    .await
    .map(|r| r["content"].as_str().unwrap().to_owned())
}

async fn write(t: &vmcp_sandbox::tools::SandboxTools, id: &str, path: &str, content: &str) {
    call(
        t,
        "sandbox_write_file",
        json!({"sandbox_id": id, "path": path, "content": content}),
        ctx(None),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn checkpoint_rewind_and_fork_keep_what_was_written_before_the_checkpoint() {
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.max_sandboxes = 4);
    let id = create(&t, Some("s1")).await;
    write(&t, &id, "/a", "before").await;
    let r = ok(&t, "sandbox_checkpoint", json!({"sandbox_id": id})).await;
    let ck = r["checkpoint_id"].as_str().unwrap().to_owned();
    assert!(ck.starts_with("ck-"), "{r}");
    assert_eq!(r["sandbox_id"], json!(id));
    write(&t, &id, "/b", "after").await;

    // Fork from the checkpoint: A, not B, each its own hostname.
    let r = call(
        &t,
        "sandbox_fork",
        json!({"checkpoint_id": ck, "count": 2}),
        ctx(Some("s2")),
    )
    .await
    .unwrap();
    let forks: Vec<String> = r["sandbox_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(forks.len(), 2);
    let mut hosts = Vec::new();
    for f in &forks {
        assert_ne!(f, &id);
        assert_eq!(read(&t, f, "/a").await.unwrap(), "before");
        assert!(read(&t, f, "/b")
            .await
            .unwrap_err()
            .contains("no such file"));
        hosts.push(read(&t, f, "/etc/hostname").await.unwrap());
        // A fork runs programs like any sandbox.
        let r = ok(
            &t,
            "sandbox_exec",
            json!({"sandbox_id": f, "argv": ["echo", "hi"]}),
        )
        .await;
        assert_eq!(r["stdout"], "hi\n");
    }
    assert_ne!(hosts[0], hosts[1]);
    assert_eq!(f.alive(), 3);
    let r = ok(&t, "sandbox_list", json!({})).await;
    assert_eq!(r["limits"]["sandboxes_in_use"], 3);
    assert_eq!(r["limits"]["memory_in_use_mib"], 3 * 256);

    // Fork the sandbox as it is now: B is there.
    let r = ok(&t, "sandbox_fork", json!({"sandbox_id": id})).await;
    let now_fork = r["sandbox_ids"][0].as_str().unwrap().to_owned();
    assert_eq!(read(&t, &now_fork, "/b").await.unwrap(), "after");
    // The sandbox limit counts forks: 4 are alive.
    let e = fail(&t, "sandbox_fork", json!({"sandbox_id": id})).await;
    assert!(e.contains("too many sandboxes"), "{e}");
    assert_eq!(f.alive(), 4);
    let e = fail(&t, "sandbox_fork", json!({"sandbox_id": id, "count": 5})).await;
    assert!(e.contains("count"), "{e}");

    // Rewind: B is gone, A stays, programs run, the checkpoint can be used again.
    let r = ok(
        &t,
        "sandbox_rewind",
        json!({"sandbox_id": id, "checkpoint_id": ck}),
    )
    .await;
    assert_eq!(r["sandbox_id"], json!(id));
    assert_eq!(read(&t, &id, "/a").await.unwrap(), "before");
    assert!(read(&t, &id, "/b").await.is_err());
    write(&t, &id, "/b", "again").await;
    ok(
        &t,
        "sandbox_rewind",
        json!({"sandbox_id": id, "checkpoint_id": ck}),
    )
    .await;
    assert!(read(&t, &id, "/b").await.is_err());

    // A checkpoint rewinds only its own sandbox; unknown ids are named.
    let e = fail(
        &t,
        "sandbox_rewind",
        json!({"sandbox_id": forks[0], "checkpoint_id": ck}),
    )
    .await;
    assert!(e.contains("belongs to sandbox"), "{e}");
    let e = fail(
        &t,
        "sandbox_rewind",
        json!({"sandbox_id": id, "checkpoint_id": "ck-nope"}),
    )
    .await;
    assert!(e.contains("no checkpoint \"ck-nope\""), "{e}");

    // Checkpoints end with their sandbox.
    ok(&t, "sandbox_destroy", json!({"sandbox_id": id})).await;
    let e = fail(&t, "sandbox_fork", json!({"checkpoint_id": ck})).await;
    assert!(e.contains("no checkpoint"), "{e}");
    t.manager().shutdown_all().await;
    assert_eq!(f.alive(), 0);
}

#[tokio::test]
async fn failed_rewinds_and_forks_leave_sandboxes_and_limits_as_they_were() {
    let mut faults = Faults::default();
    faults.load_fails = true;
    let f = FakeFactory::new(faults);
    let t = tools(f.clone(), |_| {});
    let id = create(&t, None).await;
    write(&t, &id, "/a", "1").await;
    let r = ok(&t, "sandbox_checkpoint", json!({"sandbox_id": id})).await;
    let ck = r["checkpoint_id"].as_str().unwrap().to_owned();
    write(&t, &id, "/b", "2").await;
    let e = fail(
        &t,
        "sandbox_rewind",
        json!({"sandbox_id": id, "checkpoint_id": ck}),
    )
    .await;
    assert!(e.contains("load failed"), "{e}");
    assert_eq!(read(&t, &id, "/b").await.unwrap(), "2", "unchanged");
    let e = fail(&t, "sandbox_fork", json!({"checkpoint_id": ck, "count": 2})).await;
    assert!(e.contains("cannot fork"), "{e}");
    assert_eq!(f.alive(), 1);
    assert_eq!(t.manager().usage(), (1, 256));

    // The memory budget counts forks before any VM starts.
    let f = FakeFactory::new(Faults::default());
    let t = tools(f.clone(), |l| l.memory_budget_mib = 600);
    let id = create(&t, None).await;
    let e = fail(&t, "sandbox_fork", json!({"sandbox_id": id, "count": 2})).await;
    assert!(e.contains("memory budget"), "{e}");
    assert_eq!(t.manager().usage(), (1, 256));
    assert_eq!(f.alive(), 1);
}

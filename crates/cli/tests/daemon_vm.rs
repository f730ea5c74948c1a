//! `vmcp daemon` with real VMs (TCG here), as a user runs it: `vmcp run` works without a
//! daemon, then through it with the same results (stdout/stderr, exit codes, signals,
//! `--timeout`), concurrent runs get different VMs, a run with an allow-list uses a pooled VM
//! (its proxy runs in `vmcp run`), and neither SIGKILL, SIGTERM nor SIGINT of the daemon
//! leaves a QEMU behind. One test (one snapshot build, one daemon at a time) to keep the
//! suite short; its own snapshot store and runtime directory.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn vm_ready() -> bool {
    let doctor = Command::new(VMCP).arg("doctor").output().unwrap();
    let out = text(&doctor.stdout);
    if doctor.status.success() && out.contains("[ok] image") {
        return true;
    }
    if std::env::var_os("VMCP_REQUIRE_VM").is_some_and(|v| v == "1") {
        panic!("VMCP_REQUIRE_VM=1 but VMs cannot run here:\n{out}");
    }
    vmcp_test_support::skipped!("SKIPPED: no VMs or no image here (`vmcp image build`)");
    false
}

struct Env {
    store: tempfile::TempDir,
    runtime: tempfile::TempDir,
}

impl Env {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(VMCP);
        c.env("VMCP_SNAPSHOT_DIR", self.store.path())
            .env("XDG_RUNTIME_DIR", self.runtime.path())
            .env_remove("VMCP_DAEMON_SOCKET")
            .args(args)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn socket(&self) -> PathBuf {
        self.runtime.path().join("vmcp").join("daemon.sock")
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Pids of the QEMU processes below `root` (its VMs; QEMU runs under a watchdog).
fn qemus_of(root: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !text(&cmdline).contains("qemu-system") {
            continue;
        }
        let mut p = pid;
        for _ in 0..8 {
            match parent_of(p) {
                Some(pp) if pp == root => {
                    out.push(pid);
                    break;
                }
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for this purpose (its parent reaps it).
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// A running daemon and its stderr lines.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Daemon {
    fn start(env: &Env, args: &[&str]) -> Daemon {
        let mut all = vec!["daemon"];
        all.extend_from_slice(args);
        let mut child = env
            .cmd(&all)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `what`.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.seen.iter().find(|l| l.contains(what)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(what) {
                        return l;
                    }
                }
                Err(_) => panic!("the daemon did not say {what:?}; said: {:?}", self.seen),
            }
        }
    }

    /// Everything said so far (without waiting).
    fn drain(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }
}

impl Drop for Daemon {
    /// A failed assertion must not leave the daemon (and its VMs) running: SIGKILL, which its
    /// VMs do not survive either.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU processes {left:?} outlived the daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls the daemon's status (in-process: no `vmcp` process per poll) until every pool is full.
fn wait_full(env: &Env, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = vmcp_pool::client::status(&env.socket(), Duration::from_secs(5));
        if let Ok(st) = &st {
            if st.profiles.iter().all(|p| p.ready >= n && p.target == n) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the pool did not fill: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hostname_of(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[test]
fn runs_through_the_daemon_match_runs_without_it_and_no_vm_outlives_it() {
    if !vm_ready() {
        return;
    }
    let env = Env {
        store: tempfile::tempdir().unwrap(),
        runtime: tempfile::tempdir().unwrap(),
    };
    // No daemon: the normal path (it builds the automatic snapshot the daemon then uses).
    let out = env.run(&["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let plain_out = text(&out.stdout);
    // (Its stderr also has the one-time notice of the snapshot build.)
    assert!(
        text(&out.stderr).ends_with("err\n"),
        "{}",
        text(&out.stderr)
    );

    let mut d = Daemon::start(&env, &["--pool", "2", "--memory-budget", "1536"]);
    d.wait_for("2 of 2 ready", Duration::from_secs(180));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&env.socket()), 0o600);
    assert_eq!(mode(env.socket().parent().unwrap()), 0o700);

    // The same program through the daemon: the same bytes and status.
    let out = env.run(&["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), plain_out);
    assert_eq!(text(&out.stderr), "err\n");
    d.wait_for("handed VM", Duration::from_secs(5));
    d.wait_for("after use", Duration::from_secs(10));
    // Killed by a signal, not found, --timeout.
    wait_full(&env, 2);
    let out = env.run(&["run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137));
    wait_full(&env, 2);
    let out = env.run(&["run", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    wait_full(&env, 2);
    let t = Instant::now();
    let out = env.run(&["run", "--timeout", "0.5", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("timeout"));
    assert!(t.elapsed() < Duration::from_secs(20));

    // Concurrent runs: every VM is a different one (its hostname carries its id), and no VM
    // the daemon handed out went to two runs.
    wait_full(&env, 2);
    let runs: Vec<_> = (0..4)
        .map(|_| {
            env.cmd(&["run", "--", "cat", "/proc/sys/kernel/hostname"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let names: Vec<String> = runs
        .into_iter()
        .map(|c| hostname_of(&c.wait_with_output().unwrap()))
        .collect();
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "two runs shared a VM: {names:?}");
    // The daemon's lines about these runs arrive on their own time.
    std::thread::sleep(Duration::from_millis(500));
    let log = d.drain();
    let handed: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("handed VM ").nth(1))
        .filter_map(|r| r.split(' ').next())
        .collect();
    let handed_set: HashSet<&&str> = handed.iter().collect();
    assert_eq!(handed.len(), handed_set.len(), "a VM was handed out twice");
    assert!(handed.len() >= 6, "{log}");

    // An allow-list over the agent channel: a pooled VM, the proxy in this `vmcp run`.
    wait_full(&env, 2);
    std::thread::sleep(Duration::from_millis(300));
    let handed_before = d.drain().matches("handed VM").count();
    let (port, hits) = vmcp_test_support::http_server("pooled-and-allowed");
    let fetch = format!("NO_PROXY= wget -q -O - http://127.0.0.1:{port}/; echo");
    let out = env.run(&[
        "run",
        "--net",
        &format!("allow=127.0.0.1:{port}"),
        "--",
        "sh",
        "-c",
        &fetch,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("pooled-and-allowed\n"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.drain().matches("handed VM").count() == handed_before {
        assert!(Instant::now() < deadline, "the run did not use a pooled VM");
        std::thread::sleep(Duration::from_millis(50));
    }

    let status = env.run(&["daemon", "status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(text(&status.stdout).contains("handed out"));

    // SIGKILL: the daemon cannot clean up, its VMs must die anyway.
    wait_full(&env, 2);
    let pids = qemus_of(d.child.id());
    assert!(pids.len() >= 2, "{pids:?}");
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    wait_gone(&pids);
    // A stale socket: `vmcp run` starts its own VM, silently.
    let out = env.run(&["run", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");

    // SIGTERM: a clean stop; the stale socket of the killed daemon was replaced and is removed.
    let mut d = Daemon::start(&env, &["--pool", "1"]);
    wait_full(&env, 1);
    let pids = qemus_of(d.child.id());
    assert!(!pids.is_empty());
    let killed = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let code = d.child.wait().unwrap();
    assert!(code.success(), "{code:?}");
    d.wait_for("its VMs are destroyed", Duration::from_secs(5));
    wait_gone(&pids);
    assert!(!env.socket().exists());

    // SIGINT (Ctrl-C in the terminal that runs it in the foreground): the same clean stop.
    let mut d = Daemon::start(&env, &["--pool", "1"]);
    wait_full(&env, 1);
    let pids = qemus_of(d.child.id());
    assert!(!pids.is_empty());
    let interrupted = Command::new("kill")
        .args(["-INT", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let code = d.child.wait().unwrap();
    assert!(code.success(), "{code:?}");
    d.wait_for("its VMs are destroyed", Duration::from_secs(5));
    wait_gone(&pids);
    assert!(!env.socket().exists());
}

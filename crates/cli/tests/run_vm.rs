//! `vmcp run`, `doctor` and `bench` as a user runs them: the real binary, real VMs (TCG here).
//!
//! Each test gives vmcp its own `XDG_RUNTIME_DIR`, so "nothing left behind" is checked
//! exactly: the directory must be empty after vmcp exits. Tests that boot take a global lock
//! (one VM at a time). Without QEMU or a built image they print `SKIPPED: <reason>`; with
//! `VMCP_REQUIRE_VM=1` (CI) they fail instead.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmcp_test_support::vm;

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

struct Env {
    runtime: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            runtime: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(VMCP);
        c.env("XDG_RUNTIME_DIR", self.runtime.path());
        c
    }

    fn run(&self, flags: &[&str], program: &[&str], stdin: &[u8]) -> Output {
        let mut c = self.cmd();
        c.arg("run")
            .args(vm::image_args())
            .args(flags)
            .arg("--")
            .args(program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        out
    }

    /// Nothing of any VM is left in the runtime directory.
    fn assert_clean(&self) {
        let left: Vec<PathBuf> = std::fs::read_dir(self.runtime.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// stderr without vmcp's accelerator notice.
fn stderr_wo_notice(out: &Output) -> String {
    text(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("vmcp: notice:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn readme_example_streams_and_exit_codes() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    let out = env.run(
        &[],
        &["sh", "-c", "uname -r; echo to-stderr >&2; exit 3"],
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let release = text(&out.stdout);
    assert!(
        release
            .trim()
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit()),
        "{release:?}"
    );
    assert_eq!(stderr_wo_notice(&out), "to-stderr\n");
    env.assert_clean();

    // stdin forwarded (EOF closes it), env, workdir, more vCPUs and memory.
    let out = env.run(
        &[
            "--cpus",
            "2",
            "--memory",
            "320",
            "-e",
            "X=y z",
            "--workdir",
            "/tmp",
        ],
        &["sh", "-c", "tr a-z A-Z; echo \"$X\"; pwd; nproc"],
        b"piped input\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "PIPED INPUT\ny z\n/tmp\n2\n");

    // Program missing → 127, not executable → 126, killed by a signal → 128+N.
    let out = env.run(&[], &["/no/such/program"], b"");
    assert_eq!(out.status.code(), Some(127));
    let err = stderr_wo_notice(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/no/such/program"), "{err}");
    let out = env.run(&[], &["/etc/passwd"], b"");
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    let out = env.run(&[], &["sh", "-c", "kill -TERM $$"], b"");
    assert_eq!(out.status.code(), Some(143));
    env.assert_clean();
}

#[test]
fn timeout_destroys_the_vm_and_exits_124() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    let t = Instant::now();
    let out = env.run(&["--timeout", "1.5"], &["sleep", "60"], b"");
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(40));
    assert!(
        stderr_wo_notice(&out).contains("timeout"),
        "{}",
        text(&out.stderr)
    );
    env.assert_clean();
}

/// QEMU children of process `parent` (by /proc ppid).
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
        let comm = &stat[open + 1..close];
        let ppid: u32 = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == parent && comm.starts_with("qemu-system") {
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

/// Starts `vmcp run -- sh -c 'echo started; sleep 600'` and waits for "started"; returns
/// the vmcp child and its QEMU pid.
fn start_sleeper(env: &Env) -> (std::process::Child, u32) {
    let mut c = env.cmd();
    c.arg("run")
        .args(vm::image_args())
        .args(["--", "sh", "-c", "echo started; sleep 600"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n");
    let qemu = qemu_children(child.id());
    assert_eq!(qemu.len(), 1, "expected one QEMU child, found {qemu:?}");
    (child, qemu[0])
}

#[test]
fn sigkill_of_vmcp_takes_qemu_down_and_the_next_start_sweeps_its_dir() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    let (mut child, qemu) = start_sleeper(&env);
    child.kill().unwrap(); // SIGKILL: no destructor runs in vmcp
    child.wait().unwrap();
    assert!(
        gone_within(qemu, Duration::from_secs(5)),
        "QEMU {qemu} survived the SIGKILL of its owner"
    );
    // The runtime dir of a SIGKILLed vmcp stays until the next VM start sweeps it.
    let left: Vec<_> = std::fs::read_dir(env.runtime.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "expected the dead run's runtime dir");
    let out = env.run(&[], &["true"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    env.assert_clean();
}

#[test]
fn sigterm_and_sigint_destroy_the_vm() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    for (sig, code) in [("-TERM", 143), ("-INT", 130)] {
        let (mut child, qemu) = start_sleeper(&env);
        // The shell's builtin `kill`: no procps needed.
        let st = Command::new("sh")
            .args(["-c", &format!("kill {sig} {}", child.id())])
            .status()
            .unwrap();
        assert!(st.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code));
        assert!(
            gone_within(qemu, Duration::from_secs(2)),
            "QEMU {qemu} left running"
        );
        env.assert_clean();
    }
}

#[test]
fn bad_input_gives_one_line_and_leaves_nothing() {
    let _l = vm::lock();
    let env = Env::new();
    let check = |out: Output, code: i32, needle: &str| {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
        // Our own errors are one line; clap's usage errors add a hint line after an empty one.
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.contains(needle) || needle == "PROGRAM",
            "the first line must say what is wrong: {err:?}"
        );
        env.assert_clean();
    };
    // No such kernel.
    check(
        env.cmd()
            .args([
                "run",
                "--kernel",
                "/nonexistent/vmlinuz",
                "--initrd",
                "/nonexistent/initrd",
                "--",
                "true",
            ])
            .output()
            .unwrap(),
        125,
        "/nonexistent/vmlinuz",
    );
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("k");
    let i = dir.path().join("i");
    std::fs::write(&k, b"k").unwrap();
    std::fs::write(&i, b"i").unwrap();
    let files = [
        "--kernel".to_string(),
        k.display().to_string(),
        "--initrd".into(),
        i.display().to_string(),
    ];
    // QEMU missing.
    check(
        env.cmd()
            .env("VMCP_QEMU", "/nonexistent/qemu")
            .arg("run")
            .args(&files)
            .args(["--", "true"])
            .output()
            .unwrap(),
        125,
        "VMCP_QEMU",
    );
    // Unknown flag values.
    check(
        env.cmd()
            .args(["run", "--accel", "xen", "--", "true"])
            .output()
            .unwrap(),
        125,
        "xen",
    );
    check(
        env.cmd()
            .args(["run", "--backend", "xen", "--", "true"])
            .output()
            .unwrap(),
        125,
        "unknown backend \"xen\"",
    );
    // A backend this OS does not have: the selector says which it has.
    check(
        env.cmd()
            .args(["run", "--backend", "vz"])
            .args(&files)
            .args(["--", "true"])
            .output()
            .unwrap(),
        125,
        "backend vz does not exist on this OS: this build has qemu",
    );
    check(
        env.cmd()
            .args(["run", "--cpus", "0"])
            .args(&files)
            .args(["--", "true"])
            .output()
            .unwrap(),
        125,
        "vCPU",
    );
    check(
        env.cmd()
            .args(["run", "--memory", "8"])
            .args(&files)
            .args(["--", "true"])
            .output()
            .unwrap(),
        125,
        "8 MiB",
    );
    check(
        env.cmd()
            .args(["run", "--timeout=0", "--", "true"])
            .output()
            .unwrap(),
        125,
        "timeout",
    );
    check(
        env.cmd()
            .args(["run", "-e", "NOEQUALS", "--", "true"])
            .output()
            .unwrap(),
        125,
        "K=V",
    );
    // A timeout too large for a duration is refused, not a panic.
    check(
        env.cmd()
            .args(["run", "--timeout", "1e30", "--", "true"])
            .output()
            .unwrap(),
        125,
        "timeout",
    );
    // A rootfs that is not an ext4 image is refused on the host, before booting.
    check(
        env.cmd()
            .args(["run", "--rootfs", "/etc/passwd"])
            .args(&files)
            .args(["--", "true"])
            .output()
            .unwrap(),
        125,
        "not an ext4 image",
    );
    // No program.
    check(env.cmd().args(["run"]).output().unwrap(), 125, "PROGRAM");
}

/// `VmRSS` of process `pid` in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The guest writes without pause; whoever reads vmcp's stdout stalls for 15 s: vmcp's
/// memory stays flat (flow control stops the guest process), and output flows again after.
#[test]
fn stalled_stdout_reader_keeps_vmcp_memory_flat() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    if rss_kib(std::process::id()).is_none() {
        vmcp_test_support::skipped!("SKIPPED: needs /proc to measure vmcp's memory");
        return;
    }
    let env = Env::new();
    let mut child = env
        .cmd()
        .arg("run")
        .args(vm::image_args())
        .args(["--", "sh", "-c", "head -c 2000000000 /dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    // Wait until output arrives (the VM booted), then stop reading.
    let mut buf = vec![0u8; 1 << 16];
    let first = std::io::Read::read(&mut stdout, &mut buf).unwrap();
    assert!(first > 0);
    let mut peak = 0;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_secs(1));
        peak = peak.max(rss_kib(pid).unwrap_or(0));
    }
    assert!(peak > 0);
    assert!(peak < 64 * 1024, "vmcp RSS reached {peak} KiB");
    // Reading again: the output flows (far more than any buffer).
    let mut got = 0usize;
    while got < 64 * 1024 * 1024 {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "output stopped after {got} bytes");
        got += n;
    }
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let status = child.wait().unwrap();
    let _ = drain.join();
    assert_eq!(status.code(), Some(143));
    env.assert_clean();
}

/// 300 MB of stdin into a 128 MiB guest whose program does not read it: the agent holds
/// one window, vmcp's forwarder waits, and the guest stays alive to report the program's
/// own exit.
#[test]
fn big_stdin_into_a_small_guest_that_does_not_read() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    let mut child = env
        .cmd()
        .arg("run")
        .args(vm::image_args())
        .args(["--memory", "128", "--", "sh", "-c", "sleep 8; echo alive"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0usize;
        while sent < 300 << 20 {
            if input.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let out = child.wait_with_output().unwrap();
    let sent = writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "alive\n");
    assert!(sent < 300 << 20, "vmcp took all {sent} bytes");
    env.assert_clean();
}

#[test]
fn doctor_reports_backends() {
    let out = Command::new(VMCP).arg("doctor").output().unwrap();
    let t = text(&out.stdout);
    assert!(t.contains("QEMU backend\n"), "{t}");
    assert!(t.contains("] qemu:"), "{t}");
    assert!(t.contains("accel tcg"), "{t}");
    assert!(t.contains("] image"), "{t}");
    match out.status.code() {
        Some(0) => assert!(
            t.contains("can run VMs here: `vmcp run` uses backend qemu, accelerator "),
            "{t}"
        ),
        Some(1) => assert!(t.contains("cannot run VMs")),
        other => panic!("doctor exited {other:?}"),
    }
}

#[test]
fn bench_reports_every_metric() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let out = Command::new(VMCP)
        .args([
            "bench",
            "--runs",
            "1",
            "--iterations",
            "20",
            "--pss-vms",
            "1",
        ])
        .args(vm::image_args())
        .output()
        .unwrap();
    let t = text(&out.stdout);
    assert!(out.status.success(), "{}{t}", text(&out.stderr));
    for needle in [
        "kernel → first userspace",
        "agent ready",
        "exec `true`",
        "ping",
        "RSS",
        "target",
        "checkpoint of a running VM",
        "fork(1) of that checkpoint",
        "fork(2) → all ready",
        "rewind to that checkpoint",
        "checkpoint of a forked (restored) VM",
        "restore → agent ready",
        "`vmcp run -- true` end to end",
        "PSS of 1 idle VMs",
        "pool acquire",
        "with a warm `vmcp daemon`",
    ] {
        assert!(t.contains(needle), "{needle} missing in {t}");
    }
}

/// The guest image's initrd with `/init` replaced by `script` (a later archive member
/// overrides an earlier one when the kernel unpacks concatenated archives), or `None` when
/// there is no image to extend.
fn hostile_initrd(env: &Env, dir: &Path, script: &str) -> Option<(PathBuf, PathBuf)> {
    let (kernel, initrd) = match (
        std::env::var("VMCP_TEST_KERNEL"),
        std::env::var("VMCP_TEST_INITRD"),
    ) {
        (Ok(k), Ok(i)) => (PathBuf::from(k), PathBuf::from(i)),
        _ => {
            let out = env.cmd().args(["image", "path"]).output().unwrap();
            let text = text(&out.stdout);
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|p| PathBuf::from(p.trim()))
            };
            (field("kernel ")?, field("initrd ")?)
        }
    };
    let mut data = std::fs::read(initrd).ok()?;
    let entries = [vmcp_image::cpio::Entry::file(
        "init",
        0o755,
        script.as_bytes().to_vec(),
    )];
    vmcp_image::cpio::write(&entries, &mut data).unwrap();
    let path = dir.join("hostile.cpio");
    std::fs::write(&path, data).unwrap();
    Some((kernel, path))
}

/// A `/init` that loads the channel's modules, sends a valid hello (protocol 2, the
/// token from the command line) and then never says anything again.
const HELLO_THEN_SILENT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
while read m; do insmod "$m" 2>/dev/null; done < /etc/vmcp/modules
tok=$(cat /sys/firmware/qemu_fw_cfg/by_name/opt/vmcp/token/raw 2>/dev/null)
[ -n "$tok" ] || tok=$(sed 's/.*vmcp\.token=\([^ ]*\).*/\1/' /proc/cmdline)
port=
while [ -z "$port" ]; do
  for d in /sys/class/virtio-ports/*; do
    [ "$(cat $d/name 2>/dev/null)" = vmcp.agent ] && port=/dev/${d##*/}
  done
  sleep 0.1
done
while [ ! -e "$port" ]; do sleep 0.1; done
exec 3<>"$port"
n=${#tok}
len=$((7 + n))
{ printf "\\$(printf %03o $len)\\000\\000\\000\\001\\000\\002\\001h\\017\\$(printf %03o $n)"; printf %s "$tok"; printf '\000'; } >&3
echo "hostile init: said hello, now silent"
exec sleep 100000
"#;

/// A guest that says hello and then never answers: `vmcp run` (no --timeout) ends with a
/// clear error instead of hanging, and leaves nothing behind.
#[test]
fn a_guest_that_stops_answering_after_hello_does_not_hang_run() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let env = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let Some((kernel, initrd)) = hostile_initrd(&env, dir.path(), HELLO_THEN_SILENT) else {
        vm::skip("no guest image to build the hostile initrd from");
        return;
    };
    let t = Instant::now();
    let out = env
        .cmd()
        .arg("run")
        .arg("--cold")
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains("did not answer"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(150), "{:?}", t.elapsed());
    env.assert_clean();
}

//! Guest networking as a user runs it: `vmcp run --net ... --publish ...` with real VMs.
//!
//! Only loopback addresses are used: the "outside" is test-made servers on 127.0.0.1, which
//! the guest could reach through QEMU's gateway 10.0.2.2 if the network were not restricted,
//! so every "refused" below is a real attempt that must fail. Without QEMU or an image the
//! tests print `SKIPPED: <reason>` (fail under `VMCP_REQUIRE_VM=1`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vmcp_test_support::{http_server, vm};

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn run(runtime: &tempfile::TempDir, flags: &[&str], script: &str) -> Output {
    Command::new(VMCP)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .arg("run")
        .args(flags)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The rest of the line of `stdout` that starts with `KEY:` (the scripts below print one such
/// line per check).
fn keyed_line(stdout: &str, key: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}: line in {stdout}"))
        .to_string()
}

#[test]
fn none_mode_has_no_network_card() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let rt = tempfile::tempdir().unwrap();
    let out = run(&rt, &[], "ls /sys/class/net; env | grep -ci proxy || true");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "lo\n0\n");
}

/// `--net allow=127.0.0.1:ALLOWED --net-via VIA`: the allowed host is reached (A), another
/// port of it (B), the metadata address (M) and a private address (P) are refused, each
/// refusal is explained on vmcp's stderr, the allowed server saw exactly the proxied request
/// and the other nothing, and nothing is left behind. `extra(allowed)` is run after these in
/// the guest; its stdout comes back for the caller's own checks.
fn allow_mode_checks(via: &str, extra: &dyn Fn(u16) -> String) -> Option<String> {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return None;
    }
    let (allowed, allowed_hits) = http_server("allowed-body");
    let (other, other_hits) = http_server("other-body");
    let rt = tempfile::tempdir().unwrap();
    // The guest's proxy settings exclude 127.0.0.1, which in the guest is the guest itself;
    // clearing NO_PROXY sends these requests for the host's 127.0.0.1 through the proxy.
    let script = format!(
        "export NO_PROXY= no_proxy=
         echo \"A:$(wget -q -O - http://127.0.0.1:{allowed}/)\"
         wget -q -O - http://127.0.0.1:{other}/ >/dev/null 2>&1; echo \"B:$?\"
         wget -q -O - http://169.254.169.254/latest/meta-data/ >/dev/null 2>&1; echo \"M:$?\"
         wget -q -O - http://10.0.0.1/ >/dev/null 2>&1; echo \"P:$?\"
         {}",
        extra(allowed)
    );
    let allow = format!("allow=127.0.0.1:{allowed}");
    let out = run(&rt, &["--net", &allow, "--net-via", via], &script);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(keyed_line(&stdout, "A"), "allowed-body", "{stderr}");
    for k in ["B", "M", "P"] {
        assert_ne!(keyed_line(&stdout, k), "0", "{k} was not refused: {stdout}");
    }
    for target in [format!("127.0.0.1:{other}"), "169.254.169.254:80".into()] {
        assert!(
            stderr.contains(&format!("no rule allows {target}")),
            "{stderr}"
        );
    }
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1);
    assert_eq!(other_hits.load(Ordering::SeqCst), 0);
    let left: Vec<_> = std::fs::read_dir(rt.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    Some(stdout)
}

#[test]
fn allow_mode_on_a_card_reaches_the_allowed_host_and_nothing_else() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let udp_port = udp.local_addr().unwrap().port();
    let extra = |allowed: u16| {
        format!(
            "echo \"D:$(echo x | nc -w 2 10.0.2.2 {allowed} 2>/dev/null | head -c 40)\"
             echo ping | nc -u -w 1 10.0.2.2 {udp_port}
             echo \"R:$(grep -c nameserver /etc/resolv.conf 2>/dev/null || echo 0)\""
        )
    };
    let Some(stdout) = allow_mode_checks("card", &extra) else {
        return;
    };
    // Direct TCP to the host through QEMU's gateway gets nowhere.
    assert_eq!(keyed_line(&stdout, "D"), "", "{stdout}");
    assert_eq!(
        keyed_line(&stdout, "R"),
        "0",
        "the guest has a resolver configured"
    );
    let mut buf = [0u8; 64];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "a UDP datagram left the guest"
    );
}

/// Over the agent channel (the default): the same allow-list with no network card in the
/// guest; the proxy is on the guest's loopback, where the agent carries each connection over
/// its channel.
#[test]
fn allow_mode_over_the_agent_channel_has_no_card_and_the_same_rules() {
    let extra = |_: u16| {
        "echo \"N:$(ls /sys/class/net | tr '\\n' ' ')\"
         echo \"X:$HTTPS_PROXY\""
            .to_string()
    };
    let Some(stdout) = allow_mode_checks("channel", &extra) else {
        return;
    };
    assert_eq!(
        keyed_line(&stdout, "N"),
        "lo ",
        "a network card in channel mode"
    );
    assert_eq!(keyed_line(&stdout, "X"), "http://127.0.0.1:3128");
}

#[test]
fn nat_mode_warns_and_reaches_the_host() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let (port, hits) = http_server("nat-body");
    let rt = tempfile::tempdir().unwrap();
    let out = run(
        &rt,
        &["--net", "nat"],
        &format!(
            "wget -q -O - http://10.0.2.2:{port}/; env | grep -ci proxy || true; \
             grep nameserver /etc/resolv.conf"
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "nat-body0\nnameserver 10.0.2.3\n");
    assert!(text(&out.stderr).contains("warning: --net nat gives the guest unrestricted"));
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

/// A non-loopback address of this host, if it has one.
fn non_loopback_addr() -> Option<std::net::IpAddr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn published_port_on_a_card_is_reachable_on_loopback_only() {
    published_port_answers(&["--net-via", "card"]);
}

/// Over the agent channel (the default) there is no card at all: the host's listener hands
/// each connection to the guest agent, which connects to the guest port.
#[test]
fn published_port_over_the_agent_channel_is_reachable_on_loopback_only() {
    published_port_answers(&[]);
}

fn published_port_answers(flags: &[&str]) {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let host_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let rt = tempfile::tempdir().unwrap();
    let child = Command::new(VMCP)
        .env("XDG_RUNTIME_DIR", rt.path())
        .args(["run", "--timeout", "40", "--publish"])
        .arg(format!("{host_port}:8000"))
        .args(flags)
        .args([
            "--",
            "sh",
            "-c",
            "mkdir -p /tmp/w && echo published-body > /tmp/w/index.html && httpd -f -p 8000 -h /tmp/w",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let get = |addr: String| -> Option<String> {
        let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("published-body").then_some(out)
    };
    let start = Instant::now();
    let mut got = None;
    while got.is_none() && start.elapsed() < Duration::from_secs(35) {
        got = get(format!("127.0.0.1:{host_port}"));
        if got.is_none() {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let other = non_loopback_addr().map(|ip| get(format!("{ip}:{host_port}")));
    let mut child = child;
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        got.is_some(),
        "published port never answered: {}",
        text(&out.stderr)
    );
    match other {
        Some(r) => assert!(
            r.is_none(),
            "the published port answered on a non-loopback address"
        ),
        None => vmcp_test_support::skipped!("SKIPPED (part): no non-loopback address to check"),
    }
}

/// `--net allow=...` under an approval policy: a target off the allow list is handed to the
/// policy's `host` rules (here: denied by a rule) and the guest reads the reason in the
/// proxy's answer; the allowed host still passes without asking, the refused one is never
/// dialled, and the decision is in the audit log.
#[test]
fn off_list_egress_goes_through_the_approval_policy() {
    let _l = vm::lock();
    if !vm::ready(VMCP) {
        return;
    }
    let (allowed, _) = http_server("allowed-body");
    let (other, other_hits) = http_server("other-body");
    let rt = tempfile::tempdir().unwrap();
    let policy = rt.path().join("policy.toml");
    std::fs::write(
        &policy,
        "default = \"ask\"\n[[rule]]\naction = \"deny\"\nhost = \"127.0.0.*\"\n",
    )
    .unwrap();
    let audit = rt.path().join("audit.jsonl");
    let script = format!(
        "export NO_PROXY= no_proxy=
         echo \"A:$(wget -q -O - http://127.0.0.1:{allowed}/)\"
         (printf 'GET http://127.0.0.1:{other}/ HTTP/1.0\\r\\nHost: 127.0.0.1:{other}\\r\\n\\r\\n'; sleep 3) \
           | nc 10.0.2.100 3128"
    );
    let out = run(
        &rt,
        &[
            "--net",
            &format!("allow=127.0.0.1:{allowed}"),
            "--net-via",
            "card",
            "--policy",
            &policy.display().to_string(),
            "--audit-log",
            &audit.display().to_string(),
        ],
        &script,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("A:allowed-body"), "{stdout}");
    assert!(stdout.contains("403"), "{stdout}");
    assert!(
        stdout.contains("is not on the allow list and was not approved: denied by rule at line 2"),
        "{stdout}"
    );
    assert_eq!(other_hits.load(Ordering::SeqCst), 0);
    // A rule decided it: nobody was asked, so nothing is pending or audited as a person's.
    let audited = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(audited.is_empty(), "{audited}");
}

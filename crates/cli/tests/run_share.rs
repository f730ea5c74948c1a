//! `vmcp run --share`: a read-only share the guest cannot write, a writable share whose
//! changes come back into the host directory and nowhere else, symlinks that stay inside.
//! Skipped loudly without QEMU, a guest image or e2fsprogs; `VMCP_REQUIRE_VM=1` turns the
//! skips into failures.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use vmcp_test_support::vm;

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn ready() -> bool {
    vm::ready_with_tools(VMCP, &["mkfs.ext4"])
}

fn run(share: &str, script: &str) -> Output {
    Command::new(VMCP)
        .args([
            "run",
            "--cold",
            "--timeout",
            "120",
            "--share",
            share,
            "--",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn read_only_and_writable_shares() {
    if !ready() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let host = d.path().join("shared");
    std::fs::create_dir_all(host.join("sub")).unwrap();
    std::fs::write(host.join("a"), b"a\n").unwrap();
    std::fs::write(host.join("sub/f"), b"f\n").unwrap();
    let outside = d.path().join("outside");
    std::fs::write(&outside, b"outside\n").unwrap();
    // A symlink to a host file outside the share: the guest must not see that file.
    std::os::unix::fs::symlink(&outside, host.join("out")).unwrap();

    let ro = format!("{}:/work:ro", host.display());
    let out = run(
        &ro,
        "cat /work/a /work/sub/f; cat /work/out 2>/dev/null || echo no-outside; \
         echo x > /work/b 2>/dev/null || echo read-only",
    );
    assert_eq!(
        text(&out.stdout),
        "a\nf\nno-outside\nread-only\n",
        "{}",
        text(&out.stderr)
    );
    assert!(!host.join("b").exists());

    let rw = format!("{}:/work:rw", host.display());
    let out = run(
        &rw,
        "echo new > /work/new; chmod 4755 /work/new; rm /work/a; echo g > /work/sub/f; \
         ln -s /etc/passwd /work/evil; mkdir /work/dir; echo z > /work/dir/z; \
         echo through > /work/out 2>/dev/null; true",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(host.join("new")).unwrap(), b"new\n");
    let mode = std::fs::metadata(host.join("new"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "setuid must not come back");
    assert!(!host.join("a").exists());
    assert_eq!(std::fs::read(host.join("sub/f")).unwrap(), b"g\n");
    assert_eq!(std::fs::read(host.join("dir/z")).unwrap(), b"z\n");
    assert_eq!(
        std::fs::read_link(host.join("evil")).unwrap(),
        std::path::Path::new("/etc/passwd")
    );
    // The file the host symlink pointed at is untouched: writes never leave the share.
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside\n");
    let siblings: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(siblings.len(), 2, "{siblings:?}");
}

/// One HTTP/1.1 request to the approval page's JSON API; the body of the answer.
fn api(addr: &str, token: &str, method: &str, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{method} {path}: {out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

/// Three writable shares under `default = "ask"`, decided through the approval page's JSON
/// API while `vmcp run` waits: the first approved, the second partly approved (one file), the
/// third denied. Only what was approved reaches the host directories; the run says what was
/// applied and discarded, and the audit log has a line per decision. One VM.
#[test]
fn shares_under_an_ask_policy_wait_for_approval() {
    use std::io::BufRead;
    if !ready() {
        return;
    }
    let _vm = vm::lock();
    let d = tempfile::tempdir().unwrap();
    let hosts: Vec<_> = ["yes", "part", "no"]
        .iter()
        .map(|n| {
            let h = d.path().join(n);
            std::fs::create_dir_all(&h).unwrap();
            std::fs::write(h.join("old"), b"old\n").unwrap();
            h
        })
        .collect();
    let policy = d.path().join("policy.toml");
    std::fs::write(&policy, "default = \"ask\"\n").unwrap();
    let audit = d.path().join("audit.jsonl");
    let mut args: Vec<String> = vec![
        "run".into(),
        "--cold".into(),
        "--timeout".into(),
        "300".into(),
        "--policy".into(),
        policy.display().to_string(),
        "--approval-ui".into(),
        "127.0.0.1:0".into(),
        "--approval-timeout".into(),
        "120".into(),
        "--audit-log".into(),
        audit.display().to_string(),
    ];
    args.extend(vm::image_args());
    for (i, h) in hosts.iter().enumerate() {
        args.push("--share".into());
        args.push(format!("{}:/s{i}:rw", h.display()));
    }
    args.extend(
        [
            "--",
            "sh",
            "-c",
            "for i in 0 1 2; do echo new > /s$i/new; echo also > /s$i/also; \
             echo changed > /s$i/old; done",
        ]
        .map(String::from),
    );
    let mut child = Command::new(VMCP)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let url = loop {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "vmcp run ended early"
        );
        if let Some(u) = line.trim().strip_prefix("vmcp: approval page: ") {
            break u.to_string();
        }
    };
    let rest = std::thread::spawn(move || {
        let mut s = String::new();
        for l in err.lines() {
            s.push_str(&l.unwrap());
            s.push('\n');
        }
        s
    });
    let (addr, token) = url
        .strip_prefix("http://")
        .and_then(|u| u.split_once("/?token="))
        .unwrap();
    let (addr, token) = (addr.to_string(), token.to_string());
    let mut decided = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    while decided < 3 {
        assert!(std::time::Instant::now() < deadline, "no approvals came");
        let pending: serde_json::Value =
            serde_json::from_str(&api(&addr, &token, "GET", "/api/pending", "")).unwrap();
        for item in pending.as_array().unwrap() {
            let id = item["id"].as_str().unwrap();
            let dir = item["crossing"]["host_dir"].as_str().unwrap();
            let files: Vec<&str> = item["crossing"]["changes"]["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["path"].as_str().unwrap())
                .collect();
            assert_eq!(files, ["also", "new", "old"], "{item}");
            let (verb, body) = if dir.ends_with("/yes") {
                ("approve", String::new())
            } else if dir.ends_with("/part") {
                ("approve", r#"{"files": ["new"]}"#.to_string())
            } else {
                ("deny", r#"{"reason": "not this one"}"#.to_string())
            };
            api(
                &addr,
                &token,
                "POST",
                &format!("/api/pending/{id}/{verb}"),
                &body,
            );
            decided += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = child.wait().unwrap();
    let stderr = rest.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let read = |h: &std::path::Path, f: &str| std::fs::read_to_string(h.join(f)).ok();
    // Approved: everything.
    assert_eq!(read(&hosts[0], "new").as_deref(), Some("new\n"));
    assert_eq!(read(&hosts[0], "old").as_deref(), Some("changed\n"));
    // Partly approved: only `new`.
    assert_eq!(read(&hosts[1], "new").as_deref(), Some("new\n"));
    assert_eq!(read(&hosts[1], "also"), None);
    assert_eq!(read(&hosts[1], "old").as_deref(), Some("old\n"));
    // Denied: nothing.
    assert_eq!(read(&hosts[2], "new"), None);
    assert_eq!(read(&hosts[2], "old").as_deref(), Some("old\n"));
    assert!(stderr.contains("approved; 3 applied"), "{stderr}");
    assert!(stderr.contains("1 applied (new), 2 discarded"), "{stderr}");
    assert!(
        stderr.contains("denied: not this one; 0 applied"),
        "{stderr}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decisions: Vec<&str> = lines
        .iter()
        .map(|l| l["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["approved", "approved_files", "denied"]);
    assert!(lines
        .iter()
        .all(|l| l["kind"] == "share_changes" && l["by"] == "api"));
}

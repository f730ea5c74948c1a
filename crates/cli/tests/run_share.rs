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

//! `vmcp run --image`: an OCI archive made here (static busybox from the host), imported,
//! booted; run defaults, the per-VM writable layer, `--diff`, `--keep-changes`, and two VMs
//! on one image at once. Skipped loudly without QEMU, a guest image, e2fsprogs or a static
//! busybox; `VMCP_REQUIRE_VM=1` turns the skips into failures.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmcp_image::oci_write::{config_json, write_docker_archive, Layer};

use vmcp_test_support::vm;

const VMCP: &str = env!("CARGO_BIN_EXE_vmcp");

fn ready() -> bool {
    if !vm::ready_with_tools(VMCP, &["mkfs.ext4"]) {
        return false;
    }
    if busybox().is_none() {
        return vm::skip("no static busybox on the host (apt-get install busybox-static)");
    }
    true
}

fn busybox() -> Option<Vec<u8>> {
    let data = std::fs::read("/bin/busybox").ok()?;
    // A static binary has no PT_INTERP: no "/lib64/ld-linux" string in it.
    let dynamic = data.windows(12).any(|w| w == b"/lib64/ld-li");
    (!dynamic).then_some(data)
}

/// A test image: busybox, a user `app` (1000), /work and /data writable by everyone.
struct TestImage {
    dir: tempfile::TempDir,
    disk: PathBuf,
}

fn build_image() -> TestImage {
    let dir = tempfile::tempdir().unwrap();
    let mut l = Layer::new();
    l.dir("bin", 0o755).unwrap();
    l.file("bin/busybox", 0o755, &busybox().unwrap()).unwrap();
    for applet in [
        "sh", "cat", "echo", "id", "pwd", "sleep", "rm", "ls", "env", "test",
    ] {
        l.symlink(&format!("bin/{applet}"), "busybox").unwrap();
    }
    l.dir("etc", 0o755).unwrap();
    l.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/work:/bin/sh\n",
    )
    .unwrap();
    l.file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n")
        .unwrap();
    l.dir("work", 0o777).unwrap();
    l.dir("data", 0o777).unwrap();
    l.file("data/old", 0o666, b"old\n").unwrap();
    l.file("data/keep", 0o666, b"v1\n").unwrap();
    let cfg = config_json(
        "amd64",
        &serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=hello from the image"],
            "WorkingDir": "/work",
            "User": "app",
        }),
    );
    let archive = dir.path().join("busybox.tar");
    write_docker_archive(
        &archive,
        Some("vmcp-test/busybox:1"),
        &cfg,
        &[l.finish().unwrap()],
        true,
    )
    .unwrap();
    let out = Command::new(VMCP)
        .args(["image", "import", "--arch", "x86_64", "--cache-dir"])
        .arg(dir.path().join("cache"))
        .arg(&archive)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout).split('\t').nth(1).unwrap().to_string();
    let disk = dir
        .path()
        .join("cache/rootfs")
        .join(key)
        .join("rootfs.ext4");
    assert!(disk.is_file());
    TestImage { dir, disk }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `vmcp run --image` with its own runtime and temp directories.
fn run(img: &TestImage, tag: &str, flags: &[&str], script: &str) -> Output {
    let scratch = img.dir.path().join(format!("tmp-{tag}"));
    let runtime = img.dir.path().join(format!("run-{tag}"));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::create_dir_all(&runtime).unwrap();
    let out = Command::new(VMCP)
        .env("TMPDIR", &scratch)
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["run", "--timeout", "120", "--image"])
        .arg(&img.disk)
        .args(flags)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    // Nothing left behind: no runtime dir, no writable layer.
    let left = |d: &Path| std::fs::read_dir(d).unwrap().count();
    assert_eq!(left(&runtime), 0, "runtime dir not cleaned up");
    assert_eq!(left(&scratch), 0, "writable layer not removed");
    out
}

#[test]
fn an_imported_archive_boots_with_its_defaults_and_lists_changes() {
    if !ready() {
        return;
    }
    let img = build_image();
    let out = run(
        &img,
        "a",
        &["--diff"],
        "echo \"$GREETING\"; pwd; id -u; id -g; echo new > /work/new; \
         echo v2 > /data/keep; rm /data/old; cat /data/keep",
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(
        stdout, "hello from the image\n/work\n1000\n1000\nv2\n",
        "{stderr}"
    );
    for line in ["A /work/new", "M /data/keep", "D /data/old"] {
        assert!(
            stderr.lines().any(|l| l == line),
            "{line} missing:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 changes"), "{stderr}");
    // -e and -w override the image's defaults.
    let out = run(
        &img,
        "b",
        &["-e", "GREETING=override", "-w", "/data"],
        "echo \"$GREETING\"; pwd; cat /data/old",
    );
    assert_eq!(
        text(&out.stdout),
        "override\n/data\nold\n",
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn two_vms_share_one_image_with_independent_writes_and_can_keep_them() {
    if !ready() {
        return;
    }
    let img = build_image();
    let kept = img.dir.path().join("kept.ext4");
    let script = |v: &str| {
        format!("echo {v} > /data/f; echo {v} > /data/keep; sleep 3; cat /data/f /data/keep")
    };
    let keep = ["--keep-changes", kept.to_str().unwrap()];
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run(&img, "one", &[], &script("one")));
        let b = s.spawn(|| run(&img, "two", &keep, &script("two")));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(text(&a.stdout), "one\none\n", "{}", text(&a.stderr));
    assert_eq!(text(&b.stdout), "two\ntwo\n", "{}", text(&b.stderr));
    assert!(text(&b.stderr).contains("kept the writable layer"));
    // The image itself never changed: a third VM sees the original.
    let c = run(
        &img,
        "three",
        &[],
        "cat /data/keep; test -e /data/f || echo no-f",
    );
    assert_eq!(text(&c.stdout), "v1\nno-f\n", "{}", text(&c.stderr));
    // The kept layer holds what the second VM wrote.
    let debugfs = vmcp_image::import::find_tool("debugfs").unwrap();
    let out = Command::new(debugfs)
        .args(["-R", "cat /upper/data/f"])
        .arg(&kept)
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "two\n");
}

/// A `vmcp run --image` killed with SIGKILL cannot remove its writable layer; the next
/// `--image` run sweeps it (the layer's directory names its owner, which is gone).
#[test]
fn a_killed_runs_writable_layer_is_swept_by_the_next_run() {
    if !ready() {
        return;
    }
    let img = build_image();
    let scratch = img.dir.path().join("tmp-killed");
    let runtime = img.dir.path().join("run-killed");
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::create_dir_all(&runtime).unwrap();
    let mut child = Command::new(VMCP)
        .env("TMPDIR", &scratch)
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["run", "--cold", "--timeout", "120", "--image"])
        .arg(&img.disk)
        .args(["--", "sleep", "60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let layers = || {
        std::fs::read_dir(&scratch)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("vmcp-layer"))
            .count()
    };
    let start = std::time::Instant::now();
    while layers() == 0 && start.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(layers(), 1, "no writable layer appeared");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        layers(),
        1,
        "SIGKILL leaves the layer (nothing else could remove it)"
    );
    let out = Command::new(VMCP)
        .env("TMPDIR", &scratch)
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["run", "--cold", "--timeout", "120", "--image"])
        .arg(&img.disk)
        .args(["--", "sh", "-c", ":"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(layers(), 0, "the stale layer was not swept");
}

//! `vmcp image ...` from the command line, without building anything.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};

fn vmcp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vmcp"))
}

#[test]
fn path_of_an_unbuilt_image_says_what_to_run() {
    let cache = tempfile::tempdir().unwrap();
    let agent = cache.path().join("agent");
    // A static x86-64 ELF header is all the agent check needs.
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    std::fs::write(&agent, elf).unwrap();
    let out = vmcp()
        .args(["image", "path", "--arch", "x86_64", "--cache-dir"])
        .arg(cache.path())
        .arg("--agent")
        .arg(&agent)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vmcp image build"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_arch_and_bad_agent_are_one_line_errors() {
    let out = vmcp()
        .args(["image", "build", "--arch", "riscv64"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("riscv64"));

    let cache = tempfile::tempdir().unwrap();
    let out = vmcp()
        .args(["image", "build", "--arch", "x86_64", "--cache-dir"])
        .arg(cache.path())
        .arg("--agent")
        .arg(cache.path().join("missing-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing-agent") && err.lines().count() == 1,
        "{err}"
    );
    // Nothing was created but the cache directory itself.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

#[test]
fn prune_of_an_empty_cache_removes_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let out = vmcp()
        .args(["image", "prune", "--cache-dir"])
        .arg(cache.path())
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
}

#[cfg(unix)]
#[test]
fn import_list_rm_and_prune_rootfs_images() {
    use vmcp_image::oci_write::{config_json, write_docker_archive, Layer};
    if vmcp_image::import::find_tool("mkfs.ext4").is_none() {
        vmcp_test_support::skipped!("SKIPPED: mkfs.ext4 (e2fsprogs) not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let cfg = config_json("amd64", &serde_json::json!({"Env": ["A=1"]}));
    let mut layer = Layer::new();
    layer
        .file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
        .unwrap();
    let archive = d.path().join("img.tar");
    write_docker_archive(
        &archive,
        Some("hello:1"),
        &cfg,
        &[layer.finish().unwrap()],
        true,
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = vmcp()
            .args(args)
            .arg("--arch")
            .arg("x86_64")
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let a = archive.to_str().unwrap();
    let (code, out, err) = run(&["image", "import", a]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("hello:1\toci-"), "{out}");
    assert!(err.contains("layer 1/1"), "{err}");
    // Again, under another name: a cache hit that moves nothing but the name.
    let (code, out2, err) = run(&["image", "import", a, "--name", "other"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("already imported"), "{err}");
    assert!(out2.starts_with("hello:1,other\t"), "{out2}");
    let (_, list, _) = run(&["image", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    // A hostile archive: one line, exit 125, nothing left behind.
    let mut bad = Layer::new();
    bad.file("../../x", 0o644, b"x").unwrap();
    let bad_archive = d.path().join("bad.tar");
    write_docker_archive(&bad_archive, None, &cfg, &[bad.finish().unwrap()], false).unwrap();
    let (code, _, err) = run(&["image", "import", bad_archive.to_str().unwrap()]);
    assert_eq!(code, Some(125));
    assert_eq!(
        err.lines().last().map(|l| l.contains("..")),
        Some(true),
        "{err}"
    );
    let (code, _, err) = run(&["image", "rm", "no-such-image"]);
    assert_eq!(code, Some(125));
    assert!(err.contains("vmcp image list"), "{err}");
    // Prune keeps named images; rm removes them.
    let (code, _, _) = run(&["image", "prune"]);
    assert_eq!(code, Some(0));
    let (_, list, _) = run(&["image", "list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    let (code, _, err) = run(&["image", "rm", "other"]);
    assert_eq!(code, Some(0), "{err}");
    let (_, list, _) = run(&["image", "list"]);
    assert!(list.is_empty(), "{list}");
}

//! `import_oci` end to end: archives made here, ext4 files checked with `debugfs`.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use vmcp_image::import::{find_tool, import_oci};
use vmcp_image::oci_write::{config_json, write_docker_archive, write_oci_layout, Layer};
use vmcp_image::rootfs::ImportOptions;
use vmcp_image::Arch;

fn layers() -> Vec<Vec<u8>> {
    let mut base = Layer::new();
    base.dir("etc", 0o755).unwrap();
    base.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    )
    .unwrap();
    base.file("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n")
        .unwrap();
    base.file("etc/old", 0o644, b"old").unwrap();
    base.file_owned("home/app/notes", 0o600, 1000, 1000, b"hi")
        .unwrap();
    base.char_device("dev/null", 1, 3).unwrap();
    let mut top = Layer::new();
    top.whiteout("etc", "old").unwrap();
    top.symlink("etc/link", "/etc/passwd").unwrap();
    vec![base.finish().unwrap(), top.finish().unwrap()]
}

fn debugfs(disk: &Path, cmd: &str) -> String {
    let out = Command::new(find_tool("debugfs").unwrap())
        .args(["-R", cmd])
        .arg(disk)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have_mkfs() -> bool {
    if find_tool("mkfs.ext4").is_some() && find_tool("debugfs").is_some() {
        return true;
    }
    vmcp_test_support::skipped!("SKIPPED: e2fsprogs (mkfs.ext4, debugfs) not installed");
    false
}

#[test]
fn docker_and_oci_archives_become_cached_ext4_images() {
    if !have_mkfs() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let cfg = config_json(
        "amd64",
        &serde_json::json!({"Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/home/app", "User": "app"}),
    );
    let docker = d.path().join("docker.tar");
    write_docker_archive(&docker, Some("test/app:1"), &cfg, &layers(), true).unwrap();
    let oci = d.path().join("oci.tar");
    write_oci_layout(&oci, Some("oci-app"), &cfg, &layers()).unwrap();
    let mut opts = ImportOptions::new(Arch::X86_64);
    opts.cache_dir = Some(d.path().join("cache"));
    let lines = std::cell::RefCell::new(Vec::<String>::new());
    let progress = |l: &str| lines.borrow_mut().push(l.to_string());
    for (archive, name) in [(&docker, "test/app:1"), (&oci, "oci-app")] {
        let img = import_oci(archive, &opts, &progress).unwrap();
        assert_eq!(img.info.names, [name]);
        assert_eq!(img.info.env, ["PATH=/bin", "GREETING=hi"]);
        assert_eq!(img.info.workdir.as_deref(), Some("/home/app"));
        assert_eq!(img.info.uid_gid, Some((1000, 1000)));
        assert!(img.info.notes.iter().any(|n| n.contains("/dev/null")));
        let ls = debugfs(&img.disk, "ls -l /etc");
        assert!(ls.contains("passwd") && ls.contains("link"), "{ls}");
        assert!(!ls.contains("old"), "{ls}");
        let stat = debugfs(&img.disk, "stat /home/app/notes");
        if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(d.path()).unwrap()) == 0 {
            assert!(
                stat.contains("User:  1000") && stat.contains("Group:  1000"),
                "{stat}"
            );
        }
        assert!(stat.contains("Mode:  0600"), "{stat}");
        let link = debugfs(&img.disk, "stat /etc/link");
        assert!(link.contains("Fast link dest: \"/etc/passwd\""), "{link}");
        // The same archive again: a cache hit, no rebuild.
        lines.borrow_mut().clear();
        let again = import_oci(archive, &opts, &progress).unwrap();
        assert_eq!(again.info.key, img.info.key);
        assert_eq!(again.info.created, img.info.created);
        assert!(lines
            .borrow()
            .iter()
            .any(|l| l.contains("already imported")));
    }
    assert_eq!(vmcp_image::rootfs::list(&d.path().join("cache")).len(), 2);
    // No build leftovers.
    let leftovers: Vec<_> = std::fs::read_dir(d.path().join("cache/rootfs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn hostile_archives_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config_json("amd64", &serde_json::json!({}));
    let mut opts = ImportOptions::new(Arch::X86_64);
    opts.cache_dir = Some(d.path().join("cache"));
    let mut escape = Layer::new();
    escape.file("../../escaped", 0o644, b"x").unwrap();
    let mut sparse = Layer::new();
    sparse.sparse_file("big", 10_000_000_000).unwrap();
    let mut lying = Layer::new();
    lying
        .lying_file("big", 10_000_000_000, &[1u8; 1024])
        .unwrap();
    for (i, (layer, want)) in [(escape, ".."), (sparse, "sparse"), (lying, "10000000000")]
        .into_iter()
        .enumerate()
    {
        let archive = d.path().join(format!("bad{i}.tar"));
        write_docker_archive(&archive, None, &cfg, &[layer.finish().unwrap()], false).unwrap();
        let err = import_oci(&archive, &opts, &|_| {}).unwrap_err();
        let chain = vmcp_test_support::error_chain(&err);
        assert!(chain.contains(want), "{chain}");
        assert!(!d.path().join("escaped").exists());
    }
    // Not an image at all, and an image for another architecture.
    let plain = d.path().join("plain.tar");
    std::fs::write(&plain, Layer::new().finish().unwrap()).unwrap();
    let err = vmcp_test_support::error_chain(&import_oci(&plain, &opts, &|_| {}).unwrap_err());
    assert!(err.contains("manifest.json"), "{err}");
    let arm = d.path().join("arm.tar");
    write_docker_archive(
        &arm,
        None,
        &config_json("arm64", &serde_json::json!({})),
        &[],
        false,
    )
    .unwrap();
    let err = vmcp_test_support::error_chain(&import_oci(&arm, &opts, &|_| {}).unwrap_err());
    assert!(err.contains("arm64"), "{err}");
    // Every failure cleaned up after itself.
    let root = d.path().join("cache/rootfs");
    let left = std::fs::read_dir(&root).map(|r| r.count()).unwrap_or(0);
    assert_eq!(left, 0);
}

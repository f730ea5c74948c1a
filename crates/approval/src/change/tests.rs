use super::*;

use std::path::Path;

fn write(root: &Path, rel: &str, content: &[u8]) {
    let p = join_rel(root, rel);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(p, content).unwrap();
}

/// A host dir and a staged copy of it.
fn pair() -> (tempfile::TempDir, tempfile::TempDir) {
    let host = tempfile::tempdir().unwrap();
    let staged = tempfile::tempdir().unwrap();
    for root in [host.path(), staged.path()] {
        write(root, "README.md", b"hello\nworld\n");
        write(root, "src/lib.rs", b"fn a() {}\n");
        write(root, "src/old.rs", b"old\n");
        write(root, "same.bin", &[0, 1, 2, 3]);
    }
    (host, staged)
}

fn list(host: &Path, staged: &Path) -> ChangeSet {
    ChangeSet::between(host, staged, &ChangeLimits::default()).unwrap()
}

#[test]
fn empty_dirs_have_no_changes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = list(a.path(), b.path());
    assert!(c.is_empty());
    let (h, s) = pair();
    assert!(list(h.path(), s.path()).is_empty());
}

#[test]
fn lists_created_modified_deleted_with_diffs() {
    let (host, staged) = pair();
    let s = staged.path();
    write(s, "README.md", b"hello\nthere\n");
    write(s, "src/new/mod.rs", b"pub mod x;\n");
    fs::remove_file(join_rel(s, "src/old.rs")).unwrap();
    write(s, "blob.bin", &[0xff, 0, 0xfe]);
    // Same size, different content: found by hashing.
    write(s, "src/lib.rs", b"fn b() {}\n");
    let c = list(host.path(), s);
    let got: Vec<(&str, ChangeKind)> = c
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e.kind))
        .collect();
    assert_eq!(
        got,
        vec![
            ("README.md", ChangeKind::Modified),
            ("blob.bin", ChangeKind::Created),
            ("src/lib.rs", ChangeKind::Modified),
            ("src/new/mod.rs", ChangeKind::Created),
            ("src/old.rs", ChangeKind::Deleted),
        ]
    );
    let readme = &c.entries[0];
    assert_eq!((readme.old_size, readme.new_size), (Some(12), Some(12)));
    assert_eq!(
        readme.diff,
        Diff::Text {
            unified: "@@ -1,2 +1,2 @@\n hello\n-world\n+there\n".into(),
            truncated: false
        }
    );
    assert_eq!(c.entries[1].diff, Diff::Binary);
    let deleted = &c.entries[4];
    assert_eq!(deleted.new_sha256, None);
    assert_eq!(
        deleted.diff,
        Diff::Text {
            unified: "@@ -1 +0,0 @@\n-old\n".into(),
            truncated: false
        }
    );
    let summary = c.summary(true);
    assert!(
        summary.contains("created  src/new/mod.rs (11 B)"),
        "{summary}"
    );
    assert!(summary.contains("+there"), "{summary}");
}

#[test]
fn hash_is_stable_and_content_sensitive() {
    let (host, staged) = pair();
    write(staged.path(), "a.txt", b"one\n");
    let h1 = list(host.path(), staged.path()).hash();
    assert_eq!(h1, list(host.path(), staged.path()).hash());
    assert_eq!(h1.len(), 64);
    write(staged.path(), "a.txt", b"two\n");
    let h2 = list(host.path(), staged.path()).hash();
    assert_ne!(h1, h2, "same size, other content: other hash");
    // Diff rendering does not change the hash.
    let mut c = list(host.path(), staged.path());
    c.entries[0].diff = Diff::Omitted;
    assert_eq!(c.hash(), h2);
}

#[cfg(unix)]
#[test]
fn symlinks_and_special_files_are_refused() {
    let (host, staged) = pair();
    std::os::unix::fs::symlink("/etc/passwd", staged.path().join("link")).unwrap();
    std::os::unix::fs::symlink("/etc", staged.path().join("dirlink")).unwrap();
    let c = list(host.path(), staged.path());
    assert!(c.entries.is_empty(), "{:?}", c.entries);
    let refused: Vec<&str> = c.refused.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(refused, vec!["dirlink", "link"]);
    assert!(c.refused[0].reason.contains("symbolic"));
    // A refused entry changes the hash (the audit records that something was held back).
    assert_ne!(c.hash(), ChangeSet::default().hash());
}

#[test]
fn bounds_entries_and_diffs() {
    let host = tempfile::tempdir().unwrap();
    let staged = tempfile::tempdir().unwrap();
    for i in 0..30 {
        write(
            staged.path(),
            &format!("f{i:02}.txt"),
            format!("{i}\n").repeat(200).as_bytes(),
        );
    }
    write(staged.path(), "big.txt", &vec![b'a'; 5000]);
    let limits = ChangeLimits {
        max_entries: 25,
        max_diff_file_bytes: 4096,
        max_diff_bytes_per_file: 300,
        max_diff_bytes_total: 2000,
        ..ChangeLimits::default()
    };
    let c = ChangeSet::between(host.path(), staged.path(), &limits).unwrap();
    assert_eq!(c.entries.len(), 25);
    assert_eq!(c.omitted, 6);
    assert_eq!(c.entries[0].diff, Diff::TooLarge, "big.txt sorts first");
    let mut total = 0;
    let mut omitted = 0;
    for e in &c.entries[1..] {
        match &e.diff {
            Diff::Text { unified, truncated } => {
                assert!(*truncated && unified.ends_with("\\ diff truncated\n"));
                assert!(unified.len() <= 300 + 20);
                total += unified.len();
            }
            Diff::Omitted => omitted += 1,
            d => panic!("{d:?}"),
        }
    }
    assert!(total <= 2000 + 20 * 25, "{total}");
    assert!(omitted > 0);
    let summary = c.summary(false);
    assert!(summary.contains("6 more changes not listed"), "{summary}");

    let walk_limits = ChangeLimits {
        max_walk: 10,
        ..ChangeLimits::default()
    };
    let e = ChangeSet::between(host.path(), staged.path(), &walk_limits).unwrap_err();
    assert!(e.to_string().contains("more than 10 entries"), "{e}");
}

#[test]
fn apply_all_and_subset() {
    let (host, staged) = pair();
    let s = staged.path();
    write(s, "README.md", b"changed\n");
    write(s, "new/deep/file.txt", b"new\n");
    fs::remove_file(join_rel(s, "src/old.rs")).unwrap();
    let c = list(host.path(), s);
    assert_eq!(c.entries.len(), 3);

    // Only the new file.
    let only: BTreeSet<String> = ["new/deep/file.txt".to_owned(), "nope".to_owned()].into();
    let r = c.apply(host.path(), s, Some(&only)).unwrap();
    assert_eq!(r.applied, vec!["new/deep/file.txt"]);
    assert_eq!(r.refused.len(), 1);
    assert_eq!(r.refused[0].path, "nope");
    assert_eq!(
        fs::read(host.path().join("new/deep/file.txt")).unwrap(),
        b"new\n"
    );
    assert_eq!(
        fs::read(host.path().join("README.md")).unwrap(),
        b"hello\nworld\n"
    );
    assert!(host.path().join("src/old.rs").exists());

    // Everything.
    let r = c.apply(host.path(), s, None).unwrap();
    assert_eq!(r.refused, vec![]);
    assert_eq!(
        fs::read(host.path().join("README.md")).unwrap(),
        b"changed\n"
    );
    assert!(!host.path().join("src/old.rs").exists());
    assert!(list(host.path(), s).is_empty());
    // No temporary files left behind.
    for ent in fs::read_dir(host.path()).unwrap() {
        let name = ent.unwrap().file_name();
        assert!(
            !name.to_string_lossy().starts_with(".vmcp-approval-"),
            "{name:?}"
        );
    }
}

#[test]
fn apply_refuses_content_changed_after_listing() {
    let (host, staged) = pair();
    write(staged.path(), "a.txt", b"approved content\n");
    let c = list(host.path(), staged.path());
    write(staged.path(), "a.txt", b"swapped after approval\n");
    let r = c.apply(host.path(), staged.path(), None).unwrap();
    assert!(r.applied.is_empty());
    assert!(
        r.refused[0].reason.contains("changed after"),
        "{:?}",
        r.refused
    );
    assert!(!host.path().join("a.txt").exists());
}

fn forged(path: &str, kind: ChangeKind, content: &[u8]) -> ChangeSet {
    let mut h = Sha256::new();
    h.update(content);
    ChangeSet {
        entries: vec![FileChange {
            path: path.into(),
            kind,
            old_size: None,
            new_size: Some(content.len() as u64),
            new_sha256: Some(hex(&h.finalize())),
            diff: Diff::Binary,
        }],
        omitted: 0,
        refused: vec![],
    }
}

#[test]
fn apply_refuses_paths_that_leave_the_host_dir() {
    let outer = tempfile::tempdir().unwrap();
    let host = outer.path().join("host");
    let staged = outer.path().join("staged");
    fs::create_dir_all(&host).unwrap();
    fs::create_dir_all(staged.join("x")).unwrap();
    fs::write(outer.path().join("victim"), b"keep").unwrap();
    fs::write(staged.join("victim"), b"evil").unwrap();
    fs::write(staged.join("x").join("victim"), b"evil").unwrap();
    for bad in [
        "../victim",
        "x/../../victim",
        "/etc/victim",
        "./victim",
        "x//victim",
        "",
        "x/",
        "..",
        "x\\..\\..\\victim",
        "c:victim",
    ] {
        for kind in [ChangeKind::Created, ChangeKind::Deleted] {
            let c = forged(bad, kind, b"evil");
            let r = c.apply(&host, &staged, None).unwrap();
            assert!(r.applied.is_empty(), "{bad:?} {kind:?} applied");
            assert_eq!(r.refused.len(), 1, "{bad:?}");
        }
    }
    assert_eq!(fs::read(outer.path().join("victim")).unwrap(), b"keep");
}

#[cfg(unix)]
#[test]
fn apply_refuses_writing_through_symlinked_dirs() {
    let outer = tempfile::tempdir().unwrap();
    let host = outer.path().join("host");
    let staged = outer.path().join("staged");
    let elsewhere = outer.path().join("elsewhere");
    for d in [&host, &staged.join("sub"), &elsewhere] {
        fs::create_dir_all(d).unwrap();
    }
    // The host dir has a symlink where the change list has a directory.
    std::os::unix::fs::symlink(&elsewhere, host.join("sub")).unwrap();
    fs::write(staged.join("sub/f"), b"data").unwrap();
    fs::write(elsewhere.join("g"), b"keep").unwrap();
    let c = forged("sub/f", ChangeKind::Created, b"data");
    let r = c.apply(&host, &staged, None).unwrap();
    assert!(r.applied.is_empty());
    assert!(
        r.refused[0].reason.contains("symbolic link"),
        "{:?}",
        r.refused
    );
    assert!(!elsewhere.join("f").exists());
    let del = forged("sub/g", ChangeKind::Deleted, b"");
    let r = del.apply(&host, &staged, None).unwrap();
    assert!(r.applied.is_empty());
    assert_eq!(fs::read(elsewhere.join("g")).unwrap(), b"keep");

    // A staged symlink swapped in after listing is not followed either.
    let host2 = outer.path().join("host2");
    fs::create_dir_all(&host2).unwrap();
    fs::write(staged.join("secret-link"), b"data").unwrap();
    let c = list(&host2, &staged);
    fs::remove_file(staged.join("secret-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", staged.join("secret-link")).unwrap();
    let r = c.apply(&host2, &staged, None).unwrap();
    assert!(!r.applied.contains(&"secret-link".to_owned()), "{r:?}");
    assert!(!host2.join("secret-link").exists());
}

#[test]
fn apply_needs_a_host_dir() {
    let c = ChangeSet::default();
    let d = tempfile::tempdir().unwrap();
    let e = c
        .apply(&d.path().join("missing"), d.path(), None)
        .unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

#[test]
fn hostile_names_are_printable() {
    let host = tempfile::tempdir().unwrap();
    let staged = tempfile::tempdir().unwrap();
    write(staged.path(), "evil\u{1b}[2J\nname", b"x\x1b]0;title\x07\n");
    let c = list(host.path(), staged.path());
    let s = c.summary(true);
    assert!(!s.contains('\u{1b}'), "{s:?}");
    assert!(s.contains("evil\\u{1b}[2J\\nname"), "{s:?}");
}

//! Gated shares: staging the guest's tar, the change list, and applying approved changes,
//! with hostile archives, hostile staging trees and hostile change lists.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use super::*;

fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, path, std::io::empty()).unwrap();
}

fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, path, target).unwrap();
}

/// Writes a raw header with `name` (the tar crate refuses `..` when building).
fn raw_file(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

struct Setup {
    _d: tempfile::TempDir,
    host: PathBuf,
    outside: PathBuf,
    staging: PathBuf,
    tar: PathBuf,
}

fn setup() -> Setup {
    let d = tempfile::tempdir().unwrap();
    let host = d.path().join("host");
    let outside = d.path().join("outside");
    let staging = d.path().join("staging");
    for p in [&host, &outside, &staging] {
        fs::create_dir(p).unwrap();
    }
    fs::write(host.join("keep.txt"), "same\n").unwrap();
    fs::write(host.join("edit.txt"), "old line\n").unwrap();
    fs::write(host.join("gone.txt"), "bye\n").unwrap();
    fs::create_dir(host.join("sub")).unwrap();
    fs::write(host.join("sub/a"), "a").unwrap();
    fs::write(outside.join("secret"), "untouched").unwrap();
    let tar = d.path().join("changes.tar");
    Setup {
        host,
        outside,
        staging,
        tar,
        _d: d,
    }
}

fn staged_from(s: &Setup, bytes: &[u8]) -> Result<Staged, StageError> {
    fs::write(&s.tar, bytes).unwrap();
    stage(&s.tar, &s.staging)
}

fn paths(changes: &[Change]) -> Vec<(String, ChangeKind)> {
    changes
        .iter()
        .map(|c| (c.path.display().to_string(), c.kind))
        .collect()
}

#[test]
fn change_list_then_full_and_partial_apply() {
    let s = setup();
    let bytes = tar_of(|b| {
        file(b, "keep.txt", b"same\n"); // copied up, unchanged: not a change
        file(b, "edit.txt", b"new line\n");
        file(b, ".wh.gone.txt", b"");
        dir(b, "newdir");
        file(b, "newdir/n.txt", b"hello\n");
        link(b, "rel-link", "newdir/n.txt");
    });
    let staged = staged_from(&s, &bytes).unwrap();
    let (changes, notes) = compute(&s.host, &staged).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(
        paths(&changes),
        [
            ("edit.txt".into(), ChangeKind::Modified),
            ("gone.txt".into(), ChangeKind::Deleted),
            ("newdir".into(), ChangeKind::Created),
            ("newdir/n.txt".into(), ChangeKind::Created),
            ("rel-link".into(), ChangeKind::Created),
        ]
    );
    let edit = changes
        .iter()
        .find(|c| c.path == Path::new("edit.txt"))
        .unwrap();
    assert_eq!((edit.old_size, edit.new_size), (Some(9), Some(9)));
    // Partly approved: only the new file (its parent directory comes with it).
    let pick: Vec<Change> = changes
        .iter()
        .filter(|c| c.path == Path::new("newdir/n.txt"))
        .cloned()
        .collect();
    let out = apply(&s.host, &staged, &pick);
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    assert_eq!(
        fs::read_to_string(s.host.join("newdir/n.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        fs::read_to_string(s.host.join("edit.txt")).unwrap(),
        "old line\n"
    );
    assert!(s.host.join("gone.txt").exists());
    // The rest.
    let out = apply(&s.host, &staged, &changes);
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    assert_eq!(
        fs::read_to_string(s.host.join("edit.txt")).unwrap(),
        "new line\n"
    );
    assert!(!s.host.join("gone.txt").exists());
    assert_eq!(
        fs::read_link(s.host.join("rel-link")).unwrap(),
        Path::new("newdir/n.txt")
    );
    // No temporary files left behind.
    let leftovers: Vec<_> = fs::read_dir(&s.host)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".vmcp-"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn opaque_directory_deletes_what_host_had() {
    let s = setup();
    let bytes = tar_of(|b| {
        dir(b, "sub");
        file(b, "sub/.wh..wh..opq", b"");
        file(b, "sub/b", b"b");
    });
    let staged = staged_from(&s, &bytes).unwrap();
    let (changes, _) = compute(&s.host, &staged).unwrap();
    assert_eq!(
        paths(&changes),
        [
            ("sub/a".into(), ChangeKind::Deleted),
            ("sub/b".into(), ChangeKind::Created),
        ]
    );
    let out = apply(&s.host, &staged, &changes);
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    assert!(!s.host.join("sub/a").exists());
    assert_eq!(fs::read(s.host.join("sub/b")).unwrap(), b"b");
}

#[test]
fn hostile_archives_stay_in_staging() {
    let s = setup();
    // `..` is refused outright.
    let mut bytes = Vec::new();
    raw_file(&mut bytes, "../outside/secret", b"pwned");
    bytes.extend_from_slice(&[0u8; 1024]);
    let err = staged_from(&s, &bytes).unwrap_err();
    assert!(
        format!("{:?}", err).contains(".."),
        "{err:?} should name the `..`"
    );
    assert_eq!(
        fs::read_to_string(s.outside.join("secret")).unwrap(),
        "untouched"
    );

    // A symlink to `/` followed by a write through it lands inside staging, and the change
    // list names a path inside HOST.
    let s = setup();
    let outside = s.outside.display().to_string();
    let bytes = tar_of(|b| {
        link(b, "esc", &outside);
        file(b, "esc/secret", b"pwned");
    });
    let staged = staged_from(&s, &bytes).unwrap();
    let (changes, _) = compute(&s.host, &staged).unwrap();
    let out = apply(&s.host, &staged, &changes);
    assert_eq!(
        fs::read_to_string(s.outside.join("secret")).unwrap(),
        "untouched"
    );
    // The link itself points out of HOST: refused.
    assert!(
        out.refused
            .iter()
            .any(|(p, r)| p == Path::new("esc") && r.contains("out of HOST")),
        "{:?}",
        out.refused
    );
    assert!(fs::symlink_metadata(s.host.join("esc")).is_err());
    // The file written "through" it is a plain file of the share.
    for ch in &changes {
        assert!(!ch.path.is_absolute() && !ch.path.starts_with(".."));
    }

    // Setuid bits are dropped.
    let s = setup();
    let bytes = tar_of(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o4755);
        h.set_size(2);
        b.append_data(&mut h, "suid", &b"#!"[..]).unwrap();
    });
    let staged = staged_from(&s, &bytes).unwrap();
    let (changes, _) = compute(&s.host, &staged).unwrap();
    apply(&s.host, &staged, &changes);
    let mode = fs::metadata(s.host.join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
}

#[test]
fn hostile_staging_trees_and_change_lists_are_refused() {
    let s = setup();
    // HOST has a symlink leading out; the guest's change writes "into" it.
    symlink(&s.outside, s.host.join("door")).unwrap();
    fs::create_dir(s.staging.join("door")).unwrap();
    fs::write(s.staging.join("door/secret"), "pwned").unwrap();
    // A socket: not a file, directory or symlink.
    let _sock = std::os::unix::net::UnixListener::bind(s.staging.join("sock")).unwrap();
    // Links pointing out: absolute, and `..` climbing above HOST.
    symlink("/etc/passwd", s.staging.join("abs")).unwrap();
    symlink("../outside/secret", s.staging.join("climb")).unwrap();
    fs::create_dir(s.staging.join("deep")).unwrap();
    symlink("../keep.txt", s.staging.join("deep/ok-link")).unwrap();
    let staged = Staged {
        root: s.staging.clone(),
        whiteouts: vec![PathBuf::from("door/secret")],
        opaque: Vec::new(),
        notes: Vec::new(),
    };
    let (changes, notes) = compute(&s.host, &staged).unwrap();
    assert!(notes.iter().any(|n| n.contains("/sock")), "{notes:?}");
    assert!(changes.iter().all(|c| c.path != Path::new("sock")));
    // Without the change that replaces the symlink `door` by a directory, the file under it
    // cannot be written: HOST's `door` still leads out.
    assert!(changes
        .iter()
        .any(|c| c.path == Path::new("door") && c.kind == ChangeKind::Modified));
    let without_door: Vec<Change> = changes
        .iter()
        .filter(|c| c.path != Path::new("door"))
        .cloned()
        .collect();
    let out = apply(&s.host, &staged, &without_door);
    let refused: Vec<_> = out.refused.iter().map(|(p, _)| p.clone()).collect();
    assert!(
        refused.contains(&PathBuf::from("door/secret")),
        "{:?}",
        out.refused
    );
    assert!(refused.contains(&PathBuf::from("abs")));
    assert!(refused.contains(&PathBuf::from("climb")));
    assert_eq!(
        fs::read_link(s.host.join("deep/ok-link")).unwrap(),
        Path::new("../keep.txt")
    );
    assert_eq!(
        fs::read_to_string(s.outside.join("secret")).unwrap(),
        "untouched"
    );

    // A change list from an approver with paths that were never computed.
    let forged = |p: &str, kind: ChangeKind| Change {
        path: PathBuf::from(p),
        kind,
        entry: EntryKind::File,
        old_size: None,
        new_size: Some(1),
        link_target: None,
    };
    let out = apply(
        &s.host,
        &staged,
        &[
            forged("../outside/secret", ChangeKind::Deleted),
            forged("/etc/hostname", ChangeKind::Created),
            forged("./x", ChangeKind::Created),
            forged("", ChangeKind::Deleted),
            forged("door/secret", ChangeKind::Deleted),
            forged("not-staged", ChangeKind::Created),
        ],
    );
    assert!(out.applied.is_empty(), "{:?}", out.applied);
    assert_eq!(out.refused.len(), 6);
    assert_eq!(
        fs::read_to_string(s.outside.join("secret")).unwrap(),
        "untouched"
    );
    assert!(s.host.join("door").is_symlink());
    // With it, the link is replaced (never followed) and the file lands inside HOST.
    let out = apply(&s.host, &staged, &changes);
    assert!(
        out.applied.contains(&PathBuf::from("door/secret")),
        "{out:?}"
    );
    assert!(fs::symlink_metadata(s.host.join("door")).unwrap().is_dir());
    assert_eq!(
        fs::read_to_string(s.outside.join("secret")).unwrap(),
        "untouched"
    );
}

#[test]
fn file_replaced_by_directory_and_back() {
    let s = setup();
    // keep.txt becomes a directory; sub (a directory) becomes a file.
    let bytes = tar_of(|b| {
        dir(b, "keep.txt");
        file(b, "keep.txt/inner", b"i");
        file(b, "sub", b"now a file");
    });
    let staged = staged_from(&s, &bytes).unwrap();
    let (changes, _) = compute(&s.host, &staged).unwrap();
    assert_eq!(
        paths(&changes),
        [
            ("keep.txt".into(), ChangeKind::Modified),
            ("keep.txt/inner".into(), ChangeKind::Created),
            ("sub".into(), ChangeKind::Modified),
        ]
    );
    let out = apply(&s.host, &staged, &changes);
    assert!(out.refused.is_empty(), "{:?}", out.refused);
    assert_eq!(fs::read(s.host.join("keep.txt/inner")).unwrap(), b"i");
    assert_eq!(fs::read(s.host.join("sub")).unwrap(), b"now a file");
}

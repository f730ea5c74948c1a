use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;
use crate::oci_write::Layer;

fn apply(tree: &Path, layers: Vec<Vec<u8>>, limits: Limits) -> Result<Applier, LayerError> {
    let mut a = Applier::new(tree, limits);
    a.set_owners(std::fs::metadata(tree).unwrap().uid() == 0);
    for l in layers {
        a.apply(&l[..])?;
    }
    a.finish()?;
    Ok(a)
}

fn layer(f: impl FnOnce(&mut Layer) -> io::Result<()>) -> Vec<u8> {
    let mut l = Layer::new();
    f(&mut l).unwrap();
    l.finish().unwrap()
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_dirs() {
    let d = tempfile::tempdir().unwrap();
    let base = layer(|l| {
        l.dir("etc", 0o755)?;
        l.file("etc/keep", 0o644, b"keep")?;
        l.file("etc/gone", 0o644, b"gone")?;
        l.dir("opq", 0o755)?;
        l.file("opq/old", 0o644, b"old")?;
        l.dir("opq/sub", 0o755)?;
        l.file("opq/sub/old2", 0o644, b"old")?;
        l.file("bin/tool", 0o4755, b"#!/bin/sh\n")?;
        l.hard_link("bin/tool2", "bin/tool")?;
        l.symlink("bin/sh", "busybox")?;
        l.file_owned("home/app/f", 0o600, 1000, 1001, b"x")?;
        l.dir("ro", 0o555)?;
        l.file("ro/f", 0o444, b"ro")?;
        Ok(())
    });
    let top = layer(|l| {
        l.whiteout("etc", "gone")?;
        l.file("etc/keep", 0o640, b"changed")?;
        l.dir("opq", 0o700)?;
        l.file("opq/new", 0o644, b"new")?;
        l.opaque("opq")?;
        l.dir("opq/sub", 0o755)?;
        Ok(())
    });
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    apply(&tree, vec![base, top], Limits::default()).unwrap();
    assert_eq!(std::fs::read(tree.join("etc/keep")).unwrap(), b"changed");
    assert_eq!(
        std::fs::metadata(tree.join("etc/keep")).unwrap().mode() & 0o7777,
        0o640
    );
    assert!(!tree.join("etc/gone").exists());
    // Opaque: the lower layer's entries are gone, the same layer's stay (even the one listed
    // before the marker).
    assert_eq!(std::fs::read(tree.join("opq/new")).unwrap(), b"new");
    assert!(!tree.join("opq/old").exists());
    assert!(tree.join("opq/sub").is_dir());
    assert!(!tree.join("opq/sub/old2").exists());
    assert_eq!(
        std::fs::metadata(tree.join("opq")).unwrap().mode() & 0o7777,
        0o700
    );
    assert!(!tree.join("opq/.wh..wh..opq").exists());
    // Hard link, symlink, setuid bit, owners, read-only dir.
    let t1 = std::fs::metadata(tree.join("bin/tool")).unwrap();
    let t2 = std::fs::metadata(tree.join("bin/tool2")).unwrap();
    assert_eq!(t1.ino(), t2.ino());
    assert_eq!(t1.mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::read_link(tree.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    let home = std::fs::metadata(tree.join("home/app/f")).unwrap();
    if home.uid() != 0 || std::fs::metadata(&tree).unwrap().uid() == 0 {
        assert_eq!((home.uid(), home.gid()), (1000, 1001));
    }
    assert_eq!(
        std::fs::metadata(tree.join("ro"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o555
    );
    assert_eq!(
        std::fs::metadata(tree.join("ro/f"))
            .unwrap()
            .modified()
            .unwrap(),
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    );
}

#[test]
fn dot_dot_paths_are_refused() {
    for name in ["../evil", "a/../../evil", "./.."] {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("t");
        std::fs::create_dir(&tree).unwrap();
        let l = layer(|l| l.file(name, 0o644, b"x").map(drop));
        let err = apply(&tree, vec![l], Limits::default()).unwrap_err();
        assert!(err.to_string().contains(".."), "{name}: {err}");
        assert!(!d.path().join("evil").exists());
    }
    // A hard link whose target climbs out.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("secret"), b"s").unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let l = layer(|l| l.hard_link("x", "../secret").map(drop));
    assert!(apply(&tree, vec![l], Limits::default()).is_err());
    assert!(!tree.join("x").exists());
}

#[test]
fn symlinks_never_lead_writes_out_of_the_root() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), b"safe").unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let out = outside.display().to_string();
    let l1 = layer(|l| {
        // An absolute symlink to a host directory, and a relative one that climbs.
        l.symlink("abs", &out)?;
        l.symlink("rel", "../../../../../../..")?;
        l.symlink("victim_link", &format!("{out}/victim"))?;
        Ok(())
    });
    let l2 = layer(|l| {
        l.file("abs/victim", 0o644, b"pwned")?;
        l.file(&format!("rel{out}/victim"), 0o644, b"pwned")?;
        // Writing to the link itself replaces the link, never the file it points at.
        l.file("victim_link", 0o644, b"pwned")?;
        // A hard link through an escaping symlink names a file inside the root.
        l.hard_link("hl", "abs/victim")?;
        Ok(())
    });
    apply(&tree, vec![l1, l2], Limits::default()).unwrap();
    assert_eq!(std::fs::read(outside.join("victim")).unwrap(), b"safe");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    // The writes landed inside the root, where the chrooted path leads.
    assert_eq!(
        std::fs::read(tree.join(out.trim_start_matches('/')).join("victim")).unwrap(),
        b"pwned"
    );
    assert!(std::fs::symlink_metadata(tree.join("victim_link"))
        .unwrap()
        .is_file());
    assert_eq!(
        std::fs::read_link(tree.join("abs")).unwrap(),
        Path::new(&out)
    );
}

#[test]
fn symlink_loops_are_refused_not_followed_forever() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let l = layer(|l| {
        l.symlink("a", "b")?;
        l.symlink("b", "a")?;
        l.file("a/x", 0o644, b"x")?;
        Ok(())
    });
    let err = apply(&tree, vec![l], Limits::default()).unwrap_err();
    assert!(err.to_string().contains("symlinks"), "{err}");
}

#[test]
fn device_nodes_are_skipped_with_a_note() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let l = layer(|l| {
        l.char_device("dev/null", 1, 3)?;
        l.char_device("dev/sda", 8, 0)?;
        l.file("ok", 0o644, b"ok")?;
        Ok(())
    });
    let a = apply(&tree, vec![l], Limits::default()).unwrap();
    assert!(!tree.join("dev/null").exists() && !tree.join("dev/sda").exists());
    assert_eq!(a.notes().len(), 2, "{:?}", a.notes());
    assert!(a.notes()[0].contains("/dev/null"), "{:?}", a.notes());
    assert!(tree.join("ok").is_file());
}

#[test]
fn size_claims_are_bounded_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    // 10 GB claimed, 1 KB present.
    let l = layer(|l| l.lying_file("big", 10_000_000_000, &[7u8; 1024]).map(drop));
    assert!(l.len() < 4096);
    let err = apply(&tree, vec![l], Limits::default()).unwrap_err();
    assert!(err.to_string().contains("10000000000"), "{err}");
    assert!(!tree.join("big").exists());
    // The same as a GNU sparse file.
    let l = layer(|l| l.sparse_file("sparse", 10_000_000_000).map(drop));
    assert!(l.len() < 4096);
    let err = apply(&tree, vec![l], Limits::default()).unwrap_err();
    assert!(err.to_string().contains("sparse"), "{err}");
    // A claim within the limit that the archive does not back is a malformed layer.
    let l = layer(|l| l.lying_file("short", 1_000_000, &[7u8; 1024]).map(drop));
    let err = apply(&tree, vec![l], Limits::default()).unwrap_err();
    assert!(matches!(err, LayerError::Tar(_)), "{err}");
}

#[test]
fn the_byte_and_entry_limits_hold_across_layers() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let l = || layer(|l| l.file("f", 0o644, &[1u8; 600]).map(drop));
    let limits = Limits {
        max_bytes: 1000,
        ..Limits::default()
    };
    let err = apply(&tree, vec![l(), l()], limits).unwrap_err();
    assert!(matches!(err, LayerError::Limit(_)), "{err}");
    let limits = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    let many = layer(|l| {
        for i in 0..5 {
            l.file(&format!("f{i}"), 0o644, b"")?;
        }
        Ok(())
    });
    let err = apply(&tree, vec![many], limits).unwrap_err();
    assert!(err.to_string().contains("more than 3 entries"), "{err}");
}

#[test]
fn oversized_long_names_are_refused_without_reading_them() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    // A GNU long-name record claiming 1 TB.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(1 << 40);
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(&[b'a'; 512]);
    let err = apply(&tree, vec![bytes], Limits::default()).unwrap_err();
    assert!(err.to_string().contains("name or PAX record"), "{err}");
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let mut junk = vec![0x41u8; 2048];
    junk[100] = 0;
    assert!(apply(&tree, vec![junk], Limits::default()).is_err());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn random_bytes_never_escape_or_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("t");
        std::fs::create_dir(&tree).unwrap();
        let _ = apply(&tree, vec![data], Limits::default());
        // Nothing but the tree in the temp dir.
        proptest::prop_assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}

#[test]
fn confined_modes_drop_setuid_setgid_and_sticky() {
    let d = tempfile::tempdir().unwrap();
    let tree = d.path().join("t");
    std::fs::create_dir(&tree).unwrap();
    let l = layer(|l| {
        l.file("suid", 0o6755, b"x")?;
        l.dir("sticky", 0o1777)?;
        Ok(())
    });
    let mut a = Applier::new(&tree, Limits::default());
    a.confine_modes(true);
    a.apply(&l[..]).unwrap();
    a.finish().unwrap();
    let mode = |p: &str| std::fs::metadata(tree.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("sticky"), 0o777);
}

//! Builder tests: pure parts always; a whole build when the pinned packages are present.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::*;
use crate::cpio::Kind;
use crate::manifest::INPUTS;

/// A minimal static x86-64 ELF header (enough for the agent check).
fn fake_agent() -> Vec<u8> {
    let mut b = vec![0u8; 64];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b.extend_from_slice(b"fake agent body");
    b
}

#[test]
fn module_names_and_depends() {
    assert_eq!(
        module_name("kernel/drivers/virtio/virtio_pci.ko"),
        "virtio_pci"
    );
    assert_eq!(module_name("kernel/x/virtio-rng.ko.xz"), "virtio_rng");
    let ko = b"\x7fELF....license=GPL\0depends=virtio,virtio_ring\0retpoline=Y\0";
    assert_eq!(module_depends(ko), ["virtio", "virtio_ring"]);
    assert!(module_depends(b"depends=\0name=x\0").is_empty());
    assert!(module_depends(b"no modinfo").is_empty());
}

fn fake_modules() -> Vec<Module> {
    vec![
        Module {
            name: "virtio".into(),
            data: b"depends=\0".to_vec(),
        },
        Module {
            name: "virtio_console".into(),
            data: b"depends=virtio\0".to_vec(),
        },
    ]
}

#[test]
fn initramfs_layout() {
    let inputs = &INPUTS[0];
    let entries = initramfs_entries(inputs, &fake_agent(), b"BUSYBOX", &fake_modules());
    let mut seen = BTreeSet::new();
    for e in &entries {
        assert!(seen.insert(e.path.clone()), "duplicate {}", e.path);
        if let Some((parent, _)) = e.path.rsplit_once('/') {
            assert!(
                seen.contains(parent),
                "{} comes before its directory",
                e.path
            );
        }
    }
    let find = |p: &str| entries.iter().find(|e| e.path == p).unwrap();
    assert_eq!(find("init").kind, Kind::File(fake_agent()));
    assert_eq!(find("init").perm, 0o755);
    assert_eq!(find("bin/sh").kind, Kind::Symlink("/bin/busybox".into()));
    assert_eq!(
        find("dev/console").kind,
        Kind::CharDev { major: 5, minor: 1 }
    );
    assert_eq!(find("tmp").perm, 0o1777);
    let list = match &find(MODULES_LIST).kind {
        Kind::File(d) => String::from_utf8(d.clone()).unwrap(),
        other => panic!("{other:?}"),
    };
    let rel = inputs.kernel_release;
    assert_eq!(
        list,
        format!("/lib/modules/{rel}/virtio.ko\n/lib/modules/{rel}/virtio_console.ko\n")
    );
    for line in list.lines() {
        assert!(seen.contains(line.trim_start_matches('/')));
    }
    // The agent's idea of the list's path is the same file.
    assert_eq!(format!("/{MODULES_LIST}"), "/etc/vmcp/modules");
}

#[test]
fn missing_agent_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = BuildOptions::new(Arch::X86_64);
    opts.cache_dir = Some(dir.path().to_path_buf());
    opts.agent = Some(dir.path().join("no-agent"));
    let err = build(&opts, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("no-agent"), "{err}");
    assert!(find_image(&opts).is_err());
}

/// Where the pinned packages may already be: `$VMCP_TEST_DEB_DIR`, else the default cache.
fn deb_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("VMCP_TEST_DEB_DIR") {
        return Some(PathBuf::from(d));
    }
    default_cache_dir().ok().map(|d| d.join("downloads"))
}

#[test]
fn full_build_from_the_pinned_packages() {
    let inputs = crate::manifest::inputs(Arch::X86_64).unwrap();
    let Some(src) = deb_dir().filter(|d| {
        d.join(inputs.kernel.file_name()).is_file() && d.join(inputs.busybox.file_name()).is_file()
    }) else {
        vmcp_test_support::skipped!("SKIPPED: the pinned packages are not downloaded (run `vmcp image build` or set VMCP_TEST_DEB_DIR)");
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let downloads = cache.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    for pin in [inputs.kernel, inputs.busybox] {
        let name = pin.file_name();
        let (from, to) = (src.join(&name), downloads.join(&name));
        std::fs::hard_link(&from, &to)
            .or_else(|_| std::fs::copy(&from, &to).map(drop))
            .unwrap();
    }
    let agent = cache.path().join("agent");
    std::fs::write(&agent, fake_agent()).unwrap();
    let mut opts = BuildOptions::new(Arch::X86_64);
    opts.cache_dir = Some(cache.path().to_path_buf());
    opts.agent = Some(agent);

    assert_eq!(find_image(&opts).unwrap(), None);
    let lines = std::cell::RefCell::new(Vec::new());
    let paths = build(&opts, &|l| lines.borrow_mut().push(l.to_string())).unwrap();
    let lines = lines.into_inner();
    assert!(
        lines.iter().any(|l| l.starts_with("unpacking linux-image")),
        "{lines:?}"
    );
    assert_eq!(find_image(&opts).unwrap().as_ref(), Some(&paths));
    assert_eq!(paths.kernel_release, inputs.kernel_release);

    let kernel = std::fs::read(&paths.kernel).unwrap();
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "not a bzImage");
    let initrd = std::fs::read(&paths.initrd).unwrap();
    let entries = cpio::read(&initrd).unwrap();
    let find = |p: &str| entries.iter().find(|e| e.path == p);
    assert_eq!(find("init").unwrap().kind, Kind::File(fake_agent()));
    match &find("bin/busybox").unwrap().kind {
        Kind::File(d) => assert!(d.len() > 500_000 && d.starts_with(b"\x7fELF")),
        other => panic!("{other:?}"),
    }
    let list = match &find(MODULES_LIST).unwrap().kind {
        Kind::File(d) => String::from_utf8(d.clone()).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(list.lines().count(), inputs.modules.len());
    for line in list.lines() {
        match &find(line.trim_start_matches('/')).unwrap().kind {
            Kind::File(d) => assert!(d.starts_with(b"\x7fELF"), "{line}"),
            other => panic!("{other:?}"),
        }
    }

    // Built once: a second call reuses it silently; --force rebuilds the same bytes.
    let again = build(&opts, &|l| panic!("unexpected progress {l}")).unwrap();
    assert_eq!(again, paths);
    // The unpacked inputs are reused, so the rebuild does not unpack the packages again.
    opts.force = true;
    let lines = std::cell::RefCell::new(Vec::new());
    let rebuilt = build(&opts, &|l| lines.borrow_mut().push(l.to_string())).unwrap();
    assert_eq!(std::fs::read(&rebuilt.initrd).unwrap(), initrd);
    assert_eq!(std::fs::read(&rebuilt.kernel).unwrap(), kernel);
    let lines = lines.into_inner();
    assert!(
        !lines.iter().any(|l| l.starts_with("unpacking")),
        "{lines:?}"
    );
    let saved = std::fs::read_dir(cache.path().join("inputs"))
        .unwrap()
        .count();
    assert_eq!(saved, 1);
    // No temporary directories are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn saved_inputs_round_trip_and_reject_strange_archives() {
    let u = Unpacked {
        kernel: b"K".to_vec(),
        busybox: b"B".to_vec(),
        modules: fake_modules(),
    };
    let back = Unpacked::from_entries(u.to_entries()).unwrap();
    assert_eq!((&back.kernel, &back.busybox), (&u.kernel, &u.busybox));
    assert_eq!(back.modules, u.modules);
    // Missing kernel, a stray symlink, a file outside modules/: not a saved-inputs archive.
    let mut no_kernel = u.to_entries();
    no_kernel.remove(0);
    assert!(Unpacked::from_entries(no_kernel).is_none());
    let mut link = u.to_entries();
    link.push(Entry::symlink("x", "y"));
    assert!(Unpacked::from_entries(link).is_none());
    let mut stray = u.to_entries();
    stray.push(Entry::file("etc/x", 0o644, vec![]));
    assert!(Unpacked::from_entries(stray).is_none());
}

#[test]
fn prune_keeps_the_current_image_and_foreign_arches() {
    let cache = tempfile::tempdir().unwrap();
    let agent = cache.path().join("agent");
    std::fs::write(&agent, fake_agent()).unwrap();
    let mut opts = BuildOptions::new(Arch::X86_64);
    opts.cache_dir = Some(cache.path().to_path_buf());
    opts.agent = Some(agent);
    let current = Plan::new(&opts).unwrap().key;
    let images = cache.path().join("images");
    let inputs_dir = cache.path().join("inputs");
    let current_inputs = format!("{}.cpio", INPUTS[0].image_key(""));
    for d in [
        images.join(&current),
        images.join("x86_64-0000000000000000"),
        images.join("aarch64-0000000000000000"),
        images.join(".build-x86_64-fresh"),
        images.join("not-an-image"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::create_dir_all(&inputs_dir).unwrap();
    for f in [current_inputs.as_str(), "x86_64-1111111111111111.cpio"] {
        std::fs::write(inputs_dir.join(f), b"x").unwrap();
    }
    let removed = prune(cache.path(), &[opts]).unwrap();
    assert_eq!(
        removed,
        vec![
            images.join("x86_64-0000000000000000"),
            inputs_dir.join("x86_64-1111111111111111.cpio")
        ]
    );
    assert!(images.join(&current).is_dir());
    assert!(images.join("aarch64-0000000000000000").is_dir());
    assert!(
        images.join(".build-x86_64-fresh").is_dir(),
        "a running build was removed"
    );
    assert!(inputs_dir.join(&current_inputs).is_file());
    // Nothing to do the second time; an arch without an agent prunes nothing.
    let mut no_agent = BuildOptions::new(Arch::X86_64);
    no_agent.agent = Some(cache.path().join("missing"));
    assert!(prune(cache.path(), &[no_agent]).unwrap().is_empty());
}

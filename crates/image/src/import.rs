//! Building rootfs images (Unix hosts): OCI archives into ext4 files, with `mkfs.ext4 -d`.
//!
//! The tree is built in a temporary directory under the cache ([`crate::layers`] applies the
//! layers), then `mkfs.ext4 -d` (e2fsprogs ≥ 1.43) turns it into an ext4 file without
//! mounting anything. The file has no journal and no reserved blocks: VMs attach it
//! read-only and write to their own layer.
//!
//! Owners: `mkfs.ext4 -d` copies the owners of the tree, so a builder running as root keeps
//! the image's owners exactly. A non-root builder cannot `chown`; its images have every file
//! owned by the builder's uid and gid (a note in `image.json` and on the progress output
//! says so). Run the import as root when owners matter.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::layers::Applier;
use crate::oci::OciArchive;
use crate::rootfs::{
    io_err, resolve_user, rootfs_root, store_info, ImportOptions, RootfsError, RootfsImage,
    RootfsInfo, DISK_FILE, ROOTFS_LAYOUT_VERSION,
};
use crate::Arch;

fn oci_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Aarch64 => "arm64",
    }
}

fn hash_file(path: &Path) -> Result<String, RootfsError> {
    let mut f = std::fs::File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("read {}", path.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::manifest::hex(&h.finalize()))
}

/// Imports an OCI image archive into the rootfs cache (or finds it there).
pub fn import_oci(
    archive: &Path,
    opts: &ImportOptions,
    progress: &dyn Fn(&str),
) -> Result<RootfsImage, RootfsError> {
    let cache = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => crate::default_cache_dir().map_err(|e| RootfsError::Tool(e.to_string()))?,
    };
    if let Some(n) = &opts.name {
        crate::rootfs::check_name(n)?;
    }
    let digest = hash_file(archive)?;
    let mut h = Sha256::new();
    h.update(format!(
        "rootfs-layout {ROOTFS_LAYOUT_VERSION}\noci {digest}\narch {}\n",
        opts.arch
    ));
    let key = format!("oci-{}", &crate::manifest::hex(&h.finalize())[..16]);
    let root = rootfs_root(&cache);
    let final_dir = root.join(&key);
    if !opts.force {
        if let Ok(img) = crate::rootfs::load(&final_dir) {
            if img.disk.is_file() {
                if let Some(n) = &opts.name {
                    crate::rootfs::set_name(&cache, &key, n)?;
                }
                progress(&format!(
                    "{} is already imported as {key}",
                    archive.display()
                ));
                return crate::rootfs::load(&final_dir);
            }
        }
    }
    let archive_name = archive.display().to_string();
    let oci_err = |e| RootfsError::Oci(archive_name.clone(), e);
    let mut oci = OciArchive::open(archive, oci_arch(opts.arch)).map_err(oci_err)?;
    if let Some(a) = &oci.architecture {
        if a != oci_arch(opts.arch) {
            return Err(RootfsError::WrongArch {
                image: a.clone(),
                wanted: oci_arch(opts.arch).to_string(),
            });
        }
    }
    std::fs::create_dir_all(&root).map_err(io_err(format!("create {}", root.display())))?;
    let build = tempfile::Builder::new()
        .prefix(&format!(".build-{key}-"))
        .tempdir_in(&root)
        .map_err(io_err(format!(
            "create a build directory in {}",
            root.display()
        )))?;
    let tree = build.path().join("tree");
    std::fs::create_dir(&tree).map_err(io_err(format!("create {}", tree.display())))?;
    let as_root = std::fs::metadata(&tree)
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let mut applier = Applier::new(&tree, opts.limits);
    applier.set_owners(as_root);
    let n = oci.layer_count();
    progress(&format!("importing {archive_name}: {n} layers"));
    for i in 0..n {
        progress(&format!(
            "layer {}/{n} ({} bytes compressed)",
            i + 1,
            oci.layer_size(i)
        ));
        let layer = oci.layer(i).map_err(oci_err)?;
        applier.apply(layer).map_err(|source| RootfsError::Layer {
            layer: i + 1,
            archive: archive_name.clone(),
            source,
        })?;
    }
    applier.finish().map_err(|source| RootfsError::Layer {
        layer: n,
        archive: archive_name.clone(),
        source,
    })?;
    let mut notes: Vec<String> = applier.notes().to_vec();
    if !as_root {
        notes.push(
            "built without root: every file is owned by the building user (import as root to \
             keep the image's owners)"
                .into(),
        );
    }
    for note in &notes {
        progress(note);
    }
    add_mount_points(&tree)?;
    let defaults = oci.defaults.clone();
    let user = defaults.user.clone().filter(|u| !u.is_empty());
    let uid_gid = match &user {
        None => None,
        Some(u) => {
            let passwd = read_in_tree(&tree, "etc/passwd");
            let group = read_in_tree(&tree, "etc/group");
            Some(resolve_user(u, &passwd, &group)?)
        }
    };
    let disk = build.path().join(DISK_FILE);
    progress("writing the ext4 image");
    let disk_bytes = make_ext4(&tree, &disk)?;
    std::fs::remove_dir_all(&tree).map_err(io_err(format!("remove {}", tree.display())))?;
    let info = RootfsInfo {
        key: key.clone(),
        names: Vec::new(),
        kind: "oci".into(),
        source: archive_name.clone(),
        arch: opts.arch.to_string(),
        env: defaults.env.unwrap_or_default(),
        workdir: defaults.working_dir.filter(|w| !w.is_empty()),
        user,
        uid_gid,
        data_bytes: applier.bytes(),
        disk_bytes,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        notes,
    };
    store_info(build.path(), &info)?;
    install(build, &final_dir)?;
    let name = opts.name.clone().or(oci.name.clone());
    if let Some(n) = name.filter(|n| crate::rootfs::check_name(n).is_ok()) {
        crate::rootfs::set_name(&cache, &key, &n)?;
    }
    let img = crate::rootfs::load(&final_dir)?;
    progress(&format!(
        "rootfs image {key} ready: {} ({} MB)",
        img.disk.display(),
        img.info.disk_bytes / 1_000_000
    ));
    Ok(img)
}

/// Renames a finished build directory into place (replacing an older build of the same key).
pub(crate) fn install(build: tempfile::TempDir, final_dir: &Path) -> Result<(), RootfsError> {
    if final_dir.exists() {
        let old = final_dir.with_extension(format!("old-{}", std::process::id()));
        let parent = final_dir.parent().unwrap_or(Path::new("."));
        let old = parent.join(format!(
            ".{}",
            old.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        std::fs::rename(final_dir, &old)
            .map_err(io_err(format!("replace {}", final_dir.display())))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    let path = build.keep();
    match std::fs::rename(&path, final_dir) {
        Ok(()) => Ok(()),
        // Someone else finished the same image first; theirs is identical.
        Err(_) if final_dir.join(DISK_FILE).is_file() => {
            let _ = std::fs::remove_dir_all(&path);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&path);
            Err(RootfsError::Io(
                format!("move the image to {}", final_dir.display()),
                e,
            ))
        }
    }
}

/// Reads a small text file of the tree without following a symlink out of it (a symlinked
/// or missing file reads as empty).
fn read_in_tree(tree: &Path, rel: &str) -> String {
    let rel = Path::new(rel);
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return String::new();
    };
    let Ok(dir) = crate::layers::resolve_in_root(tree, parent, false) else {
        return String::new();
    };
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() && m.len() < 4 * 1024 * 1024 => {
            std::fs::read_to_string(&path).unwrap_or_default()
        }
        _ => String::new(),
    }
}

/// Finds an e2fsprogs tool in `PATH` or the sbin directories (often not in a user's `PATH`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/local/sbin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Bytes an ext4 file needs for `tree`, and its inode count.
fn ext4_size(tree: &Path) -> Result<(u64, u64), RootfsError> {
    let mut blocks: u64 = 0;
    let mut inodes: u64 = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(io_err(format!("read {}", dir.display())))?;
        inodes += 1;
        blocks += 1;
        for e in rd {
            let e = e.map_err(io_err(format!("read {}", dir.display())))?;
            let m = e
                .path()
                .symlink_metadata()
                .map_err(io_err(format!("stat {}", e.path().display())))?;
            if m.is_dir() {
                stack.push(e.path());
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            // Data blocks plus one extent/indirect block per 4 MiB.
            blocks += m.len().div_ceil(4096) + m.len() / (4 << 20);
        }
    }
    let inodes = inodes + inodes / 10 + 64;
    let bytes = blocks * 4096;
    let size = bytes + bytes / 8 + inodes * 256 + (16 << 20);
    Ok((size.div_ceil(1 << 20) << 20, inodes))
}

/// Writes `tree` into a new ext4 file `disk` with `mkfs.ext4 -d`; returns its size.
pub fn make_ext4(tree: &Path, disk: &Path) -> Result<u64, RootfsError> {
    let Some(mkfs) = find_tool("mkfs.ext4") else {
        return Err(RootfsError::Tool(
            "mkfs.ext4 not found: install e2fsprogs (scripts/install-deps does)".into(),
        ));
    };
    let (size, inodes) = ext4_size(tree)?;
    let mut attempt_size = size;
    for attempt in 0..2 {
        let file =
            std::fs::File::create(disk).map_err(io_err(format!("create {}", disk.display())))?;
        file.set_len(attempt_size)
            .map_err(io_err(format!("size {}", disk.display())))?;
        drop(file);
        let out = Command::new(&mkfs)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .args(["-O", "^has_journal", "-L", "vmcp-rootfs", "-N"])
            .arg(inodes.to_string())
            .arg("-d")
            .arg(tree)
            .arg(disk)
            .output()
            .map_err(io_err(format!("run {}", mkfs.display())))?;
        if out.status.success() {
            return Ok(attempt_size);
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if attempt == 1 || !(err.contains("Could not allocate") || err.contains("No space")) {
            return Err(RootfsError::Tool(format!(
                "mkfs.ext4 -d failed ({}): {err}",
                out.status
            )));
        }
        attempt_size += attempt_size / 2;
    }
    Err(RootfsError::Tool("mkfs.ext4 -d failed".into()))
}

/// Directories the guest mounts over (`/dev`, `/proc`, `/sys`, `/tmp`, `/run`): made in the
/// image when missing, so that a VM does not have to create them in its writable layer
/// (where they would show up as changes).
pub(crate) fn add_mount_points(tree: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("run", 0o755),
    ] {
        let path = tree.join(dir);
        if std::fs::symlink_metadata(&path).is_err() {
            std::fs::create_dir(&path).map_err(io_err(format!("create {}", path.display())))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("chmod {}", path.display())))?;
        }
    }
    Ok(())
}

/// Default size of a VM's writable layer: a sparse file, so only what is written takes space.
pub const SCRATCH_BYTES: u64 = 8 << 30;

/// Creates `path`: an empty, sparse ext4 file of `bytes` for one VM's writable layer (about
/// 20 ms and 2 MB on disk for 8 GiB).
pub fn make_scratch(path: &Path, bytes: u64) -> Result<(), RootfsError> {
    let Some(mkfs) = find_tool("mkfs.ext4") else {
        return Err(RootfsError::Tool(
            "mkfs.ext4 not found: install e2fsprogs (scripts/install-deps does)".into(),
        ));
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(format!("create {}", path.display())))?;
    file.set_len(bytes)
        .map_err(io_err(format!("size {}", path.display())))?;
    drop(file);
    let out = Command::new(&mkfs)
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-O", "^has_journal"])
        .args(["-E", "lazy_itable_init=1,nodiscard", "-L", "vmcp-scratch"])
        .arg(path)
        .output()
        .map_err(io_err(format!("run {}", mkfs.display())))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(path);
        return Err(RootfsError::Tool(format!(
            "mkfs.ext4 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

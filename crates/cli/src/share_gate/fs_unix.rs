//! The file-system side of a gated writable share (Unix hosts): stage the guest's changes,
//! compare them with HOST, apply what was approved.
//!
//! Everything under the staging directory came from the untrusted guest, and so does every
//! path in a change list handed back by an approver: nothing is trusted by name.
//! - **Staging**: the guest's tar (layer form) is extracted into an empty private directory by
//!   the image crate's hostile-archive `Applier` (bounded, `..` refused, symlinks never
//!   followed out of the staging root, setuid/setgid/sticky dropped, device nodes and FIFOs
//!   skipped); whiteouts and opaque markers are recorded, not applied.
//! - **Change list**: a walk of the staging tree (symlinks never followed, anything that is
//!   not a regular file, directory or symlink skipped with a note) compared with HOST.
//!   Unchanged files (copied up by a `chmod` to the same mode, say) are left out.
//! - **Apply**: per change, only a relative path of plain components; every parent below HOST
//!   must be a real directory (a symlink there is refused: it could lead out of HOST);
//!   files and symlinks are written to a temporary name in the same directory and renamed
//!   over the target, so a reader sees the old or the new file, never half of one. Symlinks
//!   whose target is absolute or climbs out of HOST are refused.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::{Change, ChangeKind, EntryKind, Outcome, Staged, StageError};

/// Deepest directory nesting walked in the staging tree or HOST.
const MAX_DEPTH: usize = 128;
/// Longest relative path accepted in a change (Linux `PATH_MAX`).
const MAX_REL_BYTES: usize = 4096;

/// Extracts the guest's change tar `tar` into the empty directory `staging`.
pub fn stage(tar: &Path, staging: &Path) -> Result<Staged, StageError> {
    let file = File::open(tar).map_err(|e| StageError::Io(tar.display().to_string(), e))?;
    let mut a = vmcp_image::layers::Applier::new(staging, vmcp_image::rootfs::Limits::default());
    a.confine_modes(true);
    a.record_whiteouts(true);
    a.apply(io::BufReader::new(file))
        .map_err(|e| StageError::Archive(Box::new(e)))?;
    a.finish().map_err(|e| StageError::Archive(Box::new(e)))?;
    let rec = a.recorded().cloned().unwrap_or_default();
    Ok(Staged {
        root: staging.to_path_buf(),
        whiteouts: rec.whiteouts,
        opaque: rec.opaque,
        notes: a.notes().to_vec(),
    })
}

/// What HOST has at `host.join(rel)`, without following a symlink at the last component.
/// `None` when nothing is there or a parent is not a real directory (the change cannot be
/// compared, and applying it will be refused).
fn host_entry(host: &Path, rel: &Path) -> Option<fs::Metadata> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    real_dirs(host, parent, false).ok()?;
    fs::symlink_metadata(host.join(rel)).ok()
}

fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    let (mut fa, mut fb) = (open_nofollow(a)?, open_nofollow(b)?);
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn open_nofollow(p: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
}

/// The change list between HOST and what the guest left in `staged`.
pub fn compute(host: &Path, staged: &Staged) -> Result<(Vec<Change>, Vec<String>), StageError> {
    let mut changes = Vec::new();
    let mut notes = staged.notes.clone();
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    // Deletions first: the tree walk below may re-create a deleted path as something else
    // (a file replaced by a directory), which then is a modification.
    let mut deleted: BTreeSet<PathBuf> = BTreeSet::new();
    for w in &staged.whiteouts {
        if w.as_os_str().is_empty() || fs::symlink_metadata(staged.root.join(w)).is_ok() {
            continue;
        }
        if let Some(m) = host_entry(host, w) {
            delete_tree(host, w, &m, &mut deleted, 0);
        }
    }
    for dir in &staged.opaque {
        // Everything HOST has in an opaque directory that the staging tree does not.
        let Some(m) = host_entry(host, dir) else {
            continue;
        };
        if !m.is_dir() {
            continue;
        }
        let Ok(rd) = fs::read_dir(host.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let rel = dir.join(e.file_name());
            if fs::symlink_metadata(staged.root.join(&rel)).is_err() {
                if let Ok(m) = e.metadata() {
                    delete_tree(host, &rel, &m, &mut deleted, 0);
                }
            }
        }
    }
    walk_staging(host, staged, Path::new(""), 0, &mut changes, &mut notes, &mut seen)?;
    for rel in deleted {
        if seen.contains(&rel) {
            continue;
        }
        let m = host_entry(host, &rel);
        let (kind, size) = match &m {
            Some(m) if m.is_dir() => (EntryKind::Dir, 0),
            Some(m) if m.file_type().is_symlink() => (EntryKind::Symlink, 0),
            Some(m) => (EntryKind::File, m.len()),
            None => continue,
        };
        changes.push(Change {
            path: rel,
            kind: ChangeKind::Deleted,
            entry: kind,
            old_size: Some(size),
            new_size: None,
            link_target: None,
        });
    }
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((changes, notes))
}

fn delete_tree(host: &Path, rel: &Path, m: &fs::Metadata, out: &mut BTreeSet<PathBuf>, depth: usize) {
    if m.is_dir() && depth < MAX_DEPTH {
        if let Ok(rd) = fs::read_dir(host.join(rel)) {
            for e in rd.flatten() {
                if let Ok(cm) = e.metadata() {
                    delete_tree(host, &rel.join(e.file_name()), &cm, out, depth + 1);
                }
            }
        }
    }
    out.insert(rel.to_path_buf());
}

fn walk_staging(
    host: &Path,
    staged: &Staged,
    rel: &Path,
    depth: usize,
    changes: &mut Vec<Change>,
    notes: &mut Vec<String>,
    seen: &mut BTreeSet<PathBuf>,
) -> Result<(), StageError> {
    if depth > MAX_DEPTH {
        return Err(StageError::Refused(format!(
            "/{}: directories nested deeper than {MAX_DEPTH}",
            rel.display()
        )));
    }
    let dir = staged.root.join(rel);
    let rd = fs::read_dir(&dir).map_err(|e| StageError::Io(dir.display().to_string(), e))?;
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        let r = rel.join(&name);
        let path = staged.root.join(&r);
        let m = fs::symlink_metadata(&path)
            .map_err(|e| StageError::Io(path.display().to_string(), e))?;
        let ft = m.file_type();
        let old = host_entry(host, &r);
        seen.insert(r.clone());
        if ft.is_dir() {
            match &old {
                Some(o) if o.is_dir() => {}
                _ => changes.push(Change {
                    path: r.clone(),
                    kind: if old.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Created
                    },
                    entry: EntryKind::Dir,
                    old_size: old.as_ref().map(|o| o.len()),
                    new_size: Some(0),
                    link_target: None,
                }),
            }
            walk_staging(host, staged, &r, depth + 1, changes, notes, seen)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)
                .map_err(|e| StageError::Io(path.display().to_string(), e))?;
            let unchanged = old.as_ref().is_some_and(|o| o.file_type().is_symlink())
                && fs::read_link(host.join(&r)).ok().as_deref() == Some(target.as_path());
            if !unchanged {
                changes.push(Change {
                    path: r.clone(),
                    kind: if old.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Created
                    },
                    entry: EntryKind::Symlink,
                    old_size: old.as_ref().map(|o| o.len()),
                    new_size: Some(0),
                    link_target: Some(target),
                });
            }
        } else if ft.is_file() {
            let unchanged = match &old {
                Some(o) if o.is_file() => {
                    o.permissions().mode() & 0o777 == m.permissions().mode() & 0o777
                        && o.len() == m.len()
                        && same_file(&host.join(&r), &path).unwrap_or(false)
                }
                _ => false,
            };
            if !unchanged {
                changes.push(Change {
                    path: r.clone(),
                    kind: if old.is_some() {
                        ChangeKind::Modified
                    } else {
                        ChangeKind::Created
                    },
                    entry: EntryKind::File,
                    old_size: old.as_ref().map(|o| o.len()),
                    new_size: Some(m.len()),
                    link_target: None,
                });
            }
        } else {
            notes.push(format!(
                "left out /{}: not a regular file, directory or symlink",
                r.display()
            ));
        }
    }
    Ok(())
}

/// Checks that `rel` is a relative path of plain components (no `..`, no root, no `.`,
/// not empty, not too long).
pub fn check_rel(rel: &Path) -> Result<(), String> {
    if rel.as_os_str().is_empty() {
        return Err("an empty path".into());
    }
    if rel.as_os_str().len() > MAX_REL_BYTES {
        return Err(format!("a path longer than {MAX_REL_BYTES} bytes"));
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return Err("a `..` component".into()),
            Component::RootDir | Component::Prefix(_) => return Err("an absolute path".into()),
            Component::CurDir => return Err("a `.` component".into()),
        }
    }
    Ok(())
}

/// Walks `rel` below `host` requiring every component to be a real directory; missing ones
/// are created (mode 0755) when `create`. Returns the full path.
fn real_dirs(host: &Path, rel: &Path, create: bool) -> Result<PathBuf, String> {
    let mut here = host.to_path_buf();
    for c in rel.components() {
        let Component::Normal(n) = c else {
            return Err(format!("{} is not a plain relative path", rel.display()));
        };
        here.push(n);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symlink in HOST; refusing to write through it",
                    here.display()
                ))
            }
            Ok(_) => return Err(format!("{} is not a directory in HOST", here.display())),
            Err(_) if create => {
                fs::create_dir(&here)
                    .map_err(|e| format!("cannot create {}: {e}", here.display()))?;
            }
            Err(e) => return Err(format!("{}: {e}", here.display())),
        }
    }
    Ok(here)
}

/// Whether symlink `target` placed at `rel` would point out of HOST (absolute, or `..`
/// climbing above HOST's root).
fn link_leaves(rel: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return true;
    }
    let mut depth: i64 = i64::try_from(rel.components().count()).unwrap_or(i64::MAX) - 1;
    for c in target.components() {
        match c {
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return true,
        }
    }
    false
}

fn temp_name(dir: &Path, name: &std::ffi::OsStr) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut t = std::ffi::OsString::from(".vmcp-");
    t.push(name);
    t.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    dir.join(t)
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Applies one change from `staged` to `host`; `Err` says why it was refused or failed
/// (nothing of that change was written then, apart from parent directories).
pub fn apply_one(host: &Path, staged: &Staged, ch: &Change) -> Result<(), String> {
    check_rel(&ch.path)?;
    let parent_rel = ch.path.parent().unwrap_or(Path::new(""));
    let Some(name) = ch.path.file_name() else {
        return Err("no file name".into());
    };
    let source = staged.root.join(&ch.path);
    let src_meta = fs::symlink_metadata(&source).ok();
    // The staging tree must still agree with the change (a change list handed back by an
    // approver is only a selection of what was computed).
    match (ch.kind, ch.entry, &src_meta) {
        (ChangeKind::Deleted, _, _) => {}
        (_, EntryKind::File, Some(m)) if m.file_type().is_file() => {}
        (_, EntryKind::Dir, Some(m)) if m.file_type().is_dir() => {}
        (_, EntryKind::Symlink, Some(m)) if m.file_type().is_symlink() => {}
        _ => return Err("the staged copy does not match the change".into()),
    }
    if ch.kind == ChangeKind::Deleted {
        let parent = real_dirs(host, parent_rel, false)?;
        return remove_any(&parent.join(name)).map_err(|e| format!("cannot delete: {e}"));
    }
    let parent = real_dirs(host, parent_rel, true)?;
    let target = parent.join(name);
    match ch.entry {
        EntryKind::Dir => {
            let existing = fs::symlink_metadata(&target).ok();
            if existing.as_ref().is_some_and(|m| m.is_dir()) {
                return Ok(());
            }
            if existing.is_some() {
                remove_any(&target).map_err(|e| format!("cannot replace: {e}"))?;
            }
            let mode = src_meta.map_or(0o755, |m| m.permissions().mode() & 0o777);
            fs::create_dir(&target).map_err(|e| format!("cannot create: {e}"))?;
            fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700))
                .map_err(|e| format!("cannot set its mode: {e}"))
        }
        EntryKind::Symlink => {
            let link = fs::read_link(&source).map_err(|e| format!("cannot read the link: {e}"))?;
            if link_leaves(&ch.path, &link) {
                return Err(format!(
                    "a symlink to {} would point out of HOST",
                    link.display()
                ));
            }
            let tmp = temp_name(&parent, name);
            std::os::unix::fs::symlink(&link, &tmp)
                .map_err(|e| format!("cannot create the link: {e}"))?;
            replace(&tmp, &target)
        }
        EntryKind::File => {
            let mode = src_meta.map_or(0o644, |m| m.permissions().mode() & 0o777);
            let tmp = temp_name(&parent, name);
            let written = (|| -> io::Result<()> {
                let mut from = open_nofollow(&source)?;
                let mut to = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?;
                io::copy(&mut from, &mut to)?;
                to.set_permissions(fs::Permissions::from_mode(mode))?;
                to.flush()?;
                to.sync_all()
            })();
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(format!("cannot write: {e}"));
            }
            replace(&tmp, &target)
        }
    }
}

/// Renames `tmp` over `target`; a directory at `target` is removed first (rename cannot
/// replace a directory by a file).
fn replace(tmp: &Path, target: &Path) -> Result<(), String> {
    if fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
        if let Err(e) = fs::remove_dir_all(target) {
            let _ = fs::remove_file(tmp);
            return Err(format!("cannot replace the directory: {e}"));
        }
    }
    fs::rename(tmp, target).map_err(|e| {
        let _ = fs::remove_file(tmp);
        format!("cannot rename into place: {e}")
    })
}

/// Applies `approved` (a selection of the computed change list) to `host`: deletions first,
/// then directories (shallow first), then files and symlinks. Each change is applied or
/// refused on its own.
pub fn apply(host: &Path, staged: &Staged, approved: &[Change]) -> Outcome {
    let mut order: Vec<&Change> = approved.iter().collect();
    order.sort_by_key(|c| {
        let rank = match (c.kind, c.entry) {
            (ChangeKind::Deleted, _) => 0,
            (_, EntryKind::Dir) => 1,
            _ => 2,
        };
        // Deletions deepest first, creations shallowest first.
        let depth = c.path.components().count();
        let depth_key = if rank == 0 {
            usize::MAX - depth
        } else {
            depth
        };
        (rank, depth_key)
    });
    let mut out = Outcome::default();
    for ch in order {
        match apply_one(host, staged, ch) {
            Ok(()) => out.applied.push(ch.path.clone()),
            Err(reason) => out.refused.push((ch.path.clone(), reason)),
        }
    }
    out
}

/// Reads up to `max` bytes of the staged file at `rel` (for diffs); `None` when it is not a
/// regular file.
pub fn read_staged(staged: &Staged, rel: &Path, max: u64) -> Option<Vec<u8>> {
    read_small(&staged.root.join(rel), max)
}

/// Reads up to `max` bytes of HOST's file at `rel` (for diffs), never through a symlink.
pub fn read_host(host: &Path, rel: &Path, max: u64) -> Option<Vec<u8>> {
    let m = host_entry(host, rel)?;
    if !m.is_file() {
        return None;
    }
    read_small(&host.join(rel), max)
}

fn read_small(p: &Path, max: u64) -> Option<Vec<u8>> {
    let f = open_nofollow(p).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut v = Vec::new();
    f.take(max).read_to_end(&mut v).ok()?;
    Some(v)
}

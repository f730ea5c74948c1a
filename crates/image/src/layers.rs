//! Applies image layers (tar streams) to a directory tree, treating every byte as hostile.
//!
//! What a layer may do, and what it may not:
//! - Entries land under the root only. A path with a `..` component is refused (the whole
//!   import fails naming the entry); a leading `/` is dropped. Symlinks met *while resolving*
//!   a path are followed inside the root only: an absolute target starts again at the root
//!   and `..` stops at the root, as if the tree were chrooted (at most [`MAX_SYMLINK_HOPS`]).
//!   The last component of an entry is never followed: an existing file, link or directory
//!   there is replaced, so a symlink planted by an earlier entry cannot redirect a write.
//! - Whiteouts: `.wh.NAME` deletes `NAME` from lower layers, `.wh..wh..opq` empties its
//!   directory of everything lower layers put there (entries of the same layer stay).
//! - Regular files, directories, symlinks and hard links (to a non-directory inside the root)
//!   are kept with their mode (including setuid/setgid/sticky) and modification time; owners
//!   are kept when the builder runs as root ([`Applier::set_owners`]).
//! - Character and block devices and FIFOs are skipped with a note (`mkfs.ext4 -d` would copy
//!   them; a guest has devtmpfs). GNU sparse entries are refused.
//! - Bounds, never trusting header sizes: total bytes written ([`Limits::max_bytes`], checked
//!   against the claimed size before writing and against the bytes actually copied), number
//!   of entries ([`Limits::max_entries`]), long-name and PAX records ([`MAX_META_BYTES`]
//!   each; the tar crate runs in raw mode so that we read them ourselves, bounded).
//!
//! Extended attributes (file capabilities) are not kept.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Symlinks followed while resolving one path, as Linux allows.
pub const MAX_SYMLINK_HOPS: u32 = 40;
/// Largest GNU long-name, long-link or PAX record accepted.
pub const MAX_META_BYTES: u64 = 1024 * 1024;
/// Longest path accepted (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

pub use crate::rootfs::Limits;

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The tar stream is malformed.
    #[error("malformed layer")]
    Tar(#[source] io::Error),
    /// An entry is refused (escaping path, bad link, over a limit, ...).
    #[error("entry {path:?} refused: {reason}")]
    Refused {
        /// Entry path as the archive gives it.
        path: String,
        /// Why.
        reason: String,
    },
    /// A limit of [`Limits`] was reached.
    #[error("{0}")]
    Limit(String),
    /// Writing the tree failed.
    #[error("cannot write {0}")]
    Io(String, #[source] io::Error),
}

fn refused(path: &str, reason: impl Into<String>) -> LayerError {
    LayerError::Refused {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Applies layers one after the other to one tree.
#[derive(Debug)]
pub struct Applier {
    root: PathBuf,
    limits: Limits,
    bytes: u64,
    entries: u64,
    set_owners: bool,
    confine_modes: bool,
    /// Directories whose mode and mtime are set at the end (a read-only directory would
    /// block later writes into it for a non-root builder).
    dirs: Vec<(PathBuf, u32, Option<SystemTime>)>,
    notes: Vec<String>,
}

/// A tar entry after long names and PAX records are folded in.
struct Meta {
    path: String,
    link: Option<String>,
    uid: u64,
    gid: u64,
    mode: u32,
    mtime: Option<SystemTime>,
}

impl Applier {
    /// An applier writing into `root` (an existing empty directory).
    pub fn new(root: &Path, limits: Limits) -> Applier {
        Applier {
            root: root.to_path_buf(),
            limits,
            bytes: 0,
            entries: 0,
            set_owners: false,
            confine_modes: false,
            dirs: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Whether file owners from the layers are applied (needs root).
    pub fn set_owners(&mut self, on: bool) {
        self.set_owners = on;
    }

    /// Whether setuid, setgid and sticky bits are dropped (for trees written into a user's
    /// directory, e.g. a share's changes copied back from an untrusted guest).
    pub fn confine_modes(&mut self, on: bool) {
        self.confine_modes = on;
    }

    fn mode(&self, mode: u32) -> u32 {
        if self.confine_modes {
            mode & 0o777
        } else {
            mode & 0o7777
        }
    }

    /// Bytes of file data written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Things skipped, one line each (device nodes, ...).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Applies one uncompressed layer tar stream.
    pub fn apply<R: Read>(&mut self, layer: R) -> Result<(), LayerError> {
        let mut archive = tar::Archive::new(layer);
        let entries = archive.entries().map_err(LayerError::Tar)?.raw(true);
        let mut created: HashSet<PathBuf> = HashSet::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Option<Vec<u8>> = None;
        for entry in entries {
            let mut entry = entry.map_err(LayerError::Tar)?;
            self.entries += 1;
            if self.entries > self.limits.max_entries {
                return Err(LayerError::Limit(format!(
                    "more than {} entries in the layers",
                    self.limits.max_entries
                )));
            }
            let header = entry.header().clone();
            let kind = header.entry_type();
            let claimed = header.entry_size().map_err(LayerError::Tar)?;
            let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let read_meta = |entry: &mut tar::Entry<'_, R>| -> Result<Vec<u8>, LayerError> {
                if claimed > MAX_META_BYTES {
                    return Err(refused(
                        &raw_path,
                        format!("a {claimed}-byte name or PAX record (limit {MAX_META_BYTES})"),
                    ));
                }
                let mut v = Vec::new();
                entry
                    .take(MAX_META_BYTES)
                    .read_to_end(&mut v)
                    .map_err(LayerError::Tar)?;
                Ok(v)
            };
            if kind.is_gnu_longname() {
                long_name = Some(trim_nul(read_meta(&mut entry)?));
                continue;
            }
            if kind.is_gnu_longlink() {
                long_link = Some(trim_nul(read_meta(&mut entry)?));
                continue;
            }
            if kind.is_pax_local_extensions() {
                pax = Some(read_meta(&mut entry)?);
                continue;
            }
            if kind.is_pax_global_extensions() {
                read_meta(&mut entry)?;
                continue;
            }
            let mut meta = Meta {
                path: match long_name.take() {
                    Some(n) => String::from_utf8_lossy(&n).into_owned(),
                    None => raw_path.clone(),
                },
                link: match long_link.take() {
                    Some(l) => Some(String::from_utf8_lossy(&l).into_owned()),
                    None => header
                        .link_name_bytes()
                        .map(|l| String::from_utf8_lossy(&l).into_owned()),
                },
                uid: header.uid().unwrap_or(0),
                gid: header.gid().unwrap_or(0),
                mode: header.mode().unwrap_or(0o644),
                mtime: header
                    .mtime()
                    .ok()
                    .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            };
            if let Some(records) = pax.take() {
                for rec in tar::PaxExtensions::new(&records) {
                    let rec = rec.map_err(LayerError::Tar)?;
                    let value = String::from_utf8_lossy(rec.value_bytes()).into_owned();
                    match rec.key_bytes() {
                        b"path" => meta.path = value,
                        b"linkpath" => meta.link = Some(value),
                        b"uid" => meta.uid = value.parse().unwrap_or(meta.uid),
                        b"gid" => meta.gid = value.parse().unwrap_or(meta.gid),
                        b"size" if value.parse::<u64>().ok() != Some(claimed) => {
                            return Err(refused(
                                &meta.path,
                                "a PAX size that differs from the header's (files this \
                                 large are over the size limit anyway)",
                            ));
                        }
                        _ => {}
                    }
                }
            }
            if meta.path.len() > MAX_PATH_BYTES {
                return Err(refused(
                    &meta.path[..64],
                    format!("path longer than {MAX_PATH_BYTES} bytes"),
                ));
            }
            self.apply_entry(&mut entry, kind, claimed, &meta, &mut created)?;
        }
        if long_name.is_some() || long_link.is_some() || pax.is_some() {
            return Err(LayerError::Tar(io::Error::other(
                "a long-name or PAX record without the entry it describes",
            )));
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut R,
        kind: tar::EntryType,
        claimed: u64,
        meta: &Meta,
        created: &mut HashSet<PathBuf>,
    ) -> Result<(), LayerError> {
        let rel = clean_path(&meta.path)?;
        let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            // The root itself ("./"): keep its mode for the end.
            if kind.is_dir() {
                let mode = self.mode(meta.mode);
                self.dirs.push((self.root.clone(), mode, meta.mtime));
            }
            return Ok(());
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == ".wh..wh..opq" {
            let dir = self.resolve(&parent_rel, &meta.path, true)?;
            self.clear_opaque(&dir, created)?;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(".wh.") {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(refused(&meta.path, "a whiteout of nothing"));
            }
            let parent = self.resolve(&parent_rel, &meta.path, true)?;
            remove_any(&parent.join(hidden))?;
            return Ok(());
        }
        if kind.is_gnu_sparse() {
            return Err(refused(&meta.path, "GNU sparse files are not supported"));
        }
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            self.notes.push(format!(
                "skipped {} /{} (device nodes and FIFOs are not copied; the guest has devtmpfs)",
                if kind.is_fifo() {
                    "FIFO"
                } else {
                    "device node"
                },
                rel.display()
            ));
            return Ok(());
        }
        let supported = kind.is_file()
            || kind.is_contiguous()
            || kind.is_dir()
            || kind.is_symlink()
            || kind.is_hard_link();
        if !supported {
            self.notes.push(format!(
                "skipped /{} (tar entry type {:?} is not supported)",
                rel.display(),
                kind.as_byte() as char
            ));
            return Ok(());
        }
        let parent = self.resolve(&parent_rel, &meta.path, true)?;
        let target = parent.join(&name);
        created.insert(rel.clone());
        let io = |e: io::Error| LayerError::Io(target.display().to_string(), e);
        let existing = fs::symlink_metadata(&target).ok();
        if kind.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    remove_any(&target)?;
                    fs::create_dir(&target).map_err(io)?;
                }
                None => fs::create_dir(&target).map_err(io)?,
            }
            // Writable for the builder until the end.
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).map_err(io)?;
            self.chown(&target, meta)?;
            let mode = self.mode(meta.mode);
            self.dirs.push((target, mode, meta.mtime));
            return Ok(());
        }
        if existing.is_some() {
            remove_any(&target)?;
        }
        if kind.is_symlink() {
            let Some(link) = meta.link.as_deref().filter(|l| !l.is_empty()) else {
                return Err(refused(&meta.path, "a symlink without a target"));
            };
            std::os::unix::fs::symlink(link, &target).map_err(io)?;
            self.chown(&target, meta)?;
            return Ok(());
        }
        if kind.is_hard_link() {
            let Some(link) = meta.link.as_deref().filter(|l| !l.is_empty()) else {
                return Err(refused(&meta.path, "a hard link without a target"));
            };
            let link_rel = clean_path(link)?;
            let link_parent = link_rel.parent().unwrap_or(Path::new("")).to_path_buf();
            let Some(link_name) = link_rel.file_name() else {
                return Err(refused(&meta.path, "a hard link to the root"));
            };
            let source = self
                .resolve(&link_parent, &meta.path, false)?
                .join(link_name);
            match fs::symlink_metadata(&source) {
                Ok(m) if !m.is_dir() => {}
                Ok(_) => return Err(refused(&meta.path, "a hard link to a directory")),
                Err(_) => {
                    return Err(refused(
                        &meta.path,
                        format!("a hard link to {link:?}, which is not in the image"),
                    ))
                }
            }
            fs::hard_link(&source, &target).map_err(io)?;
            return Ok(());
        }
        // A regular file: check the claim first, then count what is really copied.
        let left = self.limits.max_bytes - self.bytes;
        if claimed > left {
            return Err(LayerError::Limit(format!(
                "/{} claims {claimed} bytes, over the {}-byte import limit ({} already written)",
                rel.display(),
                self.limits.max_bytes,
                self.bytes
            )));
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target)
            .map_err(io)?;
        let copied = io::copy(&mut entry.take(claimed), &mut file).map_err(io)?;
        if copied != claimed {
            return Err(LayerError::Tar(io::Error::other(format!(
                "/{} ends after {copied} of {claimed} bytes",
                rel.display()
            ))));
        }
        self.bytes += copied;
        self.chown(&target, meta)?;
        // After chown, which clears setuid bits.
        file.set_permissions(fs::Permissions::from_mode(self.mode(meta.mode)))
            .map_err(io)?;
        if let Some(t) = meta.mtime {
            let _ = file.set_modified(t);
        }
        Ok(())
    }

    fn chown(&self, path: &Path, meta: &Meta) -> Result<(), LayerError> {
        if !self.set_owners {
            return Ok(());
        }
        let (Ok(uid), Ok(gid)) = (u32::try_from(meta.uid), u32::try_from(meta.gid)) else {
            return Err(refused(&meta.path, "a uid or gid over 2^32"));
        };
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .map_err(|e| LayerError::Io(path.display().to_string(), e))
    }

    /// Resolves `rel` (already cleaned) to a directory inside the root, following symlinks
    /// inside the root and creating missing directories when `create`.
    fn resolve(&self, rel: &Path, entry: &str, create: bool) -> Result<PathBuf, LayerError> {
        resolve_in_root(&self.root, rel, create).map_err(|reason| refused(entry, reason))
    }

    /// Removes from `dir` everything this layer did not create.
    fn clear_opaque(&self, dir: &Path, created: &HashSet<PathBuf>) -> Result<(), LayerError> {
        let Ok(rd) = fs::read_dir(dir) else {
            return Ok(());
        };
        for e in rd {
            let e = e.map_err(|e| LayerError::Io(dir.display().to_string(), e))?;
            let path = e.path();
            let rel = path.strip_prefix(&self.root).unwrap_or(&path).to_path_buf();
            if created.contains(&rel) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    self.clear_opaque(&path, created)?;
                }
            } else {
                remove_any(&path)?;
            }
        }
        Ok(())
    }

    /// Sets the directory modes and times recorded while applying (deepest first). Call once
    /// after the last layer.
    pub fn finish(&mut self) -> Result<(), LayerError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(p, _, _)| std::cmp::Reverse(p.components().count()));
        for (path, mode, mtime) in dirs {
            // A later layer may have replaced the directory by something else.
            if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let io = |e: io::Error| LayerError::Io(path.display().to_string(), e);
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io)?;
            if let Some(t) = mtime {
                if let Ok(f) = File::open(&path) {
                    let _ = f.set_modified(t);
                }
            }
        }
        Ok(())
    }
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// An archive path as a relative path without `.`; `..` anywhere is refused.
fn clean_path(raw: &str) -> Result<PathBuf, LayerError> {
    if raw.contains('\0') {
        return Err(refused(raw, "a NUL byte in the path"));
    }
    let mut out = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(refused(
                    raw,
                    "a `..` path component (it could leave the root)",
                ))
            }
            Component::Prefix(_) => return Err(refused(raw, "a path prefix")),
        }
    }
    Ok(out)
}

/// Resolves `rel` under `root` the way a chrooted process would: symlinks are followed but
/// never out of `root` (absolute targets restart at `root`, `..` stops there). Every
/// component must be a directory; missing ones are created when `create`. Returns a path
/// whose components below `root` are all real directories.
pub fn resolve_in_root(root: &Path, rel: &Path, create: bool) -> Result<PathBuf, String> {
    let mut done: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: std::collections::VecDeque<std::ffi::OsString> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            done.pop();
            continue;
        }
        if name == "." {
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&done);
        here.push(&name);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINK_HOPS {
                    return Err(format!(
                        "more than {MAX_SYMLINK_HOPS} symlinks while resolving its parent"
                    ));
                }
                let target = fs::read_link(&here).map_err(|e| e.to_string())?;
                if target.is_absolute() {
                    done.clear();
                }
                let mut parts: Vec<std::ffi::OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                parts.extend(pending.drain(..));
                pending = parts.into();
            }
            Ok(m) if m.is_dir() => done.push(name),
            Ok(_) => {
                return Err(format!(
                    "/{} is not a directory",
                    here.strip_prefix(root).unwrap_or(&here).display()
                ))
            }
            Err(_) if create => {
                fs::create_dir(&here).map_err(|e| format!("cannot create a directory: {e}"))?;
                done.push(name);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&done);
    Ok(out)
}

fn remove_any(path: &Path) -> Result<(), LayerError> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    res.map_err(|e| LayerError::Io(path.display().to_string(), e))
}

#[cfg(test)]
mod tests;

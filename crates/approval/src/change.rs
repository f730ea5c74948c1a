//! Change lists: what a sandbox did to its copy of a shared host directory, and applying an
//! approved part of it back.
//!
//! [`ChangeSet::between`] compares the host directory (`host_root`) with the sandbox's copy of
//! it (`staged_root`, already on the host: the copy the guest worked on) and lists regular files
//! created, modified and deleted, with sizes, the new content's SHA-256 and a unified diff for
//! small text files. Nothing is followed: symbolic links, devices, FIFOs and sockets in the copy,
//! and names that are not UTF-8, are listed as [`Refused`] and never copied back.
//!
//! Bounds ([`ChangeLimits`]): at most `max_walk` entries are read per tree (more is an error, so
//! the caller denies); at most `max_entries` changes are listed (the rest are counted in
//! [`ChangeSet::omitted`] and are never applied); diffs are made only for files up to
//! `max_diff_file_bytes`, each cut at `max_diff_bytes_per_file` and all together at
//! `max_diff_bytes_total`, with visible truncation markers.
//!
//! [`ChangeSet::apply`] copies approved files back one at a time: each is written to a temporary
//! file in its destination directory, synced and renamed over the target, so a reader of the
//! host directory sees the old or the new file, never half of one. A path that is not a plain
//! relative path, whose parent inside the host directory is a symbolic link or not a directory,
//! or whose staged content no longer has the hash that was approved, is refused and reported.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Limits on building a change list; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChangeLimits {
    /// Most directory entries read per tree before giving up with an error.
    pub max_walk: usize,
    /// Deepest directory nesting read.
    pub max_depth: usize,
    /// Most changes listed; more are counted in `omitted` and never applied.
    pub max_entries: usize,
    /// Largest file (old or new side) for which a text diff is made.
    pub max_diff_file_bytes: u64,
    /// Longest diff kept per file.
    pub max_diff_bytes_per_file: usize,
    /// Longest all diffs together.
    pub max_diff_bytes_total: usize,
}

impl Default for ChangeLimits {
    fn default() -> Self {
        ChangeLimits {
            max_walk: 100_000,
            max_depth: 128,
            max_entries: 1_000,
            max_diff_file_bytes: 256 * 1024,
            max_diff_bytes_per_file: 32 * 1024,
            max_diff_bytes_total: 512 * 1024,
        }
    }
}

/// What happened to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// New in the copy.
    Created,
    /// Different content in the copy.
    Modified,
    /// Gone from the copy.
    Deleted,
}

impl ChangeKind {
    /// `created`, `modified` or `deleted`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Modified => "modified",
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// The readable difference of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Diff {
    /// A unified diff (hunks only); `truncated` when it was cut (a marker line ends it).
    Text {
        /// The hunks.
        unified: String,
        /// Whether the diff was cut.
        truncated: bool,
    },
    /// One side is not UTF-8 text (or contains NUL bytes).
    Binary,
    /// One side is larger than `max_diff_file_bytes`.
    TooLarge,
    /// The total diff budget was spent on earlier files.
    Omitted,
}

/// One changed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FileChange {
    /// Relative to the host directory, `/`-separated, no `.`/`..`.
    pub path: String,
    /// What happened.
    pub kind: ChangeKind,
    /// Size in the host directory (None when created).
    pub old_size: Option<u64>,
    /// Size in the copy (None when deleted).
    pub new_size: Option<u64>,
    /// Hex SHA-256 of the new content (None when deleted); [`ChangeSet::apply`] copies only
    /// content that still has this hash.
    pub new_sha256: Option<String>,
    /// The readable difference.
    pub diff: Diff,
}

/// An entry of the copy that is never copied back, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Relative path (lossy when the name is not UTF-8).
    pub path: String,
    /// Why it is refused.
    pub reason: String,
}

/// The files a sandbox changed in its copy of a host directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChangeSet {
    /// The changes, sorted by path, at most `max_entries`.
    pub entries: Vec<FileChange>,
    /// Changes beyond `max_entries`: not listed, never applied.
    pub omitted: usize,
    /// Entries of the copy that are never copied back.
    pub refused: Vec<Refused>,
}

/// Building a change list failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// A directory or file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// What.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A tree has more entries than `max_walk`.
    #[error("{root} has more than {limit} entries; refusing to list its changes")]
    TooManyEntries {
        /// The tree.
        root: PathBuf,
        /// The limit.
        limit: usize,
    },
}

/// Applying failed as a whole (single files that fail are in [`ApplyReport::refused`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The host directory is not a directory (or cannot be inspected).
    #[error("the host directory {path} is not usable")]
    HostRoot {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What [`ChangeSet::apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ApplyReport {
    /// Paths written or deleted in the host directory.
    pub applied: Vec<String>,
    /// Paths not applied, and why.
    pub refused: Vec<Refused>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File(u64),
    Dir,
    Other(&'static str),
}

struct Walk {
    entries: BTreeMap<String, Kind>,
    non_utf8: Vec<String>,
}

fn walk(root: &Path, limits: &ChangeLimits) -> Result<Walk, ChangeError> {
    let mut w = Walk {
        entries: BTreeMap::new(),
        non_utf8: Vec::new(),
    };
    let mut count = 0usize;
    // (directory on disk, relative prefix, depth)
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        let rd = fs::read_dir(&dir).map_err(|source| ChangeError::Read {
            path: dir.clone(),
            source,
        })?;
        for ent in rd {
            let ent = ent.map_err(|source| ChangeError::Read {
                path: dir.clone(),
                source,
            })?;
            count += 1;
            if count > limits.max_walk {
                return Err(ChangeError::TooManyEntries {
                    root: root.to_owned(),
                    limit: limits.max_walk,
                });
            }
            let name = ent.file_name();
            let Some(name) = name.to_str() else {
                w.non_utf8
                    .push(format!("{prefix}{}", name.to_string_lossy()));
                continue;
            };
            let rel = format!("{prefix}{name}");
            // file_type() does not follow symbolic links.
            let ft = ent.file_type().map_err(|source| ChangeError::Read {
                path: ent.path(),
                source,
            })?;
            let kind = if ft.is_symlink() {
                Kind::Other("symbolic links are not copied back")
            } else if ft.is_dir() {
                if depth + 1 > limits.max_depth {
                    Kind::Other("nested deeper than the change-list limit")
                } else {
                    stack.push((ent.path(), format!("{rel}/"), depth + 1));
                    Kind::Dir
                }
            } else if ft.is_file() {
                let md = ent.metadata().map_err(|source| ChangeError::Read {
                    path: ent.path(),
                    source,
                })?;
                Kind::File(md.len())
            } else {
                Kind::Other("special files (devices, FIFOs, sockets) are not copied back")
            };
            w.entries.insert(rel, kind);
        }
    }
    Ok(w)
}

/// Reads a file, at most `cap` bytes; `None` when it is larger.
fn read_capped(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, std::io::Error> {
    let f = fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(cap + 1).read_to_end(&mut buf)?;
    Ok(if buf.len() as u64 > cap {
        None
    } else {
        Some(buf)
    })
}

fn sha256_file(path: &Path) -> Result<String, std::io::Error> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn as_text(bytes: &[u8]) -> Option<&str> {
    if bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

fn join_rel(root: &Path, rel: &str) -> PathBuf {
    let mut p = root.to_path_buf();
    for part in rel.split('/') {
        p.push(part);
    }
    p
}

impl ChangeSet {
    /// Lists what differs between `host_root` (the host directory) and `staged_root` (the
    /// sandbox's copy of it). See the module docs for what is listed, refused and bounded.
    pub fn between(
        host_root: &Path,
        staged_root: &Path,
        limits: &ChangeLimits,
    ) -> Result<ChangeSet, ChangeError> {
        let host = walk(host_root, limits)?;
        let staged = walk(staged_root, limits)?;
        let read_err = |path: PathBuf| move |source| ChangeError::Read { path, source };

        let mut set = ChangeSet::default();
        for name in staged.non_utf8 {
            set.refused.push(Refused {
                path: name,
                reason: "the name is not UTF-8".into(),
            });
        }
        let mut changes: Vec<(String, ChangeKind, Option<u64>, Option<u64>)> = Vec::new();
        for (rel, kind) in &staged.entries {
            match kind {
                Kind::Other(reason) => set.refused.push(Refused {
                    path: rel.clone(),
                    reason: (*reason).to_owned(),
                }),
                Kind::Dir => {}
                Kind::File(new_size) => match host.entries.get(rel) {
                    Some(Kind::File(old_size)) => {
                        let differs = old_size != new_size || {
                            let hp = join_rel(host_root, rel);
                            let sp = join_rel(staged_root, rel);
                            sha256_file(&hp).map_err(read_err(hp))?
                                != sha256_file(&sp).map_err(read_err(sp))?
                        };
                        if differs {
                            changes.push((
                                rel.clone(),
                                ChangeKind::Modified,
                                Some(*old_size),
                                Some(*new_size),
                            ));
                        }
                    }
                    _ => changes.push((rel.clone(), ChangeKind::Created, None, Some(*new_size))),
                },
            }
        }
        for (rel, kind) in &host.entries {
            if let Kind::File(old_size) = kind {
                if !matches!(staged.entries.get(rel), Some(Kind::File(_))) {
                    // A file replaced by a directory in the copy is deleted here; its contents
                    // are listed as created.
                    changes.push((rel.clone(), ChangeKind::Deleted, Some(*old_size), None));
                }
            }
        }
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        if changes.len() > limits.max_entries {
            set.omitted = changes.len() - limits.max_entries;
            changes.truncate(limits.max_entries);
        }
        let mut budget = limits.max_diff_bytes_total;
        for (rel, kind, old_size, new_size) in changes {
            let hp = join_rel(host_root, &rel);
            let sp = join_rel(staged_root, &rel);
            let new_sha256 = match kind {
                ChangeKind::Deleted => None,
                _ => Some(sha256_file(&sp).map_err(read_err(sp.clone()))?),
            };
            let too_large = old_size.unwrap_or(0) > limits.max_diff_file_bytes
                || new_size.unwrap_or(0) > limits.max_diff_file_bytes;
            let diff = if too_large {
                Diff::TooLarge
            } else if budget == 0 {
                Diff::Omitted
            } else {
                let cap = limits.max_diff_file_bytes;
                let old = match kind {
                    ChangeKind::Created => Some(Vec::new()),
                    _ => read_capped(&hp, cap).map_err(read_err(hp.clone()))?,
                };
                let new = match kind {
                    ChangeKind::Deleted => Some(Vec::new()),
                    _ => read_capped(&sp, cap).map_err(read_err(sp.clone()))?,
                };
                match (old, new) {
                    (Some(o), Some(n)) => match (as_text(&o), as_text(&n)) {
                        (Some(o), Some(n)) => {
                            let max = limits.max_diff_bytes_per_file.min(budget);
                            let (unified, truncated) = crate::diff::unified(o, n, max);
                            budget = budget.saturating_sub(unified.len());
                            Diff::Text { unified, truncated }
                        }
                        _ => Diff::Binary,
                    },
                    // Grew past the cap between the walk and now.
                    _ => Diff::TooLarge,
                }
            };
            set.entries.push(FileChange {
                path: rel,
                kind,
                old_size,
                new_size,
                new_sha256,
                diff,
            });
        }
        set.refused.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(set)
    }

    /// Whether nothing would cross (no listed, omitted or refused entries).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.omitted == 0 && self.refused.is_empty()
    }

    /// The listed paths.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.path.as_str())
    }

    /// A stable hex SHA-256 of the change list (paths, kinds, sizes, new content hashes, the
    /// omitted count and the refused paths), independent of the diffs' rendering; written to the
    /// audit log so a decision names exactly what was decided.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"vmcp-changeset-v1\n");
        let mut entries: Vec<&FileChange> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        for e in entries {
            // Length-prefixed fields: no separator ambiguity whatever the names contain.
            for field in [
                e.kind.as_str(),
                e.path.as_str(),
                &e.old_size.map(|s| s.to_string()).unwrap_or_default(),
                &e.new_size.map(|s| s.to_string()).unwrap_or_default(),
                e.new_sha256.as_deref().unwrap_or(""),
            ] {
                h.update((field.len() as u64).to_le_bytes());
                h.update(field.as_bytes());
            }
        }
        h.update(b"omitted");
        h.update((self.omitted as u64).to_le_bytes());
        let mut refused: Vec<&str> = self.refused.iter().map(|r| r.path.as_str()).collect();
        refused.sort_unstable();
        for r in refused {
            h.update(b"refused");
            h.update((r.len() as u64).to_le_bytes());
            h.update(r.as_bytes());
        }
        hex(&h.finalize())
    }

    /// A readable multi-line list for a terminal or a dialog: one line per file
    /// (`created  src/new.rs (120 B)`), then the diffs when `with_diffs`. File names are passed
    /// through [`crate::terminal::printable`], so control characters cannot reach a terminal.
    pub fn summary(&self, with_diffs: bool) -> String {
        use crate::terminal::printable;
        let mut s = String::new();
        for e in &self.entries {
            let size = match (e.old_size, e.new_size) {
                (Some(o), Some(n)) => format!("{o} B -> {n} B"),
                (None, Some(n)) => format!("{n} B"),
                (Some(o), None) => format!("was {o} B"),
                (None, None) => String::new(),
            };
            s.push_str(&format!(
                "  {:<8} {} ({size})\n",
                e.kind.as_str(),
                printable(&e.path)
            ));
        }
        if self.omitted > 0 {
            s.push_str(&format!(
                "  ... and {} more changes not listed (never applied)\n",
                self.omitted
            ));
        }
        for r in &self.refused {
            s.push_str(&format!(
                "  refused  {} ({})\n",
                printable(&r.path),
                r.reason
            ));
        }
        if with_diffs {
            for e in &self.entries {
                match &e.diff {
                    Diff::Text { unified, .. } if !unified.is_empty() => {
                        s.push_str(&format!("--- {}\n", printable(&e.path)));
                        for line in unified.lines() {
                            s.push_str(&printable(line));
                            s.push('\n');
                        }
                    }
                    _ => {}
                }
            }
        }
        s
    }

    /// Copies the approved changes from `staged_root` into `host_root`: all listed entries when
    /// `only` is `None`, else those whose path is in `only`. Per file and atomic (see the module
    /// docs); files that cannot be applied safely are reported in [`ApplyReport::refused`] and
    /// the others still applied.
    pub fn apply(
        &self,
        host_root: &Path,
        staged_root: &Path,
        only: Option<&BTreeSet<String>>,
    ) -> Result<ApplyReport, ApplyError> {
        let md = fs::symlink_metadata(host_root).map_err(|source| ApplyError::HostRoot {
            path: host_root.to_owned(),
            source,
        })?;
        if !md.is_dir() {
            return Err(ApplyError::HostRoot {
                path: host_root.to_owned(),
                source: std::io::Error::other("not a directory"),
            });
        }
        let mut report = ApplyReport::default();
        if let Some(only) = only {
            for p in only {
                if !self.entries.iter().any(|e| &e.path == p) {
                    report.refused.push(Refused {
                        path: p.clone(),
                        reason: "not in the change list".into(),
                    });
                }
            }
        }
        for e in &self.entries {
            if only.is_some_and(|o| !o.contains(&e.path)) {
                continue;
            }
            match apply_one(e, host_root, staged_root) {
                Ok(()) => report.applied.push(e.path.clone()),
                Err(reason) => report.refused.push(Refused {
                    path: e.path.clone(),
                    reason,
                }),
            }
        }
        Ok(report)
    }
}

/// Splits a change-list path into plain components, refusing anything that could leave the root.
fn safe_components(rel: &str) -> Result<Vec<&str>, String> {
    if rel.is_empty() {
        return Err("empty path".into());
    }
    let mut out = Vec::new();
    for part in rel.split('/') {
        let ok = !part.is_empty()
            && part != "."
            && part != ".."
            && !part.contains('\\')
            && !part.contains('\0')
            && !part.contains(':')
            && matches!(
                Path::new(part).components().next(),
                Some(Component::Normal(_))
            )
            && Path::new(part).components().count() == 1;
        if !ok {
            return Err(format!(
                "the path leaves the host directory or is not a plain relative path (component {part:?})"
            ));
        }
        out.push(part);
    }
    Ok(out)
}

/// Walks (creating when `create`) the parent directories of `parts` under `root`, refusing
/// symbolic links and non-directories on the way. Returns the parent directory.
fn parent_dir(root: &Path, parts: &[&str], create: bool) -> Result<PathBuf, String> {
    let mut dir = root.to_path_buf();
    let dirs = parts.len().saturating_sub(1);
    for part in parts.iter().take(dirs) {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => {}
            Ok(md) if md.file_type().is_symlink() => {
                return Err(format!(
                    "{part:?} in the host directory is a symbolic link; not writing through it"
                ))
            }
            Ok(_) => return Err(format!("{part:?} in the host directory is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                fs::create_dir(&dir)
                    .map_err(|e| format!("cannot create directory {part:?}: {e}"))?;
            }
            Err(e) => return Err(format!("cannot inspect {part:?}: {e}")),
        }
    }
    Ok(dir)
}

fn apply_one(e: &FileChange, host_root: &Path, staged_root: &Path) -> Result<(), String> {
    let parts = safe_components(&e.path)?;
    let name = parts.last().copied().unwrap_or_default();
    match e.kind {
        ChangeKind::Deleted => {
            let dir = parent_dir(host_root, &parts, false)?;
            let target = dir.join(name);
            match fs::symlink_metadata(&target) {
                Ok(md) if md.is_file() => {
                    fs::remove_file(&target).map_err(|e| format!("cannot delete: {e}"))
                }
                Ok(_) => Err("the host entry is no longer a regular file; not deleting".into()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(format!("cannot inspect: {err}")),
            }
        }
        ChangeKind::Created | ChangeKind::Modified => {
            let Some(want) = e.new_sha256.as_deref() else {
                return Err("the change has no content hash".into());
            };
            // The staged side is walked the same way: no symbolic links on its path either.
            let sdir = parent_dir(staged_root, &parts, false)?;
            let src_path = sdir.join(name);
            match fs::symlink_metadata(&src_path) {
                Ok(md) if md.is_file() => {}
                Ok(_) => return Err("the staged entry is no longer a regular file".into()),
                Err(err) => return Err(format!("cannot read the staged file: {err}")),
            }
            let dir = parent_dir(host_root, &parts, true)?;
            let target = dir.join(name);
            if let Ok(md) = fs::symlink_metadata(&target) {
                if md.is_dir() {
                    return Err("a directory is in the way in the host directory".into());
                }
            }
            let tmp = dir.join(format!(".vmcp-approval-{:016x}.tmp", rand::random::<u64>()));
            let result = copy_checked(&src_path, &tmp, want).and_then(|()| {
                fs::rename(&tmp, &target).map_err(|e| format!("cannot move into place: {e}"))
            });
            if result.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            result
        }
    }
}

/// Copies `src` to a new file `dst`, hashing on the way; fails (leaving `dst` to the caller to
/// remove) when the content's hash is not `want`.
fn copy_checked(src: &Path, dst: &Path, want: &str) -> Result<(), String> {
    let mut input = fs::File::open(src).map_err(|e| format!("cannot read the staged file: {e}"))?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| format!("cannot create a temporary file: {e}"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| format!("cannot read the staged file: {e}"))?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        h.update(chunk);
        out.write_all(chunk)
            .map_err(|e| format!("cannot write: {e}"))?;
    }
    if hex(&h.finalize()) != want {
        return Err(
            "the staged content changed after the change list was made; not applying".into(),
        );
    }
    out.sync_all().map_err(|e| format!("cannot sync: {e}"))?;
    // Keep the permission bits of the staged file (never set-id bits).
    if let Ok(md) = fs::metadata(src) {
        let mut perm = md.permissions();
        mode::plain(&mut perm);
        let _ = fs::set_permissions(dst, perm);
    }
    Ok(())
}

#[cfg(unix)]
mod mode {
    /// Drops set-id and sticky bits.
    pub(super) fn plain(perm: &mut std::fs::Permissions) {
        use std::os::unix::fs::PermissionsExt;
        perm.set_mode(perm.mode() & 0o777);
    }
}

#[cfg(not(unix))]
mod mode {
    /// Nothing to drop outside Unix.
    pub(super) fn plain(_perm: &mut std::fs::Permissions) {}
}

#[cfg(test)]
mod tests;

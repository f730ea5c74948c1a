//! Writable shares under an approval policy: the guest's changes wait in a private staging
//! directory until a person approves them; only then do they reach HOST.
//!
//! Flow (`vmcp run --share HOST:GUEST:rw` when the policy says `ask` or `deny` for a path):
//! the agent exports the share's changes as a tar ([`stage`] extracts it with the
//! hostile-archive rules into a staging directory), [`compute`] compares the staging tree with
//! HOST into a change list, the approval broker decides (all, nothing, or some files), and
//! [`apply`] writes the approved changes atomically per file. A denial or a timeout drops the
//! staging directory: nothing reached HOST. The file-system rules are in the per-OS module.

#[cfg(unix)]
#[path = "share_gate/fs_unix.rs"]
mod fs;
#[cfg(not(unix))]
#[path = "share_gate/fs_other.rs"]
mod fs;

use std::path::PathBuf;

pub use fs::{apply, compute, read_host, read_staged, stage};

/// A share's changes extracted from the guest's tar.
#[derive(Debug)]
pub struct Staged {
    /// The staging directory (private, removed by its owner).
    pub root: PathBuf,
    /// Paths the guest deleted (relative to the share).
    pub whiteouts: Vec<PathBuf>,
    /// Directories the guest emptied and re-made (HOST entries not in staging are deleted).
    pub opaque: Vec<PathBuf>,
    /// Things left out while extracting (device nodes, FIFOs, ...).
    pub notes: Vec<String>,
}

/// Why a share's changes could not be staged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The guest's archive was refused.
    #[error("the guest's changes were refused")]
    Archive(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Reading or writing the staging tree failed.
    #[error("cannot read {0}")]
    Io(String, #[source] std::io::Error),
    /// The staging tree has something we do not accept.
    #[error("{0}")]
    Refused(String),
}

/// What happens to a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// New in HOST.
    Created,
    /// Replaces what HOST has.
    Modified,
    /// Removed from HOST.
    Deleted,
}

/// What kind of file the change is about (the new one; the old one for deletions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
}

/// One change to HOST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Path relative to HOST (plain components only, checked again when applied).
    pub path: PathBuf,
    /// Created, modified or deleted.
    pub kind: ChangeKind,
    /// File, directory or symlink.
    pub entry: EntryKind,
    /// Size in HOST before, when there was something.
    pub old_size: Option<u64>,
    /// Size after, unless deleted.
    pub new_size: Option<u64>,
    /// A symlink's target.
    pub link_target: Option<PathBuf>,
}

/// What applying a selection of changes did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Paths written or removed.
    pub applied: Vec<PathBuf>,
    /// Paths refused, with the reason.
    pub refused: Vec<(PathBuf, String)>,
}

#[cfg(all(test, unix))]
#[path = "share_gate/tests.rs"]
mod tests;

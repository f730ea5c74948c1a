//! The append-only JSON-lines audit log: one line per decision, synced to disk before the
//! decision takes effect.
//!
//! Each line is an [`AuditRecord`]: when, which pending item, what would have crossed (the
//! sandbox, the host directory and the change list's hash, or the network host and port), the
//! decision, the approved files of a partial approval, the reason of a denial, who decided (the
//! asker's name, `api`, `page` or `timeout`) and how long the crossing waited. The file is opened
//! with `O_APPEND` and created with mode 0600 on Unix; every line is written with one `write`
//! and `fsync`ed. Lines are bounded: a line longer than [`MAX_LINE`] drops its file list and
//! says so (`files_dropped`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Longest audit line written, in bytes.
pub const MAX_LINE: usize = 256 * 1024;

/// One decision, as written to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditRecord {
    /// When it was decided (RFC 3339, UTC).
    pub ts: String,
    /// The pending item's id.
    pub id: String,
    /// `share_changes` or `egress`.
    pub kind: String,
    /// The sandbox it came from.
    pub sandbox: String,
    /// What caused it, when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub context: Option<String>,
    /// The host directory of a share change list.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host_dir: Option<String>,
    /// The change list's hash ([`crate::ChangeSet::hash`]).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub changes_hash: Option<String>,
    /// Number of listed changes (plus omitted ones).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub changes: Option<usize>,
    /// The network host of an egress crossing.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host: Option<String>,
    /// The port of an egress crossing.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// `approved`, `approved_files`, `denied` or `timed_out`.
    pub decision: String,
    /// The approved files of a partial approval.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub approved_files: Option<Vec<String>>,
    /// Whether `approved_files` was dropped to keep the line under [`MAX_LINE`].
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub files_dropped: bool,
    /// The reason of a denial.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Who decided: an asker's name, `page`, `api`, `policy` or `timeout`.
    pub by: String,
    /// Milliseconds between submission and decision.
    pub waited_ms: u64,
}

/// The audit log could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// Opening the file failed.
    #[error("cannot open the audit log {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing or syncing a line failed.
    #[error("cannot write to the audit log {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating with mode 0600) `path` for appending.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let mut opts = OpenOptions::new();
        opts.append(true).create(true);
        mode::private(&mut opts);
        let file = opts.open(path).map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(AuditLog {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a JSON line and syncs it to disk.
    pub fn append(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let werr = |source| AuditError::Write {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_string(record).map_err(|e| werr(std::io::Error::other(e)))?;
        if line.len() + 1 > MAX_LINE {
            let mut r = record.clone();
            r.approved_files = None;
            r.files_dropped = true;
            r.context = r.context.map(|c| vmcp_sanitize::sanitize(&c, 256));
            r.reason = r.reason.map(|c| vmcp_sanitize::sanitize(&c, 1024));
            line = serde_json::to_string(&r).map_err(|e| werr(std::io::Error::other(e)))?;
        }
        line.push('\n');
        // A poisoned lock only means another append panicked; the file is still usable.
        let mut f = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f.write_all(line.as_bytes()).map_err(werr)?;
        f.sync_data().map_err(werr)
    }
}

#[cfg(unix)]
mod mode {
    /// Owner read/write only.
    pub(super) fn private(opts: &mut std::fs::OpenOptions) {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
}

#[cfg(not(unix))]
mod mode {
    /// The file inherits the directory's ACL outside Unix.
    pub(super) fn private(_opts: &mut std::fs::OpenOptions) {}
}

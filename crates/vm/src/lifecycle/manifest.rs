//! The backend-neutral part of a snapshot: a small JSON file beside the backend's state file
//! (`<snapshot>.vmcp`), written by the lifecycle after [`super::Machine::save_state`] and
//! read before [`super::Machine::load_state`].
//!
//! It holds what the lifecycle needs to bring the saved guest back and to refuse a snapshot
//! that cannot fit: the backend that wrote it, the guest's architecture, vCPUs and memory,
//! and the agent token, which is part of the guest's memory and kernel command line (the
//! restored agent says hello with it). The file is read with a size bound: it is input.

use std::path::{Path, PathBuf};

use crate::Arch;

/// Version of the manifest format.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest read (a real one is about 150 bytes).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// What a snapshot needs besides the backend's state file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct SnapshotManifest {
    /// [`MANIFEST_VERSION`] of the writer.
    pub version: u32,
    /// Backend that wrote the state file (`"qemu"`, `"vz"`, ...).
    pub backend: String,
    /// Guest architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// vCPUs of the saved VM.
    pub cpus: u32,
    /// Guest memory of the saved VM, MiB.
    pub memory_mib: u32,
    /// The agent token the saved guest knows.
    pub token: String,
}

/// A manifest that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Reading or writing the file failed.
    #[error("cannot {op} {path} (snapshots need the manifest vmcp writes beside them)")]
    Io {
        /// `"read"` or `"write"`.
        op: &'static str,
        /// The manifest's path.
        path: PathBuf,
        /// The snapshot it belongs to.
        snapshot: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a manifest.
    #[error("cannot parse {path}")]
    Parse {
        /// The manifest's path.
        path: PathBuf,
        /// The snapshot it belongs to.
        snapshot: PathBuf,
        /// Cause.
        source: serde_json::Error,
    },
    /// The snapshot does not fit the VM it would be restored into.
    #[error("it holds {found}, this VM has {wanted}")]
    Mismatch {
        /// The snapshot.
        snapshot: PathBuf,
        /// What the snapshot holds (`"an x86_64 guest"`).
        found: String,
        /// What this VM is.
        wanted: String,
    },
}

impl ManifestError {
    /// The snapshot the error is about.
    pub fn snapshot(&self) -> &Path {
        match self {
            ManifestError::Io { snapshot, .. }
            | ManifestError::Parse { snapshot, .. }
            | ManifestError::Mismatch { snapshot, .. } => snapshot,
        }
    }
}

impl SnapshotManifest {
    /// A manifest for the current writer version.
    pub fn new(backend: &str, arch: Arch, cpus: u32, memory_mib: u32, token: &str) -> Self {
        SnapshotManifest {
            version: MANIFEST_VERSION,
            backend: backend.to_string(),
            arch: arch.as_str().to_string(),
            cpus,
            memory_mib,
            token: token.to_string(),
        }
    }

    /// Where the manifest of `snapshot` lives.
    pub fn path(snapshot: &Path) -> PathBuf {
        let mut p = snapshot.as_os_str().to_owned();
        p.push(".vmcp");
        PathBuf::from(p)
    }

    /// Writes the manifest beside `snapshot`.
    pub fn write(&self, snapshot: &Path) -> Result<(), ManifestError> {
        let path = Self::path(snapshot);
        let io = |source| ManifestError::Io {
            op: "write",
            path: path.clone(),
            snapshot: snapshot.to_path_buf(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| io(e.into()))?;
        std::fs::write(&path, json).map_err(io)
    }

    /// Reads the manifest beside `snapshot`.
    pub fn read(snapshot: &Path) -> Result<SnapshotManifest, ManifestError> {
        use std::io::Read;
        let path = Self::path(snapshot);
        let io = |source| ManifestError::Io {
            op: "read",
            path: path.clone(),
            snapshot: snapshot.to_path_buf(),
            source,
        };
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut bytes))
            .map_err(io)?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {MAX_MANIFEST_BYTES} bytes"),
            )));
        }
        serde_json::from_slice(&bytes).map_err(|source| ManifestError::Parse {
            path: path.clone(),
            snapshot: snapshot.to_path_buf(),
            source,
        })
    }

    /// Checks that this (read) manifest can be restored into a VM described by `vm`.
    pub fn check_fits(&self, snapshot: &Path, vm: &SnapshotManifest) -> Result<(), ManifestError> {
        let mismatch = |found: String, wanted: String| ManifestError::Mismatch {
            snapshot: snapshot.to_path_buf(),
            found,
            wanted,
        };
        if self.version != MANIFEST_VERSION {
            return Err(mismatch(
                format!("manifest version {}", self.version),
                format!("version {MANIFEST_VERSION}"),
            ));
        }
        // The token goes onto the guest's kernel command line: hex only, bounded.
        if self.token.is_empty()
            || self.token.len() > 64
            || !self.token.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(mismatch(
                "an agent token that is not 1 to 64 hex digits".into(),
                "a hex token".into(),
            ));
        }
        if self.backend != vm.backend {
            return Err(mismatch(
                format!("state of the {} backend", self.backend),
                format!("the {} backend", vm.backend),
            ));
        }
        if self.arch != vm.arch {
            return Err(mismatch(
                format!("an {} guest", self.arch),
                format!("an {} guest", vm.arch),
            ));
        }
        if (self.cpus, self.memory_mib) != (vm.cpus, vm.memory_mib) {
            return Err(mismatch(
                format!("{} vCPUs and {} MiB", self.cpus, self.memory_mib),
                format!("{} vCPUs and {} MiB", vm.cpus, vm.memory_mib),
            ));
        }
        Ok(())
    }
}

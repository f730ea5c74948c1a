//! Per-VM private runtime directory, removed on drop.

use std::path::{Path, PathBuf};

use crate::error::VmError;

/// A private directory for one VM's sockets and logs. Removed (recursively) when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    dir: tempfile::TempDir,
}

impl RuntimeDir {
    /// Creates `vmcp-<id>-XXXX` under `$XDG_RUNTIME_DIR` (or the temp dir), mode 0700.
    pub fn create(id: &str) -> Result<Self, VmError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix(&format!("vmcp-{id}-"))
            .tempdir_in(&base)
            .map_err(|source| VmError::Host {
                what: format!("create a runtime directory in {}", base.display()),
                source,
            })?;
        Ok(RuntimeDir { dir })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A new random VM id (12 hex digits).
pub fn new_vm_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop() {
        let d = RuntimeDir::create("t").unwrap();
        let p = d.path().to_path_buf();
        std::fs::write(d.join("x.sock"), b"").unwrap();
        assert!(p.is_dir());
        drop(d);
        assert!(!p.exists());
    }

    #[test]
    fn ids_are_distinct() {
        assert_ne!(new_vm_id(), new_vm_id());
        assert_eq!(new_vm_id().len(), 12);
    }
}

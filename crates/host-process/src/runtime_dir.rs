//! Per-VM private runtime directory, removed on drop.
//!
//! `vmcp-<id>-XXXX` under `$XDG_RUNTIME_DIR` (when it is a directory) or the temp dir. On Unix
//! the directory is 0700 and every file vmcp creates in it is 0600, created with `O_EXCL` and
//! `O_NOFOLLOW`, so other local users can neither read console logs nor plant files. Creating
//! one first sweeps the directories of owners that are gone ([`crate::sweep`]).

use std::path::{Path, PathBuf};

use crate::stale;

/// Why a runtime directory could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeDirError {
    /// The directory itself.
    #[error("cannot create a runtime directory in {}", base.display())]
    Create {
        /// Where it was to be made.
        base: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Its owner file.
    #[error("cannot write the owner file {}", path.display())]
    Owner {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A private directory for one VM's sockets and logs. Removed (recursively) when dropped.
#[derive(Debug)]
pub struct RuntimeDir {
    dir: tempfile::TempDir,
}

impl RuntimeDir {
    /// Creates `vmcp-<id>-XXXX` in the base directory (see the module docs), after removing
    /// stale siblings.
    pub fn create(id: &str) -> Result<Self, RuntimeDirError> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        Self::create_in(&base, id)
    }

    /// Like [`RuntimeDir::create`], in `base`.
    pub fn create_in(base: &Path, id: &str) -> Result<Self, RuntimeDirError> {
        stale::sweep(base, crate::dir_is_mine, crate::start_time);
        let dir = crate::private_tempdir(base, &format!("{}{id}-", stale::DIR_PREFIX)).map_err(
            |source| RuntimeDirError::Create {
                base: base.to_path_buf(),
                source,
            },
        )?;
        let me = std::process::id();
        // Without a start time the directory gets no owner file and is never swept.
        if let Some(start) = crate::start_time(me) {
            let path = dir.path().join(stale::OWNER_FILE);
            write_private(&path, stale::owner_line(me, start).as_bytes())
                .map_err(|source| RuntimeDirError::Owner { path, source })?;
        }
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

/// Creates `path` (which must not exist; never through a symlink), private to this user, with
/// `data`.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = crate::create_private_file(path)?;
    f.write_all(data)
}

/// A new random VM id (12 hex digits).
pub fn new_vm_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop_and_owned() {
        let base = tempfile::tempdir().unwrap();
        let d = RuntimeDir::create_in(base.path(), "t").unwrap();
        let p = d.path().to_path_buf();
        assert!(p
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("vmcp-t-"));
        std::fs::write(d.join("x.sock"), b"").unwrap();
        assert!(p.is_dir());
        if crate::start_time(std::process::id()).is_some() {
            let owner = std::fs::read_to_string(d.join(stale::OWNER_FILE)).unwrap();
            assert_eq!(
                stale::parse_owner(&owner).map(|(pid, _)| pid),
                Some(std::process::id())
            );
        }
        drop(d);
        assert!(!p.exists());
        assert!(RuntimeDir::create("t").is_ok());
    }

    #[test]
    fn missing_base_is_named() {
        let e = RuntimeDir::create_in(Path::new("/nonexistent/base"), "t").unwrap_err();
        assert!(
            vmcp_test_support::error_chain(&e)
                .starts_with("cannot create a runtime directory in /nonexistent/base: "),
            "{e}"
        );
    }

    #[test]
    fn private_files_are_not_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_private(&p, b"a").unwrap();
        assert!(write_private(&p, b"b").is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"a");
    }

    #[test]
    fn ids_are_distinct() {
        assert_ne!(new_vm_id(), new_vm_id());
        assert_eq!(new_vm_id().len(), 12);
    }
}

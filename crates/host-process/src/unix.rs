//! File and user plumbing shared by the Unix hosts (Linux and the others).

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Bytes a file occupies on disk: its allocated blocks (a sparse file counts what it holds).
pub fn allocated_bytes(m: &std::fs::Metadata) -> u64 {
    m.blocks().saturating_mul(512)
}

/// Whether vmcp runs as root.
pub fn is_root() -> bool {
    euid() == 0
}

pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A new directory named `prefix` + random characters in `base`, mode 0700.
pub(crate) fn private_tempdir(base: &Path, prefix: &str) -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(base)
}

/// Creates `path`, which must not exist yet (`O_EXCL`, so never through a symlink), mode 0600.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens the log file `path` once, for appending; created with mode 0600 if missing.
///
/// Refused, with an error saying why: a symlink (`O_NOFOLLOW`: another user could have
/// planted it to make vmcp append to a file of theirs), anything but a regular file (a FIFO
/// would block; it is opened non-blocking so that the check comes first), and a file owned by
/// another user. Only the last path component is checked for symlinks.
pub fn open_log(path: &Path) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                e.kind(),
                format!(
                    "{} is a symbolic link; refusing to follow it (give the real path)",
                    path.display()
                ),
            ),
            _ => e,
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.uid() != euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to vmcp's user {}; remove it or choose another path",
                path.display(),
                meta.uid(),
                euid()
            ),
        ));
    }
    Ok(f)
}

//! The snapshot plumbing of the QEMU OS layers where QEMU snapshots are not implemented
//! (every OS but Linux): one definition that each such layer re-exports, every call saying
//! so. Generic over the layer's stream and descriptor types.

use std::io;
use std::path::Path;

use super::spawn::Ids;

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "QEMU snapshots are implemented on Linux only",
    )
}

/// Passing descriptors over QMP: not on this OS.
pub async fn send_with_fd<S>(_stream: &S, _data: &[u8], _file: &std::fs::File) -> io::Result<()> {
    Err(unsupported())
}

/// Sparse copy of a memory file: not on this OS.
pub fn copy_sparse(_from: &Path, _to: &Path) -> io::Result<u64> {
    Err(unsupported())
}

/// The guest-memory file QEMU maps: not on this OS.
pub fn create_memory_file<C>(_path: &Path, _bytes: u64, _owner: Option<&Ids>) -> io::Result<C> {
    Err(unsupported())
}

/// Sealing a saved memory file: not on this OS.
pub fn seal_memory_file(_path: &Path, _reader: Option<&Ids>) -> io::Result<()> {
    Err(unsupported())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_call_says_linux_only() {
        let p = Path::new("/nonexistent");
        let f = tempfile::tempfile().unwrap();
        let e = send_with_fd(&(), b"x", &f).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("Linux only"));
        assert!(copy_sparse(p, p).is_err());
        assert!(create_memory_file::<()>(p, 1, None).is_err());
        assert!(seal_memory_file(p, None).is_err());
    }
}

//! Stand-ins for Linux-only calls on other Unix systems (the agent only runs as `/init` on
//! Linux; the request server still runs elsewhere for tests).

use std::io;

/// Orphan reaping needs `waitid(WNOWAIT)` semantics this build does not use off Linux.
pub fn peek_zombie() -> io::Result<i32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reaping orphans is only supported on Linux",
    ))
}

/// Overlayfs exists only on Linux.
pub fn overlay_opaque(_path: &std::path::Path) -> bool {
    false
}

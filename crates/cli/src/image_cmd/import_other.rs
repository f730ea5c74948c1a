//! `vmcp image import` where building images is not supported (non-Unix hosts).

use std::path::Path;

use vmcp_image::rootfs::{ImportOptions, RootfsError, RootfsImage};

/// Always an error: building ext4 images needs a Unix host (`mkfs.ext4 -d`, owners).
pub fn import(_archive: &Path, _opts: &ImportOptions) -> Result<RootfsImage, RootfsError> {
    Err(RootfsError::Tool(
        "importing images needs a Linux or macOS host (it runs mkfs.ext4 -d); import on one \
         and copy the cache entry"
            .into(),
    ))
}

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

/// Always an error: the writable layer is formatted with mkfs.ext4 (Unix hosts).
pub fn make_scratch(_path: &Path) -> Result<(), RootfsError> {
    Err(RootfsError::Tool(
        "--image needs a Linux or macOS host (the writable layer is made with mkfs.ext4)".into(),
    ))
}

/// What `vmcp image rootfs` was asked to build (unused off Unix).
#[derive(Debug, Clone)]
pub struct DebianOptions {
    /// Cache directory.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Image name.
    pub name: Option<String>,
    /// pip specs.
    pub pip: Vec<String>,
    /// npm specs.
    pub npm: Vec<String>,
    /// Rebuild.
    pub force: bool,
}

impl DebianOptions {
    /// Options for `packages`.
    pub fn new(_arch: vmcp_image::Arch, _packages: Vec<String>) -> Self {
        DebianOptions {
            cache_dir: None,
            name: None,
            pip: Vec::new(),
            npm: Vec::new(),
            force: false,
        }
    }
}

/// Always an error: mmdebstrap runs on Debian-like hosts only.
pub fn build_debian(_opts: &DebianOptions) -> Result<RootfsImage, RootfsError> {
    Err(RootfsError::Tool(
        "`vmcp image rootfs` needs a Debian or Ubuntu host with mmdebstrap".into(),
    ))
}

//! `vmcp image import` on Unix hosts.

use std::path::Path;

use vmcp_image::rootfs::{ImportOptions, RootfsError, RootfsImage};

/// Imports `archive` with `opts`, printing progress lines.
pub fn import(archive: &Path, opts: &ImportOptions) -> Result<RootfsImage, RootfsError> {
    vmcp_image::import::import_oci(archive, opts, &|line| eprintln!("vmcp: {line}"))
}

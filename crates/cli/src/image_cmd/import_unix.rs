//! `vmcp image import` on Unix hosts.

use std::path::Path;

use vmcp_image::rootfs::{ImportOptions, RootfsError, RootfsImage};

/// Imports `archive` with `opts`, printing progress lines.
pub fn import(archive: &Path, opts: &ImportOptions) -> Result<RootfsImage, RootfsError> {
    vmcp_image::import::import_oci(archive, opts, &|line| eprintln!("vmcp: {line}"))
}

/// Creates a VM's writable layer: an empty sparse ext4 file at `path`.
pub fn make_scratch(path: &Path) -> Result<(), RootfsError> {
    vmcp_image::import::make_scratch(path, vmcp_image::import::SCRATCH_BYTES)
}

/// Builds a rootfs image from Debian packages, printing progress lines.
pub fn build_debian(opts: &vmcp_image::debian::DebianOptions) -> Result<RootfsImage, RootfsError> {
    vmcp_image::debian::build_debian(opts, &|line| eprintln!("vmcp: {line}"))
}

pub use vmcp_image::debian::DebianOptions;

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

/// Copies `dir` into a new ext4 file `disk` for `--share` (symlinks are copied as links,
/// never followed).
pub fn make_share_disk(dir: &Path, disk: &Path) -> Result<u64, RootfsError> {
    vmcp_image::import::make_ext4(dir, disk)
}

/// Applies a writable share's changes (a tar stream in layer form, from the untrusted guest)
/// to `dir`: confined to `dir`, owners not applied, setuid/setgid/sticky bits dropped.
pub fn apply_share_changes(dir: &Path, tar: &Path) -> Result<(), RootfsError> {
    let file = std::fs::File::open(tar)
        .map_err(|e| RootfsError::Io(format!("open {}", tar.display()), e))?;
    let mut a = vmcp_image::layers::Applier::new(dir, vmcp_image::rootfs::Limits::default());
    a.confine_modes(true);
    let layer_err = |source| RootfsError::Layer {
        layer: 1,
        archive: "the share's changes".into(),
        source,
    };
    a.apply(std::io::BufReader::new(file)).map_err(layer_err)?;
    a.finish().map_err(layer_err)
}

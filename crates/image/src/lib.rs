//! Builds the vmcp guest image: a kernel and an initramfs, from pinned inputs, into a cache.
//!
//! Inputs (see [`manifest::INPUTS`], one row per architecture): a Debian cloud kernel
//! package, the few kernel modules the channel and disks need, `busybox-static` for a shell
//! and core utilities, and the guest agent binary ([`agent_bin`]) which becomes `/init`.
//! Packages are fetched with `apt-get download` when missing and always checked against
//! their pinned sha256 ([`fetch`]); they are unpacked and the initramfs is written in Rust
//! ([`deb`], [`cpio`]), so building needs no Linux tools and works on every host OS once the
//! packages are present.
//!
//! ```no_run
//! use vmcp_image::{ensure_image, Arch};
//! let image = ensure_image(Arch::X86_64, &|line| eprintln!("vmcp: {line}"))?;
//! println!("{} {}", image.kernel.display(), image.initrd.display());
//! # Ok::<(), vmcp_image::ImageError>(())
//! ```
//!
//! The initramfs holds `/init` (the agent), `/bin/busybox` with its applet links, the
//! modules under `/lib/modules/<release>/` with their load order in `/etc/vmcp/modules`,
//! device nodes `/dev/console` and `/dev/null`, and minimal `/etc/passwd` and `/etc/group`.

pub mod agent_bin;
pub mod arm64;
mod builder;
pub mod cpio;
pub mod deb;
#[cfg(unix)]
pub mod debian;
pub mod fetch;
#[cfg(unix)]
pub mod import;
#[cfg(unix)]
pub mod layers;
pub mod manifest;
pub mod oci;
pub mod oci_write;
pub mod rootfs;

pub use builder::{
    build, default_cache_dir, ensure_image, find_image, initramfs_entries, module_depends, prune,
    BuildOptions, ImageError, ImagePaths, Module, MODULES_LIST,
};
pub use manifest::{Arch, ArchInputs, UnknownArch};

//! Checkpoints of a running VM, and the two ways back to one: rewind (the same VM continues
//! from it) and fork (N new VMs continue from it).
//!
//! A checkpoint is a snapshot the lifecycle keeps for itself: [`Machine::save_state`] into
//! `checkpoint-<n>/vm` inside the VM's runtime directory, with the manifest beside it. The
//! VM is paused only while the machine writes it. The handle ([`Checkpoint`], cheap to clone)
//! owns the directory: the last clone dropped removes it, and it goes with the runtime
//! directory when the VM is dropped first. A VM keeps at most [`MAX_CHECKPOINTS`] at once.
//!
//! Rewind and fork bring a **new machine** up from the checkpoint ([`Machine::sibling`] +
//! [`Machine::load_state`]) and re-key its agent like any restore: new token, fresh guest
//! RNG, host clock. Rewind keeps the VM's id, runtime directory and hostname and swaps the
//! new machine in only once its agent is ready, so a failed rewind leaves the VM as it was;
//! fork makes VMs with their own id, runtime directory, token and hostname.
//!
//! What a checkpoint holds is the guest's memory and device state: files the guest wrote to
//! its RAM-backed root (initramfs, tmpfs, the overlay of an image is **not** one: see the
//! machine's [`Machine::snapshot_support`]) are in it. Writable disks are not, so backends
//! refuse to checkpoint VMs that have one.
//!
//! [`Machine::sibling`]: super::Machine::sibling
//! [`Machine::load_state`]: super::Machine::load_state
//! [`Machine::save_state`]: super::Machine::save_state
//! [`Machine::snapshot_support`]: super::Machine::snapshot_support

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Checkpoints one VM may hold at once (each is up to the guest's memory size on disk).
pub const MAX_CHECKPOINTS: usize = 8;
/// VMs one fork call may make.
pub const MAX_FORKS: usize = 16;
/// The backend's state path inside a checkpoint directory.
const STATE: &str = "vm";

/// A saved state of a running VM (see the module docs). Clones share the files; the last one
/// dropped removes them.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    inner: Arc<Files>,
}

#[derive(Debug)]
struct Files {
    dir: PathBuf,
    vm_id: String,
    id: String,
    live: Arc<AtomicUsize>,
}

impl Drop for Files {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove a checkpoint");
            }
        }
    }
}

impl Checkpoint {
    /// Counts itself in `live` (the VM's bound) and owns `dir` from now on.
    pub(super) fn new(dir: PathBuf, vm_id: &str, seq: u64, live: Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::SeqCst);
        Checkpoint {
            inner: Arc::new(Files {
                dir,
                vm_id: vm_id.to_string(),
                id: format!("{vm_id}-{seq}"),
                live,
            }),
        }
    }

    /// `<vm id>-<n>`: unique among the checkpoints of this process.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The VM it was taken from (rewind and fork go through that VM).
    pub fn vm_id(&self) -> &str {
        &self.inner.vm_id
    }

    /// The directory holding it.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The snapshot path the backend wrote ([`crate::Vm::restore_snapshot`] takes it).
    pub fn state_path(&self) -> PathBuf {
        self.inner.dir.join(STATE)
    }

    /// Bytes the checkpoint's files take on disk (sparse files count what they hold).
    pub fn disk_bytes(&self) -> u64 {
        vmcp_host_process::disk_usage(&self.inner.dir)
    }
}

//! Staging a writable share's result on Unix hosts: a private copy of HOST with the guest's
//! changes applied by the hostile-archive rules.
//!
//! The copy holds HOST's directories and regular files only (symlinks, devices, FIFOs and
//! sockets are not copied, so they are never part of the comparison and a symlink in HOST is
//! never followed). Files are opened with `O_NOFOLLOW`. Then the guest's tar (layer form,
//! untrusted) is applied to the copy by `vmcp_image::layers::Applier`: `..` refused, symlinks
//! never followed out of the staging root, setuid/setgid/sticky bits dropped, device nodes and
//! FIFOs skipped, sizes and entry counts bounded. Whatever the guest put there, the staging
//! tree is then read by `vmcp_approval::ChangeSet`, which copies back regular files only.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::StageError;

/// Deepest directory nesting copied from HOST.
pub const MAX_DEPTH: usize = 128;
/// Most entries copied from HOST.
pub const MAX_ENTRIES: u64 = 1_000_000;

/// Copies HOST into the empty directory `staging`, then applies the guest's change tar `tar`.
/// Returns the applier's notes (what was skipped).
pub fn stage(host: &Path, tar: &Path, staging: &Path) -> Result<Vec<String>, StageError> {
    let mut count = 0u64;
    copy_dir(host, staging, 0, &mut count)?;
    let file = File::open(tar).map_err(|e| StageError::Io(tar.display().to_string(), e))?;
    let mut a = vmcp_image::layers::Applier::new(staging, vmcp_image::rootfs::Limits::default());
    a.confine_modes(true);
    a.apply(io::BufReader::new(file))
        .map_err(|e| StageError::Archive(Box::new(e)))?;
    a.finish().map_err(|e| StageError::Archive(Box::new(e)))?;
    Ok(a.notes().to_vec())
}

fn copy_dir(from: &Path, to: &Path, depth: usize, count: &mut u64) -> Result<(), StageError> {
    if depth > MAX_DEPTH {
        return Err(StageError::Refused(format!(
            "{} is nested deeper than {MAX_DEPTH} directories",
            from.display()
        )));
    }
    let io_err = |p: &Path| {
        let p = p.display().to_string();
        move |e| StageError::Io(p, e)
    };
    for entry in fs::read_dir(from).map_err(io_err(from))? {
        let entry = entry.map_err(io_err(from))?;
        *count += 1;
        if *count > MAX_ENTRIES {
            return Err(StageError::Refused(format!(
                "the shared directory has more than {MAX_ENTRIES} entries"
            )));
        }
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ft = entry.file_type().map_err(io_err(&src))?;
        if ft.is_dir() {
            fs::create_dir(&dst).map_err(io_err(&dst))?;
            copy_dir(&src, &dst, depth + 1, count)?;
            let mode = entry.metadata().map_err(io_err(&src))?.permissions().mode();
            // Writable for the applier (owner bits); the mode of the copy is not compared.
            fs::set_permissions(&dst, fs::Permissions::from_mode((mode & 0o777) | 0o700))
                .map_err(io_err(&dst))?;
        } else if ft.is_file() {
            let mut input = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&src)
                .map_err(io_err(&src))?;
            let mode = input.metadata().map_err(io_err(&src))?.permissions().mode();
            let mut out = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dst)
                .map_err(io_err(&dst))?;
            io::copy(&mut input, &mut out).map_err(io_err(&dst))?;
            out.set_permissions(fs::Permissions::from_mode(mode & 0o777))
                .map_err(io_err(&dst))?;
        }
        // Symlinks and special files of HOST are not part of the copy.
    }
    Ok(())
}

//! A writable share's changes as a tar stream in OCI layer form, for the host to copy back.
//!
//! The share's overlay upper directory is walked like [`crate::changes`] does: regular files,
//! directories and symlinks become tar entries with their permission bits (owners are not
//! sent: the host writes files as its own user); overlayfs whiteouts become `.wh.NAME`
//! entries; opaque directories get a `.wh..wh..opq` entry. Hard links are sent as separate
//! files; device nodes, FIFOs and sockets are left out. The host applies the stream with the
//! same hostile-archive rules as an image layer, confined to the shared directory.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::changes::{ChangeRoots, MAX_DEPTH};

fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: i64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_size(size);
    h.set_mtime(u64::try_from(mtime).unwrap_or(0));
    h
}

/// Writes the changes under `roots.upper` to `out` as a tar stream.
pub fn export<W: Write>(
    roots: &ChangeRoots,
    out: W,
    is_whiteout: &dyn Fn(&fs::Metadata) -> bool,
    is_opaque: &dyn Fn(&Path) -> bool,
) -> io::Result<W> {
    let mut b = tar::Builder::new(out);
    walk(
        &mut b,
        &roots.upper,
        Path::new(""),
        0,
        is_whiteout,
        is_opaque,
    )?;
    b.into_inner()
}

fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    upper: &Path,
    rel: &Path,
    depth: usize,
    is_whiteout: &dyn Fn(&fs::Metadata) -> bool,
    is_opaque: &dyn Fn(&Path) -> bool,
) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other("directories nested too deep"));
    }
    let dir = upper.join(rel);
    if !rel.as_os_str().is_empty() && is_opaque(&dir) {
        let mut h = header(tar::EntryType::Regular, 0o644, 0, 0);
        b.append_data(&mut h, rel.join(".wh..wh..opq"), io::empty())?;
    }
    let mut names: Vec<_> = fs::read_dir(&dir)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let r = rel.join(&name);
        let m = fs::symlink_metadata(&path)?;
        let ft = m.file_type();
        if is_whiteout(&m) {
            let mut wh = std::ffi::OsString::from(".wh.");
            wh.push(&name);
            let mut h = header(tar::EntryType::Regular, 0o644, 0, 0);
            b.append_data(&mut h, rel.join(wh), io::empty())?;
        } else if ft.is_dir() {
            let mut h = header(tar::EntryType::Directory, m.mode(), 0, m.mtime());
            b.append_data(&mut h, &r, io::empty())?;
            walk(b, upper, &r, depth + 1, is_whiteout, is_opaque)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            let mut h = header(tar::EntryType::Symlink, 0o777, 0, m.mtime());
            b.append_link(&mut h, &r, &target)?;
        } else if ft.is_file() {
            let f = fs::File::open(&path)?;
            let mut h = header(tar::EntryType::Regular, m.mode(), m.len(), m.mtime());
            b.append_data(&mut h, &r, f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_files_links_whiteouts_and_opaque_dirs() {
        let d = tempfile::tempdir().unwrap();
        let up = d.path().join("up");
        fs::create_dir_all(up.join("dir/sub")).unwrap();
        fs::write(up.join("dir/sub/f"), b"data").unwrap();
        fs::write(up.join("gone"), b"WHITEOUT").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", up.join("link")).unwrap();
        let roots = ChangeRoots {
            upper: up.clone(),
            lower: d.path().join("low"),
        };
        let opq = up.join("dir");
        let tar = export(&roots, Vec::new(), &|m| m.len() == 8, &move |p: &Path| {
            p == opq
        })
        .unwrap();
        let mut names = Vec::new();
        for e in tar::Archive::new(&tar[..]).entries().unwrap() {
            let e = e.unwrap();
            names.push(e.path().unwrap().display().to_string());
        }
        assert_eq!(
            names,
            [
                "dir",
                "dir/.wh..wh..opq",
                "dir/sub",
                "dir/sub/f",
                ".wh.gone",
                "link"
            ]
        );
    }
}

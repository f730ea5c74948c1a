//! What a VM changed in its image: a walk of the overlayfs upper directory.
//!
//! The upper directory of the root overlay holds exactly what processes wrote: new files,
//! copies of modified files (a `chmod` copies up too), whiteouts (character devices 0:0) for
//! deletions, and directories marked opaque (`trusted.overlay.opaque=y`) when a directory was
//! removed and made again. The walk compares it with the lower (image) directory:
//! - an upper file or symlink whose path exists below is `M`, otherwise `A`;
//! - a whiteout is `D`;
//! - an upper directory that is new is `A` and so is everything in it; one that exists below
//!   is not reported itself (it was copied up for its contents), but when it is opaque every
//!   lower entry it hides is `D`.
//!
//! Lines are `<kind> <path>\n` with the path escaped by [`escape`]; the text is bounded by
//! [`MAX_CHANGES_BYTES`] (a last line `! truncated` says when the bound was hit).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Largest change list sent to the host.
pub const MAX_CHANGES_BYTES: usize = 16 * 1024 * 1024;
/// Deepest directory nesting walked.
pub const MAX_DEPTH: usize = 128;

/// Where the layers of the root overlay are, as the agent (not its processes) sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRoots {
    /// The overlay's upper directory.
    pub upper: PathBuf,
    /// The image (lower directory).
    pub lower: PathBuf,
}

/// Writes `path` with `%`, control bytes, space-like separators and DEL as `%XX`.
pub fn escape(path: &[u8]) -> String {
    let mut s = String::with_capacity(path.len());
    for &b in path {
        if b < 0x20 || b == 0x7f || b == b'%' || b >= 0x80 {
            s.push_str(&format!("%{b:02X}"));
        } else {
            s.push(b as char);
        }
    }
    s
}

struct Walk<'a> {
    roots: &'a ChangeRoots,
    out: String,
    max: usize,
    full: bool,
    is_whiteout: &'a dyn Fn(&fs::Metadata) -> bool,
    is_opaque: &'a dyn Fn(&Path) -> bool,
}

impl Walk<'_> {
    fn line(&mut self, kind: char, rel: &Path) {
        if self.full {
            return;
        }
        use std::os::unix::ffi::OsStrExt;
        let mut path = b"/".to_vec();
        path.extend_from_slice(rel.as_os_str().as_bytes());
        let line = format!("{kind} {}\n", escape(&path));
        if self.out.len() + line.len() > self.max.saturating_sub(16) {
            self.out.push_str("! truncated\n");
            self.full = true;
            return;
        }
        self.out.push_str(&line);
    }

    fn dir(&mut self, rel: &Path, all_new: bool, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH || self.full {
            return Ok(());
        }
        let upper = self.roots.upper.join(rel);
        let lower = self.roots.lower.join(rel);
        let mut names: Vec<_> = fs::read_dir(&upper)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        if !all_new && (self.is_opaque)(&upper) {
            let mut hidden: Vec<_> = fs::read_dir(&lower)
                .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            hidden.sort();
            for name in hidden {
                if !names.contains(&name) {
                    self.line('D', &rel.join(&name));
                }
            }
        }
        for name in names {
            let r = rel.join(&name);
            let Ok(m) = fs::symlink_metadata(upper.join(&name)) else {
                continue;
            };
            let below = !all_new && fs::symlink_metadata(lower.join(&name)).is_ok();
            if (self.is_whiteout)(&m) {
                if below {
                    self.line('D', &r);
                }
                continue;
            }
            if m.is_dir() {
                if !below {
                    self.line('A', &r);
                }
                self.dir(&r, !below, depth + 1)?;
            } else {
                self.line(if below { 'M' } else { 'A' }, &r);
            }
        }
        Ok(())
    }
}

/// The change list of `roots` as text (see the module docs), at most `max` bytes.
pub fn list(
    roots: &ChangeRoots,
    max: usize,
    is_whiteout: &dyn Fn(&fs::Metadata) -> bool,
    is_opaque: &dyn Fn(&Path) -> bool,
) -> io::Result<String> {
    let mut w = Walk {
        roots,
        out: String::new(),
        max,
        full: false,
        is_whiteout,
        is_opaque,
    };
    w.dir(Path::new(""), false, 0)?;
    Ok(w.out)
}

/// Overlayfs's whiteout: a character device with device number 0:0.
pub fn overlay_whiteout(m: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    m.file_type().is_char_device() && m.rdev() == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_would_break_a_line() {
        assert_eq!(escape(b"/a b/c"), "/a b/c");
        assert_eq!(escape(b"/x\ny%\x7f\xff"), "/x%0Ay%25%7F%FF");
    }

    #[test]
    fn added_modified_deleted_and_opaque() {
        let d = tempfile::tempdir().unwrap();
        let (up, low) = (d.path().join("up"), d.path().join("low"));
        for dir in [&up, &low] {
            fs::create_dir(dir).unwrap();
        }
        fs::create_dir_all(low.join("etc")).unwrap();
        fs::write(low.join("etc/conf"), b"1").unwrap();
        fs::write(low.join("etc/gone"), b"1").unwrap();
        fs::create_dir_all(low.join("opq/sub")).unwrap();
        fs::write(low.join("opq/old"), b"1").unwrap();
        // Upper: a modified file, a whiteout (a marker file stands in for the device node),
        // a new tree, a recreated (opaque) directory.
        fs::create_dir_all(up.join("etc")).unwrap();
        fs::write(up.join("etc/conf"), b"2").unwrap();
        fs::write(up.join("etc/gone"), b"WHITEOUT").unwrap();
        fs::create_dir_all(up.join("new/deep")).unwrap();
        fs::write(up.join("new/deep/f\nx"), b"").unwrap();
        fs::create_dir_all(up.join("opq")).unwrap();
        fs::write(up.join("opq/fresh"), b"").unwrap();
        let roots = ChangeRoots {
            upper: up.clone(),
            lower: low,
        };
        let wo = |m: &fs::Metadata| m.len() == 8;
        let opq_dir = up.join("opq");
        let opaque = move |p: &Path| p == opq_dir;
        let text = list(&roots, MAX_CHANGES_BYTES, &wo, &opaque).unwrap();
        assert_eq!(
            text,
            "M /etc/conf\nD /etc/gone\nA /new\nA /new/deep\nA /new/deep/f%0Ax\n\
             D /opq/old\nD /opq/sub\nA /opq/fresh\n"
        );
    }

    #[test]
    fn the_list_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let (up, low) = (d.path().join("up"), d.path().join("low"));
        fs::create_dir(&low).unwrap();
        fs::create_dir(&up).unwrap();
        for i in 0..100 {
            fs::write(up.join(format!("file-{i:03}")), b"").unwrap();
        }
        let roots = ChangeRoots {
            upper: up,
            lower: low,
        };
        let text = list(&roots, 1000, &|_| false, &|_| false).unwrap();
        assert!(text.len() <= 1000, "{}", text.len());
        assert!(text.ends_with("A /file-061\n! truncated\n") || text.ends_with("! truncated\n"));
        assert!(text.starts_with("A /file-000\n"));
        let all = list(&roots, MAX_CHANGES_BYTES, &|_| false, &|_| false).unwrap();
        assert_eq!(all.lines().count(), 100);
    }
}

//! The `newc` cpio format of Linux initramfs images: a writer and a bounds-checked reader.
//!
//! The writer is deterministic: entries are written in the order given, inode numbers count
//! up from 1, owner is root, every mtime is 0, so the same inputs give the same bytes. The
//! reader exists to check images (tests, `vmcp image` diagnostics) and is fuzzed; it never
//! panics and never allocates more than the input it is given.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFMT: u32 = 0o170000;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file with its contents.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/` (`bin/sh`).
    pub path: String,
    /// Permission bits (`0o755`).
    pub perm: u32,
    /// Type and contents.
    pub kind: Kind,
}

impl Entry {
    /// A directory.
    pub fn dir(path: &str, perm: u32) -> Entry {
        Entry {
            path: path.to_string(),
            perm,
            kind: Kind::Dir,
        }
    }
    /// A regular file.
    pub fn file(path: &str, perm: u32, data: Vec<u8>) -> Entry {
        Entry {
            path: path.to_string(),
            perm,
            kind: Kind::File(data),
        }
    }
    /// A symbolic link.
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry {
            path: path.to_string(),
            perm: 0o777,
            kind: Kind::Symlink(target.to_string()),
        }
    }
    /// A character device.
    pub fn char_dev(path: &str, perm: u32, major: u32, minor: u32) -> Entry {
        Entry {
            path: path.to_string(),
            perm,
            kind: Kind::CharDev { major, minor },
        }
    }
}

/// Errors writing or reading an archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpioError {
    /// Writing failed.
    #[error("cannot write the archive")]
    Io(#[from] io::Error),
    /// An entry cannot be represented (path with NUL, file over 4 GiB).
    #[error("cannot store {0:?} in a newc archive")]
    Unrepresentable(String),
    /// The archive is malformed at this byte offset.
    #[error("malformed cpio archive at byte {offset}: {reason}")]
    Malformed {
        /// Offset of the bad header.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Writes a newc archive of `entries` (plus the trailer) to `out`.
pub fn write<W: Write>(entries: &[Entry], mut out: W) -> Result<(), CpioError> {
    let mut ino = 0u32;
    for e in entries {
        ino += 1;
        write_one(&mut out, ino, &e.path, e.perm, &e.kind)?;
    }
    write_one(&mut out, 0, TRAILER, 0, &Kind::File(Vec::new()))?;
    out.flush()?;
    Ok(())
}

fn write_one<W: Write>(
    out: &mut W,
    ino: u32,
    path: &str,
    perm: u32,
    kind: &Kind,
) -> Result<(), CpioError> {
    let unrepresentable = || CpioError::Unrepresentable(path.to_string());
    if path.contains('\0') || path.is_empty() {
        return Err(unrepresentable());
    }
    let (fmt, data, rdev): (u32, &[u8], (u32, u32)) = match kind {
        Kind::Dir => (S_IFDIR, &[], (0, 0)),
        Kind::File(d) => (S_IFREG, d, (0, 0)),
        Kind::Symlink(t) => (S_IFLNK, t.as_bytes(), (0, 0)),
        Kind::CharDev { major, minor } => (S_IFCHR, &[], (*major, *minor)),
    };
    let size = u32::try_from(data.len()).map_err(|_| unrepresentable())?;
    let namesize = u32::try_from(path.len() + 1).map_err(|_| unrepresentable())?;
    let nlink = if matches!(kind, Kind::Dir) { 2 } else { 1 };
    let mode = if path == TRAILER {
        0
    } else {
        fmt | (perm & 0o7777)
    };
    let fields = [
        ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    let mut header = Vec::with_capacity(HEADER_LEN + path.len() + 4);
    header.extend_from_slice(MAGIC);
    for f in fields {
        header.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    header.extend_from_slice(path.as_bytes());
    header.push(0);
    header.resize(header.len() + pad4(HEADER_LEN + path.len() + 1), 0);
    out.write_all(&header)?;
    out.write_all(data)?;
    out.write_all(&[0u8; 3][..pad4(data.len())])?;
    Ok(())
}

fn hex_field(bytes: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(bytes).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Parses a whole newc archive (up to its trailer).
pub fn read(buf: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        let bad = |reason| CpioError::Malformed {
            offset: pos,
            reason,
        };
        let header = buf
            .get(pos..pos + HEADER_LEN)
            .ok_or_else(|| bad("truncated header (no trailer)"))?;
        if &header[..6] != MAGIC {
            return Err(bad("bad magic (not newc)"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let start = 6 + i * 8;
            *f = hex_field(&header[start..start + 8]).ok_or_else(|| bad("bad hex field"))?;
        }
        let mode = fields[1];
        let size = fields[6] as usize;
        let namesize = fields[11] as usize;
        if namesize == 0 {
            return Err(bad("empty name"));
        }
        let name_start = pos + HEADER_LEN;
        let name_end = name_start
            .checked_add(namesize)
            .ok_or_else(|| bad("name too long"))?;
        let name = buf
            .get(name_start..name_end)
            .ok_or_else(|| bad("truncated name"))?;
        let (name, nul) = name.split_at(namesize - 1);
        if nul != [0] || name.contains(&0) {
            return Err(bad("name not NUL-terminated"));
        }
        let name = std::str::from_utf8(name).map_err(|_| bad("name not UTF-8"))?;
        let data_start = name_end + pad4(HEADER_LEN + namesize);
        let data_end = data_start
            .checked_add(size)
            .ok_or_else(|| bad("size too large"))?;
        let data = buf
            .get(data_start..data_end)
            .ok_or_else(|| bad("truncated data"))?;
        if name == TRAILER {
            return Ok(entries);
        }
        let kind = match mode & S_IFMT {
            S_IFDIR => Kind::Dir,
            S_IFREG => Kind::File(data.to_vec()),
            S_IFLNK => Kind::Symlink(
                std::str::from_utf8(data)
                    .map_err(|_| bad("link target not UTF-8"))?
                    .to_string(),
            ),
            S_IFCHR => Kind::CharDev {
                major: fields[9],
                minor: fields[10],
            },
            _ => return Err(bad("unsupported file type")),
        };
        entries.push(Entry {
            path: name.to_string(),
            perm: mode & 0o7777,
            kind,
        });
        pos = data_end + pad4(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::dir("bin", 0o755),
            Entry::file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec()),
            Entry::file("empty", 0o644, Vec::new()),
            Entry::symlink("bin/sh", "/bin/busybox"),
            Entry::char_dev("dev/console", 0o600, 5, 1),
            Entry::dir("tmp", 0o1777),
        ]
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write(&sample(), &mut buf).unwrap();
        assert_eq!(buf.len() % 4, 0);
        assert_eq!(read(&buf).unwrap(), sample());
    }

    #[test]
    fn output_is_deterministic_and_matches_the_format() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        write(&sample(), &mut a).unwrap();
        write(&sample(), &mut b).unwrap();
        assert_eq!(a, b);
        // First header: ino 1, directory 0755, nlink 2, name "bin\0" padded to 4.
        assert_eq!(&a[..6], b"070701");
        assert_eq!(&a[6..14], b"00000001");
        assert_eq!(&a[14..22], b"000041ed");
        assert_eq!(&a[110..114], b"bin\0");
        // Ends with the trailer.
        let tail = String::from_utf8_lossy(&a[a.len() - 16..]).to_string();
        assert!(tail.contains("TRAILER!!!"), "{tail:?}");
    }

    #[test]
    fn the_system_cpio_reads_our_archives() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            vmcp_test_support::skipped!("SKIPPED: cpio(1) is not installed");
            return;
        };
        assert!(out.status.success());
        let mut buf = Vec::new();
        write(&sample(), &mut buf).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "-v", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains("bin/sh -> /bin/busybox"), "{listing}");
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("crw-------") && l.contains("dev/console")),
            "{listing}"
        );
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("drwxrwxrwt") && l.ends_with("tmp")),
            "{listing}"
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut buf = Vec::new();
        write(&sample(), &mut buf).unwrap();
        for cut in [0, 5, 110, 115, buf.len() - 1] {
            assert!(read(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = buf.clone();
        bad[0] = b'1';
        assert!(matches!(
            read(&bad),
            Err(CpioError::Malformed { offset: 0, .. })
        ));
        let mut bad = buf.clone();
        bad[20] = b'g';
        assert!(read(&bad).is_err());
        assert!(matches!(
            write(&[Entry::dir("a\0b", 0o755)], Vec::new()),
            Err(CpioError::Unrepresentable(_))
        ));
    }

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        let path = "[a-z]{1,8}(/[a-z0-9._-]{1,8}){0,2}";
        prop_oneof![
            (path, 0u32..0o7777).prop_map(|(p, m)| Entry::dir(&p, m)),
            (
                path,
                0u32..0o7777,
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(p, m, d)| Entry::file(&p, m, d)),
            (path, "[ -~]{1,40}").prop_map(|(p, t)| Entry::symlink(&p, &t)),
            (path, 0u32..0o7777, any::<u32>(), any::<u32>())
                .prop_map(|(p, m, a, b)| Entry::char_dev(&p, m, a, b)),
        ]
    }

    proptest! {
        #[test]
        fn any_entries_round_trip(entries in proptest::collection::vec(entry_strategy(), 0..12)) {
            let mut buf = Vec::new();
            write(&entries, &mut buf).unwrap();
            prop_assert_eq!(read(&buf).unwrap(), entries);
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read(&bytes);
        }

        #[test]
        fn reader_survives_corruption(idx in 0usize..400, byte in any::<u8>()) {
            let mut buf = Vec::new();
            write(&sample(), &mut buf).unwrap();
            let i = idx % buf.len();
            buf[i] = byte;
            let _ = read(&buf);
        }
    }
}

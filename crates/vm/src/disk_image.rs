//! Host-side checks of disk images before they are attached, so a wrong file gets a clear
//! error here instead of a mount failure inside the guest (the kernel's message for a file
//! that is not a filesystem can be as misleading as "Out of memory").

use std::io::Read;
use std::path::Path;

/// Offset of the ext2/3/4 superblock.
const SUPERBLOCK: usize = 1024;
/// Bytes of the superblock this check reads (through `s_blocks_count_hi`).
const SUPERBLOCK_READ: usize = 0x154;
/// `s_magic` of ext2/3/4.
const EXT4_MAGIC: u16 = 0xEF53;
/// `INCOMPAT_64BIT`: `s_blocks_count_hi` is valid.
const INCOMPAT_64BIT: u32 = 0x80;

/// Checks that `path` holds an ext2/3/4 filesystem that fits in the file: the superblock
/// magic (0xEF53 at byte 1080), a sane block size (1 KiB to 64 KiB) and a block count that
/// the file's size covers. The error says what is wrong, for the user.
pub fn check_ext4(path: &Path) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let len = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?
        .len();
    let need = (SUPERBLOCK + SUPERBLOCK_READ) as u64;
    if len < need {
        return Err(format!(
            "it is not an ext4 image: {len} bytes is too small to hold an ext4 filesystem (attach a raw ext4 image, e.g. made with `mkfs.ext4 -d DIR IMG SIZE`)"
        ));
    }
    let mut head = vec![0u8; SUPERBLOCK + SUPERBLOCK_READ];
    file.read_exact(&mut head)
        .map_err(|e| format!("cannot read its superblock: {e}"))?;
    let sb = &head[SUPERBLOCK..];
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    let magic = u16_at(0x38);
    if magic != EXT4_MAGIC {
        return Err(format!(
            "it is not an ext4 image (no ext2/3/4 superblock magic 0xEF53 at byte 1080, found 0x{magic:04X}); attach a raw ext4 image, e.g. made with `mkfs.ext4 -d DIR IMG SIZE`"
        ));
    }
    let log_block = u32_at(0x18);
    if log_block > 6 {
        return Err(format!(
            "its ext4 superblock is corrupt (block size 2^{} bytes)",
            u64::from(log_block) + 10
        ));
    }
    let block_size = 1024u64 << log_block;
    let mut blocks = u64::from(u32_at(0x04));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    let fs_bytes = blocks.saturating_mul(block_size);
    if blocks == 0 || fs_bytes > len {
        return Err(format!(
            "it is truncated or corrupt: its ext4 superblock says {fs_bytes} bytes ({blocks} blocks of {block_size}), the file has {len}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(blocks: u32, log_block: u32, magic: u16, len: usize) -> tempfile::NamedTempFile {
        let mut data = vec![0u8; len.max(4096)];
        let sb = SUPERBLOCK;
        data[sb + 0x04..sb + 0x08].copy_from_slice(&blocks.to_le_bytes());
        data[sb + 0x18..sb + 0x1c].copy_from_slice(&log_block.to_le_bytes());
        data[sb + 0x38..sb + 0x3a].copy_from_slice(&magic.to_le_bytes());
        data.truncate(len);
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), data).unwrap();
        f
    }

    #[test]
    fn accepts_a_plausible_superblock() {
        let f = image(64, 0, EXT4_MAGIC, 64 * 1024);
        check_ext4(f.path()).unwrap();
    }

    #[test]
    fn names_what_is_wrong() {
        let f = image(64, 0, 0x1234, 64 * 1024);
        let e = check_ext4(f.path()).unwrap_err();
        assert!(
            e.contains("not an ext4 image") && e.contains("0x1234"),
            "{e}"
        );
        let f = image(64, 0, EXT4_MAGIC, 100);
        assert!(check_ext4(f.path()).unwrap_err().contains("too small"));
        let f = image(1 << 20, 0, EXT4_MAGIC, 64 * 1024);
        assert!(check_ext4(f.path()).unwrap_err().contains("truncated"));
        let f = image(64, 30, EXT4_MAGIC, 64 * 1024);
        assert!(check_ext4(f.path()).unwrap_err().contains("corrupt"));
        let e = check_ext4(Path::new("/etc/passwd")).unwrap_err();
        assert!(e.contains("ext4"), "{e}");
        assert!(check_ext4(Path::new("/nonexistent/x")).is_err());
    }

    /// A real image, when the host has mkfs.ext4 (else the synthetic cases above stand).
    #[test]
    fn accepts_a_real_mkfs_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.ext4");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .arg("8M")
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            vmcp_test_support::skipped!("SKIPPED (sub-case): no mkfs.ext4 on this host");
            return;
        }
        check_ext4(&img).unwrap();
        // Cut in half: the superblock's size no longer fits.
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.set_len(4 * 1024 * 1024).unwrap();
        assert!(check_ext4(&img).unwrap_err().contains("truncated"));
    }
}

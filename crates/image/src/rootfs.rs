//! The cache of root filesystem images: ext4 files made by `vmcp image import` (OCI
//! archives) and `vmcp image rootfs` (Debian packages), attached read-only to VMs.
//!
//! Layout: `<cache>/rootfs/<key>/rootfs.ext4` and `<key>/image.json` ([`RootfsInfo`]: where it
//! came from, the run defaults `Env`/`WorkingDir`/`User`, names). The key is a hash of the
//! inputs (`oci-<16 hex>` of the archive bytes, `deb-<16 hex>` of the package list and the
//! host's apt sources), so the same inputs give the same image without a rebuild. Images are
//! built in `<cache>/rootfs/.build-*` and renamed into place. A name (`--name`, or the tag
//! an archive carries) belongs to one image at a time; giving it to another image takes it
//! from the first. `prune` removes images without a name and stale build leftovers.
//!
//! This module is portable; building needs Unix ([`crate::import`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Arch;

/// Bumped when the way images are built changes, so old cache entries are not reused.
pub const ROOTFS_LAYOUT_VERSION: u32 = 1;
/// File name of the ext4 image inside an entry.
pub const DISK_FILE: &str = "rootfs.ext4";
/// File name of the metadata inside an entry.
pub const INFO_FILE: &str = "image.json";
/// Longest image name.
pub const MAX_NAME_LEN: usize = 128;

/// Errors of the rootfs cache and builders.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootfsError {
    /// File system error.
    #[error("cannot {0}")]
    Io(String, #[source] std::io::Error),
    /// The archive could not be read.
    #[error("cannot read the image archive {0}")]
    Oci(String, #[source] crate::oci::OciError),
    /// A layer could not be applied.
    #[cfg(unix)]
    #[error("cannot apply layer {layer} of {archive}")]
    Layer {
        /// Layer number (1-based).
        layer: usize,
        /// Archive path.
        archive: String,
        /// Cause.
        #[source]
        source: crate::layers::LayerError,
    },
    /// A bad name or key was given.
    #[error("{0}")]
    BadName(String),
    /// No image has this name or key.
    #[error("no rootfs image named {0:?} (see `vmcp image list`)")]
    NotFound(String),
    /// The image is for another architecture.
    #[error("the image is for {image}, not {wanted} (pass --arch to import for another guest)")]
    WrongArch {
        /// Architecture of the image.
        image: String,
        /// Guest architecture wanted.
        wanted: String,
    },
    /// The image's `User` cannot be resolved.
    #[error("the image's User {0:?} is not in its /etc/passwd or /etc/group")]
    User(String),
    /// An external tool failed or is missing.
    #[error("{0}")]
    Tool(String),
    /// Metadata could not be read or written.
    #[error("bad image metadata {0}")]
    Json(String, #[source] serde_json::Error),
}

pub(crate) fn io_err<'a>(
    what: impl Into<String> + 'a,
) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    move |e| RootfsError::Io(what.into(), e)
}

/// Bounds on what an import may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Total bytes of file data written, over all layers.
    pub max_bytes: u64,
    /// Total entries, over all layers.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 8 * 1024 * 1024 * 1024,
            max_entries: 1_000_000,
        }
    }
}

/// Options of `import::import_oci` (Unix).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ImportOptions {
    /// Cache directory (default: [`crate::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Name to give the image (default: the archive's tag, if any).
    pub name: Option<String>,
    /// Guest architecture the image must be for.
    pub arch: Arch,
    /// Extraction bounds.
    pub limits: Limits,
    /// Rebuild even when the cache has it.
    pub force: bool,
}

impl ImportOptions {
    /// Defaults for `arch`.
    pub fn new(arch: Arch) -> Self {
        ImportOptions {
            cache_dir: None,
            name: None,
            arch,
            limits: Limits::default(),
            force: false,
        }
    }
}

/// What `image.json` records about one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RootfsInfo {
    /// Cache key (directory name).
    pub key: String,
    /// Names that refer to it.
    pub names: Vec<String>,
    /// `oci` or `debian`.
    pub kind: String,
    /// What it was made from (archive path, package list).
    pub source: String,
    /// Guest architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// Default environment (`KEY=VALUE`) of commands run in it.
    pub env: Vec<String>,
    /// Default working directory.
    pub workdir: Option<String>,
    /// Default user as the image gives it.
    pub user: Option<String>,
    /// That user resolved to numeric ids through the image's own `/etc/passwd`/`/etc/group`.
    pub uid_gid: Option<(u32, u32)>,
    /// Bytes of file data in the image.
    pub data_bytes: u64,
    /// Size of the ext4 file.
    pub disk_bytes: u64,
    /// Seconds since the epoch when it was built.
    pub created: u64,
    /// Things skipped while building (device nodes, ...).
    pub notes: Vec<String>,
}

/// An image in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsImage {
    /// Its directory.
    pub dir: PathBuf,
    /// The ext4 file.
    pub disk: PathBuf,
    /// Its metadata.
    pub info: RootfsInfo,
}

/// `<cache>/rootfs`.
pub fn rootfs_root(cache: &Path) -> PathBuf {
    cache.join("rootfs")
}

/// Checks a user-given image name.
pub fn check_name(name: &str) -> Result<(), RootfsError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:/@+-".contains(c);
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name.starts_with(['.', '-', '/'])
        || !name.chars().all(ok_char)
    {
        return Err(RootfsError::BadName(format!(
            "bad image name {name:?}: use up to {MAX_NAME_LEN} letters, digits and ._:/@+- \
             (not starting with . - or /)"
        )));
    }
    Ok(())
}

/// Reads one cache entry.
pub fn load(dir: &Path) -> Result<RootfsImage, RootfsError> {
    let info_path = dir.join(INFO_FILE);
    let raw = std::fs::read(&info_path).map_err(io_err(format!("read {}", info_path.display())))?;
    let info: RootfsInfo = serde_json::from_slice(&raw)
        .map_err(|e| RootfsError::Json(info_path.display().to_string(), e))?;
    Ok(RootfsImage {
        dir: dir.to_path_buf(),
        disk: dir.join(DISK_FILE),
        info,
    })
}

/// Writes `info` into `dir` atomically.
pub fn store_info(dir: &Path, info: &RootfsInfo) -> Result<(), RootfsError> {
    let path = dir.join(INFO_FILE);
    let json = serde_json::to_vec_pretty(info)
        .map_err(|e| RootfsError::Json(path.display().to_string(), e))?;
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io_err(format!("write {}", path.display())))?;
    std::fs::write(tmp.path(), json).map_err(io_err(format!("write {}", path.display())))?;
    set_readable(tmp.path()).map_err(io_err(format!("chmod {}", path.display())))?;
    tmp.persist(&path)
        .map_err(|e| RootfsError::Io(format!("write {}", path.display()), e.error))?;
    Ok(())
}

/// Makes a metadata file world-readable (temporary files start out private).
#[cfg(unix)]
fn set_readable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn set_readable(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Every complete image in the cache, oldest first. Broken entries are skipped.
pub fn list(cache: &Path) -> Vec<RootfsImage> {
    let Ok(rd) = std::fs::read_dir(rootfs_root(cache)) else {
        return Vec::new();
    };
    let mut out: Vec<RootfsImage> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| load(&e.path()).ok())
        .filter(|img| img.disk.is_file())
        .collect();
    out.sort_by(|a, b| (a.info.created, &a.info.key).cmp(&(b.info.created, &b.info.key)));
    out
}

/// The image with this name, key, or unique key prefix (at least 6 characters after the
/// kind, e.g. `oci-1a2b3c`).
pub fn find(cache: &Path, what: &str) -> Result<RootfsImage, RootfsError> {
    let all = list(cache);
    if let Some(img) = all.iter().find(|i| i.info.names.iter().any(|n| n == what)) {
        return Ok(img.clone());
    }
    if let Some(img) = all.iter().find(|i| i.info.key == what) {
        return Ok(img.clone());
    }
    if what.len() >= 10 {
        let hits: Vec<&RootfsImage> = all
            .iter()
            .filter(|i| i.info.key.starts_with(what))
            .collect();
        if hits.len() == 1 {
            return Ok(hits[0].clone());
        }
    }
    Err(RootfsError::NotFound(what.to_string()))
}

/// Gives `name` to the image `key`, taking it from any other image.
pub fn set_name(cache: &Path, key: &str, name: &str) -> Result<(), RootfsError> {
    check_name(name)?;
    for mut img in list(cache) {
        let has = img.info.names.iter().any(|n| n == name);
        if img.info.key == key && !has {
            img.info.names.push(name.to_string());
            store_info(&img.dir, &img.info)?;
        } else if img.info.key != key && has {
            img.info.names.retain(|n| n != name);
            store_info(&img.dir, &img.info)?;
        }
    }
    Ok(())
}

/// Removes the image with this name or key; returns its directory.
pub fn remove(cache: &Path, what: &str) -> Result<PathBuf, RootfsError> {
    let img = find(cache, what)?;
    std::fs::remove_dir_all(&img.dir).map_err(io_err(format!("remove {}", img.dir.display())))?;
    Ok(img.dir)
}

/// Removes images without a name and build leftovers older than an hour.
pub fn prune(cache: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    let root = rootfs_root(cache);
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Ok(removed);
    };
    for e in rd.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let unwanted = if name.starts_with('.') {
            crate::builder::is_stale(&path)
        } else {
            match load(&path) {
                Ok(img) => img.info.names.is_empty(),
                // A directory that is not an image (interrupted rename, old layout).
                Err(_) => crate::builder::is_stale(&path),
            }
        };
        if unwanted {
            let res = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            res.map_err(io_err(format!("remove {}", path.display())))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

/// Resolves an image `User` (`name`, `uid`, `name:group`, `uid:gid`) with the image's own
/// `passwd` and `group` contents. A numeric uid without a passwd entry gets gid 0, as
/// Docker does.
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<(u32, u32), RootfsError> {
    let bad = || RootfsError::User(user.to_string());
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && (f[0] == u || f[2] == u)).then(|| (f[2].parse().ok(), f[3].parse().ok()))
    });
    let uid: u32 = match (u.parse::<u32>(), entry) {
        (Ok(n), _) => n,
        (Err(_), Some((Some(n), _))) => n,
        _ => return Err(bad()),
    };
    let gid = match g {
        None => entry.and_then(|e| e.1).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g).then(|| f[2].parse().ok())?
                })
                .ok_or_else(bad)?,
        },
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(key: &str, names: &[&str], created: u64) -> RootfsInfo {
        RootfsInfo {
            key: key.into(),
            names: names.iter().map(|s| s.to_string()).collect(),
            kind: "oci".into(),
            source: "x.tar".into(),
            arch: "x86_64".into(),
            env: vec![],
            workdir: None,
            user: None,
            uid_gid: None,
            data_bytes: 1,
            disk_bytes: 1,
            created,
            notes: vec![],
        }
    }

    fn add(cache: &Path, i: &RootfsInfo) {
        let dir = rootfs_root(cache).join(&i.key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(DISK_FILE), b"x").unwrap();
        store_info(&dir, i).unwrap();
    }

    #[test]
    fn names_move_and_prune_keeps_named_images() {
        let d = tempfile::tempdir().unwrap();
        add(d.path(), &info("oci-aaaaaaaaaaaaaaaa", &["py"], 1));
        add(d.path(), &info("oci-bbbbbbbbbbbbbbbb", &[], 2));
        assert_eq!(
            find(d.path(), "py").unwrap().info.key,
            "oci-aaaaaaaaaaaaaaaa"
        );
        assert_eq!(
            find(d.path(), "oci-bbbbbb").unwrap().info.key,
            "oci-bbbbbbbbbbbbbbbb"
        );
        assert!(matches!(
            find(d.path(), "oci-b"),
            Err(RootfsError::NotFound(_))
        ));
        set_name(d.path(), "oci-bbbbbbbbbbbbbbbb", "py").unwrap();
        assert_eq!(
            find(d.path(), "py").unwrap().info.key,
            "oci-bbbbbbbbbbbbbbbb"
        );
        // The first image lost its only name, so prune takes it.
        let removed = prune(d.path()).unwrap();
        assert_eq!(removed.len(), 1);
        assert!(removed[0].ends_with("oci-aaaaaaaaaaaaaaaa"));
        assert_eq!(list(d.path()).len(), 1);
        remove(d.path(), "py").unwrap();
        assert!(list(d.path()).is_empty());
        assert!(matches!(
            remove(d.path(), "py"),
            Err(RootfsError::NotFound(_))
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", ".x", "-x", "/x", "a b", "a\nb", &"x".repeat(200)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["py", "library/busybox:1.36", "a@sha256-x", "x+y_z"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn users_resolve_through_the_image_files() {
        let passwd = "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = "root:x:0:\nstaff:x:50:\n";
        assert_eq!(resolve_user("app", passwd, group).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("1000", passwd, group).unwrap(), (1000, 1001));
        assert_eq!(resolve_user("4242", passwd, group).unwrap(), (4242, 0));
        assert_eq!(
            resolve_user("app:staff", passwd, group).unwrap(),
            (1000, 50)
        );
        assert_eq!(resolve_user("7:8", "", "").unwrap(), (7, 8));
        assert!(resolve_user("nobody", passwd, group).is_err());
        assert!(resolve_user("app:wheel", passwd, group).is_err());
    }
}

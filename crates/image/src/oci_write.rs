//! Writes small image archives: what tests (ours and downstream) use to make images without
//! a registry or Docker, including hostile ones.
//!
//! [`Layer`] collects tar entries, with raw helpers that put anything in a header (paths
//! with `..`, absurd sizes, device nodes, sparse headers); [`write_docker_archive`] and
//! [`write_oci_layout`] wrap layers and a config into the two archive formats
//! [`crate::oci::OciArchive`] reads.

use std::io::{self, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A layer under construction: an uncompressed tar stream.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Layer")
    }
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// Puts `name` into the header's name field as is (no checks, at most 100 bytes).
fn raw_name(h: &mut tar::Header, name: &str) -> io::Result<()> {
    let field = &mut h.as_old_mut().name;
    if name.len() > field.len() {
        return Err(io::Error::other("name longer than 100 bytes"));
    }
    field.fill(0);
    field[..name.len()].copy_from_slice(name.as_bytes());
    Ok(())
}

fn raw_link(h: &mut tar::Header, link: &str) -> io::Result<()> {
    let field = &mut h.as_old_mut().linkname;
    if link.len() > field.len() {
        return Err(io::Error::other("link name longer than 100 bytes"));
    }
    field.fill(0);
    field[..link.len()].copy_from_slice(link.as_bytes());
    Ok(())
}

impl Layer {
    /// An empty layer.
    pub fn new() -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn append(&mut self, mut h: tar::Header, name: &str, data: &[u8]) -> io::Result<&mut Self> {
        raw_name(&mut h, name)?;
        h.set_cksum();
        self.builder.append(&h, data)?;
        Ok(self)
    }

    /// A directory.
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<&mut Self> {
        self.append(header(tar::EntryType::Directory, mode, 0), name, &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<&mut Self> {
        self.append(
            header(tar::EntryType::Regular, mode, data.len() as u64),
            name,
            data,
        )
    }

    /// A regular file owned by `uid`:`gid`.
    pub fn file_owned(
        &mut self,
        name: &str,
        mode: u32,
        uid: u64,
        gid: u64,
        data: &[u8],
    ) -> io::Result<&mut Self> {
        let mut h = header(tar::EntryType::Regular, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.append(h, name, data)
    }

    /// A symlink to `target` (any target: relative, absolute, dangling).
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<&mut Self> {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        raw_link(&mut h, target)?;
        self.append(h, name, &[])
    }

    /// A hard link to `target` (a path in the archive).
    pub fn hard_link(&mut self, name: &str, target: &str) -> io::Result<&mut Self> {
        let mut h = header(tar::EntryType::Link, 0o644, 0);
        raw_link(&mut h, target)?;
        self.append(h, name, &[])
    }

    /// A character device node.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> io::Result<&mut Self> {
        let mut h = header(tar::EntryType::Char, 0o666, 0);
        h.set_device_major(major)?;
        h.set_device_minor(minor)?;
        self.append(h, name, &[])
    }

    /// A whiteout of `name` in `dir` (`dir/.wh.name`).
    pub fn whiteout(&mut self, dir: &str, name: &str) -> io::Result<&mut Self> {
        let path = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{}/.wh.{name}", dir.trim_end_matches('/'))
        };
        self.file(&path, 0o644, &[])
    }

    /// Marks `dir` opaque (`dir/.wh..wh..opq`).
    pub fn opaque(&mut self, dir: &str) -> io::Result<&mut Self> {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            0o644,
            &[],
        )
    }

    /// A regular-file header claiming `claimed` bytes followed by only `data`: a lie about
    /// its size (the archive ends early).
    pub fn lying_file(&mut self, name: &str, claimed: u64, data: &[u8]) -> io::Result<&mut Self> {
        let mut h = header(tar::EntryType::Regular, 0o644, claimed);
        raw_name(&mut h, name)?;
        h.set_cksum();
        self.builder.get_mut().extend_from_slice(h.as_bytes());
        self.builder.get_mut().extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.builder.get_mut().extend(std::iter::repeat_n(0u8, pad));
        Ok(self)
    }

    /// A GNU sparse file whose real size is `real_size` with one 512-byte data block at its
    /// end: a few hundred bytes in the archive that claim `real_size` on disk.
    pub fn sparse_file(&mut self, name: &str, real_size: u64) -> io::Result<&mut Self> {
        let mut h = header(tar::EntryType::GNUSparse, 0o644, 512);
        if let Some(gnu) = h.as_gnu_mut() {
            gnu.sparse[0].offset = octal12(real_size.saturating_sub(512));
            gnu.sparse[0].numbytes = octal12(512);
            gnu.realsize = octal12(real_size);
        }
        self.append(h, name, &[0x55u8; 512])
    }

    /// The tar bytes.
    pub fn finish(self) -> io::Result<Vec<u8>> {
        self.builder.into_inner()
    }
}

fn octal12(v: u64) -> [u8; 12] {
    let s = format!("{v:011o}");
    let mut out = [0u8; 12];
    out[..11].copy_from_slice(&s.as_bytes()[s.len() - 11..]);
    out
}

fn sha256_hex(data: &[u8]) -> String {
    crate::manifest::hex(&Sha256::digest(data))
}

fn add_file(outer: &mut tar::Builder<impl Write>, name: &str, data: &[u8]) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_path(name)?;
    h.set_cksum();
    outer.append(&h, data)
}

/// An image config (`architecture`, `os`, and the given `config` object, e.g.
/// `{"Env": [...], "WorkingDir": "/app", "User": "app"}`).
pub fn config_json(architecture: &str, config: &serde_json::Value) -> Vec<u8> {
    let doc = serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    doc.to_string().into_bytes()
}

/// Writes a `docker save`-style archive: `manifest.json`, the config, and each layer as
/// `<n>/layer.tar` (gzip-compressed when `gzip`).
pub fn write_docker_archive(
    path: &Path,
    tag: Option<&str>,
    config: &[u8],
    layers: &[Vec<u8>],
    gzip: bool,
) -> io::Result<()> {
    let mut outer = tar::Builder::new(std::fs::File::create(path)?);
    let config_name = format!("{}.json", sha256_hex(config));
    add_file(&mut outer, &config_name, config)?;
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        let data = if gzip { gzip_bytes(l)? } else { l.clone() };
        add_file(&mut outer, &name, &data)?;
        names.push(name);
    }
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": tag.map(|t| vec![t]).unwrap_or_default(),
        "Layers": names,
    }]);
    add_file(&mut outer, "manifest.json", manifest.to_string().as_bytes())?;
    outer.into_inner()?.sync_all()
}

/// Writes an OCI image layout tar: `oci-layout`, `index.json`, `blobs/sha256/*` (layers
/// gzip-compressed), with `ref_name` as the `org.opencontainers.image.ref.name` annotation.
pub fn write_oci_layout(
    path: &Path,
    ref_name: Option<&str>,
    config: &[u8],
    layers: &[Vec<u8>],
) -> io::Result<()> {
    let mut outer = tar::Builder::new(std::fs::File::create(path)?);
    add_file(
        &mut outer,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut layer_descs = Vec::new();
    for l in layers {
        let gz = gzip_bytes(l)?;
        let d = sha256_hex(&gz);
        add_file(&mut outer, &format!("blobs/sha256/{d}"), &gz)?;
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{d}"),
            "size": gz.len(),
        }));
    }
    let cd = sha256_hex(config);
    add_file(&mut outer, &format!("blobs/sha256/{cd}"), config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": format!("sha256:{cd}"), "size": config.len()},
        "layers": layer_descs,
    })
    .to_string()
    .into_bytes();
    let md = sha256_hex(&manifest);
    add_file(&mut outer, &format!("blobs/sha256/{md}"), &manifest)?;
    let mut desc = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{md}"),
        "size": manifest.len(),
    });
    if let Some(r) = ref_name {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": r});
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    add_file(&mut outer, "index.json", index.to_string().as_bytes())?;
    outer.into_inner()?.sync_all()
}

fn gzip_bytes(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data)?;
    enc.finish()
}

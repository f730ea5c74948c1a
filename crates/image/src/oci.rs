//! Reads OCI image archives: `docker save` / `podman save` output (a `manifest.json` naming
//! a config and layer files) and OCI image layout tars (`index.json` and `blobs/sha256/`).
//!
//! The outer archive is indexed once (name → offset and size); blobs are then read in place
//! with `Seek`, so nothing is unpacked to disk but the layers' own contents. A gzip-compressed
//! outer archive is decompressed into a temporary file first. Layers may be plain tar,
//! gzip or zstd (detected by their magic bytes, whatever the media type says). OCI blobs are
//! checked against their sha256 digest before use. JSON documents are bounded in size
//! ([`MAX_JSON_BYTES`]), and so is the number of outer entries ([`MAX_OUTER_ENTRIES`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Largest `manifest.json`, `index.json`, manifest or config accepted.
pub const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;
/// Most entries accepted in the outer archive.
pub const MAX_OUTER_ENTRIES: usize = 100_000;
/// Most layers accepted.
pub const MAX_LAYERS: usize = 512;

/// Why an archive cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OciError {
    /// Reading the file failed.
    #[error("cannot read {0}")]
    Io(String, #[source] io::Error),
    /// Not a tar archive, or a broken one.
    #[error("not a readable tar archive")]
    Tar(#[source] io::Error),
    /// Neither `manifest.json` nor `index.json` at the top.
    #[error(
        "neither manifest.json (docker save) nor index.json (OCI layout) in the archive: \
         is it an image archive?"
    )]
    NotAnImage,
    /// A JSON document is malformed or missing a field.
    #[error("bad {0}")]
    Json(String, #[source] serde_json::Error),
    /// A file the manifest names is not in the archive.
    #[error("{0} is named by the manifest but not in the archive")]
    MissingBlob(String),
    /// A blob does not match its digest.
    #[error("blob {0} does not match its digest")]
    Digest(String),
    /// Something else about the contents is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// Where one file of the outer archive sits.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

/// The parts of an image's config vmcp uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[non_exhaustive]
pub struct RunDefaults {
    /// `KEY=VALUE` environment.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    /// Entrypoint (informational).
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default command (informational).
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct ImageConfig {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    config: Option<RunDefaults>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct OciManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// An opened image archive.
#[derive(Debug)]
pub struct OciArchive {
    file: File,
    /// Keeps a decompressed copy alive.
    _tmp: Option<tempfile::NamedTempFile>,
    /// Name from the archive (`RepoTags` or the `org.opencontainers.image.ref.name`
    /// annotation), if any.
    pub name: Option<String>,
    /// Image architecture as the config names it (`amd64`, `arm64`).
    pub architecture: Option<String>,
    /// Env, WorkingDir, User, ...
    pub defaults: RunDefaults,
    layers: Vec<(String, Span, Option<String>)>,
}

fn is_gzip(file: &mut File) -> io::Result<bool> {
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(n == 2 && magic == [0x1f, 0x8b])
}

impl OciArchive {
    /// Opens and indexes `path`; `guest_arch` is the Debian/OCI architecture name wanted
    /// when an OCI index lists several platforms.
    pub fn open(path: &Path, guest_arch: &str) -> Result<OciArchive, OciError> {
        let io_err = |e| OciError::Io(path.display().to_string(), e);
        let mut file = File::open(path).map_err(io_err)?;
        let mut tmp = None;
        if is_gzip(&mut file).map_err(io_err)? {
            let mut t = tempfile::NamedTempFile::new().map_err(io_err)?;
            io::copy(
                &mut flate2::read::GzDecoder::new(BufReader::new(&file)),
                &mut t,
            )
            .map_err(OciError::Tar)?;
            file = t.reopen().map_err(io_err)?;
            tmp = Some(t);
        }
        let index = index_outer(&mut file)?;
        let mut me = OciArchive {
            file,
            _tmp: tmp,
            name: None,
            architecture: None,
            defaults: RunDefaults::default(),
            layers: Vec::new(),
        };
        if let Some(span) = index.get("manifest.json") {
            let raw = me.read_json_bytes("manifest.json", *span)?;
            let manifests: Vec<DockerManifest> = serde_json::from_slice(&raw)
                .map_err(|e| OciError::Json("manifest.json".into(), e))?;
            let Some(m) = manifests.into_iter().next() else {
                return Err(OciError::Invalid("manifest.json lists no image".into()));
            };
            let config_span = lookup(&index, &m.config)?;
            me.read_config(&m.config, config_span, None)?;
            me.name = m.repo_tags.and_then(|t| t.into_iter().next());
            for layer in &m.layers {
                let span = lookup(&index, layer)?;
                // docker save names layers by path; OCI-layout-style paths carry a digest.
                let digest = layer
                    .strip_prefix("blobs/sha256/")
                    .map(|h| format!("sha256:{h}"));
                me.layers.push((layer.clone(), span, digest));
            }
        } else if let Some(span) = index.get("index.json") {
            let raw = me.read_json_bytes("index.json", *span)?;
            let idx: Index =
                serde_json::from_slice(&raw).map_err(|e| OciError::Json("index.json".into(), e))?;
            let mut desc = pick(idx.manifests, guest_arch)?;
            // An index may point at another index (multi-platform image).
            for _ in 0..4 {
                let ann_name = desc
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned());
                if ann_name.is_some() && me.name.is_none() {
                    me.name = ann_name;
                }
                let (bpath, bspan) = blob(&index, &desc.digest)?;
                let raw = me.read_json_bytes(&bpath, bspan)?;
                me.check_digest(&desc.digest, &raw)?;
                if desc.media_type.contains("index") || desc.media_type.contains("manifest.list") {
                    let idx: Index =
                        serde_json::from_slice(&raw).map_err(|e| OciError::Json(bpath, e))?;
                    desc = pick(idx.manifests, guest_arch)?;
                    continue;
                }
                let m: OciManifest =
                    serde_json::from_slice(&raw).map_err(|e| OciError::Json(bpath, e))?;
                let (cpath, cspan) = blob(&index, &m.config.digest)?;
                me.read_config(&cpath, cspan, Some(&m.config.digest))?;
                for l in &m.layers {
                    let (lpath, lspan) = blob(&index, &l.digest)?;
                    me.layers.push((lpath, lspan, Some(l.digest.clone())));
                }
                break;
            }
            if me.layers.is_empty() && me.architecture.is_none() {
                return Err(OciError::Invalid(
                    "index.json nests more than 4 indexes deep".into(),
                ));
            }
        } else {
            return Err(OciError::NotAnImage);
        }
        if me.layers.len() > MAX_LAYERS {
            return Err(OciError::Invalid(format!(
                "{} layers (at most {MAX_LAYERS})",
                me.layers.len()
            )));
        }
        Ok(me)
    }

    fn read_json_bytes(&mut self, what: &str, span: Span) -> Result<Vec<u8>, OciError> {
        if span.size > MAX_JSON_BYTES {
            return Err(OciError::Invalid(format!(
                "{what} is {} bytes (at most {MAX_JSON_BYTES})",
                span.size
            )));
        }
        let mut v = Vec::new();
        self.section(span)?
            .read_to_end(&mut v)
            .map_err(|e| OciError::Io(what.to_string(), e))?;
        Ok(v)
    }

    fn check_digest(&self, digest: &str, data: &[u8]) -> Result<(), OciError> {
        let want = digest.strip_prefix("sha256:").unwrap_or(digest);
        if crate::manifest::hex(&Sha256::digest(data)) == want {
            Ok(())
        } else {
            Err(OciError::Digest(digest.to_string()))
        }
    }

    fn read_config(
        &mut self,
        path: &str,
        span: Span,
        digest: Option<&str>,
    ) -> Result<(), OciError> {
        let raw = self.read_json_bytes(path, span)?;
        if let Some(d) = digest {
            self.check_digest(d, &raw)?;
        }
        let cfg: ImageConfig =
            serde_json::from_slice(&raw).map_err(|e| OciError::Json(path.to_string(), e))?;
        self.architecture = cfg.architecture;
        self.defaults = cfg.config.unwrap_or_default();
        Ok(())
    }

    fn section(&mut self, span: Span) -> Result<io::Take<&mut File>, OciError> {
        self.file
            .seek(SeekFrom::Start(span.offset))
            .map_err(|e| OciError::Io("the archive".into(), e))?;
        Ok((&mut self.file).take(span.size))
    }

    /// Number of layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Compressed size of layer `i`.
    pub fn layer_size(&self, i: usize) -> u64 {
        self.layers.get(i).map_or(0, |l| l.1.size)
    }

    /// Layer `i` as an uncompressed tar stream (its digest checked first when known).
    pub fn layer(&mut self, i: usize) -> Result<Box<dyn Read + '_>, OciError> {
        let Some((name, span, digest)) = self.layers.get(i).cloned() else {
            return Err(OciError::Invalid(format!("no layer {i}")));
        };
        if let Some(d) = &digest {
            let mut h = Sha256::new();
            io::copy(&mut self.section(span)?, &mut HashWriter(&mut h))
                .map_err(|e| OciError::Io(name.clone(), e))?;
            let want = d.strip_prefix("sha256:").unwrap_or(d);
            if crate::manifest::hex(&h.finalize()) != want {
                return Err(OciError::Digest(d.clone()));
            }
        }
        let mut magic = [0u8; 4];
        let n = self
            .section(span)?
            .read(&mut magic)
            .map_err(|e| OciError::Io(name.clone(), e))?;
        let raw = BufReader::new(self.section(span)?);
        Ok(if n >= 2 && magic[..2] == [0x1f, 0x8b] {
            Box::new(flate2::read::GzDecoder::new(raw))
        } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            Box::new(
                ruzstd::decoding::StreamingDecoder::new(raw)
                    .map_err(|e| OciError::Invalid(format!("layer {name}: {e}")))?,
            )
        } else {
            Box::new(raw)
        })
    }
}

struct HashWriter<'a>(&'a mut Sha256);

impl io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pick(manifests: Vec<Descriptor>, arch: &str) -> Result<Descriptor, OciError> {
    let n = manifests.len();
    let mut fallback = None;
    for d in manifests {
        match &d.platform {
            Some(p) if p.architecture == arch => return Ok(d),
            // Attestation manifests of buildx carry platform "unknown".
            Some(p) if p.architecture == "unknown" => {}
            None if fallback.is_none() => fallback = Some(d),
            _ if n == 1 => fallback = Some(d),
            _ => {}
        }
    }
    fallback.ok_or_else(|| {
        OciError::Invalid(format!(
            "the index has no manifest for the {arch} architecture"
        ))
    })
}

fn lookup(index: &HashMap<String, Span>, name: &str) -> Result<Span, OciError> {
    let clean = name.trim_start_matches("./");
    index
        .get(clean)
        .copied()
        .ok_or_else(|| OciError::MissingBlob(name.to_string()))
}

fn blob(index: &HashMap<String, Span>, digest: &str) -> Result<(String, Span), OciError> {
    let Some((alg, hex)) = digest.split_once(':') else {
        return Err(OciError::Invalid(format!("bad digest {digest:?}")));
    };
    if alg != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(OciError::Invalid(format!(
            "unsupported digest {digest:?} (sha256 only)"
        )));
    }
    let path = format!("blobs/sha256/{hex}");
    let span = lookup(index, &path)?;
    Ok((path, span))
}

/// Name → span of every regular file of the outer archive.
fn index_outer(file: &mut File) -> Result<HashMap<String, Span>, OciError> {
    let mut out = HashMap::new();
    let mut archive = tar::Archive::new(BufReader::new(&mut *file));
    // Raw mode: long-name and PAX records are not read into memory (image archives use
    // short names: `blobs/sha256/<hex>`, `<hex>/layer.tar`).
    for entry in archive
        .entries_with_seek()
        .map_err(OciError::Tar)?
        .raw(true)
    {
        let entry = entry.map_err(OciError::Tar)?;
        if out.len() >= MAX_OUTER_ENTRIES {
            return Err(OciError::Invalid(format!(
                "more than {MAX_OUTER_ENTRIES} files in the archive"
            )));
        }
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name = name.trim_start_matches("./").to_string();
        out.insert(
            name,
            Span {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
        );
    }
    file.seek(SeekFrom::Start(0)).map_err(OciError::Tar)?;
    Ok(out)
}

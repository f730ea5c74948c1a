//! Assembling kernel + initramfs into the cache.
//!
//! Cache layout (`<cache>` is [`default_cache_dir`] unless given):
//!
//! ```text
//! <cache>/downloads/<package>_<version>_<arch>.deb       verified inputs
//! <cache>/inputs/<arch>-<16 hex>.cpio                     files taken out of them (reused)
//! <cache>/images/<arch>-<16 hex>/vmlinuz                  kernel, as the VMM loads it
//! <cache>/images/<arch>-<16 hex>/initrd.cpio              initramfs (newc, uncompressed)
//! <cache>/images/<arch>-<16 hex>/manifest.txt             what went in
//! ```
//!
//! The directory name hashes every pinned input and the agent binary, so a rebuilt agent or
//! a new manifest gets a new image and old ones stay valid. An image is built in a temporary
//! directory next to its final place and renamed into place, so readers never see a half
//! image and concurrent builders do not clash. The initramfs is not compressed: decompressing
//! it under TCG costs more than reading the extra megabytes.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use crate::agent_bin::{find_agent, AgentBinError};
use crate::cpio::{self, CpioError, Entry};
use crate::deb::{self, DebError};
use crate::fetch::{ensure_deb, sha256_bytes, FetchError};
use crate::manifest::{busybox_applets, inputs, Arch, ArchInputs, KernelFormat, ManifestError};

/// Where `/init` finds the modules to load, one absolute path per line.
pub const MODULES_LIST: &str = "etc/vmcp/modules";

/// Errors building or finding an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// No cache directory could be determined.
    #[error("no cache directory: set VMCP_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// The architecture has no pinned inputs.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The agent binary was not found.
    #[error(transparent)]
    Agent(#[from] AgentBinError),
    /// A package could not be fetched or verified.
    #[error(transparent)]
    Fetch(Box<FetchError>),
    /// A package could not be read.
    #[error(transparent)]
    Deb(#[from] DebError),
    /// A needed file is not in its package.
    #[error("{file} is not in {package}: the manifest does not match the package")]
    Missing {
        /// File.
        file: String,
        /// Package.
        package: String,
    },
    /// The module list is in the wrong order.
    #[error("module {module} needs {dependency}, which is neither built into the kernel nor loaded before it: fix the module order in the manifest")]
    ModuleOrder {
        /// Module.
        module: String,
        /// Missing dependency.
        dependency: String,
    },
    /// A kernel file could not be decompressed.
    #[error("cannot decompress {0}: {1}")]
    Decompress(String, String),
    /// Writing the initramfs failed.
    #[error("cannot write the initramfs")]
    Cpio(#[from] CpioError),
    /// A cache file could not be read or written.
    #[error("cannot access {0}")]
    Io(String, #[source] io::Error),
}

impl From<FetchError> for ImageError {
    fn from(e: FetchError) -> Self {
        ImageError::Fetch(Box::new(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |e| ImageError::Io(path.display().to_string(), e)
}

/// The files of a built image.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImagePaths {
    /// Guest architecture.
    pub arch: Arch,
    /// Directory holding the image.
    pub dir: PathBuf,
    /// Kernel to boot.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// `uname -r` of the kernel.
    pub kernel_release: String,
}

/// What to build and where.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BuildOptions {
    /// Guest architecture.
    pub arch: Arch,
    /// Cache directory; [`default_cache_dir`] when `None`.
    pub cache_dir: Option<PathBuf>,
    /// Agent binary; looked up when `None` (see [`crate::agent_bin`]).
    pub agent: Option<PathBuf>,
    /// Rebuild even if the image exists.
    pub force: bool,
}

impl BuildOptions {
    /// Defaults for `arch`.
    pub fn new(arch: Arch) -> Self {
        BuildOptions {
            arch,
            cache_dir: None,
            agent: None,
            force: false,
        }
    }
}

/// The cache directory: `$VMCP_CACHE_DIR`, else `$XDG_CACHE_HOME/vmcp`, else
/// `$HOME/.cache/vmcp`, else `%LOCALAPPDATA%\vmcp`.
pub fn default_cache_dir() -> Result<PathBuf, ImageError> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("VMCP_CACHE_DIR") {
        return Ok(d);
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Ok(d.join("vmcp"));
    }
    if let Some(d) = var("HOME") {
        return Ok(d.join(".cache").join("vmcp"));
    }
    var("LOCALAPPDATA")
        .map(|d| d.join("vmcp"))
        .ok_or(ImageError::NoCacheDir)
}

struct Plan {
    inputs: &'static ArchInputs,
    agent: Vec<u8>,
    agent_sha256: String,
    cache: PathBuf,
    key: String,
}

impl Plan {
    fn new(opts: &BuildOptions) -> Result<Plan, ImageError> {
        let inputs = inputs(opts.arch)?;
        let agent_path = find_agent(opts.arch, opts.agent.as_deref())?;
        let agent = std::fs::read(&agent_path).map_err(io_err(&agent_path))?;
        let agent_sha256 = sha256_bytes(&agent);
        let cache = match &opts.cache_dir {
            Some(d) => d.clone(),
            None => default_cache_dir()?,
        };
        let key = inputs.image_key(&agent_sha256);
        Ok(Plan {
            inputs,
            agent,
            agent_sha256,
            cache,
            key,
        })
    }

    fn dir(&self) -> PathBuf {
        self.cache.join("images").join(&self.key)
    }

    fn paths(&self) -> ImagePaths {
        let dir = self.dir();
        ImagePaths {
            arch: self.inputs.arch,
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
            dir,
            kernel_release: self.inputs.kernel_release.to_string(),
        }
    }
}

/// Leftovers of interrupted builds younger than this are left alone (a build may be running).
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

pub(crate) fn is_stale(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= STALE_AFTER)
}

/// Removes what a rebuild left behind in `cache`: images of the architectures in `keep` other
/// than the one each `BuildOptions` names (images are keyed by the agent binary, so every
/// rebuilt agent leaves one), unpacked inputs of manifests no longer compiled in, and
/// leftovers of builds interrupted more than an hour ago. Architectures not in `keep`, or whose
/// agent binary cannot be found, are left alone. Returns what was removed.
pub fn prune(cache: &Path, keep: &[BuildOptions]) -> Result<Vec<PathBuf>, ImageError> {
    let mut keep_images = Vec::new();
    let mut prunable_arches = Vec::new();
    for opts in keep {
        let mut opts = opts.clone();
        opts.cache_dir = Some(cache.to_path_buf());
        if let Ok(plan) = Plan::new(&opts) {
            keep_images.push(plan.key);
            prunable_arches.push(opts.arch);
        }
    }
    let keep_inputs: Vec<String> = crate::manifest::INPUTS
        .iter()
        .map(|i| format!("{}.cpio", i.image_key("")))
        .collect();
    let mut removed = Vec::new();
    let mut remove = |path: PathBuf| -> Result<(), ImageError> {
        let res = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        res.map_err(io_err(&path))?;
        removed.push(path);
        Ok(())
    };
    let entries = |dir: &Path| -> Vec<(String, PathBuf)> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (name, path) in entries(&cache.join("images")) {
        let unwanted = if name.starts_with('.') {
            is_stale(&path)
        } else {
            let arch = name
                .rsplit_once('-')
                .and_then(|(a, _)| a.parse::<Arch>().ok());
            arch.is_some_and(|a| prunable_arches.contains(&a)) && !keep_images.contains(&name)
        };
        if unwanted {
            remove(path)?;
        }
    }
    for (name, path) in entries(&cache.join("inputs")) {
        let unwanted = if name.ends_with(".cpio") && !name.starts_with('.') {
            !keep_inputs.contains(&name)
        } else {
            is_stale(&path)
        };
        if unwanted {
            remove(path)?;
        }
    }
    Ok(removed)
}

/// The image for `opts` if it is already built (never builds).
pub fn find_image(opts: &BuildOptions) -> Result<Option<ImagePaths>, ImageError> {
    let plan = Plan::new(opts)?;
    let paths = plan.paths();
    Ok((paths.kernel.is_file() && paths.initrd.is_file()).then_some(paths))
}

/// Builds the image for `arch` with default options unless it exists; `progress` receives
/// one line per step (nothing when the image is already there). This is what `vmcp run`
/// calls.
pub fn ensure_image(arch: Arch, progress: &dyn Fn(&str)) -> Result<ImagePaths, ImageError> {
    build(&BuildOptions::new(arch), progress)
}

/// Builds the image described by `opts` (reusing an existing one unless `force`).
pub fn build(opts: &BuildOptions, progress: &dyn Fn(&str)) -> Result<ImagePaths, ImageError> {
    let plan = Plan::new(opts)?;
    let paths = plan.paths();
    if !opts.force && paths.kernel.is_file() && paths.initrd.is_file() {
        return Ok(paths);
    }
    progress(&format!(
        "building guest image {} in {}",
        plan.key,
        paths.dir.display()
    ));
    let inputs = plan.inputs;
    let unpacked = unpacked_inputs(inputs, &plan.cache, progress)?;

    progress("writing the initramfs");
    let entries = initramfs_entries(inputs, &plan.agent, &unpacked.busybox, &unpacked.modules);
    let images = plan.cache.join("images");
    std::fs::create_dir_all(&images).map_err(io_err(&images))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".build-{}-", plan.key))
        .tempdir_in(&images)
        .map_err(io_err(&images))?;
    let initrd_tmp = tmp.path().join("initrd.cpio");
    let file = std::fs::File::create(&initrd_tmp).map_err(io_err(&initrd_tmp))?;
    cpio::write(&entries, io::BufWriter::new(file))?;
    let kernel_tmp = tmp.path().join("vmlinuz");
    std::fs::write(&kernel_tmp, &unpacked.kernel).map_err(io_err(&kernel_tmp))?;
    let manifest_tmp = tmp.path().join("manifest.txt");
    let manifest = format!("{}agent sha256 {}\n", inputs.canonical(), plan.agent_sha256);
    std::fs::write(&manifest_tmp, manifest).map_err(io_err(&manifest_tmp))?;

    if paths.dir.exists() {
        // --force, or a broken earlier image: move it away first (rename is atomic).
        let old = images.join(format!(".old-{}-{}", plan.key, std::process::id()));
        std::fs::rename(&paths.dir, &old).map_err(io_err(&paths.dir))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    match std::fs::rename(tmp.path(), &paths.dir) {
        Ok(()) => {}
        // Someone else finished the same image first; theirs is identical.
        Err(_) if paths.kernel.is_file() && paths.initrd.is_file() => {}
        Err(e) => return Err(ImageError::Io(paths.dir.display().to_string(), e)),
    }
    progress(&format!(
        "guest image ready: {} and {}",
        paths.kernel.display(),
        paths.initrd.display()
    ));
    Ok(paths)
}

/// The files taken out of the packages: what an image needs besides the agent.
struct Unpacked {
    kernel: Vec<u8>,
    busybox: Vec<u8>,
    modules: Vec<Module>,
}

impl Unpacked {
    fn to_entries(&self) -> Vec<Entry> {
        let mut e = vec![
            Entry::file("vmlinuz", 0o644, self.kernel.clone()),
            Entry::file("busybox", 0o755, self.busybox.clone()),
            Entry::dir("modules", 0o755),
        ];
        for m in &self.modules {
            e.push(Entry::file(
                &format!("modules/{}", m.name),
                0o644,
                m.data.clone(),
            ));
        }
        e
    }

    fn from_entries(entries: Vec<Entry>) -> Option<Unpacked> {
        let (mut kernel, mut busybox, mut modules) = (None, None, Vec::new());
        for e in entries {
            match (e.path.as_str(), e.kind) {
                ("vmlinuz", cpio::Kind::File(d)) => kernel = Some(d),
                ("busybox", cpio::Kind::File(d)) => busybox = Some(d),
                (p, cpio::Kind::File(data)) => modules.push(Module {
                    name: p.strip_prefix("modules/")?.to_string(),
                    data,
                }),
                (_, cpio::Kind::Dir) => {}
                _ => return None,
            }
        }
        Some(Unpacked {
            kernel: kernel?,
            busybox: busybox?,
            modules,
        })
    }
}

/// Unpacks the packages, or reuses `<cache>/inputs/<arch>-<hash>.cpio` from an earlier build
/// (unpacking the kernel package's xz data costs seconds; the agent changes far more often).
fn unpacked_inputs(
    inputs: &ArchInputs,
    cache: &Path,
    progress: &dyn Fn(&str),
) -> Result<Unpacked, ImageError> {
    let dir = cache.join("inputs");
    let saved = dir.join(format!("{}.cpio", inputs.image_key("")));
    if let Ok(bytes) = std::fs::read(&saved) {
        if let Some(u) = cpio::read(&bytes).ok().and_then(Unpacked::from_entries) {
            return Ok(u);
        }
        progress(&format!("{} is damaged; unpacking again", saved.display()));
    }
    let unpacked = unpack(inputs, &cache.join("downloads"), progress)?;
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
    cpio::write(&unpacked.to_entries(), io::BufWriter::new(tmp.as_file()))?;
    tmp.persist(&saved)
        .map_err(|e| ImageError::Io(saved.display().to_string(), e.error))?;
    Ok(unpacked)
}

fn unpack(
    inputs: &ArchInputs,
    downloads: &Path,
    progress: &dyn Fn(&str),
) -> Result<Unpacked, ImageError> {
    let kernel_deb = ensure_deb(&inputs.kernel, downloads, progress)?;
    let busybox_deb = ensure_deb(&inputs.busybox, downloads, progress)?;

    progress(&format!("unpacking {}", inputs.kernel.file_name()));
    let kernel_files = deb::extract(&kernel_deb, &|p| {
        p == inputs.kernel_path || p.starts_with(inputs.modules_dir)
    })?;
    let missing = |file: &str, package: &str| ImageError::Missing {
        file: file.to_string(),
        package: package.to_string(),
    };
    let kernel = kernel_files
        .get(inputs.kernel_path)
        .ok_or_else(|| missing(inputs.kernel_path, inputs.kernel.name))?;
    let kernel = match inputs.kernel_format {
        KernelFormat::BzImage => kernel.data.clone(),
        KernelFormat::Arm64Image => crate::arm64::plain_image(&kernel.data)
            .map_err(|e| ImageError::Decompress(inputs.kernel_path.to_string(), e))?,
        KernelFormat::GzipImage => gunzip(&kernel.data)
            .map_err(|e| ImageError::Decompress(inputs.kernel_path.to_string(), e))?,
    };
    let modules = select_modules(inputs, &kernel_files, progress)?;

    progress(&format!("unpacking {}", inputs.busybox.file_name()));
    let mut busybox_files = deb::extract(&busybox_deb, &|p| p == inputs.busybox_path)?;
    let busybox = busybox_files
        .remove(inputs.busybox_path)
        .ok_or_else(|| missing(inputs.busybox_path, inputs.busybox.name))?
        .data;
    Ok(Unpacked {
        kernel,
        busybox,
        modules,
    })
}

fn gunzip(data: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// A module ready to ship: its name (`virtio_pci`) and uncompressed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Module name as the kernel knows it.
    pub name: String,
    /// The `.ko` contents.
    pub data: Vec<u8>,
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The `depends=` list in a module's `.modinfo` section.
pub fn module_depends(ko: &[u8]) -> Vec<String> {
    let needle = b"depends=";
    let Some(start) = ko.windows(needle.len()).position(|w| w == needle) else {
        return Vec::new();
    };
    let rest = &ko[start + needle.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(|s| s.trim().replace('-', "_"))
        .filter(|s| !s.is_empty())
        .collect()
}

fn select_modules(
    inputs: &ArchInputs,
    files: &std::collections::BTreeMap<String, deb::DebFile>,
    progress: &dyn Fn(&str),
) -> Result<Vec<Module>, ImageError> {
    let builtin: BTreeSet<String> = files
        .get(&format!("{}/modules.builtin", inputs.modules_dir))
        .map(|f| {
            String::from_utf8_lossy(&f.data)
                .lines()
                .map(module_name)
                .collect()
        })
        .unwrap_or_default();
    let mut loaded: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for rel in inputs.modules {
        let name = module_name(rel);
        let path = format!("{}/{rel}", inputs.modules_dir);
        let Some(file) = files.get(&path) else {
            if builtin.contains(&name) {
                progress(&format!("{name} is built into the kernel"));
                continue;
            }
            return Err(ImageError::Missing {
                file: path,
                package: inputs.kernel.name.to_string(),
            });
        };
        let data = if rel.ends_with(".xz") {
            deb::unxz(&file.data).map_err(|e| ImageError::Decompress(path.clone(), e))?
        } else if rel.ends_with(".zst") {
            deb::unzstd(&file.data).map_err(|e| ImageError::Decompress(path.clone(), e))?
        } else {
            file.data.clone()
        };
        for dep in module_depends(&data) {
            if !loaded.contains(&dep) && !builtin.contains(&dep) {
                return Err(ImageError::ModuleOrder {
                    module: name,
                    dependency: dep,
                });
            }
        }
        loaded.insert(name.clone());
        out.push(Module { name, data });
    }
    Ok(out)
}

/// Every entry of the initramfs, in a fixed order.
pub fn initramfs_entries(
    inputs: &ArchInputs,
    agent: &[u8],
    busybox: &[u8],
    modules: &[Module],
) -> Vec<Entry> {
    let mut dirs: BTreeSet<String> = [
        "bin",
        "dev",
        "etc",
        "etc/vmcp",
        "lib",
        "lib/modules",
        "mnt",
        "newroot",
        "proc",
        "root",
        "run",
        "sbin",
        "sys",
        "tmp",
        "usr",
        "usr/bin",
        "usr/sbin",
        "var",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mod_dir = format!("lib/modules/{}", inputs.kernel_release);
    dirs.insert(mod_dir.clone());
    for applet in busybox_applets() {
        if let Some((parent, _)) = applet.rsplit_once('/') {
            dirs.insert(parent.to_string());
        }
    }
    let mut entries: Vec<Entry> = dirs
        .iter()
        .map(|d| Entry::dir(d, if d == "tmp" { 0o1777 } else { 0o755 }))
        .collect();
    entries.push(Entry::char_dev("dev/console", 0o600, 5, 1));
    entries.push(Entry::char_dev("dev/null", 0o666, 1, 3));
    entries.push(Entry::file("init", 0o755, agent.to_vec()));
    entries.push(Entry::file("bin/busybox", 0o755, busybox.to_vec()));
    for applet in busybox_applets() {
        if applet != "bin/busybox" {
            entries.push(Entry::symlink(applet, "/bin/busybox"));
        }
    }
    let mut list = String::new();
    for m in modules {
        let path = format!("{mod_dir}/{}.ko", m.name);
        list.push_str(&format!("/{path}\n"));
        entries.push(Entry::file(&path, 0o644, m.data.clone()));
    }
    entries.push(Entry::file(MODULES_LIST, 0o644, list.into_bytes()));
    entries.push(Entry::file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .to_vec(),
    ));
    entries.push(Entry::file(
        "etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    ));
    entries.push(Entry::file("etc/hostname", 0o644, b"vmcp\n".to_vec()));
    entries
}

#[cfg(test)]
mod tests;

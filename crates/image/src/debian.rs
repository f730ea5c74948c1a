//! Rootfs images from Debian packages (`vmcp image rootfs`), with `mmdebstrap`.
//!
//! `mmdebstrap --variant=apt --include=<packages> <suite> - <sources>` writes a root
//! filesystem as a tar stream on stdout; [`crate::layers::Applier`] applies it like a
//! one-layer image (same bounds and rules as an OCI import) and `mkfs.ext4 -d` writes the ext4
//! file.
//!
//! Language packages (`--pip NAME==VERSION`, `--npm NAME@VERSION`) are installed by mmdebstrap
//! customize hooks, with exact versions only (the cache key names them), fetched by the
//! *host's* `pip`/`npm` so the host's configured package indexes, proxies and CA certificates
//! apply (the new root's own trust store does not know a site's private CA), and without
//! running any package code on the host:
//! - pip: the hook asks the new root's `python3` for its version, glibc and machine, the
//!   host's `pip download --only-binary=:all:` fetches wheels for exactly that interpreter
//!   (never an sdist, whose build would run on the host), and the new root's own pip
//!   (`python3-pip` is added to the packages) installs them offline (`--no-index`).
//! - npm: the host's `npm install --global --prefix <root>/usr/local --ignore-scripts`
//!   (`nodejs` is added to the packages); packages that want install scripts (native addons)
//!   are named in the image's notes, since their scripts did not run.
//!
//! Apt sources: the host's own (`/etc/apt/sources.list` and `sources.list.d/*.list` as they
//! are, `sources.list.d/*.sources` turned into one-line entries), the suite is the host's
//! `VERSION_CODENAME`. No mirror is named here. The cache key hashes the sorted package list,
//! the pip and npm specs, the suite, the sources text and the architecture: the same inputs
//! give the same image without a rebuild (new package versions on the mirror do not cause a
//! rebuild; `--force` does).
//!
//! Package, pip and npm specs are checked against a strict character set before they reach
//! a hook's shell script, and are passed after `--`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::layers::{Applier, Limits};
use crate::rootfs::{io_err, rootfs_root, store_info, RootfsError, RootfsImage, RootfsInfo};
use crate::Arch;

/// Options of [`build_debian`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DebianOptions {
    /// Cache directory (default: [`crate::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Name for the image.
    pub name: Option<String>,
    /// Guest architecture.
    pub arch: Arch,
    /// Debian packages (`name` or `name=version`).
    pub packages: Vec<String>,
    /// pip requirements, pinned: `name==version`, `name[extra]==version`.
    pub pip: Vec<String>,
    /// npm packages installed globally, pinned: `name@1.2.3`, `@scope/name@1.2.3`.
    pub npm: Vec<String>,
    /// Bounds on the tree.
    pub limits: Limits,
    /// Rebuild even when the cache has it.
    pub force: bool,
}

impl DebianOptions {
    /// Options for `packages` on `arch`.
    pub fn new(arch: Arch, packages: Vec<String>) -> Self {
        DebianOptions {
            cache_dir: None,
            name: None,
            arch,
            packages,
            pip: Vec::new(),
            npm: Vec::new(),
            limits: Limits::default(),
            force: false,
        }
    }
}

fn check_spec(kind: &str, spec: &str, extra: &str) -> Result<(), RootfsError> {
    let ok = !spec.is_empty()
        && spec.len() <= 200
        && spec
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || (kind == "npm" && b == b'@'))
        && spec
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    if ok {
        Ok(())
    } else {
        Err(RootfsError::BadName(format!(
            "bad {kind} package {spec:?}: letters, digits and {extra} only"
        )))
    }
}

/// Checks every spec of `opts` (they end up in hook scripts): a strict character set, and
/// pip and npm packages pinned to one exact version.
pub fn check_specs(opts: &DebianOptions) -> Result<(), RootfsError> {
    if opts.packages.is_empty() {
        return Err(RootfsError::BadName(
            "no packages given: pass --packages name[,name...]".into(),
        ));
    }
    for p in &opts.packages {
        check_spec("Debian", p, ".+-=:~")?;
    }
    for p in &opts.pip {
        check_spec("pip", p, "._-=[]!+")?;
        check_pip_pin(p)?;
    }
    for p in &opts.npm {
        check_spec("npm", p, "._-@/+")?;
        check_npm_pin(p)?;
    }
    Ok(())
}

fn not_pinned(kind: &str, spec: &str, form: &str) -> RootfsError {
    RootfsError::BadName(format!(
        "{kind} package {spec:?} is not pinned to one version: write {form} (the image is \
         cached by its exact inputs)"
    ))
}

/// `name==version` or `name[extra,..]==version`, version in PEP 440 characters.
fn check_pip_pin(spec: &str) -> Result<(), RootfsError> {
    let bad = || not_pinned("pip", spec, "NAME==VERSION");
    let (name, version) = spec.split_once("==").ok_or_else(bad)?;
    let base = match name.split_once('[') {
        Some((base, extras)) => {
            let inner = extras.strip_suffix(']').ok_or_else(bad)?;
            if inner.is_empty() || inner.contains(['[', ']']) {
                return Err(bad());
            }
            base
        }
        None => name,
    };
    let name_ok = !base.is_empty()
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let version_ok = version.starts_with(|c: char| c.is_ascii_digit())
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".!+-_".contains(c));
    if name_ok && version_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `name@X.Y.Z` or `@scope/name@X.Y.Z`, with an optional `-prerelease` / `+build`.
fn check_npm_pin(spec: &str) -> Result<(), RootfsError> {
    let bad = || not_pinned("npm", spec, "NAME@X.Y.Z");
    let (name, version) = spec.rsplit_once('@').ok_or_else(bad)?;
    let name_ok = match name.strip_prefix('@') {
        Some(scoped) => scoped
            .split_once('/')
            .is_some_and(|(s, n)| !s.is_empty() && !n.is_empty() && !n.contains('/')),
        None => !name.is_empty() && !name.contains('/'),
    } && !name.ends_with('@');
    let (core, _) = version.split_once(['-', '+']).unwrap_or((version, ""));
    let core_ok = {
        let parts: Vec<&str> = core.split('.').collect();
        parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    if name_ok && core_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Single-quotes `s` for a POSIX shell (specs are already restricted to safe characters;
/// this is a second fence).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The customize hook that installs the pip packages (see the module docs).
fn pip_hook(pip: &Path, specs: &[String]) -> String {
    let specs: Vec<String> = specs.iter().map(|s| sh_quote(s)).collect();
    let specs = specs.join(" ");
    let pip = sh_quote(&pip.display().to_string());
    format!(
        r#"set -eu
exec >&2
root="$1"
info=$(chroot "$root" python3 -c 'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.libc_ver()[1] or "none", platform.machine())')
set -- $info
pyver=$1 libc=$2 mach=$3
case "$libc" in 2.*) ;; *) echo "vmcp: pip: the image's python3 reports no glibc ($libc): cannot pick wheels"; exit 1;; esac
minor=${{libc#2.}}
plats=""
while [ "$minor" -ge 17 ]; do plats="$plats --platform manylinux_2_${{minor}}_$mach"; minor=$((minor - 1)); done
plats="$plats --platform manylinux2014_$mach --platform manylinux2010_$mach --platform manylinux1_$mach"
wheels="$root/tmp/vmcp-wheels"
mkdir -p "$wheels"
echo "vmcp: pip: fetching wheels for CPython $pyver ($mach, glibc $libc) with the host's pip"
{pip} download --disable-pip-version-check --dest "$wheels" --only-binary=:all:   --python-version "$pyver" --implementation cp --abi "cp$(echo "$pyver" | tr -d .)" $plats -- {specs}
echo "vmcp: pip: installing them with the image's pip"
chroot "$root" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 python3 -m pip install --disable-pip-version-check --no-index   --find-links /tmp/vmcp-wheels --no-cache-dir --break-system-packages --root-user-action=ignore -- {specs}
rm -rf "$wheels"
"#
    )
}

/// The customize hook that installs the npm packages (see the module docs).
fn npm_hook(npm: &Path, specs: &[String]) -> String {
    let specs: Vec<String> = specs.iter().map(|s| sh_quote(s)).collect();
    let specs = specs.join(" ");
    let npm = sh_quote(&npm.display().to_string());
    format!(
        r#"set -eu
exec >&2
root="$1"
echo "vmcp: npm: installing with the host's npm into /usr/local (guest node $(chroot "$root" node --version); install scripts are not run)"
{npm} install --global --prefix "$root/usr/local" --ignore-scripts --no-audit --no-fund   --no-update-notifier --loglevel=warn -- {specs}
"#
    )
}

/// npm packages under `<tree>/usr/local/lib/node_modules` that declare install scripts or a
/// native build (`gypfile`), which `--ignore-scripts` skipped. Walks at most `MAX` entries.
fn npm_packages_with_scripts(tree: &Path) -> Vec<String> {
    const MAX: usize = 200_000;
    let mut out = Vec::new();
    let mut seen = 0usize;
    let mut stack = vec![tree.join("usr/local/lib/node_modules")];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            seen += 1;
            if seen > MAX {
                return out;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "package.json" {
                let Ok(raw) = std::fs::read(e.path()) else {
                    continue;
                };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
                    continue;
                };
                let scripts = v.get("scripts");
                let has = ["preinstall", "install", "postinstall"]
                    .iter()
                    .any(|k| scripts.and_then(|s| s.get(k)).is_some())
                    || v.get("gypfile").and_then(serde_json::Value::as_bool) == Some(true);
                if has {
                    if let Some(name) = v.get("name").and_then(|n| n.as_str()) {
                        out.push(name.to_owned());
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn deb_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Aarch64 => "arm64",
    }
}

/// The host's apt sources as one-line entries, and the host's suite.
pub fn host_sources() -> Result<(String, String), RootfsError> {
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let suite = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            RootfsError::Tool(
                "cannot tell this host's Debian suite (no VERSION_CODENAME in /etc/os-release): \
                 `vmcp image rootfs` needs a Debian or Ubuntu host"
                    .into(),
            )
        })?;
    let mut text = String::new();
    let main = Path::new("/etc/apt/sources.list");
    if let Ok(t) = std::fs::read_to_string(main) {
        text.push_str(&one_line_entries(&t));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        let Ok(t) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("list") => text.push_str(&one_line_entries(&t)),
            Some("sources") => text.push_str(&deb822_to_lines(&t)),
            _ => {}
        }
    }
    if text.trim().is_empty() {
        return Err(RootfsError::Tool(
            "this host has no apt sources (/etc/apt/sources.list, sources.list.d): configure \
             apt first"
                .into(),
        ));
    }
    Ok((text, suite))
}

fn one_line_entries(text: &str) -> String {
    let mut out = String::new();
    for l in text.lines().map(str::trim) {
        if l.starts_with("deb ") || l.starts_with("deb\t") {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// deb822 stanzas (`Types`, `URIs`, `Suites`, `Components`, `Signed-By`, `Enabled`) as
/// one-line `deb` entries; `deb-src` and disabled stanzas are dropped.
pub fn deb822_to_lines(text: &str) -> String {
    let mut out = String::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with(' ') || line.starts_with('\t') {
                // A continuation line (an inline key): the field is unusable on one line.
                if let Some(last) = fields.last_mut() {
                    last.1 = String::from("\u{0}");
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let get = |k: &str| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        if get("enabled").eq_ignore_ascii_case("no") {
            continue;
        }
        if !get("types").split_whitespace().any(|t| t == "deb") {
            continue;
        }
        let mut opts = Vec::new();
        let signed = get("signed-by");
        if !signed.is_empty() && !signed.contains('\u{0}') && !signed.contains(' ') {
            opts.push(format!("signed-by={signed}"));
        }
        let arches = get("architectures");
        if !arches.is_empty() {
            opts.push(format!(
                "arch={}",
                arches.split_whitespace().collect::<Vec<_>>().join(",")
            ));
        }
        let opts = if opts.is_empty() {
            String::new()
        } else {
            format!("[{}] ", opts.join(" "))
        };
        let components = get("components");
        for uri in get("uris").split_whitespace() {
            for suite in get("suites").split_whitespace() {
                out.push_str(&format!("deb {opts}{uri} {suite} {components}\n"));
            }
        }
    }
    out
}

/// Builds (or finds in the cache) a rootfs image from Debian packages.
pub fn build_debian(
    opts: &DebianOptions,
    progress: &dyn Fn(&str),
) -> Result<RootfsImage, RootfsError> {
    check_specs(opts)?;
    if let Some(n) = &opts.name {
        crate::rootfs::check_name(n)?;
    }
    let cache = match &opts.cache_dir {
        Some(d) => d.clone(),
        None => crate::default_cache_dir().map_err(|e| RootfsError::Tool(e.to_string()))?,
    };
    let (sources, suite) = host_sources()?;
    let mut packages = opts.packages.clone();
    if !opts.pip.is_empty() {
        packages.push("python3-pip".into());
    }
    if !opts.npm.is_empty() {
        packages.push("nodejs".into());
    }
    packages.sort();
    packages.dedup();
    let mut h = Sha256::new();
    h.update(format!(
        "rootfs-layout {}\ndebian v2\narch {}\nsuite {suite}\npackages {}\npip {}\nnpm {}\nsources\n{sources}",
        crate::rootfs::ROOTFS_LAYOUT_VERSION,
        opts.arch,
        packages.join(","),
        opts.pip.join(","),
        opts.npm.join(","),
    ));
    let key = format!("deb-{}", &crate::manifest::hex(&h.finalize())[..16]);
    let root = rootfs_root(&cache);
    let final_dir = root.join(&key);
    let source = {
        let mut s = format!("debian {suite}: {}", opts.packages.join(","));
        if !opts.pip.is_empty() {
            s.push_str(&format!(" pip: {}", opts.pip.join(",")));
        }
        if !opts.npm.is_empty() {
            s.push_str(&format!(" npm: {}", opts.npm.join(",")));
        }
        s
    };
    if !opts.force {
        if let Ok(img) = crate::rootfs::load(&final_dir) {
            if img.disk.is_file() {
                if let Some(n) = &opts.name {
                    crate::rootfs::set_name(&cache, &key, n)?;
                }
                progress(&format!("{source} is already built as {key}"));
                return crate::rootfs::load(&final_dir);
            }
        }
    }
    let Some(mmdebstrap) = crate::import::find_tool("mmdebstrap") else {
        return Err(RootfsError::Tool(
            "mmdebstrap not found: install it (scripts/install-deps does)".into(),
        ));
    };
    let pip = match opts.pip.is_empty() {
        true => None,
        false => Some(
            ["pip3", "pip"]
                .iter()
                .find_map(|t| crate::import::find_tool(t))
                .ok_or_else(|| {
                    RootfsError::Tool(
                        "--pip needs pip on this host (it fetches the wheels with the host's \
                         package index settings): install python3-pip (scripts/install-deps does)"
                            .into(),
                    )
                })?,
        ),
    };
    let npm = match opts.npm.is_empty() {
        true => None,
        false => Some(crate::import::find_tool("npm").ok_or_else(|| {
            RootfsError::Tool(
                "--npm needs npm on this host (it fetches the packages with the host's registry \
                 settings): install npm (scripts/install-deps does)"
                    .into(),
            )
        })?),
    };
    std::fs::create_dir_all(&root).map_err(io_err(format!("create {}", root.display())))?;
    let build = tempfile::Builder::new()
        .prefix(&format!(".build-{key}-"))
        .tempdir_in(&root)
        .map_err(io_err(format!(
            "create a build directory in {}",
            root.display()
        )))?;
    let sources_file = build.path().join("sources.list");
    std::fs::write(&sources_file, &sources)
        .map_err(io_err(format!("write {}", sources_file.display())))?;
    let tree = build.path().join("tree");
    std::fs::create_dir(&tree).map_err(io_err(format!("create {}", tree.display())))?;

    let mut cmd = Command::new(&mmdebstrap);
    cmd.arg("--variant=apt")
        .arg(format!("--architectures={}", deb_arch(opts.arch)))
        .arg(format!("--include={}", packages.join(",")))
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg("--dpkgopt=path-exclude=/usr/share/man/*")
        .arg("--dpkgopt=path-exclude=/usr/share/info/*");
    // The hooks are script files in the build directory, named through the environment so
    // no path is spliced into mmdebstrap's hook command line.
    if let Some(pip) = &pip {
        let script = build.path().join("pip-hook.sh");
        std::fs::write(&script, pip_hook(pip, &opts.pip))
            .map_err(io_err(format!("write {}", script.display())))?;
        cmd.env("VMCP_PIP_HOOK", &script)
            .arg("--customize-hook=sh \"$VMCP_PIP_HOOK\" \"$1\"");
    }
    if let Some(npm) = &npm {
        let script = build.path().join("npm-hook.sh");
        std::fs::write(&script, npm_hook(npm, &opts.npm))
            .map_err(io_err(format!("write {}", script.display())))?;
        cmd.env("VMCP_NPM_HOOK", &script)
            .arg("--customize-hook=sh \"$VMCP_NPM_HOOK\" \"$1\"");
    }
    cmd.arg("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*.bin")
        .arg(&suite)
        .arg("-")
        .arg(&sources_file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    progress(&format!(
        "building {key} with mmdebstrap ({suite}: {})",
        packages.join(",")
    ));
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("run {}", mmdebstrap.display())))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(RootfsError::Tool(
            "mmdebstrap's output pipes are missing".into(),
        ));
    };
    let as_root = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&tree)
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    };
    let limits = opts.limits;
    let tree2 = tree.clone();
    let applier = std::thread::spawn(move || {
        let mut a = Applier::new(&tree2, limits);
        a.set_owners(as_root);
        let mut r = BufReader::new(stdout);
        let res = a.apply(&mut r).and_then(|()| a.finish());
        if res.is_err() {
            // Drain the pipe so mmdebstrap is not left blocked writing.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
        }
        (a, res)
    });
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let line = line.trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        // The hooks' own lines already say who speaks.
        match line.strip_prefix("vmcp: ") {
            Some(own) => progress(own),
            None => progress(&format!("mmdebstrap: {line}")),
        }
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let status = child
        .wait()
        .map_err(io_err(format!("wait for {}", mmdebstrap.display())))?;
    let (applier, applied) = applier
        .join()
        .map_err(|_| RootfsError::Tool("the tree writer thread panicked".into()))?;
    if !status.success() {
        return Err(RootfsError::Tool(format!(
            "mmdebstrap failed ({status}); its last lines:\n{}",
            tail.join("\n")
        )));
    }
    applied.map_err(|source| RootfsError::Layer {
        layer: 1,
        archive: "mmdebstrap output".into(),
        source,
    })?;
    let mut notes: Vec<String> = Vec::new();
    let skipped = applier.notes().len();
    if skipped > 0 {
        notes.push(format!(
            "{skipped} device nodes and FIFOs of the Debian tree skipped (the guest has devtmpfs)"
        ));
    }
    if !as_root {
        notes.push(
            "built without root: every file is owned by the building user (build as root to \
             keep the packages' owners)"
                .into(),
        );
    }
    if !opts.npm.is_empty() {
        let scripted = npm_packages_with_scripts(&tree);
        if !scripted.is_empty() {
            notes.push(format!(
                "npm packages with install scripts that were not run (native addons are not \
                 built): {}",
                scripted.join(", ")
            ));
        }
    }
    for n in &notes {
        progress(n);
    }
    crate::import::add_mount_points(&tree)?;
    let disk = build.path().join(crate::rootfs::DISK_FILE);
    progress("writing the ext4 image");
    let disk_bytes = crate::import::make_ext4(&tree, &disk)?;
    std::fs::remove_dir_all(&tree).map_err(io_err(format!("remove {}", tree.display())))?;
    let _ = std::fs::remove_file(&sources_file);
    let info = RootfsInfo {
        key: key.clone(),
        names: Vec::new(),
        kind: "debian".into(),
        source,
        arch: opts.arch.to_string(),
        env: vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "HOME=/root".into(),
            "LANG=C.UTF-8".into(),
        ],
        workdir: None,
        user: None,
        uid_gid: None,
        data_bytes: applier.bytes(),
        disk_bytes,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        notes,
    };
    store_info(build.path(), &info)?;
    crate::import::install(build, &final_dir)?;
    if let Some(n) = &opts.name {
        crate::rootfs::set_name(&cache, &key, n)?;
    }
    let img = crate::rootfs::load(&final_dir)?;
    progress(&format!(
        "rootfs image {key} ready: {} ({} MB)",
        img.disk.display(),
        img.info.disk_bytes / 1_000_000
    ));
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_becomes_one_line_entries() {
        let text = "Types: deb deb-src\nURIs: http://mirror.invalid/debian\nSuites: s s-updates\n\
                    Components: main contrib\nSigned-By: /usr/share/keyrings/k.gpg\n\n\
                    # comment\nTypes: deb\nURIs: http://other.invalid/x\nSuites: s\nComponents: main\n\
                    Enabled: no\n\nTypes: deb-src\nURIs: http://src.invalid\nSuites: s\nComponents: main\n";
        assert_eq!(
            deb822_to_lines(text),
            "deb [signed-by=/usr/share/keyrings/k.gpg] http://mirror.invalid/debian s main contrib\n\
             deb [signed-by=/usr/share/keyrings/k.gpg] http://mirror.invalid/debian s-updates main contrib\n"
        );
        // An inline key is dropped rather than broken onto one line.
        let inline = "Types: deb\nURIs: http://m.invalid\nSuites: s\nComponents: main\n\
                      Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n";
        assert_eq!(deb822_to_lines(inline), "deb http://m.invalid s main\n");
    }

    #[test]
    fn specs_that_could_reach_a_shell_are_refused() {
        let mut o = DebianOptions::new(Arch::X86_64, vec!["python3".into(), "g++".into()]);
        o.pip = vec![
            "requests==2.32.3".into(),
            "uvicorn[standard]==0.30.1".into(),
        ];
        o.npm = vec!["@scope/pkg@1.2.3".into(), "typescript@5.6.3-rc.1".into()];
        check_specs(&o).unwrap();
        for bad in ["a;b", "$(x)", "a b", "'", "`x`", "-rf", ""] {
            let mut o2 = o.clone();
            o2.packages = vec![bad.into()];
            assert!(check_specs(&o2).is_err(), "{bad}");
            let mut o3 = o.clone();
            o3.pip = vec![bad.into()];
            assert!(check_specs(&o3).is_err(), "{bad}");
            let mut o4 = o.clone();
            o4.npm = vec![bad.into()];
            assert!(check_specs(&o4).is_err(), "{bad}");
        }
        assert!(check_specs(&DebianOptions::new(Arch::X86_64, vec![])).is_err());
    }

    #[test]
    fn language_packages_must_be_pinned() {
        let mut o = DebianOptions::new(Arch::X86_64, vec!["python3".into()]);
        for good in ["mcp==2.3.0", "a.b_c-d==1!2.0+local.1", "x[y]==1.0rc1"] {
            o.pip = vec![good.into()];
            check_specs(&o).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "mcp",
            "mcp>=2",
            "mcp==",
            "mcp===2.3.0",
            "mcp==2.*",
            "==2.3.0",
            "mcp[==1.0",
            "mcp[]==1.0",
            "mcp~=2.3",
            "mcp!=2.3.0",
        ] {
            o.pip = vec![bad.into()];
            let e = check_specs(&o).unwrap_err().to_string();
            assert!(e.contains("pip package"), "{bad}: {e}");
        }
        o.pip.clear();
        for good in ["typescript@5.6.3", "@scope/pkg@0.0.1", "x@1.2.3+build.5"] {
            o.npm = vec![good.into()];
            check_specs(&o).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "typescript",
            "typescript@5",
            "typescript@latest",
            "typescript@^5.6.3",
            "typescript@~5.6.3",
            "@scope/pkg",
            "@scope@1.2.3",
            "a/b@1.2.3",
            "@/x@1.2.3",
            "x@1.2.3.4",
        ] {
            o.npm = vec![bad.into()];
            let e = check_specs(&o).unwrap_err().to_string();
            assert!(e.contains("npm package"), "{bad}: {e}");
        }
    }

    #[test]
    fn hooks_quote_their_specs_and_pass_them_after_a_double_dash() {
        let pip = pip_hook(Path::new("/usr/bin/pip3"), &["mcp==2.3.0".into()]);
        assert!(pip.contains("--only-binary=:all:"), "{pip}");
        assert!(pip.contains("--no-index"), "{pip}");
        assert!(pip.contains("-- 'mcp==2.3.0'\n"), "{pip}");
        let npm = npm_hook(Path::new("/usr/bin/np m"), &["@s/p@1.0.0".into()]);
        assert!(npm.contains("'/usr/bin/np m' install"), "{npm}");
        assert!(npm.contains("--ignore-scripts"), "{npm}");
        assert!(npm.contains("-- '@s/p@1.0.0'\n"), "{npm}");
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn npm_packages_with_install_scripts_are_found() {
        let t = tempfile::tempdir().unwrap();
        let nm = t.path().join("usr/local/lib/node_modules");
        for (dir, json) in [
            ("plain", r#"{"name":"plain","scripts":{"test":"x"}}"#),
            ("native", r#"{"name":"native","gypfile":true}"#),
            (
                "plain/node_modules/post",
                r#"{"name":"post","scripts":{"postinstall":"x"}}"#,
            ),
            ("broken", "{"),
        ] {
            std::fs::create_dir_all(nm.join(dir)).unwrap();
            std::fs::write(nm.join(dir).join("package.json"), json).unwrap();
        }
        assert_eq!(npm_packages_with_scripts(t.path()), ["native", "post"]);
    }
}

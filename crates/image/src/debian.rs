//! Rootfs images from Debian packages (`vmcp image rootfs`), with `mmdebstrap`.
//!
//! `mmdebstrap --variant=apt --include=<packages> <suite> - <sources>` writes a root
//! filesystem as a tar stream on stdout; [`crate::layers::Applier`] applies it like a
//! one-layer image (same bounds and rules as an OCI import) and `mkfs.ext4 -d` writes the ext4
//! file. Optional `--pip` and `--npm` packages are installed by mmdebstrap customize hooks
//! inside the new root (`python3-pip` / `npm` are added to the packages).
//!
//! Apt sources: the host's own (`/etc/apt/sources.list` and `sources.list.d/*.list` as they
//! are, `sources.list.d/*.sources` turned into one-line entries), the suite is the host's
//! `VERSION_CODENAME`. No mirror is named here. The cache key hashes the sorted package list,
//! the pip and npm specs, the suite, the sources text and the architecture: the same inputs
//! give the same image without a rebuild (new package versions on the mirror do not cause a
//! rebuild; `--force` does).
//!
//! Package, pip and npm specs are checked against a strict character set before they reach
//! a hook's shell command line.

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
    /// pip requirements (`name==version`, `name`).
    pub pip: Vec<String>,
    /// npm packages installed globally (`name@version`, `@scope/name@version`).
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

/// Checks every spec of `opts` (they end up in hook command lines).
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
        check_spec("pip", p, "._-=[],<>!~")?;
    }
    for p in &opts.npm {
        check_spec("npm", p, "._-@/~^")?;
    }
    Ok(())
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
        packages.push("npm".into());
    }
    packages.sort();
    packages.dedup();
    let mut h = Sha256::new();
    h.update(format!(
        "rootfs-layout {}\ndebian v1\narch {}\nsuite {suite}\npackages {}\npip {}\nnpm {}\nsources\n{sources}",
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
    if !opts.pip.is_empty() {
        cmd.arg(format!(
            "--customize-hook=chroot \"$1\" python3 -m pip install --no-cache-dir \
             --break-system-packages --root-user-action=ignore {}",
            opts.pip
                .iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    if !opts.npm.is_empty() {
        cmd.arg(format!(
            "--customize-hook=chroot \"$1\" npm install --global --no-fund --no-audit {}",
            opts.npm
                .iter()
                .map(|p| format!("'{p}'"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
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
        progress(&format!("mmdebstrap: {line}"));
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
        o.pip = vec!["requests==2.32.3".into(), "uvicorn[standard]".into()];
        o.npm = vec!["@scope/pkg@1.2.3".into(), "typescript@5".into()];
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
}

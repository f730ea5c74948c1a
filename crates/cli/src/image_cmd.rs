//! `vmcp image ...`: build the guest image (kernel + initramfs) and show where it is; import,
//! list and remove root filesystem images.

#[cfg(unix)]
#[path = "image_cmd/import_unix.rs"]
pub(crate) mod import;
#[cfg(not(unix))]
#[path = "image_cmd/import_other.rs"]
pub(crate) mod import;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use vmcp_image::{Arch, BuildOptions};

/// Options shared by the `vmcp image` subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct ImageArgs {
    /// Guest architecture (default: the host's).
    #[arg(long, value_parser = parse_arch)]
    arch: Option<Arch>,
    /// Cache directory (default: $XDG_CACHE_HOME/vmcp or ~/.cache/vmcp).
    #[arg(long, env = "VMCP_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Agent binary to install as /init (default: looked up next to vmcp and in the cargo
    /// target directory).
    #[arg(long, env = "VMCP_AGENT")]
    agent: Option<PathBuf>,
}

/// `vmcp image` subcommands.
#[derive(clap::Subcommand)]
pub enum ImageCommand {
    /// Build the guest image (kernel + initramfs) into the cache directory.
    Build {
        #[command(flatten)]
        args: ImageArgs,
        /// Rebuild even if the image is already there.
        #[arg(long)]
        force: bool,
    },
    /// Print the kernel and initramfs paths of the built image (fails if not built).
    Path {
        #[command(flatten)]
        args: ImageArgs,
    },
    /// Remove cached guest images the current agent binaries no longer use (each rebuilt
    /// agent leaves one), rootfs images without a name, and leftovers of interrupted builds.
    /// Other checkouts sharing the cache lose their guest images too; `vmcp run` rebuilds one
    /// in about a second.
    Prune {
        #[command(flatten)]
        args: ImageArgs,
    },
    /// Turn an OCI image archive (`docker save`, `podman save`, or an OCI layout tar) into a
    /// rootfs image for `vmcp run --image`. The same archive again is a cache hit.
    Import {
        /// The archive (plain or gzip-compressed tar).
        archive: PathBuf,
        /// Name for the image (default: the archive's tag, if any).
        #[arg(long)]
        name: Option<String>,
        /// Refuse to write more than this many bytes of file data.
        #[arg(long, value_name = "BYTES", default_value_t = vmcp_image::rootfs::Limits::default().max_bytes)]
        max_bytes: u64,
        /// Import again even if the cache has this archive.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        args: RootfsArgs,
    },
    /// Build a rootfs image from Debian packages with mmdebstrap, using this host's apt
    /// sources and suite. The same inputs again are a cache hit. Takes minutes.
    Rootfs {
        /// Debian packages (comma-separated), e.g. python3,nodejs,git.
        #[arg(long, value_delimiter = ',', required = true, value_name = "PKG,...")]
        packages: Vec<String>,
        /// Name for the image.
        #[arg(long)]
        name: Option<String>,
        /// pip packages to install into it (comma-separated), e.g. requests==2.32.3.
        #[arg(long, value_delimiter = ',', value_name = "PKG==VER,...")]
        pip: Vec<String>,
        /// npm packages to install globally (comma-separated), e.g. typescript@5.6.3.
        #[arg(long, value_delimiter = ',', value_name = "PKG@VER,...")]
        npm: Vec<String>,
        /// Build again even if the cache has it.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        args: RootfsArgs,
    },
    /// List the rootfs images in the cache.
    List {
        #[command(flatten)]
        args: RootfsArgs,
    },
    /// Remove a rootfs image (by name or key).
    Rm {
        /// Names or keys.
        #[arg(required = true)]
        images: Vec<String>,
        #[command(flatten)]
        args: RootfsArgs,
    },
}

/// Options of the rootfs image subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct RootfsArgs {
    /// Guest architecture (default: the host's).
    #[arg(long, value_parser = parse_arch)]
    arch: Option<Arch>,
    /// Cache directory (default: $XDG_CACHE_HOME/vmcp or ~/.cache/vmcp).
    #[arg(long, env = "VMCP_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

impl RootfsArgs {
    fn cache(&self) -> anyhow::Result<PathBuf> {
        match &self.cache_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(vmcp_image::default_cache_dir()?),
        }
    }
    fn arch(&self) -> anyhow::Result<Arch> {
        match self.arch.or_else(Arch::host) {
            Some(a) => Ok(a),
            None => anyhow::bail!("this host's architecture is not a guest architecture: pass --arch x86_64 or --arch aarch64"),
        }
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 10_000_000 {
        format!("{} MB", bytes / 1_000_000)
    } else {
        format!("{} kB", bytes.div_ceil(1000))
    }
}

fn rootfs_line(img: &vmcp_image::rootfs::RootfsImage) -> String {
    let names = if img.info.names.is_empty() {
        "-".to_string()
    } else {
        img.info.names.join(",")
    };
    format!(
        "{names}\t{}\t{}\t{}\t{}\t{}",
        img.info.key,
        img.info.kind,
        img.info.arch,
        human(img.info.disk_bytes),
        img.info.source
    )
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
        .map_err(|e: vmcp_image::UnknownArch| e.to_string())
}

fn options(args: &ImageArgs) -> anyhow::Result<BuildOptions> {
    let arch = match args.arch.or_else(Arch::host) {
        Some(a) => a,
        None => anyhow::bail!("this host's architecture is not a guest architecture: pass --arch x86_64 or --arch aarch64"),
    };
    let mut opts = BuildOptions::new(arch);
    opts.cache_dir = args.cache_dir.clone();
    opts.agent = args.agent.clone();
    Ok(opts)
}

fn image_lines(paths: &vmcp_image::ImagePaths) -> [String; 2] {
    [
        format!("kernel {}", paths.kernel.display()),
        format!("initrd {}", paths.initrd.display()),
    ]
}

/// Prints lines to stdout; a reader that went away (`vmcp image path | head -1`) is not an
/// error.
fn print_lines(lines: &[String]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for line in lines {
        match writeln!(out, "{line}") {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(anyhow::Error::new(e).context("cannot write to stdout")),
        }
    }
    Ok(())
}

/// Runs a `vmcp image` subcommand.
pub async fn run(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCommand::Build { args, force } => {
            let mut opts = options(&args)?;
            opts.force = force;
            let paths = tokio::task::spawn_blocking(move || {
                vmcp_image::build(&opts, &|line| eprintln!("vmcp: {line}"))
            })
            .await
            .context("the image build task failed")?
            .context("cannot build the guest image")?;
            print_lines(&image_lines(&paths))?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Prune { args } => {
            let chosen = options(&args)?;
            let cache = match &chosen.cache_dir {
                Some(d) => d.clone(),
                None => vmcp_image::default_cache_dir()?,
            };
            // Every architecture with pinned inputs keeps the image of its current agent;
            // --agent names the agent of --arch (or the host's).
            let keep: Vec<BuildOptions> = vmcp_image::manifest::INPUTS
                .iter()
                .map(|row| {
                    let mut o = BuildOptions::new(row.arch);
                    if row.arch == chosen.arch {
                        o.agent = chosen.agent.clone();
                    }
                    o
                })
                .collect();
            let mut removed =
                vmcp_image::prune(&cache, &keep).context("cannot prune the image cache")?;
            removed.extend(
                vmcp_image::rootfs::prune(&cache).context("cannot prune the rootfs images")?,
            );
            let lines: Vec<String> = removed
                .iter()
                .map(|p| format!("removed {}", p.display()))
                .collect();
            print_lines(&lines)?;
            eprintln!("vmcp: {} cache entries removed", removed.len());
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Import {
            archive,
            name,
            max_bytes,
            force,
            args,
        } => {
            let mut opts = vmcp_image::rootfs::ImportOptions::new(args.arch()?);
            opts.cache_dir = Some(args.cache()?);
            opts.name = name;
            opts.limits.max_bytes = max_bytes;
            opts.force = force;
            let img = tokio::task::spawn_blocking(move || import::import(&archive, &opts))
                .await
                .context("the import task failed")?
                .context("cannot import the image")?;
            print_lines(&[rootfs_line(&img)])?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Rootfs {
            packages,
            name,
            pip,
            npm,
            force,
            args,
        } => {
            let mut opts = import::DebianOptions::new(args.arch()?, packages);
            opts.cache_dir = Some(args.cache()?);
            opts.name = name;
            opts.pip = pip;
            opts.npm = npm;
            opts.force = force;
            let img = tokio::task::spawn_blocking(move || import::build_debian(&opts))
                .await
                .context("the build task failed")?
                .context("cannot build the rootfs image")?;
            print_lines(&[rootfs_line(&img)])?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::List { args } => {
            let lines: Vec<String> = vmcp_image::rootfs::list(&args.cache()?)
                .iter()
                .map(rootfs_line)
                .collect();
            print_lines(&lines)?;
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Rm { images, args } => {
            let cache = args.cache()?;
            for what in &images {
                let dir = vmcp_image::rootfs::remove(&cache, what)
                    .with_context(|| format!("cannot remove {what}"))?;
                print_lines(&[format!("removed {}", dir.display())])?;
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Path { args } => {
            let opts = options(&args)?;
            match vmcp_image::find_image(&opts).context("cannot look up the guest image")? {
                Some(paths) => {
                    print_lines(&image_lines(&paths))?;
                    Ok(ExitCode::SUCCESS)
                }
                None => anyhow::bail!(
                    "the guest image for {} is not built yet: run `vmcp image build`",
                    opts.arch
                ),
            }
        }
    }
}

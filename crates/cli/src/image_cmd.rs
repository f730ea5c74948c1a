//! `vmcp image ...`: build the guest image and show where it is.

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
    /// Remove cached images the current agent binaries no longer use (each rebuilt agent
    /// leaves one) and leftovers of interrupted builds. Other checkouts sharing the cache
    /// lose their images too; `vmcp run` rebuilds one in about a second.
    Prune {
        #[command(flatten)]
        args: ImageArgs,
    },
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
            let removed =
                vmcp_image::prune(&cache, &keep).context("cannot prune the image cache")?;
            let lines: Vec<String> = removed
                .iter()
                .map(|p| format!("removed {}", p.display()))
                .collect();
            print_lines(&lines)?;
            eprintln!("vmcp: {} cache entries removed", removed.len());
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

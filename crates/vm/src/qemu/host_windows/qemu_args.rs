//! The Windows-specific pieces of running QEMU, as pure functions: where QEMU is installed,
//! how paths are handed to it, and the WHPX accelerator flags. The command line itself is
//! built by [`crate::qemu::cmdline`] (with [`crate::qemu::HostOs::Windows`], loopback-TCP
//! endpoints and paths); its Windows variants are tested here too.
//!
//! # Quoting
//! Two layers parse a QEMU argument on Windows:
//! 1. The C runtime splits the process command line into `argv`. `std::process::Command`
//!    already quotes each argument for that layer (spaces, quotes, backslashes before quotes),
//!    and QEMU for Windows is built with mingw, whose runtime uses the same rules. So every
//!    argument is one plain string and we never add quotes ourselves.
//! 2. QEMU's option syntax (`key=value,key=value`) treats `,` as a separator; a literal comma
//!    inside a value is written `,,`. Backslashes, spaces, `=` and `:` are literal. The
//!    command-line builder doubles commas in option values (`-drive file=...`), and leaves
//!    `-kernel`, `-initrd` and `-append` alone, which QEMU does not parse as option lists.
//!
//! Paths also lose the `\\?\` (verbatim) prefix that `std::fs::canonicalize` adds
//! ([`host_path`]): QEMU opens files with APIs that do not accept it.
//!
//! # Accelerator
//! WHPX is requested as `whpx,kernel-irqchip=off` ([`crate::qemu::cmdline::accel_arg`]): the
//! userspace APIC works on every Windows build that has WHPX.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::config::{Accel, Arch};
use crate::error::ConfigError;
use crate::qemu::cmdline::accel_arg;

/// Where Windows users get QEMU.
pub const QEMU_DOWNLOAD_URL: &str = "https://www.qemu.org/download/#windows";

/// The folder under `%ProgramFiles%` the QEMU installer uses by default.
pub const QEMU_INSTALL_SUBDIR: &str = "qemu";

/// A host path as QEMU for Windows expects it: UTF-8, with the `\\?\` (verbatim) prefix that
/// `std::fs::canonicalize` adds removed, because QEMU opens files with the ANSI/UTF-8 APIs that
/// do not accept it.
pub fn host_path(path: &Path) -> Result<String, ConfigError> {
    let s = path.to_str().ok_or_else(|| {
        ConfigError::Unsupported(format!(
            "path {} is not valid Unicode: QEMU cannot open it; move the file to a plain path",
            path.display()
        ))
    })?;
    if let Some(rest) = s.strip_prefix(r"\\?\UNC\") {
        return Ok(format!(r"\\{rest}"));
    }
    if let Some(rest) = s.strip_prefix(r"\\?\") {
        return Ok(rest.to_string());
    }
    Ok(s.to_string())
}

/// `qemu-system-<arch>.exe`.
pub fn qemu_exe_name(arch: Arch) -> String {
    format!("qemu-system-{}.exe", arch.as_str())
}

/// Splits a Windows `PATH` value: `;`-separated, entries may be wrapped in double quotes,
/// empty entries are skipped. (`std::env::split_paths` would do this on Windows only; this
/// function does it the Windows way on every host so it can be tested.)
pub fn split_windows_path(path_var: &OsStr) -> Vec<PathBuf> {
    path_var
        .to_string_lossy()
        .split(';')
        .map(|e| e.trim().trim_matches('"'))
        .filter(|e| !e.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Where vmcp looks for QEMU, in order: every `PATH` entry, then
/// `%ProgramFiles%\qemu`.
pub fn qemu_candidates(
    arch: Arch,
    path_var: Option<&OsStr>,
    program_files: Option<&OsStr>,
) -> Vec<PathBuf> {
    let exe = qemu_exe_name(arch);
    let mut out: Vec<PathBuf> = path_var
        .map(split_windows_path)
        .unwrap_or_default()
        .iter()
        .map(|d| d.join(&exe))
        .collect();
    if let Some(pf) = program_files.filter(|p| !p.is_empty()) {
        out.push(Path::new(pf).join(QEMU_INSTALL_SUBDIR).join(&exe));
    }
    out
}

/// The first candidate of [`qemu_candidates`] for which `is_file` holds.
pub fn find_qemu(
    arch: Arch,
    path_var: Option<&OsStr>,
    program_files: Option<&OsStr>,
    is_file: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    qemu_candidates(arch, path_var, program_files)
        .into_iter()
        .find(|p| is_file(p))
}

/// Arguments that make QEMU initialise `accel` and nothing else, then quit when the QMP
/// commands in [`ACCEL_PROBE_STDIN`] arrive on stdin. Exit status 0 means the accelerator
/// works with this QEMU on this host.
pub fn accel_probe_args(accel: Accel) -> Vec<String> {
    [
        "-machine",
        "none",
        "-accel",
        &accel_arg(accel),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-qmp",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What [`accel_probe_args`] expects on stdin.
pub const ACCEL_PROBE_STDIN: &[u8] =
    b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n";

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    proptest::proptest! {
        #[test]
        fn path_splitting_keeps_every_nonempty_entry(
            entries in proptest::collection::vec("[A-Za-z0-9 :\\\\._-]{0,20}", 0..8)
        ) {
            let joined = entries.join(";");
            let split = split_windows_path(OsStr::new(&joined));
            let want: Vec<&str> = entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).collect();
            let got: Vec<String> = split.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            proptest::prop_assert_eq!(got, want);
            let c = qemu_candidates(Arch::X86_64, Some(OsStr::new(&joined)), None);
            proptest::prop_assert_eq!(c.len(), split.len());
        }

        #[test]
        fn host_path_only_strips_the_verbatim_prefix(p in "[A-Za-z0-9 ,:\\\\._-]{0,40}") {
            let plain = host_path(Path::new(&p)).unwrap();
            proptest::prop_assert_eq!(&plain, &p);
            // `\\?\UNC\...` is the UNC form, stripped differently (tested below).
            proptest::prop_assume!(!p.starts_with(r"UNC\"));
            let verbatim = format!(r"\\?\{p}");
            proptest::prop_assert_eq!(host_path(Path::new(&verbatim)).unwrap(), p);
        }
    }

    #[test]
    fn verbatim_prefixes_removed() {
        assert_eq!(
            host_path(Path::new(r"\\?\C:\Program Files\vmcp\k")).unwrap(),
            r"C:\Program Files\vmcp\k"
        );
        assert_eq!(
            host_path(Path::new(r"\\?\UNC\srv\share\img.raw")).unwrap(),
            r"\\srv\share\img.raw"
        );
    }

    #[test]
    fn path_search_order_and_quotes() {
        let path = OsString::from(r#"C:\Windows\system32;;"C:\Tools\QEMU 10";D:\bin\"#);
        let c = qemu_candidates(
            Arch::X86_64,
            Some(&path),
            Some(OsStr::new(r"C:\Program Files")),
        );
        // Path::join adds `/` when these tests run on Linux; Windows adds `\` unless the entry
        // already ends with one.
        let c: Vec<String> = c
            .iter()
            .map(|p| p.to_string_lossy().replace('/', "\\").replace(r"\\", r"\"))
            .collect();
        assert_eq!(
            c,
            [
                r"C:\Windows\system32\qemu-system-x86_64.exe",
                r"C:\Tools\QEMU 10\qemu-system-x86_64.exe",
                r"D:\bin\qemu-system-x86_64.exe",
                r"C:\Program Files\qemu\qemu-system-x86_64.exe",
            ]
        );
        let found = find_qemu(
            Arch::X86_64,
            Some(&path),
            Some(OsStr::new(r"C:\Program Files")),
            |p| p.to_string_lossy().starts_with(r"C:\Program Files"),
        );
        assert_eq!(
            found.unwrap().to_string_lossy().replace('/', "\\"),
            r"C:\Program Files\qemu\qemu-system-x86_64.exe"
        );
        assert!(find_qemu(Arch::Aarch64, None, None, |_| true).is_none());
        assert_eq!(qemu_exe_name(Arch::Aarch64), "qemu-system-aarch64.exe");
    }

    #[test]
    fn whpx_gets_the_userspace_irqchip() {
        assert_eq!(accel_arg(Accel::Whpx), "whpx,kernel-irqchip=off");
        assert_eq!(accel_arg(Accel::Tcg), "tcg");
        let a = accel_probe_args(Accel::Whpx);
        let i = a.iter().position(|x| x == "-accel").unwrap();
        assert_eq!(a[i + 1], "whpx,kernel-irqchip=off");
        assert!(a.windows(2).any(|w| w == ["-machine", "none"]));
        assert!(a.windows(2).any(|w| w == ["-qmp", "stdio"]));
    }

    #[test]
    fn windows_command_line_quotes_paths_and_uses_loopback_tcp() {
        use crate::qemu::{
            DiskPlan, DiskSource, Endpoint, FileRef, HostOs, QemuPlan, VirtioTransport, AGENT_PORT,
        };
        let tcp = |port| Endpoint::TcpConnect(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        let kernel = r"C:\Users\Ann Lee\AppData\Local\vmcp\cache\img,v1\vmlinuz";
        let plan = QemuPlan {
            binary: r"C:\Program Files\qemu\qemu-system-x86_64.exe".into(),
            arch: Arch::X86_64,
            accel: Accel::Whpx,
            host: HostOs::Windows,
            cpus: 2,
            memory_mib: 512,
            kernel: FileRef::Path(kernel.into()),
            initrd: FileRef::Path(r"C:\Users\Ann Lee\initrd.img".into()),
            append: "console=ttyS0 vmcp.token=00ff".into(),
            rootfs: Some(DiskPlan {
                source: DiskSource::Path(r"D:\disks, old\root.img".into()),
                read_only: false,
            }),
            disks: Vec::new(),
            qmp: tcp(50001),
            console: tcp(50002),
            agent: tcp(50003),
            agent_port: AGENT_PORT.into(),
            virtio: VirtioTransport::Pci,
            network: None,
            sandbox: QemuPlan::sandbox_supported(HostOs::Windows),
            memory: None,
            incoming: false,
            token_file: None,
        };
        let argv: Vec<String> = plan
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            let i = argv.iter().position(|a| a == flag).unwrap();
            argv[i + 1].clone()
        };
        assert_eq!(argv[0], r"C:\Program Files\qemu\qemu-system-x86_64.exe");
        assert_eq!(after("-accel"), "whpx,kernel-irqchip=off");
        // -kernel is not an option list: the path goes through untouched (one argv entry;
        // Command quotes the space for the C runtime).
        assert_eq!(after("-kernel"), kernel);
        assert_eq!(after("-initrd"), r"C:\Users\Ann Lee\initrd.img");
        // -drive is an option list: the comma is doubled, spaces and backslashes stay.
        let drive = after("-drive");
        assert!(
            drive.starts_with(r"file=D:\disks,, old\root.img,"),
            "{drive}"
        );
        assert!(drive.contains("read-only=off"), "{drive}");
        let chardevs: Vec<&String> = argv
            .iter()
            .zip(argv.iter().skip(1))
            .filter(|(f, _)| *f == "-chardev")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            chardevs,
            [
                "socket,id=qmp,host=127.0.0.1,port=50001",
                "socket,id=console,host=127.0.0.1,port=50002",
                "socket,id=agent,host=127.0.0.1,port=50003"
            ]
        );
        // Nothing Linux-only: no seccomp sandbox, no inherited descriptors.
        assert!(!argv.iter().any(|a| a == "-sandbox" || a == "-add-fd"));
        assert!(!argv
            .iter()
            .any(|a| a.contains("/dev/fd") || a.contains("fd=")));
    }

    #[cfg(unix)]
    mod unix {
        use super::*;

        #[test]
        fn non_unicode_path_rejected() {
            use std::os::unix::ffi::OsStrExt;
            let p = Path::new(OsStr::from_bytes(b"/tmp/\xff.img"));
            let e = host_path(p).unwrap_err().to_string();
            assert!(e.contains("not valid Unicode"), "{e}");
        }
    }
}

//! The Windows-specific pieces of a QEMU command line, as pure functions.
//!
//! Nothing here touches the OS, so all of it is unit-tested on Linux.
//!
//! # Quoting
//! Two layers parse a QEMU argument on Windows:
//! 1. The C runtime splits the process command line into `argv`. `std::process::Command`
//!    already quotes each argument for that layer (spaces, quotes, backslashes before quotes),
//!    and QEMU for Windows is built with mingw, whose runtime uses the same rules. So we
//!    hand `Command` one plain string per argument and never add quotes ourselves.
//! 2. QEMU's option syntax (`key=value,key=value`) treats `,` as a separator; a literal comma
//!    inside a value is written `,,`. Backslashes, spaces, `=` and `:` after the first `=`
//!    are literal. [`opt_value`] does this doubling; every path that goes into an option list
//!    passes through [`path_opt`].
//!
//! Arguments that QEMU does not parse as an option list (`-kernel`, `-initrd`, `-append`)
//! take the path unescaped ([`host_path`]): doubling commas there would corrupt the path.
//!
//! # Channels
//! Unix sockets are not used on Windows (QEMU supports `AF_UNIX` there, but tokio does not).
//! Both QMP and the agent's virtio-serial port use loopback TCP with vmcp as the listener on
//! `127.0.0.1:<ephemeral>` and QEMU connecting as a client ([`chardev_arg`] with
//! [`Endpoint::Tcp`]). The agent channel is authenticated by the per-VM token the guest sends
//! in its hello (see [`super::channel`]); a wrong peer is dropped. Named pipes
//! ([`Endpoint::Pipe`]) are supported by the builder for a later native backend, but QEMU's
//! pipe chardev creates the pipe with the default DACL, which lets every local user open it
//! for reading, so the QEMU backend does not use it.
//!
//! # Accelerator
//! WHPX is requested as `whpx,kernel-irqchip=off`: QEMU's in-kernel (Hyper-V) APIC emulation
//! is the part of WHPX that fails most often with Linux guests, and the userspace APIC works
//! on every Windows build that has WHPX. This is unverified on real hardware from here (no
//! Windows machine); see docs/windows.md.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::{Accel, Arch};
use crate::error::ConfigError;

/// Where Windows users get QEMU.
pub const QEMU_DOWNLOAD_URL: &str = "https://www.qemu.org/download/#windows";

/// The folder under `%ProgramFiles%` the QEMU installer uses by default.
pub const QEMU_INSTALL_SUBDIR: &str = "qemu";

/// QMP chardev id.
pub const QMP_CHARDEV_ID: &str = "vmcp-qmp";

/// Console chardev id.
pub const CONSOLE_CHARDEV_ID: &str = "vmcp-con";

/// Doubles every comma so `value` can sit inside a QEMU option list.
pub fn opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

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

/// [`host_path`] with commas doubled, for use inside an option list.
pub fn path_opt(path: &Path) -> Result<String, ConfigError> {
    host_path(path).map(|p| opt_value(&p))
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

/// The value of `-accel` for `accel` on a Windows host.
pub fn accel_arg(accel: Accel) -> String {
    match accel {
        Accel::Whpx => "whpx,kernel-irqchip=off".to_string(),
        other => other.as_str().to_string(),
    }
}

/// The machine type to use on Windows with `accel`, where it differs from the Linux choice:
/// WHPX is developed and tested against `q35`, not `microvm`. `None` keeps the caller's
/// default.
pub fn machine_override(accel: Accel) -> Option<&'static str> {
    match accel {
        Accel::Whpx => Some("q35"),
        Accel::Kvm | Accel::Tcg | Accel::Hvf => None,
    }
}

/// One end of a host channel that QEMU connects to or creates.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Endpoint {
    /// vmcp listens on this loopback address; QEMU connects as a client.
    Tcp(SocketAddr),
    /// QEMU creates `\\.\pipe\<name>` and vmcp connects to it.
    Pipe(String),
}

/// The `-chardev` value for a channel named `id` on `endpoint`.
///
/// TCP endpoints must be loopback: the channel must never be reachable from the network.
pub fn chardev_arg(id: &str, endpoint: &Endpoint) -> Result<String, ConfigError> {
    match endpoint {
        Endpoint::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Unsupported(format!(
                    "channel {id} would listen on {addr}, which is not a loopback address"
                )));
            }
            Ok(format!(
                "socket,id={id},host={},port={},nodelay=on",
                addr.ip(),
                addr.port()
            ))
        }
        Endpoint::Pipe(name) => {
            if name.is_empty() || name.contains(['\\', '/']) {
                return Err(ConfigError::Unsupported(format!(
                    "named pipe name {name:?} must be non-empty and contain no slashes"
                )));
            }
            Ok(format!("pipe,id={id},path={}", opt_value(name)))
        }
    }
}

/// `-chardev ... -mon ...` for QMP on `endpoint`.
pub fn qmp_args(endpoint: &Endpoint) -> Result<Vec<String>, ConfigError> {
    Ok(vec![
        "-chardev".into(),
        chardev_arg(QMP_CHARDEV_ID, endpoint)?,
        "-mon".into(),
        format!("chardev={QMP_CHARDEV_ID},mode=control"),
    ])
}

/// `-chardev file ... -serial chardev:...`: the guest console appended to `log`.
pub fn console_args(log: &Path) -> Result<Vec<String>, ConfigError> {
    Ok(vec![
        "-chardev".into(),
        format!("file,id={CONSOLE_CHARDEV_ID},path={}", path_opt(log)?),
        "-serial".into(),
        format!("chardev:{CONSOLE_CHARDEV_ID}"),
    ])
}

/// `-drive` value for a virtio-blk disk at `path`.
pub fn drive_arg(id: &str, path: &Path, read_only: bool) -> Result<String, ConfigError> {
    Ok(format!(
        "file={},if=none,id={id},format=raw,readonly={}",
        path_opt(path)?,
        if read_only { "on" } else { "off" }
    ))
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

    #[test]
    fn commas_doubled_backslashes_and_spaces_kept() {
        assert_eq!(opt_value("a,b,,c"), "a,,b,,,,c");
        let p = Path::new(r"C:\Users\Ann Lee\vm,1\console.log");
        assert_eq!(path_opt(p).unwrap(), r"C:\Users\Ann Lee\vm,,1\console.log");
        assert_eq!(host_path(p).unwrap(), r"C:\Users\Ann Lee\vm,1\console.log");
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

    #[cfg(unix)]
    #[test]
    fn non_unicode_path_rejected() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(OsStr::from_bytes(b"/tmp/\xff.img"));
        let e = host_path(p).unwrap_err().to_string();
        assert!(e.contains("not valid Unicode"), "{e}");
    }

    #[test]
    fn console_and_drive_quote_paths() {
        let log = Path::new(r"C:\Temp\my dir,x\console.log");
        assert_eq!(
            console_args(log).unwrap(),
            [
                "-chardev",
                r"file,id=vmcp-con,path=C:\Temp\my dir,,x\console.log",
                "-serial",
                "chardev:vmcp-con"
            ]
        );
        assert_eq!(
            drive_arg("root", Path::new(r"D:\a,b\root.img"), true).unwrap(),
            r"file=D:\a,,b\root.img,if=none,id=root,format=raw,readonly=on"
        );
        assert!(drive_arg("r", Path::new("x"), false)
            .unwrap()
            .ends_with("readonly=off"));
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
    fn whpx_gets_userspace_irqchip_and_q35() {
        assert_eq!(accel_arg(Accel::Whpx), "whpx,kernel-irqchip=off");
        assert_eq!(accel_arg(Accel::Tcg), "tcg");
        assert_eq!(machine_override(Accel::Whpx), Some("q35"));
        assert_eq!(machine_override(Accel::Tcg), None);
        let a = accel_probe_args(Accel::Whpx);
        let i = a.iter().position(|x| x == "-accel").unwrap();
        assert_eq!(a[i + 1], "whpx,kernel-irqchip=off");
        assert!(a.windows(2).any(|w| w == ["-machine", "none"]));
        assert!(a.windows(2).any(|w| w == ["-qmp", "stdio"]));
    }

    #[test]
    fn tcp_channels_are_loopback_clients() {
        let ep = Endpoint::Tcp("127.0.0.1:50123".parse().unwrap());
        assert_eq!(
            chardev_arg("vmcp-agent", &ep).unwrap(),
            "socket,id=vmcp-agent,host=127.0.0.1,port=50123,nodelay=on"
        );
        assert_eq!(
            qmp_args(&ep).unwrap(),
            [
                "-chardev",
                "socket,id=vmcp-qmp,host=127.0.0.1,port=50123,nodelay=on",
                "-mon",
                "chardev=vmcp-qmp,mode=control"
            ]
        );
        let open = Endpoint::Tcp("0.0.0.0:1".parse().unwrap());
        assert!(chardev_arg("x", &open)
            .unwrap_err()
            .to_string()
            .contains("not a loopback"));
        let v6 = Endpoint::Tcp("[::1]:7".parse().unwrap());
        assert!(chardev_arg("x", &v6).unwrap().contains("host=::1,port=7"));
    }

    #[test]
    fn pipe_channels() {
        let ep = Endpoint::Pipe("vmcp-1f,qmp".into());
        assert_eq!(
            chardev_arg("q", &ep).unwrap(),
            "pipe,id=q,path=vmcp-1f,,qmp"
        );
        assert!(chardev_arg("q", &Endpoint::Pipe(r"a\b".into())).is_err());
        assert!(chardev_arg("q", &Endpoint::Pipe(String::new())).is_err());
    }
}

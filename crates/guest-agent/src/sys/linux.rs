//! Linux-only system calls of `/init`: mounts, modules, power-off, clocks, terminals, vsock,
//! and peeking at zombies without reaping them.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in argument"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Mount flags used by the agent.
pub use libc::{MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_REMOUNT};

/// mount(2).
pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast::<libc::c_void>()),
        )
    };
    check(rc)
}

/// chroot(2) to `dir`, then chdir("/").
pub fn chroot(dir: &str) -> io::Result<()> {
    let dir = cstr(dir)?;
    // SAFETY: `dir` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::chroot(dir.as_ptr()) })?;
    std::env::set_current_dir("/")
}

/// Loads the kernel module in `file` with no parameters. `Ok(false)` if it was already loaded.
pub fn finit_module(file: &File) -> io::Result<bool> {
    let params = c"";
    // SAFETY: the fd is open for the duration of the call and `params` is a static C string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Flushes all filesystems.
pub fn sync() {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// Powers the machine off. Only returns on failure.
pub fn power_off() -> io::Error {
    // SAFETY: reboot(2) with a valid command; if it succeeds the machine stops.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// `CLOCK_BOOTTIME` in nanoseconds (0 if unavailable).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Switches the terminal on `file` to raw mode (no echo, no line discipline, 8 bit).
pub fn set_raw(file: &File) -> io::Result<()> {
    // SAFETY: termios is plain old data; all-zero is a valid value to be overwritten.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open and `tio` is a valid, writable termios.
    check(unsafe { libc::tcgetattr(file.as_raw_fd(), &mut tio) })?;
    // SAFETY: `tio` is a valid termios.
    unsafe { libc::cfmakeraw(&mut tio) };
    // SAFETY: the fd is open and `tio` is a valid termios.
    check(unsafe { libc::tcsetattr(file.as_raw_fd(), libc::TCSANOW, &tio) })
}

/// Connects an `AF_VSOCK` stream socket to `cid:port`.
pub fn vsock_connect(cid: u32, port: u32) -> io::Result<File> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    check(rc)?;
    Ok(File::from(owned))
}

/// Blocks until some child has terminated and returns its pid WITHOUT reaping it
/// (`waitid(P_ALL, WEXITED | WNOWAIT)`), so the caller can decide who reaps it.
pub fn peek_zombie() -> io::Result<i32> {
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid succeeded for WEXITED, so the kernel filled in the child fields.
        return Ok(unsafe { info.si_pid() });
    }
}

/// Whether directory `path` is marked opaque by overlayfs (`trusted.overlay.opaque` is `y`).
pub fn overlay_opaque(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(p) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 4];
    // SAFETY: `p` and the attribute name are NUL-terminated and outlive the call; `value` is
    // writable for the length passed.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast::<libc::c_void>(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// A `sockaddr` holding an IPv4 address (port 0).
fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from(addr).to_be();
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux and sockaddr is plain old
    // data, so reinterpreting the bytes is valid.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn ioctl_ifreq(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `sock` is an open socket and `req` a valid, writable ifreq that the interface
    // ioctls read and write in place.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) })
}

/// Gives interface `name` the IPv4 address `addr/prefix` and brings it up.
pub fn configure_ipv4(name: &str, addr: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    ioctl_ifreq(&sock, libc::SIOCSIFADDR, &mut req)?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(std::net::Ipv4Addr::from(mask));
    ioctl_ifreq(&sock, libc::SIOCSIFNETMASK, &mut req)?;
    set_up(name)
}

/// Brings interface `name` up.
pub fn set_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl_ifreq(&sock, libc::SIOCSIFFLAGS, &mut req)
}

/// Adds a default IPv4 route via `gateway`.
pub fn add_default_route(gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let sock = inet_socket()?;
    // SAFETY: rtentry is plain old data; all-zero is valid (null device: the kernel picks the
    // interface whose subnet holds the gateway).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_v4(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: `sock` is open and `rt` a valid rtentry that SIOCADDRT only reads.
    check(unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT as _,
            &mut rt as *mut libc::rtentry,
        )
    })
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`).
const RNDADDENTROPY: u32 = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDRESEEDCRNG: u32 = 0x0000_5207;

/// Mixes `bytes` into the kernel's input pool, credited as full entropy (they come from the
/// host's own random number generator), then reseeds the kernel's CRNG so that
/// `/dev/urandom` and `getrandom()` output depends on them at once. Needs CAP_SYS_ADMIN.
pub fn add_entropy_and_reseed(bytes: &[u8]) -> io::Result<()> {
    let random = OpenOptions::new().write(true).open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in u32
    // words so the header and the buffer are aligned as the kernel expects.
    let words = bytes.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    let bits = i32::try_from(bytes.len() * 8)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too much entropy"))?;
    info[0] = bits as u32;
    info[1] = bytes.len() as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    // SAFETY: `info` is a live, aligned rand_pool_info whose buf_size (bytes.len()) does not
    // exceed the words that follow the header; the kernel only reads it.
    check(unsafe {
        libc::ioctl(
            random.as_raw_fd(),
            RNDADDENTROPY as libc::Ioctl,
            info.as_ptr(),
        )
    })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as libc::Ioctl) })
}

/// Sets `CLOCK_REALTIME` to `unix_ns` nanoseconds since the epoch.
pub fn set_realtime(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a valid timespec that outlives the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

/// sethostname(2).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast::<libc::c_char>(), name.len()) })
}

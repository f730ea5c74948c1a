//! Linux descriptor plumbing for the QEMU backend, and its spawn through the owned-process
//! layer (`vmcp_host_process`), which keeps the `unsafe` of starting processes.
//!
//! What it guarantees about the QEMU child:
//! - **Dies with its owner, in its own process group** (`vmcp_host_process::spawn_owned`: a
//!   watchdog-led group, `PR_SET_PDEATHSIG` armed from the process-lifetime spawner thread), so
//!   a terminal's Ctrl-C reaches vmcp, not QEMU (vmcp shuts the VM down itself).
//! - **Unprivileged when vmcp is root**: supplementary groups, gid and uid are set to the
//!   dedicated `vmcp-qemu` user (`nobody` with a warning where it is missing) before exec.
//!   QEMU's own `-run-with user=` cannot be used: under `-sandbox ...,elevateprivileges=deny`
//!   the drop itself is a denied syscall (SIGSYS).
//! - **Only the descriptors it is given**: every descriptor vmcp opens is close-on-exec; the
//!   ones QEMU must inherit (socketpair ends, kernel, initrd, disk) have the flag cleared in
//!   the child only. Files are opened by vmcp and handed over, so QEMU needs no access to
//!   the paths (the image cache may sit in a home directory only root can enter).
//! - An environment with only `PATH`, stdin and stdout on `/dev/null`, stderr piped.

pub use super::spawn::{Ids, SpawnSpec};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use vmcp_host_process::{spawn_owned, OwnedChild, SpawnOptions};

use super::cmdline::HostOs;

/// The host OS this module serves.
pub fn host_os() -> HostOs {
    HostOs::Linux
}

/// Whether the QEMU backend can launch VMs on this OS.
pub const LAUNCH_SUPPORTED: Result<(), &str> = Ok(());

/// The host end of a channel to QEMU.
pub type HostStream = tokio::net::UnixStream;

/// A descriptor QEMU inherits.
#[derive(Debug)]
pub struct ChildFd(OwnedFd);

impl ChildFd {
    /// Its number (the same in QEMU, which inherits it unchanged).
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// How the plan names this file: by inherited descriptor.
    pub fn file_ref(&self) -> super::cmdline::FileRef {
        super::cmdline::FileRef::Fd(self.raw())
    }

    /// How the plan names this channel end: by inherited descriptor.
    pub fn endpoint(&self) -> super::cmdline::Endpoint {
        super::cmdline::Endpoint::Fd(self.raw())
    }
}

/// A disk handed over as descriptors in fd set `set`.
pub fn disk_source(set: u32, fds: &[ChildFd]) -> super::cmdline::DiskSource {
    super::cmdline::DiskSource::FdSet {
        set,
        fds: fds.iter().map(ChildFd::raw).collect(),
    }
}

/// A connected stream pair: vmcp keeps the first end, QEMU inherits the second.
pub fn stream_pair() -> io::Result<(HostStream, ChildFd)> {
    let (host, child) = std::os::unix::net::UnixStream::pair()?;
    host.set_nonblocking(true)?;
    Ok((HostStream::from_std(host)?, ChildFd(OwnedFd::from(child))))
}

/// Opens `path` for QEMU to inherit, read-only or read-write.
pub fn open_for_child(path: &Path, write: bool) -> io::Result<ChildFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)?;
    Ok(ChildFd(OwnedFd::from(f)))
}

/// The agent token as a sealed memfd for QEMU to inherit and read through `/dev/fd/N` (a
/// memfd's mode lets QEMU's unprivileged user open it; no other user can reach another
/// process's descriptors).
pub fn token_file(token: &str) -> io::Result<Option<ChildFd>> {
    use std::io::Write;
    // SAFETY: the name is a NUL-terminated string literal; the flags are valid; the result is
    // checked and, when valid, a new descriptor that nothing else owns.
    let fd = unsafe {
        libc::memfd_create(
            c"vmcp-token".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created above and is owned by nobody else.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut file = std::fs::File::from(owned);
    file.write_all(token.as_bytes())?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, with a plain integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(ChildFd(OwnedFd::from(file))))
}

/// Starts QEMU as described by `spec`. Must be called inside a tokio runtime.
pub async fn spawn(spec: SpawnSpec) -> io::Result<OwnedChild> {
    let Some((bin, args)) = spec.argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .env_clear()
        .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    spawn_owned(
        cmd,
        SpawnOptions::default()
            .with_inherited_fds(spec.inherit)
            .with_run_as(spec.drop_to)
            // Nothing QEMU executes (the egress forward helper of `--net allow`) may gain
            // privileges through a set-user-ID file, even where the sandbox allows spawning.
            .with_no_new_privs(true),
    )
}

/// Sends `data` on `stream` with `file`'s descriptor attached (`SCM_RIGHTS`): how QMP's
/// `add-fd` receives a file, so QEMU writes or reads a snapshot it could not open itself.
pub async fn send_with_fd(
    stream: &HostStream,
    data: &[u8],
    file: &std::fs::File,
) -> io::Result<()> {
    let mut off = 0;
    while off < data.len() {
        stream.writable().await?;
        let first = off == 0;
        let res = stream.try_io(tokio::io::Interest::WRITABLE, || {
            send_part(
                stream.as_raw_fd(),
                &data[off..],
                first.then(|| file.as_raw_fd()),
            )
        });
        match res {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One `sendmsg`, with `fd` as `SCM_RIGHTS` ancillary data when given.
fn send_part(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Room for one cmsghdr with one int, in u64 words for alignment.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_LEN compute sizes from a constant; no memory is touched.
        let (space, len) = unsafe {
            (
                libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize,
                libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize,
            )
        };
        if space > std::mem::size_of_val(&control) {
            return Err(io::Error::other("control buffer too small"));
        }
        msg.msg_control = control.as_mut_ptr().cast::<libc::c_void>();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `control`, which is large enough (checked above) and
        // aligned for cmsghdr; CMSG_FIRSTHDR returns its start, and CMSG_DATA a pointer inside
        // it with room for one int.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(io::Error::other("no room for the descriptor"));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = len as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
    }
    // SAFETY: `msg` points at `iov` (describing `data`) and `control`, all alive for the call;
    // the kernel only reads them.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Creates (or truncates) the file that will hold a VM's memory, `bytes` long (sparse), for
/// QEMU to map shared. When QEMU runs as another user it must be able to open it read-write
/// through `/dev/fd/N`, so the file is given to that user for the VM's lifetime.
pub fn create_memory_file(path: &Path, bytes: u64, owner: Option<&Ids>) -> io::Result<ChildFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_len(bytes)?;
    if let Some(ids) = owner {
        std::os::unix::fs::fchown(&f, Some(ids.uid), Some(ids.gid))?;
    }
    Ok(ChildFd(OwnedFd::from(f)))
}

/// After a save: the memory file belongs to vmcp's user again; a QEMU that runs as another
/// user may read it (through its group) to restore from it, never write it.
pub fn seal_memory_file(path: &Path, reader: Option<&Ids>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::File::open(path)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let mode = match reader {
        Some(ids) => {
            std::os::unix::fs::fchown(&f, Some(me), Some(ids.gid))?;
            0o640
        }
        None => 0o600,
    };
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.sync_all()
}

/// Copies `from` to a new file `to` (mode 0600), data extents only, so the copy is as
/// sparse as the original (a guest's memory file is mostly holes).
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(to)?;
    dst.set_len(len)?;
    let off = |o: u64| libc::off_t::try_from(o).map_err(|_| io::Error::other("file too large"));
    let mut pos = 0u64;
    let mut copied = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        // SAFETY: lseek on an open descriptor with a valid whence; no memory is touched.
        let data = unsafe { libc::lseek(src.as_raw_fd(), off(pos)?, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (start, end) = (data as u64, (hole as u64).min(len));
        src.seek(SeekFrom::Start(start))?;
        dst.seek(SeekFrom::Start(start))?;
        let mut left = end - start;
        while left > 0 {
            let n = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
            src.read_exact(&mut buf[..n])?;
            dst.write_all(&buf[..n])?;
            left -= n as u64;
        }
        copied += end - start;
        pos = end;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_descriptor_crosses_the_socket() {
        let (host, child) = stream_pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"passed").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        send_with_fd(&host, b"{\"execute\":\"add-fd\"}\n", &file)
            .await
            .unwrap();
        // Receive on the other end with recvmsg and read the file through the new descriptor.
        let mut buf = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` points at `buf` and `control`, both alive and writable for the call.
        let n = unsafe { libc::recvmsg(child.raw(), &mut msg, 0) };
        assert_eq!(&buf[..n as usize], b"{\"execute\":\"add-fd\"}\n");
        // SAFETY: the kernel filled `control`; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        let fd = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null());
            assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>())
        };
        let mut got = String::new();
        use std::io::Read;
        // SAFETY: `fd` was just received and is owned by nobody else.
        let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.read_to_string(&mut got).unwrap();
        assert_eq!(got, "passed");
    }

    #[test]
    fn sparse_copies_keep_data_and_holes() {
        use std::io::{Seek, SeekFrom, Write};
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut f = std::fs::File::create(&a).unwrap();
        f.set_len(32 << 20).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start((32 << 20) - 3)).unwrap();
        f.write_all(b"end").unwrap();
        drop(f);
        copy_sparse(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 < 4 << 20);
        // An all-hole file copies to an all-hole file of the same length.
        std::fs::File::create(&a).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(copy_sparse(&a, &b).unwrap(), 0);
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 1 << 20);
    }

    #[test]
    fn memory_files_are_sparse_and_sealed_private() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let fd = create_memory_file(&path, 64 << 20, None).unwrap();
        drop(fd);
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "not sparse: {} blocks",
            m.blocks()
        );
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        seal_memory_file(&path, None).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn spawn_sets_group_and_inherits_fds() {
        let (_host, child) = stream_pair().unwrap();
        let fd = child.raw();
        // The child reports its process group and pid, and whether it has the fd, on stderr.
        let script = format!(
            "read -r _ _ _ _ pgrp _ < /proc/self/stat; test -e /proc/self/fd/{fd} && echo \"$pgrp $$ ok\" >&2"
        );
        let mut c = spawn(SpawnSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            inherit: vec![fd],
            drop_to: None,
        })
        .await
        .unwrap();
        drop(child);
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut c.take_stderr().unwrap(), &mut out)
            .await
            .unwrap();
        assert!(c.wait().await.unwrap().success());
        let v: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(v.len(), 3, "{out:?}");
        assert_ne!(v[0], v[1], "QEMU is in the group its watchdog leads");
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let own_pgrp = own[own.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_owned();
        assert_ne!(v[0], own_pgrp, "not in vmcp's group");
        assert_eq!(v[2], "ok");
    }

    #[tokio::test]
    async fn not_inherited_fds_are_closed_in_the_child() {
        let (_host, child) = stream_pair().unwrap();
        let fd = child.raw();
        let mut c = spawn(SpawnSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("test -e /proc/self/fd/{fd}").into(),
            ],
            inherit: vec![],
            drop_to: None,
        })
        .await
        .unwrap();
        assert!(!c.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn drops_privileges_when_root() {
        if !vmcp_host_process::is_root() {
            vmcp_test_support::skipped!("SKIPPED: dropping privileges needs root");
            return;
        }
        let ids = super::super::spawn::unprivileged_ids(false);
        let mut c = spawn(SpawnSpec {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "[ \"$(id -u)\" = {} ] && [ \"$(id -g)\" = {} ] && [ \"$(id -G)\" = {} ]",
                    ids.uid, ids.gid, ids.gid
                )
                .into(),
            ],
            inherit: vec![],
            drop_to: Some(ids),
        })
        .await
        .unwrap();
        assert!(c.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn spawn_of_missing_binary_fails() {
        let e = spawn(SpawnSpec {
            argv: vec!["/nonexistent/qemu".into()],
            inherit: vec![],
            drop_to: None,
        })
        .await
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(spawn(SpawnSpec {
            argv: vec![],
            inherit: vec![],
            drop_to: None
        })
        .await
        .is_err());
    }
}

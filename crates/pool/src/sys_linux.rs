//! Linux socket calls of the daemon: the peer's uid (`SO_PEERCRED`) and descriptors passed
//! with `SCM_RIGHTS`. Through rustix's safe wrappers: no `unsafe` here.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};

use rustix::io::IoSlice;
use rustix::io::IoSliceMut;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most descriptors accepted in one read; more are closed and the answer is refused.
pub const MAX_FDS: usize = 2;

/// The effective uid of this process.
pub fn my_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Who is at the other end of a connected Unix socket (as it was when it connected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
}

/// The credentials of the peer of a connected Unix socket (`SO_PEERCRED`).
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let c = rustix::net::sockopt::socket_peercred(sock)?;
    Ok(PeerCred {
        pid: c.pid.as_raw_nonzero().get(),
        uid: c.uid.as_raw(),
    })
}

/// Sends `data` with `fd` attached; returns how many bytes went (the descriptor travels with
/// the first of them).
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let fds = [fd];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the descriptor"));
    }
    Ok(sendmsg(
        sock,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// Reads into `buf`, appending descriptors that came along to `fds` (close-on-exec); returns
/// the bytes read (0 at end of stream). More than [`MAX_FDS`] descriptors in total, or a
/// truncated control message, is an error (the extra descriptors are closed).
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) || fds.len() > MAX_FDS {
        fds.clear();
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer sent more descriptors than expected",
        ));
    }
    Ok(got.bytes)
}

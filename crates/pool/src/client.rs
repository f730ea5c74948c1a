//! The client's side: one blocking request on the daemon's socket (no threads, no runtime:
//! `vmcp run` calls it before anything else), and the session that keeps a handed-out VM
//! alive until the client is done.

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{
    decode_answer, encode, split_frame, Answer, Granted, ProtoError, Request, StatusReport,
    VmRequest, HEADER_LEN, MAX_ANSWER, MAX_REQUEST,
};
use crate::sys;

/// Why a request to the daemon failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No daemon listens on the socket.
    #[error("no vmcp daemon listens on {}", .0.display())]
    NotRunning(PathBuf),
    /// The socket is served by another user's process: nothing is sent to it (it would get
    /// the program, its environment and its input).
    #[error("the daemon socket {} is served by uid {uid}, not by this user or root; ignoring it", path.display())]
    Foreign {
        /// The socket.
        path: PathBuf,
        /// The uid of the process behind it.
        uid: u32,
    },
    /// The daemon did not answer in time.
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
    /// The socket failed.
    #[error("the daemon socket failed")]
    Io(#[from] io::Error),
    /// The daemon's answer broke the protocol.
    #[error("bad answer from the daemon")]
    Proto(#[from] ProtoError),
    /// The daemon refused the request.
    #[error("the daemon refused: {0}")]
    Refused(String),
    /// The answer does not fit the request.
    #[error("unexpected answer from the daemon: {0}")]
    Unexpected(String),
}

/// The socket path: `$VMCP_DAEMON_SOCKET`, else `vmcp/daemon.sock` in `$XDG_RUNTIME_DIR`
/// (when that is a directory), else `/tmp/vmcpd-<uid>/daemon.sock`.
pub fn default_socket_path() -> PathBuf {
    if let Some(p) = std::env::var_os("VMCP_DAEMON_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    match std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && d.is_dir())
    {
        Some(d) => d.join("vmcp").join("daemon.sock"),
        None => std::env::temp_dir()
            .join(format!("vmcpd-{}", sys::my_uid()))
            .join("daemon.sock"),
    }
}

/// A VM handed out by the daemon: keep the session open while it is used; dropping it (or
/// [`Session::done`]) makes the daemon destroy the VM.
#[derive(Debug)]
pub struct Session {
    stream: UnixStream,
}

impl Session {
    /// Tells the daemon the VM is no longer needed.
    pub fn done(mut self) {
        if let Ok(frame) = encode(&Request::Done, MAX_REQUEST) {
            let _ = self.stream.write_all(&frame);
        }
    }
}

/// The daemon's answer to [`acquire`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Acquired {
    /// A VM: its agent channel and the session that owns it.
    Granted {
        /// What the daemon said about it.
        granted: Granted,
        /// The host end of the agent channel.
        channel: OwnedFd,
        /// Keeps the VM alive.
        session: Session,
    },
    /// No VM for this request; the reason in words.
    NoVm(String),
}

/// Connects and checks who serves the socket (`SO_PEERCRED`): this user or root only.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, ClientError> {
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(path.to_path_buf())
        }
        _ => ClientError::Io(e),
    })?;
    let uid = sys::peer_cred(stream.as_fd())?.uid;
    if uid != sys::my_uid() && uid != 0 {
        return Err(ClientError::Foreign {
            path: path.to_path_buf(),
            uid,
        });
    }
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

fn send(stream: &mut UnixStream, request: &Request) -> Result<(), ClientError> {
    let frame = encode(request, MAX_REQUEST)?;
    match stream.write_all(&frame) {
        Ok(()) => Ok(()),
        // The daemon may have refused and closed before reading (another user): its answer
        // is still there to read.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads one answer and the descriptors that came with it (at most [`sys::MAX_FDS`]).
fn read_answer(stream: &UnixStream) -> Result<(Answer, Vec<OwnedFd>), ClientError> {
    let mut buf = Vec::with_capacity(256);
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((payload, _)) = split_frame(&buf, MAX_ANSWER)? {
            return Ok((decode_answer(payload)?, fds));
        }
        // The frame's length was checked against MAX_ANSWER, so `buf` stays bounded.
        let n = sys::recv_with_fds(stream.as_fd(), &mut chunk, &mut fds)?;
        if n == 0 {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the daemon closed the connection after {} bytes of its answer",
                    buf.len()
                ),
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > HEADER_LEN + MAX_ANSWER {
            return Err(ProtoError::TooLarge {
                len: buf.len() as u64,
                max: MAX_ANSWER,
            }
            .into());
        }
    }
}

/// A read that hit the socket's timeout, in words.
fn timed_out(e: ClientError, timeout: Duration) -> ClientError {
    match e {
        ClientError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ClientError::Timeout(timeout)
        }
        e => e,
    }
}

/// Asks the daemon at `path` for a VM fitting `req`; every socket operation may take at most
/// `timeout`.
pub fn acquire(path: &Path, req: &VmRequest, timeout: Duration) -> Result<Acquired, ClientError> {
    let mut stream = connect(path, timeout)?;
    send(&mut stream, &Request::Acquire(req.clone()))?;
    let (answer, mut fds) = read_answer(&stream).map_err(|e| timed_out(e, timeout))?;
    match answer {
        Answer::Granted(granted) => {
            let channel = match (fds.pop(), fds.is_empty()) {
                (Some(fd), true) => fd,
                _ => {
                    return Err(ClientError::Unexpected(
                        "a VM came without exactly one channel descriptor".into(),
                    ))
                }
            };
            // The session waits for the program; only the request had a deadline.
            stream.set_read_timeout(None)?;
            Ok(Acquired::Granted {
                granted,
                channel,
                session: Session { stream },
            })
        }
        Answer::NoVm { reason } => Ok(Acquired::NoVm(reason)),
        Answer::Refused { reason } => Err(ClientError::Refused(reason)),
        Answer::Status(_) => Err(ClientError::Unexpected("a status report".into())),
    }
}

/// The daemon's status report.
pub fn status(path: &Path, timeout: Duration) -> Result<StatusReport, ClientError> {
    let mut stream = connect(path, timeout)?;
    send(&mut stream, &Request::Status)?;
    match read_answer(&stream).map_err(|e| timed_out(e, timeout))?.0 {
        Answer::Status(s) => Ok(s),
        Answer::Refused { reason } => Err(ClientError::Refused(reason)),
        other => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

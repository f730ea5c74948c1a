//! The daemon's side of the socket: a private Unix socket, a peer check, one request per
//! connection, the VM's agent channel passed to the client with `SCM_RIGHTS`.
//!
//! Clients are treated as hostile: a connection from another uid (other than root) gets
//! [`Answer::Refused`] and nothing else; a request must arrive whole within
//! [`ServerOptions::request_timeout`] and within [`MAX_REQUEST`] bytes; at most
//! [`ServerOptions::max_connections`] connections are served at once (more are closed at
//! accept); a handed-out VM is destroyed when its client sends [`Request::Done`], sends
//! anything else, or closes the socket (including when it is killed).

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::pool::{Pool, Source};
use crate::proto::{
    clip, decode_request, encode, parse_header, Answer, Granted, ProtoError, Request, StatusReport,
    VmRequest, HEADER_LEN, MAX_ANSWER, MAX_REQUEST, MAX_TEXT_BYTES,
};
use crate::sys;

/// What the server needs of a pooled VM to hand it out.
pub trait Handout: Send + 'static {
    /// The VM's id.
    fn vm_id(&self) -> &str;
    /// The agent's current channel token.
    fn token(&self) -> &str;
    /// The host end of the agent channel (a connected stream socket).
    fn channel(&self) -> BorrowedFd<'_>;
    /// Whether the VM still runs (cheap, no waiting); a dead pooled VM is destroyed instead of
    /// handed out. Default: assume it does.
    fn alive(&self) -> bool {
        true
    }
}

/// Turns a client's request into a profile name (the daemon computes it the way `vmcp run`
/// names its automatic snapshot).
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    /// The profile for `req`, or why there is none.
    async fn profile_for(&self, req: &VmRequest) -> Result<String, String>;
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The socket's directory is unsafe or cannot be made.
    #[error("cannot use {} for the daemon socket: {reason}", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another daemon answers on the socket.
    #[error("a daemon already listens on {}", .0.display())]
    Running(PathBuf),
    /// Binding the socket failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The daemon's listening socket; the socket file is removed when it is dropped.
#[derive(Debug)]
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path` (mode 0600) in a directory only this user can enter (made 0700 if
/// missing; refused if it belongs to someone else or others may enter it). A socket file
/// that nobody answers on is replaced; one a daemon answers on is an error. Call inside a
/// tokio runtime.
pub fn bind(path: &Path) -> Result<Listener, ServerError> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let dir_err = |reason: String| ServerError::Dir {
        dir: dir.clone(),
        reason,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| dir_err(e.to_string()))?;
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| dir_err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(dir_err("not a directory (or a symbolic link)".into()));
    }
    if meta.uid() != sys::my_uid() {
        return Err(dir_err(format!(
            "it belongs to uid {}, not to this user",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(dir_err(format!(
            "other users may enter it (mode {:o}); use a directory with mode 700",
            meta.mode() & 0o777
        )));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => return Err(ServerError::Running(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // A socket left by a daemon that was killed.
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    let bind_err = |source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let inner = UnixListener::bind(path).map_err(bind_err)?;
    let listener = Listener {
        inner,
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    Ok(listener)
}

/// Limits and reporting of [`serve`].
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Connections served at once; more are closed when accepted. Default 64.
    pub max_connections: usize,
    /// How long a client may take to send its request. Default 5 s.
    pub request_timeout: Duration,
    /// Receives one line per event (a VM handed out, destroyed, a client refused).
    pub log: Arc<dyn Fn(&str) + Send + Sync>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 64,
            request_timeout: Duration::from_secs(5),
            log: Arc::new(|_| {}),
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("max_connections", &self.max_connections)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Serves clients on `listener` from `pool` until `shutdown` resolves; then every open
/// connection is dropped, which destroys the VMs handed out on them.
pub async fn serve<S, R>(
    pool: Arc<Pool<S>>,
    resolver: Arc<R>,
    listener: Listener,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) where
    S: Source,
    S::Vm: Handout,
    R: Resolve,
{
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.inner.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        (options.log)("too many clients at once; closed a connection");
                        continue;
                    };
                    let (pool, resolver, options) =
                        (Arc::clone(&pool), Arc::clone(&resolver), options.clone());
                    conns.spawn(async move {
                        handle(stream, &pool, &*resolver, &options).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    drop(listener);
}

/// Reads one request: header, bounded payload, checked fields.
async fn read_request(stream: &mut UnixStream) -> Result<Option<Request>, String> {
    let mut header = [0u8; HEADER_LEN];
    match stream.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("cannot read the request: {e}")),
    }
    let len = parse_header(header, MAX_REQUEST).map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|e| format!("the request ended early: {e}"))?;
    decode_request(&payload)
        .map(Some)
        .map_err(|e: ProtoError| e.to_string())
}

async fn answer(stream: &mut UnixStream, a: &Answer) {
    if let Ok(frame) = encode(a, MAX_ANSWER) {
        let _ = stream.write_all(&frame).await;
    }
}

fn refused(reason: impl AsRef<str>) -> Answer {
    Answer::Refused {
        reason: clip(reason.as_ref(), MAX_TEXT_BYTES),
    }
}

async fn handle<S, R>(mut stream: UnixStream, pool: &Arc<Pool<S>>, resolver: &R, o: &ServerOptions)
where
    S: Source,
    S::Vm: Handout,
    R: Resolve,
{
    let me = sys::my_uid();
    let peer = match sys::peer_cred(stream.as_fd()) {
        Ok(p) => p,
        Err(e) => {
            (o.log)(&format!("cannot tell who connected ({e}); closed it"));
            return;
        }
    };
    if peer.uid != me && peer.uid != 0 {
        (o.log)(&format!(
            "refused pid {} of uid {}: this daemon serves uid {me} only",
            peer.pid, peer.uid
        ));
        let reason = format!(
            "this vmcp daemon serves uid {me} only (you are uid {}); start your own with `vmcp daemon`",
            peer.uid
        );
        answer(&mut stream, &refused(reason)).await;
        return;
    }
    let request = match tokio::time::timeout(o.request_timeout, read_request(&mut stream)).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(reason)) => {
            (o.log)(&format!("refused a request of pid {}: {reason}", peer.pid));
            answer(&mut stream, &refused(reason)).await;
            return;
        }
        Err(_) => {
            let reason = format!("no whole request within {:?}", o.request_timeout);
            answer(&mut stream, &refused(reason)).await;
            return;
        }
    };
    let req = match request {
        Request::Acquire(req) => req,
        Request::Status => {
            let report = StatusReport {
                pid: std::process::id(),
                budget_mib: pool.budget_mib(),
                used_mib: pool.used_mib(),
                profiles: pool.status(),
            };
            answer(&mut stream, &Answer::Status(report)).await;
            return;
        }
        Request::Done => {
            answer(
                &mut stream,
                &refused("no VM was handed out on this connection"),
            )
            .await;
            return;
        }
    };
    let profile = match resolver.profile_for(&req).await {
        Ok(p) => p,
        Err(reason) => {
            let reason = clip(&reason, MAX_TEXT_BYTES);
            answer(&mut stream, &Answer::NoVm { reason }).await;
            return;
        }
    };
    // A VM that died while it waited in the pool is destroyed, and the next one taken.
    let mut lease = loop {
        let mut lease = match pool.take(&profile) {
            Ok(l) => l,
            Err(e) => {
                let reason = clip(&e.to_string(), MAX_TEXT_BYTES);
                answer(&mut stream, &Answer::NoVm { reason }).await;
                return;
            }
        };
        match lease.vm() {
            Some(vm) if vm.alive() => break lease,
            Some(vm) => {
                (o.log)(&format!("VM {} died in the pool; destroyed it", vm.vm_id()));
                lease.destroy().await;
            }
            None => return,
        }
    };
    let Some(vm) = lease.vm() else {
        return;
    };
    let vm_id = vm.vm_id().to_string();
    let granted = Answer::Granted(Granted {
        vm_id: vm_id.clone(),
        token: vm.token().to_string(),
        profile: profile.clone(),
    });
    let sent = match encode(&granted, MAX_ANSWER) {
        Ok(frame) => send_frame_with_fd(&mut stream, &frame, vm.channel()).await,
        Err(e) => Err(io::Error::other(e.to_string())),
    };
    match sent {
        Ok(()) => (o.log)(&format!(
            "handed VM {vm_id} ({profile}) to pid {}",
            peer.pid
        )),
        Err(e) => {
            (o.log)(&format!("cannot hand VM {vm_id} to pid {}: {e}", peer.pid));
            lease.destroy().await;
            return;
        }
    }
    // Done, anything else, or the socket closing: the VM is used up either way.
    let _ = read_request(&mut stream).await;
    lease.destroy().await;
    (o.log)(&format!("destroyed VM {vm_id} after use"));
}

/// Writes `frame` with `fd` attached to its first byte.
async fn send_frame_with_fd(
    stream: &mut UnixStream,
    frame: &[u8],
    fd: BorrowedFd<'_>,
) -> io::Result<()> {
    let sent = loop {
        stream.writable().await?;
        let raw = stream.as_fd();
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            sys::send_with_fd(raw, frame, fd)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    if let Some(rest) = frame.get(sent..) {
        stream.write_all(rest).await?;
    }
    Ok(())
}

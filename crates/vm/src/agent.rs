//! Host side of the guest agent channel: handshake, then many concurrent requests over one
//! byte stream.
//!
//! A reader task routes every [`GuestMsg`] to the request it names; writes are serialised
//! by a mutex so frames never interleave. When the channel closes, every pending request
//! fails with [`AgentError::Closed`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, WriteHalf};
use tokio::sync::mpsc;
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, ExecRequest, ExitStatus, FailureKind, GuestMsg, Hello,
    HostMsg, ProtoError, Rekey, RequestId, CHUNK_SIZE, PROTOCOL_VERSION,
};

/// A byte stream to the guest agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentStream for T {}

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The channel closed (the VM stopped or the agent died).
    #[error("the guest agent channel is closed")]
    Closed,
    /// The agent did not say hello in time.
    #[error("the guest agent did not say hello within {0:?}")]
    HelloTimeout(Duration),
    /// The first message was not a hello.
    #[error("the guest agent sent {0} before its hello")]
    NoHello(String),
    /// The agent speaks another protocol version.
    #[error("the guest agent speaks protocol {guest}, this vmcp speaks {PROTOCOL_VERSION}: rebuild the image with `vmcp image build --force`")]
    Version {
        /// The agent's version.
        guest: u16,
    },
    /// The channel token did not match: something else connected to the channel.
    #[error("the peer on the agent channel presented a wrong token; dropped it")]
    BadToken,
    /// Framing or I/O failed.
    #[error("agent channel protocol error")]
    Proto(#[from] ProtoError),
    /// The guest refused a request.
    #[error("{message}")]
    Failed {
        /// Classification.
        kind: FailureKind,
        /// Guest's reason.
        message: String,
    },
    /// The guest answered with a message that does not fit the request.
    #[error("unexpected answer from the guest agent: {0}")]
    Unexpected(String),
    /// A file is larger than the caller's limit.
    #[error("the file is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// A request argument is invalid on the host side already.
    #[error("{0}")]
    Invalid(String),
}

type Route = mpsc::UnboundedSender<GuestMsg>;

struct Shared {
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn AgentStream>>>,
    routes: Mutex<HashMap<RequestId, Route>>,
    next_id: AtomicU32,
    closed: AtomicBool,
    hello: Hello,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Route>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A session with one guest agent. Cheap to clone; all clones share the channel.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("hello", &self.shared.hello)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// What to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<String>,
    /// Whether stdin will be streamed (else `/dev/null`).
    pub stdin: bool,
}

impl ExecSpec {
    /// A spec for `argv` with no stdin.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(argv: I) -> Self {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Something a running guest process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// Stdout bytes.
    Stdout(Vec<u8>),
    /// Stderr bytes.
    Stderr(Vec<u8>),
    /// The process ended (always the last event).
    Exited(ExitStatus),
}

/// Collected result of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// All stdout.
    pub stdout: Vec<u8>,
    /// All stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

/// A process running in the guest.
#[derive(Debug)]
pub struct Process {
    control: ProcessControl,
    pid: u32,
    events: mpsc::UnboundedReceiver<GuestMsg>,
    done: bool,
}

impl AgentClient {
    /// Waits for the agent's hello on `stream`, checks protocol version and `token`, and starts
    /// the reader task. Must be called inside a tokio runtime.
    pub async fn connect<S: AgentStream>(
        stream: S,
        token: &str,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let stream: Box<dyn AgentStream> = Box::new(stream);
        let (mut reader, writer) = tokio::io::split(stream);
        let mut buf = Vec::new();
        let first = tokio::time::timeout(
            timeout,
            read_msg_async::<GuestMsg, _>(&mut reader, &mut buf),
        )
        .await
        .map_err(|_| AgentError::HelloTimeout(timeout))??;
        let hello = match first {
            Some(GuestMsg::Hello(h)) => h,
            Some(other) => return Err(AgentError::NoHello(format!("{other:?}"))),
            None => return Err(AgentError::Closed),
        };
        check_hello(&hello, token)?;
        Ok(Self::serve(reader, writer, hello, buf))
    }

    /// After a snapshot restore: gives the agent its new identity (`rekey`: token, entropy,
    /// clock, hostname) and waits for the hello that presents the new token. A hello with any
    /// other token (the snapshot's own) is refused, so the token left in the snapshot's
    /// memory never opens this VM's channel. The agent must have the
    /// [`vmcp_guest_proto::Capabilities::REKEY`] capability (it announced it when the
    /// snapshot was taken; an agent without it answers with a failure).
    ///
    /// `old_hello`: where the channel reconnects after a restore (vsock), the agent first
    /// says hello with the token it was saved with; that hello must carry exactly this token.
    pub async fn connect_restored<S: AgentStream>(
        stream: S,
        rekey: Rekey,
        old_hello: Option<&str>,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        let stream: Box<dyn AgentStream> = Box::new(stream);
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut buf = Vec::new();
        let token = rekey.token.clone();
        let exchange = async {
            if let Some(old) = old_hello {
                match read_msg_async::<GuestMsg, _>(&mut reader, &mut buf).await? {
                    Some(GuestMsg::Hello(h)) => check_hello(&h, old)?,
                    Some(other) => return Err(AgentError::NoHello(format!("{other:?}"))),
                    None => return Err(AgentError::Closed),
                }
            }
            write_msg_async(&mut writer, &HostMsg::Rekey(rekey))
                .await
                .map_err(|e| match e {
                    ProtoError::Io(_) => AgentError::Closed,
                    other => AgentError::Proto(other),
                })?;
            match read_msg_async::<GuestMsg, _>(&mut reader, &mut buf).await? {
                Some(GuestMsg::Hello(h)) => Ok(h),
                Some(GuestMsg::Failed { kind, message, .. }) => {
                    Err(AgentError::Failed { kind, message })
                }
                Some(other) => Err(AgentError::NoHello(format!("{other:?}"))),
                None => Err(AgentError::Closed),
            }
        };
        let hello = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AgentError::HelloTimeout(timeout))??;
        check_hello(&hello, &token)?;
        Ok(Self::serve(reader, writer, hello, buf))
    }

    /// Starts the reader task of a channel whose hello was accepted.
    fn serve(
        mut reader: tokio::io::ReadHalf<Box<dyn AgentStream>>,
        writer: WriteHalf<Box<dyn AgentStream>>,
        hello: Hello,
        mut buf: Vec<u8>,
    ) -> AgentClient {
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(writer),
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            hello,
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                let msg = read_msg_async::<GuestMsg, _>(&mut reader, &mut buf).await;
                let Some(shared) = weak.upgrade() else { break };
                match msg {
                    Ok(Some(msg)) => route(&shared, msg),
                    Ok(None) => {
                        close(&shared);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "guest agent channel failed");
                        close(&shared);
                        break;
                    }
                }
            }
        });
        AgentClient { shared }
    }

    /// What the agent announced.
    pub fn hello(&self) -> &Hello {
        &self.shared.hello
    }

    /// What the agent announced, as the lifecycle API reports it; `ready_after` is the host
    /// time from start to the hello.
    pub fn info(&self, ready_after: Duration) -> crate::AgentInfo {
        let hello = &self.shared.hello;
        crate::AgentInfo {
            protocol_version: hello.protocol_version,
            agent_version: hello.agent_version.clone(),
            capabilities: hello.capabilities,
            guest_boot: Duration::from_nanos(hello.boot_ns),
            ready_after,
        }
    }

    /// Whether the channel has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    fn register(&self) -> Result<(RequestId, mpsc::UnboundedReceiver<GuestMsg>), AgentError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut routes = self.shared.routes();
        if self.is_closed() {
            return Err(AgentError::Closed);
        }
        let id = loop {
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !routes.contains_key(&id) {
                break id;
            }
        };
        routes.insert(id, tx);
        Ok((id, rx))
    }

    fn unregister(&self, id: RequestId) {
        self.shared.routes().remove(&id);
    }

    async fn send(&self, msg: &HostMsg) -> Result<(), AgentError> {
        if self.is_closed() {
            return Err(AgentError::Closed);
        }
        let mut w = self.shared.writer.lock().await;
        write_msg_async(&mut *w, msg).await.map_err(|e| match e {
            ProtoError::Io(_) => AgentError::Closed,
            other => AgentError::Proto(other),
        })
    }

    async fn one_answer(
        &self,
        id: RequestId,
        rx: &mut mpsc::UnboundedReceiver<GuestMsg>,
    ) -> Result<GuestMsg, AgentError> {
        let msg = rx.recv().await.ok_or(AgentError::Closed);
        if let Ok(GuestMsg::Failed { kind, message, .. }) = msg {
            self.unregister(id);
            return Err(AgentError::Failed { kind, message });
        }
        msg
    }

    /// Round trip to the agent; returns the time it took.
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let (id, mut rx) = self.register()?;
        let t = Instant::now();
        let res = async {
            self.send(&HostMsg::Ping { id }).await?;
            match self.one_answer(id, &mut rx).await? {
                GuestMsg::Pong { .. } => Ok(t.elapsed()),
                other => Err(AgentError::Unexpected(format!("{other:?}"))),
            }
        }
        .await;
        self.unregister(id);
        res
    }

    /// Starts a process; returns once the guest reports it running.
    pub async fn exec(&self, spec: ExecSpec) -> Result<Process, AgentError> {
        if spec.argv.is_empty() {
            return Err(AgentError::Invalid("no program given".into()));
        }
        let (id, mut rx) = self.register()?;
        let req = HostMsg::Exec(ExecRequest {
            id,
            argv: spec.argv,
            env: spec.env,
            cwd: spec.cwd,
            stdin: spec.stdin,
        });
        if let Err(e) = self.send(&req).await {
            self.unregister(id);
            return Err(e);
        }
        match self.one_answer(id, &mut rx).await {
            Ok(GuestMsg::Started { pid, .. }) => Ok(Process {
                control: ProcessControl {
                    id,
                    client: self.clone(),
                },
                pid,
                events: rx,
                done: false,
            }),
            Ok(other) => {
                self.unregister(id);
                Err(AgentError::Unexpected(format!("{other:?}")))
            }
            Err(e) => {
                self.unregister(id);
                Err(e)
            }
        }
    }

    /// Writes `data` to `path` in the guest (created or truncated, permission bits `mode`).
    pub async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), AgentError> {
        let (id, mut rx) = self.register()?;
        let res = async {
            let mut offset = 0usize;
            loop {
                let end = (offset + CHUNK_SIZE).min(data.len());
                let last = end == data.len();
                self.send(&HostMsg::WriteFile {
                    id,
                    path: path.to_string(),
                    mode,
                    offset: offset as u64,
                    data: data[offset..end].to_vec(),
                    last,
                })
                .await?;
                match self.one_answer(id, &mut rx).await? {
                    GuestMsg::Done { .. } => {}
                    other => return Err(AgentError::Unexpected(format!("{other:?}"))),
                }
                if last {
                    return Ok(());
                }
                offset = end;
            }
        }
        .await;
        self.unregister(id);
        res
    }

    /// Reads the whole file `path` from the guest.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, AgentError> {
        self.read_file_max(path, usize::MAX).await
    }

    /// Reads the file `path` from the guest, failing with [`AgentError::TooLarge`] as soon as
    /// more than `max` bytes arrived (the rest the guest still sends is dropped unread), so
    /// the host never holds more than `max` bytes of it.
    pub async fn read_file_max(&self, path: &str, max: usize) -> Result<Vec<u8>, AgentError> {
        let (id, mut rx) = self.register()?;
        let res = async {
            self.send(&HostMsg::ReadFile {
                id,
                path: path.to_string(),
            })
            .await?;
            let mut out = Vec::new();
            loop {
                match self.one_answer(id, &mut rx).await? {
                    GuestMsg::FileData { data, eof, .. } => {
                        if out.len().saturating_add(data.len()) > max {
                            return Err(AgentError::TooLarge { limit: max });
                        }
                        out.extend_from_slice(&data);
                        if eof {
                            return Ok(out);
                        }
                    }
                    other => return Err(AgentError::Unexpected(format!("{other:?}"))),
                }
            }
        }
        .await;
        self.unregister(id);
        res
    }

    /// Asks the guest to sync and power off. Returns when the agent has accepted (or the
    /// channel closed because it already went down).
    pub async fn poweroff(&self) -> Result<(), AgentError> {
        let (id, mut rx) = self.register()?;
        let res = async {
            self.send(&HostMsg::Poweroff { id }).await?;
            match rx.recv().await {
                Some(GuestMsg::Done { .. }) | None => Ok(()),
                Some(GuestMsg::Failed { kind, message, .. }) => {
                    Err(AgentError::Failed { kind, message })
                }
                Some(other) => Err(AgentError::Unexpected(format!("{other:?}"))),
            }
        }
        .await;
        self.unregister(id);
        res
    }
}

fn route(shared: &Shared, msg: GuestMsg) {
    let id = match &msg {
        GuestMsg::Pong { id }
        | GuestMsg::Started { id, .. }
        | GuestMsg::Stdout { id, .. }
        | GuestMsg::Stderr { id, .. }
        | GuestMsg::Exited { id, .. }
        | GuestMsg::Done { id }
        | GuestMsg::Failed { id, .. }
        | GuestMsg::FileData { id, .. } => *id,
        other => {
            tracing::debug!(?other, "unrouted message from the guest agent");
            return;
        }
    };
    let mut routes = shared.routes();
    if let Some(tx) = routes.get(&id) {
        if tx.send(msg).is_err() {
            routes.remove(&id);
        }
    }
}

fn close(shared: &Shared) {
    let mut routes = shared.routes();
    shared.closed.store(true, Ordering::Release);
    routes.clear();
}

/// A new identity for a VM restored from a snapshot: `token`, fresh random bytes from the
/// host for the guest's kernel RNG, the host's wall clock now, and `hostname`.
pub fn new_identity(token: &str, hostname: &str) -> Rekey {
    let mut entropy = Vec::with_capacity(64);
    entropy.extend_from_slice(&rand::random::<[u8; 32]>());
    entropy.extend_from_slice(&rand::random::<[u8; 32]>());
    let unix_time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Rekey {
        id: 0,
        token: token.to_string(),
        entropy,
        unix_time_ns,
        hostname: hostname.to_string(),
    }
}

/// The token and protocol version of a hello.
fn check_hello(hello: &Hello, token: &str) -> Result<(), AgentError> {
    if !constant_time_eq(hello.token.as_bytes(), token.as_bytes()) {
        return Err(AgentError::BadToken);
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(AgentError::Version {
            guest: hello.protocol_version,
        });
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Process {
    /// Guest process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle that can send stdin and signals while another task reads events.
    pub fn control(&self) -> &ProcessControl {
        &self.control
    }

    /// Next output or the exit. `Ok(None)` after the exit was returned.
    pub async fn next_event(&mut self) -> Result<Option<ProcessEvent>, AgentError> {
        if self.done {
            return Ok(None);
        }
        match self.events.recv().await {
            Some(GuestMsg::Stdout { data, .. }) => Ok(Some(ProcessEvent::Stdout(data))),
            Some(GuestMsg::Stderr { data, .. }) => Ok(Some(ProcessEvent::Stderr(data))),
            Some(GuestMsg::Exited { status, .. }) => {
                self.done = true;
                self.control.client.unregister(self.control.id);
                Ok(Some(ProcessEvent::Exited(status)))
            }
            Some(GuestMsg::Failed { kind, message, .. }) => {
                self.done = true;
                self.control.client.unregister(self.control.id);
                Err(AgentError::Failed { kind, message })
            }
            Some(other) => Err(AgentError::Unexpected(format!("{other:?}"))),
            None => {
                self.done = true;
                Err(AgentError::Closed)
            }
        }
    }

    /// Collects all output until the process exits.
    pub async fn wait_with_output(mut self) -> Result<Output, AgentError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            match self.next_event().await? {
                Some(ProcessEvent::Stdout(d)) => stdout.extend_from_slice(&d),
                Some(ProcessEvent::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(ProcessEvent::Exited(status)) => {
                    return Ok(Output {
                        stdout,
                        stderr,
                        status,
                    })
                }
                None => return Err(AgentError::Closed),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if !self.done {
            self.control.client.unregister(self.control.id);
        }
    }
}

/// Sends stdin and signals to a running process from another task.
#[derive(Debug, Clone)]
pub struct ProcessControl {
    id: RequestId,
    client: AgentClient,
}

impl ProcessControl {
    /// Sends bytes to the process's stdin (only if the spec asked for stdin).
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(CHUNK_SIZE) {
            self.client
                .send(&HostMsg::Stdin {
                    id: self.id,
                    data: chunk.to_vec(),
                })
                .await?;
        }
        Ok(())
    }
    /// Closes its stdin.
    pub async fn close_stdin(&self) -> Result<(), AgentError> {
        self.client.send(&HostMsg::StdinEof { id: self.id }).await
    }
    /// Sends a signal (Linux numbering, e.g. 9 for SIGKILL).
    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.client
            .send(&HostMsg::Signal {
                id: self.id,
                signal,
            })
            .await
    }
}

#[cfg(test)]
mod tests;

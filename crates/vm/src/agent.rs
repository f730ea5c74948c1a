//! Host side of the guest agent channel: handshake, then many concurrent requests over one
//! byte stream.
//!
//! A reader task routes every [`GuestMsg`] to the request it names; a writer task writes
//! whole frames from a short queue, so frames never interleave and a caller that gives up
//! half-way (a dropped future) never leaves half a frame on the channel. When the channel
//! closes, every pending request fails with [`AgentError::Closed`] (or with the reason the
//! channel was closed, [`AgentError::ChannelFailed`]).
//!
//! # Bounds (what a hostile or broken guest can make the host hold)
//!
//! - **Memory per request**: the answers of one request wait in its queue, which holds at
//!   most [`STREAM_WINDOW`] credit units of output plus [`CONTROL_SLACK`] other messages.
//!   The guest sends output only within the window and the client gives credit back
//!   ([`HostMsg::Credit`]) as the consumer takes it ([`Process::next_event`] and the
//!   collecting calls), so a consumer that stops reading stops the guest process, for every
//!   user of this API. A guest that overruns the window breaks the protocol: the channel is
//!   closed with [`AgentError::ChannelFailed`]. Stdin travels in the same window the other
//!   way ([`ProcessControl::write_stdin`] waits for [`GuestMsg::StdinCredit`]).
//! - **Collected bytes**: [`AgentClient::read_file`] and [`Process::wait_with_output`] stop at
//!   [`AgentLimits::max_collect`] bytes with [`AgentError::TooLarge`].
//! - **Time**: a request waits at most [`AgentLimits::answer_timeout`] for its next answer
//!   (`Started`, `Pong`, `Done`, a file chunk); a running process that stays silent for
//!   [`AgentLimits::idle_ping`] makes the client ping the agent, and an agent that does not
//!   answer within the answer timeout is declared dead ([`AgentError::NoAnswer`], the channel
//!   is closed).
//! - **Text**: guest text in errors (failure messages, unexpected answers) is passed through
//!   [`vmcp_sanitize::sanitize`]: no control characters, at most
//!   [`vmcp_sanitize::DEFAULT_MAX_CHARS`] characters.
//! - **CPU**: frames are decoded with [`FrameReader`], amortised O(1) per frame; answers to
//!   unknown requests are dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use vmcp_guest_proto::{
    credit_cost, encode, ExecRequest, ExitStatus, FailureKind, FrameReader, GuestMsg, Hello,
    HostMsg, ProtoError, Rekey, RequestId, CHUNK_SIZE, MSG_COST, PROTOCOL_VERSION, STREAM_WINDOW,
};
use vmcp_sanitize::{sanitize, DEFAULT_MAX_CHARS};

/// A byte stream to the guest agent.
pub trait AgentStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The stream as [`std::any::Any`], so that a caller who knows its concrete type (the
    /// warm pool: a Unix socket it passes to another process) can take it back.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AgentStream for T {
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// Messages other than output (`Started`, `Exited`, `Pong`, `Done`, ...) one request's queue
/// may hold besides its window of output; a correct agent sends at most three at a time.
pub const CONTROL_SLACK: u32 = 16;

/// Frames waiting for the writer task (each at most one chunk plus a header).
const FRAME_QUEUE: usize = 16;

/// The consumer gives credit back once it has taken this much (a quarter window), so one
/// `Credit` frame covers several output chunks.
const CREDIT_BATCH: u32 = STREAM_WINDOW / 4;

/// Time and size bounds of one client. The defaults fit every correct guest with a wide
/// margin (a ping takes well under a millisecond, starting a process a few).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentLimits {
    /// How long a request waits for its next answer (`Started`, `Pong`, `Done`, the next
    /// file chunk, a liveness ping's `Pong`). Default 30 s.
    pub answer_timeout: Duration,
    /// How long a running process may stay silent before the client pings the agent to see
    /// that it is alive. Default 15 s.
    pub idle_ping: Duration,
    /// Most bytes [`AgentClient::read_file`] and [`Process::wait_with_output`] collect
    /// (stdout and stderr together). Default 64 MiB.
    pub max_collect: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        AgentLimits {
            answer_timeout: Duration::from_secs(30),
            idle_ping: Duration::from_secs(15),
            max_collect: 64 * 1024 * 1024,
        }
    }
}

/// Errors talking to the guest agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The channel closed (the VM stopped or the agent died).
    #[error("the guest agent channel is closed")]
    Closed,
    /// The channel was closed because something went wrong on it.
    #[error("the guest agent channel was closed: {0}")]
    ChannelFailed(String),
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
        /// Guest's reason (control characters escaped, length capped).
        message: String,
    },
    /// The guest answered with a message that does not fit the request.
    #[error("unexpected answer from the guest agent: {0}")]
    Unexpected(String),
    /// The agent did not answer in time.
    #[error("the guest agent did not answer {what} within {after:?}")]
    NoAnswer {
        /// What was asked.
        what: &'static str,
        /// How long the client waited.
        after: Duration,
    },
    /// More bytes than the client collects.
    #[error("{what} is larger than {limit} bytes{action}")]
    TooLarge {
        /// What was collected.
        what: &'static str,
        /// The limit ([`AgentLimits::max_collect`]).
        limit: usize,
        /// What was done about it (e.g. "; the process was killed").
        action: &'static str,
    },
    /// Stdin cannot be written: it was not requested, was closed, or the process ended.
    #[error("the process's stdin is closed")]
    StdinClosed,
    /// The process was started without stdin (its spec did not ask for it).
    #[error("the process was started without stdin: ask for stdin when starting it")]
    NoStdin,
    /// A request argument is invalid on the host side already.
    #[error("{0}")]
    Invalid(String),
}

/// Most answers to the old host a restored guest may send before its new hello.
pub const MAX_STALE_ANSWERS: usize = 1024;

/// Largest change list accepted from a guest ([`AgentClient::list_changes`]).
pub const MAX_CHANGES_BYTES: usize = 16 * 1024 * 1024 + 64 * 1024;

/// How a path changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Created.
    Added,
    /// Contents or metadata changed.
    Modified,
    /// Deleted.
    Deleted,
}

/// One changed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// Absolute guest path, with `%`, control bytes, DEL and non-ASCII bytes as `%XX` (safe
    /// to print).
    pub path: String,
}

/// A change list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Changes {
    /// The changes, in walk order.
    pub changes: Vec<Change>,
    /// The guest stopped listing at its size bound.
    pub truncated: bool,
}

impl Changes {
    /// Parses the agent's text; lines it does not understand are skipped.
    pub fn parse(text: &[u8]) -> Changes {
        let mut out = Changes::default();
        for line in text.split(|&b| b == b'\n') {
            if line == b"! truncated" {
                out.truncated = true;
                continue;
            }
            let kind = match line.first() {
                Some(b'A') => ChangeKind::Added,
                Some(b'M') => ChangeKind::Modified,
                Some(b'D') => ChangeKind::Deleted,
                _ => continue,
            };
            // The agent escapes everything but printable ASCII; anything else is dropped.
            let Some(path) = line.get(2..).filter(|p| {
                line.get(1) == Some(&b' ')
                    && p.first() == Some(&b'/')
                    && p.iter().all(|b| (0x20..0x7f).contains(b))
            }) else {
                continue;
            };
            out.changes.push(Change {
                kind,
                path: String::from_utf8_lossy(path).into_owned(),
            });
        }
        out
    }
}

/// Where the reader task puts the answers of one request.
struct Route {
    tx: mpsc::UnboundedSender<GuestMsg>,
    /// Units queued in `tx` and not yet taken ([`queue_cost`] of each message).
    queued: Arc<AtomicU64>,
    /// The stdin window of an exec with stdin.
    stdin: Option<Arc<StdinWindow>>,
}

/// The host-to-guest window of one process's stdin.
struct StdinWindow {
    /// Credit units the client may still send.
    permits: Semaphore,
    /// Units sent and not yet given back by the guest.
    outstanding: AtomicU64,
}

/// What a message costs in its request's queue: its window cost for output, [`MSG_COST`]
/// for anything else.
fn queue_cost(msg: &GuestMsg) -> u64 {
    match msg.window_cost() {
        0 => u64::from(MSG_COST),
        c => u64::from(c),
    }
}

/// Most units one request's queue may hold: a full window plus the control slack.
const QUEUE_LIMIT: u64 = STREAM_WINDOW as u64 + CONTROL_SLACK as u64 * MSG_COST as u64;

struct Shared {
    frames: mpsc::Sender<Vec<u8>>,
    routes: Mutex<HashMap<RequestId, Route>>,
    next_id: AtomicU32,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    hello: Hello,
    limits: AgentLimits,
    /// Variables every exec of this session gets under its own (see
    /// [`AgentClient::set_default_env`]).
    default_env: Mutex<Vec<(String, String)>>,
}

impl Shared {
    fn routes(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Route>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.close_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The error of a request that finds the channel closed.
    fn closed_error(&self) -> AgentError {
        match self.reason().clone() {
            Some(reason) => AgentError::ChannelFailed(reason),
            None => AgentError::Closed,
        }
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

/// The receiving end of one request's answers; gives credit back as it takes output.
#[derive(Debug)]
struct Answers {
    id: RequestId,
    rx: mpsc::UnboundedReceiver<GuestMsg>,
    queued: Arc<AtomicU64>,
    /// Output units taken and not yet given back.
    uncredited: u32,
}

impl Answers {
    /// The next answer, `None` when the route is gone (channel closed). Cancel-safe: credit
    /// owed is sent before waiting and kept until it is sent.
    async fn recv(&mut self, client: &AgentClient) -> Option<GuestMsg> {
        if self.uncredited >= CREDIT_BATCH {
            self.give_credit(client).await;
        }
        let msg = self.rx.recv().await?;
        self.queued.fetch_sub(queue_cost(&msg), Ordering::AcqRel);
        self.uncredited = self.uncredited.saturating_add(msg.window_cost());
        Some(msg)
    }

    async fn give_credit(&mut self, client: &AgentClient) {
        let msg = HostMsg::Credit {
            id: self.id,
            credit: self.uncredited,
        };
        // A closed channel needs no credit; the next recv reports it.
        if client.send(&msg).await.is_ok() {
            self.uncredited = 0;
        }
    }
}

/// A process running in the guest.
#[derive(Debug)]
pub struct Process {
    control: ProcessControl,
    pid: u32,
    events: Answers,
    done: bool,
}

impl AgentClient {
    /// Waits for the agent's hello on `stream`, checks protocol version and `token`, and starts
    /// the reader and writer tasks, with the default [`AgentLimits`]. Must be called inside a
    /// tokio runtime.
    pub async fn connect<S: AgentStream>(
        stream: S,
        token: &str,
        timeout: Duration,
    ) -> Result<AgentClient, AgentError> {
        Self::connect_with_limits(stream, token, timeout, AgentLimits::default()).await
    }

    /// [`AgentClient::connect`] with other limits.
    pub async fn connect_with_limits<S: AgentStream>(
        stream: S,
        token: &str,
        timeout: Duration,
        limits: AgentLimits,
    ) -> Result<AgentClient, AgentError> {
        let stream: Box<dyn AgentStream> = Box::new(stream);
        let (reader, writer) = tokio::io::split(stream);
        let mut reader = FrameReader::new(reader);
        let first = tokio::time::timeout(timeout, reader.next::<GuestMsg>())
            .await
            .map_err(|_| AgentError::HelloTimeout(timeout))??;
        let hello = match first {
            Some(GuestMsg::Hello(h)) => h,
            Some(other) => return Err(AgentError::NoHello(describe(&other))),
            None => return Err(AgentError::Closed),
        };
        check_hello(&hello, token)?;
        Ok(Self::serve(reader, writer, hello, limits))
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
        let (reader, mut writer) = tokio::io::split(stream);
        let mut reader = FrameReader::new(reader);
        let token = rekey.token.clone();
        let rekey_id = rekey.id;
        let exchange = async {
            if let Some(old) = old_hello {
                match reader.next::<GuestMsg>().await? {
                    Some(GuestMsg::Hello(h)) => check_hello(&h, old)?,
                    Some(other) => return Err(AgentError::NoHello(describe(&other))),
                    None => return Err(AgentError::Closed),
                }
            }
            let frame = encode(&HostMsg::Rekey(rekey))?;
            let written = async {
                writer.write_all(&frame).await?;
                writer.flush().await
            };
            written.await.map_err(|_| AgentError::Closed)?;
            // Answers the saved guest still owed its old host (output, a tunnel's end) may
            // come before the new hello: they belong to no request of this session.
            let mut stale = 0;
            loop {
                match reader.next::<GuestMsg>().await? {
                    Some(GuestMsg::Hello(h)) => return Ok(h),
                    Some(GuestMsg::Failed {
                        id, kind, message, ..
                    }) if id == rekey_id => return Err(failed(kind, &message)),
                    Some(other) if other.request_id().is_some() && stale < MAX_STALE_ANSWERS => {
                        stale += 1;
                    }
                    Some(other) => return Err(AgentError::NoHello(describe(&other))),
                    None => return Err(AgentError::Closed),
                }
            }
        };
        let hello = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AgentError::HelloTimeout(timeout))??;
        check_hello(&hello, &token)?;
        Ok(Self::serve(reader, writer, hello, AgentLimits::default()))
    }

    /// Starts the reader and writer tasks of a channel whose hello was accepted.
    fn serve(
        mut reader: FrameReader<tokio::io::ReadHalf<Box<dyn AgentStream>>>,
        mut writer: tokio::io::WriteHalf<Box<dyn AgentStream>>,
        mut hello: Hello,
        limits: AgentLimits,
    ) -> AgentClient {
        hello.agent_version = sanitize(&hello.agent_version, 64);
        let (frames, mut frame_rx) = mpsc::channel::<Vec<u8>>(FRAME_QUEUE);
        let shared = Arc::new(Shared {
            frames,
            routes: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            hello,
            limits,
            default_env: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                let msg = reader.next::<GuestMsg>().await;
                let Some(shared) = weak.upgrade() else { break };
                match msg {
                    Ok(Some(msg)) => {
                        if let Err(reason) = route(&shared, msg) {
                            tracing::warn!(%reason, "closing the guest agent channel");
                            close(&shared, Some(reason));
                            break;
                        }
                    }
                    Ok(None) => {
                        close(&shared, None);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "guest agent channel failed");
                        close(&shared, Some(error_text(&e)));
                        break;
                    }
                }
            }
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            // Ends when every client is gone (the queue's senders drop) or a write fails.
            while let Some(frame) = frame_rx.recv().await {
                let written = async {
                    writer.write_all(&frame).await?;
                    writer.flush().await
                };
                if let Err(e) = written.await {
                    if let Some(shared) = weak.upgrade() {
                        close(
                            &shared,
                            Some(format!("cannot write to the guest agent: {e}")),
                        );
                    }
                    break;
                }
            }
            let _ = writer.shutdown().await;
        });
        AgentClient { shared }
    }

    /// What the agent announced.
    pub fn hello(&self) -> &Hello {
        &self.shared.hello
    }

    /// The limits of this client.
    pub fn limits(&self) -> AgentLimits {
        self.shared.limits
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

    /// Variables every later exec of this session (all clones of this client) gets, under
    /// those of its own spec: how the lifecycle points processes at an egress proxy that
    /// travels over the agent channel without writing it into the guest's boot state.
    pub fn set_default_env(&self, env: Vec<(String, String)>) {
        *self
            .shared
            .default_env
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = env;
    }

    /// Whether the channel has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    fn register(&self, stdin: bool) -> Result<(Answers, Option<Arc<StdinWindow>>), AgentError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU64::new(0));
        let stdin = stdin.then(|| {
            Arc::new(StdinWindow {
                permits: Semaphore::new(STREAM_WINDOW as usize),
                outstanding: AtomicU64::new(0),
            })
        });
        let mut routes = self.shared.routes();
        if self.is_closed() {
            return Err(self.shared.closed_error());
        }
        let id = loop {
            let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !routes.contains_key(&id) {
                break id;
            }
        };
        routes.insert(
            id,
            Route {
                tx,
                queued: Arc::clone(&queued),
                stdin: stdin.clone(),
            },
        );
        let answers = Answers {
            id,
            rx,
            queued,
            uncredited: 0,
        };
        Ok((answers, stdin))
    }

    fn unregister(&self, id: RequestId) {
        if let Some(route) = self.shared.routes().remove(&id) {
            if let Some(w) = route.stdin {
                w.permits.close();
            }
        }
    }

    /// Stops the answers of `id` (unregisters it and tells the guest to stop sending), from
    /// synchronous code too.
    fn discard(&self, id: RequestId) {
        self.unregister(id);
        queue_discard(&self.shared, id);
    }

    async fn send(&self, msg: &HostMsg) -> Result<(), AgentError> {
        if self.is_closed() {
            return Err(self.shared.closed_error());
        }
        let frame = encode(msg)?;
        self.shared
            .frames
            .send(frame)
            .await
            .map_err(|_| self.shared.closed_error())
    }

    /// The next answer to a request, within the answer timeout; a `Failed` becomes an error.
    async fn one_answer(
        &self,
        answers: &mut Answers,
        what: &'static str,
    ) -> Result<GuestMsg, AgentError> {
        let after = self.shared.limits.answer_timeout;
        let msg = tokio::time::timeout(after, answers.recv(self))
            .await
            .map_err(|_| AgentError::NoAnswer { what, after })?;
        match msg {
            Some(GuestMsg::Failed { kind, message, .. }) => Err(failed(kind, &message)),
            Some(msg) => Ok(msg),
            None => Err(self.shared.closed_error()),
        }
    }

    /// Round trip to the agent; returns the time it took. Fails with
    /// [`AgentError::NoAnswer`] after [`AgentLimits::answer_timeout`].
    pub async fn ping(&self) -> Result<Duration, AgentError> {
        let (mut answers, _) = self.register(false)?;
        let id = answers.id;
        let t = Instant::now();
        let res = async {
            self.send(&HostMsg::Ping { id }).await?;
            match self.one_answer(&mut answers, "a ping").await? {
                GuestMsg::Pong { .. } => Ok(t.elapsed()),
                other => Err(AgentError::Unexpected(describe(&other))),
            }
        }
        .await;
        self.unregister(id);
        res
    }

    /// Starts a process; returns once the guest reports it running (or fails with
    /// [`AgentError::NoAnswer`] after [`AgentLimits::answer_timeout`]).
    pub async fn exec(&self, spec: ExecSpec) -> Result<Process, AgentError> {
        if spec.argv.is_empty() {
            return Err(AgentError::Invalid("no program given".into()));
        }
        let (mut answers, stdin) = self.register(spec.stdin)?;
        let id = answers.id;
        // The session's defaults first: the agent applies later variables over earlier ones.
        let mut env = self
            .shared
            .default_env
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        env.extend(spec.env);
        let req = HostMsg::Exec(ExecRequest {
            id,
            argv: spec.argv,
            env,
            cwd: spec.cwd,
            stdin: spec.stdin,
        });
        let started = async {
            self.send(&req).await?;
            match self
                .one_answer(&mut answers, "the start of a process")
                .await?
            {
                GuestMsg::Started { pid, .. } => Ok(pid),
                other => Err(AgentError::Unexpected(describe(&other))),
            }
        }
        .await;
        match started {
            Ok(pid) => Ok(Process {
                control: ProcessControl {
                    id,
                    client: self.clone(),
                    stdin,
                },
                pid,
                events: answers,
                done: false,
            }),
            Err(e) => {
                // A process that starts late must not run unobserved with a blocked window.
                self.discard(id);
                Err(e)
            }
        }
    }

    /// Writes `data` to `path` in the guest (created or truncated, permission bits `mode`).
    pub async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), AgentError> {
        let (mut answers, _) = self.register(false)?;
        let id = answers.id;
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
                match self.one_answer(&mut answers, "a file write").await? {
                    GuestMsg::Done { .. } => {}
                    other => return Err(AgentError::Unexpected(describe(&other))),
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

    /// Reads the whole file `path` from the guest, at most [`AgentLimits::max_collect`]
    /// bytes ([`AgentError::TooLarge`] beyond).
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, AgentError> {
        self.read_file_max(path, self.shared.limits.max_collect)
            .await
    }

    /// Reads the file `path` from the guest, failing with [`AgentError::TooLarge`] as soon as
    /// more than `max` bytes arrived (the guest is told to stop sending the rest), so the
    /// host never holds more than `max` bytes of it.
    pub async fn read_file_max(&self, path: &str, max: usize) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        let request = |id| HostMsg::ReadFile {
            id,
            path: path.to_string(),
        };
        let mut sink = |data: &[u8]| {
            out.extend_from_slice(data);
            Ok(())
        };
        self.collect_chunks(request, "a file read", "the file", max as u64, &mut sink)
            .await?;
        Ok(out)
    }

    /// Sends the request `request(id)` makes and feeds the guest's [`GuestMsg::FileData`]
    /// answers to `sink` until the last one; returns the bytes received. More than `max` bytes
    /// in all is [`AgentError::TooLarge`] naming `what`, raised before the chunk that would
    /// pass the bound reaches `sink` (the rest of the answer is discarded).
    async fn collect_chunks(
        &self,
        request: impl FnOnce(RequestId) -> HostMsg,
        waiting_for: &'static str,
        what: &'static str,
        max: u64,
        sink: &mut (dyn FnMut(&[u8]) -> Result<(), AgentError> + Send),
    ) -> Result<u64, AgentError> {
        let (mut answers, _) = self.register(false)?;
        let id = answers.id;
        let res = async {
            self.send(&request(id)).await?;
            let mut total: u64 = 0;
            loop {
                match self.one_answer(&mut answers, waiting_for).await? {
                    GuestMsg::FileData { data, eof, .. } => {
                        total = total.saturating_add(data.len() as u64);
                        if total > max {
                            return Err(AgentError::TooLarge {
                                what,
                                limit: usize::try_from(max).unwrap_or(usize::MAX),
                                action: "",
                            });
                        }
                        sink(&data)?;
                        if eof {
                            return Ok(total);
                        }
                    }
                    other => return Err(AgentError::Unexpected(describe(&other))),
                }
            }
        }
        .await;
        match &res {
            Ok(_) => self.unregister(id),
            Err(_) => self.discard(id),
        }
        res
    }

    /// What processes changed under the writable layer of an image root (`vmcp run --image`):
    /// one [`Change`] per created, modified or deleted path. The guest's answer is bounded
    /// by [`MAX_CHANGES_BYTES`]; an agent that sends more is cut off with an error.
    pub async fn list_changes(&self) -> Result<Changes, AgentError> {
        let mut text = Vec::new();
        let mut sink = |data: &[u8]| {
            text.extend_from_slice(data);
            Ok(())
        };
        self.collect_chunks(
            |id| HostMsg::ListChanges { id },
            "a change list",
            "the change list",
            MAX_CHANGES_BYTES as u64,
            &mut sink,
        )
        .await?;
        Ok(Changes::parse(&text))
    }

    /// Streams the changes of writable share `index` (in [`crate::VmConfig::shares`] order) as
    /// a tar stream in OCI layer form into `sink`; returns its size. More than `max_bytes`
    /// from the guest is an error (the guest is untrusted).
    pub async fn export_share(
        &self,
        index: u32,
        max_bytes: u64,
        sink: &mut (dyn std::io::Write + Send),
    ) -> Result<u64, AgentError> {
        let mut write = |data: &[u8]| {
            sink.write_all(data)
                .map_err(|e| AgentError::Invalid(format!("cannot store the share's changes: {e}")))
        };
        self.collect_chunks(
            |id| HostMsg::ExportShare { id, index },
            "a share's changes",
            "the share's changes",
            max_bytes,
            &mut write,
        )
        .await
    }

    /// Asks the guest to sync and power off. Returns when the agent has accepted (or the
    /// channel closed because it already went down).
    pub async fn poweroff(&self) -> Result<(), AgentError> {
        let (mut answers, _) = self.register(false)?;
        let id = answers.id;
        let res = async {
            self.send(&HostMsg::Poweroff { id }).await?;
            match self.one_answer(&mut answers, "a power-off").await {
                Ok(GuestMsg::Done { .. }) => Ok(()),
                Ok(other) => Err(AgentError::Unexpected(describe(&other))),
                Err(AgentError::Closed | AgentError::ChannelFailed(_)) => Ok(()),
                Err(e) => Err(e),
            }
        }
        .await;
        self.unregister(id);
        res
    }

    /// Whether the agent answers a ping within the answer timeout; if not, the channel is
    /// closed (the agent is taken for dead) and the error says why.
    async fn check_alive(&self) -> Result<(), AgentError> {
        match self.ping().await {
            Ok(_) => Ok(()),
            Err(e @ AgentError::NoAnswer { .. }) => {
                close(
                    &self.shared,
                    Some(format!("{e} while a process was running; taken for dead")),
                );
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

/// Tells the guest to stop request `id` (a discard), from synchronous code too.
fn queue_discard(shared: &Shared, id: RequestId) {
    let Ok(frame) = encode(&HostMsg::Discard { id }) else {
        return;
    };
    match shared.frames.try_send(frame) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(frame)) => {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let frames = shared.frames.clone();
                rt.spawn(async move {
                    let _ = frames.send(frame).await;
                });
            }
        }
    }
}

/// Routes one message to its request. `Err` (with the reason) when the guest broke the
/// protocol badly enough that the channel must close.
fn route(shared: &Shared, msg: GuestMsg) -> Result<(), String> {
    let Some(id) = msg.request_id() else {
        tracing::debug!(msg = %describe(&msg), "unrouted message from the guest agent");
        return Ok(());
    };
    let mut routes = shared.routes();
    let Some(route) = routes.get(&id) else {
        // An answer to a request that ended or never was: dropped (costs nothing to keep).
        // A connection for a withdrawn accept whose withdrawal crossed it is closed, so the
        // guest's client sees the end instead of waiting for ever.
        if matches!(msg, GuestMsg::Connected { .. }) {
            drop(routes);
            queue_discard(shared, id);
        }
        return Ok(());
    };
    if let GuestMsg::StdinCredit { credit, .. } = msg {
        let Some(w) = &route.stdin else {
            return Ok(());
        };
        let credit = u64::from(credit);
        let outstanding = w.outstanding.load(Ordering::Acquire);
        if credit > outstanding {
            return Err(format!(
                "the guest gave back {credit} units of stdin credit for request {id}, but only {outstanding} were sent"
            ));
        }
        w.outstanding.fetch_sub(credit, Ordering::AcqRel);
        // `credit <= outstanding <= STREAM_WINDOW`, so this cannot overflow the semaphore.
        w.permits.add_permits(credit as usize);
        return Ok(());
    }
    let cost = queue_cost(&msg);
    let queued = route.queued.load(Ordering::Acquire);
    if queued + cost > QUEUE_LIMIT {
        return Err(format!(
            "the guest overran the flow-control window of request {id} ({queued} + {cost} units queued, the limit is {QUEUE_LIMIT})"
        ));
    }
    let ends = matches!(msg, GuestMsg::Exited { .. } | GuestMsg::Failed { .. });
    route.queued.fetch_add(cost, Ordering::AcqRel);
    if route.tx.send(msg).is_err() {
        routes.remove(&id);
    } else if ends {
        // No stdin goes to a process that ended.
        if let Some(w) = &route.stdin {
            w.permits.close();
        }
    }
    Ok(())
}

fn close(shared: &Shared, reason: Option<String>) {
    let mut routes = shared.routes();
    if !shared.closed.load(Ordering::Acquire) {
        *shared.reason() = reason;
    }
    shared.closed.store(true, Ordering::Release);
    for (_, route) in routes.drain() {
        if let Some(w) = route.stdin {
            w.permits.close();
        }
    }
}

/// An error and its sources, as one line.
fn error_text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn failed(kind: FailureKind, message: &str) -> AgentError {
    AgentError::Failed {
        kind,
        message: sanitize(message, DEFAULT_MAX_CHARS),
    }
}

/// A guest message in a few words, for errors: the kind, the id and the size of any data,
/// never the data itself.
fn describe(msg: &GuestMsg) -> String {
    match msg {
        GuestMsg::Hello(h) => format!(
            "a second hello (protocol {}, agent {})",
            h.protocol_version,
            sanitize(&h.agent_version, 64)
        ),
        GuestMsg::Pong { id } => format!("a pong for request {id}"),
        GuestMsg::Started { id, pid } => format!("`started` (pid {pid}) for request {id}"),
        GuestMsg::Stdout { id, data } => format!("{} bytes of stdout for request {id}", data.len()),
        GuestMsg::Stderr { id, data } => format!("{} bytes of stderr for request {id}", data.len()),
        GuestMsg::Exited { id, status } => format!("an exit ({status:?}) for request {id}"),
        GuestMsg::Done { id } => format!("`done` for request {id}"),
        GuestMsg::Failed { id, kind, message } => format!(
            "a failure ({kind:?}: {}) for request {id}",
            sanitize(message, DEFAULT_MAX_CHARS)
        ),
        GuestMsg::FileData { id, data, eof } => format!(
            "{} bytes of file data (eof {eof}) for request {id}",
            data.len()
        ),
        GuestMsg::StdinCredit { id, credit } => {
            format!("{credit} units of stdin credit for request {id}")
        }
        GuestMsg::Connected { id } => format!("a connection for request {id}"),
        GuestMsg::TcpData { id, data } => {
            format!("{} bytes of connection data for request {id}", data.len())
        }
        GuestMsg::TcpEof { id } => format!("the end of connection {id}"),
        _ => "a message this vmcp does not know".to_string(),
    }
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

/// Re-keys a restored agent on a channel that another process will serve (the warm pool
/// hands such channels out): sends `rekey` on `stream` and checks the hello that answers it,
/// with no task started and the stream left at a frame boundary (an agent that sends anything
/// after its hello is refused). [`AgentClient::connect_restored`] with `rekey.token` (or
/// another re-key) then serves the channel, in this process or another one.
pub async fn rekey_detached<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    rekey: Rekey,
    timeout: Duration,
) -> Result<Hello, AgentError> {
    let token = rekey.token.clone();
    let frame = encode(&HostMsg::Rekey(rekey))?;
    let exchange = async {
        stream
            .write_all(&frame)
            .await
            .map_err(|_| AgentError::Closed)?;
        stream.flush().await.map_err(|_| AgentError::Closed)?;
        let mut reader = FrameReader::new(&mut *stream);
        let hello = match reader.next::<GuestMsg>().await? {
            Some(GuestMsg::Hello(h)) => h,
            Some(GuestMsg::Failed { kind, message, .. }) => return Err(failed(kind, &message)),
            Some(other) => return Err(AgentError::NoHello(describe(&other))),
            None => return Err(AgentError::Closed),
        };
        if reader.buffered() > 0 {
            return Err(AgentError::Unexpected(format!(
                "{} bytes after the hello",
                reader.buffered()
            )));
        }
        Ok(hello)
    };
    let mut hello = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| AgentError::HelloTimeout(timeout))??;
    check_hello(&hello, &token)?;
    hello.agent_version = sanitize(&hello.agent_version, 64);
    Ok(hello)
}

/// Request id of [`exec_detached`]: far from the ids an [`AgentClient`] hands out (from 1 up).
const DETACHED_EXEC_ID: RequestId = u32::MAX - 1;
/// Most output [`exec_detached`] accepts (its program is meant to print nothing).
const DETACHED_EXEC_MAX_OUTPUT: usize = 64 * 1024;

/// Runs `argv` to its end on a channel no [`AgentClient`] serves (after [`rekey_detached`]),
/// its output read and dropped (at most 64 KiB, or it is an error); the stream is left at a
/// frame boundary. Its stdin is `/dev/null`, or with `stdin` a pipe closed at once (the path
/// `vmcp run` takes when its own stdin is not a terminal). The warm pool runs one such program in
/// each restored VM before handing it out: the first process start in a freshly restored
/// QEMU pays for its cold code caches (hundreds of milliseconds under TCG), the next ones
/// do not.
pub async fn exec_detached<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    argv: &[&str],
    stdin: bool,
    timeout: Duration,
) -> Result<ExitStatus, AgentError> {
    let id = DETACHED_EXEC_ID;
    let mut frame = encode(&HostMsg::Exec(ExecRequest {
        id,
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        stdin,
    }))?;
    if stdin {
        // The agent reads requests in order: the end of stdin can follow the exec at once.
        frame.extend(encode(&HostMsg::StdinEof { id })?);
    }
    let run = async {
        stream
            .write_all(&frame)
            .await
            .map_err(|_| AgentError::Closed)?;
        stream.flush().await.map_err(|_| AgentError::Closed)?;
        let mut reader = FrameReader::new(&mut *stream);
        let mut output = 0usize;
        let status = loop {
            match reader.next::<GuestMsg>().await? {
                Some(GuestMsg::Started { id: i, .. } | GuestMsg::StdinCredit { id: i, .. })
                    if i == id => {}
                Some(GuestMsg::Stdout { id: i, data } | GuestMsg::Stderr { id: i, data })
                    if i == id =>
                {
                    output += data.len();
                    if output > DETACHED_EXEC_MAX_OUTPUT {
                        return Err(AgentError::TooLarge {
                            what: "the output of a detached program",
                            limit: DETACHED_EXEC_MAX_OUTPUT,
                            action: "",
                        });
                    }
                }
                Some(GuestMsg::Exited { id: i, status }) if i == id => break status,
                Some(GuestMsg::Failed { kind, message, .. }) => return Err(failed(kind, &message)),
                Some(other) => return Err(AgentError::Unexpected(describe(&other))),
                None => return Err(AgentError::Closed),
            }
        };
        if reader.buffered() > 0 {
            return Err(AgentError::Unexpected(format!(
                "{} bytes after the exit",
                reader.buffered()
            )));
        }
        Ok(status)
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| AgentError::NoAnswer {
            what: "the end of a detached program",
            after: timeout,
        })?
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
    ///
    /// Taking an event gives its window credit back to the guest: a caller that stops
    /// calling this stops the guest process once one window ([`STREAM_WINDOW`]) is queued.
    /// While the process is silent for [`AgentLimits::idle_ping`], the agent is pinged; an
    /// agent that does not answer ends the wait with [`AgentError::NoAnswer`].
    pub async fn next_event(&mut self) -> Result<Option<ProcessEvent>, AgentError> {
        if self.done {
            return Ok(None);
        }
        let client = self.control.client.clone();
        let idle = client.shared.limits.idle_ping;
        let msg = loop {
            tokio::select! {
                msg = self.events.recv(&client) => break msg,
                () = tokio::time::sleep(idle) => {
                    if let Err(e) = client.check_alive().await {
                        self.done = true;
                        client.discard(self.control.id);
                        return Err(e);
                    }
                }
            }
        };
        match msg {
            Some(GuestMsg::Stdout { data, .. }) => Ok(Some(ProcessEvent::Stdout(data))),
            Some(GuestMsg::Stderr { data, .. }) => Ok(Some(ProcessEvent::Stderr(data))),
            Some(GuestMsg::Exited { status, .. }) => {
                self.done = true;
                client.unregister(self.control.id);
                Ok(Some(ProcessEvent::Exited(status)))
            }
            Some(GuestMsg::Failed { kind, message, .. }) => {
                self.done = true;
                client.unregister(self.control.id);
                Err(failed(kind, &message))
            }
            Some(other) => Err(AgentError::Unexpected(describe(&other))),
            None => {
                self.done = true;
                Err(client.shared.closed_error())
            }
        }
    }

    /// Collects all output until the process exits, at most [`AgentLimits::max_collect`]
    /// bytes of stdout and stderr together: beyond that the process is killed (SIGKILL to its
    /// process group) and the result is [`AgentError::TooLarge`].
    pub async fn wait_with_output(mut self) -> Result<Output, AgentError> {
        let limit = self.control.client.shared.limits.max_collect;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        loop {
            let event = self.next_event().await?;
            let room = limit.saturating_sub(stdout.len() + stderr.len());
            let over = match &event {
                Some(ProcessEvent::Stdout(d) | ProcessEvent::Stderr(d)) => d.len() > room,
                _ => false,
            };
            if over {
                let _ = self.control.signal(9).await;
                // Dropping `self` discards the rest of the output.
                return Err(AgentError::TooLarge {
                    what: "the process's output",
                    limit,
                    action: "; the process was killed",
                });
            }
            match event {
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
            // The process keeps running; its output is dropped in the guest, not queued here.
            self.control.client.discard(self.control.id);
        }
    }
}

/// Sends stdin and signals to a running process from another task.
#[derive(Clone)]
pub struct ProcessControl {
    id: RequestId,
    client: AgentClient,
    stdin: Option<Arc<StdinWindow>>,
}

impl std::fmt::Debug for ProcessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessControl")
            .field("id", &self.id)
            .field("stdin", &self.stdin.is_some())
            .finish()
    }
}

impl ProcessControl {
    /// Sends bytes to the process's stdin (only if the spec asked for stdin). Waits while the
    /// guest holds a full window of stdin the process has not read yet, so a process that
    /// does not read stdin makes this wait rather than grow the guest's memory. Fails with
    /// [`AgentError::StdinClosed`] once the process has ended or stdin was closed, and with
    /// [`AgentError::NoStdin`] if it was started without stdin.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        let Some(w) = &self.stdin else {
            return Err(AgentError::NoStdin);
        };
        for chunk in data.chunks(CHUNK_SIZE) {
            let cost = credit_cost(chunk.len());
            let permit = match w.permits.acquire_many(cost).await {
                Ok(p) => p,
                Err(_) if self.client.is_closed() => return Err(self.client.shared.closed_error()),
                Err(_) => return Err(AgentError::StdinClosed),
            };
            permit.forget();
            w.outstanding.fetch_add(u64::from(cost), Ordering::AcqRel);
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

mod tunnel;

pub use tunnel::PendingAccept;

#[cfg(test)]
mod tests;

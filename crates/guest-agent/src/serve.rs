//! The request server: one blocking loop reads [`HostMsg`]s, helper threads run processes.
//!
//! Design:
//! - The calling thread reads frames and handles quick requests (ping, signal, stdin, file
//!   writes) inline. Everything that can block on a process or on a large file runs in its
//!   own thread, so one slow process never stalls the channel.
//! - All writes go through one mutex around the writer; a frame is written whole, so frames
//!   from different threads never interleave.
//! - Per exec: a thread per output stream reads the pipe in [`CHUNK_SIZE`] pieces, a thread
//!   feeds stdin from an in-memory queue, and a waiter thread collects the exit status.
//!   These threads come from a pool (`threads`): a finished job's thread waits for the next
//!   one, so the first exec after a snapshot restore starts none (issue 12).
//!   The waiter sends [`GuestMsg::Exited`] only after both output streams reached end of
//!   file, so every byte of output comes before the exit. If the process exits but a
//!   background child keeps its stdout or stderr open and idle for [`LINGER`], the exit is
//!   reported anyway and later output of that background child is dropped.
//! - Flow control (see [`vmcp_guest_proto::STREAM_WINDOW`]): the output of each request
//!   (both pipes of an exec, the chunks of a file read) is sent only within its window; a
//!   pump thread without credit blocks, so the process blocks on a full pipe and nothing
//!   queues here. [`HostMsg::Credit`] opens the window again; [`HostMsg::Discard`] makes the
//!   pumps read and drop. Stdin is queued up to one window per process; each chunk written
//!   into the pipe is given back with [`GuestMsg::StdinCredit`]. A host that sends more
//!   stdin than the window gets that process's stdin closed.
//! - Each process gets its own process group; [`HostMsg::Signal`] signals the whole group.
//! - When `reap_orphans` is set (the agent is PID 1), one reaper thread peeks at every
//!   zombie with `waitid(WNOWAIT)` and reaps it under the lock that also covers spawning:
//!   our own children go to their waiter, orphans are just reaped. Without it (tests, a
//!   library user with other children), each waiter waits for its own pid only.
//! - When the loop ends (power-off, channel closed, broken frame) every process still
//!   running is killed with SIGKILL.
//!
//! - [`HostMsg::Rekey`] (a restored snapshot's new identity) is handled inline too, before
//!   the next request is read: the host sends nothing else until the new hello arrives, so
//!   no process starts with the snapshot's random state or token.
//!
//! Limits: at most one [`STREAM_WINDOW`] of stdin per process queues in memory; output
//! is never queued beyond one chunk per pipe; file reads and writes use the agent's own
//! permissions (root in the guest).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vmcp_guest_proto::{
    credit_cost, encode, read_msg, ExecRequest, ExitStatus, FailureKind, GuestMsg, Hello, HostMsg,
    ProtoError, Rekey, RequestId, CHUNK_SIZE, STREAM_WINDOW,
};

use crate::program_path::{self, Resolved};
use crate::sys::{self, WaitStatus};

/// How long an exited process's output pipes may stay open and idle before its exit is
/// reported without waiting for their end of file.
pub const LINGER: Duration = Duration::from_millis(250);

pub use tcp::{
    MAX_CONNECTIONS as MAX_TUNNEL_CONNECTIONS, MAX_LISTENERS as MAX_TUNNEL_PORTS,
    MAX_WAITING_ACCEPTS,
};

/// `PATH` of processes started by the agent unless the request overrides it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How [`serve`] behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Sent as the first message.
    pub hello: Hello,
    /// Environment every process starts with; request variables are applied over it.
    pub env: Vec<(String, String)>,
    /// Working directory of processes whose request names none.
    pub cwd: PathBuf,
    /// Reap every zombie, not only our own children (set this when running as PID 1).
    pub reap_orphans: bool,
    /// Print each request to stderr.
    pub debug: bool,
    /// The token of every hello this server sends (it replaces `hello.token`). A re-key
    /// replaces it; share it with whoever reopens the channel, so the next hello presents
    /// the new token and never the one the guest booted with.
    pub token: Arc<Mutex<String>>,
    /// Applies a re-key to the system (entropy, reseed, clock, hostname) and returns the
    /// guest boot clock in nanoseconds for the new hello. `None` refuses re-keys: only a
    /// guest's PID 1 should change the machine's identity.
    pub apply_rekey: Option<RekeyFn>,
    /// Default uid and gid of processes (an image's `User`); the agent's own when `None`.
    pub user: Option<(u32, u32)>,
    /// Layers of an image root, for [`HostMsg::ListChanges`]; that request fails without.
    pub changes: Option<crate::changes::ChangeRoots>,
    /// Layers of each share, in `vmcp.share=` order (`None` for a read-only one), for
    /// [`HostMsg::ExportShare`].
    pub shares: Vec<Option<crate::changes::ChangeRoots>>,
}

/// See [`ServeOptions::apply_rekey`].
pub type RekeyFn = fn(&Rekey) -> io::Result<u64>;

/// Fewest entropy bytes a re-key must carry (256 bits).
pub const MIN_REKEY_ENTROPY: usize = 32;
/// Longest hostname a re-key may set (Linux's limit).
pub const MAX_HOSTNAME: usize = 64;

impl ServeOptions {
    /// Options with the default environment (`PATH`, `HOME=/root`), cwd `/`, no orphan
    /// reaping.
    pub fn new(hello: Hello) -> Self {
        ServeOptions {
            token: Arc::new(Mutex::new(hello.token.clone())),
            apply_rekey: None,
            hello,
            env: vec![
                ("PATH".into(), DEFAULT_PATH.into()),
                ("HOME".into(), "/root".into()),
            ],
            cwd: PathBuf::from("/"),
            reap_orphans: false,
            debug: false,
            user: None,
            changes: None,
            shares: Vec::new(),
        }
    }
}

/// Why [`serve`] returned normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServeEnd {
    /// The host asked for power-off; [`GuestMsg::Done`] was sent. The caller powers off.
    Poweroff,
    /// The host closed the channel between frames.
    Closed,
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A frame from the host could not be read or decoded.
    #[error("cannot read a request from the host")]
    Read(#[source] ProtoError),
    /// A message could not be written to the host.
    #[error("cannot write to the host")]
    Write(#[source] io::Error),
}

type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The writing half, shared by all threads.
#[derive(Clone)]
struct Out {
    w: SharedWriter,
}

impl Out {
    fn write_frame(w: &mut Box<dyn Write + Send>, msg: &GuestMsg) -> io::Result<()> {
        let frame = encode(msg).map_err(io::Error::other)?;
        w.write_all(&frame)?;
        w.flush()
    }

    fn send(&self, msg: &GuestMsg) -> io::Result<()> {
        Self::write_frame(&mut lock(&self.w), msg)
    }

    /// Sends `msg` unless `finished` is set; with `finish`, sets it in the same critical
    /// section so no message can follow.
    fn send_gated(&self, finished: &AtomicBool, msg: &GuestMsg, finish: bool) -> io::Result<()> {
        let mut w = lock(&self.w);
        if finished.load(Ordering::Acquire) {
            return Ok(());
        }
        if finish {
            finished.store(true, Ordering::Release);
        }
        Self::write_frame(&mut w, msg)
    }

    fn fail(&self, id: RequestId, kind: FailureKind, message: String) -> io::Result<()> {
        self.send(&GuestMsg::Failed { id, kind, message })
    }
}

/// A running process, by request id.
struct Proc {
    pid: i32,
    stdin: Option<StdinQueue>,
}

/// The stdin of a process: chunks for its feeder thread and the credit they hold.
struct StdinQueue {
    tx: mpsc::Sender<Vec<u8>>,
    /// Credit units queued and not yet given back (at most [`STREAM_WINDOW`]).
    queued: Arc<AtomicU32>,
}

type Procs = Arc<Mutex<HashMap<RequestId, Proc>>>;

/// Output window of one request (guest to host): how much the host has not yet given back.
#[derive(Default)]
struct Window {
    state: Mutex<WindowState>,
    changed: Condvar,
}

#[derive(Default)]
struct WindowState {
    /// Credit units sent and not given back.
    in_flight: u64,
    /// The host does not want this output any more (or the channel is gone): drop it.
    discard: bool,
}

impl Window {
    /// Waits until `cost` more units fit in the window and takes them. Returns false when the
    /// output is to be dropped instead.
    fn acquire(&self, cost: u32) -> bool {
        let mut st = lock(&self.state);
        loop {
            if st.discard {
                return false;
            }
            if st.in_flight + u64::from(cost) <= u64::from(STREAM_WINDOW) {
                st.in_flight += u64::from(cost);
                return true;
            }
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn credit(&self, credit: u32) {
        let mut st = lock(&self.state);
        st.in_flight = st.in_flight.saturating_sub(u64::from(credit));
        self.changed.notify_all();
    }

    fn discard(&self) {
        lock(&self.state).discard = true;
        self.changed.notify_all();
    }
}

/// Output windows of the requests that stream output, by request id.
type Windows = Arc<Mutex<HashMap<RequestId, Arc<Window>>>>;

/// Orphan reaper state: pids of our own children and where their status goes.
struct Reaper {
    waiting: Mutex<HashMap<i32, mpsc::Sender<WaitStatus>>>,
    wake: Condvar,
}

impl Reaper {
    fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper {
            waiting: Mutex::new(HashMap::new()),
            wake: Condvar::new(),
        });
        let r = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    fn run(&self) {
        loop {
            match sys::peek_zombie() {
                Ok(pid) => {
                    let mut waiting = lock(&self.waiting);
                    // Reaping under the lock: a spawn in progress holds it, so its child is
                    // registered before we look it up.
                    if let Ok(Some(status)) = sys::wait_pid(pid, true) {
                        if let Some(tx) = waiting.remove(&pid) {
                            let _ = tx.send(status);
                        }
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                    let waiting = lock(&self.waiting);
                    let _ = self.wake.wait_timeout(waiting, Duration::from_secs(1));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

struct Server<'a> {
    out: Out,
    procs: Procs,
    windows: Windows,
    tunnels: Arc<tcp::Tunnels>,
    reaper: Option<Arc<Reaper>>,
    options: &'a ServeOptions,
}

/// Serves requests from `reader`, answering on `writer`, until power-off or the end of the
/// channel.
///
/// Sends `options.hello` first. Returns [`ServeEnd::Poweroff`] after acknowledging a
/// power-off request (the caller then powers off), [`ServeEnd::Closed`] when the host closes
/// the channel, or an error on a malformed frame or a broken channel. Processes still
/// running when it returns are killed.
pub fn serve<R: Read, W: Write + Send + 'static>(
    mut reader: R,
    writer: W,
    options: &ServeOptions,
) -> Result<ServeEnd, ServeError> {
    let out = Out {
        w: Arc::new(Mutex::new(Box::new(writer))),
    };
    let mut hello = options.hello.clone();
    hello.token = lock(&options.token).clone();
    out.send(&GuestMsg::Hello(hello))
        .map_err(ServeError::Write)?;
    let reaper = if options.reap_orphans {
        Some(Reaper::start().map_err(ServeError::Write)?)
    } else {
        None
    };
    let windows: Windows = Arc::new(Mutex::new(HashMap::new()));
    let server = Server {
        tunnels: Arc::new(tcp::Tunnels::new(out.clone(), Arc::clone(&windows))),
        out,
        procs: Arc::new(Mutex::new(HashMap::new())),
        windows,
        reaper,
        options,
    };
    let result = server.run(&mut reader);
    server.kill_all();
    result
}

impl Server<'_> {
    fn run<R: Read>(&self, reader: &mut R) -> Result<ServeEnd, ServeError> {
        let mut scratch = Vec::new();
        let mut files: HashMap<RequestId, File> = HashMap::new();
        loop {
            let msg = match read_msg::<HostMsg, _>(reader, &mut scratch) {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(ServeEnd::Closed),
                Err(e) => return Err(ServeError::Read(e)),
            };
            if self.options.debug {
                eprintln!("vmcp-agent: request {}", describe(&msg));
            }
            let sent = match msg {
                HostMsg::Ping { id } => self.out.send(&GuestMsg::Pong { id }),
                HostMsg::Exec(req) => self.exec(req),
                HostMsg::Stdin { id, data } => {
                    self.stdin(id, data);
                    Ok(())
                }
                HostMsg::Credit { id, credit } => {
                    if let Some(w) = lock(&self.windows).get(&id) {
                        w.credit(credit);
                    }
                    Ok(())
                }
                HostMsg::Discard { id } => {
                    if let Some(w) = lock(&self.windows).get(&id) {
                        w.discard();
                    }
                    self.tunnels.discard(id);
                    Ok(())
                }
                HostMsg::StdinEof { id } => {
                    if let Some(p) = lock(&self.procs).get_mut(&id) {
                        p.stdin = None;
                    }
                    Ok(())
                }
                HostMsg::Signal { id, signal } => {
                    if let Some(p) = lock(&self.procs).get(&id) {
                        if sys::kill(-p.pid, signal).is_err() {
                            let _ = sys::kill(p.pid, signal);
                        }
                    }
                    Ok(())
                }
                HostMsg::WriteFile {
                    id,
                    path,
                    mode,
                    offset,
                    data,
                    last,
                } => {
                    let res = write_chunk(&mut files, id, &path, mode, offset, &data, last);
                    match res {
                        Ok(()) => self.out.send(&GuestMsg::Done { id }),
                        Err((kind, message)) => {
                            files.remove(&id);
                            self.out.fail(id, kind, message)
                        }
                    }
                }
                HostMsg::ReadFile { id, path } => self.read_file(id, path),
                HostMsg::ListChanges { id } => self.list_changes(id),
                HostMsg::ExportShare { id, index } => self.export_share(id, index),
                HostMsg::Poweroff { id } => {
                    self.out
                        .send(&GuestMsg::Done { id })
                        .map_err(ServeError::Write)?;
                    return Ok(ServeEnd::Poweroff);
                }
                HostMsg::Rekey(r) => self.rekey(r),
                HostMsg::TcpAccept { id, port } => self.tunnels.accept(id, port),
                HostMsg::TcpConnect { id, port } => self.tunnels.connect(id, port),
                HostMsg::TcpData { id, data } => {
                    self.tunnels.data(id, data);
                    Ok(())
                }
                HostMsg::TcpEof { id } => {
                    self.tunnels.eof(id);
                    Ok(())
                }
                other => {
                    eprintln!("vmcp-agent: ignoring unsupported request {other:?}");
                    Ok(())
                }
            };
            sent.map_err(ServeError::Write)?;
        }
    }

    /// Takes the identity a restore gives this guest (see the module docs).
    fn rekey(&self, r: Rekey) -> io::Result<()> {
        let invalid = |m: String| Err((FailureKind::InvalidRequest, m));
        let checked = if self.options.apply_rekey.is_none() {
            invalid("this agent does not take a new identity (it is not a guest's PID 1)".into())
        } else if r.token.is_empty() || r.token.len() > 256 {
            invalid("a re-key needs a token of 1 to 256 bytes".into())
        } else if !(MIN_REKEY_ENTROPY..=Rekey::MAX_ENTROPY).contains(&r.entropy.len()) {
            invalid(format!(
                "a re-key needs {MIN_REKEY_ENTROPY} to {} entropy bytes, got {}",
                Rekey::MAX_ENTROPY,
                r.entropy.len()
            ))
        } else if r.hostname.len() > MAX_HOSTNAME
            || r.hostname
                .bytes()
                .any(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
        {
            invalid(format!(
                "hostname {:?} is not a valid host name",
                r.hostname
            ))
        } else {
            Ok(())
        };
        let applied = checked.and_then(|()| match self.options.apply_rekey {
            Some(apply) => apply(&r).map_err(|e| {
                (
                    FailureKind::Other,
                    format!("cannot take the new identity: {e}"),
                )
            }),
            None => Err((FailureKind::InvalidRequest, "no re-key".into())),
        });
        match applied {
            Ok(boot_ns) => {
                let mut hello = self.options.hello.clone();
                hello.boot_ns = boot_ns;
                let mut token = lock(&self.options.token);
                token.clone_from(&r.token);
                hello.token = r.token;
                drop(token);
                let sent = self.out.send(&GuestMsg::Hello(hello));
                // After the hello, before the next request: what the closed connections'
                // threads still send comes after it, for ids the new host never made.
                self.tunnels.forget_requests();
                sent
            }
            Err((kind, message)) => self.out.fail(r.id, kind, message),
        }
    }

    fn kill_all(&self) {
        self.tunnels.close_all();
        let mut procs = lock(&self.procs);
        for p in procs.values() {
            let _ = sys::kill(-p.pid, libc::SIGKILL);
            let _ = sys::kill(p.pid, libc::SIGKILL);
        }
        procs.clear();
        // Nobody gives credit any more: pumps and file readers drop what they have and end.
        for w in lock(&self.windows).drain().map(|(_, w)| w) {
            w.discard();
        }
    }

    /// Queues stdin for process `id` within its window; a host that overruns the window gets
    /// the process's stdin closed.
    fn stdin(&self, id: RequestId, data: Vec<u8>) {
        let mut procs = lock(&self.procs);
        let Some(p) = procs.get_mut(&id) else { return };
        let Some(q) = &p.stdin else { return };
        if !take_window(&q.queued, data.len()) {
            eprintln!(
                "vmcp-agent: the host sent stdin of request {id} beyond its window; closing \
                 that stdin"
            );
            p.stdin = None;
            return;
        }
        if q.tx.send(data).is_err() {
            p.stdin = None;
        }
    }

    /// A new output window for request `id`.
    fn open_window(&self, id: RequestId) -> Arc<Window> {
        let w = Arc::new(Window::default());
        if let Some(old) = lock(&self.windows).insert(id, Arc::clone(&w)) {
            old.discard();
        }
        w
    }

    fn exec(&self, req: ExecRequest) -> io::Result<()> {
        let id = req.id;
        match self.try_exec(req) {
            Ok(()) => Ok(()),
            Err((kind, message)) => self.out.fail(id, kind, message),
        }
    }

    fn try_exec(&self, req: ExecRequest) -> Result<(), (FailureKind, String)> {
        let invalid = |m: String| (FailureKind::InvalidRequest, m);
        let id = req.id;
        let Some(program) = req.argv.first() else {
            return Err(invalid("exec request with an empty argv".into()));
        };
        if lock(&self.procs).contains_key(&id) {
            return Err(invalid(format!("request id {id} is already running")));
        }
        for (k, _) in &req.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(invalid(format!("bad environment variable name {k:?}")));
            }
        }
        let cwd = req
            .cwd
            .as_deref()
            .map_or_else(|| self.options.cwd.clone(), PathBuf::from);
        if !cwd.is_dir() {
            return Err(invalid(format!(
                "working directory {} does not exist",
                cwd.display()
            )));
        }
        // The agent searches `PATH` itself so that `Command` can use `posix_spawn` (see
        // `program_path`); the last `PATH` of the environment below is the child's. Not for
        // processes of another user: `Command` forks for those anyway, and `execvp` then
        // judges execute permission as that user, which the agent (root) would not.
        let path = (self.options.env.iter().chain(&req.env))
            .rev()
            .find(|(k, _)| k == "PATH" && self.options.user.is_none())
            .map(|(_, v)| v.as_str());
        let mut cmd = match program_path::resolve(program, path, &cwd) {
            Resolved::AsIs => Command::new(program),
            Resolved::Found(file) => {
                let mut cmd = Command::new(file);
                cmd.arg0(program);
                cmd
            }
            Resolved::Missing => {
                let e = io::Error::from(io::ErrorKind::NotFound);
                return Err(spawn_failure(program, &e));
            }
        };
        cmd.args(&req.argv[1..])
            .env_clear()
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cwd)
            .stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some((uid, gid)) = self.options.user {
            cmd.uid(uid).gid(gid);
        }

        // Spawn and register under the reaper lock (see the module docs).
        let mut waiting = self.reaper.as_ref().map(|r| lock(&r.waiting));
        let mut child = cmd.spawn().map_err(|e| spawn_failure(program, &e))?;
        let pid = child.id() as i32;
        let status_rx = waiting.as_mut().map(|w| {
            let (tx, rx) = mpsc::channel();
            w.insert(pid, tx);
            rx
        });
        drop(waiting);
        if let Some(r) = &self.reaper {
            r.wake.notify_all();
        }

        let stdin_tx = child.stdin.take().map(|mut stdin| {
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            let queued = Arc::new(AtomicU32::new(0));
            let (queued2, out) = (Arc::clone(&queued), self.out.clone());
            let spawned = spawn_thread("stdin", move || {
                feed_host_bytes(&mut stdin, id, &out, &rx, &queued2);
            });
            spawned.map(|()| StdinQueue { tx, queued })
        });
        let stdin_tx = match stdin_tx.transpose() {
            Ok(tx) => tx,
            Err(e) => {
                let _ = sys::kill(pid, libc::SIGKILL);
                return Err((FailureKind::Other, format!("cannot start a thread: {e}")));
            }
        };
        lock(&self.procs).insert(
            id,
            Proc {
                pid,
                stdin: stdin_tx,
            },
        );
        // From here on the process is announced; failures become its exit.
        if self
            .out
            .send(&GuestMsg::Started {
                id,
                pid: pid as u32,
            })
            .is_err()
        {
            // The channel is gone; the serve loop notices on its next read or write.
        }
        let streams = Arc::new(Streams::default());
        let finished = Arc::new(AtomicBool::new(false));
        let window = self.open_window(id);
        let pipes: [(Option<Box<dyn Read + Send>>, bool); 2] = [
            (child.stdout.take().map(|p| Box::new(p) as _), true),
            (child.stderr.take().map(|p| Box::new(p) as _), false),
        ];
        for (pipe, is_stdout) in pipes {
            let Some(pipe) = pipe else { continue };
            lock(&streams.state).open += 1;
            let (out, streams2, finished2, window2) = (
                self.out.clone(),
                Arc::clone(&streams),
                Arc::clone(&finished),
                Arc::clone(&window),
            );
            let name = if is_stdout { "stdout" } else { "stderr" };
            if spawn_thread(name, move || {
                pump(pipe, id, is_stdout, &out, &streams2, &finished2, &window2)
            })
            .is_err()
            {
                // Without a reader the pipe closes when `pipe` drops; count it as done.
                let mut st = lock(&streams.state);
                st.open -= 1;
            }
        }
        let (out, procs, windows) = (
            self.out.clone(),
            Arc::clone(&self.procs),
            Arc::clone(&self.windows),
        );
        let waiter = move || {
            let status = match status_rx {
                Some(rx) => rx.recv().ok(),
                None => sys::wait_pid(pid, false).ok().flatten(),
            };
            streams.wait_drained();
            lock(&procs).remove(&id);
            let status = match status {
                Some(WaitStatus::Exited(c)) => ExitStatus::Code(c),
                Some(WaitStatus::Signaled(s)) => ExitStatus::Signal(s),
                // Lost track of it (should not happen): report a kill.
                None => ExitStatus::Signal(libc::SIGKILL),
            };
            let _ = out.send_gated(&finished, &GuestMsg::Exited { id, status }, true);
            // A lingering background child's output is dropped from now on; its pump must
            // not wait for credit the host will never give.
            window.discard();
            let mut windows = lock(&windows);
            if windows.get(&id).is_some_and(|w| Arc::ptr_eq(w, &window)) {
                windows.remove(&id);
            }
        };
        if let Err(e) = spawn_thread("waiter", waiter) {
            let _ = sys::kill(-pid, libc::SIGKILL);
            lock(&self.procs).remove(&id);
            if let Some(w) = lock(&self.windows).remove(&id) {
                w.discard();
            }
            return Err((FailureKind::Other, format!("cannot start a thread: {e}")));
        }
        drop(child);
        Ok(())
    }

    fn list_changes(&self, id: RequestId) -> io::Result<()> {
        let Some(roots) = self.options.changes.clone() else {
            return self.out.fail(
                id,
                FailureKind::InvalidRequest,
                "no image with a writable layer is mounted (boot with vmcp.image=)".into(),
            );
        };
        let out = self.out.clone();
        let window = self.open_window(id);
        let windows = Arc::clone(&self.windows);
        let job = move || {
            let text = crate::changes::list(
                &roots,
                crate::changes::MAX_CHANGES_BYTES,
                &crate::changes::overlay_whiteout,
                &sys::overlay_opaque,
            );
            match text {
                Ok(text) => {
                    let mut w = ChunkWriter {
                        out: out.clone(),
                        id,
                        buf: Vec::with_capacity(CHUNK_SIZE),
                        window: Arc::clone(&window),
                    };
                    let _ = w.write_all(text.as_bytes()).and_then(|()| w.finish());
                }
                Err(e) => {
                    let _ = out.fail(id, FailureKind::Other, format!("cannot list changes: {e}"));
                }
            }
            close_window(&windows, id, &window);
        };
        match spawn_thread("list-changes", job) {
            Ok(()) => Ok(()),
            Err(e) => self.out.fail(
                id,
                FailureKind::Other,
                format!("cannot start a thread: {e}"),
            ),
        }
    }

    fn export_share(&self, id: RequestId, index: u32) -> io::Result<()> {
        let roots = usize::try_from(index)
            .ok()
            .and_then(|i| self.options.shares.get(i))
            .cloned()
            .flatten();
        let Some(roots) = roots else {
            return self.out.fail(
                id,
                FailureKind::InvalidRequest,
                format!("share {index} does not exist or is read-only"),
            );
        };
        let out = self.out.clone();
        let window = self.open_window(id);
        let windows = Arc::clone(&self.windows);
        let job = move || {
            let writer = ChunkWriter {
                out: out.clone(),
                id,
                buf: Vec::with_capacity(CHUNK_SIZE),
                window: Arc::clone(&window),
            };
            let res = crate::export::export(
                &roots,
                writer,
                &crate::changes::overlay_whiteout,
                &sys::overlay_opaque,
            )
            .and_then(|mut w| w.finish());
            if let Err(e) = res {
                let _ = out.fail(id, FailureKind::Other, format!("cannot export share: {e}"));
            }
            close_window(&windows, id, &window);
        };
        match spawn_thread("export-share", job) {
            Ok(()) => Ok(()),
            Err(e) => self.out.fail(
                id,
                FailureKind::Other,
                format!("cannot start a thread: {e}"),
            ),
        }
    }

    fn read_file(&self, id: RequestId, path: String) -> io::Result<()> {
        let file = match open_for_read(&path) {
            Ok(f) => f,
            Err((kind, message)) => return self.out.fail(id, kind, message),
        };
        let out = self.out.clone();
        let window = self.open_window(id);
        let windows = Arc::clone(&self.windows);
        let job = move || {
            if let Err((kind, message)) = send_file(file, id, &path, &out, &window) {
                let _ = out.fail(id, kind, message);
            }
            let mut windows = lock(&windows);
            if windows.get(&id).is_some_and(|w| Arc::ptr_eq(w, &window)) {
                windows.remove(&id);
            }
        };
        match spawn_thread("read-file", job) {
            Ok(()) => Ok(()),
            Err(e) => self.out.fail(
                id,
                FailureKind::Other,
                format!("cannot start a thread: {e}"),
            ),
        }
    }
}

/// Counts `len` more host bytes (stdin, connection data) against a window whose queued
/// credit units are `queued`; false, counting nothing, when they do not fit (the host broke
/// the flow control).
fn take_window(queued: &AtomicU32, len: usize) -> bool {
    let cost = credit_cost(len);
    let now = queued.load(Ordering::Acquire);
    if u64::from(now) + u64::from(cost) > u64::from(STREAM_WINDOW) {
        return false;
    }
    queued.fetch_add(cost, Ordering::AcqRel);
    true
}

/// Writes the host's queued chunks for request `id` to `w` (a process's stdin, a socket)
/// until the host's end of file, giving each chunk's credit back once written. After a write
/// failed the rest is dropped, but credit still goes back so the host's writer is not left
/// waiting.
fn feed_host_bytes<W: Write>(
    w: &mut W,
    id: RequestId,
    out: &Out,
    rx: &mpsc::Receiver<Vec<u8>>,
    queued: &AtomicU32,
) {
    let mut open = true;
    for data in rx {
        open = open && w.write_all(&data).is_ok();
        let credit = credit_cost(data.len());
        queued.fetch_sub(credit, Ordering::AcqRel);
        let _ = out.send(&GuestMsg::StdinCredit { id, credit });
    }
}

/// Drops the output window of `id` if it is still `window`.
fn close_window(windows: &Windows, id: RequestId, window: &Arc<Window>) {
    let mut windows = lock(windows);
    if windows.get(&id).is_some_and(|w| Arc::ptr_eq(w, window)) {
        windows.remove(&id);
    }
}

/// Sends what is written as [`GuestMsg::FileData`] chunks within the request's output window;
/// [`ChunkWriter::finish`] sends the last one with `eof`.
struct ChunkWriter {
    out: Out,
    id: RequestId,
    buf: Vec<u8>,
    window: Arc<Window>,
}

impl ChunkWriter {
    fn flush_chunk(&mut self, eof: bool) -> io::Result<()> {
        if !self.window.acquire(credit_cost(self.buf.len())) {
            return Err(io::Error::other("the host stopped reading"));
        }
        let msg = GuestMsg::FileData {
            id: self.id,
            data: std::mem::take(&mut self.buf),
            eof,
        };
        self.out.send(&msg)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.flush_chunk(true)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK_SIZE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK_SIZE {
            self.flush_chunk(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `f` on a thread of its own (one kept from an earlier job if one is idle). `_what`
/// says what the job is, for readers: pooled threads all carry the name `agent-worker`.
fn spawn_thread<F: FnOnce() + Send + 'static>(_what: &str, f: F) -> io::Result<()> {
    crate::threads::AGENT.spawn(f)
}

fn spawn_failure(program: &str, e: &io::Error) -> (FailureKind, String) {
    match e.kind() {
        io::ErrorKind::NotFound => (
            FailureKind::NotFound,
            format!("{program}: command not found"),
        ),
        io::ErrorKind::PermissionDenied => (
            FailureKind::PermissionDenied,
            format!("{program}: permission denied (not executable)"),
        ),
        io::ErrorKind::InvalidInput => (
            FailureKind::InvalidRequest,
            format!("cannot start {program}: {e}"),
        ),
        _ if e.raw_os_error() == Some(libc::ENOEXEC) => (
            FailureKind::PermissionDenied,
            format!("{program}: cannot execute (exec format error)"),
        ),
        _ => (FailureKind::Other, format!("cannot start {program}: {e}")),
    }
}

/// Output-pipe bookkeeping of one process.
#[derive(Default)]
struct Streams {
    state: Mutex<StreamState>,
    changed: Condvar,
}

#[derive(Default)]
struct StreamState {
    /// Pipes not yet at end of file.
    open: u8,
    /// Pipes whose reader holds data it is sending.
    busy: u8,
    /// Last time a reader finished sending.
    last: Option<Instant>,
}

impl Streams {
    /// Waits until every pipe reached end of file, or until the open ones have been idle for
    /// [`LINGER`].
    fn wait_drained(&self) {
        let mut st = lock(&self.state);
        let exited = Instant::now();
        loop {
            if st.open == 0 {
                return;
            }
            let idle_since = st.last.map_or(exited, |l| l.max(exited));
            let idle = idle_since.elapsed();
            if st.busy == 0 && idle >= LINGER {
                return;
            }
            let wait = if st.busy > 0 { LINGER } else { LINGER - idle };
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

fn pump(
    mut pipe: Box<dyn Read + Send>,
    id: RequestId,
    is_stdout: bool,
    out: &Out,
    streams: &Streams,
    finished: &AtomicBool,
    window: &Window,
) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        lock(&streams.state).busy += 1;
        let data = buf[..n].to_vec();
        let msg = if is_stdout {
            GuestMsg::Stdout { id, data }
        } else {
            GuestMsg::Stderr { id, data }
        };
        // Waits for credit (the process meanwhile blocks on its full pipe). Discarded output
        // and a broken channel: keep draining so the process does not block for ever.
        if window.acquire(credit_cost(n)) {
            let _ = out.send_gated(finished, &msg, false);
        }
        let mut st = lock(&streams.state);
        st.busy -= 1;
        st.last = Some(Instant::now());
        streams.changed.notify_all();
    }
    let mut st = lock(&streams.state);
    st.open -= 1;
    streams.changed.notify_all();
}

type Failure = (FailureKind, String);

fn io_failure(what: &str, path: &str, e: &io::Error) -> Failure {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => FailureKind::NotFound,
        io::ErrorKind::PermissionDenied => FailureKind::PermissionDenied,
        _ => FailureKind::Other,
    };
    (kind, format!("cannot {what} {path}: {e}"))
}

fn check_absolute(path: &str) -> Result<(), Failure> {
    if Path::new(path).is_absolute() {
        Ok(())
    } else {
        Err((
            FailureKind::InvalidRequest,
            format!("guest path {path:?} is not absolute"),
        ))
    }
}

fn write_chunk(
    files: &mut HashMap<RequestId, File>,
    id: RequestId,
    path: &str,
    mode: u32,
    offset: u64,
    data: &[u8],
    last: bool,
) -> Result<(), Failure> {
    check_absolute(path)?;
    if offset == 0 {
        let mode = mode & 0o7777;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(|e| io_failure("create", path, &e))?;
        // The umask may have cleared bits; set exactly what was asked for.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| io_failure("set permissions of", path, &e))?;
        files.insert(id, file);
    }
    let Some(file) = files.get_mut(&id) else {
        return Err((
            FailureKind::InvalidRequest,
            format!("write of {path} at offset {offset} without a chunk at offset 0"),
        ));
    };
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.write_all(data))
        .map_err(|e| io_failure("write", path, &e))?;
    if last {
        files.remove(&id);
    }
    Ok(())
}

fn open_for_read(path: &str) -> Result<File, Failure> {
    check_absolute(path)?;
    let file = File::open(path).map_err(|e| io_failure("open", path, &e))?;
    match file.metadata() {
        Ok(m) if m.is_dir() => Err((
            FailureKind::InvalidRequest,
            format!("{path} is a directory"),
        )),
        Ok(_) => Ok(file),
        Err(e) => Err(io_failure("stat", path, &e)),
    }
}

/// Fills `buf` as far as possible; returns the bytes read (less than its length only at
/// end of file).
fn fill(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn send_file(
    mut file: File,
    id: RequestId,
    path: &str,
    out: &Out,
    window: &Window,
) -> Result<(), Failure> {
    let mut cur = vec![0u8; CHUNK_SIZE];
    let mut next = vec![0u8; CHUNK_SIZE];
    let mut n = fill(&mut file, &mut cur).map_err(|e| io_failure("read", path, &e))?;
    loop {
        // A short chunk means end of file; a full one needs a look ahead to know.
        let (m, eof) = if n < CHUNK_SIZE {
            (0, true)
        } else {
            let m = fill(&mut file, &mut next).map_err(|e| io_failure("read", path, &e))?;
            (m, m == 0)
        };
        if !window.acquire(credit_cost(n)) {
            // The host gave up on this read (or the channel is gone).
            return Ok(());
        }
        let msg = GuestMsg::FileData {
            id,
            data: cur[..n].to_vec(),
            eof,
        };
        if out.send(&msg).is_err() || eof {
            return Ok(());
        }
        std::mem::swap(&mut cur, &mut next);
        n = m;
    }
}

fn describe(msg: &HostMsg) -> String {
    match msg {
        HostMsg::Stdin { id, data } => format!("stdin id={id} {} bytes", data.len()),
        HostMsg::TcpData { id, data } => format!("tcp data id={id} {} bytes", data.len()),
        HostMsg::WriteFile {
            id,
            path,
            offset,
            data,
            ..
        } => format!(
            "write-file id={id} {path} offset={offset} {} bytes",
            data.len()
        ),
        other => format!("{other:?}"),
    }
}

mod tcp;
#[cfg(test)]
mod tests;

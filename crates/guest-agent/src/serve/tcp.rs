//! TCP connections of guest loopback carried over the channel ([`HostMsg::TcpAccept`],
//! [`HostMsg::TcpConnect`]): how a guest without any network card reaches the host's egress
//! proxy, and how the host reaches a port published by a guest process.
//!
//! - A listener is made by the first accept request for its port, on `127.0.0.1` only, and
//!   lives until the channel session ends. One thread per listener accepts, and only while an
//!   accept request is waiting: connections nobody asked for yet stay in the kernel's
//!   backlog (at most one waits here, when its request was withdrawn while it arrived).
//! - Each connection has two threads: a reader that sends [`GuestMsg::TcpData`] within the
//!   connection's output window (the same windows as process output, so
//!   [`HostMsg::Credit`] and [`HostMsg::Discard`] work unchanged) and a writer that puts
//!   [`HostMsg::TcpData`] into the socket and gives credit back with
//!   [`GuestMsg::StdinCredit`].
//!
//! Bounds: [`MAX_LISTENERS`] ports, [`MAX_WAITING_ACCEPTS`] accept requests per port,
//! [`MAX_CONNECTIONS`] open connections, one window
//! ([`vmcp_guest_proto::STREAM_WINDOW`]) of host bytes queued per connection (a host that
//! sends more gets the connection closed) and one chunk of guest bytes in flight per
//! connection beyond the host's credit.
//!
//! [`HostMsg::TcpAccept`]: vmcp_guest_proto::HostMsg::TcpAccept
//! [`HostMsg::TcpConnect`]: vmcp_guest_proto::HostMsg::TcpConnect
//! [`HostMsg::TcpData`]: vmcp_guest_proto::HostMsg::TcpData
//! [`HostMsg::Credit`]: vmcp_guest_proto::HostMsg::Credit
//! [`HostMsg::Discard`]: vmcp_guest_proto::HostMsg::Discard

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use vmcp_guest_proto::{credit_cost, FailureKind, GuestMsg, RequestId, CHUNK_SIZE};

use super::{lock, spawn_thread, Out, Window, Windows};

/// Most guest ports with a listener at once.
pub const MAX_LISTENERS: usize = 16;
/// Most accept requests waiting on one port.
pub const MAX_WAITING_ACCEPTS: usize = 64;
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Longest wait for a connect to a guest port.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Failure = (FailureKind, String);

/// The tunnels of one channel session.
pub(super) struct Tunnels {
    out: Out,
    windows: Windows,
    listeners: Mutex<HashMap<u16, Arc<Listener>>>,
    conns: Arc<Mutex<HashMap<RequestId, Conn>>>,
    /// Set when the session ends: nothing new starts.
    closed: AtomicBool,
}

/// A guest port the host accepts connections on.
struct Listener {
    port: u16,
    waiting: Mutex<VecDeque<RequestId>>,
    wake: Condvar,
    closed: AtomicBool,
}

/// One open connection.
struct Conn {
    /// For shutting it down from the serve loop.
    socket: TcpStream,
    /// Host bytes for the writer thread; `None` after the host's end of file.
    tx: Option<mpsc::Sender<Vec<u8>>>,
    /// Credit units of host bytes queued and not yet given back.
    queued: Arc<AtomicU32>,
}

impl Tunnels {
    pub(super) fn new(out: Out, windows: Windows) -> Tunnels {
        Tunnels {
            out,
            windows,
            listeners: Mutex::new(HashMap::new()),
            conns: Arc::new(Mutex::new(HashMap::new())),
            closed: AtomicBool::new(false),
        }
    }

    fn busy(&self, id: RequestId) -> bool {
        lock(&self.conns).contains_key(&id)
            || lock(&self.listeners)
                .values()
                .any(|l| lock(&l.waiting).contains(&id))
    }

    fn check_request(&self, id: RequestId, port: u16) -> Result<(), Failure> {
        let invalid = |m: String| Err((FailureKind::InvalidRequest, m));
        if port == 0 {
            return invalid("a tunnel needs a port from 1 to 65535".into());
        }
        if self.busy(id) {
            return invalid(format!("request id {id} is already a connection"));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err((FailureKind::Other, "the channel session is ending".into()));
        }
        Ok(())
    }

    /// [`vmcp_guest_proto::HostMsg::TcpAccept`]: answered when a connection arrives.
    pub(super) fn accept(self: &Arc<Self>, id: RequestId, port: u16) -> io::Result<()> {
        match self.try_accept(id, port) {
            Ok(()) => Ok(()),
            Err((kind, message)) => self.out.fail(id, kind, message),
        }
    }

    fn try_accept(self: &Arc<Self>, id: RequestId, port: u16) -> Result<(), Failure> {
        self.check_request(id, port)?;
        let mut listeners = lock(&self.listeners);
        let listener = match listeners.get(&port) {
            Some(l) => Arc::clone(l),
            None => {
                if listeners.len() >= MAX_LISTENERS {
                    return Err((
                        FailureKind::InvalidRequest,
                        format!("at most {MAX_LISTENERS} ports can be tunnelled at once"),
                    ));
                }
                let socket = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).map_err(|e| {
                    (
                        FailureKind::Other,
                        format!("cannot listen on 127.0.0.1:{port} in the guest: {e}"),
                    )
                })?;
                let l = Arc::new(Listener {
                    port,
                    waiting: Mutex::new(VecDeque::new()),
                    wake: Condvar::new(),
                    closed: AtomicBool::new(false),
                });
                let (l2, tunnels) = (Arc::clone(&l), Arc::clone(self));
                spawn_thread("tcp-accept", move || tunnels.accept_loop(&l2, &socket))
                    .map_err(|e| (FailureKind::Other, format!("cannot start a thread: {e}")))?;
                listeners.insert(port, Arc::clone(&l));
                l
            }
        };
        drop(listeners);
        let mut waiting = lock(&listener.waiting);
        if waiting.len() >= MAX_WAITING_ACCEPTS {
            return Err((
                FailureKind::InvalidRequest,
                format!("at most {MAX_WAITING_ACCEPTS} accept requests can wait on one port"),
            ));
        }
        waiting.push_back(id);
        listener.wake.notify_all();
        Ok(())
    }

    /// Accepts one connection per waiting request, in request order, until the session ends.
    fn accept_loop(&self, l: &Listener, socket: &TcpListener) {
        loop {
            {
                let mut waiting = lock(&l.waiting);
                while waiting.is_empty() && !l.closed.load(Ordering::Acquire) {
                    waiting = l
                        .wake
                        .wait(waiting)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            }
            if l.closed.load(Ordering::Acquire) {
                return;
            }
            let stream = match socket.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("vmcp-agent: accept on 127.0.0.1:{} failed: {e}", l.port);
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            // The request it was accepted for may have been withdrawn meanwhile: the
            // connection then waits here (one at most) for the next request.
            let id = {
                let mut waiting = lock(&l.waiting);
                loop {
                    if l.closed.load(Ordering::Acquire) {
                        // The wake-up connection of `close_all`, or a late client: closed by
                        // the drop.
                        return;
                    }
                    if let Some(id) = waiting.pop_front() {
                        break id;
                    }
                    waiting = l
                        .wake
                        .wait(waiting)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            };
            self.open(id, stream);
        }
    }

    /// [`vmcp_guest_proto::HostMsg::TcpConnect`]: connects in a thread (a connect can take
    /// up to [`CONNECT_TIMEOUT`]; the serve loop never waits for it).
    pub(super) fn connect(self: &Arc<Self>, id: RequestId, port: u16) -> io::Result<()> {
        if let Err((kind, message)) = self.check_request(id, port) {
            return self.out.fail(id, kind, message);
        }
        let tunnels = Arc::clone(self);
        let spawned = spawn_thread("tcp-connect", move || {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => tunnels.open(id, stream),
                Err(e) => {
                    let message = format!("cannot connect to 127.0.0.1:{port} in the guest: {e}");
                    let _ = tunnels.out.fail(id, FailureKind::Other, message);
                }
            }
        });
        match spawned {
            Ok(()) => Ok(()),
            Err(e) => self.out.fail(
                id,
                FailureKind::Other,
                format!("cannot start a thread: {e}"),
            ),
        }
    }

    /// Announces connection `id` and starts its threads.
    fn open(&self, id: RequestId, stream: TcpStream) {
        let fail = |message: String| {
            let _ = stream.shutdown(Shutdown::Both);
            let _ = self.out.fail(id, FailureKind::Other, message);
        };
        let (reader, socket) = match (stream.try_clone(), stream.try_clone()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => return fail(format!("cannot use the connection: {e}")),
        };
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let queued = Arc::new(AtomicU32::new(0));
        {
            let mut conns = lock(&self.conns);
            if conns.len() >= MAX_CONNECTIONS {
                drop(conns);
                return fail(format!(
                    "at most {MAX_CONNECTIONS} tunnelled connections can be open at once"
                ));
            }
            if self.closed.load(Ordering::Acquire) {
                drop(conns);
                return fail("the channel session is ending".into());
            }
            conns.insert(
                id,
                Conn {
                    socket,
                    tx: Some(tx),
                    queued: Arc::clone(&queued),
                },
            );
        }
        let window = Arc::new(Window::default());
        if let Some(old) = lock(&self.windows).insert(id, Arc::clone(&window)) {
            old.discard();
        }
        let _ = self.out.send(&GuestMsg::Connected { id });
        // Both threads end the connection together: the last one out forgets it.
        let ends = Arc::new(AtomicU32::new(2));
        let finish = {
            let (conns, windows, window, ends) = (
                Arc::clone(&self.conns),
                Arc::clone(&self.windows),
                Arc::clone(&window),
                Arc::clone(&ends),
            );
            move || {
                if ends.fetch_sub(1, Ordering::AcqRel) == 1 {
                    lock(&conns).remove(&id);
                    window.discard();
                    super::close_window(&windows, id, &window);
                }
            }
        };
        let finish2 = finish.clone();
        let out = self.out.clone();
        let read_side = move || {
            read_loop(reader, id, &out, &window);
            finish();
        };
        let out = self.out.clone();
        let write_side = move || {
            write_loop(stream, id, &out, &rx, &queued);
            finish2();
        };
        let started = spawn_thread("tcp-read", read_side).and_then(|()| {
            spawn_thread("tcp-write", write_side).inspect_err(|_| {
                // The reader runs: closing the socket ends it.
                if let Some(c) = lock(&self.conns).get(&id) {
                    let _ = c.socket.shutdown(Shutdown::Both);
                }
            })
        });
        if let Err(e) = started {
            let mut conns = lock(&self.conns);
            if let Some(c) = conns.remove(&id) {
                let _ = c.socket.shutdown(Shutdown::Both);
            }
            drop(conns);
            let _ = self.out.fail(
                id,
                FailureKind::Other,
                format!("cannot start a thread: {e}"),
            );
        }
    }

    /// Host bytes for connection `id`; a host that overruns the window loses the connection.
    pub(super) fn data(&self, id: RequestId, data: Vec<u8>) {
        let mut conns = lock(&self.conns);
        let Some(c) = conns.get_mut(&id) else { return };
        let Some(tx) = &c.tx else { return };
        if !super::take_window(&c.queued, data.len()) {
            eprintln!(
                "vmcp-agent: the host sent data on connection {id} beyond its window; closing \
                 the connection"
            );
            let _ = c.socket.shutdown(Shutdown::Both);
            c.tx = None;
            return;
        }
        if tx.send(data).is_err() {
            c.tx = None;
        }
    }

    /// The host's end of file on connection `id`: the writer shuts the socket down for
    /// writing after the queued bytes.
    pub(super) fn eof(&self, id: RequestId) {
        if let Some(c) = lock(&self.conns).get_mut(&id) {
            c.tx = None;
        }
    }

    /// [`vmcp_guest_proto::HostMsg::Discard`] of a connection: closed at once both ways.
    pub(super) fn discard(&self, id: RequestId) {
        if let Some(c) = lock(&self.conns).get_mut(&id) {
            let _ = c.socket.shutdown(Shutdown::Both);
            c.tx = None;
        }
        for l in lock(&self.listeners).values() {
            lock(&l.waiting).retain(|w| *w != id);
        }
    }

    /// After a re-key (a restored snapshot, a rewind, a fork) the host is a new one: accept
    /// requests of the old one are dropped (else a client would go to an id nobody serves)
    /// and its connections closed; listeners stay for the new host's requests.
    pub(super) fn forget_requests(&self) {
        for l in lock(&self.listeners).values() {
            lock(&l.waiting).clear();
        }
        for c in lock(&self.conns).values_mut() {
            let _ = c.socket.shutdown(Shutdown::Both);
            c.tx = None;
        }
    }

    /// The session ends: listeners close (their ports are free for the next session) and
    /// every connection is shut down.
    pub(super) fn close_all(&self) {
        self.closed.store(true, Ordering::Release);
        for (_, l) in lock(&self.listeners).drain() {
            l.closed.store(true, Ordering::Release);
            l.wake.notify_all();
            // An accept blocked in the kernel wakes up for this connection and sees `closed`.
            let _ = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, l.port)),
                Duration::from_millis(200),
            );
        }
        for c in lock(&self.conns).values_mut() {
            let _ = c.socket.shutdown(Shutdown::Both);
            c.tx = None;
        }
    }
}

/// Socket to host: [`GuestMsg::TcpData`] within the window, then [`GuestMsg::TcpEof`] or
/// [`GuestMsg::Failed`].
fn read_loop(mut socket: TcpStream, id: RequestId, out: &Out, window: &Window) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let n = match socket.read(&mut buf) {
            Ok(0) => {
                let _ = out.send(&GuestMsg::TcpEof { id });
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let message = format!("the guest side of the connection failed: {e}");
                let _ = out.fail(id, FailureKind::Other, message);
                return;
            }
        };
        if !window.acquire(credit_cost(n)) {
            // The host discarded the connection (or the session ended).
            let _ = socket.shutdown(Shutdown::Both);
            return;
        }
        let data = buf[..n].to_vec();
        if out.send(&GuestMsg::TcpData { id, data }).is_err() {
            return;
        }
    }
}

/// Host to socket: writes the queued chunks, gives their credit back, and shuts the socket
/// down for writing at the host's end of file.
fn write_loop(
    mut socket: TcpStream,
    id: RequestId,
    out: &Out,
    rx: &mpsc::Receiver<Vec<u8>>,
    queued: &AtomicU32,
) {
    super::feed_host_bytes(&mut socket, id, out, rx, queued);
    let _ = socket.shutdown(Shutdown::Write);
}

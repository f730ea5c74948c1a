//! The daemon socket end to end with a fake VM source: the channel descriptor arrives, each
//! VM goes to one client only and is destroyed after use, permissions, the peer check, and
//! hostile clients (oversized, slow, wrong version, garbage).
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use vmcp_pool::client::{self, Acquired, ClientError};
use vmcp_pool::proto::{self, Answer, VmRequest, PROTOCOL_VERSION};
use vmcp_pool::server::{self, Handout, Resolve, ServerOptions};
use vmcp_pool::{Pool, ProfileSpec, Source};

/// A fake VM: the host end of a socketpair whose other ("guest") end has the VM's id
/// written into it.
struct FakeVm {
    id: String,
    host: OwnedFd,
    _guest: UnixStream,
    alive: Arc<AtomicUsize>,
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Handout for FakeVm {
    fn vm_id(&self) -> &str {
        &self.id
    }
    fn token(&self) -> &str {
        "tok"
    }
    fn channel(&self) -> BorrowedFd<'_> {
        self.host.as_fd()
    }
    fn alive(&self) -> bool {
        // The test kills a VM by naming it in DEAD.
        !DEAD.lock().unwrap().contains(&self.id)
    }
}

static DEAD: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct FakeSource {
    /// Tells this daemon's VM ids from those of the other tests (they share `DEAD`).
    tag: usize,
    n: AtomicUsize,
    alive: Arc<AtomicUsize>,
}

#[async_trait]
impl Source for FakeSource {
    type Vm = FakeVm;
    async fn make(&self, _p: &ProfileSpec) -> Result<FakeVm, String> {
        let id = format!("d{}vm{}", self.tag, self.n.fetch_add(1, Ordering::SeqCst));
        let (host, mut guest) = UnixStream::pair().map_err(|e| e.to_string())?;
        guest
            .write_all(format!("{id}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        self.alive.fetch_add(1, Ordering::SeqCst);
        Ok(FakeVm {
            id,
            host: host.into(),
            _guest: guest,
            alive: Arc::clone(&self.alive),
        })
    }
}

/// Profile `p<memory>` for every request.
struct ByMemory;

#[async_trait]
impl Resolve for ByMemory {
    async fn profile_for(&self, req: &VmRequest) -> Result<String, String> {
        Ok(format!("p{}", req.memory_mib))
    }
}

struct Daemon {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    alive: Arc<AtomicUsize>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::thread::JoinHandle<()>>,
    pool: Arc<Pool<FakeSource>>,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

fn start(target: usize) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run").join("daemon.sock");
    let alive = Arc::new(AtomicUsize::new(0));
    static TAGS: AtomicUsize = AtomicUsize::new(0);
    let src = Arc::new(FakeSource {
        tag: TAGS.fetch_add(1, Ordering::SeqCst),
        n: AtomicUsize::new(0),
        alive: Arc::clone(&alive),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = Pool::new(
        src,
        vec![ProfileSpec::new("p256", 1, 256, target)],
        1 << 20,
        2,
    );
    let listener = {
        let _g = rt.enter();
        server::bind(&sock).unwrap()
    };
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut opts = ServerOptions::default();
    opts.request_timeout = Duration::from_millis(300);
    opts.max_connections = 16;
    let log2 = Arc::clone(&log);
    opts.log = Arc::new(move |l: &str| log2.lock().unwrap().push(l.to_string()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (p2, h) = (Arc::clone(&pool), rt.handle().clone());
    let done = std::thread::spawn(move || {
        h.block_on(async move {
            let refill = tokio::spawn(Arc::clone(&p2).run());
            server::serve(Arc::clone(&p2), Arc::new(ByMemory), listener, opts, async {
                let _ = stopped.await;
            })
            .await;
            p2.shutdown().await;
            let _ = refill.await;
        })
    });
    let d = Daemon {
        _dir: dir,
        sock,
        alive,
        rt,
        stop: Some(stop),
        done: Some(done),
        pool,
        log,
    };
    wait(|| d.pool.status()[0].ready as usize == target);
    d
}

impl Daemon {
    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            d.join().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        let _ = &self.rt;
    }
}

fn wait(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const T: Duration = Duration::from_secs(5);

fn acquire(sock: &Path) -> (String, UnixStream, client::Session) {
    match client::acquire(sock, &VmRequest::new(1, 256), T).unwrap() {
        Acquired::Granted {
            granted,
            channel,
            session,
        } => {
            let mut ch = UnixStream::from(channel);
            let mut line = vec![0u8; granted.vm_id.len() + 1];
            ch.read_exact(&mut line).unwrap();
            assert_eq!(line, format!("{}\n", granted.vm_id).as_bytes());
            assert_eq!(granted.token, "tok");
            assert_eq!(granted.profile, "p256");
            (granted.vm_id, ch, session)
        }
        Acquired::NoVm(r) => panic!("no VM: {r}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_handed_out_vm_carries_its_channel_and_is_destroyed_after_use() {
    let mut d = start(2);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.sock), 0o600);
    assert_eq!(mode(d.sock.parent().unwrap()), 0o700);
    let (id, _ch, session) = acquire(&d.sock);
    assert_eq!(d.pool.status()[0].leased, 1);
    session.done();
    wait(|| d.pool.status()[0].leased == 0);
    // A client that just goes away (killed) ends its VM too.
    let (id2, _ch2, session2) = acquire(&d.sock);
    assert_ne!(id, id2);
    drop(session2);
    wait(|| d.pool.status()[0].leased == 0 && d.pool.status()[0].ready == 2);
    assert_eq!(d.alive.load(Ordering::SeqCst), 2, "used VMs are destroyed");
    assert_eq!(d.pool.status()[0].handed_out, 2);
    // A VM that died in the pool is destroyed, not handed out: the next one comes.
    wait(|| d.pool.status()[0].ready == 2);
    let (id3, _ch3, s3) = acquire(&d.sock);
    s3.done();
    wait(|| d.pool.status()[0].leased == 0 && d.pool.status()[0].ready == 2);
    // vm ids are handed out in order of their restore: the next ready one is the oldest.
    let (prefix, n) = id3.split_once("vm").unwrap();
    let next = format!("{prefix}vm{}", n.parse::<u32>().unwrap() + 1);
    DEAD.lock().unwrap().push(next.clone());
    let (id4, _ch4, s4) = acquire(&d.sock);
    assert_ne!(id4, next, "a dead VM was handed out");
    s4.done();
    wait(|| d.pool.status()[0].leased == 0);
    let log = d.log.lock().unwrap().join("\n");
    assert!(
        log.contains(&format!("VM {next} died in the pool")),
        "{log}"
    );
    // Another profile: no VM, a reason.
    match client::acquire(&d.sock, &VmRequest::new(1, 512), T).unwrap() {
        Acquired::NoVm(r) => assert!(r.contains("no pool for profile p512"), "{r}"),
        other => panic!("{other:?}"),
    }
    let st = client::status(&d.sock, T).unwrap();
    assert_eq!(st.pid, std::process::id());
    assert_eq!(st.profiles[0].handed_out, 5);
    // A second daemon on the same socket is refused; the first one's socket stays.
    {
        let _g = d.rt.enter();
        assert!(matches!(
            server::bind(&d.sock),
            Err(server::ServerError::Running(_))
        ));
    }
    d.stop();
    assert!(!d.sock.exists(), "the socket is removed at exit");
    assert_eq!(
        d.alive.load(Ordering::SeqCst),
        0,
        "shutdown destroys every VM"
    );
    assert!(matches!(
        client::acquire(&d.sock, &VmRequest::new(1, 256), T),
        Err(ClientError::NotRunning(_))
    ));
    let log = d.log.lock().unwrap().join("\n");
    assert!(log.contains(&format!("handed VM {id} (p256)")), "{log}");
    assert!(
        log.contains(&format!("destroyed VM {id} after use")),
        "{log}"
    );
}

#[test]
fn concurrent_clients_never_share_a_vm() {
    let d = start(3);
    let sock = d.sock.clone();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(20);
                while ids.len() < 5 {
                    assert!(Instant::now() < deadline);
                    match client::acquire(&sock, &VmRequest::new(1, 256), T).unwrap() {
                        Acquired::Granted {
                            granted, session, ..
                        } => {
                            ids.push(granted.vm_id);
                            session.done();
                        }
                        Acquired::NoVm(_) => std::thread::sleep(Duration::from_millis(2)),
                        other => panic!("{other:?}"),
                    }
                }
                ids
            })
        })
        .collect();
    let all: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 40);
    assert_eq!(unique.len(), 40, "a VM went to two clients");
}

fn raw(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn refusal(mut s: UnixStream) -> String {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let (payload, used) = proto::split_frame(&buf, proto::MAX_ANSWER)
        .unwrap()
        .unwrap();
    assert_eq!(used, buf.len(), "nothing after the refusal");
    match proto::decode_answer(payload).unwrap() {
        Answer::Refused { reason } => reason,
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_clients_are_refused_within_bounds() {
    let d = start(1);
    // A header announcing 4 GiB: refused from the header, nothing allocated.
    let mut s = raw(&d.sock);
    let mut h = PROTOCOL_VERSION.to_le_bytes().to_vec();
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&h).unwrap();
    assert!(refusal(s).contains("over the 16384-byte limit"));
    // Another protocol version.
    let mut s = raw(&d.sock);
    s.write_all(&[9, 0, 0, 0, 0, 0]).unwrap();
    assert!(refusal(s).contains("protocol 9"));
    // Garbage payload.
    let mut s = raw(&d.sock);
    let mut f = PROTOCOL_VERSION.to_le_bytes().to_vec();
    f.extend_from_slice(&4u32.to_le_bytes());
    f.extend_from_slice(&[0xff; 4]);
    s.write_all(&f).unwrap();
    assert!(refusal(s).contains("malformed"));
    // A path over its bound inside a frame under the frame limit.
    let mut r = VmRequest::new(1, 256);
    r.rootfs = Some("x".repeat(proto::MAX_PATH_BYTES + 1));
    let frame = proto::encode(&proto::Request::Acquire(r), proto::MAX_REQUEST).unwrap();
    let mut s = raw(&d.sock);
    s.write_all(&frame).unwrap();
    assert!(refusal(s).contains("rootfs"));
    // Half a header, then silence: cut off after the request timeout.
    let mut s = raw(&d.sock);
    s.write_all(&[1, 0, 0]).unwrap();
    let t = Instant::now();
    assert!(refusal(s).contains("no whole request within"));
    assert!(t.elapsed() < Duration::from_secs(3));
    // Half a payload, then silence.
    let mut s = raw(&d.sock);
    let mut f = PROTOCOL_VERSION.to_le_bytes().to_vec();
    f.extend_from_slice(&100u32.to_le_bytes());
    f.extend_from_slice(&[0; 10]);
    s.write_all(&f).unwrap();
    assert!(refusal(s).contains("no whole request within"));
    // More connections than allowed at once: the extra ones are closed, the daemon lives.
    let idle: Vec<UnixStream> = (0..20).map(|_| raw(&d.sock)).collect();
    std::thread::sleep(Duration::from_millis(50));
    drop(idle);
    std::thread::sleep(Duration::from_millis(400));
    let (_, _, session) = acquire(&d.sock);
    session.done();
    assert_eq!(
        d.pool.status()[0].handed_out,
        1,
        "no hostile client got a VM"
    );
    let log = d.log.lock().unwrap().join("\n");
    assert!(log.contains("too many clients at once"), "{log}");
}

#[test]
fn unsafe_socket_directories_are_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = server::bind(&open.join("s.sock")).unwrap_err().to_string();
    assert!(e.contains("other users may enter it (mode 755)"), "{e}");
    // A stale socket (its daemon was killed) is replaced.
    let ok = dir.path().join("ok");
    std::fs::create_dir(&ok).unwrap();
    std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o700)).unwrap();
    let stale = std::os::unix::net::UnixListener::bind(ok.join("s.sock")).unwrap();
    drop(stale);
    let l = server::bind(&ok.join("s.sock")).unwrap();
    assert_eq!(l.path(), ok.join("s.sock"));
}

/// Not a test on its own: the other user's client in [`another_users_client_is_refused`].
#[test]
#[ignore = "helper process of another_users_client_is_refused"]
fn peer_helper() {
    let Some(sock) = std::env::var_os("VMCP_PEER_HELPER_SOCKET") else {
        return;
    };
    match client::acquire(Path::new(&sock), &VmRequest::new(1, 256), T) {
        Err(ClientError::Refused(r)) => println!("REFUSED {r}"),
        other => println!("NOT REFUSED {other:?}"),
    }
}

#[test]
fn another_users_client_is_refused() {
    use std::os::unix::process::CommandExt;
    if rustix_uid() != 0 {
        vmcp_test_support::skipped!("SKIPPED: connecting as another user needs root");
        return;
    }
    let d = start(1);
    // Open the directory and socket to everyone, as a misconfiguration would: the peer check
    // must still refuse.
    let dir = d.sock.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(d._dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "peer_helper", "--nocapture"])
        .env("VMCP_PEER_HELPER_SOCKET", &d.sock)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() && !stdout.contains("REFUSED") {
        vmcp_test_support::skipped!(
            "SKIPPED: the test binary cannot run as uid 65534 here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    assert!(
        stdout.contains("REFUSED this vmcp daemon serves uid 0 only (you are uid 65534)"),
        "{stdout}"
    );
    assert_eq!(d.pool.status()[0].handed_out, 0);
    let log = d.log.lock().unwrap().join("\n");
    assert!(
        log.contains("of uid 65534: this daemon serves uid 0 only"),
        "{log}"
    );
}

/// Not a test on its own: another user's "daemon" in [`another_users_daemon_is_not_used`]:
/// listens on the socket path it is given and accepts one connection.
#[test]
#[ignore = "helper process of another_users_daemon_is_not_used"]
fn foreign_daemon_helper() {
    let Some(sock) = std::env::var_os("VMCP_FOREIGN_DAEMON_SOCKET") else {
        return;
    };
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    println!("LISTENING");
    let (mut s, _) = l.accept().unwrap();
    let mut got = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = s.read_to_end(&mut got);
    println!("GOT {} BYTES", got.len());
}

#[test]
fn another_users_daemon_is_not_used() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    if rustix_uid() != 0 {
        vmcp_test_support::skipped!("SKIPPED: a daemon of another user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.path().join("daemon.sock");
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "foreign_daemon_helper",
            "--nocapture",
        ])
        .env("VMCP_FOREIGN_DAEMON_SOCKET", &sock)
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(helper.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("LISTENING") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            let _ = helper.wait();
            vmcp_test_support::skipped!("SKIPPED: the test binary cannot run as uid 65534 here");
            return;
        }
    }
    let e = client::acquire(&sock, &VmRequest::new(1, 256), T).unwrap_err();
    assert!(matches!(e, ClientError::Foreign { uid: 65534, .. }), "{e}");
    assert!(e.to_string().contains("served by uid 65534"), "{e}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    helper.wait().unwrap();
    assert!(
        rest.contains("GOT 0 BYTES"),
        "the request reached the foreign daemon: {rest}"
    );
}

fn rustix_uid() -> u32 {
    vmcp_pool::sys::my_uid()
}

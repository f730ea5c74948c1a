//! The request server on the host, over a Unix socket pair, with real processes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmcp_guest_proto::{
    read_msg, write_msg, ExecRequest, ExitStatus, FailureKind, GuestMsg, HostMsg, CHUNK_SIZE,
};

use super::*;

struct Host {
    stream: UnixStream,
    scratch: Vec<u8>,
    server: Option<JoinHandle<Result<ServeEnd, ServeError>>>,
    /// Give output credit back as soon as output arrives (what a reading host does).
    auto_credit: bool,
    /// Stdin credit the agent gave back, by request id.
    stdin_credit: std::collections::HashMap<u32, u64>,
}

impl Host {
    fn start() -> Host {
        Host::with_options(|_| {})
    }

    fn with_options(f: impl FnOnce(&mut ServeOptions)) -> Host {
        let (host, guest) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut options = ServeOptions::new(crate::hello("tok-1", false));
        f(&mut options);
        let reader = guest.try_clone().unwrap();
        let server = std::thread::spawn(move || serve(reader, guest, &options));
        let mut h = Host {
            stream: host,
            scratch: Vec::new(),
            server: Some(server),
            auto_credit: true,
            stdin_credit: std::collections::HashMap::new(),
        };
        match h.recv() {
            GuestMsg::Hello(hello) => {
                assert_eq!(hello.token, "tok-1");
                assert_eq!(hello.protocol_version, vmcp_guest_proto::PROTOCOL_VERSION);
                assert!(hello.capabilities.has(vmcp_guest_proto::Capabilities::EXEC));
            }
            other => panic!("expected hello, got {other:?}"),
        }
        h
    }

    fn send(&mut self, msg: HostMsg) {
        write_msg(&mut self.stream, &msg).unwrap();
    }

    /// The next message other than stdin credit (which is counted); gives output credit
    /// back when `auto_credit` is set.
    fn recv(&mut self) -> GuestMsg {
        loop {
            let msg = self.recv_raw();
            if let GuestMsg::StdinCredit { id, credit } = msg {
                *self.stdin_credit.entry(id).or_default() += u64::from(credit);
                continue;
            }
            let cost = msg.window_cost();
            if self.auto_credit && cost > 0 {
                let id = msg.request_id().unwrap();
                self.send(HostMsg::Credit { id, credit: cost });
            }
            return msg;
        }
    }

    fn recv_raw(&mut self) -> GuestMsg {
        read_msg(&mut self.stream, &mut self.scratch)
            .unwrap()
            .expect("channel closed")
    }

    fn exec(&mut self, id: u32, argv: &[&str]) {
        self.exec_with(id, argv, |_| {});
    }

    fn exec_with(&mut self, id: u32, argv: &[&str], f: impl FnOnce(&mut ExecRequest)) {
        let mut req = ExecRequest {
            id,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: false,
        };
        f(&mut req);
        self.send(HostMsg::Exec(req));
    }

    /// Collects one process's messages until its exit.
    fn collect(&mut self, id: u32) -> Run {
        let mut run = Run::default();
        loop {
            match self.recv() {
                GuestMsg::Started { id: i, pid } if i == id => run.pid = Some(pid),
                GuestMsg::Stdout { id: i, data } if i == id => {
                    assert!(run.pid.is_some(), "output before Started");
                    assert!(data.len() <= CHUNK_SIZE);
                    run.stdout.extend(data);
                }
                GuestMsg::Stderr { id: i, data } if i == id => run.stderr.extend(data),
                GuestMsg::Exited { id: i, status } if i == id => {
                    run.status = Some(status);
                    return run;
                }
                GuestMsg::Failed {
                    id: i,
                    kind,
                    message,
                } if i == id => {
                    run.failed = Some((kind, message));
                    return run;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn run(&mut self, id: u32, argv: &[&str]) -> Run {
        self.exec(id, argv);
        self.collect(id)
    }

    fn close(mut self) -> Result<ServeEnd, ServeError> {
        self.stream.shutdown(std::net::Shutdown::Both).unwrap();
        self.server.take().unwrap().join().unwrap()
    }
}

#[derive(Default, Debug)]
struct Run {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<ExitStatus>,
    failed: Option<(FailureKind, String)>,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn ping_and_close() {
    let mut h = Host::start();
    h.send(HostMsg::Ping { id: 7 });
    assert_eq!(h.recv(), GuestMsg::Pong { id: 7 });
    assert_eq!(h.close().unwrap(), ServeEnd::Closed);
}

#[test]
fn streams_and_exit_code() {
    let mut h = Host::start();
    let r = h.run(1, &["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(r.out(), "out\n");
    assert_eq!(r.stderr, b"err\n");
    assert_eq!(r.status, Some(ExitStatus::Code(3)));
    let r = h.run(2, &["true"]);
    assert_eq!(r.status, Some(ExitStatus::Code(0)));
    assert!(r.stdout.is_empty() && r.stderr.is_empty());
}

#[test]
fn killed_by_signal() {
    let mut h = Host::start();
    let r = h.run(1, &["sh", "-c", "kill -9 $$"]);
    assert_eq!(r.status, Some(ExitStatus::Signal(9)));
}

#[test]
fn exec_failures() {
    let mut h = Host::start();
    let r = h.run(1, &["/nonexistent/program"]);
    let (kind, msg) = r.failed.unwrap();
    assert_eq!(kind, FailureKind::NotFound);
    assert!(msg.contains("/nonexistent/program"), "{msg}");
    let r = h.run(2, &["no-such-program-vmcp"]);
    assert_eq!(r.failed.unwrap().0, FailureKind::NotFound);

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let r = h.run(3, &[script.to_str().unwrap()]);
    assert_eq!(r.failed.unwrap().0, FailureKind::PermissionDenied);

    let r = h.run(4, &[]);
    assert_eq!(r.failed.unwrap().0, FailureKind::InvalidRequest);

    h.exec_with(5, &["true"], |r| r.cwd = Some("/nonexistent-dir".into()));
    let (kind, msg) = h.collect(5).failed.unwrap();
    assert_eq!(kind, FailureKind::InvalidRequest);
    assert!(msg.contains("/nonexistent-dir"), "{msg}");

    h.exec_with(6, &["true"], |r| r.env = vec![("A=B".into(), "x".into())]);
    assert_eq!(h.collect(6).failed.unwrap().0, FailureKind::InvalidRequest);

    let r = h.run(7, &["ec\0ho"]);
    assert_eq!(r.failed.unwrap().0, FailureKind::InvalidRequest);

    // The server still works afterwards.
    assert_eq!(h.run(8, &["true"]).status, Some(ExitStatus::Code(0)));
}

#[test]
fn duplicate_running_id_is_refused() {
    let mut h = Host::start();
    h.exec(1, &["sleep", "5"]);
    assert!(matches!(h.recv(), GuestMsg::Started { id: 1, .. }));
    h.exec(1, &["true"]);
    match h.recv() {
        GuestMsg::Failed { id: 1, kind, .. } => assert_eq!(kind, FailureKind::InvalidRequest),
        other => panic!("{other:?}"),
    }
    h.send(HostMsg::Signal { id: 1, signal: 9 });
    assert_eq!(h.collect(1).status, Some(ExitStatus::Signal(9)));
}

#[test]
fn programs_are_found_in_the_childs_path_and_keep_their_name() {
    use std::os::unix::fs::PermissionsExt;
    let mut h = Host::start();
    // argv[0] stays the name the request gave, not the file found in PATH.
    let r = h.run(1, &["sh", "-c", "tr '\\0' ' ' < /proc/$$/cmdline"]);
    assert_eq!(r.out(), "sh -c tr '\\0' ' ' < /proc/$$/cmdline ");
    // The request's PATH is searched, relative entries from the request's cwd.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    let prog = dir.path().join("bin/vmcp-test-prog");
    std::fs::write(&prog, "#!/bin/sh\necho found \"$@\"\n").unwrap();
    std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.exec_with(2, &["vmcp-test-prog", "a b"], |r| {
        r.env = vec![("PATH".into(), "/nonexistent:bin".into())];
        r.cwd = Some(dir.path().to_str().unwrap().into());
    });
    let r = h.collect(2);
    assert_eq!(
        (r.out().as_str(), r.status),
        ("found a b\n", Some(ExitStatus::Code(0)))
    );
    // Not in that PATH (though in the default one): not found.
    h.exec_with(3, &["sh", "-c", "true"], |r| {
        r.env = vec![("PATH".into(), dir.path().to_str().unwrap().into())];
    });
    let (kind, msg) = h.collect(3).failed.unwrap();
    assert_eq!(kind, FailureKind::NotFound);
    assert!(msg.contains("sh: command not found"), "{msg}");
}

#[test]
fn env_and_cwd() {
    let mut h = Host::start();
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    h.exec_with(
        1,
        &["sh", "-c", "echo $FOO; pwd; echo $PATH; echo $HOME"],
        |r| {
            r.env = vec![("FOO".into(), "bar baz".into())];
            r.cwd = Some(cwd.to_str().unwrap().into());
        },
    );
    let r = h.collect(1);
    assert_eq!(
        r.out(),
        format!("bar baz\n{}\n{DEFAULT_PATH}\n/root\n", cwd.display())
    );
    // Request variables override the defaults; nothing leaks from the agent's environment.
    std::env::set_var("VMCP_AGENT_TEST_LEAK", "1");
    h.exec_with(
        2,
        &[
            "sh",
            "-c",
            "echo $HOME; echo ${VMCP_AGENT_TEST_LEAK:-unset}",
        ],
        |r| {
            r.env = vec![("HOME".into(), "/home/x".into())];
        },
    );
    assert_eq!(h.collect(2).out(), "/home/x\nunset\n");
}

#[test]
fn stdin_is_streamed() {
    let mut h = Host::start();
    h.exec_with(1, &["cat"], |r| r.stdin = true);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in data.chunks(CHUNK_SIZE) {
        h.send(HostMsg::Stdin {
            id: 1,
            data: chunk.to_vec(),
        });
    }
    h.send(HostMsg::StdinEof { id: 1 });
    let r = h.collect(1);
    assert_eq!(r.stdout.len(), data.len());
    assert!(r.stdout == data);
    assert_eq!(r.status, Some(ExitStatus::Code(0)));

    // Without stdin the process reads /dev/null.
    let r = h.run(2, &["cat"]);
    assert_eq!((r.stdout.len(), r.status), (0, Some(ExitStatus::Code(0))));
    // Stdin for unknown or finished processes is ignored.
    h.send(HostMsg::Stdin {
        id: 99,
        data: b"x".to_vec(),
    });
    h.send(HostMsg::StdinEof { id: 99 });
    h.send(HostMsg::Ping { id: 3 });
    assert_eq!(h.recv(), GuestMsg::Pong { id: 3 });
}

#[test]
fn large_output_all_arrives_before_exit() {
    let mut h = Host::start();
    let r = h.run(
        1,
        &[
            "sh",
            "-c",
            "head -c 1000000 /dev/zero; head -c 70000 /dev/zero >&2",
        ],
    );
    assert_eq!(r.stdout.len(), 1_000_000);
    assert_eq!(r.stderr.len(), 70_000);
    assert_eq!(r.status, Some(ExitStatus::Code(0)));
}

#[test]
fn concurrent_execs_interleave() {
    let mut h = Host::start();
    h.exec(1, &["sh", "-c", "sleep 0.5; echo slow"]);
    h.exec(2, &["sh", "-c", "echo fast"]);
    h.send(HostMsg::Ping { id: 3 });
    let mut order = Vec::new();
    let mut outs = std::collections::HashMap::new();
    while order.len() < 3 {
        match h.recv() {
            GuestMsg::Exited { id, status } => {
                assert_eq!(status, ExitStatus::Code(0));
                order.push(id);
            }
            GuestMsg::Pong { id } => order.push(id),
            GuestMsg::Stdout { id, data } => outs.entry(id).or_insert_with(Vec::new).extend(data),
            GuestMsg::Started { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(order.last(), Some(&1), "{order:?}");
    assert_eq!(outs[&1], b"slow\n");
    assert_eq!(outs[&2], b"fast\n");
}

#[test]
fn signal_reaches_the_process_group() {
    let mut h = Host::start();
    // The shell waits for its child; SIGTERM to the group stops both.
    h.exec(1, &["sh", "-c", "sleep 30; echo not-reached"]);
    let GuestMsg::Started { pid, .. } = h.recv() else {
        panic!("no Started")
    };
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    h.send(HostMsg::Signal { id: 1, signal: 15 });
    let r = h.collect(1);
    assert_eq!(r.status, Some(ExitStatus::Signal(15)));
    assert!(r.stdout.is_empty());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!pid_alive(pid));
    // Signals to unknown ids are ignored.
    h.send(HostMsg::Signal { id: 42, signal: 9 });
    h.send(HostMsg::Ping { id: 2 });
    assert_eq!(h.recv(), GuestMsg::Pong { id: 2 });
}

#[test]
fn background_child_holding_the_pipe_does_not_delay_exit_for_long() {
    let mut h = Host::start();
    let t = Instant::now();
    let r = h.run(1, &["sh", "-c", "sleep 3 & echo started"]);
    assert_eq!(r.out(), "started\n");
    assert_eq!(r.status, Some(ExitStatus::Code(0)));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "exit took {:?}",
        t.elapsed()
    );
}

#[test]
fn files_round_trip() {
    let mut h = Host::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin").to_str().unwrap().to_string();
    let data: Vec<u8> = (0..(2 * CHUNK_SIZE + 123)).map(|i| (i * 7) as u8).collect();
    let chunks: Vec<&[u8]> = data.chunks(CHUNK_SIZE).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        h.send(HostMsg::WriteFile {
            id: 5,
            path: path.clone(),
            mode: 0o640,
            offset: (i * CHUNK_SIZE) as u64,
            data: chunk.to_vec(),
            last: i == chunks.len() - 1,
        });
        assert_eq!(h.recv(), GuestMsg::Done { id: 5 });
    }
    assert_eq!(std::fs::read(&path).unwrap(), data);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);

    h.send(HostMsg::ReadFile {
        id: 6,
        path: path.clone(),
    });
    let mut got = Vec::new();
    let mut chunks_seen = 0;
    loop {
        match h.recv() {
            GuestMsg::FileData { id: 6, data, eof } => {
                assert!(data.len() <= CHUNK_SIZE);
                chunks_seen += 1;
                got.extend(data);
                if eof {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, data);
    assert_eq!(chunks_seen, 3);

    // Exactly one chunk: a file of exactly CHUNK_SIZE bytes, and an empty file.
    for len in [CHUNK_SIZE, 0] {
        let p = dir.path().join(format!("len{len}"));
        std::fs::write(&p, vec![1u8; len]).unwrap();
        h.send(HostMsg::ReadFile {
            id: 7,
            path: p.to_str().unwrap().into(),
        });
        match h.recv() {
            GuestMsg::FileData { id: 7, data, eof } => {
                assert_eq!((data.len(), eof), (len, true));
            }
            other => panic!("{other:?}"),
        }
    }

    // Rewriting truncates.
    h.send(HostMsg::WriteFile {
        id: 8,
        path: path.clone(),
        mode: 0o600,
        offset: 0,
        data: b"short".to_vec(),
        last: true,
    });
    assert_eq!(h.recv(), GuestMsg::Done { id: 8 });
    assert_eq!(std::fs::read(&path).unwrap(), b"short");
}

#[test]
fn file_errors() {
    let mut h = Host::start();
    let dir = tempfile::tempdir().unwrap();
    let expect_fail = |h: &mut Host, id: u32, want: FailureKind| match h.recv() {
        GuestMsg::Failed {
            id: i,
            kind,
            message,
        } => {
            assert_eq!((i, kind), (id, want), "{message}");
            message
        }
        other => panic!("{other:?}"),
    };
    h.send(HostMsg::ReadFile {
        id: 1,
        path: "/nonexistent/file".into(),
    });
    let msg = expect_fail(&mut h, 1, FailureKind::NotFound);
    assert!(msg.contains("/nonexistent/file"), "{msg}");
    h.send(HostMsg::ReadFile {
        id: 2,
        path: "relative".into(),
    });
    expect_fail(&mut h, 2, FailureKind::InvalidRequest);
    h.send(HostMsg::ReadFile {
        id: 3,
        path: dir.path().to_str().unwrap().into(),
    });
    expect_fail(&mut h, 3, FailureKind::InvalidRequest);
    h.send(HostMsg::WriteFile {
        id: 4,
        path: "/nonexistent/dir/f".into(),
        mode: 0o644,
        offset: 0,
        data: vec![],
        last: true,
    });
    expect_fail(&mut h, 4, FailureKind::NotFound);
    h.send(HostMsg::WriteFile {
        id: 5,
        path: dir.path().join("g").to_str().unwrap().into(),
        mode: 0o644,
        offset: 10,
        data: vec![1],
        last: true,
    });
    expect_fail(&mut h, 5, FailureKind::InvalidRequest);
    h.send(HostMsg::WriteFile {
        id: 6,
        path: "rel/f".into(),
        mode: 0o644,
        offset: 0,
        data: vec![],
        last: true,
    });
    expect_fail(&mut h, 6, FailureKind::InvalidRequest);
}

#[test]
fn poweroff_is_acknowledged_and_ends_serving() {
    let mut h = Host::start();
    h.send(HostMsg::Poweroff { id: 9 });
    assert_eq!(h.recv(), GuestMsg::Done { id: 9 });
    let server = h.server.take().unwrap();
    assert_eq!(server.join().unwrap().unwrap(), ServeEnd::Poweroff);
}

#[test]
fn malformed_frame_is_a_clean_error_and_kills_processes() {
    let mut h = Host::start();
    h.exec(1, &["sleep", "30"]);
    let GuestMsg::Started { pid, .. } = h.recv() else {
        panic!("no Started")
    };
    assert!(pid_alive(pid));
    // A frame with a bad version byte.
    h.stream.write_all(&[1, 0, 0, 0, 99, 0]).unwrap();
    let server = h.server.take().unwrap();
    let err = server.join().unwrap().unwrap_err();
    assert!(matches!(err, ServeError::Read(_)), "{err}");
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pid_alive(pid), "process {pid} outlived the server");
}

#[test]
fn garbage_payload_is_an_error() {
    let mut h = Host::start();
    // Valid header, payload that is not a HostMsg (variant 200).
    h.stream.write_all(&[2, 0, 0, 0, 1, 200, 1]).unwrap();
    let err = h.server.take().unwrap().join().unwrap().unwrap_err();
    assert!(err.to_string().contains("cannot read a request"), "{err}");
}

#[test]
fn closed_writer_ends_serving() {
    let (host, guest) = UnixStream::pair().unwrap();
    drop(host);
    let reader = guest.try_clone().unwrap();
    let options = ServeOptions::new(crate::hello("", false));
    let res = serve(reader, guest, &options);
    // Either the hello cannot be written or the read sees the end.
    assert!(
        matches!(res, Err(ServeError::Write(_)) | Ok(ServeEnd::Closed)),
        "{res:?}"
    );
}

#[test]
fn debug_option_logs_and_serves() {
    let mut h = Host::with_options(|o| o.debug = true);
    h.send(HostMsg::Stdin {
        id: 1,
        data: vec![1, 2],
    });
    h.send(HostMsg::Ping { id: 1 });
    assert_eq!(h.recv(), GuestMsg::Pong { id: 1 });
    assert_eq!(describe(&HostMsg::Ping { id: 1 }), "Ping { id: 1 }");
}

// ---- Flow control -------------------------------------------------------------------------

use vmcp_guest_proto::{credit_cost, STREAM_WINDOW};

/// Reads messages for `wait`, counting output units per request, without giving credit.
fn drain_for(h: &mut Host, wait: Duration) -> (u64, Vec<GuestMsg>) {
    let (units, _, others) = drain_bytes_for(h, wait);
    (units, others)
}

/// [`drain_for`], also counting output bytes.
fn drain_bytes_for(h: &mut Host, wait: Duration) -> (u64, usize, Vec<GuestMsg>) {
    h.stream.set_read_timeout(Some(wait)).unwrap();
    let mut units = 0u64;
    let mut bytes = 0usize;
    let mut others = Vec::new();
    loop {
        match read_msg::<GuestMsg, _>(&mut h.stream, &mut h.scratch) {
            Ok(Some(m)) => {
                units += u64::from(m.window_cost());
                if let GuestMsg::Stdout { data, .. } | GuestMsg::Stderr { data, .. } = &m {
                    bytes += data.len();
                }
                if m.window_cost() == 0 {
                    others.push(m);
                }
            }
            Ok(None) => break,
            Err(vmcp_guest_proto::ProtoError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("{e}"),
        }
    }
    h.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    (units, bytes, others)
}

#[test]
fn output_stops_at_the_window_until_credit_comes() {
    let mut h = Host::start();
    h.auto_credit = false;
    h.exec(1, &["sh", "-c", "head -c 5000000 /dev/zero; echo tail >&2"]);
    let (units, bytes, others) = drain_bytes_for(&mut h, Duration::from_millis(1500));
    assert!(units <= u64::from(STREAM_WINDOW), "{units}");
    assert!(units > u64::from(STREAM_WINDOW) / 2, "{units}");
    assert!(
        !others.iter().any(|m| matches!(m, GuestMsg::Exited { .. })),
        "{others:?}"
    );
    // Still serving other requests while that output waits.
    h.send(HostMsg::Ping { id: 2 });
    let (_, others) = drain_for(&mut h, Duration::from_millis(300));
    assert!(others.contains(&GuestMsg::Pong { id: 2 }), "{others:?}");
    // Credit for what arrived lets the rest through.
    h.send(HostMsg::Credit {
        id: 1,
        credit: units as u32,
    });
    h.auto_credit = true;
    let (mut stdout, mut stderr) = (bytes, Vec::new());
    loop {
        match h.recv() {
            GuestMsg::Stdout { id: 1, data } => stdout += data.len(),
            GuestMsg::Stderr { id: 1, data } => stderr.extend(data),
            GuestMsg::Exited { id: 1, status } => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(stdout, 5_000_000);
    assert_eq!(stderr, b"tail\n");
}

#[test]
fn discarded_output_is_dropped_and_the_exit_still_comes() {
    let mut h = Host::start();
    h.auto_credit = false;
    h.exec(1, &["sh", "-c", "head -c 5000000 /dev/zero; exit 4"]);
    let (units, _) = drain_for(&mut h, Duration::from_millis(800));
    assert!(units <= u64::from(STREAM_WINDOW));
    h.send(HostMsg::Discard { id: 1 });
    loop {
        match h.recv() {
            GuestMsg::Stdout { .. } => {} // sent before the discard arrived
            GuestMsg::Exited { id: 1, status } => {
                assert_eq!(status, ExitStatus::Code(4));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn file_reads_wait_for_credit_and_can_be_discarded() {
    let mut h = Host::start();
    h.auto_credit = false;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big").to_str().unwrap().to_string();
    std::fs::write(&path, vec![3u8; 4_000_000]).unwrap();
    h.send(HostMsg::ReadFile {
        id: 1,
        path: path.clone(),
    });
    let (units, _) = drain_for(&mut h, Duration::from_millis(800));
    assert!(units <= u64::from(STREAM_WINDOW), "{units}");
    h.send(HostMsg::Discard { id: 1 });
    let (more, _) = drain_for(&mut h, Duration::from_millis(300));
    assert!(more <= u64::from(credit_cost(CHUNK_SIZE)), "{more}");
    // A fresh read of the same file with a reading host gets all of it.
    h.auto_credit = true;
    h.send(HostMsg::ReadFile { id: 2, path });
    let mut got = 0;
    loop {
        match h.recv() {
            GuestMsg::FileData { id: 2, data, eof } => {
                got += data.len();
                if eof {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, 4_000_000);
}

#[test]
fn stdin_credit_comes_back_as_the_process_reads() {
    let mut h = Host::start();
    h.exec_with(
        1,
        &["sh", "-c", "sleep 0.3; cat >/dev/null; echo read"],
        |r| r.stdin = true,
    );
    let mut sent = 0u64;
    // Exactly one window: accepted and queued while the process sleeps.
    while sent + u64::from(credit_cost(CHUNK_SIZE)) <= u64::from(STREAM_WINDOW) {
        h.send(HostMsg::Stdin {
            id: 1,
            data: vec![b'x'; CHUNK_SIZE],
        });
        sent += u64::from(credit_cost(CHUNK_SIZE));
    }
    h.send(HostMsg::StdinEof { id: 1 });
    let r = h.collect(1);
    assert_eq!(r.out(), "read\n");
    assert_eq!(h.stdin_credit.get(&1).copied(), Some(sent));
}

#[test]
fn stdin_beyond_the_window_closes_that_stdin_and_memory_stays_bounded() {
    let mut h = Host::start();
    // The process never reads: without the window the agent would queue everything.
    h.exec_with(1, &["sh", "-c", "sleep 1; wc -c"], |r| r.stdin = true);
    assert!(matches!(h.recv(), GuestMsg::Started { id: 1, .. }));
    for _ in 0..(3 * STREAM_WINDOW as usize / CHUNK_SIZE) {
        h.send(HostMsg::Stdin {
            id: 1,
            data: vec![b'y'; CHUNK_SIZE],
        });
    }
    h.send(HostMsg::Ping { id: 2 });
    assert_eq!(h.recv(), GuestMsg::Pong { id: 2 });
    let (mut out, mut status) = (Vec::new(), None);
    while status.is_none() {
        match h.recv() {
            GuestMsg::Stdout { id: 1, data } => out.extend(data),
            GuestMsg::Exited { id: 1, status: s } => status = Some(s),
            other => panic!("{other:?}"),
        }
    }
    let r = Run {
        stdout: out,
        status,
        ..Run::default()
    };
    // What fitted in the window arrived; stdin was then closed, so `wc` ends.
    let n: u64 = r.out().trim().parse().unwrap();
    // (The pipe itself holds one more chunk while the process sleeps.)
    assert!(n <= u64::from(STREAM_WINDOW) + CHUNK_SIZE as u64, "{n}");
    assert!(n >= u64::from(STREAM_WINDOW) / 2, "{n}");
    assert_eq!(r.status, Some(ExitStatus::Code(0)));
}

mod rekey {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use vmcp_guest_proto::Rekey;

    static APPLIED: AtomicUsize = AtomicUsize::new(0);

    fn record(r: &Rekey) -> io::Result<u64> {
        assert_eq!(r.hostname, "vmcp-new");
        APPLIED.fetch_add(1, AtomicOrdering::SeqCst);
        Ok(42)
    }

    fn fail_apply(_: &Rekey) -> io::Result<u64> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn rekey(token: &str, entropy: usize, hostname: &str) -> HostMsg {
        HostMsg::Rekey(Rekey {
            id: 9,
            token: token.into(),
            entropy: vec![7; entropy],
            unix_time_ns: 1_700_000_000_000_000_000,
            hostname: hostname.into(),
        })
    }

    #[test]
    fn a_rekey_answers_with_a_hello_carrying_the_new_token_and_later_hellos_keep_it() {
        let slot = Arc::new(Mutex::new(String::new()));
        let shared = Arc::clone(&slot);
        let mut h = Host::with_options(move |o| {
            *lock(&shared) = "tok-1".into();
            o.token = shared;
            o.apply_rekey = Some(record);
        });
        let before = APPLIED.load(AtomicOrdering::SeqCst);
        h.send(rekey("tok-2", 32, "vmcp-new"));
        match h.recv() {
            GuestMsg::Hello(hello) => {
                assert_eq!(hello.token, "tok-2");
                assert_eq!(hello.boot_ns, 42);
            }
            other => panic!("expected a new hello, got {other:?}"),
        }
        assert!(APPLIED.load(AtomicOrdering::SeqCst) > before);
        assert_eq!(*lock(&slot), "tok-2");
        // Requests work as before.
        h.send(HostMsg::Ping { id: 1 });
        assert_eq!(h.recv(), GuestMsg::Pong { id: 1 });
        drop(h.stream);
        // A server started on the same slot (the channel reopened) never presents tok-1.
        let (host, guest) = UnixStream::pair().unwrap();
        let mut options = ServeOptions::new(crate::hello("tok-1", false));
        options.token = Arc::clone(&slot);
        let reader = guest.try_clone().unwrap();
        let server = std::thread::spawn(move || serve(reader, guest, &options));
        let mut scratch = Vec::new();
        let mut host = host;
        match read_msg::<GuestMsg, _>(&mut host, &mut scratch).unwrap() {
            Some(GuestMsg::Hello(hello)) => assert_eq!(hello.token, "tok-2"),
            other => panic!("expected hello, got {other:?}"),
        }
        drop(host);
        assert!(matches!(server.join().unwrap(), Ok(ServeEnd::Closed)));
    }

    #[test]
    fn bad_or_unapplicable_rekeys_fail_and_keep_the_old_token() {
        // Not PID 1: refused.
        let mut h = Host::start();
        h.send(rekey("tok-2", 32, "vmcp-new"));
        match h.recv() {
            GuestMsg::Failed {
                id: 9,
                kind,
                message,
            } => {
                assert_eq!(kind, FailureKind::InvalidRequest);
                assert!(message.contains("PID 1"), "{message}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        let slot = Arc::new(Mutex::new(String::new()));
        let shared = Arc::clone(&slot);
        let mut h = Host::with_options(move |o| {
            *lock(&shared) = "tok-1".into();
            o.token = shared;
            o.apply_rekey = Some(record);
        });
        for (msg, what) in [
            (rekey("", 32, "vmcp-new"), "token"),
            (rekey("t", 8, "vmcp-new"), "entropy"),
            (rekey("t", Rekey::MAX_ENTROPY + 1, "vmcp-new"), "entropy"),
            (rekey("t", 32, "bad/name"), "hostname"),
            (rekey("t", 32, &"h".repeat(MAX_HOSTNAME + 1)), "hostname"),
        ] {
            h.send(msg);
            match h.recv() {
                GuestMsg::Failed { kind, message, .. } => {
                    assert_eq!(kind, FailureKind::InvalidRequest);
                    assert!(message.contains(what), "{what}: {message}");
                }
                other => panic!("expected a failure, got {other:?}"),
            }
        }
        assert_eq!(*lock(&slot), "tok-1");
        let mut h = Host::with_options(|o| o.apply_rekey = Some(fail_apply));
        h.send(rekey("tok-2", 32, "vmcp-new"));
        match h.recv() {
            GuestMsg::Failed { kind, message, .. } => {
                assert_eq!(kind, FailureKind::Other);
                assert!(message.contains("new identity"), "{message}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}

#[test]
fn list_changes_needs_an_image_and_walks_the_upper_layer() {
    let mut h = Host::start();
    h.send(HostMsg::ListChanges { id: 3 });
    match h.recv() {
        GuestMsg::Failed { id: 3, kind, .. } => assert_eq!(kind, FailureKind::InvalidRequest),
        other => panic!("{other:?}"),
    }
    let d = tempfile::tempdir().unwrap();
    let (up, low) = (d.path().join("up"), d.path().join("low"));
    std::fs::create_dir_all(up.join("etc")).unwrap();
    std::fs::create_dir_all(low.join("etc")).unwrap();
    std::fs::write(low.join("etc/conf"), b"1").unwrap();
    std::fs::write(up.join("etc/conf"), b"2").unwrap();
    std::fs::write(up.join("new"), b"").unwrap();
    let roots = crate::changes::ChangeRoots {
        upper: up,
        lower: low,
    };
    let mut h = Host::with_options(|o| o.changes = Some(roots));
    h.send(HostMsg::ListChanges { id: 4 });
    match h.recv() {
        GuestMsg::FileData { id: 4, data, eof } => {
            assert!(eof);
            assert_eq!(data, b"M /etc/conf\nA /new\n");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn processes_run_as_the_default_user() {
    // Changing users needs root (a file we create is owned by our effective uid).
    let probe = tempfile::tempdir().unwrap();
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(probe.path()).unwrap()) != 0 {
        vmcp_test_support::skipped!("SKIPPED: not root; cannot test running as another user");
        return;
    }
    let mut h = Host::with_options(|o| o.user = Some((4242, 4343)));
    h.exec(1, &["sh", "-c", "id -u; id -g; id -G"]);
    let run = h.collect(1);
    assert_eq!(String::from_utf8_lossy(&run.stdout), "4242\n4343\n4343\n");
    // `PATH` is searched as that user: a program only root may execute is skipped for the
    // next one, as `execvp` does.
    use std::os::unix::fs::PermissionsExt;
    let (a, b) = (probe.path().join("a"), probe.path().join("b"));
    for (dir, mode, says) in [(&a, 0o700, "root-only"), (&b, 0o755, "everyone")] {
        std::fs::create_dir(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let prog = dir.join("vmcp-test-who");
        std::fs::write(&prog, format!("#!/bin/sh\necho {says}\n")).unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(probe.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    h.exec_with(2, &["vmcp-test-who"], |r| {
        r.env = vec![("PATH".into(), format!("{}:{}", a.display(), b.display()))];
    });
    assert_eq!(h.collect(2).out(), "everyone\n");
}

mod tcp;

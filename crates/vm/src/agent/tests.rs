//! AgentClient against a scripted in-process guest speaking the real protocol.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{duplex, DuplexStream};
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, Capabilities, ExitStatus, FailureKind, GuestMsg, Hello,
    HostMsg, CHUNK_SIZE, PROTOCOL_VERSION,
};

use super::*;

const T: Duration = Duration::from_secs(5);

fn hello(token: &str, version: u16) -> GuestMsg {
    GuestMsg::Hello(Hello {
        protocol_version: version,
        agent_version: "test".into(),
        capabilities: Capabilities(Capabilities::EXEC | Capabilities::FILES),
        token: token.into(),
        boot_ns: 42,
    })
}

/// A tiny guest: answers requests the way the real agent does, from memory.
async fn scripted_guest(mut s: DuplexStream, first: GuestMsg) {
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut buf = Vec::new();
    if write_msg_async(&mut s, &first).await.is_err() {
        return;
    }
    while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
        let mut out = Vec::new();
        match msg {
            HostMsg::Ping { id } => out.push(GuestMsg::Pong { id }),
            HostMsg::Exec(req) => match req.argv[0].as_str() {
                "echo" => {
                    out.push(GuestMsg::Started { id: req.id, pid: 7 });
                    out.push(GuestMsg::Stdout {
                        id: req.id,
                        data: req.argv[1..].join(" ").into_bytes(),
                    });
                    out.push(GuestMsg::Stderr {
                        id: req.id,
                        data: b"err".to_vec(),
                    });
                    out.push(GuestMsg::Exited {
                        id: req.id,
                        status: ExitStatus::Code(3),
                    });
                }
                "cat" => out.push(GuestMsg::Started { id: req.id, pid: 8 }),
                _ => out.push(GuestMsg::Failed {
                    id: req.id,
                    kind: FailureKind::NotFound,
                    message: format!("{}: not found", req.argv[0]),
                }),
            },
            HostMsg::Stdin { id, data } => out.push(GuestMsg::Stdout { id, data }),
            HostMsg::StdinEof { id } => out.push(GuestMsg::Exited {
                id,
                status: ExitStatus::Code(0),
            }),
            HostMsg::Signal { id, signal } => out.push(GuestMsg::Exited {
                id,
                status: ExitStatus::Signal(signal),
            }),
            HostMsg::WriteFile {
                id,
                path,
                offset,
                data,
                ..
            } => {
                let f = files.entry(path).or_default();
                if offset == 0 {
                    f.clear();
                }
                assert_eq!(f.len() as u64, offset);
                f.extend_from_slice(&data);
                out.push(GuestMsg::Done { id });
            }
            HostMsg::ReadFile { id, path } => match files.get(&path) {
                Some(data) => {
                    let chunks: Vec<_> = data.chunks(CHUNK_SIZE).collect();
                    if chunks.is_empty() {
                        out.push(GuestMsg::FileData {
                            id,
                            data: vec![],
                            eof: true,
                        });
                    }
                    for (i, c) in chunks.iter().enumerate() {
                        out.push(GuestMsg::FileData {
                            id,
                            data: c.to_vec(),
                            eof: i + 1 == chunks.len(),
                        });
                    }
                }
                None => out.push(GuestMsg::Failed {
                    id,
                    kind: FailureKind::NotFound,
                    message: format!("{path}: no such file"),
                }),
            },
            HostMsg::Poweroff { id } => {
                let _ = write_msg_async(&mut s, &GuestMsg::Done { id }).await;
                return;
            }
            _ => {}
        }
        for m in out {
            if write_msg_async(&mut s, &m).await.is_err() {
                return;
            }
        }
    }
}

async fn client() -> AgentClient {
    let (host, guest) = duplex(1 << 20);
    tokio::spawn(scripted_guest(guest, hello("tok", PROTOCOL_VERSION)));
    AgentClient::connect(host, "tok", T).await.unwrap()
}

#[tokio::test]
async fn handshake_checks_token_and_version() {
    let c = client().await;
    assert_eq!(c.hello().boot_ns, 42);
    assert!(!c.is_closed());
    assert!(format!("{c:?}").contains("AgentClient"));

    let (host, guest) = duplex(1024);
    tokio::spawn(scripted_guest(guest, hello("other", PROTOCOL_VERSION)));
    assert!(matches!(
        AgentClient::connect(host, "tok", T).await,
        Err(AgentError::BadToken)
    ));

    let (host, guest) = duplex(1024);
    tokio::spawn(scripted_guest(guest, hello("tok", PROTOCOL_VERSION + 1)));
    let err = AgentClient::connect(host, "tok", T).await.unwrap_err();
    assert!(err.to_string().contains("vmcp image build"), "{err}");

    let (host, guest) = duplex(1024);
    tokio::spawn(scripted_guest(guest, GuestMsg::Pong { id: 1 }));
    assert!(matches!(
        AgentClient::connect(host, "tok", T).await,
        Err(AgentError::NoHello(_))
    ));
}

#[tokio::test]
async fn handshake_timeout_and_eof() {
    let (host, _guest) = duplex(1024);
    let err = AgentClient::connect(host, "", Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::HelloTimeout(_)));

    let (host, guest) = duplex(1024);
    drop(guest);
    assert!(matches!(
        AgentClient::connect(host, "", T).await,
        Err(AgentError::Closed)
    ));
}

#[tokio::test]
async fn garbage_instead_of_hello_is_a_protocol_error() {
    use tokio::io::AsyncWriteExt;
    let (host, mut guest) = duplex(1024);
    guest.write_all(&[0xff; 16]).await.unwrap();
    assert!(matches!(
        AgentClient::connect(host, "", T).await,
        Err(AgentError::Proto(_))
    ));
}

#[tokio::test]
async fn ping_and_concurrent_pings() {
    let c = client().await;
    c.ping().await.unwrap();
    let pings = (0..20).map(|_| {
        let c = c.clone();
        tokio::spawn(async move { c.ping().await })
    });
    for p in pings {
        p.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn exec_streams_and_exit_code() {
    let c = client().await;
    let p = c
        .exec(ExecSpec::new(["echo", "hi", "there"]))
        .await
        .unwrap();
    assert_eq!(p.pid(), 7);
    let out = p.wait_with_output().await.unwrap();
    assert_eq!(out.stdout, b"hi there");
    assert_eq!(out.stderr, b"err");
    assert_eq!(out.status, ExitStatus::Code(3));
}

#[tokio::test]
async fn exec_not_found_and_empty_argv() {
    let c = client().await;
    match c.exec(ExecSpec::new(["nope"])).await {
        Err(AgentError::Failed { kind, message }) => {
            assert_eq!(kind, FailureKind::NotFound);
            assert!(message.contains("nope"));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        c.exec(ExecSpec::default()).await,
        Err(AgentError::Invalid(_))
    ));
}

#[tokio::test]
async fn stdin_and_signal_through_control() {
    let c = client().await;
    let mut spec = ExecSpec::new(["cat"]);
    spec.stdin = true;
    let mut p = c.exec(spec).await.unwrap();
    let ctl = p.control().clone();
    ctl.write_stdin(b"abc").await.unwrap();
    assert_eq!(
        p.next_event().await.unwrap(),
        Some(ProcessEvent::Stdout(b"abc".to_vec()))
    );
    ctl.close_stdin().await.unwrap();
    assert_eq!(
        p.next_event().await.unwrap(),
        Some(ProcessEvent::Exited(ExitStatus::Code(0)))
    );
    assert_eq!(p.next_event().await.unwrap(), None);

    let p = c.exec(ExecSpec::new(["cat"])).await.unwrap();
    p.control().signal(9).await.unwrap();
    assert_eq!(
        p.wait_with_output().await.unwrap().status,
        ExitStatus::Signal(9)
    );
}

#[tokio::test]
async fn file_round_trip_multi_chunk() {
    let c = client().await;
    let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 17)).map(|i| i as u8).collect();
    c.write_file("/tmp/x", &data, 0o644).await.unwrap();
    assert_eq!(c.read_file("/tmp/x").await.unwrap(), data);
    c.write_file("/tmp/empty", &[], 0o600).await.unwrap();
    assert_eq!(c.read_file("/tmp/empty").await.unwrap(), b"");
    let err = c.read_file("/nope").await.unwrap_err();
    assert!(err.to_string().contains("no such file"), "{err}");
}

#[tokio::test]
async fn poweroff_then_everything_fails_closed() {
    let c = client().await;
    let mut spec = ExecSpec::new(["cat"]);
    spec.stdin = true;
    let p = c.exec(spec).await.unwrap();
    c.poweroff().await.unwrap();
    // The guest closed the channel: the running process and new requests see Closed.
    assert!(matches!(
        p.wait_with_output().await,
        Err(AgentError::Closed)
    ));
    for _ in 0..100 {
        if c.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(c.is_closed());
    assert!(matches!(c.ping().await, Err(AgentError::Closed)));
    assert!(matches!(
        c.exec(ExecSpec::new(["echo"])).await,
        Err(AgentError::Closed)
    ));
}

#[test]
fn constant_time_eq_works() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
}

#[test]
fn change_lists_parse_and_drop_what_is_not_a_change() {
    let c = Changes::parse(
        b"A /new\nM /etc/conf\nD /gone%0Aname\nX /what\nA relative\nA /bad\x1b[0m\n! truncated\n",
    );
    assert!(c.truncated);
    assert_eq!(
        c.changes,
        [
            Change {
                kind: ChangeKind::Added,
                path: "/new".into()
            },
            Change {
                kind: ChangeKind::Modified,
                path: "/etc/conf".into()
            },
            Change {
                kind: ChangeKind::Deleted,
                path: "/gone%0Aname".into()
            },
        ]
    );
    assert_eq!(Changes::parse(b""), Changes::default());
}

// ---- Flow control, bounds and hostile guests --------------------------------------------

use vmcp_guest_proto::{credit_cost, FrameReader, STREAM_WINDOW};

fn fast_limits() -> AgentLimits {
    AgentLimits {
        answer_timeout: Duration::from_millis(300),
        idle_ping: Duration::from_millis(200),
        max_collect: 64 * 1024 * 1024,
    }
}

/// Connects to a guest run by `guest`, which gets its end of the channel after the hello.
async fn client_with<F, Fut>(limits: AgentLimits, guest: F) -> AgentClient
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (host, mut g) = duplex(1 << 16);
    tokio::spawn(async move {
        write_msg_async(&mut g, &hello("tok", PROTOCOL_VERSION))
            .await
            .unwrap();
        guest(g).await;
    });
    AgentClient::connect_with_limits(host, "tok", T, limits)
        .await
        .unwrap()
}

fn queued_units(c: &AgentClient) -> u64 {
    c.shared
        .routes()
        .values()
        .map(|r| r.queued.load(Ordering::Acquire))
        .sum()
}

/// A guest that obeys the window: `total` bytes of stdout for the first exec, sent only
/// within the credit the host gives back. Reports the most units it ever had in flight.
async fn windowed_writer(s: DuplexStream, total: usize, report: tokio::sync::mpsc::Sender<u64>) {
    let (r, mut w) = tokio::io::split(s);
    let mut r = FrameReader::new(r);
    let Ok(Some(HostMsg::Exec(req))) = r.next::<HostMsg>().await else {
        return;
    };
    let id = req.id;
    write_msg_async(&mut w, &GuestMsg::Started { id, pid: 1 })
        .await
        .unwrap();
    let mut in_flight = 0u64;
    let mut max_in_flight = 0u64;
    let mut sent = 0usize;
    while sent < total {
        let n = CHUNK_SIZE.min(total - sent);
        let cost = u64::from(credit_cost(n));
        while in_flight + cost > u64::from(STREAM_WINDOW) {
            match r.next::<HostMsg>().await {
                Ok(Some(HostMsg::Credit { id: i, credit })) if i == id => {
                    in_flight -= u64::from(credit)
                }
                Ok(Some(_)) => {}
                _ => return,
            }
        }
        in_flight += cost;
        max_in_flight = max_in_flight.max(in_flight);
        let msg = GuestMsg::Stdout {
            id,
            data: vec![b'x'; n],
        };
        if write_msg_async(&mut w, &msg).await.is_err() {
            return;
        }
        sent += n;
    }
    let _ = write_msg_async(
        &mut w,
        &GuestMsg::Exited {
            id,
            status: ExitStatus::Code(0),
        },
    )
    .await;
    let _ = report.send(max_in_flight).await;
    // Keep answering nothing but stay connected until the host goes.
    while let Ok(Some(_)) = r.next::<HostMsg>().await {}
}

#[tokio::test]
async fn a_stalled_consumer_holds_one_window_and_then_gets_everything() {
    let total = 20 * 1024 * 1024;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let c = client_with(AgentLimits::default(), move |s| {
        windowed_writer(s, total, tx)
    })
    .await;
    let mut p = c.exec(ExecSpec::new(["writer"])).await.unwrap();
    // The consumer stalls: the guest fills one window and waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = queued_units(&c);
    assert!(queued <= QUEUE_LIMIT, "{queued}");
    assert!(
        queued > u64::from(STREAM_WINDOW) / 2,
        "the guest did not fill the window: {queued}"
    );
    // Reading again drains everything.
    let mut got = 0usize;
    loop {
        match p.next_event().await.unwrap() {
            Some(ProcessEvent::Stdout(d)) => got += d.len(),
            Some(ProcessEvent::Exited(s)) => {
                assert_eq!(s, ExitStatus::Code(0));
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(queued_units(&c) <= QUEUE_LIMIT);
    }
    assert_eq!(got, total);
    assert!(rx.recv().await.unwrap() <= u64::from(STREAM_WINDOW));
}

#[tokio::test]
async fn a_guest_that_ignores_the_window_gets_the_channel_closed() {
    let c = client_with(AgentLimits::default(), |mut s| async move {
        let mut buf = Vec::new();
        let Ok(Some(HostMsg::Exec(req))) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await
        else {
            return;
        };
        let id = req.id;
        let _ = write_msg_async(&mut s, &GuestMsg::Started { id, pid: 1 }).await;
        // 64 MiB without waiting for credit.
        for _ in 0..1024 {
            let msg = GuestMsg::Stdout {
                id,
                data: vec![0; CHUNK_SIZE],
            };
            if write_msg_async(&mut s, &msg).await.is_err() {
                return;
            }
        }
    })
    .await;
    let mut p = c.exec(ExecSpec::new(["flood"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(queued_units(&c) <= QUEUE_LIMIT);
    let err = loop {
        match p.next_event().await {
            Ok(Some(ProcessEvent::Stdout(_))) => {}
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err, AgentError::ChannelFailed(_)), "{err}");
    assert!(err.to_string().contains("flow-control window"), "{err}");
    assert!(c.is_closed());
    let again = c.ping().await.unwrap_err();
    assert!(again.to_string().contains("flow-control window"), "{again}");
}

#[tokio::test]
async fn a_flood_of_control_messages_is_bounded_too() {
    let c = client_with(AgentLimits::default(), |mut s| async move {
        let mut buf = Vec::new();
        let Ok(Some(HostMsg::Exec(req))) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await
        else {
            return;
        };
        for _ in 0..100_000 {
            let msg = GuestMsg::Started { id: req.id, pid: 1 };
            if write_msg_async(&mut s, &msg).await.is_err() {
                return;
            }
        }
    })
    .await;
    let _p = c.exec(ExecSpec::new(["x"])).await.unwrap();
    for _ in 0..200 {
        if c.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(c.is_closed());
    assert!(queued_units(&c) == 0);
}

#[tokio::test]
async fn an_old_agent_meets_a_new_host_with_a_clear_error() {
    // Protocol 1 agents send the same hello layout; they must be refused at once, not
    // served (they would never give credit back and the first big output would stall).
    let (host, guest) = duplex(1024);
    tokio::spawn(scripted_guest(guest, hello("tok", 1)));
    let t = Instant::now();
    let err = AgentClient::connect(host, "tok", T).await.unwrap_err();
    assert!(t.elapsed() < T);
    assert!(matches!(err, AgentError::Version { guest: 1 }), "{err}");
    let text = err.to_string();
    assert!(text.contains("protocol 1"), "{text}");
    assert!(
        text.contains(&format!("speaks {PROTOCOL_VERSION}")),
        "{text}"
    );
    assert!(text.contains("vmcp image build --force"), "{text}");
}

#[tokio::test]
async fn a_silent_agent_fails_requests_in_time() {
    // Says hello, then reads and never answers.
    let c = client_with(fast_limits(), |mut s| async move {
        let mut buf = Vec::new();
        while let Ok(Some(_)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {}
    })
    .await;
    let err = c.exec(ExecSpec::new(["x"])).await.unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::NoAnswer {
                what: "the start of a process",
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(c.ping().await, Err(AgentError::NoAnswer { .. })));
    assert!(matches!(
        c.read_file("/x").await,
        Err(AgentError::NoAnswer { .. })
    ));
    assert!(matches!(
        c.write_file("/x", b"", 0o644).await,
        Err(AgentError::NoAnswer { .. })
    ));
}

#[tokio::test]
async fn an_agent_that_dies_while_a_process_runs_is_noticed() {
    // Starts the process, then never says anything again (pings included).
    let c = client_with(fast_limits(), |mut s| async move {
        let mut buf = Vec::new();
        while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
            if let HostMsg::Exec(req) = msg {
                let _ = write_msg_async(&mut s, &GuestMsg::Started { id: req.id, pid: 1 }).await;
            }
        }
    })
    .await;
    let mut p = c.exec(ExecSpec::new(["x"])).await.unwrap();
    let t = Instant::now();
    let err = p.next_event().await.unwrap_err();
    assert!(
        matches!(err, AgentError::NoAnswer { what: "a ping", .. }),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(c.is_closed());
    assert!(c
        .ping()
        .await
        .unwrap_err()
        .to_string()
        .contains("taken for dead"));
}

#[tokio::test]
async fn a_quiet_process_of_a_live_agent_is_not_disturbed() {
    // The process is silent for several idle periods; the agent answers the pings.
    let c = client_with(fast_limits(), |mut s| async move {
        let mut buf = Vec::new();
        let mut id = 0;
        let mut pings = 0;
        while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
            let out = match msg {
                HostMsg::Exec(req) => {
                    id = req.id;
                    GuestMsg::Started { id, pid: 1 }
                }
                HostMsg::Ping { id: p } => {
                    pings += 1;
                    if pings == 4 {
                        let _ = write_msg_async(&mut s, &GuestMsg::Pong { id: p }).await;
                        GuestMsg::Exited {
                            id,
                            status: ExitStatus::Code(0),
                        }
                    } else {
                        GuestMsg::Pong { id: p }
                    }
                }
                _ => continue,
            };
            let _ = write_msg_async(&mut s, &out).await;
        }
    })
    .await;
    let p = c.exec(ExecSpec::new(["x"])).await.unwrap();
    let out = p.wait_with_output().await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert!(!c.is_closed());
}

#[tokio::test]
async fn wrong_ids_and_unexpected_answers_do_not_hang() {
    let c = client_with(fast_limits(), |mut s| async move {
        let mut buf = Vec::new();
        while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
            let out = match msg {
                // Answers with another id: the right request never hears of it.
                HostMsg::Ping { id } => GuestMsg::Pong { id: id + 1000 },
                // Answers a file read with megabytes of stdout.
                HostMsg::ReadFile { id, .. } => GuestMsg::Stdout {
                    id,
                    data: vec![0x1b; 60_000],
                },
                // Fails with terminal escapes and a huge message.
                HostMsg::Exec(req) => GuestMsg::Failed {
                    id: req.id,
                    kind: FailureKind::Other,
                    message: format!("\u{1b}]0;pwned\u{7}\u{1b}[2J{}", "A".repeat(1 << 19)),
                },
                _ => continue,
            };
            let _ = write_msg_async(&mut s, &out).await;
        }
    })
    .await;
    assert!(matches!(c.ping().await, Err(AgentError::NoAnswer { .. })));
    let err = c.read_file("/f").await.unwrap_err();
    assert!(matches!(err, AgentError::Unexpected(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("60000 bytes of stdout"), "{text}");
    assert!(text.len() < 200, "{text}");
    let err = c.exec(ExecSpec::new(["x"])).await.unwrap_err();
    let text = err.to_string();
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    assert!(
        text.len() < 2 * vmcp_sanitize::DEFAULT_MAX_CHARS,
        "{}",
        text.len()
    );
}

#[tokio::test]
async fn no_hello_error_is_short_and_printable() {
    let (host, guest) = duplex(1 << 21);
    tokio::spawn(scripted_guest(
        guest,
        GuestMsg::Stdout {
            id: 1,
            data: b"\x1b[2J".repeat(200_000),
        },
    ));
    let err = AgentClient::connect(host, "tok", T).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, AgentError::NoHello(_)));
    assert!(text.len() < 200, "{}", text.len());
    assert!(!text.contains('\u{1b}'));
}

/// A guest whose `cat` answers stdin with `size` bytes of stdout and whose files are
/// `size` bytes long, to trip the collection caps.
async fn big_answers(
    s: DuplexStream,
    size: usize,
    seen: tokio::sync::mpsc::UnboundedSender<HostMsg>,
) {
    let (r, mut w) = tokio::io::split(s);
    let mut r = FrameReader::new(r);
    let mut in_flight: HashMap<u32, u64> = HashMap::new();
    while let Ok(Some(msg)) = r.next::<HostMsg>().await {
        let _ = seen.send(msg.clone());
        match msg {
            HostMsg::Exec(req) => {
                let id = req.id;
                let _ = write_msg_async(&mut w, &GuestMsg::Started { id, pid: 1 }).await;
                let mut sent = 0;
                while sent < size {
                    let n = CHUNK_SIZE.min(size - sent);
                    let cost = u64::from(credit_cost(n));
                    let f = in_flight.entry(id).or_default();
                    if *f + cost > u64::from(STREAM_WINDOW) {
                        break; // the host must stop us before we need more credit
                    }
                    *f += cost;
                    let _ = write_msg_async(
                        &mut w,
                        &GuestMsg::Stdout {
                            id,
                            data: vec![1; n],
                        },
                    )
                    .await;
                    sent += n;
                }
            }
            HostMsg::ReadFile { id, .. } => {
                let mut sent = 0;
                while sent < size {
                    let n = CHUNK_SIZE.min(size - sent);
                    sent += n;
                    let msg = GuestMsg::FileData {
                        id,
                        data: vec![2; n],
                        eof: sent == size,
                    };
                    let _ = write_msg_async(&mut w, &msg).await;
                }
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn collecting_calls_stop_at_their_cap() {
    let limits = AgentLimits {
        max_collect: 300_000,
        ..AgentLimits::default()
    };
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let c = client_with(limits, move |s| big_answers(s, 900_000, seen_tx)).await;
    let err = c.read_file("/big").await.unwrap_err();
    assert!(
        matches!(err, AgentError::TooLarge { limit: 300_000, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("larger than 300000 bytes"),
        "{err}"
    );
    let p = c.exec(ExecSpec::new(["yes"])).await.unwrap();
    let id = p.control().id;
    let err = p.wait_with_output().await.unwrap_err();
    assert!(err.to_string().contains("the process was killed"), "{err}");
    // The guest was told: kill the process, stop sending.
    let mut signalled = false;
    let mut discarded = false;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), seen.recv()).await {
        match msg {
            HostMsg::Signal { id: i, signal: 9 } if i == id => signalled = true,
            HostMsg::Discard { id: i } if i == id => discarded = true,
            _ => {}
        }
        if signalled && discarded {
            break;
        }
    }
    assert!(signalled && discarded);
    assert!(!c.is_closed());
}

#[tokio::test]
async fn dropping_a_process_tells_the_guest_to_discard_its_output() {
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let c = client_with(AgentLimits::default(), move |s| big_answers(s, 10, seen_tx)).await;
    let p = c.exec(ExecSpec::new(["x"])).await.unwrap();
    let id = p.control().id;
    drop(p);
    loop {
        match tokio::time::timeout(T, seen.recv()).await.unwrap().unwrap() {
            HostMsg::Discard { id: i } if i == id => break,
            _ => {}
        }
    }
}

/// A guest that records stdin and gives credit back only when told to.
#[tokio::test]
async fn stdin_waits_for_the_guests_credit() {
    let (give_tx, mut give) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let c = client_with(AgentLimits::default(), move |s| async move {
        let (r, mut w) = tokio::io::split(s);
        let mut r = FrameReader::new(r);
        let mut owed = 0u32;
        let mut id = 0;
        loop {
            tokio::select! {
                msg = r.next::<HostMsg>() => match msg {
                    Ok(Some(HostMsg::Exec(req))) => {
                        id = req.id;
                        let _ = write_msg_async(&mut w, &GuestMsg::Started { id, pid: 1 }).await;
                    }
                    Ok(Some(HostMsg::Stdin { data, .. })) => {
                        owed += credit_cost(data.len());
                        let _ = got_tx.send(data.len());
                    }
                    Ok(Some(_)) => {}
                    _ => return,
                },
                Some(()) = give.recv() => {
                    let credit = std::mem::take(&mut owed);
                    let _ = write_msg_async(&mut w, &GuestMsg::StdinCredit { id, credit }).await;
                }
            }
        }
    })
    .await;
    let mut spec = ExecSpec::new(["cat"]);
    spec.stdin = true;
    let p = c.exec(spec).await.unwrap();
    let ctl = p.control().clone();
    let data = vec![7u8; 3 * STREAM_WINDOW as usize];
    let writer = tokio::spawn(async move { ctl.write_stdin(&data).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut received = 0;
    while let Ok(n) = got.try_recv() {
        received += n;
    }
    assert!(received <= STREAM_WINDOW as usize, "{received}");
    assert!(received > STREAM_WINDOW as usize / 2, "{received}");
    assert!(!writer.is_finished());
    // Credit lets the rest through.
    while !writer.is_finished() {
        give_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.await.unwrap().unwrap();
    while let Ok(n) = got.try_recv() {
        received += n;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    while let Ok(n) = got.try_recv() {
        received += n;
    }
    assert_eq!(received, 3 * STREAM_WINDOW as usize);
}

#[tokio::test]
async fn stdin_without_stdin_and_forged_credit() {
    let c = client_with(AgentLimits::default(), |mut s| async move {
        let mut buf = Vec::new();
        while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
            if let HostMsg::Exec(req) = msg {
                let id = req.id;
                let _ = write_msg_async(&mut s, &GuestMsg::Started { id, pid: 1 }).await;
                // More stdin credit than was ever sent.
                let _ = write_msg_async(
                    &mut s,
                    &GuestMsg::StdinCredit {
                        id,
                        credit: u32::MAX,
                    },
                )
                .await;
            }
        }
    })
    .await;
    let p = c.exec(ExecSpec::new(["no-stdin"])).await.unwrap();
    assert!(matches!(
        p.control().write_stdin(b"x").await,
        Err(AgentError::NoStdin)
    ));
    let mut spec = ExecSpec::new(["cat"]);
    spec.stdin = true;
    let _p = c.exec(spec).await.unwrap();
    for _ in 0..200 {
        if c.is_closed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = c.ping().await.unwrap_err();
    assert!(err.to_string().contains("stdin credit"), "{err}");
}

#[tokio::test]
async fn a_cancelled_request_leaves_no_half_frame() {
    // Many writers cancelled at random points: the guest still reads whole frames only.
    let (host, guest) = duplex(256);
    let (count_tx, mut count) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(guest);
        write_msg_async(&mut w, &hello("tok", PROTOCOL_VERSION))
            .await
            .unwrap();
        let mut r = FrameReader::new(r);
        loop {
            match r.next::<HostMsg>().await {
                Ok(Some(HostMsg::Ping { id })) => {
                    let _ = write_msg_async(&mut w, &GuestMsg::Pong { id }).await;
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    let _ = count_tx.send(e.to_string());
                    return;
                }
            }
        }
    });
    let c = AgentClient::connect(host, "tok", T).await.unwrap();
    for i in 0..50u64 {
        let c2 = c.clone();
        let write = async move { c2.write_file("/x", &vec![1; 200_000], 0o644).await };
        let _ = tokio::time::timeout(Duration::from_micros(50 * i), write).await;
    }
    c.ping().await.unwrap();
    assert!(count.try_recv().is_err());
}

mod restored {
    use super::*;

    /// A restored guest: silent until the re-key, then answers with `reply(new token)`.
    async fn restored_guest(mut s: DuplexStream, reply: fn(&str) -> GuestMsg) {
        let mut buf = Vec::new();
        if let Ok(Some(HostMsg::Rekey(r))) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
            assert_eq!(r.entropy.len(), 64);
            assert!(r.unix_time_ns > 1_700_000_000_000_000_000);
            let _ = write_msg_async(&mut s, &reply(&r.token)).await;
            // Then a normal agent.
            while let Ok(Some(HostMsg::Ping { id })) =
                read_msg_async::<HostMsg, _>(&mut s, &mut buf).await
            {
                let _ = write_msg_async(&mut s, &GuestMsg::Pong { id }).await;
            }
        }
    }

    #[tokio::test]
    async fn the_new_token_opens_the_channel_and_the_old_one_does_not() {
        let (host, guest) = duplex(1 << 16);
        tokio::spawn(restored_guest(guest, |t| hello(t, PROTOCOL_VERSION)));
        let c = AgentClient::connect_restored(host, new_identity("new", "vmcp-x"), None, T)
            .await
            .unwrap();
        assert_eq!(c.hello().token, "new");
        c.ping().await.unwrap();

        // A guest that still presents the snapshot's token (it ignored the re-key).
        let (host, guest) = duplex(1 << 16);
        tokio::spawn(restored_guest(guest, |_| hello("old", PROTOCOL_VERSION)));
        let e = AgentClient::connect_restored(host, new_identity("new", "vmcp-x"), None, T)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::BadToken), "{e}");
    }

    #[tokio::test]
    async fn a_refused_rekey_a_silent_guest_and_a_wrong_answer_are_errors() {
        let (host, guest) = duplex(1 << 16);
        tokio::spawn(restored_guest(guest, |_| GuestMsg::Failed {
            id: 0,
            kind: FailureKind::Other,
            message: "cannot take the new identity: EPERM".into(),
        }));
        let e = AgentClient::connect_restored(host, new_identity("new", "h"), None, T)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("new identity"), "{e}");

        // Answers owed to the old host before the hello are skipped, within a bound.
        for (stale, ok) in [(3, true), (MAX_STALE_ANSWERS + 1, false)] {
            let (host, mut guest) = duplex(1 << 20);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if let Ok(Some(HostMsg::Rekey(r))) =
                    read_msg_async::<HostMsg, _>(&mut guest, &mut buf).await
                {
                    for id in 0..stale {
                        let msg = GuestMsg::TcpEof {
                            id: 100 + id as u32,
                        };
                        if write_msg_async(&mut guest, &msg).await.is_err() {
                            return;
                        }
                    }
                    let _ = write_msg_async(&mut guest, &hello(&r.token, PROTOCOL_VERSION)).await;
                    let _ = read_msg_async::<HostMsg, _>(&mut guest, &mut buf).await;
                }
            });
            let got = AgentClient::connect_restored(host, new_identity("new", "h"), None, T).await;
            match got {
                Ok(_) => assert!(ok, "{stale} stale answers were accepted"),
                Err(e) => {
                    assert!(!ok, "{e}");
                    assert!(matches!(e, AgentError::NoHello(_)), "{e}");
                    assert!(e.to_string().contains("the end of connection"), "{e}");
                }
            }
        }

        // Never answers: a timeout, not a hang.
        let (host, _guest) = duplex(1 << 16);
        let t = Duration::from_millis(100);
        let e = AgentClient::connect_restored(host, new_identity("new", "h"), None, t)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::HelloTimeout(_)), "{e}");
    }

    /// A restored guest that takes any number of re-keys (as the agent does) and answers
    /// pings; with `extra`, it sends a pong nobody asked for right after its first hello.
    async fn rekeyable_guest(s: DuplexStream, extra: bool) {
        let (r, mut w) = tokio::io::split(s);
        let mut r = FrameReader::new(r);
        let mut first = true;
        loop {
            match r.next::<HostMsg>().await {
                Ok(Some(HostMsg::Rekey(k))) => {
                    // Both frames in one write, so they arrive together.
                    let mut bytes =
                        vmcp_guest_proto::encode(&hello(&k.token, PROTOCOL_VERSION)).unwrap();
                    if extra && first {
                        bytes.extend(vmcp_guest_proto::encode(&GuestMsg::Pong { id: 7 }).unwrap());
                    }
                    first = false;
                    let _ = w.write_all(&bytes).await;
                }
                Ok(Some(HostMsg::Ping { id })) => {
                    let _ = write_msg_async(&mut w, &GuestMsg::Pong { id }).await;
                }
                Ok(Some(HostMsg::Exec(e))) => {
                    let id = e.id;
                    let mut bytes = Vec::new();
                    let out = if e.argv[0] == "loud" { 70_000 } else { 3 };
                    for m in [
                        GuestMsg::Started { id, pid: 5 },
                        GuestMsg::Stdout {
                            id,
                            data: vec![b'x'; out],
                        },
                        GuestMsg::Exited {
                            id,
                            status: ExitStatus::Code(0),
                        },
                    ] {
                        bytes.extend(vmcp_guest_proto::encode(&m).unwrap());
                    }
                    let _ = w.write_all(&bytes).await;
                }
                Ok(Some(_)) => {}
                _ => return,
            }
        }
    }

    #[tokio::test]
    async fn a_detached_program_runs_to_its_end_and_leaves_the_channel_clean() {
        let (mut host, guest) = duplex(1 << 20);
        tokio::spawn(rekeyable_guest(guest, false));
        rekey_detached(&mut host, new_identity("pool", "vmcp-p"), T)
            .await
            .unwrap();
        let status = exec_detached(&mut host, &["true"], true, T).await.unwrap();
        assert_eq!(status, ExitStatus::Code(0));
        let c = AgentClient::connect_restored(host, new_identity("client", ""), None, T)
            .await
            .unwrap();
        c.ping().await.unwrap();
        // Output beyond the bound is an error, not a buffer that grows.
        let (mut host, guest) = duplex(1 << 20);
        tokio::spawn(rekeyable_guest(guest, false));
        let e = exec_detached(&mut host, &["loud"], false, T)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::TooLarge { .. }), "{e}");
        // A guest that never answers: a timeout.
        let (mut host, _guest) = duplex(1 << 20);
        let e = exec_detached(&mut host, &["true"], false, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::NoAnswer { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_detached_rekey_leaves_the_channel_for_a_second_client() {
        let (mut host, guest) = duplex(1 << 16);
        tokio::spawn(rekeyable_guest(guest, false));
        let h = rekey_detached(&mut host, new_identity("pool", "vmcp-p"), T)
            .await
            .unwrap();
        assert_eq!(h.token, "pool");
        // The process the channel was handed to re-keys again and serves it.
        let c = AgentClient::connect_restored(host, new_identity("client", ""), None, T)
            .await
            .unwrap();
        assert_eq!(c.hello().token, "client");
        c.ping().await.unwrap();

        // Bytes after the hello: the channel is not at a frame boundary, refused.
        let (mut host, guest) = duplex(1 << 16);
        tokio::spawn(rekeyable_guest(guest, true));
        let e = rekey_detached(&mut host, new_identity("pool", "h"), T)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("after the hello"), "{e}");

        // Silent guest: a timeout.
        let (mut host, _guest) = duplex(1 << 16);
        let e = rekey_detached(&mut host, new_identity("x", "h"), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::HelloTimeout(_)), "{e}");
    }

    #[test]
    fn identities_differ() {
        let a = new_identity("t", "h");
        let b = new_identity("t", "h");
        assert_ne!(a.entropy, b.entropy);
    }
}

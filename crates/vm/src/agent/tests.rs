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

        let (host, guest) = duplex(1 << 16);
        tokio::spawn(restored_guest(guest, |_| GuestMsg::Pong { id: 1 }));
        let e = AgentClient::connect_restored(host, new_identity("new", "h"), None, T)
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::NoHello(_)), "{e}");

        // Never answers: a timeout, not a hang.
        let (host, _guest) = duplex(1 << 16);
        let t = Duration::from_millis(100);
        let e = AgentClient::connect_restored(host, new_identity("new", "h"), None, t)
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

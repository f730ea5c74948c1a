//! Tunnelled TCP connections ([`HostMsg::TcpAccept`], [`HostMsg::TcpConnect`]) against real
//! loopback sockets of the test process.

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};

use super::*;

/// Connects to the agent's listener, retrying until the accept request made it listen.
fn dial(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("cannot connect to the agent's listener: {e}"),
        }
    }
}

/// Reads the guest-to-host bytes of connection `id` until its end of file.
fn tcp_bytes(h: &mut Host, id: u32) -> Vec<u8> {
    let mut got = Vec::new();
    loop {
        match h.recv() {
            GuestMsg::TcpData { id: i, data } if i == id => {
                assert!(data.len() <= CHUNK_SIZE);
                got.extend(data);
            }
            GuestMsg::TcpEof { id: i } if i == id => return got,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn accepted_connection_carries_both_directions_and_half_closes() {
    let mut h = Host::start();
    let port = vmcp_test_support::free_port();
    h.send(HostMsg::TcpAccept { id: 1, port });
    let client = std::thread::spawn(move || {
        let mut s = dial(port);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).unwrap();
        answer
    });
    assert_eq!(h.recv(), GuestMsg::Connected { id: 1 });
    assert_eq!(tcp_bytes(&mut h, 1), b"GET / HTTP/1.1\r\n\r\n");
    // The guest side has closed for writing; the host's bytes still reach it.
    let big = vec![7u8; 300_000];
    for chunk in big.chunks(CHUNK_SIZE) {
        h.send(HostMsg::TcpData {
            id: 1,
            data: chunk.to_vec(),
        });
    }
    h.send(HostMsg::TcpEof { id: 1 });
    assert_eq!(client.join().unwrap(), big);
    // Every host byte was given back as credit once in the socket.
    let deadline = Instant::now() + Duration::from_secs(5);
    let want: u64 = big
        .chunks(CHUNK_SIZE)
        .map(|c| u64::from(credit_cost(c.len())))
        .sum();
    while h.stdin_credit.get(&1).copied().unwrap_or(0) < want {
        assert!(Instant::now() < deadline, "credit {:?}", h.stdin_credit);
        std::thread::sleep(Duration::from_millis(20));
        h.send(HostMsg::Ping { id: 99 });
        match h.recv() {
            GuestMsg::Pong { id: 99 } => {}
            other => panic!("{other:?}"),
        }
    }
    h.close().unwrap();
}

#[test]
fn accepts_are_answered_in_request_order_and_wait_for_a_client() {
    let mut h = Host::start();
    let port = vmcp_test_support::free_port();
    h.send(HostMsg::TcpAccept { id: 10, port });
    h.send(HostMsg::TcpAccept { id: 11, port });
    // Nothing is answered before a client comes.
    let (_, early) = drain_for(&mut h, Duration::from_millis(200));
    assert!(early.is_empty(), "{early:?}");
    let mut first = dial(port);
    assert_eq!(h.recv(), GuestMsg::Connected { id: 10 });
    let mut second = dial(port);
    assert_eq!(h.recv(), GuestMsg::Connected { id: 11 });
    first.write_all(b"one").unwrap();
    second.write_all(b"two").unwrap();
    drop((first, second));
    let mut seen = std::collections::HashMap::new();
    while seen.len() < 2 {
        match h.recv() {
            GuestMsg::TcpData { id, data } => {
                seen.entry(id).or_insert_with(Vec::new).extend(data);
            }
            GuestMsg::TcpEof { id } => {
                assert!(seen.contains_key(&id));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen[&10], b"one");
    assert_eq!(seen[&11], b"two");
    h.close().unwrap();
}

#[test]
fn connect_reaches_a_guest_port_and_a_closed_port_fails() {
    let mut h = Host::start();
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
    });
    h.send(HostMsg::TcpConnect { id: 3, port });
    assert_eq!(h.recv(), GuestMsg::Connected { id: 3 });
    h.send(HostMsg::TcpData {
        id: 3,
        data: b"ping".to_vec(),
    });
    h.send(HostMsg::TcpEof { id: 3 });
    assert_eq!(tcp_bytes(&mut h, 3), b"ping");
    echo.join().unwrap();

    h.send(HostMsg::TcpConnect {
        id: 4,
        port: vmcp_test_support::free_port(),
    });
    match h.recv() {
        GuestMsg::Failed { id: 4, message, .. } => {
            assert!(
                message.contains("cannot connect to 127.0.0.1:"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    h.close().unwrap();
}

#[test]
fn bad_tunnel_requests_are_refused() {
    let mut h = Host::start();
    for req in [
        HostMsg::TcpAccept { id: 1, port: 0 },
        HostMsg::TcpConnect { id: 2, port: 0 },
    ] {
        h.send(req);
        match h.recv() {
            GuestMsg::Failed { kind, message, .. } => {
                assert_eq!(kind, FailureKind::InvalidRequest);
                assert!(message.contains("port from 1 to 65535"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    // A port already taken by someone else.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    h.send(HostMsg::TcpAccept { id: 3, port });
    match h.recv() {
        GuestMsg::Failed { id: 3, message, .. } => {
            assert!(message.contains("cannot listen on 127.0.0.1:"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The same id twice, and more waiting accepts than the bound.
    let port = vmcp_test_support::free_port();
    for id in 100..100 + MAX_WAITING_ACCEPTS as u32 {
        h.send(HostMsg::TcpAccept { id, port });
    }
    h.send(HostMsg::TcpAccept { id: 100, port });
    h.send(HostMsg::TcpAccept { id: 999, port });
    for want in [100u32, 999] {
        match h.recv() {
            GuestMsg::Failed { id, kind, message } => {
                assert_eq!((id, kind), (want, FailureKind::InvalidRequest), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    // Data for connections that do not exist is ignored.
    h.send(HostMsg::TcpData {
        id: 5000,
        data: vec![1; 10],
    });
    h.send(HostMsg::TcpEof { id: 5000 });
    h.send(HostMsg::Ping { id: 7 });
    assert_eq!(h.recv(), GuestMsg::Pong { id: 7 });
    h.close().unwrap();
}

#[test]
fn guest_bytes_stop_at_the_window_and_discard_closes_the_connection() {
    let mut h = Host::start();
    h.auto_credit = false;
    let port = vmcp_test_support::free_port();
    h.send(HostMsg::TcpAccept { id: 1, port });
    let client = std::thread::spawn(move || {
        let mut s = dial(port);
        // Far more than one window; blocks once the agent stops reading.
        let chunk = vec![1u8; 64 * 1024];
        let mut sent = 0usize;
        while sent < 16 * 1024 * 1024 {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        // After the discard the agent closed its side: reads end.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        sent
    });
    let (units, others) = drain_for(&mut h, Duration::from_millis(1500));
    assert!(
        others.contains(&GuestMsg::Connected { id: 1 }),
        "{others:?}"
    );
    assert!(units <= u64::from(STREAM_WINDOW), "{units}");
    assert!(units > u64::from(STREAM_WINDOW) / 2, "{units}");
    h.send(HostMsg::Discard { id: 1 });
    let sent = client.join().unwrap();
    assert!(
        sent < 16 * 1024 * 1024,
        "the client wrote everything: {sent}"
    );
    h.send(HostMsg::Ping { id: 2 });
    let (_, others) = drain_for(&mut h, Duration::from_millis(300));
    assert!(others.contains(&GuestMsg::Pong { id: 2 }), "{others:?}");
    h.close().unwrap();
}

#[test]
fn the_end_of_the_session_frees_the_port_and_closes_connections() {
    let mut h = Host::start();
    let port = vmcp_test_support::free_port();
    h.send(HostMsg::TcpAccept { id: 1, port });
    h.send(HostMsg::TcpAccept { id: 2, port });
    let mut client = dial(port);
    assert_eq!(h.recv(), GuestMsg::Connected { id: 1 });
    h.close().unwrap();
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert!(rest.is_empty());
    // The listener is gone: the port can be bound again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} still taken");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accept_rekey(_: &vmcp_guest_proto::Rekey) -> io::Result<u64> {
    Ok(1)
}

#[test]
fn a_rekey_drops_the_old_hosts_accepts_and_connections() {
    let mut h = Host::with_options(|o| o.apply_rekey = Some(accept_rekey));
    let port = vmcp_test_support::free_port();
    h.send(HostMsg::TcpAccept { id: 1, port });
    h.send(HostMsg::TcpAccept { id: 2, port });
    let mut old = dial(port);
    assert_eq!(h.recv(), GuestMsg::Connected { id: 1 });
    h.send(HostMsg::Rekey(vmcp_guest_proto::Rekey {
        id: 50,
        token: "tok-new".into(),
        entropy: vec![3; 32],
        unix_time_ns: 1,
        hostname: "vmcp-fork".into(),
    }));
    // The old host's connection is closed; its end of file may come before the hello.
    let mut rest = Vec::new();
    let _ = old.read_to_end(&mut rest);
    loop {
        match h.recv() {
            GuestMsg::Hello(hello) => {
                assert_eq!(hello.token, "tok-new");
                break;
            }
            GuestMsg::TcpEof { id: 1 } | GuestMsg::Failed { id: 1, .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // The new host numbers its requests from 1 again: accept 2 of the old host is gone, so
    // the next client goes to the new host's request.
    h.send(HostMsg::TcpAccept { id: 2, port });
    let _new = dial(port);
    loop {
        match h.recv() {
            GuestMsg::Connected { id } => {
                assert_eq!(id, 2);
                break;
            }
            GuestMsg::TcpEof { id: 1 } | GuestMsg::Failed { id: 1, .. } => {}
            other => panic!("{other:?}"),
        }
    }
    h.close().unwrap();
}

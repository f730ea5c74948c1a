//! Tunnels between [`AgentClient`] and the real agent's request server (in this process, over
//! a Unix socket pair), with real loopback sockets on the "guest" side.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const TOKEN: &str = "tunnel-token";

/// A client connected to a real agent server running in a thread.
async fn agent() -> AgentClient {
    let (host, guest) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = guest.try_clone().unwrap();
    std::thread::spawn(move || {
        let options = vmcp_guest_agent::ServeOptions::new(vmcp_guest_agent::hello(TOKEN, false));
        let _ = vmcp_guest_agent::serve(reader, guest, &options);
    });
    host.set_nonblocking(true).unwrap();
    let host = tokio::net::UnixStream::from_std(host).unwrap();
    AgentClient::connect(host, TOKEN, Duration::from_secs(10))
        .await
        .unwrap()
}

/// A "guest process" that connects to `port` (retrying until the agent listens), sends
/// `send`, closes its writing side and returns what it read.
fn guest_client(port: u16, send: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{e}");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        let mut reader = s.try_clone().unwrap();
        let read = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        s.write_all(&send).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        read.join().unwrap()
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[tokio::test]
async fn accepted_connection_moves_megabytes_both_ways() {
    let client = agent().await;
    let port = vmcp_test_support::free_port();
    let up = pattern(5 * 1024 * 1024 + 17, 1);
    let down = pattern(3 * 1024 * 1024 + 5, 2);
    let guest = guest_client(port, up.clone());
    let conn = client.tcp_accept(port).await.unwrap();
    let (mut rd, mut wr) = tokio::io::split(conn);
    let down2 = down.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&down2).await.unwrap();
        wr.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert!(
        got == up,
        "{} of {} bytes, or wrong ones",
        got.len(),
        up.len()
    );
    let back = tokio::task::spawn_blocking(move || guest.join().unwrap())
        .await
        .unwrap();
    assert!(back == down, "{} of {} bytes", back.len(), down.len());
    // The connection is forgotten on both sides; the channel still serves.
    client.ping().await.unwrap();
}

#[tokio::test]
async fn connect_reaches_a_guest_server_and_a_closed_port_is_an_error() {
    let client = agent().await;
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut s, _) = server.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        buf.reverse();
        s.write_all(&buf).unwrap();
    });
    let mut conn = client.tcp_connect(port).await.unwrap();
    conn.write_all(b"abc").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"cba");

    let err = client
        .tcp_connect(vmcp_test_support::free_port())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("cannot connect to 127.0.0.1:"),
        "{err}"
    );
}

#[tokio::test]
async fn a_withdrawn_accept_does_not_swallow_the_next_connection() {
    let client = agent().await;
    let port = vmcp_test_support::free_port();
    // Nobody connects: the accept is dropped after a while (and withdrawn in the guest).
    let gave_up = tokio::time::timeout(Duration::from_millis(300), client.tcp_accept(port)).await;
    assert!(gave_up.is_err(), "an accept without a client returned");
    // Once the agent has handled the withdrawal (it handles requests in order), a client
    // goes to the next request. (A client that crosses the withdrawal is closed instead:
    // `a_connection_for_a_request_nobody_waits_for_is_closed`.)
    client.ping().await.unwrap();
    let guest = guest_client(port, b"for the second accept".to_vec());
    let mut conn = tokio::time::timeout(Duration::from_secs(10), client.tcp_accept(port))
        .await
        .expect("the connection went to the withdrawn accept")
        .unwrap();
    let mut got = Vec::new();
    conn.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"for the second accept");
    drop(conn);
    let back = tokio::task::spawn_blocking(move || guest.join().unwrap())
        .await
        .unwrap();
    assert!(back.is_empty());
}

#[tokio::test]
async fn an_agent_without_the_capability_is_refused_on_the_host() {
    let (host, mut guest) = tokio::io::duplex(4096);
    let hello = vmcp_guest_proto::GuestMsg::Hello(vmcp_guest_proto::Hello {
        protocol_version: vmcp_guest_proto::PROTOCOL_VERSION,
        agent_version: "old".into(),
        capabilities: Capabilities(Capabilities::EXEC),
        token: TOKEN.into(),
        boot_ns: 0,
    });
    vmcp_guest_proto::write_msg_async(&mut guest, &hello)
        .await
        .unwrap();
    let client = AgentClient::connect(host, TOKEN, Duration::from_secs(5))
        .await
        .unwrap();
    let err = client.tcp_accept(3128).await.unwrap_err();
    assert!(err.to_string().contains("cannot tunnel TCP"), "{err}");
    drop(guest);
}

#[tokio::test]
async fn a_connection_for_a_request_nobody_waits_for_is_closed() {
    let (host, mut guest) = tokio::io::duplex(4096);
    let hello = vmcp_guest_proto::GuestMsg::Hello(vmcp_guest_proto::Hello {
        protocol_version: vmcp_guest_proto::PROTOCOL_VERSION,
        agent_version: "test".into(),
        capabilities: Capabilities(Capabilities::TCP),
        token: TOKEN.into(),
        boot_ns: 0,
    });
    vmcp_guest_proto::write_msg_async(&mut guest, &hello)
        .await
        .unwrap();
    let _client = AgentClient::connect(host, TOKEN, Duration::from_secs(5))
        .await
        .unwrap();
    // The guest hands a connection to request 77, which the host never made (or withdrew).
    vmcp_guest_proto::write_msg_async(&mut guest, &GuestMsg::Connected { id: 77 })
        .await
        .unwrap();
    let mut buf = Vec::new();
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        vmcp_guest_proto::read_msg_async::<HostMsg, _>(&mut guest, &mut buf),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(msg, Some(HostMsg::Discard { id: 77 }));
}

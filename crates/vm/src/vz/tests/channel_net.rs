//! The VZ lifecycle's networking over the agent channel, with the real agent's request server
//! playing the guest in this process (Unix only: that server is).

use std::time::Duration;

use super::super::fake::Faults;
use super::super::plan::cmdline_value;
use super::{setup, READY};
use crate::Vm;

/// The agent of these tests listens on the host's own 127.0.0.1:3128: one VM at a time.
static PORT_3128: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The real agent server in a thread, over a Unix socket pair.
fn real_agent(
    token: &str,
    powered_off: Box<dyn FnOnce() + Send>,
) -> Option<Box<dyn crate::agent::AgentStream>> {
    let (host, guest) = std::os::unix::net::UnixStream::pair().ok()?;
    host.set_nonblocking(true).ok()?;
    let host = tokio::net::UnixStream::from_std(host).ok()?;
    let reader = guest.try_clone().ok()?;
    let token = token.to_string();
    std::thread::spawn(move || {
        let mut options =
            vmcp_guest_agent::ServeOptions::new(vmcp_guest_agent::hello(&token, false));
        options.apply_rekey = Some(|_| Ok(1));
        if let Ok(vmcp_guest_agent::ServeEnd::Poweroff) =
            vmcp_guest_agent::serve(reader, guest, &options)
        {
            powered_off();
        }
    });
    Some(Box::new(host))
}

/// One plain-HTTP request through the proxy on the guest's `127.0.0.1:3128` (this test
/// process plays the guest); returns the status line.
async fn through_guest_proxy(target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(crate::net::TUNNEL_PROXY)
        .await
        .unwrap();
    let req =
        format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Virtualization.framework has no per-connection forward on its NAT attachment, so the
/// allow-list travels over the agent channel: the proxy lets the listed target through and
/// refuses the rest, published ports reach guest servers, and nothing is left listening
/// after the VM stops. (The real agent server plays the guest, in this process.)
#[tokio::test]
async fn allow_list_and_published_ports_travel_over_the_agent_channel() {
    let _port = PORT_3128.lock().await;
    let (port, hits) = vmcp_test_support::http_server("hello from the allowed host");
    let allowed = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let guest_server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let guest_port = guest_server.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut c, _)) = guest_server.accept().await {
            let _ = c.write_all(b"served in the guest").await;
        }
    });
    let host_port = vmcp_test_support::free_port();
    let mut s = setup(Faults {
        real_agent: Some(real_agent),
        ..Faults::default()
    });
    s.config.net.mode = format!("allow={allowed}").parse().unwrap();
    s.config.net.publish = vec![format!("{host_port}:{guest_port}").parse().unwrap()];
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    assert!(!vm.plan().network, "no network card for an allow-list");
    assert_eq!(
        cmdline_value(&vm.plan().cmdline, "vmcp.proxy"),
        None,
        "the boot state holds no network setting"
    );
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    // Every process is pointed at the proxy by the host, with each exec.
    let out = vm
        .agent()
        .unwrap()
        .exec(crate::agent::ExecSpec::new([
            "sh",
            "-c",
            "echo $HTTPS_PROXY $NO_PROXY",
        ]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        out.stdout,
        b"http://127.0.0.1:3128 localhost,127.0.0.1,::1\n"
    );

    let ok = through_guest_proxy(&allowed.to_string()).await;
    assert!(ok.contains(" 200 "), "{ok}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let other = format!("127.0.0.1:{}", vmcp_test_support::free_port());
    let refused = through_guest_proxy(&other).await;
    assert!(refused.contains(" 403 "), "{refused}");
    let stats = vm.egress_stats().expect("no egress stats");
    assert_eq!((stats.allowed(), stats.denied()), (1, 1));

    use tokio::io::AsyncReadExt;
    let mut published = tokio::net::TcpStream::connect(("127.0.0.1", host_port))
        .await
        .unwrap();
    let mut got = Vec::new();
    published.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"served in the guest");
    // A fork could not have the same host ports.
    let err = vm.checkpoint().await.unwrap_err().to_string();
    assert!(err.contains("published ports"), "{err}");

    vm.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(vm.egress_stats().is_some(), "stats stay readable");
    // The published port and the guest's proxy listener are closed with the VM.
    for port in [host_port, crate::net::TUNNEL_PROXY.port()] {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "port {port} still open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A guest that opens more connections to the proxy than it serves at once gets the extra
/// ones refused, so it cannot make the host hold more than that many windows.
#[tokio::test]
async fn the_channel_proxy_bounds_the_connections_a_guest_holds() {
    use tokio::io::AsyncReadExt;
    let _port = PORT_3128.lock().await;
    let mut s = setup(Faults {
        real_agent: Some(real_agent),
        ..Faults::default()
    });
    s.config.net.mode = "allow=api.example.com:443".parse().unwrap();
    let mut vm = s.backend.create_vz(s.config.clone()).unwrap();
    vm.start().await.unwrap();
    vm.wait_ready(READY).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..crate::net::CHANNEL_PROXY_CONNECTIONS {
        held.push(
            tokio::net::TcpStream::connect(crate::net::TUNNEL_PROXY)
                .await
                .unwrap(),
        );
    }
    let mut extra = tokio::net::TcpStream::connect(crate::net::TUNNEL_PROXY)
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), extra.read_to_string(&mut answer))
        .await
        .expect("the extra connection was neither served nor refused")
        .unwrap();
    assert!(answer.contains("too many connections"), "{answer}");
    drop(held);
    vm.shutdown(Duration::from_secs(5)).await.unwrap();
}

//! PID-1 mode of the server: one reaper thread reaps every zombie, and our own children's
//! statuses still reach their requests. Its own test binary, because the reaper waits for
//! any child of the process. The test process becomes a child subreaper so orphans are
//! re-parented to it as they would be to PID 1 in the guest.
#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmcp_guest_agent::{hello, serve, ServeOptions};
use vmcp_guest_proto::{read_msg, write_msg, ExecRequest, ExitStatus, GuestMsg, HostMsg};

fn is_zombie_or_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.contains(") Z "),
        Err(_) => true,
    }
}

fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn recv(host: &mut UnixStream) -> GuestMsg {
    read_msg(host, &mut Vec::new()).unwrap().unwrap()
}

#[test]
fn orphans_are_reaped_and_children_report_their_status() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only sets a flag on this process.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);

    let (mut host, guest) = UnixStream::pair().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut options = ServeOptions::new(hello("t", false));
    options.reap_orphans = true;
    let reader = guest.try_clone().unwrap();
    let server = std::thread::spawn(move || serve(reader, guest, &options));
    assert!(matches!(recv(&mut host), GuestMsg::Hello(_)));

    fn run(host: &mut UnixStream, id: u32, script: &str) -> (String, ExitStatus) {
        let req = ExecRequest {
            id,
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: None,
            stdin: false,
        };
        write_msg(host, &HostMsg::Exec(req)).unwrap();
        let mut out = Vec::new();
        loop {
            match recv(host) {
                GuestMsg::Started { .. } => {}
                GuestMsg::Stdout { data, .. } => out.extend(data),
                GuestMsg::Exited { status, .. } => {
                    return (String::from_utf8(out).unwrap(), status)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    // Exit codes of many quick children arrive through the reaper.
    for i in 0..20 {
        let (_, status) = run(&mut host, 100 + i, &format!("exit {}", i % 5));
        assert_eq!(status, ExitStatus::Code((i % 5) as i32));
    }
    // A missing program is still reported as such (spawn failures are not stolen).
    write_msg(
        &mut host,
        &HostMsg::Exec(ExecRequest {
            id: 200,
            argv: vec!["/no/such/prog".into()],
            env: vec![],
            cwd: None,
            stdin: false,
        }),
    )
    .unwrap();
    assert!(matches!(recv(&mut host), GuestMsg::Failed { id: 200, .. }));

    // An orphan: the shell exits, its background child is re-parented to us and must be
    // reaped when it ends.
    let (out, status) = run(&mut host, 1, "sleep 0.3 >/dev/null 2>&1 & echo $!");
    assert_eq!(status, ExitStatus::Code(0));
    let orphan: u32 = out.trim().parse().unwrap();
    let t = Instant::now();
    while exists(orphan) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !exists(orphan),
        "orphan {orphan} was not reaped (zombie: {})",
        is_zombie_or_gone(orphan)
    );

    drop(host);
    server.join().unwrap().unwrap();
}

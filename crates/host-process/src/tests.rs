//! Tests of the owned-process layer that need real processes (Linux).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use tokio::io::AsyncReadExt;

/// Whether `pid` runs (a zombie waiting for someone else's reap counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to 10 s for every pid in `pids` to be gone.
fn wait_gone(pids: &[u32]) {
    let until = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < until,
            "still running: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pgid_of(pid: u32) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(2).unwrap().parse().unwrap()
}

fn sh(script: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.args(["-c", script]);
    c
}

/// A shell that prints its background job's pid, then becomes `sleep`: child and grandchild.
const CHILD_AND_GRANDCHILD: &str = "sleep 1000 & echo $!; exec sleep 1000";

async fn first_line(child: &mut OwnedChild) -> u32 {
    let mut out = child.take_stdout().unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).await.unwrap() == 1 && byte[0] != b'\n' {
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn child_joins_the_watchdog_group_and_inherits_only_what_it_is_given() {
    let (keep, give) = std::os::unix::net::UnixStream::pair().unwrap();
    let (_keep2, hidden) = std::os::unix::net::UnixStream::pair().unwrap();
    use std::os::fd::AsRawFd;
    let fd = give.as_raw_fd();
    let hidden_fd = hidden.as_raw_fd();
    let mut cmd = sh(&format!(
        "test -e /proc/self/fd/{fd} && ! test -e /proc/self/fd/{hidden_fd} && echo ok; exec sleep 1000"
    ));
    cmd.stdout(Stdio::piped());
    let mut c = spawn_owned(cmd, SpawnOptions::default().with_inherited_fds(vec![fd])).unwrap();
    drop(give);
    let mut out = c.take_stdout().unwrap();
    let mut line = [0u8; 3];
    out.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"ok\n");
    let pid = c.id().unwrap();
    let pgid = pgid_of(pid);
    assert_ne!(
        pgid, pid as i32,
        "the watchdog, not the child, leads the group"
    );
    assert_ne!(pgid, pgid_of(std::process::id()), "not vmcp's own group");
    let watchdog = pgid as u32;
    assert!(alive(watchdog));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{watchdog}/comm"))
            .unwrap()
            .trim(),
        "vmcp-watchdog"
    );
    // The watchdog keeps no descriptor of vmcp but its pipe end.
    let fds: Vec<_> = std::fs::read_dir(format!("/proc/{watchdog}/fd"))
        .unwrap()
        .collect();
    assert_eq!(fds.len(), 1, "{fds:?}");
    c.kill_and_wait(Duration::from_secs(5)).await.unwrap();
    wait_gone(&[pid, watchdog]);
    drop(keep);
}

#[tokio::test]
async fn kill_takes_the_grandchildren_too() {
    let mut cmd = sh(CHILD_AND_GRANDCHILD);
    cmd.stdout(Stdio::piped());
    let mut c = spawn_owned(cmd, SpawnOptions::default()).unwrap();
    let grandchild = first_line(&mut c).await;
    let pid = c.id().unwrap();
    assert!(alive(pid) && alive(grandchild));
    let status = c.kill_and_wait(Duration::from_secs(5)).await.unwrap();
    assert!(!status.success());
    wait_gone(&[pid, grandchild]);
    // Killing again, after the reap, signals nothing (the group is gone for good).
    c.kill();
}

#[tokio::test]
async fn drop_takes_the_grandchildren_too_even_after_the_child_was_reaped() {
    // The child exits by itself and is reaped; its background job keeps running until the
    // owner lets go. The group id stays reserved by the watchdog, so the kill is safe.
    let mut cmd = sh("sleep 1000 & echo $!");
    cmd.stdout(Stdio::piped());
    let mut c = spawn_owned(cmd, SpawnOptions::default()).unwrap();
    let grandchild = first_line(&mut c).await;
    assert!(c.wait().await.unwrap().success());
    assert!(alive(grandchild));
    drop(c);
    wait_gone(&[grandchild]);
}

#[tokio::test]
async fn a_watchdog_does_not_keep_other_pipes_open() {
    // `cat` ends when its stdin closes. A second child (and its watchdog, forked while cat's
    // stdin pipe was open in vmcp) must not hold that pipe.
    let mut cmd = tokio::process::Command::new("cat");
    cmd.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut cat = spawn_owned(cmd, SpawnOptions::default()).unwrap();
    let other = spawn_owned(sh("exec sleep 1000"), SpawnOptions::default()).unwrap();
    drop(cat.take_stdin());
    let status = tokio::time::timeout(Duration::from_secs(5), cat.wait())
        .await
        .expect("cat never saw end of file: someone still holds its stdin")
        .unwrap();
    assert!(status.success());
    drop(other);
}

#[tokio::test]
async fn survives_the_exit_of_the_thread_that_spawned_it() {
    let handle = tokio::runtime::Handle::current();
    let mut c = std::thread::spawn(move || {
        let _g = handle.enter();
        spawn_owned(sh("exec sleep 1000"), SpawnOptions::default()).unwrap()
    })
    .join()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        c.try_wait().unwrap().is_none(),
        "the child died with the thread that spawned it"
    );
    c.kill_and_wait(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn missing_program_is_named() {
    let e = spawn_owned(
        tokio::process::Command::new("/nonexistent/qemu"),
        SpawnOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("/nonexistent/qemu"), "{e}");
}

#[test]
fn outside_a_runtime_it_says_so() {
    let e = spawn_owned(sh("true"), SpawnOptions::default()).unwrap_err();
    assert!(e.to_string().contains("tokio runtime"), "{e}");
}

#[tokio::test]
async fn runs_as_another_user_when_root() {
    if !is_root() {
        vmcp_test_support::skipped!("SKIPPED: changing users needs root");
        return;
    }
    let ids = Ids {
        uid: 65534,
        gid: 65534,
        groups: vec![],
    };
    let cmd =
        sh("[ \"$(id -u)\" = 65534 ] && [ \"$(id -g)\" = 65534 ] && [ \"$(id -G)\" = 65534 ]");
    let mut c = spawn_owned(cmd, SpawnOptions::default().with_run_as(Some(ids))).unwrap();
    assert!(c.wait().await.unwrap().success());
}

/// Not a test on its own: the "vmcp" that [`children_die_with_their_owner`] kills. Spawns a
/// child with a grandchild from a short-lived thread, prints both pids, then waits.
#[test]
#[ignore = "helper process of children_die_with_their_owner"]
fn owner_helper() {
    if std::env::var_os("VMCP_OWNER_HELPER").is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let handle = rt.handle().clone();
    let mut c = std::thread::spawn(move || {
        let _g = handle.enter();
        let mut cmd = sh(CHILD_AND_GRANDCHILD);
        cmd.stdout(Stdio::piped());
        spawn_owned(cmd, SpawnOptions::default()).unwrap()
    })
    .join()
    .unwrap();
    let grandchild = rt.block_on(first_line(&mut c));
    println!("pids {} {grandchild}", c.id().unwrap());
    std::thread::sleep(Duration::from_secs(1000));
}

#[test]
fn children_die_with_their_owner() {
    for signal in [libc::SIGKILL, libc::SIGTERM] {
        let mut owner = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "tests::owner_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VMCP_OWNER_HELPER", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(owner.stdout.take().unwrap()).lines();
        let pids: Vec<u32> = loop {
            let line = lines.next().expect("the helper printed no pids").unwrap();
            if let Some((_, rest)) = line.split_once("pids ") {
                break rest.split(' ').map(|p| p.parse().unwrap()).collect();
            }
        };
        assert!(pids.iter().all(|p| alive(*p)));
        // SAFETY: signalling our own unreaped child.
        unsafe {
            libc::kill(owner.id() as i32, signal);
        }
        owner.wait().unwrap();
        wait_gone(&pids);
    }
}

#[test]
fn disk_usage_counts_what_files_hold() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/data"), vec![7u8; 64 * 1024]).unwrap();
    let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    let used = crate::disk_usage(dir.path());
    assert!(used >= 64 * 1024, "{used}");
    // A 1 GiB hole holds (almost) nothing where the OS reports allocation.
    if cfg!(unix) {
        assert!(used < 1 << 20, "{used}");
    }
    assert_eq!(crate::disk_usage(&dir.path().join("missing")), 0);
}

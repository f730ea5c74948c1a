//! Gated shares without a VM: the guest's tar staged with hostile archives, change lists with
//! escape attempts, and `settle` with fake askers (approve, deny, partly approve, time out,
//! two sandboxes at once, the audit log).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmcp_approval::{Asker, ChangeKind, Decision, PendingApproval};

use super::*;
use crate::approvals::{ApprovalArgs, Approvals, Frontend};

fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn link(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_link(&mut h, path, target).unwrap();
}

/// Writes a raw header named `name` (the tar crate refuses `..` when building).
fn raw_file(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

struct Setup {
    d: tempfile::TempDir,
    host: PathBuf,
    outside: PathBuf,
}

fn setup() -> Setup {
    let d = tempfile::tempdir().unwrap();
    let host = d.path().join("host");
    let outside = d.path().join("outside");
    fs::create_dir(&host).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(host.join("keep.txt"), "same\n").unwrap();
    fs::write(host.join("edit.txt"), "old line\n").unwrap();
    fs::write(host.join("gone.txt"), "bye\n").unwrap();
    fs::create_dir(host.join("sub")).unwrap();
    fs::write(host.join("sub/a"), "a").unwrap();
    fs::write(outside.join("secret"), "untouched").unwrap();
    Setup { d, host, outside }
}

impl Setup {
    fn tar(&self, bytes: &[u8]) -> PathBuf {
        let p = self
            .d
            .path()
            .join(format!("changes-{}.tar", rand_name(self.d.path())));
        fs::write(&p, bytes).unwrap();
        p
    }

    fn stage(&self, bytes: &[u8]) -> Result<(ChangeSet, tempfile::TempDir), StageError> {
        let staging = tempfile::tempdir().unwrap();
        stage(&self.host, &self.tar(bytes), staging.path())?;
        let set = ChangeSet::between(&self.host, staging.path(), &ChangeLimits::default()).unwrap();
        Ok((set, staging))
    }
}

fn rand_name(dir: &Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

fn kinds(set: &ChangeSet) -> Vec<(String, ChangeKind)> {
    set.entries
        .iter()
        .map(|e| (e.path.clone(), e.kind))
        .collect()
}

fn typical() -> Vec<u8> {
    tar_of(|b| {
        file(b, "keep.txt", b"same\n"); // copied up, unchanged: not a change
        file(b, "edit.txt", b"new line\n");
        file(b, ".wh.gone.txt", b"");
        file(b, "newdir/n.txt", b"hello\n");
    })
}

#[test]
fn staging_shows_created_modified_deleted() {
    let s = setup();
    let (set, _staging) = s.stage(&typical()).unwrap();
    assert_eq!(
        kinds(&set),
        [
            ("edit.txt".into(), ChangeKind::Modified),
            ("gone.txt".into(), ChangeKind::Deleted),
            ("newdir/n.txt".into(), ChangeKind::Created),
        ]
    );
    // HOST itself is untouched by staging.
    assert_eq!(
        fs::read_to_string(s.host.join("edit.txt")).unwrap(),
        "old line\n"
    );
    assert!(s.host.join("gone.txt").exists());
    assert!(!s.host.join("newdir").exists());
    // An opaque directory deletes what HOST had in it.
    let bytes = tar_of(|b| {
        file(b, "sub/.wh..wh..opq", b"");
        file(b, "sub/b", b"b");
    });
    let (set, _staging) = s.stage(&bytes).unwrap();
    assert_eq!(
        kinds(&set),
        [
            ("sub/a".into(), ChangeKind::Deleted),
            ("sub/b".into(), ChangeKind::Created),
        ]
    );
}

#[test]
fn hostile_archives_and_staging_trees_never_reach_outside_host() {
    let s = setup();
    // `..` is refused outright.
    let mut bytes = Vec::new();
    raw_file(&mut bytes, "../outside/secret", b"pwned");
    bytes.extend_from_slice(&[0u8; 1024]);
    let err = s.stage(&bytes).unwrap_err();
    assert!(format!("{err:?}").contains(".."), "{err:?}");
    // A symlink out, then a write "through" it: lands inside staging, and the link itself is
    // refused (never copied back).
    let outside = s.outside.display().to_string();
    let bytes = tar_of(|b| {
        link(b, "esc", &outside);
        file(b, "esc/secret", b"pwned");
        link(b, "abs", "/etc/passwd");
    });
    let (set, staging) = s.stage(&bytes).unwrap();
    let refused: Vec<&str> = set.refused.iter().map(|r| r.path.as_str()).collect();
    assert!(
        refused.contains(&"esc") && refused.contains(&"abs"),
        "{refused:?}"
    );
    for e in &set.entries {
        assert!(!e.path.starts_with('/') && !e.path.split('/').any(|c| c == ".."));
    }
    let report = set.apply(&s.host, staging.path(), None).unwrap();
    assert!(!report.applied.is_empty());
    assert_eq!(
        fs::read_to_string(s.outside.join("secret")).unwrap(),
        "untouched"
    );
    assert!(fs::symlink_metadata(s.host.join("esc")).is_err());
    assert!(fs::symlink_metadata(s.host.join("abs")).is_err());

    // HOST has a symlink leading out; the guest's copy has a real directory there.
    let s = setup();
    symlink(&s.outside, s.host.join("door")).unwrap();
    let bytes = tar_of(|b| file(b, "door/secret", b"pwned"));
    let (set, staging) = s.stage(&bytes).unwrap();
    let report = set.apply(&s.host, staging.path(), None).unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    assert!(
        report.refused.iter().any(|r| r.path == "door/secret"),
        "{report:?}"
    );
    assert_eq!(
        fs::read_to_string(s.outside.join("secret")).unwrap(),
        "untouched"
    );

    // Special files in staging (a socket) are refused, not copied.
    let s = setup();
    let staging = tempfile::tempdir().unwrap();
    stage(&s.host, &s.tar(&tar_of(|_| {})), staging.path()).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(staging.path().join("sock")).unwrap();
    let set = ChangeSet::between(&s.host, staging.path(), &ChangeLimits::default()).unwrap();
    assert!(set.refused.iter().any(|r| r.path == "sock"), "{set:?}");
    assert!(set.entries.is_empty());

    // Setuid bits are dropped on the way.
    let s = setup();
    let bytes = tar_of(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o4755);
        h.set_size(2);
        b.append_data(&mut h, "suid", &b"#!"[..]).unwrap();
    });
    let (set, staging) = s.stage(&bytes).unwrap();
    set.apply(&s.host, staging.path(), None).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(s.host.join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7000, 0);
}

/// Answers with a fixed decision (or never, for `None`), after `wait_for` items are pending.
struct FakeAsker {
    decision: Option<Decision>,
    asked: Arc<AtomicUsize>,
    wait_for: usize,
    approvals: std::sync::Mutex<Option<vmcp_approval::Broker>>,
}

#[async_trait::async_trait]
impl Asker for FakeAsker {
    fn name(&self) -> &str {
        "fake"
    }
    async fn ask(&self, _pending: &PendingApproval) -> Option<Decision> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let broker = self.approvals.lock().unwrap().clone();
        if let Some(b) = broker {
            // Until both were submitted (one may be decided already); the most seen
            // waiting at once is kept in `asked`'s sibling counter.
            loop {
                let snap = b.snapshot();
                MAX_SEEN.fetch_max(snap.pending.len(), Ordering::SeqCst);
                if snap.pending.len() + snap.history.len() >= self.wait_for {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        match &self.decision {
            Some(d) => Some(d.clone()),
            None => std::future::pending().await,
        }
    }
}

/// The most items seen waiting at once by a [`FakeAsker`] with `wait_for`.
static MAX_SEEN: AtomicUsize = AtomicUsize::new(0);

fn asker(decision: Option<Decision>) -> Arc<FakeAsker> {
    Arc::new(FakeAsker {
        decision,
        asked: Arc::new(AtomicUsize::new(0)),
        wait_for: 0,
        approvals: std::sync::Mutex::new(None),
    })
}

async fn approvals(s: &Setup, policy: &str, timeout: f64) -> Approvals {
    let p = s.d.path().join("policy.toml");
    fs::write(&p, policy).unwrap();
    let args = ApprovalArgs {
        policy: Some(p),
        approval_ui: None,
        approval_timeout: Duration::from_secs_f64(timeout),
        audit_log: Some(s.d.path().join("audit.jsonl")),
    };
    Approvals::start(&args, Frontend::Mcp)
        .await
        .unwrap()
        .unwrap()
}

fn origin(name: &str, a: Arc<dyn Asker>) -> Origin {
    Origin {
        sandbox: name.into(),
        context: Some("test".into()),
        askers: vec![a],
    }
}

fn no_legacy(_: &Path, _: &Path) -> anyhow::Result<()> {
    panic!("the legacy copy-back must not run under ask/deny")
}

fn audit_lines(s: &Setup) -> Vec<serde_json::Value> {
    fs::read_to_string(s.d.path().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn settle_approve_deny_partly_and_rules() {
    // Denied: nothing reaches HOST.
    let s = setup();
    let ap = approvals(&s, "default = \"ask\"\n", 10.0).await;
    let deny = asker(Some(Decision::deny("not now")));
    let r = settle(
        &ap,
        &s.host,
        &s.tar(&typical()),
        origin("vm-1", deny),
        no_legacy,
    )
    .await
    .unwrap();
    assert!(r.applied.is_empty(), "{r:?}");
    assert_eq!(r.discarded.len(), 3);
    assert_eq!(r.decision.as_deref(), Some("denied: not now"));
    assert!(
        r.summary().contains("denied: not now; 0 applied"),
        "{}",
        r.summary()
    );
    assert_eq!(
        fs::read_to_string(s.host.join("edit.txt")).unwrap(),
        "old line\n"
    );
    assert!(s.host.join("gone.txt").exists() && !s.host.join("newdir").exists());

    // Partly approved: only the named file.
    let files = ["newdir/n.txt".to_string()].into_iter().collect();
    let part = asker(Some(Decision::ApprovedFiles { files }));
    let r = settle(
        &ap,
        &s.host,
        &s.tar(&typical()),
        origin("vm-1", part),
        no_legacy,
    )
    .await
    .unwrap();
    assert_eq!(r.applied, ["newdir/n.txt"]);
    assert_eq!(
        fs::read_to_string(s.host.join("newdir/n.txt")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        fs::read_to_string(s.host.join("edit.txt")).unwrap(),
        "old line\n"
    );
    assert!(s.host.join("gone.txt").exists());

    // Approved: everything.
    let yes = asker(Some(Decision::Approved));
    let r = settle(
        &ap,
        &s.host,
        &s.tar(&typical()),
        origin("vm-1", yes),
        no_legacy,
    )
    .await
    .unwrap();
    assert_eq!(r.decision.as_deref(), Some("approved"));
    assert_eq!(
        fs::read_to_string(s.host.join("edit.txt")).unwrap(),
        "new line\n"
    );
    assert!(!s.host.join("gone.txt").exists());
    let audit = audit_lines(&s);
    assert_eq!(audit.len(), 3, "{audit:?}");
    assert_eq!(audit[0]["decision"], "denied");
    assert_eq!(audit[1]["decision"], "approved_files");
    assert_eq!(audit[2]["decision"], "approved");
    assert!(audit
        .iter()
        .all(|l| l["changes_hash"].as_str().is_some_and(|h| h.len() == 64)));

    // Rules per path: a denied path is discarded without asking, an allowed one passes.
    let s = setup();
    let ap = approvals(
        &s,
        "default = \"allow\"\n[[rule]]\naction = \"deny\"\npath = \"**/gone.txt\"\n[[rule]]\naction = \"ask\"\npath = \"**/edit.txt\"\n",
        10.0,
    )
    .await;
    let deny = asker(Some(Decision::deny("no")));
    let r = settle(
        &ap,
        &s.host,
        &s.tar(&typical()),
        origin("vm-1", deny.clone()),
        no_legacy,
    )
    .await
    .unwrap();
    assert_eq!(deny.asked.load(Ordering::SeqCst), 1);
    assert_eq!(r.applied, ["newdir/n.txt"]);
    assert!(
        r.discarded
            .iter()
            .any(|(p, why)| p == "gone.txt" && why.contains("rule at line 2")),
        "{r:?}"
    );
    assert!(s.host.join("gone.txt").exists());

    // All allowed: today's copy-back runs (and nobody is asked).
    let s = setup();
    let ap = approvals(&s, "default = \"allow\"\n", 10.0).await;
    let ran = Arc::new(AtomicUsize::new(0));
    let ran2 = ran.clone();
    let never = asker(None);
    let r = settle(
        &ap,
        &s.host,
        &s.tar(&typical()),
        origin("vm-1", never.clone()),
        move |_, _| {
            ran2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        },
    )
    .await
    .unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    assert_eq!(never.asked.load(Ordering::SeqCst), 0);
    assert_eq!(r.applied.len(), 3);
}

#[tokio::test]
async fn unanswered_is_denied_after_the_timeout_and_two_sandboxes_wait_at_once() {
    let s = setup();
    let ap = Arc::new(approvals(&s, "default = \"ask\"\n", 0.3).await);
    let started = std::time::Instant::now();
    let r = settle(
        &ap,
        &s.host,
        &s.tar(&typical()),
        origin("vm-1", asker(None)),
        no_legacy,
    )
    .await
    .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(r.applied.is_empty());
    assert_eq!(
        r.decision.as_deref(),
        Some("not approved within 0 s; denied")
    );
    assert!(s.host.join("gone.txt").exists());
    assert_eq!(audit_lines(&s)[0]["decision"], "timed_out");

    // Two sandboxes: both pending at the same time, decided separately.
    let s2 = setup();
    let ap = Arc::new(approvals(&s, "default = \"ask\"\n", 10.0).await);
    let mk = |d: Decision| {
        Arc::new(FakeAsker {
            decision: Some(d),
            asked: Arc::new(AtomicUsize::new(0)),
            wait_for: 2,
            approvals: std::sync::Mutex::new(Some(ap.broker().clone())),
        })
    };
    let (a1, a2) = (mk(Decision::Approved), mk(Decision::deny("not this one")));
    let (t1, t2) = (s.tar(&typical()), s2.tar(&typical()));
    let (r1, r2) = tokio::join!(
        settle(&ap, &s.host, &t1, origin("vm-a", a1), no_legacy),
        settle(&ap, &s2.host, &t2, origin("vm-b", a2), no_legacy),
    );
    let (r1, r2) = (r1.unwrap(), r2.unwrap());
    assert_eq!(
        MAX_SEEN.load(Ordering::SeqCst),
        2,
        "both were pending at once"
    );
    assert_eq!(r1.applied.len(), 3, "{r1:?}");
    assert!(r2.applied.is_empty(), "{r2:?}");
    assert_eq!(
        fs::read_to_string(s.host.join("edit.txt")).unwrap(),
        "new line\n"
    );
    assert_eq!(
        fs::read_to_string(s2.host.join("edit.txt")).unwrap(),
        "old line\n"
    );
    let sandboxes: Vec<String> = audit_lines(&s)[1..]
        .iter()
        .map(|l| l["sandbox"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sandboxes.len(), 2);
    assert!(sandboxes.contains(&"vm-a".into()) && sandboxes.contains(&"vm-b".into()));
}

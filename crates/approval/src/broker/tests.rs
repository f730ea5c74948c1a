use super::*;

use crate::change::{ChangeKind, ChangeSet, Diff, FileChange};

fn egress(sandbox: &str) -> Crossing {
    Crossing::Egress {
        sandbox: sandbox.into(),
        host: "example.com".into(),
        port: 443,
    }
}

fn share(sandbox: &str, files: &[&str]) -> Crossing {
    Crossing::ShareChanges {
        sandbox: sandbox.into(),
        host_dir: "/home/me/src".into(),
        changes: ChangeSet {
            entries: files
                .iter()
                .map(|f| FileChange {
                    path: (*f).into(),
                    kind: ChangeKind::Created,
                    old_size: None,
                    new_size: Some(1),
                    new_sha256: Some("00".into()),
                    diff: Diff::Binary,
                })
                .collect(),
            omitted: 0,
            refused: vec![],
        },
    }
}

/// Waits until `n` items are pending.
async fn pending(b: &Broker, n: usize) -> Vec<PendingApproval> {
    let mut rx = b.subscribe();
    loop {
        let p = b.pending();
        if p.len() == n {
            return p;
        }
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("no change within 10 s")
            .expect("broker gone");
    }
}

#[tokio::test]
async fn times_out_denied() {
    let b = Broker::new(BrokerConfig::default().with_timeout(Duration::from_millis(50)));
    let start = Instant::now();
    let d = b.submit(egress("vm-1")).await;
    assert_eq!(d, Decision::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(b.pending().is_empty());
    let h = b.history();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].by, "timeout");
    assert!(d.message(Duration::from_millis(50)).contains("denied"));
}

#[tokio::test]
async fn concurrent_items_from_two_sandboxes_decided_independently() {
    let b = Broker::new(BrokerConfig::default());
    let b1 = b.clone();
    let t1 =
        tokio::spawn(async move { b1.submit(share("vm-a", &["a.txt", "b.txt", "c.txt"])).await });
    let b2 = b.clone();
    let t2 = tokio::spawn(async move { b2.submit(egress("vm-b")).await });
    let items = pending(&b, 2).await;
    let a = items
        .iter()
        .find(|p| p.crossing.sandbox() == "vm-a")
        .unwrap();
    let e = items
        .iter()
        .find(|p| p.crossing.sandbox() == "vm-b")
        .unwrap();
    assert_ne!(a.id, e.id);
    assert_eq!(a.changes_hash.len(), 64);
    assert!(e.changes_hash.is_empty());

    // Deny the egress first; the share item keeps waiting.
    b.decide(&e.id, Decision::deny("not that host"), "api")
        .unwrap();
    assert_eq!(t2.await.unwrap(), Decision::deny("not that host"));
    assert_eq!(b.pending().len(), 1);

    let files: BTreeSet<String> = ["a.txt".to_owned(), "c.txt".to_owned()].into();
    b.decide(
        &a.id,
        Decision::ApprovedFiles {
            files: files.clone(),
        },
        "page",
    )
    .unwrap();
    let d = t1.await.unwrap();
    assert!(d.approves_file("a.txt") && d.approves_file("c.txt") && !d.approves_file("b.txt"));
    assert_eq!(d.file_selection(), Some(files));
    // A second decision on a decided item is refused.
    assert!(matches!(
        b.decide(&a.id, Decision::Approved, "api"),
        Err(BrokerError::NotPending(_))
    ));
    let h = b.history();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].by, "page", "newest first");
}

#[tokio::test]
async fn invalid_decisions_are_refused() {
    let b = Broker::new(BrokerConfig::default());
    let b1 = b.clone();
    let t = tokio::spawn(async move { b1.submit(share("vm", &["a"])).await });
    let b2 = b.clone();
    let te = tokio::spawn(async move { b2.submit(egress("vm")).await });
    let items = pending(&b, 2).await;
    let (s, e) = if items[0].crossing.kind() == "egress" {
        (&items[1], &items[0])
    } else {
        (&items[0], &items[1])
    };
    let unknown: BTreeSet<String> = ["../etc/passwd".to_owned()].into();
    let err = b
        .decide(&s.id, Decision::ApprovedFiles { files: unknown }, "api")
        .unwrap_err();
    assert!(err.to_string().contains("not in the change list"), "{err}");
    let err = b
        .decide(
            &e.id,
            Decision::ApprovedFiles {
                files: ["a".to_owned()].into(),
            },
            "api",
        )
        .unwrap_err();
    assert!(err.to_string().contains("file by file"), "{err}");
    assert!(b.decide(&s.id, Decision::TimedOut, "api").is_err());
    assert!(b.decide("nope", Decision::Approved, "api").is_err());
    // An empty subset is a denial.
    b.decide(
        &s.id,
        Decision::ApprovedFiles {
            files: BTreeSet::new(),
        },
        "api",
    )
    .unwrap();
    assert!(!t.await.unwrap().is_approved());
    b.decide(&e.id, Decision::Approved, "api").unwrap();
    assert_eq!(te.await.unwrap(), Decision::Approved);
}

#[tokio::test]
async fn pending_is_bounded() {
    let b = Broker::new(BrokerConfig::default().with_max_pending(2));
    let mut tasks = Vec::new();
    for i in 0..2 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            b.submit(egress(&format!("vm{i}"))).await
        }));
    }
    pending(&b, 2).await;
    let d = b.submit(egress("vm-extra")).await;
    match &d {
        Decision::Denied { reason } => assert!(reason.contains("too many"), "{reason}"),
        d => panic!("{d:?}"),
    }
    for p in b.pending() {
        b.decide(&p.id, Decision::Approved, "api").unwrap();
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Decision::Approved);
    }
}

#[tokio::test]
async fn dropped_submission_is_withdrawn() {
    let b = Broker::new(BrokerConfig::default());
    let b1 = b.clone();
    let t = tokio::spawn(async move { b1.submit(egress("vm")).await });
    pending(&b, 1).await;
    t.abort();
    let _ = t.await;
    assert!(b.pending().is_empty());
    assert_eq!(b.history()[0].by, "withdrawn");
}

struct Fixed {
    name: &'static str,
    answer: Option<Decision>,
    delay: Duration,
}

#[async_trait::async_trait]
impl Asker for Fixed {
    fn name(&self) -> &str {
        self.name
    }
    async fn ask(&self, _p: &PendingApproval) -> Option<Decision> {
        tokio::time::sleep(self.delay).await;
        self.answer.clone()
    }
}

#[tokio::test]
async fn askers_decide_and_may_abstain() {
    let b = Broker::new(BrokerConfig::default().with_timeout(Duration::from_secs(20)));
    // A broker-wide asker that cannot answer, and a per-submission one that approves.
    b.add_asker(Arc::new(Fixed {
        name: "mute",
        answer: None,
        delay: Duration::ZERO,
    }));
    let d = b
        .submit_with(
            egress("vm"),
            SubmitOptions::default()
                .with_context("tool run: curl example.com")
                .with_asker(Arc::new(Fixed {
                    name: "elicitation",
                    answer: Some(Decision::Approved),
                    delay: Duration::from_millis(20),
                })),
        )
        .await;
    assert_eq!(d, Decision::Approved);
    let h = b.history();
    assert_eq!(h[0].by, "elicitation");
    assert_eq!(
        h[0].item.context.as_deref(),
        Some("tool run: curl example.com")
    );

    // Only abstaining askers: the timeout decides.
    let d = b
        .submit_with(
            egress("vm"),
            SubmitOptions::default().with_timeout(Duration::from_millis(50)),
        )
        .await;
    assert_eq!(d, Decision::TimedOut);

    // The page beats a slow asker, whose late answer is ignored.
    let b2 = b.clone();
    let t = tokio::spawn(async move {
        b2.submit_with(
            egress("vm"),
            SubmitOptions::default().with_asker(Arc::new(Fixed {
                name: "slow",
                answer: Some(Decision::Approved),
                delay: Duration::from_secs(30),
            })),
        )
        .await
    });
    let p = pending(&b, 1).await;
    b.decide(&p[0].id, Decision::deny("no"), "page").unwrap();
    assert_eq!(t.await.unwrap(), Decision::deny("no"));
}

#[tokio::test]
async fn audit_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let audit = Arc::new(AuditLog::open(&path).unwrap());
    let b = Broker::new(
        BrokerConfig::default()
            .with_audit(audit)
            .with_timeout(Duration::from_secs(20)),
    );
    let b1 = b.clone();
    let t = tokio::spawn(async move {
        b1.submit_with(
            share("vm-a", &["x.txt", "y.txt"]),
            SubmitOptions::default().with_context("run"),
        )
        .await
    });
    let p = pending(&b, 1).await;
    let hash = p[0].changes_hash.clone();
    b.decide(
        &p[0].id,
        Decision::ApprovedFiles {
            files: ["y.txt".to_owned()].into(),
        },
        "page",
    )
    .unwrap();
    t.await.unwrap();
    let d = b
        .submit_with(
            egress("vm-b"),
            SubmitOptions::default().with_timeout(Duration::from_millis(10)),
        )
        .await;
    assert_eq!(d, Decision::TimedOut);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let l0 = &lines[0];
    assert_eq!(l0["kind"], "share_changes");
    assert_eq!(l0["sandbox"], "vm-a");
    assert_eq!(l0["decision"], "approved_files");
    assert_eq!(l0["approved_files"], serde_json::json!(["y.txt"]));
    assert_eq!(l0["changes_hash"], hash);
    assert_eq!(l0["changes"], 2);
    assert_eq!(l0["by"], "page");
    assert_eq!(l0["context"], "run");
    assert_eq!(l0["host_dir"], "/home/me/src");
    assert!(l0["ts"].as_str().unwrap().ends_with('Z'));
    let l1 = &lines[1];
    assert_eq!(l1["kind"], "egress");
    assert_eq!(l1["host"], "example.com");
    assert_eq!(l1["port"], 443);
    assert_eq!(l1["decision"], "timed_out");
    assert_eq!(l1["by"], "timeout");
    assert!(l1.get("changes_hash").is_none());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Reopening appends.
    let again = AuditLog::open(&path).unwrap();
    assert_eq!(again.path(), path);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn unrecordable_approval_becomes_denial() {
    // Every write to /dev/full fails with ENOSPC.
    let audit = Arc::new(AuditLog::open(std::path::Path::new("/dev/full")).unwrap());
    let b = Broker::new(BrokerConfig::default().with_audit(audit));
    let b1 = b.clone();
    let t = tokio::spawn(async move { b1.submit(egress("vm")).await });
    let p = pending(&b, 1).await;
    b.decide(&p[0].id, Decision::Approved, "api").unwrap();
    match t.await.unwrap() {
        Decision::Denied { reason } => assert!(reason.contains("audit log"), "{reason}"),
        d => panic!("{d:?}"),
    }
}

#[tokio::test]
async fn long_text_is_clipped() {
    let b = Broker::new(BrokerConfig::default());
    let b1 = b.clone();
    let t = tokio::spawn(async move {
        b1.submit_with(
            egress("vm"),
            SubmitOptions::default().with_context("c".repeat(100_000)),
        )
        .await
    });
    let p = pending(&b, 1).await;
    assert!(p[0].context.as_ref().unwrap().len() < 2 * MAX_TEXT);
    b.decide(
        &p[0].id,
        Decision::deny("r".repeat(100_000)),
        &"b".repeat(100_000),
    )
    .unwrap();
    match t.await.unwrap() {
        Decision::Denied { reason } => assert!(reason.len() < 2 * MAX_TEXT),
        d => panic!("{d:?}"),
    }
    assert!(b.history()[0].by.len() < 2 * MAX_TEXT);
}

//! The approval page's HTTP side end to end: the guard (loopback bind, token, Host, Origin),
//! the JSON API deciding real broker submissions, bounded bodies, and hostile names escaped in
//! the page.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::request;
use vmcp_approval::ui::{ApprovalUi, MAX_BODY};
use vmcp_approval::{Broker, BrokerConfig, ChangeLimits, ChangeSet, Crossing, Decision};

async fn start() -> (Broker, ApprovalUi) {
    let broker = Broker::new(BrokerConfig::default().with_timeout(Duration::from_secs(60)));
    let ui = ApprovalUi::start("127.0.0.1:0".parse().unwrap(), broker.clone())
        .await
        .unwrap();
    (broker, ui)
}

async fn wait_pending(b: &Broker, n: usize) -> Vec<vmcp_approval::PendingApproval> {
    let mut rx = b.subscribe();
    loop {
        let p = b.pending();
        if p.len() == n {
            return p;
        }
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap()
            .unwrap();
    }
}

fn changes(files: &[(&str, &str)]) -> (tempfile::TempDir, tempfile::TempDir, ChangeSet) {
    let host = tempfile::tempdir().unwrap();
    let staged = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(staged.path().join(name), content).unwrap();
    }
    let c = ChangeSet::between(host.path(), staged.path(), &ChangeLimits::default()).unwrap();
    (host, staged, c)
}

#[tokio::test]
async fn refuses_non_loopback_binds() {
    let broker = Broker::new(BrokerConfig::default());
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"] {
        let e = ApprovalUi::start(addr.parse().unwrap(), broker.clone())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("loopback"), "{addr}: {e}");
    }
}

#[tokio::test]
async fn guard_refuses_without_token_or_with_foreign_host_or_origin() {
    let (_b, ui) = start().await;
    let addr = ui.local_addr();
    let tok = ui.token().to_owned();
    assert!(ui.url().contains(&tok) && ui.url().starts_with("http://127.0.0.1:"));
    let bearer = format!("Bearer {tok}");
    let with_token = format!("/api/pending?token={tok}");

    // Accepted: query token, bearer token, same origin.
    let r = request(addr, "GET", &with_token, &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), serde_json::json!([]));
    let r = request(
        addr,
        "GET",
        "/api/pending",
        &[("Authorization", &bearer)],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let origin = format!("http://{addr}");
    let r = request(addr, "GET", &with_token, &[("Origin", &origin)], b"").await;
    assert_eq!(r.status, 200);
    let local = format!("localhost:{}", addr.port());
    let r = request(addr, "GET", &with_token, &[("Host", &local)], b"").await;
    assert_eq!(r.status, 200);

    // Refused.
    let r = request(addr, "GET", "/api/pending", &[], b"").await;
    assert_eq!(r.status, 401);
    assert!(r.body.contains("no token"), "{}", r.body);
    let r = request(addr, "GET", "/api/pending?token=nope", &[], b"").await;
    assert_eq!(r.status, 401);
    let r = request(addr, "GET", "/", &[], b"").await;
    assert_eq!(r.status, 401);
    assert!(
        r.body.contains("<h1>"),
        "the page route answers with a readable page"
    );
    let evil_host = format!("evil.example:{}", addr.port());
    let r = request(addr, "GET", &with_token, &[("Host", &evil_host)], b"").await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("DNS-rebinding"), "{}", r.body);
    for o in [
        "http://evil.example",
        "null",
        "https://127.0.0.1",
        "http://127.0.0.1:1",
    ] {
        let r = request(
            addr,
            "POST",
            "/api/pending/x/approve",
            &[("Origin", o), ("Authorization", &bearer)],
            b"",
        )
        .await;
        assert_eq!(r.status, 403, "{o}: {}", r.body);
    }
    let r = request(addr, "GET", &format!("/nope?token={tok}"), &[], b"").await;
    assert_eq!(r.status, 404);
    let r = request(addr, "DELETE", &with_token, &[], b"").await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn api_approves_denies_and_approves_a_subset() {
    let (b, ui) = start().await;
    let addr = ui.local_addr();
    let bearer = format!("Bearer {}", ui.token());
    let auth = [("Authorization", bearer.as_str())];

    let (h1, _s1, c1) = changes(&[("a.txt", "a\n"), ("b.txt", "b\n"), ("c.txt", "c\n")]);
    let b1 = b.clone();
    let dir1 = h1.path().to_owned();
    let t1 = tokio::spawn(async move {
        b1.submit(Crossing::ShareChanges {
            sandbox: "vm-1".into(),
            host_dir: dir1,
            changes: c1,
        })
        .await
    });
    let b2 = b.clone();
    let t2 = tokio::spawn(async move {
        b2.submit(Crossing::Egress {
            sandbox: "vm-2".into(),
            host: "example.com".into(),
            port: 443,
        })
        .await
    });
    let b3 = b.clone();
    let t3 = tokio::spawn(async move {
        b3.submit(Crossing::Egress {
            sandbox: "vm-3".into(),
            host: "pypi.org".into(),
            port: 443,
        })
        .await
    });
    wait_pending(&b, 3).await;

    let list = request(addr, "GET", "/api/pending", &auth, b"")
        .await
        .json();
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), 3);
    let id_of = |sandbox: &str| {
        items
            .iter()
            .find(|i| i["crossing"]["sandbox"] == sandbox)
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let share = items
        .iter()
        .find(|i| i["crossing"]["kind"] == "share_changes")
        .unwrap();
    assert_eq!(
        share["crossing"]["changes"]["entries"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_eq!(share["crossing"]["changes"]["entries"][0]["path"], "a.txt");
    assert_eq!(
        share["crossing"]["changes"]["entries"][0]["kind"],
        "created"
    );
    assert!(
        share["crossing"]["changes"]["entries"][0]["diff"]["unified"]
            .as_str()
            .unwrap()
            .contains("+a")
    );

    // A subset of files: an unknown file is refused, a known subset applies.
    let id1 = id_of("vm-1");
    let path1 = format!("/api/pending/{id1}/approve");
    let r = request(addr, "POST", &path1, &auth, br#"{"files":["../x"]}"#).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("not in the change list"), "{}", r.body);
    let r = request(
        addr,
        "POST",
        &path1,
        &auth,
        br#"{"files":["a.txt","c.txt"]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let d = t1.await.unwrap();
    let want: BTreeSet<String> = ["a.txt".to_owned(), "c.txt".to_owned()].into();
    assert_eq!(d, Decision::ApprovedFiles { files: want });

    // Deny with a reason; approve the other.
    let r = request(
        addr,
        "POST",
        &format!("/api/pending/{}/deny", id_of("vm-2")),
        &auth,
        br#"{"reason":"no egress today"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(t2.await.unwrap(), Decision::deny("no egress today"));
    let id3 = id_of("vm-3");
    let r = request(
        addr,
        "POST",
        &format!("/api/pending/{id3}/approve"),
        &auth,
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(t3.await.unwrap(), Decision::Approved);
    // Already decided.
    let r = request(
        addr,
        "POST",
        &format!("/api/pending/{id3}/deny"),
        &auth,
        b"",
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.body);

    let hist = request(addr, "GET", "/api/history", &auth, b"")
        .await
        .json();
    let hist = hist.as_array().unwrap();
    assert_eq!(hist.len(), 3);
    assert_eq!(hist[0]["decision"]["decision"], "approved");
    assert_eq!(hist[0]["by"], "api");
    assert_eq!(hist[1]["decision"]["reason"], "no egress today");

    // The snapshot long-poll returns at once for an old generation.
    let snap = request(addr, "GET", "/api/snapshot?since=0", &auth, b"")
        .await
        .json();
    assert!(snap["generation"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn bodies_are_bounded_and_checked() {
    let (b, ui) = start().await;
    let addr = ui.local_addr();
    let bearer = format!("Bearer {}", ui.token());
    let auth = [("Authorization", bearer.as_str())];
    let b1 = b.clone();
    let t = tokio::spawn(async move {
        b1.submit(Crossing::Egress {
            sandbox: "vm".into(),
            host: "h".into(),
            port: 1,
        })
        .await
    });
    let id = wait_pending(&b, 1).await[0].id.clone();
    let big = format!(r#"{{"reason":"{}"}}"#, "x".repeat(MAX_BODY + 1));
    let r = request(
        addr,
        "POST",
        &format!("/api/pending/{id}/deny"),
        &auth,
        big.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 413, "{}", &r.body[..r.body.len().min(200)]);
    let r = request(
        addr,
        "POST",
        &format!("/api/pending/{id}/deny"),
        &auth,
        b"{not json",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = request(
        addr,
        "POST",
        &format!("/api/pending/{id}/deny"),
        &auth,
        br#"{"why":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "unknown fields refused: {}", r.body);
    // Still pending after all that.
    assert_eq!(b.pending().len(), 1);
    let r = request(addr, "POST", &format!("/api/pending/{id}/deny"), &auth, b"").await;
    assert_eq!(r.status, 200);
    assert!(!t.await.unwrap().is_approved());
}

#[tokio::test]
async fn page_escapes_hostile_names_and_sets_headers() {
    let (b, ui) = start().await;
    let addr = ui.local_addr();
    let evil = "<img src=x onerror=alert(1)>.txt";
    let (h, _s, c) = changes(&[(evil, "</pre><script>alert(2)</script>\n")]);
    let b1 = b.clone();
    let dir = h.path().to_owned();
    let _t = tokio::spawn(async move {
        b1.submit(Crossing::ShareChanges {
            sandbox: "vm\"><script>alert(3)</script>".into(),
            host_dir: dir,
            changes: c,
        })
        .await
    });
    wait_pending(&b, 1).await;
    let r = request(addr, "GET", &format!("/?token={}", ui.token()), &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("<img"), "unescaped name");
    assert!(!r.body.contains("<script>alert"), "unescaped content");
    assert!(r.body.contains("&lt;img src=x onerror=alert(1)&gt;.txt"));
    assert!(r.body.contains("&lt;/pre&gt;&lt;script&gt;alert(2)"));
    let csp = r.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'nonce-") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    // Exactly one script element: ours, carrying the nonce.
    assert_eq!(r.body.matches("<script").count(), 1);

    // The fragment long-poll waits for a change, then returns the new state.
    let gen = b.snapshot().generation;
    let target = format!("/fragment?token={}&since={gen}", ui.token());
    let poll = tokio::spawn(async move { request(addr, "GET", &target, &[], b"").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !poll.is_finished(),
        "the long poll returned without a change"
    );
    let id = b.pending()[0].id.clone();
    b.decide(&id, Decision::deny("nope"), "test").unwrap();
    let r = poll.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("Nothing is waiting"), "{}", r.body);
    assert!(r.header("x-generation").unwrap().parse::<u64>().unwrap() > gen);
}

#[tokio::test]
async fn connections_serve_one_request_and_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_b, ui) = start().await;
    let addr = ui.local_addr();
    // More idle-after-one-request connections than the server has slots: each is closed after
    // its answer, so none keeps a slot and a later request is still served.
    let mut held = Vec::new();
    for _ in 0..vmcp_approval::ui::MAX_CONNECTIONS + 4 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET /api/pending HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("the server kept the connection open")
            .unwrap();
        assert!(raw.starts_with(b"HTTP/1.1 401"));
        held.push(s);
    }
    let r = request(
        addr,
        "GET",
        &format!("/api/pending?token={}", ui.token()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn ipv6_loopback_works_with_its_own_host_names() {
    let broker = Broker::new(BrokerConfig::default());
    let ui = match ApprovalUi::start("[::1]:0".parse().unwrap(), broker).await {
        Ok(ui) => ui,
        Err(e) => {
            vmcp_test_support::skipped!("SKIPPED: no IPv6 loopback here ({e})");
            return;
        }
    };
    let addr = ui.local_addr();
    assert!(ui.url().starts_with("http://[::1]:"), "{}", ui.url());
    let target = format!("/api/pending?token={}", ui.token());
    let r = request(addr, "GET", &target, &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let local = format!("localhost:{}", addr.port());
    assert_eq!(
        request(addr, "GET", &target, &[("Host", &local)], b"")
            .await
            .status,
        200
    );
    let v4 = format!("127.0.0.1:{}", addr.port());
    assert_eq!(
        request(addr, "GET", &target, &[("Host", &v4)], b"")
            .await
            .status,
        403
    );
}

//! The approval page in a real browser: headless Chromium driven through WebDriver
//! (`chromedriver`, installed by scripts/install.d/60-chromium.sh). Three crossings from three
//! sandboxes wait on the page; the test denies one with a reason, approves one, unticks one file
//! of the third and approves the rest, then applies that partial approval and checks the host
//! directory. It screenshots the page on the way: `target/approval.png` always, and
//! `docs/approval.png` when `VMCP_UPDATE_DOCS=1`.
//!
//! Skipped loudly without `chromedriver`/`chromium`, unless `VMCP_REQUIRE_BROWSER=1` (CI), which
//! makes their absence a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmcp_approval::ui::ApprovalUi;
use vmcp_approval::{
    Broker, BrokerConfig, ChangeLimits, ChangeSet, Crossing, Decision, SubmitOptions,
};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// One blocking HTTP/1.1 request to chromedriver; (status, JSON body).
fn wd_http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    // chromedriver says `Connection: close` but keeps the socket open: read by Content-Length.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "chromedriver closed without a response");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    match len {
        Some(len) => {
            while raw.len() < head_end + len {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "chromedriver closed mid-body");
                raw.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            s.read_to_end(&mut raw).unwrap();
        }
    }
    let text = String::from_utf8_lossy(&raw[head_end..]);
    let chunked = head.contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(&text)
    } else {
        text.into_owned()
    };
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A WebDriver session; deleted (closing Chromium) when dropped.
struct Session {
    addr: SocketAddr,
    id: String,
}

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (status, v) = wd_http(
            self.addr,
            method,
            &format!("/session/{}{path}", self.id),
            body.as_ref(),
        );
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(format!("{method} {path}: HTTP {status}: {v}"))
        }
    }

    fn find(&self, css: &str) -> Result<String, String> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no element id in {v}"))
    }

    /// Retries `f` until it succeeds (elements re-render on live updates) or 30 s pass.
    fn retry<T>(&self, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
        let start = Instant::now();
        loop {
            match f() {
                Ok(v) => return v,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    panic!("{what}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    fn click(&self, css: &str) {
        self.retry(&format!("click {css}"), || {
            let e = self.find(css)?;
            self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
        });
    }

    fn type_into(&self, css: &str, text: &str) {
        self.retry(&format!("type into {css}"), || {
            let e = self.find(css)?;
            self.cmd(
                "POST",
                &format!("/element/{e}/value"),
                Some(json!({ "text": text })),
            )
        });
    }

    fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .unwrap()
    }

    fn wait_until(&self, what: &str, script: &str) {
        self.retry(what, || {
            if self.eval(script) == json!(true) {
                Ok(())
            } else {
                Err("not yet".into())
            }
        });
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = wd_http(self.addr, "DELETE", &format!("/session/{}", self.id), None);
    }
}

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn item_css(id: &str) -> String {
    format!("section.item[data-id=\"{id}\"]")
}

#[test]
fn approve_deny_and_partly_approve_in_headless_chromium() {
    let required = std::env::var("VMCP_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
    let driver = find_program("VMCP_CHROMEDRIVER", &["chromedriver"]);
    let chromium = find_program(
        "VMCP_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let (Some(driver), Some(chromium)) = (driver, chromium) else {
        assert!(
            !required,
            "VMCP_REQUIRE_BROWSER=1 but chromedriver or chromium is missing: run scripts/install-deps"
        );
        vmcp_test_support::skipped!(
            "SKIPPED: approval page browser test: chromedriver or chromium not found (scripts/install-deps installs them)"
        );
        return;
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();

    // chromedriver on a free port, owned by this process (dies with it, with Chromium).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = tokio::process::Command::new(&driver);
    cmd.arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _driver = vmcp_host_process::spawn_owned(cmd, Default::default()).unwrap();
    let wd: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let start = Instant::now();
    loop {
        if TcpStream::connect(wd).is_ok()
            && wd_http(wd, "GET", "/status", None).1["value"]["ready"] == json!(true)
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "chromedriver did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let profile = tempfile::tempdir().unwrap();
    let (status, v) = wd_http(
        wd,
        "POST",
        "/session",
        Some(&json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--window-size=1100,1500",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}})),
    );
    assert_eq!(status, 200, "cannot start a Chromium session: {v}");
    let s = Session {
        addr: wd,
        id: v["value"]["sessionId"].as_str().unwrap().to_owned(),
    };

    // Three crossings from three sandboxes.
    let broker = Broker::new(BrokerConfig::default().with_timeout(Duration::from_secs(300)));
    let ui = rt
        .block_on(ApprovalUi::start(
            "127.0.0.1:0".parse().unwrap(),
            broker.clone(),
        ))
        .unwrap();

    let named = |prefix: &str| tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let host = named("hello-project-");
    let staged = named("hello-project-copy-");
    let main_rs = "use std::env;\n\nfn main() {\n    let name = env::args().nth(1).unwrap_or_default();\n    println!(\"hello {name}\");\n}\n";
    for root in [host.path(), staged.path()] {
        write(root, "src/main.rs", main_rs);
        write(root, "old.txt", "to be removed\n");
    }
    write(
        staged.path(),
        "src/main.rs",
        &main_rs.replace("println!(\"hello {name}\");", "if name.is_empty() {\n        eprintln!(\"usage: hello NAME\");\n        std::process::exit(2);\n    }\n    println!(\"hello, {name}!\");"),
    );
    write(
        staged.path(),
        "notes/todo.md",
        "# TODO\n\n- handle a missing name\n",
    );
    write(
        staged.path(),
        "build.log",
        "cc -O2 ... <script>alert(1)</script>\n",
    );
    std::fs::remove_file(staged.path().join("old.txt")).unwrap();
    let changes = ChangeSet::between(host.path(), staged.path(), &ChangeLimits::default()).unwrap();
    assert_eq!(changes.entries.len(), 4);

    let readme_host = named("docs-site-");
    let readme_staged = named("docs-site-copy-");
    write(readme_host.path(), "README.md", "# hello\n");
    write(
        readme_staged.path(),
        "README.md",
        "# hello\n\nRun `hello NAME`.\n",
    );
    let readme = ChangeSet::between(
        readme_host.path(),
        readme_staged.path(),
        &ChangeLimits::default(),
    )
    .unwrap();

    let submit = |crossing: Crossing, context: &str| {
        let b = broker.clone();
        let opts = SubmitOptions::default().with_context(context);
        rt.spawn(async move { b.submit_with(crossing, opts).await })
    };
    let t_partial = submit(
        Crossing::ShareChanges {
            sandbox: "agent-1".into(),
            host_dir: host.path().to_owned(),
            changes: changes.clone(),
        },
        "tools/call run: cargo fix && make",
    );
    let t_deny = submit(
        Crossing::Egress {
            sandbox: "agent-2".into(),
            host: "telemetry.example.net".into(),
            port: 443,
        },
        "tools/call run: npm install",
    );
    let t_approve = submit(
        Crossing::ShareChanges {
            sandbox: "agent-3".into(),
            host_dir: readme_host.path().to_owned(),
            changes: readme,
        },
        "tools/call write_file README.md",
    );
    let wait_pending = |n: usize| {
        let start = Instant::now();
        while broker.pending().len() != n {
            assert!(start.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_pending(3);
    let id = |sandbox: &str| {
        broker
            .pending()
            .into_iter()
            .find(|p| p.crossing.sandbox() == sandbox)
            .unwrap()
            .id
    };
    let (id1, id2, id3) = (id("agent-1"), id("agent-2"), id("agent-3"));

    s.cmd("POST", "/url", Some(json!({ "url": ui.url() })))
        .unwrap();
    s.wait_until(
        "three items on the page",
        "return document.querySelectorAll('#live .item').length === 3 && document.getElementById('status').textContent === 'live';",
    );
    // The hostile log line is shown as text, not run.
    let shown = s.eval("return document.body.innerText.includes('<script>alert(1)</script>');");
    assert_eq!(shown, json!(true));

    // Deny the egress with a reason.
    s.type_into(&format!("{} input.reason", item_css(&id2)), "no telemetry");
    s.click(&format!("{} button[data-act=\"deny\"]", item_css(&id2)));
    let d = rt
        .block_on(tokio::time::timeout(Duration::from_secs(30), t_deny))
        .unwrap()
        .unwrap();
    assert_eq!(d, Decision::deny("no telemetry"));

    // Approve the README change.
    s.click(&format!("{} button[data-act=\"approve\"]", item_css(&id3)));
    let d = rt
        .block_on(tokio::time::timeout(Duration::from_secs(30), t_approve))
        .unwrap()
        .unwrap();
    assert_eq!(d, Decision::Approved);

    // Untick build.log; the live update must not lose that.
    s.click(&format!(
        "{} input.file[value=\"build.log\"]",
        item_css(&id1)
    ));
    s.wait_until(
        "one item left, two in the history",
        "return document.querySelectorAll('#live .item').length === 1 && document.querySelectorAll('table.history tr').length === 3;",
    );
    let unticked = s.eval(&format!(
        "return document.querySelector('{} input.file[value=\"build.log\"]').checked;",
        item_css(&id1).replace('\'', "\\'")
    ));
    assert_eq!(
        unticked,
        json!(false),
        "the live refresh lost the unticked box"
    );

    let png = s.cmd("GET", "/screenshot", None).unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::create_dir_all(root.join("target")).unwrap();
    std::fs::write(root.join("target/approval.png"), &png).unwrap();
    if std::env::var("VMCP_UPDATE_DOCS").is_ok_and(|v| v == "1") {
        std::fs::write(root.join("docs/approval.png"), &png).unwrap();
    }

    // Approve the ticked files only.
    s.click(&format!(
        "{} button[data-act=\"approve-files\"]",
        item_css(&id1)
    ));
    let d = rt
        .block_on(tokio::time::timeout(Duration::from_secs(30), t_partial))
        .unwrap()
        .unwrap();
    let want: std::collections::BTreeSet<String> = ["notes/todo.md", "old.txt", "src/main.rs"]
        .map(String::from)
        .into();
    assert_eq!(d, Decision::ApprovedFiles { files: want });
    s.wait_until(
        "the history shows the partial approval",
        "return document.body.innerText.includes('approved 3 file(s)') && document.querySelectorAll('#live .item').length === 0;",
    );
    assert_eq!(broker.history()[0].by, "page");

    // Apply it: build.log never reaches the host directory.
    let report = changes
        .apply(host.path(), staged.path(), d.file_selection().as_ref())
        .unwrap();
    assert_eq!(report.applied.len(), 3, "{report:?}");
    assert!(!host.path().join("build.log").exists());
    assert!(!host.path().join("old.txt").exists());
    assert!(std::fs::read_to_string(host.path().join("src/main.rs"))
        .unwrap()
        .contains("usage: hello NAME"));
    drop(s);
}

//! A fake guest that runs a few pretend programs, for tests of the sandbox tools without VMs.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::collapsible_match
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio::io::DuplexStream;
use vmcp_guest_proto::{
    read_msg_async, write_msg_async, Capabilities, ExitStatus, FailureKind, GuestMsg, Hello,
    HostMsg, PROTOCOL_VERSION,
};
use vmcp_mcp_server::{CallContext, ToolOutput, ToolSet};
use vmcp_sandbox::manager::{
    Booted, FactoryError, Limits, Manager, SandboxError, VmFactory, VmSpec,
};
use vmcp_sandbox::tools::SandboxTools;
use vmcp_vm::fake::{FakeBackend, Faults, GuestRam};
use vmcp_vm::{Backend, Vm, VmConfig};

/// Programs:
/// `echo ARGS` prints them; `/bin/sh -c "CMD"` runs CMD split on spaces; `cat` copies stdin;
/// `sleep` waits for a signal; `flood N` prints N bytes; `fail` prints `boom` to stderr and
/// exits 1; `find P ...` lists two fake entries (fails for `/missing`); `env` prints the env;
/// `pwd` prints the cwd. Anything else is "not found". Files live in `ram` (the guest's
/// memory, which checkpoints carry); a re-key writes the hostname to `/etc/hostname`.
pub async fn guest(mut s: DuplexStream, token: String, ram: GuestRam) {
    let hello = |token: String| {
        GuestMsg::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "fake-exec".into(),
            capabilities: Capabilities(
                Capabilities::FILES
                    | Capabilities::EXEC
                    | Capabilities::SIGNAL
                    | Capabilities::REKEY,
            ),
            token,
            boot_ns: 0,
        })
    };
    if write_msg_async(&mut s, &hello(token)).await.is_err() {
        return;
    }
    // exec id -> "cat" | "sleep"
    let mut running: HashMap<u32, &'static str> = HashMap::new();
    let mut buf = Vec::new();
    let mut pid = 100;
    while let Ok(Some(msg)) = read_msg_async::<HostMsg, _>(&mut s, &mut buf).await {
        if let HostMsg::Poweroff { id } = msg {
            let _ = write_msg_async(&mut s, &GuestMsg::Done { id }).await;
            return;
        }
        let mut out: Vec<GuestMsg> = Vec::new();
        {
            let mut files = ram.lock().unwrap();
            match msg {
                HostMsg::Rekey(r) => {
                    files.insert("/etc/hostname".into(), r.hostname.into_bytes());
                    out.push(hello(r.token));
                }
                HostMsg::Ping { id } => out.push(GuestMsg::Pong { id }),
                HostMsg::WriteFile {
                    id,
                    path,
                    offset,
                    data,
                    ..
                } => {
                    if path.starts_with("/ro/") {
                        out.push(GuestMsg::Failed {
                            id,
                            kind: FailureKind::PermissionDenied,
                            message: format!("{path}: read-only"),
                        });
                    } else {
                        let f = files.entry(path).or_default();
                        f.truncate(offset as usize);
                        f.extend_from_slice(&data);
                        out.push(GuestMsg::Done { id });
                    }
                }
                HostMsg::ReadFile { id, path } if path == "/big" => {
                    for _ in 0..100 {
                        out.push(GuestMsg::FileData {
                            id,
                            data: vec![b'b'; 1000],
                            eof: false,
                        });
                    }
                    out.push(GuestMsg::FileData {
                        id,
                        data: Vec::new(),
                        eof: true,
                    });
                }
                HostMsg::ReadFile { id, path } => match files.get(&path) {
                    Some(data) => {
                        for c in data.chunks(1000) {
                            out.push(GuestMsg::FileData {
                                id,
                                data: c.to_vec(),
                                eof: false,
                            });
                        }
                        out.push(GuestMsg::FileData {
                            id,
                            data: Vec::new(),
                            eof: true,
                        });
                    }
                    None => out.push(GuestMsg::Failed {
                        id,
                        kind: FailureKind::NotFound,
                        message: format!("{path}: no such file"),
                    }),
                },
                HostMsg::Exec(req) => {
                    let id = req.id;
                    let mut argv = req.argv.clone();
                    if argv.len() == 3 && argv[0] == "/bin/sh" && argv[1] == "-c" {
                        argv = argv[2].split_whitespace().map(str::to_owned).collect();
                    }
                    let prog = argv.first().cloned().unwrap_or_default();
                    let known = [
                        "echo", "cat", "sleep", "flood", "fail", "find", "env", "pwd",
                    ];
                    if !known.contains(&prog.as_str()) {
                        out.push(GuestMsg::Failed {
                            id,
                            kind: FailureKind::NotFound,
                            message: format!("{prog}: not found"),
                        });
                    } else {
                        pid += 1;
                        out.push(GuestMsg::Started { id, pid });
                        let exit = |code| GuestMsg::Exited {
                            id,
                            status: ExitStatus::Code(code),
                        };
                        match prog.as_str() {
                            "echo" => {
                                out.push(GuestMsg::Stdout {
                                    id,
                                    data: format!("{}\n", argv[1..].join(" ")).into_bytes(),
                                });
                                out.push(exit(0));
                            }
                            "env" => {
                                let text: String =
                                    req.env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
                                out.push(GuestMsg::Stdout {
                                    id,
                                    data: text.into_bytes(),
                                });
                                out.push(exit(0));
                            }
                            "pwd" => {
                                out.push(GuestMsg::Stdout {
                                    id,
                                    data: format!("{}\n", req.cwd.unwrap_or("/".into()))
                                        .into_bytes(),
                                });
                                out.push(exit(0));
                            }
                            "flood" => {
                                let mut n: usize =
                                    argv.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
                                while n > 0 {
                                    let c = n.min(60_000);
                                    out.push(GuestMsg::Stdout {
                                        id,
                                        data: vec![b'x'; c],
                                    });
                                    n -= c;
                                }
                                out.push(exit(0));
                            }
                            "fail" => {
                                out.push(GuestMsg::Stderr {
                                    id,
                                    data: b"boom\n".to_vec(),
                                });
                                out.push(exit(1));
                            }
                            "find" => {
                                if argv.get(1).map(String::as_str) == Some("/missing") {
                                    out.push(GuestMsg::Stderr {
                                        id,
                                        data: b"find: /missing: No such file or directory\n"
                                            .to_vec(),
                                    });
                                    out.push(exit(1));
                                } else {
                                    out.push(GuestMsg::Stdout { id, data: b"regular file|5|644|1700000000|/etc/hosts\ndirectory|0|755|1700000001|/etc/ssl\n".to_vec() });
                                    out.push(exit(0));
                                }
                            }
                            "cat" => {
                                running.insert(id, "cat");
                            }
                            _ => {
                                running.insert(id, "sleep");
                            }
                        }
                    }
                }
                HostMsg::Stdin { id, data } => {
                    if running.get(&id) == Some(&"cat") {
                        out.push(GuestMsg::Stdout { id, data });
                    }
                }
                HostMsg::StdinEof { id } => {
                    if running.get(&id) == Some(&"cat") {
                        running.remove(&id);
                        out.push(GuestMsg::Exited {
                            id,
                            status: ExitStatus::Code(0),
                        });
                    }
                }
                HostMsg::Signal { id, signal } => {
                    if running.remove(&id).is_some() {
                        out.push(GuestMsg::Exited {
                            id,
                            status: ExitStatus::Signal(signal),
                        });
                    }
                }
                _ => {}
            }
        }
        for m in out {
            if write_msg_async(&mut s, &m).await.is_err() {
                return;
            }
        }
    }
}

/// A factory of fake VMs running [`guest`]; counts VMs alive.
pub struct FakeFactory {
    backend: FakeBackend,
    files: tempfile::TempDir,
    pub alive: Arc<AtomicUsize>,
    pub created: AtomicUsize,
    /// The `network` of every VM created, as text.
    pub nets: std::sync::Mutex<Vec<String>>,
    /// When set, `boot` reports this as progress and as a notice of the VM (what the CLI's
    /// factory does for a snapshot build or a cold boot).
    pub boot_note: std::sync::Mutex<Option<String>>,
}

struct Counted(Box<dyn Vm>, Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Vm for Counted {
    fn id(&self) -> &str {
        self.0.id()
    }
    fn state(&self) -> vmcp_vm::VmState {
        self.0.state()
    }
    fn capabilities(&self) -> vmcp_vm::VmCapabilities {
        self.0.capabilities()
    }
    fn runtime_dir(&self) -> &std::path::Path {
        self.0.runtime_dir()
    }
    async fn start(&mut self) -> Result<(), vmcp_vm::VmError> {
        self.0.start().await
    }
    async fn wait_ready(&mut self, t: Duration) -> Result<vmcp_vm::AgentInfo, vmcp_vm::VmError> {
        self.0.wait_ready(t).await
    }
    fn agent(&self) -> Result<vmcp_vm::agent::AgentClient, vmcp_vm::VmError> {
        self.0.agent()
    }
    async fn shutdown(
        &mut self,
        t: Duration,
    ) -> Result<vmcp_vm::ShutdownOutcome, vmcp_vm::VmError> {
        self.0.shutdown(t).await
    }
    async fn kill(&mut self) -> Result<(), vmcp_vm::VmError> {
        self.0.kill().await
    }
    async fn checkpoint(&mut self) -> Result<vmcp_vm::Checkpoint, vmcp_vm::VmError> {
        self.0.checkpoint().await
    }
    async fn rewind(
        &mut self,
        c: &vmcp_vm::Checkpoint,
        t: Duration,
    ) -> Result<vmcp_vm::AgentInfo, vmcp_vm::VmError> {
        self.0.rewind(c, t).await
    }
    async fn fork(
        &self,
        c: &vmcp_vm::Checkpoint,
        n: usize,
        t: Duration,
    ) -> Result<Vec<Box<dyn Vm>>, vmcp_vm::VmError> {
        let forks = self.0.fork(c, n, t).await?;
        Ok(forks
            .into_iter()
            .map(|vm| {
                self.1.fetch_add(1, Ordering::SeqCst);
                Box::new(Counted(vm, self.1.clone())) as Box<dyn Vm>
            })
            .collect())
    }
}

impl FakeFactory {
    pub fn new(faults: Faults) -> Arc<FakeFactory> {
        let files = tempfile::tempdir().unwrap();
        std::fs::write(files.path().join("kernel"), b"k").unwrap();
        std::fs::write(files.path().join("initrd"), b"i").unwrap();
        Arc::new(FakeFactory {
            files,
            backend: FakeBackend::with_ram(Arc::new(|s, t, r| Box::pin(guest(s, t, r))), faults),
            alive: Arc::new(AtomicUsize::new(0)),
            created: AtomicUsize::new(0),
            nets: std::sync::Mutex::new(Vec::new()),
            boot_note: std::sync::Mutex::new(None),
        })
    }
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl VmFactory for FakeFactory {
    async fn create(&self, spec: VmSpec) -> Result<Box<dyn Vm>, FactoryError> {
        let mut c = VmConfig::new(
            self.files.path().join("kernel"),
            self.files.path().join("initrd"),
        );
        c.cpus = spec.cpus;
        c.memory_mib = spec.memory_mib;
        self.nets.lock().unwrap().push(spec.net.to_string());
        let vm = self.backend.create(c).await?;
        self.alive.fetch_add(1, Ordering::SeqCst);
        self.created.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Counted(vm, self.alive.clone())))
    }

    async fn boot(
        &self,
        spec: VmSpec,
        timeout: Duration,
        progress: &(dyn for<'s> Fn(&'s str) + Send + Sync),
    ) -> Result<Booted, SandboxError> {
        let note = self.boot_note.lock().unwrap().clone();
        if let Some(n) = &note {
            progress(n);
        }
        let mut vm = self.create(spec).await.map_err(SandboxError::Create)?;
        vm.start().await.map_err(SandboxError::Boot)?;
        vm.wait_ready(timeout).await.map_err(SandboxError::Boot)?;
        let mut booted = Booted::new(vm);
        booted.notices.extend(note);
        Ok(booted)
    }
}

pub fn tools(factory: Arc<FakeFactory>, tweak: impl FnOnce(&mut Limits)) -> SandboxTools {
    let mut l = Limits::default();
    l.reap_every = Duration::from_millis(20);
    tweak(&mut l);
    SandboxTools::new(Manager::new(factory, l))
}

pub fn ctx(session: Option<&str>) -> CallContext {
    let mut c = CallContext::detached();
    c.session = session.map(Arc::from);
    c
}

/// Calls a tool; arguments are validated as the server would.
pub async fn call(
    t: &SandboxTools,
    name: &str,
    args: Value,
    ctx: CallContext,
) -> Result<Value, String> {
    let def = t
        .tools()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no tool {name}"));
    vmcp_mcp_server::schema::validate(&def.input_schema, &args)?;
    let Value::Object(args) = args else { panic!() };
    match t.call(name, args, ctx).await {
        ToolOutput::Ok { structured, .. } => {
            if let Some(schema) = &def.output_schema {
                vmcp_mcp_server::schema::validate(schema, &structured)
                    .unwrap_or_else(|e| panic!("{name} output breaks its schema: {e}"));
            }
            Ok(structured)
        }
        ToolOutput::Err(e) => Err(e),
        other => panic!("{other:?}"),
    }
}

pub async fn create(t: &SandboxTools, session: Option<&str>) -> String {
    let r = call(t, "sandbox_create", json!({}), ctx(session))
        .await
        .unwrap();
    r["sandbox_id"].as_str().unwrap().to_owned()
}

pub fn map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!(),
    }
}

pub async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f(), "timed out waiting for: {what}");
}

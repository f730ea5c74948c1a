//! The sandbox tools: schemas, argument handling and results, over a [`Manager`].
//!
//! Output caps: `sandbox_exec` and `run` return at most [`Limits::max_output`] bytes of stdout
//! and as much of stderr; the rest is counted (`stdout_truncated_bytes`) and a marker line
//! `[vmcp: stdout truncated: N more bytes not shown (limit L bytes)]` ends the text. Files are
//! limited to [`Limits::max_file`] bytes per call; `sandbox_exec_poll` returns at most
//! `max_bytes` (default and largest: [`Limits::max_output`]) per call.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Map, Value};
use vmcp_guest_proto::{ExitStatus, FailureKind};
use vmcp_mcp_server::tool::{Annotations, BoxFuture};
use vmcp_mcp_server::{CallContext, ToolDef, ToolOutput, ToolSet};
use vmcp_vm::agent::{AgentError, ExecSpec, ProcessEvent};
use vmcp_vm::NetMode;

use crate::manager::{CreateRequest, ForkFrom, Limits, Manager, Sandbox, SandboxError, VmSpec};
use crate::output::Capped;

/// Longest `wait_ms` of `sandbox_exec_poll`.
pub const MAX_POLL_WAIT_MS: u64 = 30_000;
/// Most entries `sandbox_list_files` returns.
pub const MAX_LIST_ENTRIES: usize = 5_000;

const NOT_YET_IMAGE: &str = "not available yet: only the built-in guest image can be used (images are not offered through MCP yet); leave `image` out";

/// The sandbox tool set.
#[derive(Clone, Debug)]
pub struct SandboxTools {
    manager: Manager,
}

impl SandboxTools {
    /// Tools over `manager`.
    pub fn new(manager: Manager) -> Self {
        SandboxTools { manager }
    }

    /// The manager.
    pub fn manager(&self) -> &Manager {
        &self.manager
    }
}

fn id_prop() -> Value {
    json!({"type": "string", "description": "Sandbox id from sandbox_create", "maxLength": 64})
}

fn command_props(p: &mut Map<String, Value>) {
    p.insert("command".into(), json!({"type": "string", "description": "Shell command line, run with /bin/sh -c (give this or argv)", "maxLength": 65536}));
    p.insert("argv".into(), json!({"type": "array", "items": {"type": "string", "maxLength": 65536}, "maxItems": 4096, "description": "Program and arguments, no shell (give this or command)"}));
    p.insert("env".into(), json!({"type": "object", "additionalProperties": {"type": "string", "maxLength": 65536}, "maxProperties": 256, "description": "Extra environment variables"}));
    p.insert("cwd".into(), json!({"type": "string", "description": "Working directory (absolute; default /)", "maxLength": 4096}));
}

fn vm_props(p: &mut Map<String, Value>, l: &Limits) {
    p.insert("cpus".into(), json!({"type": "integer", "minimum": 1, "maximum": l.max_cpus, "description": "Virtual CPUs (default 1)"}));
    p.insert("memory_mib".into(), json!({"type": "integer", "minimum": vmcp_vm::MIN_MEMORY_MIB, "maximum": l.max_memory_mib, "description": "Guest memory in MiB (default 256)"}));
    p.insert("network".into(), json!({"type": ["string", "boolean"], "maxLength": 16384, "description": network_description(l)}));
    p.insert("image".into(), json!({"type": "string", "maxLength": 256, "description": format!("Guest image; {NOT_YET_IMAGE}")}));
}

fn network_description(l: &Limits) -> String {
    let allow = match &l.net_ceiling {
        Some(cap) => format!("\"allow=HOST[:PORT],...\": only these hosts (names, *.suffix, IP addresses, CIDR ranges), through vmcp's egress proxy; HTTP_PROXY/HTTPS_PROXY are set for every command and refused connections are reported in sandbox_exec results. This server permits allow lists within: {cap}"),
        None => "This server permits no allow-listed network (the user starts it with --net-allow to permit one)".into(),
    };
    let nat = if l.allow_nat {
        "\"nat\": unrestricted outbound network (permitted by this server)"
    } else {
        "\"nat\" (unrestricted) is not permitted by this server"
    };
    format!("Guest network: \"none\" or false (default: no network device). {allow}. {nat}.")
}

fn object(props: Map<String, Value>, required: &[&str]) -> Value {
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

fn exec_output_schema() -> Value {
    json!({"type": "object", "properties": {
        "exit_code": {"type": ["integer", "null"], "description": "Exit code, null when killed by a signal"},
        "signal": {"type": ["integer", "null"], "description": "Signal that killed it"},
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "stdout_truncated_bytes": {"type": "integer"},
        "stderr_truncated_bytes": {"type": "integer"},
        "timed_out": {"type": "boolean"},
        "duration_ms": {"type": "integer"},
        "egress_denied": {"type": "array", "items": {"type": "string"}, "description": "Connections the egress policy refused since the previous call (allow-listed network)"},
        "notices": {"type": "array", "items": {"type": "string"}, "description": "How the VM started (run only)"}
    }, "required": ["exit_code", "signal", "stdout", "stderr", "stdout_truncated_bytes", "stderr_truncated_bytes", "timed_out", "duration_ms"]})
}

const SIGNALS: &[(&str, i32)] = &[
    ("SIGHUP", 1),
    ("SIGINT", 2),
    ("SIGQUIT", 3),
    ("SIGKILL", 9),
    ("SIGUSR1", 10),
    ("SIGUSR2", 12),
    ("SIGTERM", 15),
    ("SIGCONT", 18),
    ("SIGSTOP", 19),
];

impl SandboxTools {
    fn defs(&self) -> Vec<ToolDef> {
        let l = self.manager.limits();
        let mut defs = Vec::new();

        let mut p = Map::new();
        vm_props(&mut p, l);
        p.insert("idle_timeout_secs".into(), json!({"type": "integer", "minimum": 1, "maximum": l.max_lifetime.as_secs(), "description": format!("Destroy the sandbox after this long without a call (default {})", l.default_idle.as_secs())}));
        p.insert("timeout_secs".into(), json!({"type": "integer", "minimum": 1, "maximum": l.max_lifetime.as_secs(), "description": format!("Destroy the sandbox this long after creation (default {})", l.default_lifetime.as_secs())}));
        defs.push(ToolDef::new(
            "sandbox_create",
            "Create a sandbox",
            format!("Starts a fresh micro-VM (Linux, busybox userland, no network unless `network` asks for one) and returns its id. State (files, processes) persists across calls until sandbox_destroy, the idle timeout, the lifetime, or {}s after the client session ends. At most {} sandboxes and {} MiB of guest memory at once.", l.session_grace.as_secs(), l.max_sandboxes, l.memory_budget_mib),
            object(p, &[]),
            Some(json!({"type": "object", "properties": {"sandbox_id": {"type": "string"}, "cpus": {"type": "integer"}, "memory_mib": {"type": "integer"}, "boot_ms": {"type": "integer"}, "network": {"type": "string"}, "notices": {"type": "array", "items": {"type": "string"}}}, "required": ["sandbox_id", "cpus", "memory_mib", "boot_ms", "network", "notices"]})),
            Annotations::additive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        command_props(&mut p);
        p.insert("stdin".into(), json!({"type": "string", "maxLength": l.max_file, "description": "Text fed to the program's stdin (default: empty)"}));
        p.insert("timeout_secs".into(), json!({"type": "number", "minimum": 0.001, "maximum": l.max_lifetime.as_secs(), "description": format!("Kill the program after this long (default {})", l.default_exec_timeout.as_secs())}));
        defs.push(ToolDef::new(
            "sandbox_exec",
            "Run a command in a sandbox",
            format!("Runs a command to completion and returns stdout, stderr and the exit code. Output beyond {} bytes per stream is cut, with a truncation marker. Progress notifications carry output as it arrives. Cancelling the call kills the process.", l.max_output),
            object(p, &["sandbox_id"]),
            Some(exec_output_schema()),
            Annotations::destructive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        command_props(&mut p);
        p.insert("stdin_open".into(), json!({"type": "boolean", "description": "Keep stdin open for sandbox_exec_write_stdin (default false: stdin is empty)"}));
        defs.push(ToolDef::new(
            "sandbox_exec_start",
            "Start a background process",
            format!("Starts a long-running process and returns its process id at once; read its output with sandbox_exec_poll (the last {} bytes are kept), feed it with sandbox_exec_write_stdin, stop it with sandbox_exec_signal. It keeps running across client reconnects.", l.process_buffer),
            object(p, &["sandbox_id"]),
            Some(json!({"type": "object", "properties": {"process_id": {"type": "string"}, "pid": {"type": "integer"}}, "required": ["process_id", "pid"]})),
            Annotations::destructive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        p.insert(
            "process_id".into(),
            json!({"type": "string", "maxLength": 32}),
        );
        p.insert("cursor".into(), json!({"type": "integer", "minimum": 0, "description": "Output position from the previous poll's next_cursor (default 0: from the start)"}));
        p.insert("wait_ms".into(), json!({"type": "integer", "minimum": 0, "maximum": MAX_POLL_WAIT_MS, "description": "Wait up to this long for new output or the exit (default 0)"}));
        p.insert("max_bytes".into(), json!({"type": "integer", "minimum": 1, "maximum": l.max_output, "description": "Most output bytes to return"}));
        defs.push(ToolDef::new(
            "sandbox_exec_poll",
            "Read a background process's output",
            "Returns the output written since `cursor` (stdout and stderr separately), the cursor to pass next, and the exit status once the process ended and all its output was read. Polling again with the same cursor returns the same output, so a client that lost an answer (reconnect) can repeat it. Connections the egress policy refused since the previous call are listed in egress_denied.",
            object(p, &["sandbox_id", "process_id"]),
            Some(json!({"type": "object", "properties": {
                "stdout": {"type": "string"}, "stderr": {"type": "string"}, "next_cursor": {"type": "integer"},
                "missed_bytes": {"type": "integer"}, "more": {"type": "boolean"}, "running": {"type": "boolean"},
                "exit_code": {"type": ["integer", "null"]}, "signal": {"type": ["integer", "null"]}, "error": {"type": ["string", "null"]},
                "egress_denied": {"type": "array", "items": {"type": "string"}, "description": "Connections the egress policy refused since the previous call (allow-listed network)"}},
                "required": ["stdout", "stderr", "next_cursor", "missed_bytes", "more", "running", "exit_code", "signal", "error", "egress_denied"]})),
            Annotations::read_only(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        p.insert(
            "process_id".into(),
            json!({"type": "string", "maxLength": 32}),
        );
        p.insert("data".into(), json!({"type": "string", "maxLength": l.max_file, "description": "Text to write (default empty)"}));
        p.insert(
            "close".into(),
            json!({"type": "boolean", "description": "Close stdin afterwards (end of input)"}),
        );
        defs.push(ToolDef::new(
            "sandbox_exec_write_stdin",
            "Write to a background process's stdin",
            "Writes text to the stdin of a process started with stdin_open, and optionally closes it.",
            object(p, &["sandbox_id", "process_id"]),
            Some(json!({"type": "object", "properties": {"written": {"type": "integer"}, "closed": {"type": "boolean"}}, "required": ["written", "closed"]})),
            Annotations::destructive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        p.insert(
            "process_id".into(),
            json!({"type": "string", "maxLength": 32}),
        );
        p.insert("signal".into(), json!({"enum": SIGNALS.iter().map(|(n, _)| *n).collect::<Vec<_>>(), "description": "Signal (default SIGTERM)"}));
        defs.push(ToolDef::new(
            "sandbox_exec_signal",
            "Signal a background process",
            "Sends a signal to a background process (default SIGTERM); poll to see it end.",
            object(p, &["sandbox_id", "process_id"]),
            Some(json!({"type": "object", "properties": {"signal": {"type": "integer"}}, "required": ["signal"]})),
            Annotations::destructive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        p.insert("path".into(), json!({"type": "string", "minLength": 1, "maxLength": 4096, "description": "Absolute path in the guest"}));
        p.insert("encoding".into(), json!({"enum": ["text", "base64"], "description": "text (UTF-8, invalid bytes replaced; default) or base64"}));
        defs.push(ToolDef::new(
            "sandbox_read_file",
            "Read a file from a sandbox",
            format!("Returns a file's contents (at most {} bytes).", l.max_file),
            object(p, &["sandbox_id", "path"]),
            Some(json!({"type": "object", "properties": {"content": {"type": "string"}, "encoding": {"type": "string"}, "size": {"type": "integer"}}, "required": ["content", "encoding", "size"]})),
            Annotations::read_only(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        p.insert("path".into(), json!({"type": "string", "minLength": 1, "maxLength": 4096, "description": "Absolute path in the guest; the directory must exist"}));
        p.insert("content".into(), json!({"type": "string", "maxLength": l.max_file.saturating_mul(4) / 3 + 4, "description": "File contents"}));
        p.insert("encoding".into(), json!({"enum": ["text", "base64"], "description": "How content is given (default text)"}));
        p.insert("mode".into(), json!({"type": "integer", "minimum": 0, "maximum": 4095, "description": "Permission bits of a new file, e.g. 493 for 0755 (default 420, 0644)"}));
        defs.push(ToolDef::new(
            "sandbox_write_file",
            "Write a file into a sandbox",
            format!("Creates or replaces a file (at most {} bytes).", l.max_file),
            object(p, &["sandbox_id", "path", "content"]),
            Some(json!({"type": "object", "properties": {"size": {"type": "integer"}}, "required": ["size"]})),
            Annotations::destructive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        p.insert("path".into(), json!({"type": "string", "minLength": 1, "maxLength": 4096, "description": "Absolute directory path (default /)"}));
        defs.push(ToolDef::new(
            "sandbox_list_files",
            "List a directory in a sandbox",
            format!("Lists the entries of one directory: name, type, size, mode, modification time (at most {MAX_LIST_ENTRIES} entries)."),
            object(p, &["sandbox_id"]),
            Some(json!({"type": "object", "properties": {"path": {"type": "string"}, "entries": {"type": "array"}, "truncated": {"type": "boolean"}}, "required": ["path", "entries", "truncated"]})),
            Annotations::read_only(),
        ));

        defs.push(ToolDef::new(
            "sandbox_list",
            "List sandboxes",
            "Lists the live sandboxes of this server and the limits.",
            object(Map::new(), &[]),
            Some(json!({"type": "object", "properties": {"sandboxes": {"type": "array"}, "limits": {"type": "object"}}, "required": ["sandboxes", "limits"]})),
            Annotations::read_only(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        defs.push(ToolDef::new(
            "sandbox_destroy",
            "Destroy a sandbox",
            "Kills the sandbox's VM; its files and processes are gone.",
            object(p, &["sandbox_id"]),
            Some(json!({"type": "object", "properties": {"destroyed": {"type": "boolean"}}, "required": ["destroyed"]})),
            Annotations::destructive().with_idempotent(true),
        ));

        let mut p = Map::new();
        vm_props(&mut p, l);
        command_props(&mut p);
        p.insert("stdin".into(), json!({"type": "string", "maxLength": l.max_file, "description": "Text fed to the program's stdin"}));
        p.insert("timeout_secs".into(), json!({"type": "number", "minimum": 0.001, "maximum": l.max_lifetime.as_secs(), "description": format!("Kill the program after this long (default {})", l.default_exec_timeout.as_secs())}));
        defs.push(ToolDef::new(
            "run",
            "Run a command in a fresh VM",
            format!("Boots a fresh micro-VM, runs one command, returns its output (at most {} bytes per stream) and exit code, and destroys the VM. Nothing persists.", l.max_output),
            object(p, &[]),
            Some(exec_output_schema()),
            Annotations::additive(),
        ));

        let checkpoint_prop = || json!({"type": "string", "description": "Checkpoint id from sandbox_checkpoint", "maxLength": 64});
        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        defs.push(ToolDef::new(
            "sandbox_checkpoint",
            "Checkpoint a sandbox",
            format!("Saves the sandbox's whole state (its memory: files, processes) and returns a checkpoint id for sandbox_rewind and sandbox_fork. The sandbox pauses only while its state is written and then runs on. Sandboxes with a network cannot be checkpointed. At most {} checkpoints per sandbox; they end with their sandbox.", vmcp_vm::lifecycle::MAX_CHECKPOINTS),
            object(p, &["sandbox_id"]),
            Some(json!({"type": "object", "properties": {"checkpoint_id": {"type": "string"}, "sandbox_id": {"type": "string"}, "checkpoint_ms": {"type": "integer"}}, "required": ["checkpoint_id", "sandbox_id", "checkpoint_ms"]})),
            Annotations::additive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), id_prop());
        p.insert("checkpoint_id".into(), checkpoint_prop());
        defs.push(ToolDef::new(
            "sandbox_rewind",
            "Rewind a sandbox",
            "Returns a sandbox to one of its checkpoints: files written since are gone and its background processes end (those that ran at the checkpoint run on from there, without process ids). The sandbox keeps its id; the checkpoint stays usable.",
            object(p, &["sandbox_id", "checkpoint_id"]),
            Some(json!({"type": "object", "properties": {"sandbox_id": {"type": "string"}, "checkpoint_id": {"type": "string"}, "rewind_ms": {"type": "integer"}}, "required": ["sandbox_id", "checkpoint_id", "rewind_ms"]})),
            Annotations::destructive(),
        ));

        let mut p = Map::new();
        p.insert("sandbox_id".into(), json!({"type": "string", "description": "Fork this sandbox as it is now (give this or checkpoint_id)", "maxLength": 64}));
        p.insert("checkpoint_id".into(), json!({"type": "string", "description": "Fork from this checkpoint (give this or sandbox_id)", "maxLength": 64}));
        p.insert("count".into(), json!({"type": "integer", "minimum": 1, "maximum": self.manager.max_fork(), "description": "How many new sandboxes (default 1)"}));
        defs.push(ToolDef::new(
            "sandbox_fork",
            "Fork a sandbox",
            "Starts new sandboxes that continue from a sandbox's current state or from a checkpoint: each has the files and memory of its source, and its own id, hostname and fresh randomness. They count against the sandbox and memory limits like created ones, inherit the source's size and timeouts, and belong to the calling session. All or nothing.",
            object(p, &[]),
            Some(json!({"type": "object", "properties": {"sandbox_ids": {"type": "array", "items": {"type": "string"}}, "fork_ms": {"type": "integer"}}, "required": ["sandbox_ids", "fork_ms"]})),
            Annotations::additive(),
        ));
        defs
    }
}

fn str_arg<'a>(args: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    args.get(k).and_then(Value::as_str)
}

fn u64_arg(args: &Map<String, Value>, k: &str) -> Option<u64> {
    args.get(k)
        .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
}

fn secs_arg(args: &Map<String, Value>, k: &str) -> Option<Duration> {
    args.get(k)
        .and_then(Value::as_f64)
        .filter(|f| f.is_finite() && *f > 0.0)
        .map(Duration::from_secs_f64)
}

fn argv(args: &Map<String, Value>) -> Result<Vec<String>, String> {
    match (args.get("command"), args.get("argv")) {
        (Some(Value::String(c)), None) => Ok(vec!["/bin/sh".into(), "-c".into(), c.clone()]),
        (None, Some(Value::Array(a))) if !a.is_empty() => Ok(a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()),
        (None, Some(_)) => Err("argv: must name a program (it is empty)".into()),
        (Some(_), Some(_)) => {
            Err("command, argv: give one of them (a shell command line or a program with arguments), not both".into())
        }
        _ => Err("command, argv: one is required (a shell command line, or a program with arguments)".into()),
    }
}

fn spec_of(args: &Map<String, Value>, stdin: bool) -> Result<ExecSpec, String> {
    let mut spec = ExecSpec::new(argv(args)?);
    if let Some(Value::Object(env)) = args.get("env") {
        for (k, v) in env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!("env.{k}: not a valid variable name"));
            }
            spec.env
                .push((k.clone(), v.as_str().unwrap_or_default().to_owned()));
        }
    }
    if let Some(cwd) = str_arg(args, "cwd") {
        if !cwd.starts_with('/') {
            return Err(format!("cwd: must be an absolute path, got {cwd:?}"));
        }
        spec.cwd = Some(cwd.to_owned());
    }
    spec.stdin = stdin;
    Ok(spec)
}

fn vm_spec(args: &Map<String, Value>, l: &Limits) -> Result<VmSpec, String> {
    if str_arg(args, "image").is_some() {
        return Err(format!("image: {NOT_YET_IMAGE}"));
    }
    let cpus = u64_arg(args, "cpus").unwrap_or(1);
    let mem = u64_arg(args, "memory_mib").unwrap_or(256);
    Ok(VmSpec::new(
        u32::try_from(cpus).unwrap_or(u32::MAX),
        u32::try_from(mem).unwrap_or(u32::MAX),
    )
    .with_net(net_arg(args, l)?))
}

/// The `network` argument, within what the server permits.
fn net_arg(args: &Map<String, Value>, l: &Limits) -> Result<NetMode, String> {
    let text = match args.get("network") {
        None | Some(Value::Bool(false)) => return Ok(NetMode::None),
        Some(Value::String(s)) => s.trim(),
        Some(_) => {
            return Err(
                "network: say which network: \"none\", \"allow=HOST[:PORT],...\" or \"nat\"".into(),
            )
        }
    };
    let mode: NetMode = text.parse().map_err(|e: vmcp_vm::net::NetError| {
        format!("network: {}", chain(&e).replace("--net ", ""))
    })?;
    match &mode {
        NetMode::Nat if !l.allow_nat => Err(
            "network: nat (unrestricted network) is not permitted by this server; ask for \"allow=HOST[:PORT],...\" with the hosts you need (the user permits nat with `vmcp mcp serve --net-nat`)".into(),
        ),
        NetMode::Allow(asked) => {
            let Some(cap) = &l.net_ceiling else {
                return Err("network: this server permits no network (the user permits an allow list with `vmcp mcp serve --net-allow HOST[:PORT],...`)".into());
            };
            match cap.first_uncovered(asked) {
                Some(rule) => Err(format!(
                    "network: {rule} is not within the allow list this server permits ({cap}); ask only for hosts inside it"
                )),
                None => Ok(mode),
            }
        }
        _ => Ok(mode),
    }
}

fn status_json(status: Option<ExitStatus>) -> (Value, Value) {
    match status {
        Some(ExitStatus::Code(c)) => (json!(c), Value::Null),
        Some(ExitStatus::Signal(s)) => (Value::Null, json!(s)),
        None => (Value::Null, Value::Null),
    }
}

fn agent_failure(program: &str, e: AgentError) -> String {
    match e {
        AgentError::Failed {
            kind: FailureKind::NotFound,
            message,
        } => {
            format!("cannot run {program} in the sandbox: not found ({message})")
        }
        AgentError::Failed {
            kind: FailureKind::PermissionDenied,
            message,
        } => {
            format!("cannot run {program} in the sandbox: not executable ({message})")
        }
        AgentError::Closed => "the sandbox's VM is gone (destroyed or timed out)".into(),
        other => format!("cannot run {program} in the sandbox: {other}"),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Runs one process to its end with caps, timeout, progress and cancellation.
async fn exec_collect(
    sb: &Sandbox,
    spec: ExecSpec,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    max_output: usize,
    ctx: &CallContext,
) -> ToolOutput {
    let agent = sb.agent();
    let program = spec.argv.first().cloned().unwrap_or_default();
    let started = Instant::now();
    // Refusals of the egress proxy while it runs go out as progress at once; the result
    // lists every one not reported before.
    let mut denial_mark = sb.egress_mark();
    let mut denial_tick = tokio::time::interval(DENIAL_POLL);
    let mut process = match agent.exec(spec).await {
        Ok(p) => p,
        Err(e) => return ToolOutput::error(agent_failure(&program, e)),
    };
    if let Some(data) = stdin {
        let ctl = process.control().clone();
        tokio::spawn(async move {
            if ctl.write_stdin(&data).await.is_ok() {
                let _ = ctl.close_stdin().await;
            }
        });
    }
    let mut out = Capped::new(max_output);
    let mut err = Capped::new(max_output);
    let mut timed_out = false;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let status = loop {
        tokio::select! {
            ev = process.next_event() => match ev {
                Ok(Some(ProcessEvent::Stdout(d))) => {
                    ctx.progress(&progress_text("stdout", &d));
                    out.push(&d);
                }
                Ok(Some(ProcessEvent::Stderr(d))) => {
                    ctx.progress(&progress_text("stderr", &d));
                    err.push(&d);
                }
                Ok(Some(ProcessEvent::Exited(s))) => break s,
                Ok(None) => return ToolOutput::error(format!("the guest agent ended {program} without an exit status")),
                Err(e) => return ToolOutput::error(agent_failure(&program, e)),
            },
            () = &mut deadline, if !timed_out => {
                timed_out = true;
                let _ = process.control().signal(9).await;
                // The exit follows; give it a few seconds, then stop waiting.
                deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(5));
            }
            () = ctx.cancel.cancelled() => {
                let _ = process.control().signal(9).await;
                return ToolOutput::error("cancelled; the process was killed");
            }
            _ = denial_tick.tick(), if sb.has_egress() => {
                let (lines, mark) = sb.egress_denials_since(denial_mark);
                denial_mark = mark;
                for line in lines {
                    ctx.progress(&format!("egress: {line}"));
                }
            }
        }
        if timed_out && deadline.is_elapsed() {
            return ToolOutput::error(format!(
                "{program} ran past its timeout and did not die after SIGKILL"
            ));
        }
    };
    let (code, signal) = status_json(Some(status));
    let structured = json!({
        "exit_code": code,
        "signal": signal,
        "stdout": out.text("stdout"),
        "stderr": err.text("stderr"),
        "stdout_truncated_bytes": out.dropped(),
        "stderr_truncated_bytes": err.dropped(),
        "timed_out": timed_out,
        "duration_ms": started.elapsed().as_millis() as u64,
        "egress_denied": sb.take_egress_denials(),
    });
    ToolOutput::json(structured)
}

/// How often a running `sandbox_exec` looks for new egress refusals.
const DENIAL_POLL: Duration = Duration::from_millis(200);

fn nat_warning(net: &NetMode) -> Option<&'static str> {
    matches!(net, NetMode::Nat).then_some(
        "warning: network nat gives the sandbox unrestricted outbound network access (any host, any port, DNS, and the host's loopback services through 10.0.2.2)",
    )
}

fn progress_text(stream: &str, d: &[u8]) -> String {
    const MAX: usize = 4096;
    let cut = &d[..d.len().min(MAX)];
    let mut s = format!("{stream}: {}", String::from_utf8_lossy(cut));
    if d.len() > MAX {
        s.push_str(&format!(" [+{} bytes]", d.len() - MAX));
    }
    s
}

impl ToolSet for SandboxTools {
    fn tools(&self) -> Vec<ToolDef> {
        self.defs()
    }

    fn call(
        &self,
        name: &str,
        args: Map<String, Value>,
        ctx: CallContext,
    ) -> BoxFuture<ToolOutput> {
        let m = self.manager.clone();
        let name = name.to_owned();
        Box::pin(async move {
            match call(&m, &name, &args, &ctx).await {
                Ok(out) => out,
                Err(msg) => ToolOutput::error(msg),
            }
        })
    }

    fn session_ended(&self, session: &Arc<str>) {
        self.manager.session_ended(session);
    }
}

async fn call(
    m: &Manager,
    name: &str,
    args: &Map<String, Value>,
    ctx: &CallContext,
) -> Result<ToolOutput, String> {
    let l = m.limits().clone();
    let err = |e: SandboxError| chain(&e);
    let sandbox = |m: &Manager| {
        m.get(
            str_arg(args, "sandbox_id").unwrap_or_default(),
            &ctx.session,
        )
        .map_err(err)
    };
    match name {
        "sandbox_create" | "run" => {
            let spec = vm_spec(args, &l)?;
            let exec = if name == "run" {
                Some(spec_of(args, str_arg(args, "stdin").is_some())?)
            } else {
                None
            };
            let mut req = CreateRequest::new(spec.clone());
            req.idle_timeout = u64_arg(args, "idle_timeout_secs").map(Duration::from_secs);
            req.lifetime = u64_arg(args, "timeout_secs")
                .filter(|_| exec.is_none())
                .map(Duration::from_secs);
            let progress = |s: &str| ctx.progress(s);
            let sb = m
                .create(req, ctx.session.clone(), &progress, ctx.cancel.cancelled())
                .await
                .map_err(err)?;
            let mut notices = sb.notices().to_vec();
            if let Some(w) = nat_warning(&spec.net) {
                notices.push(w.into());
            }
            let Some(exec) = exec else {
                return Ok(ToolOutput::json(json!({
                    "sandbox_id": sb.id(),
                    "cpus": spec.cpus,
                    "memory_mib": spec.memory_mib,
                    "boot_ms": sb.boot_time().as_millis() as u64,
                    "network": spec.net.to_string(),
                    "notices": notices,
                })));
            };
            // `run`: one command, then the VM goes whatever happens.
            let id = sb.id().to_owned();
            struct Destroy(Manager, String);
            impl Drop for Destroy {
                fn drop(&mut self) {
                    self.0.destroy_soon(&self.1);
                }
            }
            let _destroy = Destroy(m.clone(), id.clone());
            let stdin = str_arg(args, "stdin").map(|s| s.as_bytes().to_vec());
            let timeout = secs_arg(args, "timeout_secs").unwrap_or(l.default_exec_timeout);
            let mut out = exec_collect(&sb, exec, stdin, timeout, l.max_output, ctx).await;
            if let ToolOutput::Ok { structured, text } = &mut out {
                structured["notices"] = json!(notices);
                *text = structured.to_string();
            }
            // The result goes out while the VM dies (`_destroy`, just below).
            drop(sb);
            Ok(out)
        }
        "sandbox_exec" => {
            let spec = spec_of(args, str_arg(args, "stdin").is_some())?;
            let sb = sandbox(m)?;
            let stdin = str_arg(args, "stdin").map(|s| s.as_bytes().to_vec());
            let timeout = secs_arg(args, "timeout_secs").unwrap_or(l.default_exec_timeout);
            Ok(exec_collect(&sb, spec, stdin, timeout, l.max_output, ctx).await)
        }
        "sandbox_exec_start" => {
            let open = args
                .get("stdin_open")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let spec = spec_of(args, open)?;
            let argv = spec.argv.clone();
            let program = argv.first().cloned().unwrap_or_default();
            let sb = sandbox(m)?;
            let process = sb
                .agent()
                .exec(spec)
                .await
                .map_err(|e| agent_failure(&program, e))?;
            let p = sb.add_process(process, argv).map_err(err)?;
            Ok(ToolOutput::json(json!({"process_id": p.id, "pid": p.pid})))
        }
        "sandbox_exec_poll" => {
            let sb = sandbox(m)?;
            let p = sb
                .process(str_arg(args, "process_id").unwrap_or_default())
                .map_err(err)?;
            let cursor = u64_arg(args, "cursor").unwrap_or(0);
            let wait =
                Duration::from_millis(u64_arg(args, "wait_ms").unwrap_or(0).min(MAX_POLL_WAIT_MS));
            let max =
                u64_arg(args, "max_bytes").map_or(l.max_output, |n| (n as usize).min(l.max_output));
            let r = tokio::select! {
                r = p.poll(cursor, max, wait) => r,
                () = ctx.cancel.cancelled() => return Ok(ToolOutput::error("cancelled")),
            };
            let (code, signal, error, running) = match &r.ended {
                Some(Ok(s)) => {
                    let (c, sig) = status_json(Some(*s));
                    (c, sig, Value::Null, false)
                }
                Some(Err(e)) => (Value::Null, Value::Null, json!(e), false),
                None => (Value::Null, Value::Null, Value::Null, !p.finished()),
            };
            Ok(ToolOutput::json(json!({
                "stdout": String::from_utf8_lossy(&r.output.stdout),
                "stderr": String::from_utf8_lossy(&r.output.stderr),
                "next_cursor": r.output.next,
                "missed_bytes": r.output.missed,
                "more": r.output.more,
                "running": running,
                "exit_code": code,
                "signal": signal,
                "error": error,
                "egress_denied": sb.take_egress_denials(),
            })))
        }
        "sandbox_exec_write_stdin" => {
            let sb = sandbox(m)?;
            let p = sb
                .process(str_arg(args, "process_id").unwrap_or_default())
                .map_err(err)?;
            let data = str_arg(args, "data").unwrap_or_default();
            let close = args.get("close").and_then(Value::as_bool).unwrap_or(false);
            if p.finished() {
                return Err(format!("process {} has ended; its stdin is closed", p.id));
            }
            p.control
                .write_stdin(data.as_bytes())
                .await
                .map_err(|e| match e {
                    AgentError::NoStdin => format!(
                        "process {} was started without stdin_open: start it with \
                         sandbox_exec_start and \"stdin_open\": true to write to its stdin",
                        p.id
                    ),
                    e => chain(&e),
                })?;
            if close {
                p.control.close_stdin().await.map_err(|e| chain(&e))?;
            }
            Ok(ToolOutput::json(
                json!({"written": data.len(), "closed": close}),
            ))
        }
        "sandbox_exec_signal" => {
            let sb = sandbox(m)?;
            let p = sb
                .process(str_arg(args, "process_id").unwrap_or_default())
                .map_err(err)?;
            let name = str_arg(args, "signal").unwrap_or("SIGTERM");
            let num = SIGNALS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(15, |(_, n)| *n);
            p.control.signal(num).await.map_err(|e| chain(&e))?;
            let _ = &p.argv;
            Ok(ToolOutput::json(json!({"signal": num})))
        }
        "sandbox_read_file" => {
            let path = abs_path(args, "path")?;
            let sb = sandbox(m)?;
            let data = sb
                .agent()
                .read_file_max(&path, l.max_file)
                .await
                .map_err(|e| format!("cannot read {path}: {}", chain(&e)))?;
            let b64 = str_arg(args, "encoding") == Some("base64");
            let content = if b64 {
                base64::engine::general_purpose::STANDARD.encode(&data)
            } else {
                String::from_utf8_lossy(&data).into_owned()
            };
            Ok(ToolOutput::Ok {
                text: content.clone(),
                structured: json!({"content": content, "encoding": if b64 {"base64"} else {"text"}, "size": data.len()}),
            })
        }
        "sandbox_write_file" => {
            let path = abs_path(args, "path")?;
            let content = str_arg(args, "content").unwrap_or_default();
            let data = if str_arg(args, "encoding") == Some("base64") {
                base64::engine::general_purpose::STANDARD
                    .decode(content)
                    .map_err(|e| format!("content: not valid base64 ({e})"))?
            } else {
                content.as_bytes().to_vec()
            };
            if data.len() > l.max_file {
                return Err(format!(
                    "content: {} bytes is more than the limit of {} bytes",
                    data.len(),
                    l.max_file
                ));
            }
            let mode = u64_arg(args, "mode").unwrap_or(0o644) as u32;
            let sb = sandbox(m)?;
            sb.agent()
                .write_file(&path, &data, mode)
                .await
                .map_err(|e| format!("cannot write {path}: {}", chain(&e)))?;
            Ok(ToolOutput::json(json!({"size": data.len()})))
        }
        "sandbox_list_files" => {
            let path = if args.contains_key("path") {
                abs_path(args, "path")?
            } else {
                "/".into()
            };
            let sb = sandbox(m)?;
            list_files(&sb.agent(), &path, l.max_output).await
        }
        "sandbox_list" => {
            let (count, mem) = m.usage();
            let list: Vec<Value> = m
                .list()
                .into_iter()
                .map(|s| json!({
                    "sandbox_id": s.id, "cpus": s.cpus, "memory_mib": s.memory_mib, "age_secs": s.age_secs,
                    "idle_secs": s.idle_secs, "idle_timeout_secs": s.idle_timeout_secs, "expires_in_secs": s.expires_in_secs,
                    "processes": s.processes, "running_processes": s.running, "created_unix": s.created_unix,
                }))
                .collect();
            Ok(ToolOutput::json(json!({
                "sandboxes": list,
                "limits": {"max_sandboxes": l.max_sandboxes, "memory_budget_mib": l.memory_budget_mib,
                           "sandboxes_in_use": count, "memory_in_use_mib": mem, "max_output_bytes": l.max_output,
                           "max_file_bytes": l.max_file},
            })))
        }
        "sandbox_destroy" => {
            let id = str_arg(args, "sandbox_id").unwrap_or_default();
            if m.destroy(id).await {
                Ok(ToolOutput::json(json!({"destroyed": true})))
            } else {
                Err(chain(&SandboxError::NotFound(id.to_owned())))
            }
        }
        "sandbox_checkpoint" => {
            let sb = sandbox(m)?;
            let started = Instant::now();
            let id = m.checkpoint(&sb).await.map_err(err)?;
            Ok(ToolOutput::json(json!({
                "checkpoint_id": id,
                "sandbox_id": sb.id(),
                "checkpoint_ms": started.elapsed().as_millis() as u64,
            })))
        }
        "sandbox_rewind" => {
            let checkpoint = str_arg(args, "checkpoint_id").unwrap_or_default();
            let sb = sandbox(m)?;
            let started = Instant::now();
            ctx.progress("rewinding: restoring the checkpoint into a new VM");
            m.rewind(&sb, checkpoint).await.map_err(err)?;
            Ok(ToolOutput::json(json!({
                "sandbox_id": sb.id(),
                "checkpoint_id": checkpoint,
                "rewind_ms": started.elapsed().as_millis() as u64,
            })))
        }
        "sandbox_fork" => {
            let from = match (str_arg(args, "sandbox_id"), str_arg(args, "checkpoint_id")) {
                (Some(s), None) => ForkFrom::Sandbox(s),
                (None, Some(c)) => ForkFrom::Checkpoint(c),
                (Some(_), Some(_)) => {
                    return Err("sandbox_id, checkpoint_id: give one of them (fork a sandbox as it is, or from a checkpoint), not both".into())
                }
                (None, None) => {
                    return Err("sandbox_id, checkpoint_id: one is required (the sandbox or the checkpoint to fork)".into())
                }
            };
            let n = u64_arg(args, "count").unwrap_or(1);
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            let started = Instant::now();
            ctx.progress(&format!("forking into {n} new VMs"));
            let forks = tokio::select! {
                r = m.fork(from, n, ctx.session.clone()) => r.map_err(err)?,
                () = ctx.cancel.cancelled() => return Ok(ToolOutput::error("cancelled")),
            };
            let ids: Vec<&str> = forks.iter().map(|s| s.id()).collect();
            Ok(ToolOutput::json(json!({
                "sandbox_ids": ids,
                "fork_ms": started.elapsed().as_millis() as u64,
            })))
        }
        other => Err(format!("unknown tool {other}")),
    }
}

fn abs_path(args: &Map<String, Value>, k: &str) -> Result<String, String> {
    let p = str_arg(args, k).unwrap_or_default();
    if !p.starts_with('/') || p.contains('\0') {
        return Err(format!("{k}: must be an absolute path, got {p:?}"));
    }
    Ok(p.to_owned())
}

async fn list_files(
    agent: &vmcp_vm::agent::AgentClient,
    path: &str,
    max_output: usize,
) -> Result<ToolOutput, String> {
    let spec = ExecSpec::new([
        "find",
        path,
        "-mindepth",
        "1",
        "-maxdepth",
        "1",
        "-exec",
        "stat",
        "-c",
        "%F|%s|%a|%Y|%n",
        "{}",
        "+",
    ]);
    let mut process = agent
        .exec(spec)
        .await
        .map_err(|e| agent_failure("find", e))?;
    let mut out = Capped::new(max_output);
    let mut err = Capped::new(4096);
    let status = loop {
        match process.next_event().await {
            Ok(Some(ProcessEvent::Stdout(d))) => out.push(&d),
            Ok(Some(ProcessEvent::Stderr(d))) => err.push(&d),
            Ok(Some(ProcessEvent::Exited(s))) => break s,
            Ok(None) => return Err("the guest agent ended find without an exit status".into()),
            Err(e) => return Err(agent_failure("find", e)),
        }
    };
    if status != ExitStatus::Code(0) {
        return Err(format!("cannot list {path}: {}", err.text("stderr").trim()));
    }
    let text = out.text("output");
    let mut entries = Vec::new();
    let mut truncated = out.dropped() > 0;
    for line in text.lines() {
        let mut parts = line.splitn(5, '|');
        let (Some(kind), Some(size), Some(mode), Some(mtime), Some(full)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        if entries.len() >= MAX_LIST_ENTRIES {
            truncated = true;
            break;
        }
        let name = full.rsplit('/').next().unwrap_or(full);
        let kind = match kind {
            "regular file" | "regular empty file" => "file",
            "directory" => "dir",
            "symbolic link" => "symlink",
            _ => "other",
        };
        entries.push(json!({
            "name": name, "type": kind, "size": size.parse::<u64>().unwrap_or(0),
            "mode": mode, "mtime_unix": mtime.parse::<i64>().unwrap_or(0),
        }));
    }
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(ToolOutput::json(
        json!({"path": path, "entries": entries, "truncated": truncated}),
    ))
}

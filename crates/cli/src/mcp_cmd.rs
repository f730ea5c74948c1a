//! `vmcp mcp ...`: talk to an MCP server over Streamable HTTP(S) or stdio.
//!
//! `list-tools` prints one tool per line (name and description) or the raw JSON list;
//! `call` prints the text of the tool result, or the raw `CallToolResult` with `--json`.
//! Failures (TLS rejected, all endpoints down, JSON-RPC error, tool error) end with a
//! one-line error on stderr and a non-zero exit: 1 when the tool itself reported an error,
//! 125 for everything else.
//!
//! Server-supplied text printed for a human (tool names and descriptions, tool output on a
//! terminal, every error) has its control characters escaped (`vmcp_mcp::sanitize`), so a
//! server cannot drive the user's terminal; `--json` output is JSON, whose strings escape
//! them anyway. URLs in errors lose credentials and query; `--header` values are never echoed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use vmcp_mcp::http::{HttpConfig, ReqwestClient, ReqwestOptions, StreamableHttpTransport};
use vmcp_mcp::retry::RetryPolicy;
use vmcp_mcp::sanitize;
use vmcp_mcp::stdio::{StdioConfig, StdioTransport};
use vmcp_mcp::tls::{ClientIdentity, TlsOptions, TlsRejection};
use vmcp_mcp::{BoxTransport, Client, ClientConfig, Lifecycle};

/// `vmcp mcp` subcommands.
#[derive(clap::Subcommand)]
pub enum McpCommand {
    /// List the tools of an MCP server.
    ListTools {
        #[command(flatten)]
        server: ServerArgs,
        /// Print the tools as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Call a tool and print its result.
    Call {
        /// Tool name.
        tool: String,
        #[command(flatten)]
        server: ServerArgs,
        /// Tool arguments, a JSON object.
        #[arg(long, value_name = "JSON", default_value = "{}")]
        args: String,
        /// Print the raw CallToolResult JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve MCP: tools that create and drive sandboxes (micro-VMs), over stdio or HTTP.
    Serve(crate::mcp_serve::ServeArgs),
    /// Run a stdio MCP server inside a micro-VM and relay MCP to it over our stdio.
    Wrap(crate::mcp_wrap::WrapArgs),
}

/// How to reach the server (shared by every subcommand).
#[derive(clap::Args)]
pub struct ServerArgs {
    /// Streamable HTTP endpoint; repeat for several endpoints of one server (load balanced).
    #[arg(long, value_name = "URL")]
    url: Vec<String>,
    /// Start the server as a child process: the command follows `--`.
    #[arg(long)]
    stdio: bool,
    /// Trust the CA certificates in this PEM file (in addition to the system roots).
    #[arg(long, value_name = "PEM")]
    ca_file: Vec<PathBuf>,
    /// Client certificate for mutual TLS (PEM; needs --client-key).
    #[arg(long, value_name = "PEM", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// Private key of --client-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Extra HTTP header, e.g. 'Authorization: Bearer TOKEN' (repeatable).
    #[arg(long, value_name = "'K: V'")]
    header: Vec<String>,
    /// Time limit of each request, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    timeout: f64,
    /// DANGEROUS: accept any server certificate (no verification). Warns on every connection.
    #[arg(long)]
    insecure_skip_tls_verify: bool,
    /// Protocol generation: auto (detect), legacy (initialize, sessions) or 2026-07-28.
    #[arg(long, value_name = "auto|legacy|2026-07-28", default_value = "auto")]
    protocol: String,
    /// Server command and arguments (with --stdio).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// Runs a `vmcp mcp` subcommand.
pub async fn run(cmd: McpCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        McpCommand::ListTools { server, json } => {
            until_signal(with_client(&server, |c| async move {
                list_tools(&c, json).await
            }))
            .await
        }
        McpCommand::Call {
            server,
            tool,
            args,
            json,
        } => {
            let args: Value = serde_json::from_str(&args)
                .with_context(|| format!("--args is not valid JSON: {args:?}"))?;
            if !args.is_object() {
                bail!("--args must be a JSON object, like '{{\"message\": \"hi\"}}'");
            }
            until_signal(with_client(&server, |c| async move {
                call(&c, &tool, &args, json).await
            }))
            .await
        }
        McpCommand::Serve(args) => crate::mcp_serve::run(args).await,
        McpCommand::Wrap(args) => crate::mcp_wrap::run(args).await,
    }
}

/// Runs `work` until it ends or SIGINT/SIGTERM (Ctrl-C on Windows) arrives. On a signal, `work`
/// is dropped before returning: that drops the client and its transport, which kills a stdio
/// server together with everything it started (the owned-process layer kills its group before
/// anything is reaped). Exit status 128 + the signal number, as `vmcp run`.
async fn until_signal(
    work: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let mut work = Box::pin(work);
    let sig = tokio::select! {
        r = &mut work => return r,
        sig = crate::run::signal::termination() => sig,
    };
    drop(work);
    eprintln!("vmcp: got {}, stopped the MCP client", sig.name);
    Ok(ExitCode::from(128 + sig.number))
}

/// Longest `--timeout` accepted (a year; longer is surely a typo, and `Duration` has limits).
const MAX_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

/// `--timeout` as a duration, or a clear error.
fn timeout(server: &ServerArgs) -> anyhow::Result<Duration> {
    if !(server.timeout.is_finite() && server.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    if server.timeout > MAX_TIMEOUT_SECS {
        bail!("--timeout must be at most {MAX_TIMEOUT_SECS:.0} seconds (one year)");
    }
    Duration::try_from_secs_f64(server.timeout)
        .with_context(|| "--timeout is not a usable number of seconds".to_owned())
}

fn client_config(server: &ServerArgs) -> anyhow::Result<ClientConfig> {
    let timeout = timeout(server)?;
    let lifecycle = match server.protocol.as_str() {
        "auto" => Lifecycle::Auto,
        "legacy" => Lifecycle::Initialize,
        "2026-07-28" | "modern" => Lifecycle::Discover,
        other => bail!("unknown --protocol {other:?}: use auto, legacy or 2026-07-28"),
    };
    Ok(ClientConfig::default()
        .with_lifecycle(lifecycle)
        .with_request_timeout(Some(timeout)))
}

/// Connects as `server` says, runs `f`, closes, and explains failures in one line.
async fn with_client<F, Fut>(server: &ServerArgs, f: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(McpClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let config = client_config(server)?;
    let client = match (
        server.url.is_empty(),
        server.stdio,
        server.command.is_empty(),
    ) {
        (false, false, true) => {
            let mut tls =
                TlsOptions::new().danger_accept_invalid_certs(server.insecure_skip_tls_verify);
            for ca in &server.ca_file {
                tls = tls.with_extra_ca_file(ca);
            }
            if let (Some(cert), Some(key)) = (&server.client_cert, &server.client_key) {
                tls = tls.with_client_identity(ClientIdentity::new(cert, key));
            }
            let tls = vmcp_mcp::tls::client_config(&tls)?;
            let http = ReqwestClient::new(&ReqwestOptions::default().with_tls(tls))?;
            let mut hc = HttpConfig::new(server.url.iter().cloned());
            // Retries stop where --timeout would cut them, so the error says why they failed.
            hc.retry = RetryPolicy::default().with_deadline(Some(timeout(server)?));
            for h in &server.header {
                hc = hc
                    .with_header_line(h)
                    .with_context(|| "--header wants 'Name: value'".to_owned())?;
            }
            let transport = StreamableHttpTransport::new(http, hc)?;
            if server.url.len() > 1 {
                transport.start_health_checks();
            }
            Client::connect(BoxTransport::new(transport), config)
                .await
                .map_err(explain)?
        }
        (true, true, false) => {
            let cfg = StdioConfig::new(&server.command[0], &server.command[1..]);
            let transport = StdioTransport::spawn(&cfg)?;
            Client::connect(BoxTransport::new(transport), config)
                .await
                .map_err(explain)?
        }
        (true, true, true) => bail!("--stdio needs the server command after `--`"),
        (false, true, _) => bail!("give either --url or --stdio, not both"),
        (true, false, _) => {
            bail!("give --url URL or --stdio -- CMD ARGS... to say which server to use")
        }
        (false, false, false) => bail!("a command after `--` needs --stdio"),
    };
    let closer = client.clone();
    let result = f(client).await;
    closer.close().await;
    result
}

/// A client over either transport.
type McpClient = Client<BoxTransport>;

/// Adds a TLS hint to an error when a certificate was rejected.
fn explain(e: vmcp_mcp::ClientError) -> anyhow::Error {
    match TlsRejection::find(&e) {
        Some(r) => anyhow::Error::new(e).context(r.to_string()),
        None => anyhow::Error::new(e),
    }
}

async fn list_tools(c: &McpClient, json: bool) -> anyhow::Result<ExitCode> {
    let tools = c.list_tools().await.map_err(explain)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&tools)?);
    } else {
        for t in &tools {
            let desc = t
                .description
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("");
            let name = sanitize::for_display(&t.name, 200);
            if desc.is_empty() {
                println!("{name}");
            } else {
                println!("{name}\t{}", sanitize::for_display(desc, 1000));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn call(c: &McpClient, tool: &str, args: &Value, json: bool) -> anyhow::Result<ExitCode> {
    let raw = c.call_tool_raw(tool, Some(args)).await.map_err(explain)?;
    let (result, _): (vmcp_mcp::model::CallToolResult, _) =
        vmcp_mcp::client::decode_bounded("tools/call", &raw, vmcp_mcp::limits::MAX_RESULT_NODES)
            .with_context(|| {
                format!(
                    "the server's result of tool {} is malformed",
                    sanitize::for_display(&format!("{tool:?}"), 100)
                )
            })?;
    if json {
        println!("{}", raw.get());
    } else {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
        for block in &result.content {
            match block.as_text() {
                Some(t) if terminal => println!("{}", sanitize::for_terminal(t)),
                Some(t) => println!("{t}"),
                None => println!("{}", serde_json::to_string(block)?),
            }
        }
        if result.content.is_empty() {
            if let Some(s) = &result.structured_content {
                println!("{s}");
            }
        }
    }
    if result.is_error() {
        eprintln!("vmcp: tool {tool:?} reported an error");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

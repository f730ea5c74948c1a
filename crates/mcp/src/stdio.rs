//! Stdio transport: the MCP server is a child process; one JSON-RPC message per line on its
//! stdin and stdout.
//!
//! The child is started through the owned-process layer (`vmcp_host_process::spawn_owned`)
//! with stdin and stdout piped and stderr passed through to ours, logged line by line
//! (`tracing`, target `vmcp_mcp::stderr`) or dropped ([`StderrMode`]). It dies with its owner,
//! together with everything it started (so `npx`-style launchers do not leave their `node`
//! behind, nor a shell its background jobs): when the transport is closed or dropped, and
//! when vmcp exits or is killed, SIGKILL included (Linux: watchdog-led process group and
//! parent-death signal from the process-lifetime spawner thread; Windows: a kill-on-close Job
//! Object). Spawning from a short-lived thread is fine. [`StdioTransport::close`] first closes
//! the child's stdin and gives it [`StdioConfig::shutdown_grace`] to exit, as the MCP spec
//! suggests.
//!
//! The framing itself, [`LineTransport`], works over any byte stream and serves the server
//! role too (`vmcp-mcp-server` reads its stdin and writes its stdout through it).
//!
//! Limits: lines longer than [`MAX_LINE`] end the connection with an error; lines that are
//! no JSON-RPC message are reported by `receive` and skipped (some servers print banners on
//! stdout; the client logs them). Logged
//! stderr lines are cut at [`crate::limits::MAX_STDERR_LINE`] bytes and their control
//! characters escaped.

use std::ffi::OsString;
use std::process::Stdio;
use std::time::Duration;

use std::future::Future;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;
use vmcp_host_process::{spawn_owned, OwnedChild, SpawnOptions};

use crate::jsonrpc::{self, Message};
use crate::transport::Transport;

/// Longest line accepted from the server ([`crate::limits::MAX_MESSAGE_BYTES`]).
pub const MAX_LINE: usize = crate::limits::MAX_MESSAGE_BYTES;

/// What happens to the child's stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StderrMode {
    /// Passed through to our stderr.
    #[default]
    Inherit,
    /// Logged line by line at info level.
    Log,
    /// Discarded.
    Null,
}

/// How to start the server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StdioConfig {
    /// Program.
    pub program: OsString,
    /// Arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// Stderr handling.
    pub stderr: StderrMode,
    /// How long `close` waits for the child to exit after closing its stdin.
    pub shutdown_grace: Duration,
}

impl StdioConfig {
    /// A server started as `program args...`.
    pub fn new(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        StdioConfig {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            stderr: StderrMode::Inherit,
            shutdown_grace: Duration::from_secs(2),
        }
    }

    /// Sets the stderr mode.
    pub fn with_stderr(mut self, mode: StderrMode) -> Self {
        self.stderr = mode;
        self
    }

    /// Adds an environment variable.
    pub fn with_env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Errors of the stdio transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StdioError {
    /// Starting the server process failed.
    #[error("cannot start MCP server {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the byte stream failed.
    #[error("I/O error on the MCP connection")]
    Io(#[from] std::io::Error),
    /// A line was longer than allowed; the stream cannot be resynchronised, so it ends.
    #[error("the MCP peer sent a line longer than {0} bytes")]
    LineTooLong(usize),
    /// A line is no JSON-RPC message (it was skipped; the next line is read normally).
    #[error("skipped a line that is no JSON-RPC message: {line}")]
    Parse {
        /// The start of the line, printable.
        line: String,
        /// Why.
        #[source]
        source: jsonrpc::Error,
    },
    /// The transport is closed.
    #[error("the MCP connection is closed")]
    Closed,
}

/// Newline-delimited JSON-RPC over any byte stream, for either role: a client's child process
/// pipes ([`StdioTransport`]) or a server's stdin/stdout (`vmcp-mcp-server`'s stdio).
///
/// `receive` returns a [`StdioError::Parse`] for a line that is no JSON-RPC message and goes
/// on with the next line (a client logs it, a server answers it with a parse error); a line
/// longer than the limit, or a read error, ends the stream after its error. Blank lines are
/// skipped. `close` closes the writing side (EOF for the peer).
pub struct LineTransport<R, W> {
    writer: Mutex<Option<W>>,
    reader: Mutex<LineReader<R>>,
}

struct LineReader<R> {
    reader: BufReader<R>,
    line: Vec<u8>,
    max_line: usize,
    done: bool,
}

impl<R, W> LineTransport<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    /// A transport reading `reader` and writing `writer`, accepting lines of at most
    /// `max_line` bytes.
    pub fn new(reader: R, writer: W, max_line: usize) -> Self {
        LineTransport {
            writer: Mutex::new(Some(writer)),
            reader: Mutex::new(LineReader {
                reader: BufReader::with_capacity(64 << 10, reader),
                line: Vec::with_capacity(4096),
                max_line,
                done: false,
            }),
        }
    }
}

impl<R, W> Transport for LineTransport<R, W>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    type Error = StdioError;

    async fn send(&self, msg: &Message) -> Result<(), StdioError> {
        let buf = msg.to_line();
        let mut guard = self.writer.lock().await;
        let w = guard.as_mut().ok_or(StdioError::Closed)?;
        w.write_all(&buf).await?;
        w.flush().await?;
        Ok(())
    }

    async fn receive(&self) -> Option<Result<Message, StdioError>> {
        let mut r = self.reader.lock().await;
        let r = &mut *r;
        loop {
            if r.done {
                return None;
            }
            r.line.clear();
            let n = match read_line(&mut r.reader, &mut r.line, r.max_line).await {
                Ok(n) => n,
                Err(e) => {
                    r.done = true;
                    return Some(Err(e));
                }
            };
            if n == 0 {
                r.done = true;
                return None;
            }
            let line = r.line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            return Some(
                jsonrpc::parse_message(line).map_err(|source| StdioError::Parse {
                    line: crate::sanitize::for_display(
                        &String::from_utf8_lossy(&line[..line.len().min(1000)]),
                        crate::limits::MAX_PRINTED_CHARS,
                    ),
                    source,
                }),
            );
        }
    }

    async fn close(&self) {
        if let Some(mut w) = self.writer.lock().await.take() {
            let _ = w.shutdown().await;
        }
    }
}

/// Reads one line (with its newline) into `out`; 0 at the end of the stream. A line longer
/// than `max` bytes is an error, found before more than `max` bytes are held.
pub async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<usize, StdioError> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (take, found) = match memchr_newline(buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if out.len() + take > max {
            return Err(StdioError::LineTooLong(max));
        }
        out.extend_from_slice(&buf[..take]);
        reader.consume(take);
        total += take;
        if found {
            return Ok(total);
        }
    }
}

/// A running stdio MCP server: a [`LineTransport`] over the child's pipes.
pub struct StdioTransport {
    lines: LineTransport<ChildStdout, ChildStdin>,
    child: Mutex<Option<OwnedChild>>,
    pid: Option<u32>,
    grace: Duration,
}

impl StdioTransport {
    /// Starts the server process. Must be called inside a tokio runtime.
    pub fn spawn(config: &StdioConfig) -> Result<Self, StdioError> {
        let mut cmd = Command::new(&config.program);
        cmd.args(&config.args)
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(match config.stderr {
                StderrMode::Inherit => Stdio::inherit(),
                StderrMode::Log => Stdio::piped(),
                StderrMode::Null => Stdio::null(),
            });
        let mut child =
            spawn_owned(cmd, SpawnOptions::default()).map_err(|source| StdioError::Spawn {
                program: config.program.to_string_lossy().into_owned(),
                source,
            })?;
        let pid = child.id();
        let (Some(stdin), Some(stdout)) = (child.take_stdin(), child.take_stdout()) else {
            return Err(StdioError::Closed);
        };
        if let Some(stderr) = child.take_stderr() {
            tokio::spawn(log_stderr(stderr, crate::limits::MAX_STDERR_LINE));
        }
        Ok(StdioTransport {
            lines: LineTransport::new(stdout, stdin, MAX_LINE),
            child: Mutex::new(Some(child)),
            pid,
            grace: config.shutdown_grace,
        })
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }
}

impl Transport for StdioTransport {
    type Error = StdioError;

    fn send(&self, msg: &Message) -> impl Future<Output = Result<(), StdioError>> + Send {
        self.lines.send(msg)
    }

    fn receive(&self) -> impl Future<Output = Option<Result<Message, StdioError>>> + Send {
        self.lines.receive()
    }

    async fn close(&self) {
        // Closing stdin asks the server to exit.
        self.lines.close().await;
        let Some(mut child) = self.child.lock().await.take() else {
            return;
        };
        if tokio::time::timeout(self.grace, child.wait())
            .await
            .is_err()
        {
            tracing::debug!(
                "MCP server did not exit within {:?}; killing it",
                self.grace
            );
        }
        // Whatever the server left running (or the server itself) goes now; the group id is
        // still reserved by the owned-process layer, so this cannot hit a reused id.
        if let Err(e) = child.kill_and_wait(self.grace).await {
            tracing::warn!("the MCP server could not be reaped: {e}");
        }
    }
}

fn memchr_newline(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

/// Logs the child's stderr line by line (info, target `vmcp_mcp::stderr`): each line cut at
/// `max` bytes (the rest of it is read and dropped), control characters escaped.
async fn log_stderr<R: tokio::io::AsyncRead + Unpin>(stderr: R, max: usize) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::with_capacity(256);
    while let Ok(Some(cut)) = read_capped_line(&mut reader, &mut line, max).await {
        let text = String::from_utf8_lossy(&line);
        let text = crate::sanitize::for_display(text.trim_end(), max);
        if cut > 0 {
            tracing::info!(target: "vmcp_mcp::stderr", "{text} [{cut} more bytes dropped]");
        } else {
            tracing::info!(target: "vmcp_mcp::stderr", "{text}");
        }
    }
}

/// Reads one line into `out` (cleared first), keeping at most `max` bytes of it; returns how
/// many bytes were dropped, or `None` at the end of the stream.
async fn read_capped_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    out: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    out.clear();
    let mut dropped = 0usize;
    let mut any = false;
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(any.then_some(dropped));
        }
        any = true;
        let (take, found) = match memchr_newline(buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = max.saturating_sub(out.len()).min(take);
        out.extend_from_slice(&buf[..room]);
        dropped = dropped.saturating_add(take - room);
        reader.consume(take);
        if found {
            return Ok(Some(dropped));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stderr_lines_are_capped() {
        let mut input = vec![b'x'; 1 << 20];
        input.extend_from_slice(b"\nshort\nlast");
        let mut r = BufReader::with_capacity(4096, &input[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_capped_line(&mut r, &mut line, 100).await.unwrap(),
            Some((1 << 20) + 1 - 100)
        );
        assert_eq!(line.len(), 100);
        assert_eq!(
            read_capped_line(&mut r, &mut line, 100).await.unwrap(),
            Some(0)
        );
        assert_eq!(line, b"short\n");
        assert_eq!(
            read_capped_line(&mut r, &mut line, 100).await.unwrap(),
            Some(0)
        );
        assert_eq!(line, b"last");
        assert_eq!(
            read_capped_line(&mut r, &mut line, 100).await.unwrap(),
            None
        );
    }
}

//! MCP over stdio: one JSON-RPC message per line on stdin, answers and progress on stdout.
//!
//! The whole stream is one session. Calls run concurrently (answers may come out of order, as
//! JSON-RPC allows); one writer task owns stdout, so lines never interleave. When stdin ends
//! the session ends: calls in flight are cancelled, given [`StdioLimits::drain`] to answer,
//! and [`crate::tool::ToolSet::session_ended`] runs.
//!
//! Framing is the client crate's [`vmcp_mcp::stdio::LineTransport`] (the same seam the client
//! uses for its child processes): this module only adds the server's side of it.
//!
//! Limits: a line longer than [`StdioLimits::max_line`] ends the session with an error (the
//! stream cannot be resynchronised); at most [`StdioLimits::out_queue`] messages wait for
//! stdout (progress beyond that is dropped; answers wait for room).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use vmcp_mcp::jsonrpc::{self, Message, RpcError, INVALID_REQUEST, PARSE_ERROR};
use vmcp_mcp::stdio::LineTransport;
use vmcp_mcp::Transport;

use crate::server::{error, Connection, Handled, Outbound, Server};

/// Bounds of the stdio transport.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StdioLimits {
    /// Longest line accepted from the client.
    pub max_line: usize,
    /// Messages queued for stdout.
    pub out_queue: usize,
    /// How long calls in flight get to finish after stdin closed.
    pub drain: Duration,
}

impl Default for StdioLimits {
    fn default() -> Self {
        StdioLimits {
            max_line: 16 << 20,
            out_queue: 1024,
            drain: Duration::from_secs(5),
        }
    }
}

/// Errors of the stdio transport: the client crate's ([`vmcp_mcp::stdio::StdioError`]).
pub use vmcp_mcp::stdio::StdioError;

struct Out(mpsc::Sender<Message>);

impl Outbound for Out {
    fn notify(&self, msg: Message) -> bool {
        self.0.try_send(msg).is_ok()
    }
}

/// Serves one client on `reader`/`writer` until the reader ends.
pub async fn serve<R, W>(
    server: &Server,
    reader: R,
    writer: W,
    limits: &StdioLimits,
) -> Result<(), StdioError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session: Arc<str> = Arc::from("stdio");
    let conn = Connection::new(Some(session.clone()));
    let lines = Arc::new(LineTransport::new(reader, writer, limits.max_line));
    let (tx, mut rx) = mpsc::channel::<Message>(limits.out_queue.max(1));
    let writer_task = {
        let lines = lines.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if lines.send(&msg).await.is_err() {
                    // The client stopped reading; keep draining so senders never block.
                    while rx.recv().await.is_some() {}
                    return;
                }
            }
        })
    };
    let out: Arc<dyn Outbound> = Arc::new(Out(tx.clone()));
    let mut calls = tokio::task::JoinSet::new();
    let result = loop {
        let msg = match lines.receive().await {
            None => break Ok(()),
            Some(Ok(m)) => m,
            Some(Err(StdioError::Parse { line, source })) => {
                let error = if line.starts_with('[') {
                    RpcError::new(INVALID_REQUEST, "JSON-RPC batches are not supported")
                } else {
                    let code = match source {
                        jsonrpc::Error::Json(_) => PARSE_ERROR,
                        _ => INVALID_REQUEST,
                    };
                    RpcError::new(code, source.to_string())
                };
                let _ = tx.send(error_reply(error)).await;
                continue;
            }
            Some(Err(e)) => break Err(e),
        };
        // Reap finished calls so the set does not grow.
        while calls.try_join_next().is_some() {}
        match server.handle(msg, &conn, out.clone()) {
            Handled::Reply(m) => {
                let _ = tx.send(m).await;
            }
            Handled::Later(fut) => {
                let tx = tx.clone();
                calls.spawn(async move {
                    if let Some(m) = fut.await {
                        let _ = tx.send(m).await;
                    }
                });
            }
            Handled::Nothing => {}
        }
    };
    conn.cancel_all();
    if tokio::time::timeout(limits.drain, async {
        while calls.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "calls still running {:?} after stdin closed; stopped them",
            limits.drain
        );
        calls.abort_all();
    }
    server.tools().session_ended(&session);
    drop(out);
    drop(tx);
    let _ = writer_task.await;
    lines.close().await;
    result
}

fn error_reply(e: RpcError) -> Message {
    error(None, e)
}

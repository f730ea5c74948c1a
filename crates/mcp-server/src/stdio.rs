//! MCP over stdio: one JSON-RPC message per line on stdin, answers and progress on stdout.
//!
//! The whole stream is one session. Calls run concurrently (answers may come out of order, as
//! JSON-RPC allows); one writer task owns stdout, so lines never interleave. When stdin ends
//! the session ends: calls in flight are cancelled, given [`StdioLimits::drain`] to answer,
//! and [`crate::tool::ToolSet::session_ended`] runs.
//!
//! Limits: a line longer than [`StdioLimits::max_line`] ends the session with an error (the
//! stream cannot be resynchronised); at most [`StdioLimits::out_queue`] messages wait for
//! stdout (progress beyond that is dropped; answers wait for room).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use vmcp_mcp::jsonrpc::{self, Message, RpcError, INVALID_REQUEST, PARSE_ERROR};

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

/// Errors of the stdio transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StdioError {
    /// Reading stdin failed.
    #[error("cannot read the MCP client's messages")]
    Read(#[source] std::io::Error),
    /// A line was too long.
    #[error("the MCP client sent a line longer than {0} bytes")]
    LineTooLong(usize),
}

struct Out(mpsc::Sender<Vec<u8>>);

impl Outbound for Out {
    fn notify(&self, msg: Message) -> bool {
        self.0.try_send(line(&msg)).is_ok()
    }
}

fn line(msg: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(256);
    msg.write_to(&mut v);
    v.push(b'\n');
    v
}

/// Serves one client on `reader`/`writer` until the reader ends.
pub async fn serve<R, W>(
    server: &Server,
    reader: R,
    writer: W,
    limits: &StdioLimits,
) -> Result<(), StdioError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session: Arc<str> = Arc::from("stdio");
    let conn = Connection::new(Some(session.clone()));
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(limits.out_queue.max(1));
    let writer_task = tokio::spawn(async move {
        let mut w = writer;
        while let Some(buf) = rx.recv().await {
            if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
                // The client stopped reading; keep draining so senders never block.
                while rx.recv().await.is_some() {}
                return;
            }
        }
    });
    let out: Arc<dyn Outbound> = Arc::new(Out(tx.clone()));
    let mut calls = tokio::task::JoinSet::new();
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let mut buf = Vec::with_capacity(4096);
    let result = loop {
        buf.clear();
        match read_line(&mut reader, &mut buf, limits.max_line).await {
            Ok(0) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e),
        }
        // Reap finished calls so the set does not grow.
        while calls.try_join_next().is_some() {}
        let text = buf.trim_ascii();
        if text.is_empty() {
            continue;
        }
        if text.first() == Some(&b'[') {
            let _ = tx
                .send(line(&error(
                    None,
                    RpcError::new(INVALID_REQUEST, "JSON-RPC batches are not supported"),
                )))
                .await;
            continue;
        }
        let msg = match jsonrpc::parse_message(text) {
            Ok(m) => m,
            Err(e) => {
                let code = match e {
                    jsonrpc::Error::Json(_) => PARSE_ERROR,
                    _ => INVALID_REQUEST,
                };
                let _ = tx
                    .send(line(&error(None, RpcError::new(code, e.to_string()))))
                    .await;
                continue;
            }
        };
        match server.handle(msg, &conn, out.clone()) {
            Handled::Reply(m) => {
                let _ = tx.send(line(&m)).await;
            }
            Handled::Later(fut) => {
                let tx = tx.clone();
                calls.spawn(async move {
                    if let Some(m) = fut.await {
                        let _ = tx.send(line(&m)).await;
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
    result
}

async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<usize, StdioError> {
    let mut total = 0;
    loop {
        let buf = reader.fill_buf().await.map_err(StdioError::Read)?;
        if buf.is_empty() {
            return Ok(total);
        }
        let (take, found) = match buf.iter().position(|&b| b == b'\n') {
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

//! Capture of the guest serial console and of QEMU's own stderr.
//!
//! vmcp reads the console itself (QEMU writes to a socket, not a file) and appends it to the
//! log file. So the log file is created with vmcp's permissions even when QEMU runs as an
//! unprivileged user, and the last bytes stay in memory for error messages
//! ([`Tail::lines`]) without rereading the file.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

/// How many bytes of console output are kept in memory.
pub const TAIL_BYTES: usize = 16 * 1024;
/// Most bytes one capture appends to the log file: the console is guest output, and a guest
/// must not be able to fill the host's disk. Past it only the in-memory tail is kept.
pub const MAX_LOG_BYTES: u64 = 8 * 1024 * 1024;

/// The last bytes of a stream, shared between the capture task and readers.
#[derive(Debug, Clone, Default)]
pub struct Tail {
    buf: Arc<Mutex<VecDeque<u8>>>,
}

impl Tail {
    /// Appends `data`, dropping the oldest bytes beyond [`TAIL_BYTES`].
    pub fn push(&self, data: &[u8]) {
        let mut b = self
            .buf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let data = &data[data.len().saturating_sub(TAIL_BYTES)..];
        let overflow = (b.len() + data.len()).saturating_sub(TAIL_BYTES);
        b.drain(..overflow);
        b.extend(data);
    }

    /// The last `n` non-empty lines, lossily decoded, control characters other than tab
    /// removed (the console is guest output: it must not drive the user's terminal).
    pub fn lines(&self, n: usize) -> String {
        let bytes: Vec<u8> = {
            let b = self
                .buf
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            b.iter().copied().collect()
        };
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> = text
            .split(['\n', '\r'])
            .map(|l| {
                l.chars()
                    .filter(|c| *c == '\t' || !c.is_control())
                    .collect::<String>()
            })
            .filter(|l| !l.trim().is_empty())
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The console log: opened once by [`LogFile::open`] (`vmcp_host_process::open_log`: no
/// symlink, no file of another user, created 0600), shared by the capture task and the VM.
/// [`LogFile::close`] closes it at once, whatever the capture task is doing: on Windows an open
/// handle would keep the VM's runtime folder from being removed when the VM is dropped (the
/// capture task is only aborted, and drops its state later).
#[derive(Debug, Clone, Default)]
pub struct LogFile {
    file: Arc<Mutex<Option<std::fs::File>>>,
}

impl LogFile {
    /// Opens `path` for appending (see the type docs).
    pub fn open(path: &Path) -> std::io::Result<LogFile> {
        let f = vmcp_host_process::open_log(path)?;
        Ok(LogFile {
            file: Arc::new(Mutex::new(Some(f))),
        })
    }

    /// Closes the file; later writes are dropped.
    pub fn close(&self) {
        self.lock().take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<std::fs::File>> {
        self.file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `data` (then `trailer`). A local file and chunks of at most 8 KiB: written in
    /// place, without a blocking-pool hop.
    fn append(&self, data: &[u8], trailer: Option<&[u8]>) -> std::io::Result<()> {
        use std::io::Write;
        let mut guard = self.lock();
        let Some(f) = guard.as_mut() else {
            return Ok(());
        };
        f.write_all(data)?;
        if let Some(t) = trailer {
            f.write_all(t)?;
        }
        Ok(())
    }
}

/// Copies `stream` into `tail` and, when given, appends at most [`MAX_LOG_BYTES`] of it to
/// `log`. Ends at end of stream or on a read error.
pub async fn capture<R: AsyncRead + Unpin>(stream: R, tail: Tail, log: Option<LogFile>) {
    capture_limited(stream, tail, log, MAX_LOG_BYTES).await
}

/// [`capture`] with an explicit log size limit.
pub async fn capture_limited<R: AsyncRead + Unpin>(
    mut stream: R,
    tail: Tail,
    mut log: Option<LogFile>,
    limit: u64,
) {
    let mut buf = vec![0u8; 8192];
    let mut written = 0u64;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tail.push(&buf[..n]);
        if let Some(l) = log.clone() {
            let room = usize::try_from(limit.saturating_sub(written)).unwrap_or(usize::MAX);
            let take = n.min(room);
            let trailer: Option<&[u8]> = (take < n).then_some(
                &b"\n[vmcp: console log limit reached; further output is not logged]\n"[..],
            );
            let result = l.append(&buf[..take], trailer);
            written += take as u64;
            if take < n {
                log = None;
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot write the console log; keeping only the tail");
                log = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn keeps_only_the_last_bytes_and_lines() {
        let t = Tail::default();
        t.push(b"first\r\nsecond\n\n");
        t.push(b"third \x1b[31mred\x07\n");
        assert_eq!(t.lines(2), "second\nthird [31mred");
        assert_eq!(t.lines(10), "first\nsecond\nthird [31mred");
        t.push(&vec![b'a'; TAIL_BYTES * 2]);
        let all = t.lines(100);
        assert_eq!(all.len(), TAIL_BYTES);
        assert!(!all.contains("first"));
        assert_eq!(Tail::default().lines(5), "");
    }

    #[tokio::test]
    async fn capture_writes_log_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, b"old\n").unwrap();
        let (mut w, r) = tokio::io::duplex(64);
        let tail = Tail::default();
        let task = tokio::spawn({
            let tail = tail.clone();
            let log = LogFile::open(&log).unwrap();
            async move { capture(r, tail, Some(log)).await }
        });
        w.write_all(b"Linux version 6.1\nkernel panic\n")
            .await
            .unwrap();
        drop(w);
        task.await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "old\nLinux version 6.1\nkernel panic\n"
        );
        assert_eq!(tail.lines(1), "kernel panic");
    }

    #[tokio::test]
    async fn log_file_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let (mut w, r) = tokio::io::duplex(64);
        let tail = Tail::default();
        let t2 = tail.clone();
        let l2 = LogFile::open(&log).unwrap();
        let task = tokio::spawn(async move { capture_limited(r, t2, Some(l2), 10).await });
        w.write_all(b"0123456789abcdef\n").await.unwrap();
        w.write_all(b"more\n").await.unwrap();
        drop(w);
        task.await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.starts_with("0123456789\n[vmcp: console log limit reached"),
            "{text:?}"
        );
        assert!(!text.contains("more"));
        assert_eq!(tail.lines(1), "more");
    }

    #[tokio::test]
    async fn closed_log_still_fills_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let log = LogFile::open(&path).unwrap();
        log.close();
        let (mut w, r) = tokio::io::duplex(64);
        let tail = Tail::default();
        let t2 = tail.clone();
        let task = tokio::spawn(async move { capture(r, t2, Some(log)).await });
        w.write_all(b"hello\n").await.unwrap();
        drop(w);
        task.await.unwrap();
        assert_eq!(tail.lines(1), "hello");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }
}

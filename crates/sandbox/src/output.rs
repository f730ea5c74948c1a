//! Bounded output buffers: what a call collects ([`Capped`]) and what a background process
//! keeps for `sandbox_exec_poll` ([`ProcLog`]).
//!
//! [`ProcLog`] numbers every byte a process wrote (stdout and stderr interleaved, in arrival
//! order) from 0; a poll cursor is such a byte number. The log keeps at most its capacity: when
//! a process writes more than that between two polls, the oldest bytes are dropped and the
//! next poll reports how many it missed. Text is decoded as UTF-8 with replacement characters
//! (a multi-byte character split across two polls shows up as two replacement characters).

use std::collections::VecDeque;

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Collects up to `cap` bytes; counts the rest.
#[derive(Debug, Clone)]
pub struct Capped {
    data: Vec<u8>,
    cap: usize,
    dropped: u64,
}

impl Capped {
    /// An empty buffer that keeps at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Capped {
            data: Vec::new(),
            cap,
            dropped: 0,
        }
    }
    /// Appends what fits; counts the rest as dropped.
    pub fn push(&mut self, bytes: &[u8]) {
        let room = self.cap.saturating_sub(self.data.len());
        let take = room.min(bytes.len());
        self.data.extend_from_slice(&bytes[..take]);
        self.dropped += (bytes.len() - take) as u64;
    }
    /// Bytes not kept.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
    /// The kept bytes as text, with a truncation marker when bytes were dropped.
    pub fn text(&self, what: &str) -> String {
        let mut s = String::from_utf8_lossy(&self.data).into_owned();
        if self.dropped > 0 {
            s.push_str(&format!(
                "\n[vmcp: {what} truncated: {} more bytes not shown (limit {} bytes)]",
                self.dropped, self.cap
            ));
        }
        s
    }
}

/// What a poll returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Polled {
    /// Stdout bytes after the cursor.
    pub stdout: Vec<u8>,
    /// Stderr bytes after the cursor.
    pub stderr: Vec<u8>,
    /// The cursor to pass next time.
    pub next: u64,
    /// Bytes between the given cursor and the oldest kept byte that were dropped.
    pub missed: u64,
    /// More output is already buffered past `next` (the poll hit its size limit).
    pub more: bool,
}

/// A bounded, cursor-addressed log of a process's output.
#[derive(Debug)]
pub struct ProcLog {
    chunks: VecDeque<(Stream, u64, Vec<u8>)>,
    start: u64,
    end: u64,
    kept: usize,
    cap: usize,
}

impl ProcLog {
    /// A log that keeps at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        ProcLog {
            chunks: VecDeque::new(),
            start: 0,
            end: 0,
            kept: 0,
            cap: cap.max(1),
        }
    }

    /// Byte number after the last byte written.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Appends a chunk, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // A chunk larger than the whole log keeps only its tail.
        let (skip, data) = if data.len() > self.cap {
            (data.len() - self.cap, &data[data.len() - self.cap..])
        } else {
            (0, data)
        };
        self.end += skip as u64;
        self.chunks.push_back((stream, self.end, data.to_vec()));
        self.end += data.len() as u64;
        self.kept += data.len();
        while self.kept > self.cap {
            let Some((s, at, mut bytes)) = self.chunks.pop_front() else {
                break;
            };
            let excess = self.kept - self.cap;
            if bytes.len() > excess {
                bytes.drain(..excess);
                self.kept -= excess;
                self.chunks.push_front((s, at + excess as u64, bytes));
            } else {
                self.kept -= bytes.len();
            }
        }
        self.start = self.chunks.front().map_or(self.end, |c| c.1);
    }

    /// Output from `cursor` on, at most `max` bytes.
    pub fn read(&self, cursor: u64, max: usize) -> Polled {
        let cursor = cursor.min(self.end);
        let missed = self.start.saturating_sub(cursor);
        let mut at = cursor.max(self.start);
        let mut out = Polled {
            stdout: Vec::new(),
            stderr: Vec::new(),
            next: at,
            missed,
            more: false,
        };
        let mut budget = max;
        for (stream, start, bytes) in &self.chunks {
            let chunk_end = start + bytes.len() as u64;
            if chunk_end <= at {
                continue;
            }
            if budget == 0 {
                out.more = true;
                break;
            }
            let from = (at - start) as usize;
            let take = (bytes.len() - from).min(budget);
            let slice = &bytes[from..from + take];
            match stream {
                Stream::Stdout => out.stdout.extend_from_slice(slice),
                Stream::Stderr => out.stderr.extend_from_slice(slice),
            }
            budget -= take;
            at += take as u64;
            if from + take < bytes.len() {
                out.more = true;
                break;
            }
        }
        out.next = at;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_marks_truncation() {
        let mut c = Capped::new(5);
        c.push(b"abc");
        c.push(b"defgh");
        assert_eq!(c.dropped(), 3);
        assert_eq!(
            c.text("stdout"),
            "abcde\n[vmcp: stdout truncated: 3 more bytes not shown (limit 5 bytes)]"
        );
        let mut c = Capped::new(5);
        c.push(b"ok");
        assert_eq!(c.text("stdout"), "ok");
    }

    #[test]
    fn log_reads_from_cursors_and_drops_the_oldest() {
        let mut l = ProcLog::new(10);
        l.push(Stream::Stdout, b"hello");
        l.push(Stream::Stderr, b"err");
        let p = l.read(0, 100);
        assert_eq!(
            (
                p.stdout.as_slice(),
                p.stderr.as_slice(),
                p.next,
                p.missed,
                p.more
            ),
            (&b"hello"[..], &b"err"[..], 8, 0, false)
        );
        let p = l.read(3, 3);
        assert_eq!(
            (p.stdout.as_slice(), p.stderr.as_slice(), p.next, p.more),
            (&b"lo"[..], &b"e"[..], 6, true)
        );
        // Past capacity: the oldest bytes go.
        l.push(Stream::Stdout, b"worldwide");
        assert_eq!(l.end(), 17);
        let p = l.read(0, 100);
        assert_eq!(p.missed, 7);
        assert_eq!(p.stderr, b"r");
        assert_eq!(p.stdout, b"worldwide");
        assert_eq!(p.next, 17);
        // A cursor past the end reads nothing.
        let p = l.read(99, 100);
        assert_eq!((p.next, p.stdout.len(), p.missed), (17, 0, 0));
        // A chunk larger than the log keeps its tail.
        l.push(Stream::Stdout, &[b'x'; 25]);
        assert_eq!(l.end(), 42);
        let p = l.read(17, 100);
        assert_eq!((p.missed, p.stdout.len()), (15, 10));
    }

    #[test]
    fn log_never_exceeds_capacity() {
        let mut l = ProcLog::new(64);
        for i in 0..1000usize {
            l.push(
                if i % 2 == 0 {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                },
                &vec![b'a'; i % 50],
            );
            assert!(l.kept <= 64);
        }
        let p = l.read(0, 1 << 20);
        assert_eq!(p.stdout.len() + p.stderr.len(), 64);
        assert_eq!(p.next, l.end());
    }
}

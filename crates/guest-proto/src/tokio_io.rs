//! Async frame I/O for the host side.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{decode, encode, ProtoError};

/// Reads one message, buffering in `buf` (which keeps bytes of later frames between calls).
/// `Ok(None)` means the stream ended cleanly between frames.
///
/// Each call moves the bytes left in `buf` to its front, which costs O(bytes buffered) per
/// message: fine for a handshake or a test peer. A long-lived stream that a peer controls
/// uses [`FrameReader`], whose cost per message does not grow with the buffer.
pub async fn read_msg_async<M: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<M>, ProtoError> {
    loop {
        if let Some((msg, used)) = decode(buf)? {
            buf.drain(..used);
            return Ok(Some(msg));
        }
        buf.reserve(crate::CHUNK_SIZE);
        let n = reader.read_buf(buf).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ProtoError::Truncated)
            };
        }
    }
}

/// Reads frames from a byte stream with amortised O(1) work per frame, whatever the peer
/// sends: decoded frames are consumed by moving a start index, and the buffer is compacted
/// only before the next read, so every byte is moved at most once. The buffer holds at most
/// one partial frame ([`crate::MAX_PAYLOAD`] plus the header) plus one read
/// ([`crate::CHUNK_SIZE`]).
#[derive(Debug)]
pub struct FrameReader<R> {
    reader: R,
    buf: Vec<u8>,
    start: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader over `reader` with an empty buffer.
    pub fn new(reader: R) -> Self {
        FrameReader {
            reader,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// Reads the next message. `Ok(None)` means the stream ended cleanly between frames.
    /// Cancel-safe: bytes already read stay buffered for the next call.
    pub async fn next<M: DeserializeOwned>(&mut self) -> Result<Option<M>, ProtoError> {
        loop {
            if let Some((msg, used)) = decode(&self.buf[self.start..])? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(msg));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.reserve(crate::CHUNK_SIZE);
            let n = self.reader.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtoError::Truncated)
                };
            }
        }
    }

    /// Bytes read but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Writes `msg` as one frame and flushes.
pub async fn write_msg_async<M: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    msg: &M,
) -> Result<(), ProtoError> {
    let frame = encode(msg)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GuestMsg, HostMsg};

    #[tokio::test]
    async fn frame_reader_reads_split_and_batched_frames() {
        let mut bytes = Vec::new();
        for id in 0..1000 {
            crate::encode_into(&GuestMsg::Pong { id }, &mut bytes).unwrap();
        }
        crate::encode_into(
            &GuestMsg::Stdout {
                id: 7,
                data: vec![1; crate::CHUNK_SIZE],
            },
            &mut bytes,
        )
        .unwrap();
        // Delivered in odd-sized pieces through a small pipe.
        let (mut tx, rx) = tokio::io::duplex(333);
        let writer = tokio::spawn(async move {
            for piece in bytes.chunks(97) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let mut r = FrameReader::new(rx);
        for id in 0..1000 {
            assert_eq!(
                r.next::<GuestMsg>().await.unwrap(),
                Some(GuestMsg::Pong { id })
            );
        }
        match r.next::<GuestMsg>().await.unwrap() {
            Some(GuestMsg::Stdout { id: 7, data }) => assert_eq!(data.len(), crate::CHUNK_SIZE),
            other => panic!("{other:?}"),
        }
        writer.await.unwrap();
        assert_eq!(r.next::<GuestMsg>().await.unwrap(), None);
        assert_eq!(r.buffered(), 0);
    }

    #[tokio::test]
    async fn frame_reader_truncated_and_garbage() {
        let frame = encode(&HostMsg::Ping { id: 1 }).unwrap();
        let mut r = FrameReader::new(&frame[..frame.len() - 1]);
        assert!(matches!(
            r.next::<HostMsg>().await,
            Err(ProtoError::Truncated)
        ));
        let mut r = FrameReader::new(&[0xffu8; 16][..]);
        assert!(matches!(
            r.next::<HostMsg>().await,
            Err(ProtoError::FrameTooLarge { .. })
        ));
    }

    /// A flood of tiny frames: the work per frame must not grow with the number of frames
    /// buffered behind it. Counted, not timed: the buffer's bytes moved per frame stay small.
    #[tokio::test]
    async fn tiny_frame_flood_is_linear() {
        let mut bytes = Vec::new();
        let n = 200_000u32;
        for id in 0..n {
            crate::encode_into(&GuestMsg::Done { id }, &mut bytes).unwrap();
        }
        let total = bytes.len();
        // One read delivers everything: a front-draining buffer would move ~total²/2 bytes.
        let mut r = FrameReader::new(&bytes[..]);
        r.buf.reserve(total);
        let start = std::time::Instant::now();
        for id in 0..n {
            assert_eq!(
                r.next::<GuestMsg>().await.unwrap(),
                Some(GuestMsg::Done { id })
            );
        }
        assert_eq!(r.next::<GuestMsg>().await.unwrap(), None);
        // Generous (a quadratic drain of these ~1.4 MB takes minutes, linear takes
        // milliseconds), so a loaded machine does not make it flaky.
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }
}

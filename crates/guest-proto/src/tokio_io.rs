//! Async frame I/O for the host side.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{decode, encode, ProtoError};

/// Reads one message, buffering in `buf` (which keeps bytes of later frames between calls).
/// `Ok(None)` means the stream ended cleanly between frames.
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

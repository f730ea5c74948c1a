//! Framing: encode and decode length-prefixed, versioned frames.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Frame format version, the byte after the length.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the payload: 4 length bytes and the version byte.
pub const HEADER_LEN: usize = 5;
/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Largest data chunk senders put in one message; leaves room for the other fields.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Errors from encoding or decoding frames.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A frame announced a payload larger than the limit.
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The frame's version byte is not [`FRAME_VERSION`].
    #[error("unsupported frame version {0} (this build speaks {FRAME_VERSION})")]
    UnsupportedVersion(u8),
    /// The payload is not a valid message.
    #[error("malformed message payload")]
    Malformed(#[source] postcard::Error),
    /// The payload decoded but had bytes left over.
    #[error("{0} trailing bytes after the message payload")]
    TrailingBytes(usize),
    /// The stream ended inside a frame.
    #[error("channel closed in the middle of a frame")]
    Truncated,
    /// Reading or writing the channel failed.
    #[error("channel I/O failed")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one frame appended to `out`.
pub fn encode_into<M: Serialize>(msg: &M, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, FRAME_VERSION]);
    let buf = std::mem::take(out);
    let mut buf = postcard::to_extend(msg, buf).map_err(ProtoError::Malformed)?;
    let len = buf.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD {
        buf.truncate(start);
        *out = buf;
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    // `len <= MAX_PAYLOAD` fits in u32.
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    *out = buf;
    Ok(())
}

/// Encodes `msg` as one frame.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::new();
    encode_into(msg, &mut out)?;
    Ok(out)
}

/// Checks a frame header and returns the payload length.
fn check_header(header: &[u8; HEADER_LEN]) -> Result<usize, ProtoError> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::FrameTooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    if header[4] != FRAME_VERSION {
        return Err(ProtoError::UnsupportedVersion(header[4]));
    }
    Ok(len)
}

fn decode_payload<M: DeserializeOwned>(payload: &[u8]) -> Result<M, ProtoError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(ProtoError::Malformed)?;
    if !rest.is_empty() {
        return Err(ProtoError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Decodes the first frame of `buf`.
///
/// Returns `Ok(None)` when `buf` holds less than a whole frame (read more and call again), or
/// the message and the number of bytes it used.
pub fn decode<M: DeserializeOwned>(buf: &[u8]) -> Result<Option<(M, usize)>, ProtoError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = check_header(header)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, HEADER_LEN + len)))
}

/// Reads one frame from a blocking reader. `Ok(None)` means the stream ended cleanly between
/// frames. `scratch` is reused for the payload.
pub fn read_msg<M: DeserializeOwned, R: Read>(
    reader: &mut R,
    scratch: &mut Vec<u8>,
) -> Result<Option<M>, ProtoError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtoError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_header(&header)?;
    scratch.clear();
    scratch.resize(len, 0);
    reader.read_exact(scratch).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtoError::Truncated,
        _ => ProtoError::Io(e),
    })?;
    decode_payload(scratch).map(Some)
}

/// Writes `msg` as one frame to a blocking writer (one `write_all`, no flush).
pub fn write_msg<M: Serialize, W: Write>(writer: &mut W, msg: &M) -> Result<(), ProtoError> {
    let frame = encode(msg)?;
    writer.write_all(&frame)?;
    Ok(())
}

#[cfg(test)]
mod tests;

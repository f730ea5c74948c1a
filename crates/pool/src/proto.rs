//! The daemon's socket protocol: versioned, length-prefixed, bounded frames (sans-IO).
//!
//! A frame is a 6-byte header, the protocol version (`u16`, little-endian) and the payload
//! length (`u32`, little-endian), then the payload: one [`Request`] (client to daemon) or one
//! [`Answer`] (daemon to client) in postcard. The length is checked against the direction's
//! limit before anything is allocated ([`MAX_REQUEST`], [`MAX_ANSWER`]), the version before
//! the payload is read, and every string in a decoded message against its own bound
//! ([`Request::check`], [`Answer::check`]); a message with bytes left over is refused.
//!
//! A conversation: the client sends [`Request::Acquire`]; the daemon answers
//! [`Answer::Granted`] with the VM's agent channel attached as an `SCM_RIGHTS` descriptor, or
//! [`Answer::NoVm`] (the client boots its own VM). The client then runs its program over the
//! guest protocol on that descriptor and sends [`Request::Done`] (or just closes the socket);
//! either way the daemon destroys the VM. [`Request::Status`] gets an [`Answer::Status`].

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of this protocol; a daemon answers a frame of another version with
/// [`Answer::Refused`] (in a frame of its own version) and closes.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes before a payload: version (2) and length (4).
pub const HEADER_LEN: usize = 6;
/// Largest payload a client may send (a request is well under 1 KiB plus its paths).
pub const MAX_REQUEST: usize = 16 * 1024;
/// Largest payload the daemon sends (a status report of [`MAX_PROFILES`] profiles).
pub const MAX_ANSWER: usize = 64 * 1024;
/// Longest path in a request (Linux `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest other text field (names, reasons, tokens).
pub const MAX_TEXT_BYTES: usize = 1024;
/// Most profiles in a status report (and in one daemon).
pub const MAX_PROFILES: usize = 64;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    /// The header announced more than the limit.
    #[error("a frame of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Announced payload length.
        len: u64,
        /// The limit of this direction.
        max: usize,
    },
    /// The peer speaks another protocol version.
    #[error("the peer speaks daemon protocol {0}, this vmcp speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The payload is not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A field is longer than its bound.
    #[error("field {field} is {len} bytes, over its {max}-byte bound")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
}

/// The VM a client wants, in `vmcp run`'s terms (flags as given; paths made absolute by the
/// client). The daemon turns it into a profile the same way `vmcp run` does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmRequest {
    /// vCPUs.
    pub cpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Read-only root disk.
    pub rootfs: Option<String>,
    /// Kernel instead of the built image's.
    pub kernel: Option<String>,
    /// Initramfs instead of the built image's.
    pub initrd: Option<String>,
    /// `--backend` as given.
    pub backend: Option<String>,
    /// `--accel` as given.
    pub accel: Option<String>,
}

impl VmRequest {
    /// A request for `cpus` and `memory_mib` with everything else at `vmcp run`'s defaults.
    pub fn new(cpus: u32, memory_mib: u32) -> Self {
        VmRequest {
            cpus,
            memory_mib,
            rootfs: None,
            kernel: None,
            initrd: None,
            backend: None,
            accel: None,
        }
    }

    fn check(&self) -> Result<(), ProtoError> {
        for (field, v) in [
            ("rootfs", &self.rootfs),
            ("kernel", &self.kernel),
            ("initrd", &self.initrd),
        ] {
            check_len(field, v.as_deref().unwrap_or(""), MAX_PATH_BYTES)?;
        }
        check_len("backend", self.backend.as_deref().unwrap_or(""), 32)?;
        check_len("accel", self.accel.as_deref().unwrap_or(""), 32)
    }
}

/// Client to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Hand me a ready VM of this kind.
    Acquire(VmRequest),
    /// The program ended; destroy the VM (closing the socket does the same).
    Done,
    /// Report the pools.
    Status,
}

impl Request {
    /// Checks every field against its bound.
    pub fn check(&self) -> Result<(), ProtoError> {
        match self {
            Request::Acquire(r) => r.check(),
            Request::Done | Request::Status => Ok(()),
        }
    }
}

/// A VM handed to a client; its agent channel travels beside this message (`SCM_RIGHTS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Granted {
    /// The VM's id (its hostname is `vmcp-<id>`).
    pub vm_id: String,
    /// The agent's current channel token; the client re-keys the agent with its own.
    pub token: String,
    /// The profile it came from.
    pub profile: String,
}

/// One pool in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ProfileStatus {
    /// The profile's name (the automatic snapshot's name).
    pub name: String,
    /// vCPUs per VM.
    pub cpus: u32,
    /// Guest memory per VM, MiB.
    pub memory_mib: u32,
    /// Ready VMs wanted.
    pub target: u32,
    /// Ready VMs now.
    pub ready: u32,
    /// VMs being restored.
    pub filling: u32,
    /// VMs handed out and not yet destroyed.
    pub leased: u32,
    /// VMs handed out since the start.
    pub handed_out: u64,
    /// Failed restores since the start.
    pub failures: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// The daemon's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StatusReport {
    /// The daemon's process id.
    pub pid: u32,
    /// Memory budget, MiB of guest memory.
    pub budget_mib: u64,
    /// Guest memory of every VM the daemon holds (ready, being restored, handed out).
    pub used_mib: u64,
    /// One entry per profile.
    pub profiles: Vec<ProfileStatus>,
}

/// Daemon to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Answer {
    /// Here is a VM (descriptor attached).
    Granted(Granted),
    /// No VM for this request now (no such profile, pool empty, image changed); the client
    /// starts its own.
    NoVm {
        /// Why, in words.
        reason: String,
    },
    /// The request itself was refused (another user, a malformed frame, a wrong version).
    Refused {
        /// Why, in words.
        reason: String,
    },
    /// The pools.
    Status(StatusReport),
}

impl Answer {
    /// Checks every field against its bound.
    pub fn check(&self) -> Result<(), ProtoError> {
        match self {
            Answer::Granted(g) => {
                check_len("vm_id", &g.vm_id, MAX_TEXT_BYTES)?;
                check_len("token", &g.token, MAX_TEXT_BYTES)?;
                check_len("profile", &g.profile, MAX_TEXT_BYTES)
            }
            Answer::NoVm { reason } | Answer::Refused { reason } => {
                check_len("reason", reason, MAX_TEXT_BYTES)
            }
            Answer::Status(s) => {
                if s.profiles.len() > MAX_PROFILES {
                    return Err(ProtoError::FieldTooLong {
                        field: "profiles",
                        len: s.profiles.len(),
                        max: MAX_PROFILES,
                    });
                }
                for p in &s.profiles {
                    check_len("name", &p.name, MAX_TEXT_BYTES)?;
                    check_len(
                        "last_error",
                        p.last_error.as_deref().unwrap_or(""),
                        MAX_TEXT_BYTES,
                    )?;
                }
                Ok(())
            }
        }
    }
}

fn check_len(field: &'static str, v: &str, max: usize) -> Result<(), ProtoError> {
    if v.len() > max {
        return Err(ProtoError::FieldTooLong {
            field,
            len: v.len(),
            max,
        });
    }
    Ok(())
}

/// Cuts `text` to at most `max` bytes on a character boundary (for reasons and errors the
/// daemon puts into answers).
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Encodes `msg` as one frame whose payload may be at most `max` bytes.
pub fn encode<M: Serialize>(msg: &M, max: usize) -> Result<Vec<u8>, ProtoError> {
    let payload = postcard::to_stdvec(msg).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if payload.len() > max {
        return Err(ProtoError::TooLarge {
            len: payload.len() as u64,
            max,
        });
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Checks a frame header: the payload length that follows, at most `max`.
pub fn parse_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, ProtoError> {
    let version = u16::from_le_bytes([header[0], header[1]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::Version(version));
    }
    let len = u32::from_le_bytes([header[2], header[3], header[4], header[5]]);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > max {
        return Err(ProtoError::TooLarge {
            len: len as u64,
            max,
        });
    }
    Ok(len)
}

/// Decodes one payload; bytes left over are an error.
pub fn decode<M: DeserializeOwned>(payload: &[u8]) -> Result<M, ProtoError> {
    let (msg, rest) =
        postcard::take_from_bytes(payload).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Decodes and checks one request payload.
pub fn decode_request(payload: &[u8]) -> Result<Request, ProtoError> {
    let r: Request = decode(payload)?;
    r.check()?;
    Ok(r)
}

/// Decodes and checks one answer payload.
pub fn decode_answer(payload: &[u8]) -> Result<Answer, ProtoError> {
    let a: Answer = decode(payload)?;
    a.check()?;
    Ok(a)
}

/// Splits the first whole frame off `buf`: `Ok(None)` while it is incomplete.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, ProtoError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let len = parse_header(h, max)?;
    Ok(buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .map(|p| (p, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req() -> Request {
        let mut r = VmRequest::new(1, 256);
        r.rootfs = Some("/x/disk.ext4".into());
        Request::Acquire(r)
    }

    #[test]
    fn frames_round_trip() {
        for msg in [req(), Request::Done, Request::Status] {
            let f = encode(&msg, MAX_REQUEST).unwrap();
            let (p, used) = split_frame(&f, MAX_REQUEST).unwrap().unwrap();
            assert_eq!(used, f.len());
            assert_eq!(decode_request(p).unwrap(), msg);
        }
        let a = Answer::Granted(Granted {
            vm_id: "abc".into(),
            token: "t".into(),
            profile: "auto-1".into(),
        });
        let f = encode(&a, MAX_ANSWER).unwrap();
        let (p, _) = split_frame(&f, MAX_ANSWER).unwrap().unwrap();
        assert_eq!(decode_answer(p).unwrap(), a);
        // Incomplete frames wait for more bytes.
        assert_eq!(split_frame(&f[..3], MAX_ANSWER).unwrap(), None);
        assert_eq!(split_frame(&f[..f.len() - 1], MAX_ANSWER).unwrap(), None);
    }

    #[test]
    fn oversized_frames_are_refused_from_the_header_alone() {
        let mut h = [0u8; HEADER_LEN];
        h[..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        h[2..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            parse_header(h, MAX_REQUEST),
            Err(ProtoError::TooLarge {
                len: u64::from(u32::MAX),
                max: MAX_REQUEST
            })
        );
        let len = u32::try_from(MAX_REQUEST + 1).unwrap();
        h[2..].copy_from_slice(&len.to_le_bytes());
        assert!(parse_header(h, MAX_REQUEST).is_err());
        // The sender refuses to build one, too.
        let mut r = VmRequest::new(1, 1);
        r.kernel = Some("k".repeat(MAX_REQUEST));
        assert!(matches!(
            encode(&Request::Acquire(r), MAX_REQUEST),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn other_versions_trailing_bytes_and_long_fields_are_refused() {
        let mut f = encode(&Request::Status, MAX_REQUEST).unwrap();
        f[0] = 9;
        assert_eq!(
            split_frame(&f, MAX_REQUEST).unwrap_err(),
            ProtoError::Version(9)
        );
        let mut payload = postcard::to_stdvec(&Request::Done).unwrap();
        payload.push(0);
        assert!(decode_request(&payload)
            .unwrap_err()
            .to_string()
            .contains("after the message"));
        let mut r = VmRequest::new(1, 1);
        r.rootfs = Some("/".repeat(MAX_PATH_BYTES + 1));
        let payload = postcard::to_stdvec(&Request::Acquire(r)).unwrap();
        assert!(matches!(
            decode_request(&payload),
            Err(ProtoError::FieldTooLong {
                field: "rootfs",
                ..
            })
        ));
        let a = Answer::NoVm {
            reason: "r".repeat(MAX_TEXT_BYTES + 1),
        };
        assert!(decode_answer(&postcard::to_stdvec(&a).unwrap()).is_err());
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("abc", 10), "abc");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(&bytes);
            let _ = decode_answer(&bytes);
            let _ = split_frame(&bytes, MAX_REQUEST);
        }
    }
}

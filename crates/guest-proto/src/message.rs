//! Message types carried in frames.

use serde::{Deserialize, Serialize};

/// Version of the message set. The guest announces it in [`Hello`]; the host refuses a guest
/// whose version it does not speak.
pub const PROTOCOL_VERSION: u16 = 1;

/// Host-chosen identifier that ties answers to their request.
pub type RequestId = u32;

/// Capability bits a guest agent announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// Runs processes ([`HostMsg::Exec`]).
    pub const EXEC: u64 = 1 << 0;
    /// Reads and writes files ([`HostMsg::ReadFile`], [`HostMsg::WriteFile`]).
    pub const FILES: u64 = 1 << 1;
    /// Powers the VM off on request ([`HostMsg::Poweroff`]).
    pub const POWEROFF: u64 = 1 << 2;
    /// Delivers signals to running processes ([`HostMsg::Signal`]).
    pub const SIGNAL: u64 = 1 << 3;
    /// A root filesystem from a block device is mounted.
    pub const ROOTFS: u64 = 1 << 4;
    /// Takes a new identity after a snapshot restore ([`HostMsg::Rekey`]).
    pub const REKEY: u64 = 1 << 5;

    /// Whether every bit of `bits` is set.
    pub fn has(self, bits: u64) -> bool {
        self.0 & bits == bits
    }
}

/// First message of the guest on a fresh channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol_version: u16,
    /// Agent build version (informational).
    pub agent_version: String,
    /// What the agent can do.
    pub capabilities: Capabilities,
    /// The channel token the host passed on the kernel command line (`vmcp.token=`); empty if
    /// none was given. The host drops a channel whose token does not match.
    pub token: String,
    /// Guest `CLOCK_BOOTTIME` in nanoseconds when the agent sent this message.
    pub boot_ns: u64,
}

/// A process to start in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Request id; every later message about this process uses it.
    pub id: RequestId,
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Extra environment variables, applied over the agent's default environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's default (`/`) when `None`.
    pub cwd: Option<String>,
    /// Whether the host streams stdin ([`HostMsg::Stdin`], [`HostMsg::StdinEof`]); when false
    /// the process reads `/dev/null`.
    pub stdin: bool,
}

/// A new identity for a guest restored from a snapshot: every VM restored from one snapshot
/// starts with the same memory, so the host gives each its own token, fresh entropy for the
/// kernel's random number generator, the current wall clock and a hostname.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rekey {
    /// Request id (a failure names it).
    pub id: RequestId,
    /// The channel token from now on: the agent presents it in every later [`Hello`], and
    /// the one it booted with is forgotten.
    pub token: String,
    /// Random bytes from the host, mixed into the guest kernel's pool, which is then
    /// reseeded (at most [`Rekey::MAX_ENTROPY`] bytes).
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
    /// Host wall clock, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
    /// The guest's hostname from now on (empty: keep it).
    pub hostname: String,
}

impl Rekey {
    /// Most entropy bytes a re-key may carry.
    pub const MAX_ENTROPY: usize = 512;
}

impl std::fmt::Debug for Rekey {
    // The token and the entropy are secrets: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rekey")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .field("entropy", &format_args!("<{} bytes>", self.entropy.len()))
            .field("unix_time_ns", &self.unix_time_ns)
            .field("hostname", &self.hostname)
            .finish()
    }
}

/// Messages from host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HostMsg {
    /// Answered by [`GuestMsg::Pong`].
    Ping {
        /// Request id.
        id: RequestId,
    },
    /// Start a process: answered by [`GuestMsg::Started`] then output and
    /// [`GuestMsg::Exited`], or by [`GuestMsg::Failed`].
    Exec(ExecRequest),
    /// Bytes for the stdin of process `id`.
    Stdin {
        /// Exec request id.
        id: RequestId,
        /// Data (at most [`crate::CHUNK_SIZE`] bytes).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Close the stdin of process `id`.
    StdinEof {
        /// Exec request id.
        id: RequestId,
    },
    /// Send signal `signal` to process `id` (no answer; the process's exit follows).
    Signal {
        /// Exec request id.
        id: RequestId,
        /// Signal number (Linux numbering).
        signal: i32,
    },
    /// Write one chunk of a file: `offset == 0` creates or truncates it; `last` finishes it.
    /// Every chunk is answered by [`GuestMsg::Done`] or [`GuestMsg::Failed`].
    WriteFile {
        /// Request id (the same for all chunks of one file).
        id: RequestId,
        /// Absolute guest path.
        path: String,
        /// Permission bits for a created file.
        mode: u32,
        /// Byte offset of `data` in the file.
        offset: u64,
        /// File data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Whether this is the last chunk.
        last: bool,
    },
    /// Read a whole file: answered by [`GuestMsg::FileData`] chunks, the last with `eof`, or
    /// by [`GuestMsg::Failed`].
    ReadFile {
        /// Request id.
        id: RequestId,
        /// Absolute guest path.
        path: String,
    },
    /// Sync filesystems and power the VM off; answered by [`GuestMsg::Done`] just before.
    Poweroff {
        /// Request id.
        id: RequestId,
    },
    /// Take a new identity after a snapshot restore (capability [`Capabilities::REKEY`]):
    /// answered by a new [`GuestMsg::Hello`] carrying the new token, or by
    /// [`GuestMsg::Failed`]. The host sends it before any other request on a restored VM.
    Rekey(Rekey),
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// Why a request failed in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FailureKind {
    /// A program or file does not exist.
    NotFound,
    /// Permission denied (for exec: not executable).
    PermissionDenied,
    /// The request was malformed (empty argv, relative path, unknown id, ...).
    InvalidRequest,
    /// Any other error.
    Other,
}

/// Messages from guest to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GuestMsg {
    /// First message on a channel.
    Hello(Hello),
    /// Answer to [`HostMsg::Ping`].
    Pong {
        /// Request id.
        id: RequestId,
    },
    /// The process of exec `id` is running.
    Started {
        /// Exec request id.
        id: RequestId,
        /// Guest process id.
        pid: u32,
    },
    /// Stdout bytes of exec `id`.
    Stdout {
        /// Exec request id.
        id: RequestId,
        /// Data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Stderr bytes of exec `id`.
    Stderr {
        /// Exec request id.
        id: RequestId,
        /// Data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The process of exec `id` ended; sent after all of its output.
    Exited {
        /// Exec request id.
        id: RequestId,
        /// Exit code or signal.
        status: ExitStatus,
    },
    /// A request succeeded (file chunk written, poweroff accepted).
    Done {
        /// Request id.
        id: RequestId,
    },
    /// A request failed.
    Failed {
        /// Request id.
        id: RequestId,
        /// Classification.
        kind: FailureKind,
        /// Human-readable reason from the guest.
        message: String,
    },
    /// A chunk of a file being read.
    FileData {
        /// Request id.
        id: RequestId,
        /// Data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Whether this is the last chunk.
        eof: bool,
    },
}

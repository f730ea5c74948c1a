//! Message types carried in frames.

use serde::{Deserialize, Serialize};

/// Version of the message set. The guest announces it in [`Hello`]; the host refuses a guest
/// whose version it does not speak (and a host of an older version refuses this one), so an
/// old agent meeting a new host, or the reverse, ends in a clear version error at the
/// handshake, never in a stall.
///
/// History: 1 = the first message set; 2 = per-request flow control ([`HostMsg::Credit`],
/// [`HostMsg::Discard`], [`GuestMsg::StdinCredit`], [`STREAM_WINDOW`]). [`HostMsg::Rekey`]
/// came without a version change: it is gated by [`Capabilities::REKEY`]; so did the TCP
/// tunnel ([`HostMsg::TcpAccept`], [`HostMsg::TcpConnect`], [`Capabilities::TCP`]).
pub const PROTOCOL_VERSION: u16 = 2;

/// Flow-control window of one request, per direction, in credit units (see [`credit_cost`]).
///
/// Guest to host: the guest sends output ([`GuestMsg::Stdout`], [`GuestMsg::Stderr`],
/// [`GuestMsg::FileData`]) of one request only while the cost of what it sent and the host
/// has not yet given back with [`HostMsg::Credit`] stays within this window. The host gives
/// credit back as its consumer takes the data, so a consumer that stops reading stops the
/// guest process (its pipe fills up) instead of growing host memory.
///
/// Host to guest: the host sends [`HostMsg::Stdin`] of one process only within the window;
/// the guest gives credit back with [`GuestMsg::StdinCredit`] once the bytes are in the
/// process's stdin pipe.
///
/// A peer that overruns the window breaks the protocol; the receiver stops trusting it
/// (the host closes the channel, the guest closes that process's stdin).
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Credit units one message costs beyond its data bytes, so that a flood of empty or tiny
/// messages is bounded by the window too (it stands for the receiver's per-message
/// bookkeeping).
pub const MSG_COST: u32 = 64;

/// Credit units a data message carrying `data_len` bytes costs: `data_len + MSG_COST`,
/// saturating.
pub fn credit_cost(data_len: usize) -> u32 {
    u32::try_from(data_len)
        .unwrap_or(u32::MAX)
        .saturating_add(MSG_COST)
}

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
    /// `/` is an image under a writable layer whose changes can be listed
    /// ([`HostMsg::ListChanges`]).
    pub const CHANGES: u64 = 1 << 6;
    /// Host directories are shared in and a writable share's changes can be exported
    /// ([`HostMsg::ExportShare`]).
    pub const SHARES: u64 = 1 << 7;
    /// Tunnels TCP connections of guest loopback over the channel ([`HostMsg::TcpAccept`],
    /// [`HostMsg::TcpConnect`]).
    pub const TCP: u64 = 1 << 8;

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
    /// The host's consumer took output of request `id` worth `credit` units (see
    /// [`credit_cost`]): the guest may send that much more within [`STREAM_WINDOW`]. Credit
    /// for an unknown or finished request is ignored. No answer.
    Credit {
        /// Exec or read-file request id.
        id: RequestId,
        /// Credit units given back.
        credit: u32,
    },
    /// The host no longer reads the answers of request `id`: the guest stops sending its
    /// output (a process keeps running and its output is read and dropped; a file read
    /// stops). The exit of a process is still reported. No answer.
    Discard {
        /// Exec or read-file request id.
        id: RequestId,
    },
    /// Take a new identity after a snapshot restore (capability [`Capabilities::REKEY`]):
    /// answered by a new [`GuestMsg::Hello`] carrying the new token, or by
    /// [`GuestMsg::Failed`]. The host sends it before any other request on a restored VM.
    Rekey(Rekey),
    /// List what changed under the writable layer of an image root: answered by
    /// [`GuestMsg::FileData`] chunks of text, one change per line (`A`dded, `M`odified or
    /// `D`eleted, a space, the absolute path with `%`, control bytes and DEL written as
    /// `%XX`), the last chunk with `eof`; or by [`GuestMsg::Failed`] when there is no
    /// image (see [`Capabilities::CHANGES`]).
    ListChanges {
        /// Request id.
        id: RequestId,
    },
    /// Export what processes changed in writable share number `index` (in `vmcp.share=`
    /// order) as an uncompressed tar stream in OCI layer form (deletions as `.wh.NAME`,
    /// recreated directories marked with `.wh..wh..opq`): answered by [`GuestMsg::FileData`]
    /// chunks, the last with `eof`, or by [`GuestMsg::Failed`].
    ExportShare {
        /// Request id.
        id: RequestId,
        /// Share number.
        index: u32,
    },
    /// Hand over the next TCP connection a guest process makes to `127.0.0.1:port` (capability
    /// [`Capabilities::TCP`]). The first request for a port makes the agent listen there (on
    /// guest loopback only; the listener lives as long as the channel session); connections
    /// wait in the kernel's backlog until a request takes them, in request order. Answered by
    /// [`GuestMsg::Connected`] once a connection arrives (no answer timeout applies), or by
    /// [`GuestMsg::Failed`]. From then on `id` names the connection: see
    /// [`HostMsg::TcpData`].
    TcpAccept {
        /// Request id; names the connection once it is answered.
        id: RequestId,
        /// Guest loopback port (not 0).
        port: u16,
    },
    /// Connect to `127.0.0.1:port` in the guest (a port published to the host): answered by
    /// [`GuestMsg::Connected`] or [`GuestMsg::Failed`]; then `id` names the connection.
    TcpConnect {
        /// Request id; names the connection once it is answered.
        id: RequestId,
        /// Guest loopback port (not 0).
        port: u16,
    },
    /// Bytes for connection `id`, sent within the connection's window of
    /// [`STREAM_WINDOW`] (the guest gives credit back with [`GuestMsg::StdinCredit`] once
    /// the bytes are written to the socket).
    TcpData {
        /// Connection (its accept or connect request id).
        id: RequestId,
        /// Data (at most [`crate::CHUNK_SIZE`] bytes).
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The host sends no more bytes on connection `id` (the guest shuts the socket down for
    /// writing once the queued bytes are written). [`HostMsg::Discard`] instead closes the
    /// connection at once in both directions.
    TcpEof {
        /// Connection.
        id: RequestId,
    },
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
    /// Stdin of exec `id` worth `credit` units (see [`credit_cost`]) went into the process's
    /// pipe (or was dropped because the process closed it): the host may send that much more
    /// within [`STREAM_WINDOW`]. The same for [`HostMsg::TcpData`] of connection `id`.
    StdinCredit {
        /// Exec request id or connection.
        id: RequestId,
        /// Credit units given back.
        credit: u32,
    },
    /// Answer to [`HostMsg::TcpAccept`] and [`HostMsg::TcpConnect`]: connection `id` is open.
    Connected {
        /// The request id, from now on the connection's.
        id: RequestId,
    },
    /// Bytes a guest process wrote to connection `id`, sent within its output window like
    /// [`GuestMsg::Stdout`].
    TcpData {
        /// Connection.
        id: RequestId,
        /// Data.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The guest process closed its side of connection `id` for writing (or the connection
    /// ended): no more [`GuestMsg::TcpData`] follows. A connection that broke instead ends
    /// with [`GuestMsg::Failed`]. The connection is over once both sides sent their end of
    /// file; the host then forgets the id.
    TcpEof {
        /// Connection.
        id: RequestId,
    },
}

impl GuestMsg {
    /// The request this message answers (`None` for [`GuestMsg::Hello`]).
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            GuestMsg::Hello(_) => None,
            GuestMsg::Pong { id }
            | GuestMsg::Started { id, .. }
            | GuestMsg::Stdout { id, .. }
            | GuestMsg::Stderr { id, .. }
            | GuestMsg::Exited { id, .. }
            | GuestMsg::Done { id }
            | GuestMsg::Failed { id, .. }
            | GuestMsg::FileData { id, .. }
            | GuestMsg::StdinCredit { id, .. }
            | GuestMsg::Connected { id }
            | GuestMsg::TcpData { id, .. }
            | GuestMsg::TcpEof { id } => Some(*id),
        }
    }

    /// Credit units this message uses of its request's window: [`credit_cost`] of the data
    /// for output messages, 0 for everything else.
    pub fn window_cost(&self) -> u32 {
        match self {
            GuestMsg::Stdout { data, .. }
            | GuestMsg::Stderr { data, .. }
            | GuestMsg::FileData { data, .. }
            | GuestMsg::TcpData { data, .. } => credit_cost(data.len()),
            GuestMsg::Hello(_)
            | GuestMsg::Pong { .. }
            | GuestMsg::Started { .. }
            | GuestMsg::Exited { .. }
            | GuestMsg::Done { .. }
            | GuestMsg::Failed { .. }
            | GuestMsg::StdinCredit { .. }
            | GuestMsg::Connected { .. }
            | GuestMsg::TcpEof { .. } => 0,
        }
    }
}

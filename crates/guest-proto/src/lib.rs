//! The host <-> guest agent protocol of vmcp.
//!
//! Every message travels in one frame:
//!
//! ```text
//! +----------------+---------+-----------------------------+
//! | length: u32 LE | version | payload (postcard, `length`) |
//! +----------------+---------+-----------------------------+
//! ```
//!
//! `version` is [`FRAME_VERSION`]; the payload is a [`HostMsg`] (host to guest) or a
//! [`GuestMsg`] (guest to host) encoded with `postcard`. A payload is never larger than
//! [`MAX_PAYLOAD`]: bulk data (process output, files) is split into chunks of at most
//! [`CHUNK_SIZE`] bytes. The decoder checks the length before it allocates, so any byte
//! sequence yields a message or an error, never a panic or an unbounded allocation.
//!
//! After the channel is connected the guest sends [`GuestMsg::Hello`] with its
//! [`PROTOCOL_VERSION`], its capabilities and the channel token it was given on the kernel
//! command line; the host checks both before it sends any request. Requests carry a
//! host-chosen [`RequestId`]; every answer names the request it belongs to, so many execs and
//! file transfers share one channel.
//!
//! Flow control (protocol 2): output and stdin of each request travel within a window of
//! [`STREAM_WINDOW`] credit units per direction, given back with [`HostMsg::Credit`] and
//! [`GuestMsg::StdinCredit`]; see [`STREAM_WINDOW`]. So neither side has to buffer more than
//! one window per request, whatever the other side's reader does.
//!
//! The crate is sans-IO at its core ([`encode`], [`decode`]) with small blocking helpers
//! ([`read_msg`], [`write_msg`]) for the guest and async ones for the host (feature `tokio`).

mod codec;
mod env;
mod message;
#[cfg(feature = "tokio")]
mod tokio_io;

pub use codec::{
    decode, encode, encode_into, read_msg, write_msg, ProtoError, CHUNK_SIZE, FRAME_VERSION,
    HEADER_LEN, MAX_PAYLOAD,
};
pub use env::proxy_env;
pub use message::{
    credit_cost, Capabilities, ExecRequest, ExitStatus, FailureKind, GuestMsg, Hello, HostMsg,
    Rekey, RequestId, MSG_COST, PROTOCOL_VERSION, STREAM_WINDOW,
};
#[cfg(feature = "tokio")]
pub use tokio_io::{read_msg_async, write_msg_async, FrameReader};

//! The rstream agent wire protocol (version 1.4.5) as strait speaks it.
//!
//! - [`messages`]: the protobuf messages, field for field;
//! - [`frame`]: the length-prefixed codec with the 65,535-byte ceiling;
//! - [`prefixed`]: a stream that replays bytes read ahead of a switch to raw
//!   bytes, so nothing behind a first frame is lost;
//! - [`splice`]: the one copy loop, used by the engine and the agent.

#![forbid(unsafe_code)]

pub mod frame;
/// What the fuzz targets (`fuzz/`) and the property tests check.
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod messages;
pub mod packet;
pub mod prefixed;
pub mod quic;
pub mod splice;

pub use frame::{FrameError, FrameReader, MAX_FRAME_LEN, encode, write_message};
pub use io::{BoxIo, Io};
pub use messages::*;
pub use prefixed::Prefixed;

/// The protocol version this build speaks, as agents send it.
pub const PROTOCOL_VERSION: &str = "1.4.5";

/// strait's extensions of the protocol, named in
/// `ClientDetails.strait_features` and `ServerDetails.strait_features`
/// (field 1000, unknown to rstream's own engines and SDKs, which skip it).
/// An extension is used only when both ends name it.
pub mod features {
    /// A packet of a datagram channel too large for a QUIC datagram
    /// crosses on the channel's spill stream: the agent's reverse dial
    /// (`ProxyReq`) for the channel's stream id with its secret, opened when
    /// the first such packet comes either way (the engine asks with a
    /// `ProxyConnReq` repeating the channel's stream id). Packets on it are
    /// framed as in `packet`.
    pub const DATAGRAM_SPILL: &str = "strait.datagram-spill/1";
}

/// ALPN that selects the agent protocol on the engine's TLS port.
pub const ALPN: &[u8] = b"rstrm/1";

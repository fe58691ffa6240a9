//! One agent-protocol channel, whatever carries it (a TLS connection or a
//! QUIC bidirectional stream): its first frame says what it is.
//!
//! - `OpenControlChannelReq`: an agent's control channel ([`control`]);
//! - `ProxyReq`: an agent dialling back for a stream ([`streams`]);
//! - `StreamReq`: a private dial ([`streams`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use strait_proto::{FrameError, FrameReader, Message, Payload};

use crate::admission::HandshakeSlot;
use crate::net::{BoxIo, Transport};
use crate::{Shared, control, streams};

/// Serves one channel. `slot` is its source's handshake slot (a QUIC
/// connection's first stream carries it), given back once the first frame
/// is in: until then the peer has proved nothing.
pub async fn serve(
    shared: Arc<Shared>,
    io: BoxIo,
    peer: SocketAddr,
    transport: Transport,
    slot: Option<HandshakeSlot>,
) {
    let first = Box::pin(first_frame(&shared, io)).await;
    drop(slot);
    let Some((io, rest, first)) = first else { return };
    match first.payload {
        Some(Payload::OpenControlChannelReq(req)) => {
            Box::pin(control::serve(shared, io, rest, req, peer, transport)).await
        }
        Some(Payload::ProxyReq(req)) => {
            Box::pin(streams::accept_agent_stream(&shared, io, rest, req, &transport)).await
        }
        Some(Payload::StreamReq(req)) => Box::pin(streams::private_dial(shared, io, rest, req, peer, transport)).await,
        Some(other) => {
            tracing::warn!(message = other.name(), "agent channel refused: unexpected first frame");
        }
        None => tracing::warn!("agent channel refused: empty first frame"),
    }
}

/// Reads the first frame under `limits.first_frame_seconds`; returns the
/// channel with any bytes that came behind the frame.
async fn first_frame(shared: &Shared, io: BoxIo) -> Option<(BoxIo, Bytes, Message)> {
    let mut reader = FrameReader::new(io, shared.config.limits.max_frame_bytes);
    let deadline = Duration::from_secs(shared.config.limits.first_frame_seconds);
    let first = match tokio::time::timeout(deadline, reader.read_message()).await {
        Ok(Ok(message)) => message,
        Ok(Err(FrameError::Closed)) => {
            tracing::debug!("agent channel closed before its first frame");
            return None;
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "agent channel refused: bad first frame");
            return None;
        }
        Err(_) => {
            tracing::warn!("agent channel refused: no first frame within {}s", deadline.as_secs());
            return None;
        }
    };
    let (io, rest) = reader.into_parts();
    Some((io, rest, first))
}

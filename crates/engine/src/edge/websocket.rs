//! The one WebSocket frame the edge writes itself: the close frame that
//! ends an upgraded WebSocket silent for `timeouts.http_idle_seconds`.
//!
//! The edge never parses the frames it carries. When the idle timer fires,
//! no byte moved on the public connection for the whole period, so no
//! frame is half sent (unless a peer stopped reading in the middle of one,
//! and then it reads nothing more anyway) and one of the edge's own fits
//! between frames:
//! `1001` (going away) to the public client, unmasked as a server's frames
//! are, and to the service, masked as a client's frames must be (RFC 6455
//! section 5.3). Then each side is closed once it answered or
//! [`CLOSE_WAIT`] passed.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The status code of the close frame: the endpoint is going away
/// (RFC 6455 section 7.4.1).
pub const GOING_AWAY: u16 = 1001;

/// The reason the close frame gives.
pub const IDLE_REASON: &str = "idle timeout";

/// How long each side has to answer the close frame and end its half of
/// the connection before it is cut.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A final close frame with [`GOING_AWAY`] and [`IDLE_REASON`], masked with
/// `mask` when one is given (a client's frame).
fn close_frame(mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut payload = GOING_AWAY.to_be_bytes().to_vec();
    payload.extend_from_slice(IDLE_REASON.as_bytes());
    // FIN and the close opcode; a payload under 126 bytes fits the length
    // byte, whose top bit says whether a masking key follows.
    let mut frame = vec![0x88, payload.len() as u8];
    if let Some(key) = mask {
        frame[1] |= 0x80;
        frame.extend_from_slice(&key);
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= key[i % 4];
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// Closes an idle WebSocket: a close frame to each side, then the end of
/// the connection.
pub async fn close_idle<P, U>(public: &mut P, upstream: &mut U)
where
    P: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let to_public = close_frame(None);
    let to_service = close_frame(Some(rand::random()));
    let closing = async { tokio::join!(say_close(public, &to_public), say_close(upstream, &to_service)) };
    let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
}

/// Sends `frame` and ends this side's writing (the closer of a WebSocket
/// closes its connection first, RFC 6455 section 7.1.1), then reads the
/// peer's answering close frame and whatever else it still sends until it
/// ends its side too.
async fn say_close<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, frame: &[u8]) -> io::Result<()> {
    io.write_all(frame).await?;
    io.flush().await?;
    io.shutdown().await?;
    let mut sink = [0u8; 1024];
    while io.read(&mut sink).await? > 0 {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_carry_1001_masked_only_towards_the_service() {
        let plain = close_frame(None);
        assert_eq!(&plain[..4], &[0x88, 14, 0x03, 0xe9]);
        assert_eq!(&plain[4..], b"idle timeout");
        let key = [1, 2, 3, 4];
        let masked = close_frame(Some(key));
        assert_eq!(&masked[..6], &[0x88, 0x80 | 14, 1, 2, 3, 4]);
        let unmasked: Vec<u8> = masked[6..].iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
        assert_eq!(unmasked, &plain[2..]);
    }
}

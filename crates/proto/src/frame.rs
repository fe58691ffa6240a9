//! Length-prefixed framing: a big-endian `u32` length, then one protobuf
//! [`Message`]. One codec serves the engine, the agent and the tests.
//!
//! The reader is buffered, and a stream connection switches from frames to
//! raw bytes after its first message: whatever was read past that frame is
//! handed back by [`FrameReader::into_parts`] so no payload byte is lost.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::messages::Message;

/// The protocol's ceiling on one frame's payload.
pub const MAX_FRAME_LEN: usize = 65_535;

const LEN_PREFIX: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("frame is not a valid protobuf Message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("frame carries no message")]
    Empty,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads frames from `io`, keeping any bytes read past the last frame.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, max: usize) -> Self {
        Self { io, buf: BytesMut::with_capacity(4096), max }
    }

    /// A reader that first parses `already_read`, bytes taken from `io` earlier.
    pub fn with_buffer(io: R, already_read: Bytes, max: usize) -> Self {
        let mut buf = BytesMut::with_capacity(already_read.len().max(4096));
        buf.extend_from_slice(&already_read);
        Self { io, buf, max }
    }

    /// Reads one message. A message without a payload is [`FrameError::Empty`]:
    /// every frame of the protocol names what it is.
    pub async fn read_message(&mut self) -> Result<Message, FrameError> {
        loop {
            if self.buf.len() >= LEN_PREFIX {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
                if len > self.max {
                    return Err(FrameError::TooLarge { len, max: self.max });
                }
                if self.buf.len() >= LEN_PREFIX + len {
                    self.buf.advance(LEN_PREFIX);
                    let body = self.buf.split_to(len);
                    let message = Message::decode(body)?;
                    if message.payload.is_none() {
                        return Err(FrameError::Empty);
                    }
                    return Ok(message);
                }
                self.buf.reserve(LEN_PREFIX + len - self.buf.len());
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Err(FrameError::Closed);
                }
                let want = if self.buf.len() >= LEN_PREFIX {
                    LEN_PREFIX + u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
                } else {
                    LEN_PREFIX
                };
                return Err(FrameError::Truncated { have: self.buf.len(), want });
            }
        }
    }

    /// The underlying reader and the bytes already read past the last frame.
    pub fn into_parts(self) -> (R, Bytes) {
        (self.io, self.buf.freeze())
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }
}

/// Encodes one message with its length prefix.
pub fn encode(message: &Message) -> Result<Vec<u8>, FrameError> {
    let len = message.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    let mut out = Vec::with_capacity(LEN_PREFIX + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode(&mut out).expect("Vec grows as needed");
    Ok(out)
}

/// Writes one message and flushes, so a TLS record leaves at once.
pub async fn write_message<W: AsyncWrite + Unpin>(io: &mut W, message: &Message) -> Result<(), FrameError> {
    let bytes = encode(message)?;
    io.write_all(&bytes).await?;
    io.flush().await?;
    Ok(())
}

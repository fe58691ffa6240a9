//! What the fuzz targets (`fuzz/`) and the property tests check in this
//! crate: one function per target, taking arbitrary bytes and panicking when
//! a property fails. Not part of the protocol API.
//!
//! - [`frames`]: the length-prefixed codec read in one piece, in random
//!   pieces and behind bytes already read all agree; every message read
//!   re-encodes and reads back equal; the bytes past the last frame are
//!   handed back whole;
//! - [`messages`]: each message type decodes arbitrary bytes or refuses
//!   them, and what it decodes re-encodes to bytes that decode equal.
//!
//! Also the helpers the engine's targets share: [`Input`] to split the
//! fuzzer's bytes, [`Pieces`] to deliver them in pieces, [`block_on`] to run
//! a read that never waits.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use prost::Message as _;
use tokio::io::{AsyncRead, ReadBuf};

use crate::frame::{FrameError, FrameReader, MAX_FRAME_LEN, encode};
use crate::messages::*;

/// The fuzzer's bytes, taken from the front.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next byte, 0 once the input is used up.
    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }

    /// The next two bytes, big-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    /// The bytes up to the next `separator` (or the end), which is skipped.
    pub fn until(&mut self, separator: u8) -> &'a [u8] {
        match self.0.iter().position(|b| *b == separator) {
            Some(at) => {
                let taken = &self.0[..at];
                self.0 = &self.0[at + 1..];
                taken
            }
            None => std::mem::take(&mut self.0),
        }
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// A reader that yields `data` in pieces: all at once (`pattern` 0), byte by
/// byte (1), or in pseudo-random sizes from 1 to `pattern`. It never waits.
pub struct Pieces<'a> {
    data: &'a [u8],
    pattern: u8,
    state: u32,
}

impl<'a> Pieces<'a> {
    pub fn new(data: &'a [u8], pattern: u8) -> Self {
        Self { data, pattern, state: 0x9e37_79b9 ^ u32::from(pattern) }
    }

    /// What has not been read yet.
    pub fn unread(&self) -> &'a [u8] {
        self.data
    }

    /// The next piece, at most `limit` bytes; empty once everything is read.
    pub fn next_piece(&mut self, limit: usize) -> &'a [u8] {
        let n = self.next_size().min(self.data.len()).min(limit);
        let (piece, rest) = self.data.split_at(n);
        self.data = rest;
        piece
    }

    fn next_size(&mut self) -> usize {
        match self.pattern {
            0 => usize::MAX,
            1 => 1,
            max => {
                // xorshift32: the same pieces for the same pattern every time.
                self.state ^= self.state << 13;
                self.state ^= self.state >> 17;
                self.state ^= self.state << 5;
                1 + (self.state % u32::from(max)) as usize
            }
        }
    }
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let piece = self.next_piece(buf.remaining());
        buf.put_slice(piece);
        Poll::Ready(Ok(()))
    }
}

/// Runs a future whose reads never wait (a [`Pieces`] reader) to its end.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a read from memory waited"),
    }
}

/// One result of [`FrameReader::read_message`], comparable.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant)] // a few per input, never stored
enum Read {
    Message(Message),
    Error(String),
}

/// Reads frames until the first error (every stream ends in one: at least
/// `Closed`).
fn read_all<R: AsyncRead + Unpin>(mut reader: FrameReader<R>) -> Vec<Read> {
    let mut reads = Vec::new();
    loop {
        match block_on(reader.read_message()) {
            Ok(message) => reads.push(Read::Message(message)),
            Err(error) => {
                reads.push(Read::Error(error.to_string()));
                return reads;
            }
        }
    }
}

/// Input: two bytes of frame limit, a piece pattern, a count of frames to
/// read before the switch to raw bytes, a split point for bytes already
/// read, then the stream.
pub fn frames(data: &[u8]) {
    let mut input = Input(data);
    let max = usize::from(input.u16());
    let pattern = input.byte();
    let switch_after = usize::from(input.byte() % 8);
    let already = usize::from(input.u16());
    let stream = input.rest();

    // The reference: the frames as their length prefixes lay them out.
    let whole = read_all(FrameReader::new(Pieces::new(stream, 0), max));
    let mut at = 0;
    for read in &whole {
        let left = &stream[at..];
        match read {
            Read::Message(message) => {
                let len = u32::from_be_bytes(left[..4].try_into().unwrap()) as usize;
                assert!(len <= max, "a {len}-byte frame read under a {max}-byte limit");
                assert_eq!(Message::decode(&left[4..4 + len]).as_ref(), Ok(message));
                assert!(message.payload.is_some(), "a frame without a payload was read as a message");
                round_trip_frame(message);
                at += 4 + len;
            }
            Read::Error(error) if left.is_empty() => {
                assert_eq!(error, &FrameError::Closed.to_string(), "at the end of the stream");
            }
            Read::Error(error) if left.len() < 4 => {
                assert_eq!(error, &FrameError::Truncated { have: left.len(), want: 4 }.to_string());
            }
            Read::Error(error) => {
                let len = u32::from_be_bytes(left[..4].try_into().unwrap()) as usize;
                let expected = if len > max {
                    FrameError::TooLarge { len, max }.to_string()
                } else if left.len() < 4 + len {
                    FrameError::Truncated { have: left.len(), want: 4 + len }.to_string()
                } else {
                    match Message::decode(&left[4..4 + len]) {
                        Ok(_) => FrameError::Empty.to_string(),
                        Err(decode) => FrameError::Decode(decode).to_string(),
                    }
                };
                assert_eq!(error, &expected);
            }
        }
    }

    // In pieces, and behind bytes already read: the same reads.
    assert_eq!(read_all(FrameReader::new(Pieces::new(stream, pattern.max(1)), max)), whole, "in pieces");
    let (before, after) = stream.split_at(already.min(stream.len()));
    let behind = FrameReader::with_buffer(Pieces::new(after, pattern), Bytes::copy_from_slice(before), max);
    assert_eq!(read_all(behind), whole, "behind {} bytes already read", before.len());

    // A stream that switches to raw bytes after its first frames loses
    // nothing of what follows them.
    let messages = whole.iter().take_while(|r| matches!(r, Read::Message(_))).count();
    if messages >= switch_after {
        let mut reader = FrameReader::new(Pieces::new(stream, pattern), max);
        let mut consumed = 0;
        for _ in 0..switch_after {
            block_on(reader.read_message()).expect("read above");
            consumed += 4 + u32::from_be_bytes(stream[consumed..consumed + 4].try_into().unwrap()) as usize;
        }
        let (io, rest) = reader.into_parts();
        let mut after = rest.to_vec();
        after.extend_from_slice(io.unread());
        assert_eq!(after, &stream[consumed..], "bytes past frame {switch_after}");
    }
}

/// A message read from a frame encodes to a frame that reads back equal.
fn round_trip_frame(message: &Message) {
    match encode(message) {
        Ok(bytes) => {
            assert_eq!(bytes.len(), 4 + message.encoded_len());
            let mut reader = FrameReader::new(Pieces::new(&bytes, 0), MAX_FRAME_LEN);
            assert_eq!(&block_on(reader.read_message()).expect("an encoded frame reads"), message);
        }
        Err(FrameError::TooLarge { len, .. }) => assert!(len > MAX_FRAME_LEN),
        Err(error) => panic!("encoding failed: {error}"),
    }
}

/// Decodes `data` as `M`; what decodes re-encodes to bytes that decode to
/// an equal message of the announced length.
fn round_trip<M: prost::Message + Default + PartialEq + Debug>(data: &[u8]) -> Option<M> {
    let message = M::decode(data).ok()?;
    let bytes = message.encode_to_vec();
    assert_eq!(bytes.len(), message.encoded_len());
    let again = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(again, message);
    assert_eq!(again.encoded_len(), bytes.len());
    Some(message)
}

/// Input: the bytes of one message, decoded as every message type.
pub fn messages(data: &[u8]) {
    if let Some(message) = round_trip::<Message>(data)
        && let Some(payload) = &message.payload
    {
        assert!(!payload.name().is_empty());
    }
    if let Some(error) = round_trip::<Error>(data) {
        let _ = error.to_string();
    }
    round_trip::<OpenControlChannelReq>(data);
    round_trip::<OpenControlChannelRsp>(data);
    round_trip::<CloseControlChannelReq>(data);
    round_trip::<CloseControlChannelRsp>(data);
    round_trip::<OpenTunnelReq>(data);
    round_trip::<OpenTunnelRsp>(data);
    round_trip::<CloseTunnelReq>(data);
    round_trip::<CloseTunnelRsp>(data);
    round_trip::<ProxyConnReq>(data);
    round_trip::<ProxyConnRsp>(data);
    round_trip::<ProxyReq>(data);
    round_trip::<ProxyRsp>(data);
    round_trip::<StreamReq>(data);
    round_trip::<StreamRsp>(data);
    round_trip::<Heartbeat>(data);
    round_trip::<ServerMessage>(data);
    round_trip::<DatagramChannelClose>(data);
    round_trip::<TunnelProperties>(data);
    round_trip::<ClientDetails>(data);
    round_trip::<ServerDetails>(data);
    round_trip::<ControlChannelLiveness>(data);
    round_trip::<IpAddressMsg>(data);
}

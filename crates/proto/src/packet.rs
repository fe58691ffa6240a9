//! Datagram packets inside a byte stream: each packet a u32 big-endian
//! length, then its bytes (at most [`MAX_PACKET`]). This is how a datagram
//! tunnel travels over TLS, with guaranteed delivery, or to a dialer that
//! has no QUIC datagrams; over QUIC the same packets ride DATAGRAM frames.

use std::io;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest packet a stream may carry, as for a protocol frame.
pub const MAX_PACKET: usize = 65_535;

/// Reads one packet; `None` at a clean end between packets.
pub async fn read_packet<R: AsyncRead + Unpin + ?Sized>(reader: &mut R) -> io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match reader.read(&mut len[..1]).await? {
        0 => return Ok(None),
        _ => reader.read_exact(&mut len[1..]).await?,
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("packet of {len} bytes (at most {MAX_PACKET})"),
        ));
    }
    let mut packet = vec![0u8; len];
    reader.read_exact(&mut packet).await?;
    Ok(Some(packet.into()))
}

/// Writes one packet and flushes it, without copying it: the length and
/// the packet go out as one vectored write where the writer takes those
/// (TLS: one record), else as two writes, then one flush.
pub async fn write_packet<W: AsyncWrite + Unpin + ?Sized>(writer: &mut W, packet: &[u8]) -> io::Result<()> {
    if packet.len() > MAX_PACKET {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("packet of {} bytes", packet.len())));
    }
    let len = (packet.len() as u32).to_be_bytes();
    // Called on `&mut W`, which is sized, so `W` may be a trait object.
    let mut writer = writer;
    AsyncWriteExt::write_all_buf(&mut writer, &mut Buf::chain(&len[..], packet)).await?;
    writer.flush().await
}

/// The 12-byte channel id a QUIC datagram starts with: the stream id's 24
/// hex characters, decoded.
pub fn channel_id(stream_id: &str) -> Option<[u8; 12]> {
    let hex: String = stream_id.chars().filter(|c| *c != '-').take(24).collect();
    if hex.len() != 24 {
        return None;
    }
    let mut id = [0u8; 12];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

/// A QUIC datagram: the channel id, then the packet.
///
/// This one allocation per datagram stays: `quinn::Connection::send_datagram`
/// takes the datagram whole, as one owned `Bytes` (quinn queues it until a
/// packet has room), so id and packet must be contiguous in a buffer of
/// their own; the packet arrives without room in front for the id.
pub fn datagram(id: &[u8; 12], packet: &[u8]) -> Bytes {
    let mut datagram = Vec::with_capacity(12 + packet.len());
    datagram.extend_from_slice(id);
    datagram.extend_from_slice(packet);
    datagram.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_round_trip_and_bad_lengths_are_refused() {
        let mut buf = Vec::new();
        write_packet(&mut buf, b"one").await.unwrap();
        write_packet(&mut buf, b"").await.unwrap();
        let mut reader = &buf[..];
        assert_eq!(read_packet(&mut reader).await.unwrap().unwrap(), &b"one"[..]);
        assert_eq!(read_packet(&mut reader).await.unwrap().unwrap(), &b""[..]);
        assert!(read_packet(&mut reader).await.unwrap().is_none());
        let mut huge = &[0xff, 0xff, 0xff, 0xff, 0][..];
        assert!(read_packet(&mut huge).await.is_err());
        let mut cut = &[0, 0, 0, 9, 1, 2][..];
        assert!(read_packet(&mut cut).await.is_err());
        assert!(write_packet(&mut Vec::new(), &vec![0; MAX_PACKET + 1]).await.is_err());
    }

    /// A writer that records each call it gets, vectored or not.
    struct Recorder {
        vectored: bool,
        writes: Vec<Vec<u8>>,
        flushes: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            self.writes.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let len = joined.len();
            self.writes.push(joined);
            std::task::Poll::Ready(Ok(len))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            self.flushes += 1;
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_packet_is_one_vectored_write_and_one_flush() {
        let mut tls_like = Recorder { vectored: true, writes: Vec::new(), flushes: 0 };
        write_packet(&mut tls_like, b"abc").await.unwrap();
        assert_eq!(tls_like.writes, [b"\0\0\0\x03abc".to_vec()]);
        assert_eq!(tls_like.flushes, 1);
        // A writer without vectored writes gets the length, then the packet.
        let mut plain = Recorder { vectored: false, writes: Vec::new(), flushes: 0 };
        write_packet(&mut plain, b"abc").await.unwrap();
        assert_eq!(plain.writes, [b"\0\0\0\x03".to_vec(), b"abc".to_vec()]);
        assert_eq!(plain.flushes, 1);
    }

    #[test]
    fn channel_ids_decode_the_stream_id() {
        let id = channel_id("0123456789abcdef01234567").unwrap();
        assert_eq!(id[0], 0x01);
        assert_eq!(id[11], 0x67);
        assert!(channel_id("0123").is_none());
        assert!(channel_id("zz23456789abcdef01234567").is_none());
        assert_eq!(&datagram(&id, b"x")[..], [&id[..], b"x"].concat());
    }
}

//! Datagram packets inside a byte stream: each packet a u32 big-endian
//! length, then its bytes (at most [`MAX_PACKET`]). This is how a datagram
//! tunnel travels over TLS, with guaranteed delivery, or to a dialer that
//! has no QUIC datagrams; over QUIC the same packets ride DATAGRAM frames.

use std::io;

use bytes::Bytes;
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

/// Writes one packet and flushes it.
pub async fn write_packet<W: AsyncWrite + Unpin + ?Sized>(writer: &mut W, packet: &[u8]) -> io::Result<()> {
    if packet.len() > MAX_PACKET {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("packet of {} bytes", packet.len())));
    }
    let mut framed = Vec::with_capacity(4 + packet.len());
    framed.extend_from_slice(&(packet.len() as u32).to_be_bytes());
    framed.extend_from_slice(packet);
    writer.write_all(&framed).await?;
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

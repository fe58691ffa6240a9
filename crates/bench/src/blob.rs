//! Checksummed bulk transfers, both ends: the soak's proof that a long
//! stream arrives whole and unchanged.
//!
//! The client sends one request line, `up BYTES SEED\n` or
//! `down BYTES SEED\n`. Upload: the client sends BYTES bytes of the
//! [`Fill`] stream of SEED; the service hashes what it reads and answers
//! `SHA256HEX BYTES\n`. Download: the service sends BYTES bytes of the
//! stream and then `SHA256HEX\n`, the digest of what it sent. Either way
//! each end hashes its own side with SHA-256 and the client compares: a
//! byte lost, added or changed anywhere on the path is a mismatch.

use std::time::Instant;

use anyhow::Context;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Size of one read or write.
const CHUNK: usize = 64 * 1024;

/// Longest request or answer line.
const MAX_LINE: usize = 256;

/// A deterministic byte stream (splitmix64): cheap enough to feed a tunnel
/// at several Gbit/s, and never the same pattern twice in a row, so a
/// shifted or repeated block changes the digest.
pub struct Fill(u64);

impl Fill {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` (its length a multiple of 8).
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
    }
}

/// Which way the bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to service.
    Up,
    /// Service to client.
    Down,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// What one transfer did.
pub struct Outcome {
    pub bytes: u64,
    pub seconds: f64,
    /// The client's digest equals the service's.
    pub matched: bool,
    pub client_sha256: String,
    pub service_sha256: String,
}

/// Sends `bytes` bytes of the stream of `seed` to `io`, hashing them;
/// `corrupt` flips one bit of the first chunk after hashing it.
async fn send_fill<W: AsyncWrite + Unpin>(io: &mut W, bytes: u64, seed: u64, corrupt: bool) -> std::io::Result<String> {
    let mut fill = Fill::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        fill.fill(&mut buf[..n.next_multiple_of(8).min(CHUNK)]);
        hash.update(&buf[..n]);
        if corrupt && left == bytes {
            buf[n / 2] ^= 1;
        }
        io.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    io.flush().await?;
    Ok(format!("{:x}", hash.finalize()))
}

/// Reads exactly `bytes` bytes from `io`, hashing them.
async fn receive<R: AsyncRead + Unpin>(io: &mut R, bytes: u64) -> anyhow::Result<String> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = io.read(&mut buf[..want]).await?;
        anyhow::ensure!(n > 0, "the stream ended after {} of {bytes} bytes", bytes - left);
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(format!("{:x}", hash.finalize()))
}

/// One line, without its newline, of at most [`MAX_LINE`] bytes.
async fn read_line<R: AsyncRead + Unpin>(io: &mut BufReader<R>) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let n = (&mut *io).take(MAX_LINE as u64).read_until(b'\n', &mut line).await?;
    anyhow::ensure!(n > 0 && line.ends_with(b"\n"), "no complete line (got {:?})", String::from_utf8_lossy(&line));
    line.pop();
    Ok(String::from_utf8(line)?)
}

/// The client's side of one transfer over `io`.
pub async fn transfer<S>(io: S, direction: Direction, bytes: u64, seed: u64) -> anyhow::Result<Outcome>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let mut io = BufReader::new(io);
    io.get_mut().write_all(format!("{} {bytes} {seed}\n", direction.name()).as_bytes()).await?;
    let (client_sha256, service_sha256) = match direction {
        Direction::Up => {
            let sent = send_fill(io.get_mut(), bytes, seed, false).await.context("sending")?;
            let answer = read_line(&mut io).await.context("reading the service's digest")?;
            let (digest, count) = answer.split_once(' ').context("answer is not DIGEST BYTES")?;
            anyhow::ensure!(count == bytes.to_string(), "the service received {count} of {bytes} bytes");
            (sent, digest.to_string())
        }
        Direction::Down => {
            let received = receive(&mut io, bytes).await.context("receiving")?;
            let digest = read_line(&mut io).await.context("reading the service's digest")?;
            (received, digest)
        }
    };
    Ok(Outcome {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        matched: client_sha256 == service_sha256,
        client_sha256,
        service_sha256,
    })
}

/// The service's side of one transfer; the connection ends after it.
/// `corrupt`: a fault on purpose, one bit flipped in every download over
/// 1 MiB (smaller ones, the driver's probes, stay whole).
pub async fn serve<S>(io: S, corrupt: bool) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut io = BufReader::new(io);
    let request = read_line(&mut io).await?;
    let fields: Vec<&str> = request.split(' ').collect();
    let [direction, bytes, seed] = fields[..] else { anyhow::bail!("bad request {request:?}") };
    let (bytes, seed): (u64, u64) = (bytes.parse()?, seed.parse()?);
    match direction {
        "up" => {
            let digest = receive(&mut io, bytes).await?;
            io.get_mut().write_all(format!("{digest} {bytes}\n").as_bytes()).await?;
        }
        "down" => {
            let digest = send_fill(io.get_mut(), bytes, seed, corrupt && bytes > 1 << 20).await?;
            io.get_mut().write_all(format!("{digest}\n").as_bytes()).await?;
        }
        other => anyhow::bail!("unknown direction {other:?}"),
    }
    io.get_mut().shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_directions_match_and_a_changed_byte_does_not() {
        for direction in [Direction::Up, Direction::Down] {
            // An odd size: the last chunk is partial and not a multiple of 8.
            let (client, service) = tokio::io::duplex(8192);
            let served = tokio::spawn(serve(service, false));
            let outcome = transfer(client, direction, 300_001, 7).await.unwrap();
            served.await.unwrap().unwrap();
            assert!(outcome.matched, "{direction:?}: {} != {}", outcome.client_sha256, outcome.service_sha256);
            assert_eq!(outcome.bytes, 300_001);
        }
        // A service that flips one bit on the way down.
        let (client, service) = tokio::io::duplex(8192);
        let served = tokio::spawn(serve(service, true));
        let outcome = transfer(client, Direction::Down, 3 << 20, 3).await.unwrap();
        served.await.unwrap().unwrap();
        assert!(!outcome.matched);
    }

    #[tokio::test]
    async fn a_short_stream_is_an_error() {
        let (client, mut service) = tokio::io::duplex(8192);
        tokio::spawn(async move {
            let mut line = [0u8; 64];
            let _ = service.read(&mut line).await;
            service.write_all(&[0u8; 10]).await.unwrap();
        });
        assert!(transfer(client, Direction::Down, 1000, 1).await.is_err());
    }
}

//! The one copy loop: both directions of a tunnelled connection.
//!
//! Written by hand rather than `tokio::io::copy_bidirectional` for one
//! reason: memory. Tokio's loop gives every direction a fixed heap buffer up
//! front, so a thousand idle streams cost a thousand times two big buffers
//! in every process they cross. Here a direction reads into a small buffer
//! on the stack and writes it straight out; it takes heap memory only to
//! keep bytes a busy writer could not take yet, or once reads fill the
//! small buffer (a bulk transfer), and then grows to full-size reads within
//! a few calls. Idle and chatty streams cost no buffer at all
//! (bench/RESULTS.md has the numbers).

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The stack buffer: one small request or reply.
pub const INITIAL_BUFFER: usize = 4 * 1024;

/// Largest buffer: a TLS record carries at most 16 KiB of plaintext, so
/// 64 KiB lets one read drain several records.
pub const BUFFER: usize = 64 * 1024;

/// One direction's state.
#[derive(Default)]
struct Direction {
    /// Heap buffer; empty while reads go through the stack.
    buf: Vec<u8>,
    /// Bytes `pos..end` of `buf` are read and not yet written.
    pos: usize,
    end: usize,
    /// Heap buffer size for the next read; 0 reads into the stack.
    size: usize,
    read_done: bool,
    /// Bytes were written since the last flush.
    unflushed: bool,
    finished: bool,
    copied: u64,
}

impl Direction {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.finished {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            if self.pos == self.end && !self.read_done {
                if self.size == 0 {
                    ready!(self.poll_through_stack(cx, reader.as_mut(), writer.as_mut()))?;
                    continue;
                }
                if self.buf.len() != self.size {
                    self.buf = vec![0; self.size];
                }
                let mut buf = std::mem::take(&mut self.buf);
                let polled = self.poll_read(cx, reader.as_mut(), writer.as_mut(), &mut ReadBuf::new(&mut buf));
                self.buf = buf;
                let n = ready!(polled)?;
                self.pos = 0;
                self.end = n;
                if n == self.buf.len() && n < BUFFER {
                    self.size = (n * 4).min(BUFFER);
                }
            }
            while self.pos < self.end {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.unflushed = true;
            }
            if self.size == 0 && !self.buf.is_empty() {
                // Leftovers of a stack read are out: back to no buffer.
                self.buf = Vec::new();
                self.pos = 0;
                self.end = 0;
            }
            if self.read_done {
                // End of this direction: the half-close travels on.
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.finished = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(self.copied));
            }
        }
    }

    /// One read into a stack buffer, written out at once; what the writer
    /// cannot take now is kept on the heap.
    fn poll_through_stack<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        // Left uninitialised: a stream of small messages reads thousands of
        // times a second, and zeroing 4 KiB for each read shows in profiles.
        let mut scratch = [MaybeUninit::<u8>::uninit(); INITIAL_BUFFER];
        let mut read = ReadBuf::uninit(&mut scratch);
        let n = ready!(self.poll_read(cx, reader, writer.as_mut(), &mut read))?;
        let scratch = read.filled();
        if n == INITIAL_BUFFER {
            // A full read: a bulk transfer; move to a growing heap buffer.
            self.size = INITIAL_BUFFER * 4;
        }
        let mut written = 0;
        while written < n {
            match writer.as_mut().poll_write(cx, &scratch[written..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(k)) => {
                    written += k;
                    self.copied += k as u64;
                    self.unflushed = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    self.buf = scratch[written..n].to_vec();
                    self.pos = 0;
                    self.end = self.buf.len();
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads into `read`; marks the end of input. While nothing is there to
    /// read, what was written is flushed: it must not wait in a buffered
    /// writer (TLS).
    fn poll_read<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
        writer: Pin<&mut W>,
        read: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        match reader.poll_read(cx, read) {
            Poll::Ready(result) => result?,
            Poll::Pending => {
                if self.unflushed {
                    ready!(writer.poll_flush(cx))?;
                    self.unflushed = false;
                }
                return Poll::Pending;
            }
        }
        let n = read.filled().len();
        if n == 0 {
            self.read_done = true;
        }
        Poll::Ready(Ok(n))
    }
}

/// Copies both ways until both sides are done; returns bytes (a to b, b to a).
/// When one side finishes, the other is shut down for writing, so a
/// half-close travels through the tunnel.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::default();
    let mut b_to_a = Direction::default();
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let backward = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forward, backward) {
            (Poll::Ready(forward), Poll::Ready(backward)) => Poll::Ready(Ok((forward, backward))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_carries_the_half_close() {
        // Pipes smaller than the stack buffer take the partial-write path;
        // big ones fill reads and take every heap growth step.
        for pipe in [1024, 256 * 1024] {
            copy_through(pipe).await;
        }
    }

    /// Writes `send` then half-closes, while reading to the end, which
    /// must be `expect`: each end does both at once, as the pipes are tiny.
    async fn talk(io: tokio::io::DuplexStream, send: Vec<u8>, expect: Vec<u8>) {
        let (mut r, mut w) = tokio::io::split(io);
        let writing = async {
            w.write_all(&send).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, read) = tokio::join!(writing, r.read_to_end(&mut got));
        read.unwrap();
        assert_eq!(got, expect);
    }

    async fn copy_through(pipe: usize) {
        let (client, mut near) = tokio::io::duplex(pipe);
        let (mut far, server) = tokio::io::duplex(pipe);
        let spliced = tokio::spawn(async move { splice(&mut near, &mut far).await });
        // More than the largest buffer.
        let up: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let server_side = tokio::spawn(talk(server, down.clone(), up.clone()));
        talk(client, up.clone(), down.clone()).await;
        server_side.await.unwrap();
        assert_eq!(spliced.await.unwrap().unwrap(), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn a_write_error_ends_the_splice() {
        let (mut client, mut near) = tokio::io::duplex(64);
        let (far, server) = tokio::io::duplex(64);
        drop(server);
        let mut far = far;
        client.write_all(b"to nobody").await.unwrap();
        let result = splice(&mut near, &mut far).await;
        assert!(result.is_err(), "{result:?}");
    }
}

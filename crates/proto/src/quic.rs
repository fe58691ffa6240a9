//! A QUIC bidirectional stream as one channel ([`crate::Io`]).
//!
//! Over TCP, bytes written before a close still reach the peer: the kernel
//! keeps sending after the socket is gone. A QUIC connection is closed the
//! moment its last handle drops, and whatever the peer has not acknowledged
//! yet is lost with it. So a [`QuicStream`] that is dropped finishes its
//! sending side and keeps it (and with it the connection) for up to
//! [`LINGER`] until the peer has acknowledged every byte and the FIN.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a dropped stream waits for the peer to acknowledge its last
/// bytes before the connection may go.
pub const LINGER: Duration = Duration::from_secs(10);

/// Both halves of a bidirectional stream.
pub struct QuicStream {
    recv: RecvStream,
    /// `None` only while dropping.
    send: Option<SendStream>,
}

impl QuicStream {
    pub fn new(send: SendStream, recv: RecvStream) -> Self {
        Self { recv, send: Some(send) }
    }

    fn send(&mut self) -> Pin<&mut SendStream> {
        Pin::new(self.send.as_mut().expect("the sending half lives until drop"))
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(self.send(), cx, buf).map_err(Into::into)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(self.send(), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(self.send(), cx)
    }
}

impl Drop for QuicStream {
    fn drop(&mut self) {
        let Some(mut send) = self.send.take() else { return };
        // Already finished is fine; a stopped stream has nothing to wait for.
        let _ = send.finish();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(LINGER, send.stopped()).await;
            });
        }
    }
}

//! The one copy loop: both directions of a tunnelled connection.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional_with_sizes};

/// Per-direction buffer. A TLS record carries at most 16 KiB of plaintext;
/// 64 KiB lets one read drain several records. Starting point; the size is
/// tuned by the benchmark in `bench/`, not by guesswork.
pub const BUFFER: usize = 64 * 1024;

/// Copies both ways until both sides are done; returns bytes (a to b, b to a).
/// When one side finishes, the other is shut down for writing, so a
/// half-close travels through the tunnel.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_bidirectional_with_sizes(a, b, BUFFER, BUFFER).await
}

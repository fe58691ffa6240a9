//! What carries one channel of the protocol, on either side: a TLS
//! connection or a QUIC bidirectional stream, boxed so both take the same
//! path through the code.

use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream carrying one channel.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

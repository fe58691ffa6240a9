//! Response bodies with something to do when they end.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;

use super::activity::BusyGuard;
use super::upstream::{BoxError, Pool, UpBody};

/// Keeps the public connection busy until the response body is done, so the
/// idle timer never cuts a transfer, a long poll or an event stream.
pub struct Busy<B> {
    pub inner: B,
    pub guard: Option<BusyGuard>,
}

impl<B: Body + Unpin> Body for Busy<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            self.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body from the public client that remembers whether it failed:
/// a malformed chunked body, one the client cut short, or one past the
/// policy's `max_request_body_bytes` (counted as it streams). hyper then
/// fails the request towards the agent, which is the client's doing, not
/// the service's.
pub struct Watched {
    pub inner: Incoming,
    pub failed: Arc<AtomicBool>,
    pub too_large: Arc<AtomicBool>,
    /// Bytes the body may still carry.
    pub left: u64,
}

/// The error that ends a body past its limit.
#[derive(Debug, thiserror::Error)]
#[error("request body over the tunnel's max_request_body_bytes")]
pub struct TooLarge;

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match frame {
            Some(Err(error)) => {
                self.failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(error.into())))
            }
            Some(Ok(frame)) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > self.left {
                    self.too_large.store(true, Ordering::Relaxed);
                    return Poll::Ready(Some(Err(TooLarge.into())));
                }
                self.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response from a pooled HTTP/1.1 connection: once its body has been
/// read to the end, the connection goes back to the pool for the next
/// request. A body dropped early leaves the connection to close.
pub struct Returning {
    pub inner: Incoming,
    pub sender: Option<http1::SendRequest<UpBody>>,
    pub pool: Arc<Pool>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.give_back(sender);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Err(_)) => self.sender = None,
            Some(Ok(_)) if self.inner.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

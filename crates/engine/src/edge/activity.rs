//! Idle tracking for public connections.
//!
//! `timeouts.http_idle_seconds` must close idle connections and never a
//! busy one. A connection is busy while a request is in flight (from its
//! head until its response body ends), and active whenever bytes move on
//! its socket. An HTTP/2 PING, a WebSocket ping or one byte of a slow
//! download all count, so a long-lived WebSocket kept up by pings, a
//! server-sent event stream or a 64 MiB transfer are never cut.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// When a connection last moved bytes and how many requests it has open.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { epoch: Instant::now(), last_ms: AtomicU64::new(0), busy: AtomicUsize::new(0) })
    }

    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Marks a request in flight until the guard drops.
    pub fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        BusyGuard { activity: self.clone() }
    }

    /// Resolves once no byte moved for `limit`, busy or not: a request
    /// whose answer has not started and whose connection is silent.
    pub async fn quiet(&self, limit: Duration) {
        loop {
            let deadline = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    /// Resolves once nothing is in flight and no byte moved for `limit`.
    pub async fn idle(&self, limit: Duration) {
        loop {
            let deadline = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + limit;
            let now = Instant::now();
            if now < deadline {
                tokio::time::sleep_until(deadline).await;
            } else if self.busy.load(Ordering::Relaxed) > 0 {
                // Busy connections are never idle; look again one period later.
                tokio::time::sleep(limit).await;
            } else {
                return;
            }
        }
    }
}

/// A request in flight; dropping it counts as activity, so the idle period
/// starts when the response ends, not when it started.
#[derive(Debug)]
pub struct BusyGuard {
    activity: Arc<Activity>,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records activity on every successful read and write.
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_quiet_and_for_requests_to_end() {
        let activity = Activity::new();
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        let guard = activity.busy();
        let watcher = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle(limit).await }
        });
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert!(!watcher.is_finished(), "a busy connection is never idle");
        drop(guard);
        watcher.await.unwrap();
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(45) && elapsed <= Duration::from_secs(56), "{elapsed:?}");
    }
}

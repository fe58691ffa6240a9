//! The services behind the soak's agents, in one process: an HTTP server
//! whose paths stream, dribble, take uploads and cut their own answers, an
//! echo, an echo that resets its connections partway, and the checksummed
//! transfer service ([`crate::blob`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What every HTTP body is made of.
static FILL: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// `GET /big`: long enough that a client reading a little of it and
/// leaving cuts it mid-flight.
pub const BIG_BYTES: usize = 8 << 20;
/// `GET /slow`: 16 chunks of 4 KiB, one every 100 ms.
pub const SLOW_BYTES: usize = 64 << 10;
const SLOW_CHUNK: usize = 4 << 10;
const SLOW_EVERY: Duration = Duration::from_millis(100);
/// `GET /cut`: announces `CUT_BYTES` and stops after `CUT_AFTER`.
pub const CUT_BYTES: usize = 1 << 20;
pub const CUT_AFTER: usize = 256 << 10;
const CUT_EVERY: Duration = Duration::from_millis(10);
/// Any other path: a small answer, like an API's.
pub const SMALL_BYTES: usize = 64;
/// The cutting echo resets a connection after echoing at most this much.
pub const CUT_ECHO_MAX: usize = 64 << 10;

/// A response body of `left` filler bytes in chunks of `chunk`, one every
/// `every` if set, failing (which makes hyper abort the connection) once
/// `fail_after` bytes are out.
pub(crate) struct Paced {
    left: usize,
    sent: usize,
    chunk: usize,
    every: Option<Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    fail_after: Option<usize>,
}

impl Paced {
    pub(crate) fn new(bytes: usize) -> Self {
        Self { left: bytes, sent: 0, chunk: FILL.len(), every: None, sleep: None, fail_after: None }
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.fail_after.is_some_and(|at| self.sent >= at) {
            return Poll::Ready(Some(Err(std::io::Error::other("the service cut its answer"))));
        }
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if let Some(every) = self.every {
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        let n = self.left.min(self.chunk);
        self.left -= n;
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&FILL[..n])))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0 && self.fail_after.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact((self.left) as u64)
    }
}

async fn answer(request: Request<hyper::body::Incoming>) -> Result<Response<Paced>, Infallible> {
    let body = match request.uri().path() {
        "/big" => Paced::new(BIG_BYTES),
        "/slow" => Paced { chunk: SLOW_CHUNK, every: Some(SLOW_EVERY), ..Paced::new(SLOW_BYTES) },
        // Paced, so that hyper flushes the head and the first chunks
        // before the failure (all in one poll, it would drop them unsent).
        "/cut" => Paced { every: Some(CUT_EVERY), fail_after: Some(CUT_AFTER), ..Paced::new(CUT_BYTES) },
        "/upload" => {
            // Counts the body; a client that leaves mid-upload ends it
            // with an error, and no answer is owed.
            let mut body = request.into_body();
            let mut received = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => received += frame.data_ref().map_or(0, |d| d.len()),
                    Err(_) => {
                        return Ok(Response::builder().status(StatusCode::BAD_REQUEST).body(Paced::new(0)).unwrap());
                    }
                }
            }
            return Ok(Response::builder().header("x-received", received).body(Paced::new(0)).unwrap());
        }
        _ => Paced::new(SMALL_BYTES),
    };
    Ok(Response::new(body))
}

async fn http(listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service_fn(answer))
                .await;
        });
    }
}

/// Echoes up to a connection-dependent number of bytes (1 to
/// [`CUT_ECHO_MAX`]), then closes with unread bytes pending, which the
/// kernel turns into a reset: a service dying mid-stream.
async fn cut_echo(listener: TcpListener) -> anyhow::Result<()> {
    let mut n = 0u64;
    loop {
        let (mut tcp, peer) = listener.accept().await?;
        n += 1;
        let limit = 1 + (crate::blob::Fill::new(n ^ u64::from(peer.port())).next_u64() as usize) % CUT_ECHO_MAX;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 << 10];
            let mut echoed = 0;
            while echoed < limit {
                let want = (limit - echoed).min(buf.len());
                match tcp.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => {
                        if tcp.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                        echoed += k;
                    }
                }
            }
            // Wait for more to arrive, so the close finds it unread.
            let _ = tcp.readable().await;
            drop(tcp);
        });
    }
}

async fn blob(listener: TcpListener, corrupt: bool) -> anyhow::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            if let Err(error) = crate::blob::serve(tcp, corrupt).await {
                eprintln!("blob service: {error:#}");
            }
        });
    }
}

/// Binds all four on 127.0.0.1:0, prints their addresses as one JSON line,
/// and serves until killed.
pub async fn run(corrupt: bool) -> anyhow::Result<()> {
    let bind = || TcpListener::bind("127.0.0.1:0");
    let (h, e, c, b) = (bind().await?, bind().await?, bind().await?, bind().await?);
    crate::report(json!({
        "http": h.local_addr()?.to_string(),
        "echo": e.local_addr()?.to_string(),
        "cut": c.local_addr()?.to_string(),
        "blob": b.local_addr()?.to_string(),
    }));
    tokio::select! {
        r = http(h) => r,
        r = crate::serve::echo_on(e) => r,
        r = cut_echo(c) => r,
        r = blob(b, corrupt) => r,
    }
}

//! The accept loop every TCP listener shares.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::Shared;
use crate::admission::Refusal;

/// The accept loop every listener uses: each connection holds a permit, so
/// at most `limits.max_connections` are open per listener, and runs `serve`
/// as a task the shutdown drain waits for. A connection beyond the limit is
/// closed at once rather than left waiting in the kernel's backlog, where it
/// would stall everyone behind it.
pub async fn accept_loop<F, Fut>(shared: Arc<Shared>, listener: TcpListener, what: &'static str, serve: F)
where
    F: Fn(Arc<Shared>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(shared.config.limits.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = Duration::from_millis(5);
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    shared.refused(peer.ip(), Refusal::Capacity);
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                // One span per connection: every line it logs says which
                // peer and which route, without passing them to each one.
                let span = tracing::info_span!("conn", listener = what, %peer, route = tracing::field::Empty);
                let connection = serve(shared.clone(), tcp, peer);
                shared.tasks.spawn(
                    async move {
                        connection.await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(error) => {
                // EMFILE and friends: wait for descriptors to free up
                // instead of spinning on the same error.
                tracing::error!(%error, listener = what, "accept failed; backing off {:?}", backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

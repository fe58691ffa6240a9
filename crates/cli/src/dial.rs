//! `strait connect` and `strait dial`: private dials to a tunnel, from a
//! local port (one dial per accepted connection) or from stdin/stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use strait_agent::{AgentError, Client};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::retry;
use crate::shutdown::Interrupted;

/// Whether a failed dial ends `strait connect`: a refused token or an
/// untrusted certificate will refuse every later dial too, while a tunnel
/// that is not found may come up.
fn ends_connect(error: &AgentError, dialled_before: bool) -> bool {
    // An engine that answered a refusal was reached by this very dial.
    error.is_permanent(dialled_before || error.engine_code().is_some())
}

/// Listens on `listen` until the shutdown signal, dialling `tunnel` for
/// each connection; stops on a dial error that no retry can fix.
pub async fn connect(client: Client, tunnel: &str, listen: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    println!("Listening on {} -> rstrm://{tunnel}", listener.local_addr()?);
    let dialled = Arc::new(AtomicBool::new(false));
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<anyhow::Error>(1);
    loop {
        let (mut local, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            Some(error) = fatal_rx.recv() => return Err(error),
            accepted = listener.accept() => accepted?,
        };
        let _ = local.set_nodelay(true);
        let (client, tunnel, dialled, fatal) = (client.clone(), tunnel.to_string(), dialled.clone(), fatal_tx.clone());
        tokio::spawn(async move {
            match client.dial(&tunnel).await {
                Ok(mut stream) => {
                    dialled.store(true, Ordering::Relaxed);
                    let _ = strait_proto::splice::splice(&mut local, &mut stream).await;
                }
                Err(error) if ends_connect(&error, dialled.load(Ordering::Relaxed)) => {
                    let _ = fatal.try_send(retry::explain(&error).context(format!("cannot dial {tunnel}")));
                }
                Err(error) => eprintln!("strait: {peer}: cannot dial {tunnel}: {error}"),
            }
        });
    }
}

/// Dials `tunnel` and copies stdin to it and it to stdout.
pub async fn dial(client: Client, tunnel: &str, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let stream = match shutdown.run_until_cancelled(client.dial(tunnel)).await {
        None => return Err(Interrupted.into()),
        Some(dialled) => dialled.map_err(|error| retry::explain(&error))?,
    };
    let (mut from_tunnel, mut to_tunnel) = tokio::io::split(stream);
    // stdin's end half-closes towards the service; the service's end ends
    // the command, as ssh expects of a ProxyCommand.
    let upload = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut to_tunnel).await;
        let _ = to_tunnel.shutdown().await;
    });
    let mut stdout = tokio::io::stdout();
    let copied = shutdown.run_until_cancelled(tokio::io::copy(&mut from_tunnel, &mut stdout)).await;
    let _ = stdout.flush().await;
    upload.abort();
    match copied {
        None => Err(Interrupted.into()),
        Some(copied) => {
            copied?;
            Ok(())
        }
    }
}

//! Scenario 5: many open streams, and many idle agents, held while the
//! driver reads the tunnel processes' resident memory.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use strait_agent::TunnelProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::target::Target;

/// How many connections are being opened at once: enough to be quick,
/// few enough to stay under the engines' pending-stream limits.
const OPENING: usize = 32;

pub async fn streams(target: Target, count: usize) -> anyhow::Result<()> {
    hold("held", count, move |_| {
        let target = target.clone();
        async move {
            let mut conn = target.connect().await?;
            // One round trip proves the stream reaches the service.
            conn.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(conn)
        }
    })
    .await
}

pub async fn agents(engine: String, token: String, ca: PathBuf, count: usize, tunnel: bool) -> anyhow::Result<()> {
    let mut config = strait_agent::ClientConfig::new(engine, Some(token));
    config.ca_file = Some(ca);
    // Over TLS each control channel is a connection of its own; over QUIC
    // the agents of one client would share a single connection.
    config.transport = strait_agent::TransportMode::Tls;
    let client = strait_agent::Client::new(config)?;
    hold("agents", count, move |i| {
        let client = client.clone();
        async move {
            let control = client.connect().await?;
            let mut opened = None;
            if tunnel {
                let properties =
                    TunnelProperties { name: Some(format!("idle-{i}")), publish: Some(false), ..Default::default() };
                opened = Some(control.open_tunnel(properties).await?);
            }
            Ok::<_, strait_agent::AgentError>((control, opened))
        }
    })
    .await
}

/// Opens COUNT things with `open`, a few at a time, reports `{KEY: COUNT}`
/// and keeps them all until stdin closes.
async fn hold<T, E, F, Fut>(key: &str, count: usize, open: F) -> anyhow::Result<()>
where
    T: Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(OPENING));
    let mut opening = Vec::with_capacity(count);
    for i in 0..count {
        let (gate, opened) = (gate.clone(), open(i));
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            opened.await
        }));
    }
    let mut held = Vec::with_capacity(count);
    for task in opening {
        held.push(task.await??);
    }
    crate::report(json!({key: held.len(), "seconds": started.elapsed().as_secs_f64()}));
    crate::stdin_closed().await;
    Ok(())
}

//! Scenario 5: many open streams, and many idle agents, held while the
//! driver reads the tunnel processes' resident memory.

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
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(OPENING));
    let mut opening = Vec::with_capacity(count);
    for _ in 0..count {
        let (target, gate) = (target.clone(), gate.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let mut conn = target.connect().await?;
            // One round trip proves the stream reaches the service.
            conn.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(conn)
        }));
    }
    let mut held = Vec::with_capacity(count);
    for task in opening {
        held.push(task.await??);
    }
    crate::report(json!({"held": held.len(), "seconds": started.elapsed().as_secs_f64()}));
    crate::stdin_closed().await;
    Ok(())
}

pub async fn agents(engine: String, token: String, ca: PathBuf, count: usize, tunnel: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut config = strait_agent::ClientConfig::new(engine, Some(token));
    config.ca_file = Some(ca);
    let client = strait_agent::Client::new(config)?;
    let gate = Arc::new(Semaphore::new(OPENING));
    let mut opening = Vec::with_capacity(count);
    for i in 0..count {
        let (client, gate) = (client.clone(), gate.clone());
        opening.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let control = client.connect().await?;
            let tunnel = match tunnel {
                true => {
                    let properties = TunnelProperties {
                        name: Some(format!("idle-{i}")),
                        publish: Some(false),
                        ..Default::default()
                    };
                    Some(control.open_tunnel(properties).await?)
                }
                false => None,
            };
            Ok::<_, strait_agent::AgentError>((control, tunnel))
        }));
    }
    let mut held = Vec::with_capacity(count);
    for task in opening {
        held.push(task.await??);
    }
    crate::report(json!({"agents": held.len(), "seconds": started.elapsed().as_secs_f64()}));
    crate::stdin_closed().await;
    Ok(())
}

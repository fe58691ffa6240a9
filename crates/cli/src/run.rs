//! `strait run --apply FILE [--watch]`: keep the tunnels a file declares.
//!
//! The reconciler owns one control channel per context the file uses and a
//! map from tunnel name to its spec, its live tunnel and the task that
//! forwards it. Applying a file is a diff: unchanged tunnels are left alone
//! (same engine id, no dropped streams), changed ones are closed and
//! reopened, removed ones closed, new ones opened. A file with errors
//! changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strait_agent::{AgentError, Client, ControlChannel, Tunnel, TunnelProperties};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::apply::{self, Plan, Problem, Problems, TunnelSpec};
use crate::context::{self, Overrides};
use crate::forward::close_quietly;
use crate::retry::{self, Backoff};

/// How often `--watch` looks at the file. Reading a small file twice a
/// second costs nothing and needs no platform-specific notifier.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How long closing one tunnel may take before we move on.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long closing everything may take when the command stops.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// `None` is the context the command line resolves.
type ContextKey = Option<String>;

/// One control channel, per context the file uses.
struct Link {
    client: Client,
    control: Option<Arc<ControlChannel>>,
    /// Counts connections, so a loss reported for an older channel is ignored.
    generation: u64,
    backoff: Backoff,
    /// When to try again: to connect, or to open tunnels that could not be.
    retry_at: Option<Instant>,
    /// Whether it was ever connected: a later connection is a reconnection.
    connected_once: bool,
}

/// A tunnel the file declares.
struct Managed {
    spec: TunnelSpec,
    /// What to open with: the file's properties plus, once served, the
    /// hostname, so a reopen after a reconnection keeps the address.
    properties: TunnelProperties,
    live: Option<Live>,
}

/// An open tunnel and the task forwarding its streams.
struct Live {
    id: String,
    /// Sending (or dropping) asks the task to close the tunnel.
    close: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// A control channel ended.
struct Lost {
    context: ContextKey,
    generation: u64,
    reason: String,
}

#[derive(Default)]
struct Summary {
    created: usize,
    changed: usize,
    removed: usize,
    unchanged: usize,
    failed: usize,
}

struct Runner {
    file: PathBuf,
    overrides: Overrides,
    links: HashMap<ContextKey, Link>,
    tunnels: BTreeMap<String, Managed>,
    lost: mpsc::UnboundedSender<Lost>,
    /// During the first apply without `--watch`, a refusal by the engine
    /// ends the command (as `strait forward` does) instead of being retried.
    strict: bool,
    /// An error no retry can fix (a refused token, an untrusted
    /// certificate): the command closes everything and ends with it.
    fatal: Option<anyhow::Error>,
}

/// Applies the file, then keeps its tunnels up until the shutdown signal;
/// with `watch`, re-applies it whenever it changes. SIGHUP re-applies it
/// too.
pub async fn run(overrides: Overrides, file: PathBuf, watch: bool, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let text = read(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let plan = parse(&file, &text)?;
    // Registered before the first apply, so an early SIGHUP re-applies
    // rather than ending the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let (lost_tx, mut lost_rx) = mpsc::unbounded_channel();
    let mut runner = Runner {
        file: file.clone(),
        overrides,
        links: HashMap::new(),
        tunnels: BTreeMap::new(),
        lost: lost_tx,
        strict: !watch,
        fatal: None,
    };
    let result = match shutdown.run_until_cancelled(runner.apply(plan)).await {
        None => Ok(()),
        Some(Err(error)) => Err(error),
        Some(Ok(())) => match runner.fatal.take() {
            Some(error) => Err(error),
            None => {
                runner.strict = false;
                runner.watch(file, text, watch, &mut hangup, &mut lost_rx, shutdown).await
            }
        },
    };
    if tokio::time::timeout(SHUTDOWN_TIMEOUT, runner.shutdown()).await.is_err() {
        eprintln!("strait: the engine did not confirm every close in {}s", SHUTDOWN_TIMEOUT.as_secs());
    }
    result
}

fn read(file: &Path) -> Result<String, String> {
    std::fs::read_to_string(file).map_err(|e| e.to_string())
}

fn parse(file: &Path, text: &str) -> anyhow::Result<Plan> {
    apply::parse(text, |name| std::env::var(name).ok())
        .map_err(|problems| Problems { file: file.display().to_string(), problems }.into())
}

fn describe(context: &ContextKey) -> String {
    context.as_ref().map(|c| format!(" (context {c})")).unwrap_or_default()
}

impl Runner {
    /// Keeps the tunnels up and follows the file until the shutdown signal
    /// or an error no retry can fix.
    async fn watch(
        &mut self,
        file: PathBuf,
        text: String,
        watch: bool,
        hangup: &mut tokio::signal::unix::Signal,
        lost_rx: &mut mpsc::UnboundedReceiver<Lost>,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut last_seen = Ok(text);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if let Some(error) = self.fatal.take() {
                return Err(error);
            }
            let next_retry = self.links.values().filter_map(|l| l.retry_at).min();
            // Each arm's work runs under the signal too: a reconnect or an
            // apply waiting on a silent engine must not hold Ctrl-C.
            let done = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = hangup.recv() => {
                    last_seen = read(&file);
                    shutdown.run_until_cancelled(self.reload(&last_seen)).await
                }
                // Compare contents, not modification times: two quick writes
                // of the same length within one timestamp tick still count.
                _ = poll.tick(), if watch => {
                    let now = read(&file);
                    if now != last_seen {
                        last_seen = now;
                        shutdown.run_until_cancelled(self.reload(&last_seen)).await
                    } else {
                        Some(())
                    }
                }
                Some(lost) = lost_rx.recv() => {
                    self.on_lost(lost);
                    Some(())
                }
                _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                    shutdown.run_until_cancelled(self.retry_due()).await
                }
            };
            if done.is_none() {
                return Ok(());
            }
        }
    }

    /// Re-applies after a change; errors are reported and change nothing.
    async fn reload(&mut self, text: &Result<String, String>) {
        let result = match text {
            Ok(text) => match parse(&self.file, text) {
                Ok(plan) => self.apply(plan).await,
                Err(error) => Err(error),
            },
            Err(error) => Err(anyhow::anyhow!("cannot read {}: {error}", self.file.display())),
        };
        if let Err(error) = result {
            eprintln!("strait: {error:#}");
            eprintln!("strait: keeping the current tunnels");
        }
    }

    /// Makes the live tunnels match `plan`. Fails, having changed nothing,
    /// if a context the plan names cannot be resolved. Stops early, leaving
    /// `fatal` set, when a channel fails for good.
    async fn apply(&mut self, plan: Plan) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for spec in &plan.tunnels {
            let key = &spec.desired.context;
            if self.links.contains_key(key) {
                continue;
            }
            match self.client_for(key) {
                Ok(client) => {
                    self.links.insert(
                        key.clone(),
                        Link {
                            client,
                            control: None,
                            generation: 0,
                            backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(30)),
                            retry_at: None,
                            connected_once: false,
                        },
                    );
                }
                Err(error) => problems.push(Problem {
                    line: spec.line,
                    column: None,
                    message: format!("tunnel {}: {error:#}", spec.name),
                }),
            }
        }
        if !problems.is_empty() {
            self.drop_unused_links().await;
            return Err(Problems { file: self.file.display().to_string(), problems }.into());
        }

        let mut summary = Summary::default();
        let desired: BTreeMap<String, TunnelSpec> = plan.tunnels.iter().map(|t| (t.name.clone(), t.clone())).collect();
        // Close first: a changed tunnel keeps its name, which the engine
        // holds until the old one is gone.
        let gone: Vec<String> = self.tunnels.keys().filter(|n| !desired.contains_key(*n)).cloned().collect();
        for name in gone {
            if let Some(mut managed) = self.tunnels.remove(&name) {
                close(&mut managed).await;
                println!("removed {name}");
                summary.removed += 1;
            }
        }
        let mut to_open = Vec::new();
        for spec in plan.tunnels {
            match self.tunnels.get_mut(&spec.name) {
                Some(managed) if managed.spec.desired == spec.desired => {
                    managed.spec.line = spec.line;
                    summary.unchanged += 1;
                    // Refused earlier: try again now. (Cut off with its
                    // channel: the channel's reconnection reopens it.)
                    let connected = self.links.get(&spec.desired.context).is_some_and(|l| l.control.is_some());
                    if managed.live.is_none() && connected {
                        to_open.push((spec.name.clone(), Action::Restored));
                    }
                }
                Some(managed) => {
                    close(managed).await;
                    let properties = keep_hostname(&managed.properties, &spec.desired.properties);
                    *managed = Managed { spec: spec.clone(), properties, live: None };
                    to_open.push((spec.name.clone(), Action::Changed));
                }
                None => {
                    let properties = spec.desired.properties.clone();
                    self.tunnels.insert(spec.name.clone(), Managed { spec: spec.clone(), properties, live: None });
                    to_open.push((spec.name.clone(), Action::Created));
                }
            }
        }
        for (name, action) in to_open {
            // The caller ends the command with it.
            if self.fatal.is_some() {
                return Ok(());
            }
            let forward = self.tunnels[&name].spec.desired.forward.clone();
            match self.open(&name).await {
                Ok(Some(address)) => println!("{} {name}: {address} -> {forward}", action.verb()),
                Ok(None) => println!("{} {name}: waiting for the engine -> {forward}", action.verb()),
                Err(error) => {
                    eprintln!("strait: tunnel {name}: {error}");
                    if self.strict && error.engine_code().is_some() {
                        anyhow::bail!("tunnel {name}: {error}");
                    }
                    summary.failed += 1;
                    continue;
                }
            }
            match action {
                Action::Created => summary.created += 1,
                Action::Changed => summary.changed += 1,
                // Already counted as unchanged.
                Action::Restored => {}
            }
        }
        if self.fatal.is_some() {
            return Ok(());
        }
        self.drop_unused_links().await;
        let failed = if summary.failed > 0 { format!(", {} failed", summary.failed) } else { String::new() };
        println!(
            "applied {}: {} created, {} changed, {} removed, {} unchanged{failed}",
            self.file.display(),
            summary.created,
            summary.changed,
            summary.removed,
            summary.unchanged
        );
        Ok(())
    }

    fn client_for(&self, context: &ContextKey) -> anyhow::Result<Client> {
        let config = match context {
            None => context::resolve(&self.overrides)?,
            Some(name) => context::resolve_named(self.overrides.config.clone(), name)?,
        };
        Ok(Client::new(config)?)
    }

    /// Opens one tunnel on its context's channel, connecting first if that
    /// channel was never tried. `Ok(None)`: not connected; the retry of the
    /// channel will open it.
    async fn open(&mut self, name: &str) -> Result<Option<String>, AgentError> {
        let key = self.tunnels[name].spec.desired.context.clone();
        let link = self.links.get_mut(&key).expect("every planned context has a link");
        if link.control.is_none()
            && link.retry_at.is_none()
            && let Err(error) = connect(link, &key, &self.lost).await
        {
            if error.is_permanent(link.connected_once) {
                self.fatal.get_or_insert_with(|| gave_up(&key, &error));
                return Ok(None);
            }
            let delay = link.backoff.next_delay();
            eprintln!("strait: {error}{}; retrying in {:.1}s", describe(&key), delay.as_secs_f32());
            link.retry_at = Some(Instant::now() + delay);
            return Ok(None);
        }
        let Some(control) = link.control.clone() else { return Ok(None) };
        let managed = self.tunnels.get_mut(name).expect("caller checked");
        let tunnel = match control.open_tunnel(managed.properties.clone()).await {
            Ok(tunnel) => tunnel,
            Err(error) => {
                // A refusal stays until the file changes; anything else is
                // the channel failing, and its loss schedules a retry.
                if error.engine_code().is_none() && !control.is_closed() {
                    let delay = link.backoff.next_delay();
                    link.retry_at.get_or_insert(Instant::now() + delay);
                }
                return Err(error);
            }
        };
        // A reopen lands on the same address.
        strait_agent::pin_address(&mut managed.properties, tunnel.properties());
        let address = tunnel.public_url().unwrap_or_else(|| format!("rstrm://{name} (private)"));
        managed.live = Some(spawn_forward(tunnel, managed.spec.desired.forward.clone()));
        Ok(Some(address))
    }

    /// A control channel ended: its tunnels are gone with it; reconnect
    /// after a backoff.
    fn on_lost(&mut self, lost: Lost) {
        let Some(link) = self.links.get_mut(&lost.context) else { return };
        if link.generation != lost.generation || link.control.is_none() {
            return;
        }
        link.control = None;
        for managed in self.tunnels.values_mut().filter(|m| m.spec.desired.context == lost.context) {
            // Dropping the handle lets the task end on its own.
            managed.live = None;
        }
        let delay = link.backoff.next_delay();
        link.retry_at = Some(Instant::now() + delay);
        eprintln!(
            "strait: connection lost{} ({}); reconnecting in {:.1}s",
            describe(&lost.context),
            lost.reason,
            delay.as_secs_f32()
        );
    }

    /// Reconnects the channels whose retry time has come and reopens their
    /// tunnels.
    async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<ContextKey> =
            self.links.iter().filter(|(_, l)| l.retry_at.is_some_and(|t| t <= now)).map(|(k, _)| k.clone()).collect();
        for key in due {
            let link = self.links.get_mut(&key).expect("listed above");
            link.retry_at = None;
            let reconnecting = link.connected_once;
            if link.control.is_none()
                && let Err(error) = connect(link, &key, &self.lost).await
            {
                if error.is_permanent(reconnecting) {
                    self.fatal.get_or_insert_with(|| gave_up(&key, &error));
                    return;
                }
                let delay = link.backoff.next_delay();
                eprintln!("strait: {error}{}; retrying in {:.1}s", describe(&key), delay.as_secs_f32());
                link.retry_at = Some(Instant::now() + delay);
                continue;
            }
            let pending: Vec<String> = self
                .tunnels
                .iter()
                .filter(|(_, m)| m.spec.desired.context == key && m.live.is_none())
                .map(|(n, _)| n.clone())
                .collect();
            let mut restored = 0;
            for name in &pending {
                match self.open(name).await {
                    Ok(Some(address)) => {
                        restored += 1;
                        if !reconnecting {
                            println!("opened {name}: {address} -> {}", self.tunnels[name].spec.desired.forward);
                        }
                    }
                    Ok(None) => {}
                    Err(error) => eprintln!("strait: tunnel {name}: {error}"),
                }
            }
            if reconnecting {
                eprintln!("strait: reconnected{}, {restored} of {} tunnels restored", describe(&key), pending.len());
            }
        }
    }

    /// Closes the channels no declared tunnel uses any more.
    async fn drop_unused_links(&mut self) {
        let unused: Vec<ContextKey> = self
            .links
            .keys()
            .filter(|k| !self.tunnels.values().any(|m| &m.spec.desired.context == *k))
            .cloned()
            .collect();
        for key in unused {
            if let Some(link) = self.links.remove(&key)
                && let Some(control) = link.control
            {
                close_quietly(&control).await;
            }
        }
    }

    /// The end: close every tunnel, then every channel.
    async fn shutdown(&mut self) {
        for managed in self.tunnels.values_mut() {
            close(managed).await;
        }
        for link in self.links.values() {
            if let Some(control) = &link.control {
                close_quietly(control).await;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Action {
    Created,
    Changed,
    /// Unchanged in the file, but down (refused or cut off) until now.
    Restored,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Changed => "changed",
            Action::Restored => "restored",
        }
    }
}

/// The error that ends the command when a context's channel cannot be
/// opened and no retry will fix it.
fn gave_up(context: &ContextKey, error: &AgentError) -> anyhow::Error {
    retry::explain(error).context(format!("cannot keep the tunnels{}", describe(context)))
}

/// Opens the link's control channel and watches for its end.
async fn connect(link: &mut Link, key: &ContextKey, lost: &mpsc::UnboundedSender<Lost>) -> Result<(), AgentError> {
    let control = Arc::new(link.client.connect().await?);
    link.generation += 1;
    link.backoff.reset();
    link.connected_once = true;
    let watched = control.clone();
    let (lost, context, generation) = (lost.clone(), key.clone(), link.generation);
    tokio::spawn(async move {
        let reason = watched.closed().await;
        let _ = lost.send(Lost { context, generation, reason });
    });
    link.control = Some(control);
    Ok(())
}

/// Forwards a tunnel's streams until it ends or is asked to close.
fn spawn_forward(mut tunnel: Tunnel, local: String) -> Live {
    let (close, closing) = oneshot::channel::<()>();
    let id = tunnel.id().to_string();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = tunnel.forward(local) => {}
            _ = closing => {
                if let Err(error) = tunnel.close().await {
                    tracing::debug!(%error, tunnel = tunnel.id(), "closing the tunnel failed");
                }
            }
        }
    });
    Live { id, close, task }
}

/// Closes a tunnel and waits (bounded) for the engine to confirm.
async fn close(managed: &mut Managed) {
    if let Some(live) = managed.live.take() {
        tracing::debug!(tunnel = %live.id, "closing");
        let _ = live.close.send(());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, live.task).await;
    }
}

/// A changed tunnel that stays published without naming a host (or port)
/// keeps the address it was served on: a label change should not move it.
fn keep_hostname(old: &TunnelProperties, new: &TunnelProperties) -> TunnelProperties {
    let mut properties = new.clone();
    let same_kind = new.publish == Some(true) && old.publish == Some(true) && new.protocol == old.protocol;
    if strait_agent::on_own_port(new) {
        if properties.port.is_none() && same_kind {
            properties.port = old.port;
        }
    } else if properties.hostname.is_none() && new.publish == Some(true) && old.publish == Some(true) {
        properties.hostname = old.hostname.clone();
    }
    properties
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_published_tunnel_keeps_its_served_hostname() {
        let old =
            TunnelProperties { publish: Some(true), hostname: Some("abc.t.example.com".into()), ..Default::default() };
        let new = TunnelProperties { publish: Some(true), ..Default::default() };
        assert_eq!(keep_hostname(&old, &new).hostname.as_deref(), Some("abc.t.example.com"));
        let named = TunnelProperties { hostname: Some("web".into()), ..new.clone() };
        assert_eq!(keep_hostname(&old, &named).hostname.as_deref(), Some("web"));
        let private = TunnelProperties { publish: Some(false), ..Default::default() };
        assert_eq!(keep_hostname(&old, &private).hostname, None);
        let tcp = |port| TunnelProperties {
            publish: Some(true),
            protocol: Some("tcp".into()),
            port,
            hostname: Some("edge.example.com".into()),
            ..Default::default()
        };
        let kept = keep_hostname(&tcp(Some(20001)), &TunnelProperties { hostname: None, ..tcp(None) });
        assert_eq!((kept.port, kept.hostname), (Some(20001), None));
    }
}

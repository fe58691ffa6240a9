//! `strait forward`: publish (or privately offer) a local service, and keep
//! it up across engine restarts and network drops.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use strait_agent::{Client, ControlChannel, TunnelProperties};
use tokio_util::sync::CancellationToken;

use crate::retry::{self, Backoff};

/// The options of a tunnel, as `rstream forward` takes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TunnelOptions {
    /// Tunnel name (unique among your tunnels; dialers use it).
    #[arg(long)]
    pub name: Option<String>,
    /// Keep the tunnel private: reachable only by authenticated dialers
    /// (rstream's `--no-publish`).
    #[arg(long, visible_alias = "no-publish", conflicts_with = "publish")]
    pub private: bool,
    /// Publish the tunnel (the default).
    #[arg(long)]
    pub publish: bool,
    /// Protocol of a published tunnel: http (the default), tls, or tcp and
    /// udp on a public port of their own (`tcp://host:port`).
    #[arg(long, value_parser = ["http", "tls", "tcp", "udp"], conflicts_with_all = ["http", "tls", "tcp", "udp"])]
    pub protocol: Option<String>,
    /// Same as --protocol http (the rstream CLI's spelling).
    #[arg(long, conflicts_with_all = ["tls", "tcp", "udp"])]
    pub http: bool,
    /// Same as --protocol tls.
    #[arg(long, conflicts_with_all = ["tcp", "udp"])]
    pub tls: bool,
    /// Same as --protocol tcp.
    #[arg(long, conflicts_with = "udp")]
    pub tcp: bool,
    /// Same as --protocol udp.
    #[arg(long)]
    pub udp: bool,
    /// The public port to ask for (tcp and udp tunnels; within the
    /// engine's tcp.port_range or udp.port_range). Without it the engine
    /// picks one; reconnects keep it either way.
    #[arg(long)]
    pub port: Option<u16>,
    /// A datagram tunnel: the local service is UDP (private tunnels; over
    /// QUIC its packets ride QUIC datagrams). Published, it is --protocol udp.
    #[arg(long, conflicts_with_all = ["http", "tls", "tcp", "protocol"])]
    pub datagram: bool,
    /// A datagram tunnel (implied) whose packets always travel in a stream
    /// (no loss, in order, up to 65,507 bytes), never as QUIC datagrams
    /// (which carry at most about 1,300 bytes).
    #[arg(long, conflicts_with_all = ["http", "tls", "tcp"])]
    pub datagram_guaranteed_delivery: bool,
    /// Hostname (or label) to publish on, under .t.<engine host>.
    #[arg(long)]
    pub host: Option<String>,
    /// Labels, KEY=VALUE, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Require an engine token from HTTP clients (Bearer or rstream.token).
    #[arg(long)]
    pub token_auth: bool,
    /// Allowed client addresses or CIDRs, repeatable.
    #[arg(long = "trusted-ip")]
    pub trusted_ips: Vec<String>,
    /// Allowed client addresses or CIDRs, comma-separated (the rstream
    /// CLI's spelling).
    #[arg(long = "trusted-ips", value_delimiter = ',')]
    pub trusted_ips_list: Vec<String>,
    /// HTTP version towards the local service.
    #[arg(long, value_parser = ["http/1.1", "h2c"])]
    pub http_version: Option<String>,
    /// The local service speaks TLS.
    #[arg(long)]
    pub upstream_tls: bool,
    /// TLS tunnels: terminate at the engine or pass through.
    #[arg(long, value_parser = ["terminated", "passthrough"])]
    pub tls_mode: Option<String>,
    /// TLS tunnels: ALPN protocols offered, repeatable.
    #[arg(long = "tls-alpn")]
    pub tls_alpns: Vec<String>,
    /// TLS tunnels: minimum TLS version (1.2 or 1.3).
    #[arg(long)]
    pub tls_min_version: Option<String>,
    /// One line per HTTP request (method, path, status, time), or per
    /// connection or session of a tcp or udp tunnel (source, bytes, time):
    /// `auto` shows them when stdout is a terminal.
    #[arg(long, value_enum, default_value_t = RequestLog::Auto)]
    pub request_log: RequestLog,
    /// Path routing and traffic policy (published http tunnels).
    #[command(flatten)]
    pub route: crate::policy::RouteOptions,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RequestLog {
    #[default]
    Auto,
    On,
    Off,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {text:?} is not KEY=VALUE")),
    }
}

impl TunnelOptions {
    /// What to ask the engine for. Fails on a policy option that cannot
    /// be read (a missing policy file, a bad --rate-limit).
    pub fn properties(&self) -> anyhow::Result<TunnelProperties> {
        let publish = !self.private;
        let protocol = self.protocol();
        let datagram = self.datagram || self.datagram_guaranteed_delivery || protocol.as_deref() == Some("udp");
        let protocol = match protocol {
            Some(p) => Some(p),
            None if datagram && publish => Some("udp".to_string()),
            None if publish => Some("http".to_string()),
            None => None,
        };
        let mut labels = self.labels.iter().cloned().collect::<HashMap<_, _>>();
        labels.extend(self.route.labels()?);
        Ok(TunnelProperties {
            name: self.name.clone(),
            publish: Some(publish),
            protocol,
            port: self.port.map(u32::from),
            r#type: datagram.then(|| "datagram".to_string()),
            datagram_guaranteed_delivery: self.datagram_guaranteed_delivery.then_some(true),
            labels,
            hostname: self.host.clone(),
            token_auth: self.token_auth.then_some(true),
            trusted_ips: self
                .trusted_ips
                .iter()
                .chain(&self.trusted_ips_list)
                .map(|ip| ip.trim().to_string())
                .filter(|ip| !ip.is_empty())
                .collect(),
            http_version: self.http_version.clone(),
            upstream_tls: self.upstream_tls.then_some(true),
            tls_mode: self.tls_mode.clone(),
            tls_alpns: self.tls_alpns.clone(),
            tls_min_version: self.tls_min_version.clone(),
            ..Default::default()
        })
    }
}

impl TunnelOptions {
    /// `--protocol`, or the shorthand flag that stands for it.
    fn protocol(&self) -> Option<String> {
        let shorthand = [(self.http, "http"), (self.tls, "tls"), (self.tcp, "tcp"), (self.udp, "udp")];
        self.protocol.clone().or_else(|| shorthand.iter().find(|(set, _)| *set).map(|(_, p)| p.to_string()))
    }

    /// Whether streams go through the request log: only plain HTTP/1.1 can
    /// be read on the way (h2c and upstream TLS are spliced as they are).
    pub fn logs_requests(&self) -> bool {
        let http1 = !self.private
            && !self.datagram
            && !self.udp
            && self.protocol().as_deref().unwrap_or("http") == "http"
            && !self.upstream_tls
            && self.http_version.as_deref() != Some("h2c");
        match self.request_log {
            RequestLog::On => http1,
            RequestLog::Off => false,
            RequestLog::Auto => http1 && std::io::IsTerminal::is_terminal(&std::io::stdout()),
        }
    }

    /// Whether a tcp or udp tunnel on a port of its own logs a line per
    /// connection or session.
    fn logs_sessions(&self) -> bool {
        match self.request_log {
            RequestLog::On => true,
            RequestLog::Off => false,
            RequestLog::Auto => std::io::IsTerminal::is_terminal(&std::io::stdout()),
        }
    }
}

/// Serves a tunnel's streams until it closes. A published tcp or udp
/// tunnel logs one line per connection or session, as an HTTP tunnel logs
/// its requests.
///
/// Each stream's task runs in `sessions`, so that a stopping command can
/// wait for the last session lines before it exits.
async fn serve_streams(
    tunnel: &mut strait_agent::Tunnel,
    local: &str,
    options: &TunnelOptions,
    sessions: &tokio_util::task::TaskTracker,
) {
    let properties = tunnel.properties();
    let datagrams = properties.r#type.as_deref() == Some("datagram");
    let own_port = strait_agent::on_own_port(properties) && options.logs_sessions();
    let log_requests = options.logs_requests();
    while let Some(incoming) = tunnel.accept_incoming().await {
        let (stream, local) = (incoming.stream, local.to_string());
        let source = incoming.source.map_or_else(|| "-".to_string(), |ip| ip.to_string());
        if log_requests && !datagrams {
            sessions.spawn(crate::request_log::serve(stream, local));
            continue;
        }
        sessions.spawn(async move {
            let started = Instant::now();
            let carried = strait_agent::forward_one(stream, local, datagrams).await;
            if own_port {
                let protocol = if datagrams { "udp" } else { "tcp" };
                println!("{}", crate::request_log::session_line(protocol, &source, &carried, started.elapsed()));
            }
        });
    }
}

/// Parses `[[host:]port]` into a connectable address.
pub fn local_target(spec: Option<&str>) -> anyhow::Result<String> {
    let spec = spec.unwrap_or("8080").trim();
    if let Ok(port) = spec.parse::<u16>() {
        anyhow::ensure!(port != 0, "port 0 is not a service");
        return Ok(format!("127.0.0.1:{port}"));
    }
    match spec.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(spec.to_string()),
        _ => anyhow::bail!("{spec:?} is not PORT or HOST:PORT"),
    }
}

/// How long `forward` waits for the engine to let go of a tunnel an
/// earlier connection of the same principal still holds: a control
/// channel's liveness (three 5 s heartbeats) with room to spare. Past it,
/// the other tunnel is taken to be really open and the refusal stands.
const EARLIER_CONNECTION_PATIENCE: Duration = Duration::from_secs(60);

/// How long closing the tunnel may take when the command stops.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until the shutdown signal; reconnects with backoff and recreates
/// the tunnel on the same hostname; stops on an error that will not heal.
pub async fn run(
    client: Client,
    options: TunnelOptions,
    local: String,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut properties = options.properties()?;
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    let mut announced = false;
    // When we started waiting for the holder of our name or hostname, and
    // when it was last heard from, as the first refusal said.
    let mut holder_heard = None;
    loop {
        let session = async {
            let control = client.connect().await?;
            let tunnel = control.open_tunnel(properties.clone()).await?;
            Ok::<_, strait_agent::AgentError>((control, tunnel))
        };
        let Some(session) = shutdown.run_until_cancelled(session).await else { return Ok(()) };
        let (control, mut tunnel) = match session {
            Ok(pair) => pair,
            Err(error) if holder_stays_silent(&error, &mut holder_heard) => {
                let delay = backoff.next_delay();
                eprintln!(
                    "strait: {error}; if an earlier connection of this agent holds it, the engine lets go once \
                     that connection's liveness runs out; retrying in {:.1}s",
                    delay.as_secs_f32()
                );
                if shutdown.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
                    return Ok(());
                }
                continue;
            }
            Err(error) if error.is_permanent(announced) => return Err(retry::explain(&error)),
            Err(error) => {
                let delay = backoff.next_delay();
                eprintln!("strait: {error}; retrying in {:.1}s", delay.as_secs_f32());
                if shutdown.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
                    return Ok(());
                }
                continue;
            }
        };
        backoff.reset();
        holder_heard = None;
        // A reconnect lands on the same address.
        strait_agent::pin_address(&mut properties, tunnel.properties());
        let address = tunnel.public_url().unwrap_or_else(|| {
            format!("rstrm://{} (private)", tunnel.properties().name.as_deref().unwrap_or(tunnel.id()))
        });
        let transport = control.transport();
        if announced {
            eprintln!("strait: reconnected over {transport}, forwarding {address} -> {local}");
        } else {
            println!("Forwarding {address} -> {local} (over {transport})");
            announced = true;
        }
        let sessions = tokio_util::task::TaskTracker::new();
        let served = async {
            serve_streams(&mut tunnel, &local, &options, &sessions).await;
            control.closed().await
        };
        let Some(reason) = shutdown.run_until_cancelled(served).await else {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, tunnel.close()).await;
            close_quietly(&control).await;
            // Sessions end with the tunnel; their log lines come before
            // the exit.
            sessions.close();
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, sessions.wait()).await;
            return Ok(());
        };
        close_quietly(&control).await;
        // Let go of the dead connection now, not after the backoff: held
        // open (CLOSE-WAIT) it keeps the engine's end from going away, and
        // a restarting engine may not be able to bind its port again.
        drop(tunnel);
        drop(control);
        let delay = backoff.next_delay();
        eprintln!("strait: connection lost ({reason}); reconnecting in {:.1}s", delay.as_secs_f32());
        if shutdown.run_until_cancelled(tokio::time::sleep(delay)).await.is_none() {
            return Ok(());
        }
    }
}

/// Whether to wait for the engine to let go of a tunnel our principal
/// still holds: yes while its channel stays silent since the first refusal
/// (an earlier connection of ours, dead), within a bound; no once it has
/// been heard from again (another agent holding it, alive).
fn holder_stays_silent(error: &strait_agent::AgentError, waiting: &mut Option<(Instant, Instant)>) -> bool {
    let Some(silence) = retry::silence_of_the_holder(error) else { return false };
    let now = Instant::now();
    let Some(heard) = now.checked_sub(silence) else { return false };
    let (since, first_heard) = *waiting.get_or_insert((now, heard));
    // A second of slack for the engine's rounding and the round trip.
    heard <= first_heard + Duration::from_secs(1) && since.elapsed() < EARLIER_CONNECTION_PATIENCE
}

/// Closes a channel, waiting at most a second for the engine.
pub async fn close_quietly(control: &ControlChannel) {
    let _ = tokio::time::timeout(Duration::from_secs(1), control.close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_targets() {
        assert_eq!(local_target(None).unwrap(), "127.0.0.1:8080");
        assert_eq!(local_target(Some("3000")).unwrap(), "127.0.0.1:3000");
        assert_eq!(local_target(Some("db.internal:5432")).unwrap(), "db.internal:5432");
        assert!(local_target(Some("0")).is_err());
        assert!(local_target(Some("host:")).is_err());
    }

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        options: TunnelOptions,
    }

    fn properties(args: &[&str]) -> Result<TunnelProperties, clap::Error> {
        use clap::Parser;
        let flags = Flags::try_parse_from(std::iter::once("forward").chain(args.iter().copied()))?;
        Ok(flags.options.properties().expect("readable options"))
    }

    #[test]
    fn the_rstream_cli_spellings_carry_over() {
        let p = properties(&["--tls", "--trusted-ips", "10.0.0.0/8, 192.168.1.7", "--trusted-ip", "::1"]).unwrap();
        assert_eq!(p.protocol.as_deref(), Some("tls"));
        assert_eq!(p.trusted_ips, ["::1", "10.0.0.0/8", "192.168.1.7"]);
        assert_eq!(properties(&["--tcp"]).unwrap().protocol.as_deref(), Some("tcp"));
        assert_eq!(properties(&["--http", "--publish"]).unwrap().protocol.as_deref(), Some("http"));
        let private = properties(&["--no-publish", "--name", "db"]).unwrap();
        assert_eq!((private.publish, private.protocol), (Some(false), None));
        assert!(properties(&["--http", "--tls"]).is_err());
        let udp = properties(&["--datagram", "--no-publish", "--datagram-guaranteed-delivery"]).unwrap();
        assert_eq!(
            (udp.r#type.as_deref(), udp.protocol, udp.datagram_guaranteed_delivery),
            (Some("datagram"), None, Some(true))
        );
        let guaranteed = properties(&["--protocol", "udp", "--datagram-guaranteed-delivery"]).unwrap();
        assert_eq!(
            (guaranteed.r#type.as_deref(), guaranteed.protocol.as_deref(), guaranteed.datagram_guaranteed_delivery),
            (Some("datagram"), Some("udp"), Some(true))
        );
        assert!(properties(&["--tcp", "--datagram-guaranteed-delivery"]).is_err());
        assert!(properties(&["--tcp", "--protocol", "http"]).is_err());
        let udp = properties(&["--protocol", "udp", "--port", "21005"]).unwrap();
        assert_eq!(
            (udp.r#type.as_deref(), udp.protocol.as_deref(), udp.publish, udp.port),
            (Some("datagram"), Some("udp"), Some(true), Some(21005))
        );
        let tcp = properties(&["--tcp"]).unwrap();
        assert_eq!((tcp.r#type, tcp.protocol.as_deref(), tcp.port), (None, Some("tcp"), None));
        assert_eq!(properties(&["--udp"]).unwrap().r#type.as_deref(), Some("datagram"));
        assert!(properties(&["--udp", "--tcp"]).is_err());
    }
}

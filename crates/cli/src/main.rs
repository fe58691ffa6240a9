//! `strait`: the agent and command line for strait and rstream engines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod apply;
mod context;
mod dial;
mod doctor;
mod engine_api;
mod events;
mod forward;
mod inventory;
mod policy;
mod request_log;
mod retry;
mod run;
mod shutdown;
mod suggest;
mod token;

use context::{ConfigFile, Context, Overrides, TokenSource};

#[derive(Parser)]
#[command(
    name = "strait",
    version,
    about = "Publish local services through a strait or rstream engine, and reach private ones",
    after_help = "Examples:\n  strait context create lab --engine edge.example.com:443 --token $TOKEN --use\n  \
                  strait forward 3000\n  strait forward 5432 --private --name db\n  \
                  strait run --apply tunnels.yaml --watch\n  strait connect db --listen 127.0.0.1:15432\n  ssh -o ProxyCommand='strait dial ssh-box' user@ssh-box"
)]
struct Cli {
    /// Agent configuration file [default: ~/.rstream/config.yaml].
    #[arg(long, env = "RSTREAM_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Context to use [default: the file's default context].
    #[arg(long, env = "RSTREAM_CONTEXT", global = true)]
    context: Option<String>,
    /// Engine address, host:port.
    #[arg(long, env = "RSTREAM_ENGINE", global = true)]
    engine: Option<String>,
    /// Authentication token (a JWT).
    #[arg(long, env = "RSTREAM_AUTHENTICATION_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Trust this CA file for the engine's certificate.
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// TLS server name of the engine, when it differs from its host.
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// What carries the agent's channels: auto (QUIC first, TLS 300 ms
    /// later, the first to connect wins), tls or quic [default: auto, or
    /// the context's transport.mode]. `forward`, `connect` and `dial` also
    /// take it as --transport.
    #[arg(long, env = "RSTREAM_TUNNEL_TRANSPORT", global = true, value_name = "MODE")]
    tunnel_transport: Option<strait_agent::TransportMode>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a running engine end to end: DNS, certificates, the Engine
    /// API, round trips through a private and a published tunnel over TLS
    /// and QUIC. Exit 0 pass, 3 warn, 1 fail.
    #[command(
        after_help = "Examples:\n  strait doctor\n  strait doctor -o json --warn-ms 100 --threshold tunnel.private.quic=50:500"
    )]
    Doctor(doctor::DoctorArgs),
    /// Forward a local service through a tunnel.
    #[command(
        after_help = "Examples:\n  strait forward 3000\n  strait forward 127.0.0.1:8443 --protocol tls --tls-mode passthrough\n  \
                            strait forward 5432 --private --name db"
    )]
    Forward {
        /// Local service: PORT or HOST:PORT [default: 8080].
        target: Option<String>,
        /// auto, tls or quic (the same as --tunnel-transport).
        #[arg(long, value_name = "MODE")]
        transport: Option<strait_agent::TransportMode>,
        #[command(flatten)]
        options: Box<forward::TunnelOptions>,
    },
    /// Listen on a local port; each connection dials a private tunnel.
    #[command(after_help = "Example:\n  strait connect db --listen 127.0.0.1:15432")]
    Connect {
        /// Tunnel id or name.
        tunnel: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Skip the engine's answer (one round trip less; a refused dial
        /// then shows only as a closed connection).
        #[arg(long)]
        zero_rtt: bool,
        /// auto, tls or quic (the same as --tunnel-transport).
        #[arg(long, value_name = "MODE")]
        transport: Option<strait_agent::TransportMode>,
        /// Listen for UDP: each source gets a datagram channel to the
        /// tunnel (a `forward --datagram` tunnel).
        #[arg(long)]
        udp: bool,
    },
    /// Keep the tunnels a declarative file describes.
    #[command(
        after_help = "Examples:\n  strait run --apply tunnels.yaml\n  strait run --apply tunnels.yaml --watch\n\n\
                            tunnels.yaml:\n  version: 1\n  tunnels:\n    - name: web\n      forward: 3000\n      \
                            tunnel: {publish: true, labels: {team: web}}\n    - name: db\n      forward: ${DB_PORT}\n      \
                            tunnel: {publish: false}"
    )]
    Run {
        /// The tunnels file (YAML, `version: 1`); `${NAME}` expands from
        /// the environment, `$${` is a literal `${`.
        #[arg(long, value_name = "FILE")]
        apply: PathBuf,
        /// Re-apply whenever the file changes.
        #[arg(long)]
        watch: bool,
    },
    /// Dial a private tunnel on stdin/stdout (for ssh ProxyCommand).
    #[command(after_help = "Example:\n  ssh -o ProxyCommand='strait dial ssh-box' user@ssh-box")]
    Dial {
        /// Tunnel id or name.
        tunnel: String,
        /// Skip the engine's answer (one round trip less; a refused dial
        /// then shows only as a closed connection).
        #[arg(long)]
        zero_rtt: bool,
        /// auto, tls or quic (the same as --tunnel-transport).
        #[arg(long, value_name = "MODE")]
        transport: Option<strait_agent::TransportMode>,
    },
    /// Mint an HS256 token for a self-hosted engine.
    #[command(after_help = "Examples:\n  strait token --secret \"$SECRET\" --sub ci-runner --ttl 12h\n  \
                            strait token --secret \"$SECRET\" --sub ops --ttl 1h --admin")]
    Token {
        /// The engine's auth.jwt.token_jwt_secret.
        #[arg(long, env = "STRAIT_TOKEN_SECRET", hide_env_values = true)]
        secret: String,
        /// Principal (the `sub` claim).
        #[arg(long)]
        sub: String,
        /// Lifetime: 90s, 15m, 12h, 30d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Accept a secret shorter than 32 bytes.
        #[arg(long)]
        allow_weak_secret: bool,
        /// Mint an operator token (claim `strait_admin: true`): the engine
        /// shows it every principal's clients, tunnels and events and lets
        /// it act on them. Anyone holding the engine's secret can mint one,
        /// so guard the token as you guard the secret, and keep its TTL short.
        #[arg(long)]
        admin: bool,
    },
    /// Stream the engine's events as JSON lines, or POST them (webhooks).
    #[command(
        after_help = "Examples:\n  strait events\n  strait events --transport websocket --events tunnel.created,tunnel.deleted\n  \
                            strait events --forward-to https://hooks.example.com/strait --webhook --webhook-secret $SECRET\n  \
                            strait events --params '{\"tunnels\":{\"filters\":{\"labels\":{\"team\":\"core\"}}}}'"
    )]
    Events {
        #[arg(long, value_enum, default_value = "sse")]
        transport: events::Transport,
        /// Only these event types, comma-separated (e.g. tunnel.created,client.deleted).
        #[arg(long, value_delimiter = ',')]
        events: Vec<String>,
        /// Server-side filters, as the API's `params` JSON.
        #[arg(long, value_parser = parse_json)]
        params: Option<serde_json::Value>,
        /// POST each event to this URL instead of printing it.
        #[arg(long)]
        forward_to: Option<http::Uri>,
        /// Deliver signed webhooks (rstream's shape and headers); needs --forward-to.
        #[arg(long, requires = "forward_to")]
        webhook: bool,
        /// Webhook signing secret (`whsec_...`); `strait events --new-webhook-secret` makes one.
        #[arg(long, env = "STRAIT_WEBHOOK_SECRET", hide_env_values = true, required_if_eq("webhook", "true"))]
        webhook_secret: Option<String>,
        /// The `rstream-webhook-id` header value.
        #[arg(long, default_value = "strait-cli")]
        webhook_id: String,
        /// Print a new webhook signing secret and exit (it reads no context,
        /// so `RSTREAM_*` variables do not matter).
        #[arg(long, conflicts_with_all = ["events", "params", "forward_to", "webhook", "webhook_id"])]
        new_webhook_secret: bool,
    },
    /// List tunnels (Engine API).
    #[command(
        after_help = "Examples:\n  strait tunnels\n  strait tunnels --params '{\"filters\":{\"publish\":true}}' --json"
    )]
    Tunnels {
        /// Filters, as the API's `params` JSON.
        #[arg(long, value_parser = parse_json)]
        params: Option<serde_json::Value>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List connected clients (Engine API).
    #[command(after_help = "Examples:\n  strait clients\n  strait clients --json")]
    Clients {
        #[arg(long, value_parser = parse_json)]
        params: Option<serde_json::Value>,
        #[arg(long)]
        json: bool,
    },
    /// Manage contexts in the agent configuration file.
    #[command(subcommand)]
    Context(ContextCommand),
    /// Print shell completions.
    #[command(after_help = "Example:\n  strait completions bash > /etc/bash_completion.d/strait")]
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ContextCommand {
    /// Create or update a context.
    #[command(after_help = "Example:\n  strait context create lab --engine edge.example.com:443 --token $TOKEN --use")]
    Create {
        name: String,
        /// Read the token from this file at each start instead of storing it.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Make it the default context.
        #[arg(long = "use")]
        make_default: bool,
    },
    /// Make a context the default.
    #[command(after_help = "Example:\n  strait context use lab")]
    Use { name: String },
    /// List contexts (the default is marked with *).
    #[command(after_help = "Example:\n  strait context list")]
    List,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => suggest::without_opposites(error, &Cli::command()).exit(),
    };
    let _ = strait_agent::rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRAIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A full disk under stderr loses log lines, not the agent.
        .log_internal_errors(false)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        let result = run(cli).await;
        // Tell the engine now: over QUIC nothing else will when we exit.
        strait_agent::close_quic(std::time::Duration::from_secs(1)).await;
        result
    });
    // A blocking stdin read (dial) must not hold the exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.is::<shutdown::Interrupted>() => ExitCode::from(130),
        // The report said it all.
        Err(error) if error.is::<doctor::Unhealthy>() => {
            ExitCode::from(error.downcast_ref::<doctor::Unhealthy>().map_or(1, doctor::Unhealthy::exit_code))
        }
        Err(error) => {
            eprintln!("strait: {error:#}");
            ExitCode::FAILURE
        }
    }
}

impl Cli {
    fn overrides(&self) -> Overrides {
        Overrides {
            config: self.config.clone(),
            context: self.context.clone(),
            engine: self.engine.clone(),
            token: self.token.clone(),
            ca_file: self.ca_file.clone(),
            server_name: self.server_name.clone(),
            transport: self.transport(),
        }
    }

    /// The command's own --transport, else --tunnel-transport.
    fn transport(&self) -> Option<strait_agent::TransportMode> {
        let own = match &self.command {
            Command::Forward { transport, .. }
            | Command::Connect { transport, .. }
            | Command::Dial { transport, .. } => *transport,
            _ => None,
        };
        own.or(self.tunnel_transport)
    }

    fn client(&self) -> anyhow::Result<strait_agent::Client> {
        Ok(strait_agent::Client::new(context::resolve(&self.overrides())?)?)
    }

    /// A client for private dials, explicit unless asked otherwise.
    fn dialer(&self, zero_rtt: bool) -> anyhow::Result<strait_agent::Client> {
        let mut config = context::resolve(&self.overrides())?;
        config.zero_rtt = zero_rtt;
        Ok(strait_agent::Client::new(config)?)
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Before anything reads the context or the environment.
    if let Command::Events { new_webhook_secret: true, .. } = &cli.command {
        println!("{}", events::generate_secret());
        return Ok(());
    }
    let shutdown = shutdown::install()?;
    match &cli.command {
        Command::Forward { target, options, .. } => {
            let local = forward::local_target(target.as_deref())?;
            forward::run(cli.client()?, (**options).clone(), local, &shutdown).await
        }
        Command::Doctor(args) => {
            let check = doctor::run(context::resolve(&cli.overrides())?, args.clone());
            shutdown::or_interrupted(&shutdown, check).await
        }
        Command::Run { apply, watch } => run::run(cli.overrides(), apply.clone(), *watch, &shutdown).await,
        Command::Connect { tunnel, listen, zero_rtt, udp: true, .. } => {
            dial::connect_udp(cli.dialer(*zero_rtt)?, tunnel, listen, &shutdown).await
        }
        Command::Connect { tunnel, listen, zero_rtt, .. } => {
            dial::connect(cli.dialer(*zero_rtt)?, tunnel, listen, &shutdown).await
        }
        Command::Dial { tunnel, zero_rtt, .. } => dial::dial(cli.dialer(*zero_rtt)?, tunnel, &shutdown).await,
        Command::Events { transport, events, params, forward_to, webhook, webhook_secret, webhook_id, .. } => {
            let sink = match forward_to {
                None => events::Sink::Stdout,
                Some(url) => events::Sink::Post {
                    url: url.clone(),
                    webhook: webhook.then(|| events::Webhook {
                        secret: webhook_secret.clone().unwrap_or_default(),
                        id: webhook_id.clone(),
                    }),
                },
            };
            let options =
                events::Options { transport: *transport, types: events.clone(), params: params.clone(), sink };
            events::run(engine_api::EngineApi::new(cli.client()?), options, &shutdown).await
        }
        Command::Tunnels { params, json } => {
            let api = engine_api::EngineApi::new(cli.client()?);
            let show = inventory::show(&api, inventory::Kind::Tunnels, params.as_ref(), *json);
            shutdown::or_interrupted(&shutdown, show).await
        }
        Command::Clients { params, json } => {
            let api = engine_api::EngineApi::new(cli.client()?);
            let show = inventory::show(&api, inventory::Kind::Clients, params.as_ref(), *json);
            shutdown::or_interrupted(&shutdown, show).await
        }
        Command::Token { secret, sub, ttl, allow_weak_secret, admin } => {
            let claims = token::Claims { sub, ttl_seconds: token::parse_ttl(ttl)?, admin: *admin };
            println!("{}", token::mint(secret, &claims, *allow_weak_secret)?);
            Ok(())
        }
        Command::Context(command) => context_command(&cli, command),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "strait", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

fn context_command(cli: &Cli, command: &ContextCommand) -> anyhow::Result<()> {
    let path = cli.config.clone().unwrap_or_else(context::default_path);
    let mut file = ConfigFile::load(&path)?;
    match command {
        ContextCommand::Create { name, token_file, make_default } => {
            let token = match (token_file, &cli.token) {
                (Some(path), _) => Some(TokenSource::File(path.clone())),
                (None, Some(token)) => Some(TokenSource::Inline(token.clone())),
                (None, None) => None,
            };
            file.upsert(&Context {
                name: name.clone(),
                engine: cli.engine.clone(),
                token,
                ca_file: cli.ca_file.clone(),
                server_name: cli.server_name.clone(),
                transport: cli.tunnel_transport.map(|t| t.to_string()),
            });
            if *make_default || file.default_context().is_none() {
                file.set_default(name);
            }
            file.save()?;
            println!("context {name} saved in {}", path.display());
        }
        ContextCommand::Use { name } => {
            anyhow::ensure!(file.context(name).is_some(), "context {name:?} is not in {}", path.display());
            file.set_default(name);
            file.save()?;
            println!("default context: {name}");
        }
        ContextCommand::List => {
            let default = file.default_context().map(String::from);
            for ctx in file.contexts() {
                let mark = if Some(&ctx.name) == default.as_ref() { "*" } else { " " };
                println!("{mark} {}\t{}", ctx.name, ctx.engine.as_deref().unwrap_or("-"));
            }
        }
    }
    Ok(())
}

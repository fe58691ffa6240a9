//! The `strait-engine` binary: configuration in, engine running, signals to
//! stop.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use strait_engine::config::{Config, LogFormat};
use strait_engine::{Engine, auth, dev};

#[derive(Parser)]
#[command(
    name = "strait-engine",
    version,
    about = "A self-hosted tunnel engine that speaks the rstream agent protocol"
)]
struct Cli {
    /// Configuration file (YAML, the rstream engine CE format).
    #[arg(short = 'c', long = "config", env = "RSTREAM_ENGINE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Print one JSON line with the bound addresses on stdout once listening.
    #[arg(long, global = true)]
    print_ready: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine from the configuration (the default).
    Run,
    /// Run a self-contained local engine: generated CA and certificate for
    /// localhost and *.t.localhost, a generated secret, a printed token.
    Dev {
        /// State folder for the CA, certificate and secret.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Address of the TLS listener [default: 127.0.0.1:8443, or a free
        /// port when 8443 is taken].
        #[arg(long)]
        listen: Option<String>,
        /// Do not publish the demo service.
        #[arg(long)]
        no_demo: bool,
    },
    /// Validate the configuration and its files without starting: exit 0
    /// when it would start, 1 when something is wrong, 2 for a bad file.
    CheckConfig {
        /// Also refuse development defaults: a short or sample JWT secret,
        /// a self-signed, development or expired certificate, a certificate
        /// that does not cover engine.host and *.t.<engine.host>, metrics
        /// without a bearer token.
        #[arg(long)]
        production: bool,
    },
    /// Generate a CA and a certificate for HOST and *.t.HOST into a folder.
    GenCerts {
        #[arg(long, default_value = "localhost")]
        host: String,
        #[arg(long)]
        out: PathBuf,
    },
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRAIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},rustls=warn,hyper=warn")));
    // Colour only for a person at a terminal; log files and collectors get
    // plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A log that cannot be written (a full disk) loses its lines, not the
    // engine: by default the subscriber reports a failed write with
    // eprintln!, which panics when stderr is what failed, at every event.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    strait_engine::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => runtime.block_on(run(cli.config, cli.print_ready)),
        Command::Dev { dir, listen, no_demo } => runtime.block_on(run_dev(dir, listen, !no_demo, cli.print_ready)),
        Command::CheckConfig { production } => check_config(cli.config, production),
        Command::GenCerts { host, out } => match dev::generate_certs(&host, &out) {
            Ok(files) => {
                println!("ca: {}\ncert: {}\nkey: {}", files.ca.display(), files.cert.display(), files.key.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("strait-engine: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

fn env_vars() -> Vec<(String, String)> {
    std::env::vars().collect()
}

fn load(path: Option<&PathBuf>) -> Result<strait_engine::config::Loaded, ExitCode> {
    let loaded = match path {
        Some(path) => Config::load(path, env_vars()),
        None => Config::from_env(env_vars()),
    };
    loaded.map_err(|error| {
        eprintln!("strait-engine: {error}");
        ExitCode::from(2)
    })
}

async fn run(path: Option<PathBuf>, print_ready: bool) -> ExitCode {
    match load(path.as_ref()) {
        Ok(loaded) => serve(loaded.config, loaded.warnings, print_ready).await,
        Err(code) => code,
    }
}

fn check_config(path: Option<PathBuf>, production: bool) -> ExitCode {
    let loaded = match load(path.as_ref()) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let report = strait_engine::check::check(&loaded.config, &loaded.warnings, production);
    println!("{report}");
    if report.errors() == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

async fn run_dev(dir: Option<PathBuf>, listen: Option<String>, demo: bool, print_ready: bool) -> ExitCode {
    let dir = dir.unwrap_or_else(dev::default_dir);
    let listen = listen.unwrap_or_else(|| {
        // A first run should not fail because something else has 8443.
        match std::net::TcpListener::bind("127.0.0.1:8443") {
            Ok(_) => "127.0.0.1:8443".to_string(),
            Err(_) => {
                eprintln!("strait-engine dev: 127.0.0.1:8443 is taken; using a free port");
                "127.0.0.1:0".to_string()
            }
        }
    });
    let prepared = dev::generate_certs("localhost", &dir).and_then(|files| Ok((files, dev::secret(&dir)?)));
    let (files, secret) = match prepared {
        Ok(p) => p,
        Err(error) => {
            eprintln!("strait-engine dev: {error}");
            return ExitCode::FAILURE;
        }
    };
    let yaml = format!(
        "engine: {{host: localhost, log_level: info}}\n\
         tls: {{enabled: true, listen_addr: \"{listen}\"}}\n\
         certs: {{static: {{enabled: true, cert_file: \"{}\", key_file: \"{}\"}}}}\n\
         auth: {{jwt: {{enabled: true, token_jwt_secret: \"{secret}\"}}}}\n\
         tcp: {{enabled: true}}\n\
         udp: {{enabled: true}}\n",
        files.cert.display(),
        files.key.display()
    );
    let loaded = match Config::from_yaml_str(&yaml, Vec::new()) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("strait-engine dev: {error}");
            return ExitCode::FAILURE;
        }
    };
    let Some(engine) = start(loaded.config, loaded.warnings).await else { return ExitCode::FAILURE };
    let port = engine.tls_addr.port();
    let token = auth::mint(secret.as_bytes(), "dev", Some(30 * 24 * 3600));
    let ca = files.ca.display();
    let demo_url = if demo {
        let stop = engine.shared.shutdown.child_token();
        match dev::demo::start(engine.tls_addr, &files.ca, token.clone(), stop).await {
            Ok(demo) => Some(demo.url),
            Err(error) => {
                eprintln!("strait-engine dev: {error}");
                engine.shutdown().await;
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    if print_ready {
        println!(
            "{}",
            serde_json::json!({"event": "ready", "tls": engine.tls_addr.to_string(), "demo": demo_url, "ca": files.ca, "token": token})
        );
    }
    println!("strait-engine dev is running on localhost:{port} (Ctrl-C to stop)\n");
    if let Some(url) = &demo_url {
        println!("A demo service is published through a real agent. Reach it with:\n\n    curl --cacert {ca} {url}\n");
    }
    println!(
        "Publish your own service (here, port 3000) with the strait agent:\n\n    \
         cargo run --release -p strait -- forward 3000 --engine localhost:{port} --ca-file {ca} --token {token}\n\n\
         Add --protocol tcp or --protocol udp for a public port of its own (tcp://localhost:20000-20999,\n    \
         udp://localhost:21000-21999).\n\n\
         The same engine, CA and token work with any rstream agent or SDK:\n\n    \
         RSTREAM_ENGINE=localhost:{port} SSL_CERT_FILE={ca} RSTREAM_AUTHENTICATION_TOKEN={token}\n"
    );
    run_until_signal(engine).await
}

/// Starts the engine, reporting a failure on stderr.
async fn start(config: Config, warnings: Vec<String>) -> Option<Engine> {
    init_tracing(config.engine.log_level.as_str(), config.engine.log_format);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    match Engine::start(config).await {
        Ok(engine) => Some(engine),
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("strait-engine: {error}");
            None
        }
    }
}

async fn serve(config: Config, warnings: Vec<String>, print_ready: bool) -> ExitCode {
    let Some(engine) = start(config, warnings).await else { return ExitCode::FAILURE };
    if print_ready {
        let mut ready = serde_json::json!({"event": "ready", "tls": engine.tls_addr.to_string()});
        if let Some(metrics) = engine.metrics_addr {
            ready["metrics"] = metrics.to_string().into();
        }
        if let Some(http) = engine.http_addr {
            ready["http"] = http.to_string().into();
        }
        if let Some(quic) = engine.quic_addr {
            ready["quic"] = quic.to_string().into();
        }
        println!("{ready}");
    }
    run_until_signal(engine).await
}

async fn run_until_signal(engine: Engine) -> ExitCode {
    wait_for_signal().await;
    tracing::info!("shutting down: no new connections, agents told, streams in flight draining");
    tokio::select! {
        _ = engine.shutdown() => tracing::info!("stopped"),
        _ = wait_for_signal() => tracing::warn!("second signal: exiting without waiting for the drain"),
    }
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

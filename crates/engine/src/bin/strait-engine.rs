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
        /// Address of the TLS listener.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
        Command::Dev { dir, listen } => runtime.block_on(run_dev(dir, listen, cli.print_ready)),
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

async fn run(path: Option<PathBuf>, print_ready: bool) -> ExitCode {
    let loaded = match &path {
        Some(path) => Config::load(path, env_vars()),
        None => Config::from_env(env_vars()),
    };
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("strait-engine: {error}");
            return ExitCode::from(2);
        }
    };
    serve(loaded.config, loaded.warnings, print_ready, None).await
}

async fn run_dev(dir: Option<PathBuf>, listen: String, print_ready: bool) -> ExitCode {
    let dir = dir.unwrap_or_else(dev::default_dir);
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
         auth: {{jwt: {{enabled: true, token_jwt_secret: \"{secret}\"}}}}\n",
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
    let token = auth::mint(secret.as_bytes(), "dev", Some(30 * 24 * 3600));
    let banner = move |addr: std::net::SocketAddr| {
        format!(
            "strait-engine dev is running on {addr}\n\
             \n  engine:  localhost:{port}\n  CA:      {ca}\n  token:   {token}\n\
             \nAgents connect with:\n  RSTREAM_ENGINE=localhost:{port} RSTREAM_AUTHENTICATION_TOKEN={token} \\\n  \
             SSL_CERT_FILE={ca} ...\n",
            port = addr.port(),
            ca = files.ca.display(),
        )
    };
    serve(loaded.config, loaded.warnings, print_ready, Some(Box::new(banner))).await
}

type Banner = Box<dyn FnOnce(std::net::SocketAddr) -> String + Send>;

async fn serve(config: Config, warnings: Vec<String>, print_ready: bool, banner: Option<Banner>) -> ExitCode {
    init_tracing(config.engine.log_level.as_str(), config.engine.log_format);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let engine = match Engine::start(config).await {
        Ok(engine) => engine,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("strait-engine: {error}");
            return ExitCode::FAILURE;
        }
    };
    if print_ready {
        let http = engine.http_addr.map(|a| a.to_string());
        println!("{}", serde_json::json!({"event": "ready", "tls": engine.tls_addr.to_string(), "http": http}));
    }
    if let Some(banner) = banner {
        eprintln!("{}", banner(engine.tls_addr));
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    engine.shutdown().await;
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

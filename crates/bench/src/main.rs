//! `strait-bench`: the load generator and stand-in services that
//! `bench/bench.py` drives. One binary, so that every tunnel in the
//! comparison is measured by the same client against the same servers.

use std::time::Duration;

use clap::{Parser, Subcommand};

mod blob;
mod hold;
mod load;
mod scale;
mod serve;
mod soak;
mod target;

use target::TargetArgs;

#[derive(Parser)]
#[command(name = "strait-bench", about = "Load generator and stand-in services for strait's benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A small keep-alive HTTP/1.1 server answering every request with a
    /// short body; prints {"listen": ADDR}.
    ServeHttp {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// The edge-cache rows' origin: `GET /.../BYTES` answers BYTES
    /// immutable bytes, `GET /_count/...` how often a path was asked for;
    /// prints {"listen": ADDR}.
    ServeObjects {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// A TCP echo server; prints {"listen": ADDR}.
    ServeEcho {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// A local plain TCP port whose connections are carried over TLS to
    /// the target (how iperf3 reaches a published TLS tunnel); prints
    /// {"listen": ADDR}.
    Bridge {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
    },
    /// New-connection latency: connect, send one HTTP request, read the
    /// reply, close; one connection at a time. Prints percentiles in µs.
    Latency {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Connections made first and not counted.
        #[arg(long, default_value_t = 100)]
        warmup: usize,
        /// Send one byte to an echo service and read it back, instead of
        /// the HTTP exchange.
        #[arg(long)]
        echo: bool,
    },
    /// HTTP requests per second over keep-alive connections.
    HttpLoad {
        #[command(flatten)]
        target: TargetArgs,
        /// The path every request asks for.
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 64)]
        connections: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// COUNT clients on their own connections GET one path at the same
    /// moment and read it whole; prints the time until the last has it.
    FetchMany {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        path: String,
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Count the answers by this header's value (e.g. x-strait-cache).
        #[arg(long)]
        status_header: Option<String>,
    },
    /// Opens COUNT connections to an echo service, proves each with a
    /// round trip, prints {"held": COUNT} and holds them until stdin closes.
    Hold {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Connects COUNT idle strait agents (control channels) to an engine,
    /// prints {"agents": COUNT} and holds them until stdin closes.
    Agents {
        /// Engine address, host:port.
        #[arg(long)]
        engine: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        ca: std::path::PathBuf,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Each agent also opens one private tunnel, as a rathole or bore
        /// control channel always carries one service.
        #[arg(long)]
        tunnel: bool,
    },
    /// The soak's services (HTTP with streaming, slow, upload and cut
    /// paths; echo; an echo that resets; checksummed transfers) on
    /// 127.0.0.1:0; prints their addresses as one JSON line.
    SoakServices {
        /// Flip one bit of every download over 1 MiB of the transfer service
        /// (a fault on purpose: the soak must report the checksum mismatch).
        #[arg(long)]
        corrupt: bool,
    },
    /// The soak's client load, paused, resumed and stopped by lines on
    /// stdin (see bench/soak.py).
    SoakLoad(Box<soak::LoadArgs>),
    /// Reconnecting agents for the scale run, held until stdin closes.
    Scale(scale::ScaleArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::ServeHttp { listen } => serve::http(&listen).await,
            Command::ServeObjects { listen } => serve::objects(&listen).await,
            Command::ServeEcho { listen } => serve::echo(&listen).await,
            Command::Bridge { target, listen } => serve::bridge(target.resolve()?, &listen).await,
            Command::Latency { target, count, warmup, echo } => {
                load::latency(target.resolve()?, count, warmup, echo).await
            }
            Command::HttpLoad { target, path, connections, seconds } => {
                load::http(target.resolve()?, path, connections, Duration::from_secs_f64(seconds)).await
            }
            Command::FetchMany { target, path, count, status_header } => {
                load::fetch_many(target.resolve()?, path, count, status_header).await
            }
            Command::Hold { target, count } => hold::streams(target.resolve()?, count).await,
            Command::Agents { engine, token, ca, count, tunnel } => {
                hold::agents(engine, token, ca, count, tunnel).await
            }
            Command::SoakServices { corrupt } => soak::services::run(corrupt).await,
            Command::SoakLoad(args) => soak::run(*args).await,
            Command::Scale(args) => scale::run(args).await,
        }
    })
}

/// Prints one JSON line and flushes it, so the driver can read it at once.
fn report(value: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Resolves when stdin reaches end of file: the driver's way to say stop.
async fn stdin_closed() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
}

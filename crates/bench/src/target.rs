//! Where the load goes: a TCP address, optionally through TLS with a given
//! server name (a published tunnel is reached at 127.0.0.1 with the SNI of
//! its hostname, since `*.t.localhost` is not in every resolver), or a
//! private tunnel dialed in-process through strait's agent library, the way
//! an SDK client dials.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(clap::Args)]
pub struct TargetArgs {
    /// host:port to connect to (the engine's, with --dial).
    #[arg(long)]
    target: String,
    /// Speak TLS with this server name (SNI).
    #[arg(long, conflicts_with = "dial")]
    tls: Option<String>,
    /// Dial this private tunnel (id or name) through the engine at --target.
    #[arg(long, requires = "token")]
    dial: Option<String>,
    /// Token for --dial.
    #[arg(long, requires = "dial")]
    token: Option<String>,
    /// CA file that signed the server's certificate (with --tls or --dial).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// ALPN protocol to offer (with --tls).
    #[arg(long, requires = "tls")]
    alpn: Option<String>,
    /// Host header for HTTP requests [default: the --tls name, else the target].
    #[arg(long)]
    host: Option<String>,
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Clone)]
pub struct Target {
    pub addr: String,
    pub host: String,
    way: Way,
}

#[derive(Clone)]
enum Way {
    Tcp,
    Tls(ServerName<'static>, TlsConnector),
    Dial(strait_agent::Client, String),
}

impl TargetArgs {
    pub fn resolve(self) -> anyhow::Result<Target> {
        if let Some(tunnel) = self.dial {
            let mut config = strait_agent::ClientConfig::new(self.target.clone(), self.token);
            config.ca_file = self.ca;
            // The dialer stays on TLS whatever the agent's transport, so
            // that a setup varies one side only.
            config.transport = strait_agent::TransportMode::Tls;
            let client = strait_agent::Client::new(config)?;
            let host = self.host.unwrap_or_else(|| tunnel.clone());
            return Ok(Target { addr: self.target, host, way: Way::Dial(client, tunnel) });
        }
        let way = match &self.tls {
            None => Way::Tcp,
            Some(name) => {
                let mut roots = rustls::RootCertStore::empty();
                let ca = self.ca.as_ref().context("--tls needs --ca")?;
                for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
                    roots.add(cert?)?;
                }
                // Default config: TLS 1.3 and 1.2, and the in-memory session
                // cache, so repeated connections resume as a real client's do.
                let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
                if let Some(alpn) = &self.alpn {
                    config.alpn_protocols = vec![alpn.as_bytes().to_vec()];
                }
                Way::Tls(ServerName::try_from(name.clone())?, TlsConnector::from(Arc::new(config)))
            }
        };
        let host = self.host.or(self.tls.clone()).unwrap_or_else(|| self.target.clone());
        Ok(Target { addr: self.target, host, way })
    }
}

impl Target {
    pub async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        if let Way::Dial(client, tunnel) = &self.way {
            return client.dial(tunnel).await.map(|s| Box::new(s) as Box<dyn Io>).map_err(std::io::Error::other);
        }
        let tcp = TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        match &self.way {
            Way::Tls(name, connector) => Ok(Box::new(connector.connect(name.clone(), tcp).await?)),
            _ => Ok(Box::new(tcp)),
        }
    }
}

//! The harness of the `strait` end-to-end tests: a real engine in-process
//! on 127.0.0.1:0 and the real `strait` binary.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use strait_engine::Engine;
use strait_engine::config::Config;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

pub const SECRET: &str = "cli-test-secret-cli-test-secret-0123456";

pub struct TestEngine {
    pub engine: Option<Engine>,
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
}

impl TestEngine {
    pub async fn start() -> Self {
        strait_engine::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        strait_engine::dev::generate_certs("localhost", dir.path()).unwrap();
        let engine = Self::boot(dir.path(), "127.0.0.1:0").await;
        let addr = engine.tls_addr;
        Self { engine: Some(engine), dir, addr }
    }

    pub async fn boot(dir: &Path, listen: &str) -> Engine {
        let yaml = format!(
            "engine: {{host: localhost, log_level: info}}\n\
             tls: {{enabled: true, listen_addr: \"{listen}\"}}\n\
             certs: {{static: {{enabled: true, cert_file: \"{}\", key_file: \"{}\"}}}}\n\
             auth: {{jwt: {{enabled: true, token_jwt_secret: \"{SECRET}\"}}}}\n",
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        );
        Engine::start(Config::from_yaml_str(&yaml, Vec::new()).unwrap().config).await.unwrap()
    }

    /// Stops the engine and starts a new one on the same address.
    pub async fn restart(&mut self) {
        self.engine.take().unwrap().shutdown().await;
        self.engine = Some(Self::boot(self.dir.path(), &self.addr.to_string()).await);
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn token(&self, sub: &str) -> String {
        strait_engine::auth::mint(SECRET.as_bytes(), sub, Some(3600))
    }

    /// `strait` with this engine in its environment (as a user would set it).
    pub fn strait(&self, sub: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_strait"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("RSTREAM_ENGINE", format!("localhost:{}", self.addr.port()))
            .env("RSTREAM_AUTHENTICATION_TOKEN", self.token(sub))
            .env("SSL_CERT_FILE", self.ca())
            .env("STRAIT_LOG", "info")
            .kill_on_drop(true);
        cmd
    }
}

/// A child with its output read line by line.
pub struct Running {
    pub child: Child,
    pub stdout: Lines<BufReader<ChildStdout>>,
    pub stderr: Lines<BufReader<ChildStderr>>,
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        Self { child, stdout, stderr }
    }

    /// The next stdout line (the test fails if the process ends first).
    pub async fn line(&mut self) -> String {
        match self.stdout.next_line().await.unwrap() {
            Some(line) => line,
            None => panic!("process ended; stderr: {}", self.drain_stderr().await),
        }
    }

    /// Waits for a stderr line containing `needle`.
    pub async fn stderr_until(&mut self, needle: &str) -> String {
        while let Some(line) = self.stderr.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("stderr ended without {needle:?}");
    }

    pub async fn drain_stderr(&mut self) -> String {
        let mut out = String::new();
        while let Ok(Some(line)) = self.stderr.next_line().await {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Interrupts the process as Ctrl-C does and waits for a clean exit.
    pub async fn interrupt(mut self) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "exit status {status}");
    }
}

pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

pub async fn echo_through(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tcp.read_exact(&mut back).await.unwrap();
    back
}

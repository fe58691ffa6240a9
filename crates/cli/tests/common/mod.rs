//! The harness of the `strait` end-to-end tests: a real engine in-process
//! on 127.0.0.1:0, the real `strait` binary, real local echo services.
//! Every wait is on an output line or a condition, bounded by a deadline.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

#[allow(unused_imports)] // not every test file uses every helper
pub use strait_testkit::{SECRET, TestEngine, echo_server};

/// How long any one expected line or condition may take.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The `strait` binary pointed at a test engine.
pub trait Strait {
    /// `strait` with `sub`'s token and the engine's CA, in an empty
    /// environment and home.
    fn strait(&self, sub: &str) -> Command;
    /// `strait` with an operator's token, which sees every principal.
    fn strait_admin(&self, sub: &str) -> Command;
}

impl Strait for TestEngine {
    fn strait_admin(&self, sub: &str) -> Command {
        let mut cmd = self.strait(sub);
        cmd.env(
            "RSTREAM_AUTHENTICATION_TOKEN",
            strait_engine::auth::mint_with(SECRET.as_bytes(), sub, Some(3600), true),
        );
        cmd
    }

    fn strait(&self, sub: &str) -> Command {
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

/// Runs a command to its end, within [`DEADLINE`] (the child is killed
/// when it takes longer: `TestEngine::strait` sets `kill_on_drop`).
pub async fn output(cmd: &mut Command) -> Output {
    cmd.kill_on_drop(true);
    tokio::time::timeout(DEADLINE, cmd.output()).await.expect("the command ends in time").unwrap()
}

/// Sends a signal (`"INT"`, `"TERM"`, `"HUP"`) to a process.
pub async fn signal(pid: u32, name: &str) {
    let sent = output(Command::new("kill").arg(format!("-{name}")).arg(pid.to_string())).await;
    assert!(sent.status.success(), "kill -{name} {pid}: {sent:?}");
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
        match tokio::time::timeout(DEADLINE, self.stdout.next_line()).await.expect("a line in time").unwrap() {
            Some(line) => line,
            None => panic!("process ended; stderr: {}", self.drain_stderr().await),
        }
    }

    /// The rest of stderr, up to its end (bounded by [`DEADLINE`]).
    pub async fn drain_stderr(&mut self) -> String {
        let mut out = String::new();
        let read = async {
            while let Ok(Some(line)) = self.stderr.next_line().await {
                out.push_str(&line);
                out.push('\n');
            }
        };
        let _ = tokio::time::timeout(DEADLINE, read).await;
        out
    }

    /// Stdout lines up to and including the next `applied …` summary.
    pub async fn until_applied(&mut self) -> Vec<String> {
        self.stdout_until("applied ").await
    }

    /// Stdout lines up to and including the next one starting with `prefix`.
    pub async fn stdout_until(&mut self, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        let read = async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                let done = line.starts_with(prefix);
                lines.push(line);
                if done {
                    return true;
                }
            }
            false
        };
        let finished =
            tokio::time::timeout(DEADLINE, read).await.unwrap_or_else(|_| panic!("no {prefix:?} line in time"));
        assert!(finished, "strait ended before {prefix:?}; stdout so far: {lines:?}");
        lines
    }

    /// Stderr lines up to and including one containing `needle`.
    pub async fn stderr_until(&mut self, needle: &str) -> Vec<String> {
        let mut lines = Vec::new();
        let read = async {
            while let Some(line) = self.stderr.next_line().await.unwrap() {
                let done = line.contains(needle);
                lines.push(line);
                if done {
                    return true;
                }
            }
            false
        };
        let found = tokio::time::timeout(DEADLINE, read).await.unwrap_or_else(|_| panic!("no {needle:?} in time"));
        assert!(found, "stderr ended without {needle:?}: {lines:?}");
        lines
    }

    /// Interrupts the process as Ctrl-C does and waits for a clean exit.
    pub async fn interrupt(mut self) {
        self.signal("INT").await;
        let status = self.exit_within(DEADLINE).await;
        assert!(status.success(), "exit status {status}");
    }

    pub async fn signal(&self, name: &str) {
        signal(self.child.id().expect("still running"), name).await;
    }

    /// Waits for the process to end; the test fails if it takes longer.
    pub async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!("still running {limit:?} later; stderr so far: {}", self.stderr_now().await),
        }
    }

    /// Stderr lines already written, without waiting for more.
    async fn stderr_now(&mut self) -> String {
        let mut out = String::new();
        while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(100), self.stderr.next_line()).await {
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Waits for the process to end by itself and returns its status and
    /// the rest of its stderr.
    pub async fn finished(&mut self) -> (ExitStatus, String) {
        let stderr = self.drain_stderr().await;
        (self.exit_within(DEADLINE).await, stderr)
    }
}

/// Sends `payload` through a plain TCP address and reads it back.
pub async fn echo_through(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tcp.read_exact(&mut back).await.unwrap();
    back
}

/// `strait dial` as `who` with `input` on stdin; returns stdout.
pub async fn dial(engine: &TestEngine, who: &str, tunnel: &str, input: &[u8]) -> Vec<u8> {
    let mut child = engine
        .strait(who)
        .args(["dial", tunnel])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut out = vec![0u8; input.len()];
    let echo = async {
        stdin.write_all(input).await.unwrap();
        stdout.read_exact(&mut out).await.unwrap();
    };
    tokio::time::timeout(DEADLINE, echo).await.expect("echo in time");
    drop(stdin);
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("dial ends in time").unwrap();
    assert!(status.success(), "dial exited with {status}");
    out
}

"""The compatibility harness: the real strait-engine binary on 127.0.0.1:0,
driven by the official rstream Python SDK.

The engine prints one JSON line with its bound addresses when it is ready
(`--print-ready`); the harness waits for that line, never for a timer.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import selectors
import ssl
import subprocess
import time

import httpcore
import httpx
import jwt
import pytest
import rstream
from rstream.config import TLSOptions

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("STRAIT_BIN_DIR", ROOT / "target" / "debug"))
SECRET = "compat-secret-compat-secret-compat-secret"

# The most a healthy engine takes to print its ready line; only a broken
# build ever reaches it.
READY_DEADLINE = 30.0

# The most a short command (gen-certs, openssl, curl, strait) or a process
# told to stop may take: every wait on a process is bounded.
PROCESS_DEADLINE = 60.0


class _Loopback(httpcore.AsyncNetworkBackend):
    """Resolves every name to 127.0.0.1: `*.t.localhost` has no DNS here."""

    def __init__(self, local_address: str | None) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._local_address = local_address

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return await self._inner.connect_tcp(
            "127.0.0.1", port, timeout=timeout, local_address=self._local_address, socket_options=socket_options
        )

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class Engine:
    """A running strait-engine process."""

    def __init__(
        self,
        tmp: pathlib.Path,
        extra_yaml: str = "",
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        """`prefix`: a command the engine runs under (a network namespace,
        a tracer)."""
        self.tmp = tmp
        subprocess.run(
            [BIN / "strait-engine", "gen-certs", "--host", "localhost", "--out", tmp],
            check=True,
            capture_output=True,
            timeout=PROCESS_DEADLINE,
        )
        self.ca = tmp / "ca.pem"
        config = tmp / "engine.yaml"
        config.write_text(
            "engine: {host: localhost, log_level: debug}\n"
            'tls: {enabled: true, listen_addr: "127.0.0.1:0"}\n'
            f'certs: {{static: {{enabled: true, cert_file: "{tmp / "cert.pem"}", key_file: "{tmp / "key.pem"}"}}}}\n'
            f'auth: {{jwt: {{enabled: true, token_jwt_secret: "{SECRET}"}}}}\n' + extra_yaml
        )
        self.log_path = tmp / "engine.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*(prefix or []), BIN / "strait-engine", "-c", config, "--print-ready"],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")} | (env or {}),
        )
        ready = self._read_ready_line()
        self.addr = ready["tls"]
        self.port = int(self.addr.rsplit(":", 1)[1])
        self.engine = f"localhost:{self.port}"
        # The metrics listener's address, when the configuration has one.
        self.metrics: str | None = ready.get("metrics")
        self.http_addr = ready.get("http")
        # The QUIC port's address (UDP), unless quic.enabled is false.
        self.quic: str | None = ready.get("quic")

    def _read_ready_line(self) -> dict:
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=READY_DEADLINE):
            self.stop()
            raise RuntimeError(f"engine not ready in {READY_DEADLINE}s:\n{self.log()}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=PROCESS_DEADLINE)
            raise RuntimeError(f"engine exited ({self.proc.returncode}):\n{self.log()}")
        return json.loads(line)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def token(self, sub: str = "alice", secret: str = SECRET, **claims) -> str:
        payload = {"sub": sub, "iat": int(time.time()), "exp": int(time.time()) + 3600, **claims}
        return jwt.encode(payload, secret, algorithm="HS256")

    def admin_token(self, sub: str = "ops") -> str:
        """An operator's token: it sees and acts on every principal's objects."""
        return self.token(sub, strait_admin=True)

    def admin(self, sub: str = "ops", **options) -> rstream.Client:
        return self.client(sub, token=self.admin_token(sub), **options)

    def client(self, sub: str = "alice", token: str | None = None, **options) -> rstream.Client:
        return rstream.Client(
            engine=self.engine,
            token=token if token is not None else self.token(sub),
            tls=TLSOptions(ca_file=str(self.ca)),
            read_config_file=False,
            **options,
        )

    def api_url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"
    def url(self, host: str, target: str = "/") -> str:
        """The public URL of a published hostname on this engine."""
        return f"https://{host}:{self.port}{target}"

    def ssl_context(self, cafile: str | None = None) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=cafile or str(self.ca))

    def public_client(self, http2: bool = False, local_address: str | None = None) -> httpx.AsyncClient:
        """An HTTPS client for `*.t.localhost` names: connects to 127.0.0.1
        (optionally from another loopback address) and keeps the name for
        SNI, Host and certificate checks. `http2` offers only h2."""
        transport = httpx.AsyncHTTPTransport(verify=self.ssl_context(), http1=not http2, http2=http2)
        transport._pool._network_backend = _Loopback(local_address)
        return httpx.AsyncClient(transport=transport, timeout=60)

    def memory_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the engine process from /proc (VmRSS, VmHWM)."""
        for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/{self.proc.pid}/status")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=PROCESS_DEADLINE)
        self._log.close()


@pytest.fixture
def engine(tmp_path: pathlib.Path):
    running = Engine(tmp_path)
    yield running
    running.stop()


@pytest.fixture
def make_engine(tmp_path: pathlib.Path):
    started: list[Engine] = []

    def start(extra_yaml: str = "", env: dict[str, str] | None = None, quic: bool = False) -> Engine:
        """`quic`: the test needs the QUIC port, so its ready line must
        have one."""
        folder = tmp_path / f"engine{len(started)}"
        folder.mkdir()
        running = Engine(folder, extra_yaml, env)
        started.append(running)
        if quic:
            assert running.quic, f"the ready line has no quic address:\n{running.log()}"
        return running

    yield start
    for running in started:
        running.stop()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def echo_port():
    """A local echo service, as the agent's private service."""
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()

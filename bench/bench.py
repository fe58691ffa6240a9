#!/usr/bin/env python3
"""strait side by side with rathole, frp, bore and a direct connection.

Every setup carries the same three local services (an iperf3 server, a
small keep-alive HTTP server and a TCP echo server) and is measured by the
same clients (iperf3 and `strait-bench`); the chatty rows add a Redis
server and a PostgreSQL cluster, measured by redis-benchmark and pgbench;
the edge-cache rows an object origin, behind strait's cache and behind
nginx's proxy_cache.
Setups run back to back, alternating, for several rounds; the report gives
medians and spreads.

Run it through `bench/run.sh`, which builds and installs everything first.
Standard library only, so it runs without the test venv (the SDK row needs
the venv's Python, passed as --sdk-python).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRET = "bench-secret-bench-secret-bench-secret-0123"
DEADLINE = 60.0
# The policy rows' tunnel policy (`strait.policy`): what a typical site
# sets, a few deny globs, header rules both ways, and a rate limit no
# load here reaches (every request comes from 127.0.0.1, one bucket).
TYPICAL_POLICY = {
    "deny_paths": ["/internal/*", "/admin/*", "/.git/*", "*.php"],
    "request_headers": {"set": {"x-team": "bench", "x-env": "prod"}, "remove": ["x-debug"]},
    "response_headers": {"set": {"strict-transport-security": "max-age=31536000", "x-frame-options": "DENY"},
                         "remove": ["server"]},
    "rate_limit": {"requests_per_second": 1000000, "burst": 1000000},
}
# The edge-cache rows' policy: the origin's /v/ objects, 1 GiB in all,
# 256 MiB each at most.
CACHE_POLICY = {"cache": {"paths": ["/v/*"], "max_bytes": 1 << 30, "max_object_bytes": 256 << 20}}
# The edge-cache rows' objects (key, bytes, title): served from the cache.
CACHE_HITS = (("10k", 10 << 10, "10 KiB"), ("1m", 1 << 20, "1 MiB"))

# ---------------------------------------------------------------- processes


class Proc:
    """A child process with its output in a log file and its cost readable
    from /proc."""

    def __init__(
        self, name: str, argv: list[str], work: pathlib.Path, cpus: str | None, stdout_to_log: bool = False, **kw
    ) -> None:
        self.name = name
        self.log_path = work / f"{name}.log"
        self.log = open(self.log_path, "wb")
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=self.log if stdout_to_log else subprocess.PIPE,
            stderr=self.log,
            **kw,
        )
        self.pid = self.popen.pid
        self.pending = b""

    def json_line(self, timeout: float = DEADLINE) -> dict:
        """The next stdout line that is a JSON object (other lines skipped)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.readline(end - time.monotonic())
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.name}: no JSON line in {timeout:.0f}s; log: {self.tail()}")

    def line_matching(self, pattern: str, timeout: float = DEADLINE) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            line = self.readline(end - time.monotonic())
            found = re.search(pattern, line)
            if found:
                return found
        raise RuntimeError(f"{self.name}: no line matching {pattern!r}; log: {self.tail()}")

    def readline(self, timeout: float) -> str:
        """One stdout line, or "" after TIMEOUT. Reads the pipe raw: a
        buffered reader would hide lines from select()."""
        import selectors

        end = time.monotonic() + timeout
        while b"\n" not in self.pending:
            with selectors.DefaultSelector() as sel:
                sel.register(self.popen.stdout, selectors.EVENT_READ)
                if not sel.select(max(end - time.monotonic(), 0.0)):
                    return ""
            chunk = os.read(self.popen.stdout.fileno(), 65536)
            if not chunk:
                self.popen.wait()
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log: {self.tail()}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        self.log.write(b"[stdout] " + line + b"\n")
        self.log.flush()
        return line.decode(errors="replace")

    def tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def cpu_seconds(self) -> float:
        """User and system CPU seconds of the process and of its live
        children (nginx's worker)."""
        pids = [str(self.pid)]
        for pid in pids:
            children = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
            pids += children.read_text().split() if children.exists() else []
        ticks = 0
        for pid in pids:
            try:
                fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:  # a child gone since it was listed
                continue
            ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"{self.name}: no VmRSS")

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log.close()


def run_json(argv: list[str], cpus: str | None, timeout: float) -> dict:
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    done = subprocess.run(argv, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode()[-1500:]}{done.stdout.decode()[-500:]}")
    text = done.stdout.decode().strip()
    try:
        return json.loads(text)  # iperf3 -J: one multi-line document
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])


def free_port() -> int:
    """A port for a peer to listen on, chosen below the kernel's ephemeral
    range: a port the kernel hands out (`bind(0)`) can be taken by any
    outgoing connection before the peer binds it."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_port(port: int, timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def wait_port_bound(port: int, timeout: float = DEADLINE) -> None:
    """Waits until something listens on 127.0.0.1:PORT, without connecting
    (a connection would use up a one-off server)."""
    end = time.monotonic() + timeout
    want = f"0100007F:{port:04X}"
    while time.monotonic() < end:
        for line in pathlib.Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def free_port_both() -> int:
    """A port free for TCP and for UDP on 127.0.0.1 (a UDP service whose
    number iperf3's TCP control connection uses too)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_udp_bound(port: int, timeout: float = DEADLINE) -> None:
    """Waits until a UDP socket is bound to PORT (on any address)."""
    end = time.monotonic() + timeout
    want = f":{port:04X}"
    while time.monotonic() < end:
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            for line in pathlib.Path(table).read_text().splitlines()[1:]:
                if line.split()[1].endswith(want):
                    return
        time.sleep(0.02)
    raise RuntimeError(f"nothing bound to UDP port {port}")


class Relay:
    """A TCP relay on 127.0.0.1:PORT to 127.0.0.1:TARGET, in threads:
    iperf3's UDP test opens its control connection over TCP to the same
    port number as its UDP stream, and a tunnel's UDP port has no TCP
    beside it. Only the control messages take it; the measured packets go
    through the tunnel."""

    def __init__(self, port: int, target: int) -> None:
        import threading

        self.listener = socket.create_server(("127.0.0.1", port))
        self.target = target
        self.threading = threading
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, up), (up, conn)):
                self.threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        # A close alone leaves the socket listening under the thread
        # blocked in accept(); shutdown wakes it.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()


def wait_log(proc: Proc, pattern: str, count: int = 1, timeout: float = DEADLINE) -> None:
    """Waits until the process's log holds COUNT lines matching PATTERN."""
    end = time.monotonic() + timeout
    rx = re.compile(pattern)
    while time.monotonic() < end:
        proc.log.flush()
        text = proc.log_path.read_text(errors="replace")
        if len(rx.findall(text)) >= count:
            return
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited; log: {proc.tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: {count} x {pattern!r} not seen; log: {proc.tail()}")


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bin = pathlib.Path(args.bin_dir)
        self.peers = pathlib.Path(args.peer_dir)
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="strait-bench-"))
        ncpu = len(os.sched_getaffinity(0))
        self.pinned = args.pin and ncpu >= 2 and shutil.which("taskset") is not None
        # The tunnel's processes on one core, load and services on the other.
        self.tunnel_cpus = "0" if self.pinned else None
        self.load_cpus = "1" if self.pinned else None
        self.procs: list[Proc] = []
        self.certs = self.work / "certs"
        subprocess.run(
            [self.bin / "strait-engine", "gen-certs", "--host", "localhost", "--out", self.certs],
            check=True,
            capture_output=True,
        )
        self.token = subprocess.run(
            [self.bin / "strait", "token", "--secret", SECRET, "--sub", "bench", "--ttl", "12h"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.services: dict[str, int] = {}

    def spawn(self, name: str, argv: list, cpus: str | None, **kw) -> Proc:
        proc = Proc(name, [str(a) for a in argv], self.work, cpus, **kw)
        self.procs.append(proc)
        return proc

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    def start_services(self, scenarios: list[str]) -> None:
        # iperf3 serves one test at a time and can stay stuck on a client
        # that vanished, so each run gets a fresh one-off server.
        self.services["iperf"] = free_port()
        for kind in ("http", "echo", *(["objects"] if "cache" in scenarios else [])):
            proc = self.spawn(f"{kind}-server", [self.tool("strait-bench"), f"serve-{kind}"], self.load_cpus)
            self.services[kind] = int(proc.json_line()["listen"].rsplit(":", 1)[1])
        # The chatty services, only when their scenarios run and Debian's
        # packages are there (bench/run.sh installs them; the smoke run
        # skips what is missing rather than install anything).
        if "redis" in scenarios:
            if shutil.which("redis-server") and shutil.which("redis-benchmark"):
                self.start_redis()
            else:
                print("redis-server/redis-benchmark missing: the redis scenario is skipped", file=sys.stderr)
        if "pgbench" in scenarios:
            if postgres_bin():
                self.start_postgres()
            else:
                print("postgresql missing: the pgbench scenario is skipped", file=sys.stderr)

    def start_redis(self) -> None:
        port = free_port()
        self.spawn("redis-server", ["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"], self.load_cpus,
                   stdout_to_log=True)
        wait_port(port)
        self.services["redis"] = port

    def start_postgres(self) -> None:
        """An unprivileged throwaway cluster on a free port: initdb into a
        temporary directory, the server in the foreground, no fsync (the
        rows measure round trips, not the disk), pgbench's tables at scale
        1. As root, initdb and postgres run as the `postgres` user (or
        `nobody`), which owns the directory."""
        bindir = postgres_bin()
        data = pathlib.Path(tempfile.mkdtemp(prefix="strait-bench-pg-"))
        self.pg_data = data
        drop: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if subprocess.run(["id", "postgres"], capture_output=True).returncode == 0 else "nobody"
            shutil.chown(data, user, user if user == "postgres" else "nogroup")
            drop = ["setpriv", f"--reuid={user}", f"--regid={user if user == 'postgres' else 'nogroup'}", "--init-groups", "--"]
        env = {**os.environ, "HOME": str(data), "LC_ALL": "C"}
        subprocess.run([*drop, bindir / "initdb", "-D", data / "db", "-U", "bench", "-A", "trust", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, env=env, cwd=data)
        port = free_port()
        self.spawn("postgres", [*drop, bindir / "postgres", "-D", data / "db", "-p", port, "-k", data,
                   "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                   "-c", "full_page_writes=off", "-c", "max_connections=200"], self.load_cpus, stdout_to_log=True,
                   env=env, cwd=data)
        wait_port(port)
        self.pgbench = str(bindir / "pgbench")
        out = subprocess.run([self.pgbench, "-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(port), "-U", "bench", "postgres"],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {out.stderr[-1500:]}")
        self.services["pg"] = port

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if hasattr(self, "pg_data"):
            shutil.rmtree(self.pg_data, ignore_errors=True)

    def chatty(self) -> list[str]:
        """The chatty services that are running."""
        return [k for k in ("redis", "pg") if k in self.services]

    def origin_count(self, path: str) -> int:
        """How many requests for PATH reached the object origin."""
        import urllib.request

        url = f"http://127.0.0.1:{self.services['objects']}/_count{path}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return int(answer.headers["x-count"])


def postgres_bin() -> pathlib.Path | None:
    """Debian's PostgreSQL server programs (initdb, postgres, pgbench), the
    newest installed version."""
    found = sorted(pathlib.Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


# ---------------------------------------------------------------- setups


class Setup:
    """One way from the client to the services. `iperf` is the plain TCP
    port iperf3 connects to; `http` and `echo` are strait-bench target
    arguments (`dial`: the echo service, reached by a new dial each time);
    `tunnel` are the processes whose CPU and memory count (`server` side
    and `agent` side)."""

    name = ""
    label = ""
    scenarios = {"throughput", "parallel", "http", "latency", "streams", "agents"}
    # Setups that carry the chatty services add these.
    chatty = {"redis", "pgbench"}
    # The setup this one is with the agent on TLS instead of QUIC.
    over_tls: str | None = None

    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.server: list[Proc] = []
        self.agent: list[Proc] = []
        self.client: list[Proc] = []
        self.iperf = 0
        self.http: list[str] = []
        self.echo: list[str] = []
        self.dial: list[str] = []
        # Plain TCP ports reaching the chatty services (redis, pg).
        self.ports: dict[str, int] = {}
        # The UDP port reaching the iperf3 server's UDP socket; 0: none.
        self.udp = 0
        # The policy rows: the http service through a tunnel with
        # TYPICAL_POLICY (beside `http`, the same service without one).
        self.http_policy: list[str] = []
        # The edge-cache rows: the object origin through the setup's cache,
        # and the response header that says HIT or MISS.
        self.cache: list[str] = []
        self.cache_header = ""

    def runs(self, scenario: str) -> bool:
        """Whether SCENARIO is this setup's and this run's."""
        return scenario in self.scenarios and scenario in self.b.args.scenarios.split(",")

    def carries_udp(self) -> bool:
        return self.runs("udp")

    def carries_chatty(self) -> list[str]:
        """The chatty services this setup must carry in this run."""
        return self.b.chatty() if self.chatty & self.scenarios & set(self.b.args.scenarios.split(",")) else []

    @classmethod
    def available(cls) -> bool:
        """False (with a message) when what the setup runs is missing."""
        return True

    def start(self) -> None: ...

    def stop(self) -> None:
        for proc in self.server + self.agent + self.client:
            proc.stop()

    def tunnel_procs(self) -> list[Proc]:
        return self.server + self.agent + self.client

    def reach(self, ports: dict[str, int]) -> None:
        """The clients reach each service at its port in PORTS (service
        name: a plain TCP port on 127.0.0.1)."""
        self.ports = {k: ports[k] for k in self.carries_chatty()}
        self.iperf = ports["iperf"]
        self.http = ["--target", f"127.0.0.1:{ports['http']}"]
        self.echo = ["--target", f"127.0.0.1:{ports['echo']}"]

    def agents(self, count: int) -> dict:
        raise NotImplementedError


class Direct(Setup):
    name, label = "direct", "direct (no tunnel)"
    scenarios = {"throughput", "parallel", "http", "latency", "dial", "udp"} | Setup.chatty

    def start(self) -> None:
        s = self.b.services
        self.ports = {k: s[k] for k in self.b.chatty()}
        self.iperf = self.udp = s["iperf"]
        self.http = ["--target", f"127.0.0.1:{s['http']}"]
        self.echo = self.dial = ["--target", f"127.0.0.1:{s['echo']}"]


class StraitEngine(Setup):
    """An engine from a config file, the way an operator runs it. The
    agent connects over `transport`; every dialer (`strait connect`,
    `strait-bench --dial`) over TLS."""

    transport = "tls"
    # More engine configuration, YAML lines.
    engine_extra = ""

    def start_engine(self) -> None:
        b = self.b
        config = b.work / f"{self.name}-engine.yaml"
        config.write_text(
            "engine: {host: localhost, log_level: warn}\n"
            'tls: {enabled: true, listen_addr: "127.0.0.1:0"}\n'
            f'certs: {{static: {{enabled: true, cert_file: "{b.certs / "cert.pem"}", key_file: "{b.certs / "key.pem"}"}}}}\n'
            f'auth: {{jwt: {{enabled: true, token_jwt_secret: "{SECRET}"}}}}\n'
            # Every load comes from 127.0.0.1 and one principal: the
            # per-source and per-principal limits would refuse the 1,000
            # idle agents and held streams by design.
            "limits: {handshakes_per_source: 100000, handshake_rate_per_source: 100000, "
            "handshake_burst_per_source: 100000, control_channels_per_principal: 100000, "
            "tunnels_per_principal: 100000}\n" + self.engine_extra
        )
        engine = b.spawn(f"{self.name}-engine", [b.tool("strait-engine"), "--config", config, "--print-ready", "run"], b.tunnel_cpus)
        self.port = int(engine.json_line()["tls"].rsplit(":", 1)[1])
        self.server = [engine]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")}
        env.update(
            RSTREAM_ENGINE=f"localhost:{self.port}",
            RSTREAM_AUTHENTICATION_TOKEN=self.b.token,
            SSL_CERT_FILE=str(self.b.certs / "ca.pem"),
            HOME=str(self.b.work),
            STRAIT_LOG="warn",
        )
        return env

    def apply(self, tunnels: str) -> Proc:
        b = self.b
        path = b.work / f"{self.name}-tunnels.yaml"
        path.write_text("version: 1\ntunnels:\n" + tunnels)
        count = tunnels.count("\n")
        agent = b.spawn(
            f"{self.name}-agent",
            [b.tool("strait"), "--tunnel-transport", self.transport, "run", "--apply", path],
            b.tunnel_cpus,
            env=self.env(),
        )
        agent.line_matching(rf"^applied .*: {count} created")
        return agent

    def connect(self, tunnel: str) -> int:
        b = self.b
        # The dialer's side: it does the client's TLS, as the load
        # generator does on the published path, so it runs with the load.
        proc = b.spawn(
            f"{self.name}-connect-{tunnel}",
            [b.tool("strait"), "connect", tunnel, "--zero-rtt", "--transport", "tls"],
            b.load_cpus,
            env=self.env(),
        )
        self.client.append(proc)
        return int(proc.line_matching(r"Listening on 127\.0\.0\.1:(\d+)").group(1))

    def agents(self, count: int) -> dict:
        """A fresh engine, so memory freed by earlier scenarios does not
        hide what the agents cost."""
        b = self.b
        fresh = StraitEngine(b)
        fresh.name = f"{self.name}-agents"
        fresh.start_engine()
        engine = fresh.server[0]
        proc = None
        try:
            before = engine.rss_kib()
            proc = b.spawn(
                f"{self.name}-agents",
                [b.tool("strait-bench"), "agents", "--engine", f"localhost:{fresh.port}", "--token", b.token,
                 "--ca", b.certs / "ca.pem", "--count", count, "--tunnel"],
                b.tunnel_cpus,
            )
            proc.json_line(timeout=300)
            return {"server_kib": engine.rss_kib() - before, "agent_kib": proc.rss_kib()}
        finally:
            if proc:
                proc.stop()
            engine.stop()


class StraitPublished(StraitEngine):
    name, label = "strait-tls", "strait, published TLS tunnel (strait agent over TLS)"
    scenarios = StraitEngine.scenarios | {"policy", "cache"}

    def start(self) -> None:
        self.start_engine()
        self.agent = [self.start_agent(self.b.services)]
        ca = str(self.b.certs / "ca.pem")
        tls = lambda host: ["--target", f"127.0.0.1:{self.port}", "--tls", f"{host}.t.localhost", "--ca", ca]
        self.http = [*tls("b-http"), "--alpn", "http/1.1"]
        if self.runs("policy"):
            self.http_policy = [*tls("b-policy"), "--alpn", "http/1.1"]
        if self.runs("cache"):
            self.cache = [*tls("b-cache"), "--alpn", "http/1.1"]
            self.cache_header = "x-strait-cache"
        self.echo = tls("b-echo")
        # iperf3 speaks plain TCP: a client-side bridge does the TLS a real
        # client would do itself. It runs with the load, not the tunnel.
        bridge = self.b.spawn(f"{self.name}-bridge", [self.b.tool("strait-bench"), "bridge", *tls("b-iperf")], self.b.load_cpus)
        self.iperf = int(bridge.json_line()["listen"].rsplit(":", 1)[1])
        self.bridge = bridge

    def start_agent(self, s: dict[str, int]) -> Proc:
        # The policy rows' tunnel: the same service as `http`, with a
        # typical policy; the cache rows': the object origin, cached.
        # Policies as JSON, which is YAML.
        http = lambda name, port, host, policy=None: (
            f'  - {{name: {name}, forward: "127.0.0.1:{port}", tunnel: {{publish: true, protocol: http, host: {host}'
            + (f", policy: {json.dumps(policy)}" if policy else "") + "}}\n"
        )
        return self.apply(
            f'  - {{name: iperf, forward: "127.0.0.1:{s["iperf"]}", tunnel: {{publish: true, protocol: tls, host: b-iperf}}}}\n'
            + http("http", s["http"], "b-http")
            + f'  - {{name: echo, forward: "127.0.0.1:{s["echo"]}", tunnel: {{publish: true, protocol: tls, host: b-echo}}}}\n'
            + (http("http-policy", s["http"], "b-policy", TYPICAL_POLICY) if self.runs("policy") else "")
            + (http("objects", s["objects"], "b-cache", CACHE_POLICY) if self.runs("cache") else "")
        )

    def stop(self) -> None:
        super().stop()
        if hasattr(self, "bridge"):
            self.bridge.stop()


class StraitPublishedQuic(StraitPublished):
    name, label = "strait-quic", "strait, published TLS tunnel (strait agent over QUIC)"
    transport, over_tls = "quic", "strait-tls"
    # Idle agents: one strait-bench client's agents would share one QUIC
    # connection. The policy and cache rows are the engine's, whatever the
    # agent's transport: strait-tls has them.
    scenarios = StraitPublished.scenarios - {"agents", "policy", "cache"}


class StraitPrivate(StraitEngine):
    name, label = "strait-private", "strait, private dial (strait agent over TLS)"
    scenarios = Setup.scenarios | {"dial"} | Setup.chatty

    def start(self) -> None:
        self.start_engine()
        s = self.b.services
        self.agent = [self.start_agent(s)]
        # iperf3 and the held streams reach the tunnel through `strait
        # connect`; the HTTP and latency loads dial in-process through
        # strait's agent library, as an SDK client does (the load generator
        # then does the client's TLS, as on the published path).
        self.iperf = self.connect("iperf")
        dial = lambda tunnel: ["--target", f"localhost:{self.port}", "--dial", tunnel, "--token", self.b.token,
                               "--ca", str(self.b.certs / "ca.pem")]
        self.http = dial("http")
        self.dial = dial("echo")
        self.echo = ["--target", f"127.0.0.1:{self.connect('echo')}"]
        for k in self.carries_chatty():
            self.ports[k] = self.forward_private(k, s[k])

    def forward_private(self, name: str, port: int) -> int:
        """The chatty services the way a new user reaches a database:
        `strait forward PORT --private --name NAME` beside the service,
        `strait connect NAME --listen 127.0.0.1:0` beside the client,
        both on this setup's transport; returns the local port."""
        b = self.b
        tunnel = f"bench-{name}"
        forward = b.spawn(
            f"{self.name}-forward-{name}",
            [b.tool("strait"), "--tunnel-transport", self.transport, "forward", f"127.0.0.1:{port}", "--private",
             "--name", tunnel],
            b.tunnel_cpus,
            env=self.env(),
        )
        forward.line_matching(r"^Forwarding ")
        self.agent.append(forward)
        proc = b.spawn(
            f"{self.name}-connect-{tunnel}",
            [b.tool("strait"), "connect", tunnel, "--listen", "127.0.0.1:0", "--transport", self.transport],
            b.load_cpus,
            env=self.env(),
        )
        self.client.append(proc)
        return int(proc.line_matching(r"Listening on 127\.0\.0\.1:(\d+)").group(1))

    def start_agent(self, s: dict[str, int]) -> Proc:
        return self.apply(
            "".join(f'  - {{name: {k}, forward: "127.0.0.1:{s[k]}", tunnel: {{publish: false}}}}\n' for k in ("iperf", "http", "echo"))
        )


class StraitPrivateQuic(StraitPrivate):
    name, label = "strait-private-quic", "strait, private dial (strait agent over QUIC)"
    transport, over_tls = "quic", "strait-private"
    scenarios = StraitPrivate.scenarios - {"agents"}


class StraitPublishedTcp(StraitEngine):
    """Published TCP and UDP ports (issue 14): `strait forward PORT
    --protocol tcp|udp` per service, each its own agent, as a user runs
    them; the clients reach the engine's public ports in plain TCP and UDP,
    like rathole's, frp's and bore's visitors."""

    name, label = "strait-tcp", "strait, published TCP/UDP port (strait agent over TLS)"
    scenarios = {"throughput", "parallel", "http", "latency", "streams", "udp"} | Setup.chatty
    engine_extra = (
        'tcp: {enabled: true, port_range: "20000-29999"}\n'
        'udp: {enabled: true, port_range: "30000-39999", session_idle_seconds: 60}\n'
    )

    def start(self) -> None:
        self.start_engine()
        s = self.b.services
        self.reach({k: self.forward_published(k, s[k], "tcp") for k in ("iperf", "http", "echo", *self.carries_chatty())})
        if self.carries_udp():
            self.udp = self.forward_published("iperf-udp", s["iperf"], "udp")

    def forward_published(self, name: str, port: int, protocol: str) -> int:
        b = self.b
        forward = b.spawn(
            f"{self.name}-forward-{name}",
            [b.tool("strait"), "--tunnel-transport", self.transport, "forward", f"127.0.0.1:{port}", "--protocol", protocol,
             "--name", f"bench-{name}"],
            b.tunnel_cpus,
            env=self.env(),
            # A line per connection or session goes to stdout: to the log,
            # so that no pipe fills up and stalls the agent.
            stdout_to_log=True,
        )
        self.agent.append(forward)
        pattern = rf"Forwarding {protocol}://[^ ]*:(\d+) "
        wait_log(forward, pattern)
        public = int(re.search(pattern, forward.log_path.read_text(errors="replace")).group(1))
        (wait_udp_bound if protocol == "udp" else wait_port_bound)(public)
        return public


class StraitPublishedTcpQuic(StraitPublishedTcp):
    name, label = "strait-tcp-quic", "strait, published TCP/UDP port (strait agent over QUIC)"
    transport, over_tls = "quic", "strait-tcp"


def sdk_agent(setup: StraitEngine, s: dict[str, int], publish: bool) -> Proc:
    """The rstream Python SDK as the agent (bench/sdk_agent.py)."""
    b = setup.b
    proc = b.spawn(
        f"{setup.name}-agent",
        [b.args.sdk_python, ROOT / "bench" / "sdk_agent.py", "--engine", f"localhost:{setup.port}",
         "--token", b.token, "--ca", b.certs / "ca.pem", *(["--publish"] if publish else []),
         *(f"{k}={s[k]}" for k in ("iperf", "http", "echo"))],
        b.tunnel_cpus,
    )
    proc.json_line()
    return proc


class StraitSdk(StraitPrivate):
    name, label = "strait-sdk", "strait, private dial (rstream Python SDK agent)"
    scenarios = {"throughput", "http", "latency"}

    def start_agent(self, s: dict[str, int]) -> Proc:
        return sdk_agent(self, s, publish=False)


class StraitSdkPublished(StraitPublished):
    name, label = "strait-sdk-tls", "strait, published TLS tunnel (rstream Python SDK agent)"
    scenarios = {"throughput", "http", "latency"}

    def start_agent(self, s: dict[str, int]) -> Proc:
        return sdk_agent(self, s, publish=True)


class ServerAndClient(Setup):
    """A peer of one server and one client process, each from a config
    file (rathole, frp). A subclass writes the files (`configs`), spawns
    either side (`spawn`, with `sides`: what makes it the server or the
    client) and names the client's log line, once per service, that says
    the service is up (`ready`)."""

    tls = False
    scenarios = Setup.scenarios | Setup.chatty | {"udp"}
    sides = ("", "")
    ready = ""

    def configs(
        self, tag: str, services: dict[str, tuple[int, int]], udp: tuple[str, ...] = ()
    ) -> tuple[int, pathlib.Path, pathlib.Path]:
        """The control port, and the server's and client's files."""
        raise NotImplementedError

    def spawn(self, name: str, side: str, config: pathlib.Path) -> Proc:
        raise NotImplementedError

    def start(self) -> None:
        s = self.b.services
        ports = {k: free_port() for k in ("iperf", "http", "echo", *self.carries_chatty())}
        services = {k: (p, s[k]) for k, p in ports.items()}
        if self.carries_udp():
            self.udp = free_port_both()
            services["iperfudp"] = (self.udp, s["iperf"])
        control, server, client = self.configs("tunnels", services, udp=("iperfudp",))
        self.server = [self.spawn(f"{self.name}-server", self.sides[0], server)]
        wait_port(control)
        self.agent = [self.spawn(f"{self.name}-client", self.sides[1], client)]
        wait_log(self.agent[0], self.ready, count=len(services))
        # Seen listening, not connected to: a test connection is carried
        # on to the service later, through a data channel, and could land
        # on the next one-off iperf3 server and use it up.
        for p in ports.values():
            wait_port_bound(p)
        if self.udp:
            wait_udp_bound(self.udp)
        self.reach(ports)


class Rathole(ServerAndClient):
    sides, ready = ("--server", "--client"), "Control channel established"

    def configs(
        self, tag: str, services: dict[str, tuple[int, int]], udp: tuple[str, ...] = ()
    ) -> tuple[int, pathlib.Path, pathlib.Path]:
        """Server and client files for SERVICES (name: public port, local
        port; those named in UDP are UDP services); returns the control
        port and both paths."""
        b = self.b
        control = free_port()
        kind = lambda k: 'type = "udp"\n' if k in udp else ""
        server_transport = client_transport = ""
        if self.tls:
            p12 = b.work / "rathole.p12"
            if not p12.exists():
                subprocess.run(
                    ["openssl", "pkcs12", "-export", "-out", p12, "-inkey", b.certs / "key.pem",
                     "-in", b.certs / "cert.pem", "-passout", "pass:bench"],
                    check=True,
                    capture_output=True,
                )
            server_transport = f'[server.transport]\ntype = "tls"\n[server.transport.tls]\npkcs12 = "{p12}"\npkcs12_password = "bench"\n'
            client_transport = (
                f'[client.transport]\ntype = "tls"\n[client.transport.tls]\ntrusted_root = "{b.certs / "ca.pem"}"\nhostname = "localhost"\n'
            )
        server = b.work / f"{self.name}-{tag}-server.toml"
        server.write_text(
            f'[server]\nbind_addr = "127.0.0.1:{control}"\n{server_transport}'
            + "".join(f'[server.services.{k}]\n{kind(k)}token = "bench"\nbind_addr = "127.0.0.1:{p}"\n' for k, (p, _) in services.items())
        )
        client = b.work / f"{self.name}-{tag}-client.toml"
        client.write_text(
            f'[client]\nremote_addr = "localhost:{control}"\n{client_transport}'
            + "".join(f'[client.services.{k}]\n{kind(k)}token = "bench"\nlocal_addr = "127.0.0.1:{l}"\n' for k, (_, l) in services.items())
        )
        return control, server, client

    def spawn(self, name: str, side: str, config: pathlib.Path) -> Proc:
        env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
        return self.b.spawn(name, [self.b.peers / "rathole", side, config], self.b.tunnel_cpus, env=env, stdout_to_log=True)

    def agents(self, count: int) -> dict:
        """rathole keeps one control channel per service: one client with
        COUNT services is COUNT idle control channels."""
        # Service ports are bound only once their control channel is up.
        echo = self.b.services["echo"]
        control, server, client = self.configs("agents", {f"s{i}": (free_port(), echo) for i in range(count)})
        srv = self.spawn(f"{self.name}-agents-server", self.sides[0], server)
        cli = None
        try:
            wait_port(control)
            before = srv.rss_kib()
            cli = self.spawn(f"{self.name}-agents-client", self.sides[1], client)
            wait_log(cli, self.ready, count=count, timeout=300)
            return {"server_kib": srv.rss_kib() - before, "agent_kib": cli.rss_kib()}
        finally:
            if cli:
                cli.stop()
            srv.stop()


class RatholeTls(Rathole):
    name, label, tls = "rathole-tls", "rathole, TLS transport", True


class RatholeTcp(Rathole):
    name, label, tls = "rathole-tcp", "rathole, plain TCP transport", False


class Bore(Setup):
    name, label = "bore", "bore (plain TCP)"
    scenarios = Setup.scenarios | Setup.chatty

    def start(self) -> None:
        b = self.b
        bore = str(b.peers / "bore")
        env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}
        peer = {"env": env, "stdout_to_log": True}
        # bore's control port is fixed at 7835.
        self.server = [b.spawn(f"{self.name}-server", [bore, "server", "--bind-addr", "127.0.0.1"], b.tunnel_cpus, **peer)]
        wait_port(7835)
        ports = {}
        for k in ("iperf", "http", "echo", *self.carries_chatty()):
            ports[k] = free_port()
            self.agent.append(
                b.spawn(f"{self.name}-local-{k}", [bore, "local", b.services[k], "--local-host", "127.0.0.1",
                        "--to", "127.0.0.1", "--port", ports[k]], b.tunnel_cpus, **peer)
            )
            wait_log(self.agent[-1], "listening at")
        self.reach(ports)

    def agents(self, count: int) -> dict:
        """A bore tunnel is one client process with one control connection."""
        b = self.b
        bore = str(b.peers / "bore")
        server = self.server[0]
        before = server.rss_kib()
        clients = []
        try:
            for i in range(count):
                clients.append(
                    b.spawn(f"{self.name}-agents-{i}", [bore, "local", b.services["echo"], "--local-host", "127.0.0.1",
                            "--to", "127.0.0.1"], b.tunnel_cpus, env={**os.environ, "RUST_LOG": "info", "NO_COLOR": "1"}, stdout_to_log=True)
                )
            for c in clients:
                wait_log(c, "listening at")
            return {"server_kib": server.rss_kib() - before, "agent_kib": sum(c.rss_kib() for c in clients)}
        finally:
            for c in clients:
                c.stop()
                b.procs.remove(c)


class Frp(ServerAndClient):
    """frp (frps and frpc, TCP proxies) with its defaults: work connections
    multiplexed over one connection to the server (tcpMux), and, for
    frp-tls, that connection in TLS with the engine's certificate checked
    against the bench CA. The visitor side (frps's remote port) is plain
    TCP, as with rathole."""

    sides, ready = ("frps", "frpc"), "start proxy success"
    # One frpc process per idle agent, as bore; a Go process costs
    # megabytes, so fewer of them are started (the rows are per agent).
    max_agents = 100

    def configs(
        self, tag: str, services: dict[str, tuple[int, int]], udp: tuple[str, ...] = ()
    ) -> tuple[int, pathlib.Path, pathlib.Path]:
        """frps.toml and frpc.toml for SERVICES (name: public port, local
        port; those named in UDP are UDP proxies); returns the control port
        and both paths."""
        b = self.b
        control = free_port()
        common = 'auth.token = "bench"\nlog.to = "console"\nlog.level = "info"\nlog.disablePrintColor = true\n'
        server = b.work / f"{self.name}-{tag}-frps.toml"
        client = b.work / f"{self.name}-{tag}-frpc.toml"
        tls_server = (
            f'transport.tls.force = true\ntransport.tls.certFile = "{b.certs / "cert.pem"}"\n'
            f'transport.tls.keyFile = "{b.certs / "key.pem"}"\n'
            if self.tls
            else ""
        )
        tls_client = (
            f'transport.tls.enable = true\ntransport.tls.trustedCaFile = "{b.certs / "ca.pem"}"\n'
            'transport.tls.serverName = "localhost"\n'
            if self.tls
            else "transport.tls.enable = false\n"
        )
        server.write_text(f'bindAddr = "127.0.0.1"\nbindPort = {control}\nproxyBindAddr = "127.0.0.1"\n{common}{tls_server}')
        client.write_text(
            f'serverAddr = "127.0.0.1"\nserverPort = {control}\nloginFailExit = false\n{common}{tls_client}'
            + "".join(
                f'[[proxies]]\nname = "{k}"\ntype = "{"udp" if k in udp else "tcp"}"\nlocalIP = "127.0.0.1"\nlocalPort = {l}\nremotePort = {p}\n'
                for k, (p, l) in services.items()
            )
        )
        return control, server, client

    def spawn(self, name: str, side: str, config: pathlib.Path) -> Proc:
        return self.b.spawn(name, [self.b.peers / side, "-c", config], self.b.tunnel_cpus, stdout_to_log=True)

    def agents(self, count: int) -> dict:
        """A fresh frps; each agent is an frpc with one TCP proxy (its one
        connection to the server)."""
        count = min(count, self.max_agents)
        echo = self.b.services["echo"]
        control, server, _ = self.configs("agents", {})
        srv = self.spawn(f"{self.name}-agents-server", self.sides[0], server)
        clients = []
        try:
            wait_port(control)
            before = srv.rss_kib()
            for i in range(count):
                _, _, client = self.configs(f"agent-{i}", {f"s{i}": (free_port(), echo)})
                # The same server for every client.
                text = client.read_text()
                client.write_text(re.sub(r"serverPort = \d+", f"serverPort = {control}", text))
                clients.append(self.spawn(f"{self.name}-agents-{i}", self.sides[1], client))
            for c in clients:
                wait_log(c, self.ready, timeout=120)
            return {"server_kib": (srv.rss_kib() - before) * self.b.args.agents / count,
                    "agent_kib": sum(c.rss_kib() for c in clients) * self.b.args.agents / count}
        finally:
            for c in clients:
                c.stop()
                self.b.procs.remove(c)
            srv.stop()
            self.b.procs.remove(srv)


class FrpTls(Frp):
    name, label, tls = "frp-tls", "frp, TLS transport", True


class FrpTcp(Frp):
    name, label, tls = "frp-tcp", "frp, plain TCP transport", False


def nginx_bin() -> str | None:
    """Debian's nginx (in /usr/sbin, which a user's PATH may lack)."""
    return shutil.which("nginx", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin")


class NginxCache(Setup):
    """The edge-cache rows' reference: nginx's proxy_cache in front of the
    same object origin, one worker on the tunnel's core, TLS on 127.0.0.1
    with the engine's certificate (the client sends the same kind of SNI
    name). Misses for one key wait on proxy_cache_lock (its timeout raised
    past the largest object's fetch, so that waiting clients are served
    from the cache rather than sent upstream after the default 5 s)."""

    name, label = "nginx-cache", "nginx proxy_cache (TLS, same origin)"
    scenarios = {"cache"}

    @classmethod
    def available(cls) -> bool:
        if nginx_bin():
            return True
        print("nginx missing: the nginx-cache rows are skipped", file=sys.stderr)
        return False

    def start(self) -> None:
        b = self.b
        top = b.work / self.name
        shutil.rmtree(top, ignore_errors=True)
        top.mkdir()
        port = free_port()
        temps = "".join(f"{k}_temp_path {top / k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (top / "nginx.conf").write_text(
            "daemon off;\nworker_processes 1;\n"
            # As root the workers would run as nobody, who cannot enter
            # the bench's private work directory.
            + ("user root;\n" if os.geteuid() == 0 else "")
            + f"pid {top / 'nginx.pid'};\nerror_log {top / 'error.log'} warn;\n"
            "events { worker_connections 4096; }\n"
            f"http {{\naccess_log off;\n{temps}"
            f"proxy_cache_path {top / 'cache'} levels=1:2 keys_zone=bench:10m max_size=1g inactive=1h use_temp_path=off;\n"
            f"upstream origin {{ server 127.0.0.1:{b.services['objects']}; keepalive 16; }}\n"
            f"server {{\nlisten 127.0.0.1:{port} ssl;\n"
            f"ssl_certificate {b.certs / 'cert.pem'};\nssl_certificate_key {b.certs / 'key.pem'};\n"
            "ssl_session_cache shared:ssl:10m;\nkeepalive_requests 1000000;\n"
            "location / {\nproxy_pass http://origin;\nproxy_http_version 1.1;\nproxy_set_header Connection \"\";\n"
            "proxy_cache bench;\nproxy_cache_valid 200 1h;\nproxy_cache_lock on;\n"
            "proxy_cache_lock_timeout 300s;\nproxy_cache_lock_age 300s;\n"
            "add_header x-cache-status $upstream_cache_status;\n}\n}\n}\n"
        )
        self.server = [b.spawn(self.name, [nginx_bin(), "-p", top, "-c", top / "nginx.conf"], b.tunnel_cpus,
                               stdout_to_log=True)]
        wait_port(port)
        self.cache = ["--target", f"127.0.0.1:{port}", "--tls", "b-cache.t.localhost", "--ca", str(b.certs / "ca.pem"),
                      "--alpn", "http/1.1"]
        self.cache_header = "x-cache-status"


SETUPS = {
    s.name: s
    for s in (Direct, StraitPublished, StraitPublishedQuic, StraitPrivate, StraitPrivateQuic, StraitPublishedTcp,
              StraitPublishedTcpQuic, StraitSdkPublished, StraitSdk, RatholeTls, RatholeTcp, FrpTls, FrpTcp, Bore,
              NginxCache)
}

# ---------------------------------------------------------------- scenarios


def iperf(bench: Bench, setup: Setup, seconds: float, streams: int, reverse: bool) -> dict:
    port = bench.services["iperf"]
    server = bench.spawn("iperf3-server", ["iperf3", "-s", "-1", "-p", port, "-B", "127.0.0.1"], bench.load_cpus)
    try:
        wait_port_bound(port)
        cost_before = sum(p.cpu_seconds() for p in setup.tunnel_procs())
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(setup.iperf), "-t", str(seconds), "-J", "-P", str(streams),
                "--connect-timeout", "10000"]
        if reverse:
            argv.append("-R")
        out = run_json(argv, bench.load_cpus, timeout=seconds + 30)
    finally:
        server.stop()
        bench.procs.remove(server)
    if "error" in out:
        raise RuntimeError(f"iperf3: {out['error']}")
    cost = sum(p.cpu_seconds() for p in setup.tunnel_procs()) - cost_before
    received = out["end"]["sum_received"]
    gbytes = received["bytes"] / 1e9
    return {"gbit_s": received["bits_per_second"] / 1e9, "cpu_s_per_gb": cost / gbytes if setup.tunnel_procs() else None}


def scenario_throughput(bench: Bench, setup: Setup, results: dict) -> None:
    a = bench.args
    for direction, reverse in (("up", False), ("down", True)):
        r = iperf(bench, setup, a.seconds, 1, reverse)
        results.setdefault(f"1-throughput-{direction}", []).append(r["gbit_s"])
        if r["cpu_s_per_gb"] is not None:
            results.setdefault(f"6-cpu-{direction}", []).append(r["cpu_s_per_gb"])


def scenario_parallel(bench: Bench, setup: Setup, results: dict) -> None:
    a = bench.args
    for direction, reverse in (("up", False), ("down", True)):
        r = iperf(bench, setup, a.seconds, 10, reverse)
        results.setdefault(f"2-parallel-{direction}", []).append(r["gbit_s"])


def http_load(bench: Bench, setup: Setup, target: list[str], path: str = "/") -> tuple[float, float | None]:
    """strait-bench http-load on 64 keep-alive connections to TARGET:
    requests/s, and the tunnel's CPU µs per request (None without tunnel
    processes): steadier than requests/s on a shared machine, what each
    request costs the tunnel whatever else the host is doing."""
    a = bench.args
    cost_before = sum(p.cpu_seconds() for p in setup.tunnel_procs())
    out = run_json(
        [bench.tool("strait-bench"), "http-load", *target, "--path", path, "--connections", "64",
         "--seconds", str(a.seconds)],
        bench.load_cpus,
        timeout=a.seconds + 60,
    )
    if out["errors"]:
        raise RuntimeError(f"http-load {path} through {setup.name}: {out['errors']} errors, first: {out['first_error']}")
    cost = sum(p.cpu_seconds() for p in setup.tunnel_procs()) - cost_before
    return out["per_second"], cost / out["requests"] * 1e6 if setup.tunnel_procs() else None


def scenario_http(bench: Bench, setup: Setup, results: dict) -> None:
    rps, cpu_us = http_load(bench, setup, setup.http)
    results.setdefault("3-http-rps", []).append(rps)
    if cpu_us is not None:
        results.setdefault("3-http-cpu-us", []).append(cpu_us)


def scenario_policy(bench: Bench, setup: Setup, results: dict) -> None:
    """The same service through two tunnels of one engine, without a
    policy and with TYPICAL_POLICY, back to back (the order alternating
    over rounds); the ratio is per round. First proves the policy is on:
    a denied path is 404 and the set response header is there."""
    if not setup.http_policy:
        return
    check_policy(bench, setup.http_policy)
    runs = {"off": setup.http, "on": setup.http_policy}
    order = ["off", "on"] if len(results.get("10-policy-ratio", [])) % 2 == 0 else ["on", "off"]
    rps = {}
    for which in order:
        rps[which], cpu_us = http_load(bench, setup, runs[which])
        results.setdefault(f"10-policy-{which}-rps", []).append(rps[which])
        results.setdefault(f"10-policy-{which}-cpu-us", []).append(cpu_us)
    results.setdefault("10-policy-ratio", []).append(rps["on"] / rps["off"])
    cpu = results["10-policy-on-cpu-us"][-1] / results["10-policy-off-cpu-us"][-1]
    results.setdefault("10-policy-cpu-ratio", []).append(cpu)


def check_policy(bench: Bench, target: list[str]) -> None:
    """GET /internal/x must be refused (404) and GET / carry the policy's
    x-frame-options; TARGET is strait-bench's --target/--tls/--ca."""
    import http.client
    import ssl

    opt = dict(zip(target[::2], target[1::2]))
    host, port = opt["--target"].rsplit(":", 1)
    context = ssl.create_default_context(cafile=opt["--ca"])
    for path, status, header in (("/internal/x", 404, None), ("/", 200, "x-frame-options")):
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        # SNI and certificate check on the tunnel's name, not 127.0.0.1.
        conn.sock = context.wrap_socket(socket.create_connection((host, int(port)), timeout=10),
                                        server_hostname=opt["--tls"])
        conn.request("GET", path, headers={"Host": opt["--tls"]})
        answer = conn.getresponse()
        answer.read()
        conn.close()
        if answer.status != status or (header and answer.getheader(header) is None):
            raise RuntimeError(f"policy not in force: GET {path} gave {answer.status}, {header}: {answer.getheader(header or '')}")


def scenario_cache(bench: Bench, setup: Setup, results: dict) -> None:
    """Through the setup's cache, objects under fresh paths (every run
    starts cold): each CACHE_HITS object fetched once, then requests/s on
    64 keep-alive connections, the origin seeing only the first request;
    then --cache-clients cold GETs of a --cache-object-mib object at the
    same moment: the time until every client has the whole body, and how
    many requests reached the origin (strait's must be exactly 1)."""
    if not setup.cache:
        return
    a = bench.args
    tag = f"{setup.name}-{random.getrandbits(40):x}"
    fetch = lambda path, count: run_json(
        [bench.tool("strait-bench"), "fetch-many", *setup.cache, "--path", path, "--count", str(count),
         "--status-header", setup.cache_header],
        bench.load_cpus,
        timeout=600,
    )
    for label, size, _ in CACHE_HITS:
        path = f"/v/{tag}/{size}"
        fetch(path, 1)
        rps, cpu_us = http_load(bench, setup, setup.cache, path)
        upstream = bench.origin_count(path)
        if upstream != 1:
            raise RuntimeError(f"{setup.name}: {upstream} requests for {path} reached the origin, not 1 (no cache hits)")
        results.setdefault(f"11-cache-hit-{label}-rps", []).append(rps)
        results.setdefault(f"11-cache-hit-{label}-cpu-us", []).append(cpu_us)
    path = f"/v/{tag}-cold/{a.cache_object_mib << 20}"
    out = fetch(path, a.cache_clients)
    upstream = bench.origin_count(path)
    print(f"  {setup.name}: {a.cache_clients} cold GETs of {a.cache_object_mib} MiB: {out['seconds']:.2f} s, "
          f"{upstream} upstream, {setup.cache_header}: {out['statuses']}", file=sys.stderr, flush=True)
    if setup.name.startswith("strait") and upstream != 1:
        raise RuntimeError(f"{setup.name}: {a.cache_clients} cold GETs made {upstream} upstream requests, not 1")
    results.setdefault("11-cache-cold-seconds", []).append(out["seconds"])
    results.setdefault("11-cache-cold-upstream", []).append(upstream)


def scenario_latency(bench: Bench, setup: Setup, results: dict) -> None:
    a = bench.args
    out = run_json(
        [bench.tool("strait-bench"), "latency", *setup.http, "--count", str(a.connections), "--warmup", str(a.connections // 20)],
        bench.load_cpus,
        timeout=600,
    )
    if out["errors"]:
        raise RuntimeError(f"latency through {setup.name}: {out['errors']} errors, first: {out['first_error']}")
    results.setdefault("4-connect-p50-us", []).append(out["p50_us"])
    results.setdefault("4-connect-p99-us", []).append(out["p99_us"])


def scenario_dial(bench: Bench, setup: Setup, results: dict) -> None:
    a = bench.args
    out = run_json(
        [bench.tool("strait-bench"), "latency", "--echo", *setup.dial, "--count", str(a.connections),
         "--warmup", str(a.connections // 20)],
        bench.load_cpus,
        timeout=600,
    )
    if out["errors"]:
        raise RuntimeError(f"dial latency through {setup.name}: {out['errors']} errors, first: {out['first_error']}")
    results.setdefault("4-dial-p50-us", []).append(out["p50_us"])
    results.setdefault("4-dial-p99-us", []).append(out["p99_us"])


def scenario_streams(bench: Bench, setup: Setup, results: dict) -> None:
    a = bench.args
    procs = setup.tunnel_procs()
    before = {p.name: p.rss_kib() for p in procs}
    hold = bench.spawn(f"hold-{setup.name}", [bench.tool("strait-bench"), "hold", *setup.echo, "--count", a.streams], bench.load_cpus)
    try:
        hold.json_line(timeout=300)
        server = sum(p.rss_kib() - before[p.name] for p in setup.server)
        agent = sum(p.rss_kib() - before[p.name] for p in setup.agent + setup.client)
    finally:
        hold.stop()
        bench.procs.remove(hold)
    results.setdefault("5-stream-server-kib", []).append(server / a.streams)
    results.setdefault("5-stream-agent-kib", []).append(agent / a.streams)


def scenario_agents(bench: Bench, setup: Setup, results: dict) -> None:
    a = bench.args
    out = setup.agents(a.agents)
    results.setdefault("5-agent-server-kib", []).append(out["server_kib"] / a.agents)
    results.setdefault("5-agent-agent-kib", []).append(out["agent_kib"] / a.agents)


UDP_RATES = ("50M", "100M", "300M")


def scenario_udp(bench: Bench, setup: Setup, results: dict) -> None:
    """iperf3 -u at fixed offered rates, 1,200-byte packets, client to
    service: packets/s that arrive, and the share lost."""
    if not setup.udp:
        return
    a = bench.args
    port = bench.services["iperf"]
    for rate in a.udp_rates.split(","):
        server = bench.spawn("iperf3-server", ["iperf3", "-s", "-1", "-p", port, "-B", "127.0.0.1"], bench.load_cpus)
        relay = Relay(setup.udp, port) if setup.udp != port else None
        try:
            wait_port_bound(port)
            out = run_json(["iperf3", "-c", "127.0.0.1", "-p", str(setup.udp), "-u", "-b", rate, "-l", "1200",
                            "-t", str(a.seconds), "-J", "--connect-timeout", "10000"], bench.load_cpus,
                           timeout=a.seconds + 30)
        finally:
            if relay:
                relay.close()
            server.stop()
            bench.procs.remove(server)
        if "error" in out:
            raise RuntimeError(f"iperf3 -u -b {rate}: {out['error']}")
        end = out["end"].get("sum_received") or out["end"]["sum"]
        total = out["end"]["sum"]
        sent, lost = total["packets"], total["lost_packets"]
        results.setdefault(f"9-udp-{rate}-pps", []).append((sent - lost) / end["seconds"])
        results.setdefault(f"9-udp-{rate}-loss", []).append(100.0 * lost / sent if sent else 100.0)


def run_text(argv: list, cpus: str | None, timeout: float) -> str:
    argv = [str(a) for a in argv]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-1500:]}{done.stdout[-500:]}")
    return done.stdout


def scenario_redis(bench: Bench, setup: Setup, results: dict) -> None:
    """redis-benchmark: one connection, one request at a time (each GET a
    round trip through the tunnel), then its default of 50 connections."""
    if "redis" not in setup.ports:
        return
    a = bench.args
    port = setup.ports["redis"]

    def run(clients: int, requests: int, tests: str) -> dict[str, float]:
        out = run_text(["redis-benchmark", "-h", "127.0.0.1", "-p", port, "-c", clients, "-n", requests, "-t", tests,
                        "--csv"], bench.load_cpus, timeout=600)
        rows = {}
        for line in out.splitlines():
            cells = [c.strip('"') for c in line.split(",")]
            if len(cells) >= 2 and cells[0] in ("GET", "SET"):
                rows[cells[0]] = float(cells[1])
        if not rows:
            raise RuntimeError(f"redis-benchmark through {setup.name}: no result in {out[-500:]!r}")
        return rows

    one = run(1, max(int(a.seconds * 4000), 500), "get")["GET"]
    results.setdefault("7-redis-c1-rps", []).append(one)
    results.setdefault("7-redis-c1-rt-us", []).append(1e6 / one)
    many = run(50, max(int(a.seconds * 20000), 2000), "get,set")
    results.setdefault("7-redis-c50-rps", []).append(statistics.mean(many.values()))


def scenario_pgbench(bench: Bench, setup: Setup, results: dict) -> None:
    """pgbench's select-only script (one statement, one round trip per
    transaction) on one connection, then on eight."""
    if "pg" not in setup.ports:
        return
    a = bench.args
    port = setup.ports["pg"]

    def run(clients: int) -> float:
        out = run_text([bench.pgbench, "-h", "127.0.0.1", "-p", port, "-U", "bench", "-n", "-S", "-c", clients,
                        "-j", min(clients, 2), "-T", max(int(a.seconds), 1), "postgres"], bench.load_cpus,
                       timeout=a.seconds + 120)
        found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
        if not found:
            raise RuntimeError(f"pgbench through {setup.name}: no tps in {out[-500:]!r}")
        return float(found.group(1))

    one = run(1)
    results.setdefault("8-pg-c1-tps", []).append(one)
    results.setdefault("8-pg-c1-rt-us", []).append(1e6 / one)
    results.setdefault("8-pg-c8-tps", []).append(run(8))


SCENARIOS = {
    "throughput": scenario_throughput,
    "parallel": scenario_parallel,
    "http": scenario_http,
    "latency": scenario_latency,
    "dial": scenario_dial,
    "streams": scenario_streams,
    "agents": scenario_agents,
    "redis": scenario_redis,
    "pgbench": scenario_pgbench,
    "udp": scenario_udp,
    "policy": scenario_policy,
    "cache": scenario_cache,
}

# ---------------------------------------------------------------- report

METRICS = [
    # key, title, unit, higher is better
    ("1-throughput-up", "1. Single-stream throughput, client to service", "Gbit/s", True),
    ("1-throughput-down", "1. Single-stream throughput, service to client", "Gbit/s", True),
    ("2-parallel-up", "2. Ten parallel streams, client to service", "Gbit/s", True),
    ("2-parallel-down", "2. Ten parallel streams, service to client", "Gbit/s", True),
    ("3-http-rps", "3. HTTP requests/s, 64 keep-alive connections", "req/s", True),
    ("3-http-cpu-us", "3. Tunnel CPU per HTTP request", "µs", False),
    ("4-connect-p50-us", "4. New connection + request + reply, p50", "µs", False),
    ("4-connect-p99-us", "4. New connection + request + reply, p99", "µs", False),
    ("4-dial-p50-us", "4. New private dial to the first echoed byte, p50", "µs", False),
    ("4-dial-p99-us", "4. New private dial to the first echoed byte, p99", "µs", False),
    ("5-stream-server-kib", "5. Memory per open stream, server side", "KiB", False),
    ("5-stream-agent-kib", "5. Memory per open stream, agent side (and dialer)", "KiB", False),
    ("5-agent-server-kib", "5. Memory per idle agent, server side", "KiB", False),
    ("5-agent-agent-kib", "5. Memory per idle agent, agent side", "KiB", False),
    ("6-cpu-up", "6. Tunnel CPU seconds per GB, client to service", "s/GB", False),
    ("6-cpu-down", "6. Tunnel CPU seconds per GB, service to client", "s/GB", False),
    ("7-redis-c1-rps", "7. Redis GET requests/s, one connection (redis-benchmark -c 1)", "req/s", True),
    ("7-redis-c1-rt-us", "7. Redis round trip, one connection (1 / requests/s)", "µs", False),
    ("7-redis-c50-rps", "7. Redis GET and SET requests/s, 50 connections (redis-benchmark's default)", "req/s", True),
    ("8-pg-c1-tps", "8. pgbench select-only transactions/s, one connection", "tps", True),
    ("8-pg-c1-rt-us", "8. pgbench select-only round trip, one connection (1 / tps)", "µs", False),
    ("8-pg-c8-tps", "8. pgbench select-only transactions/s, 8 connections", "tps", True),
    *(
        row
        for rate in UDP_RATES
        for row in (
            (f"9-udp-{rate}-pps", f"9. UDP packets/s received, {rate}bit/s offered (iperf3 -u, 1,200 B)", "packets/s", True),
            (f"9-udp-{rate}-loss", f"9. UDP loss, {rate}bit/s offered (iperf3 -u, 1,200 B)", "%", False),
        )
    ),
    ("10-policy-off-rps", "10. HTTP requests/s, published http tunnel without a policy (64 connections)", "req/s", True),
    ("10-policy-on-rps", "10. HTTP requests/s, the same service through a tunnel with a typical policy", "req/s", True),
    ("10-policy-ratio", "10. HTTP requests/s with the policy / without (per round; target ≥ 0.95)", "ratio", True),
    ("10-policy-off-cpu-us", "10. Tunnel CPU per HTTP request without a policy", "µs", False),
    ("10-policy-on-cpu-us", "10. Tunnel CPU per HTTP request with the typical policy", "µs", False),
    ("10-policy-cpu-ratio", "10. Tunnel CPU per HTTP request with the policy / without (per round)", "ratio", False),
    *(
        (f"11-cache-hit-{label}-rps", f"11. Edge cache HIT requests/s, {title} immutable object, 64 keep-alive connections",
         "req/s", True)
        for label, _, title in CACHE_HITS
    ),
    *(
        (f"11-cache-hit-{label}-cpu-us", f"11. Cache CPU per HIT request, {title} object (strait: engine and agent; "
         "nginx: master and worker)", "µs", False)
        for label, _, title in CACHE_HITS
    ),
    ("11-cache-cold-seconds", "11. Edge cache cold miss: concurrent GETs of one large object, until every client has it all",
     "s", False),
    ("11-cache-cold-upstream", "11. Edge cache cold miss: requests that reached the origin", "requests", False),
]

# Rows of time per round trip: the table also gives what the tunnel adds
# to direct's.
ADDED = {"7-redis-c1-rt-us", "8-pg-c1-rt-us"}


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def machine() -> dict:
    model = "unknown"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = pathlib.Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def report(bench: Bench, data: dict, out: pathlib.Path, command: str, failures: list[str]) -> None:
    summary = {setup: {k: summarise(v) for k, v in metrics.items()} for setup, metrics in data.items()}
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "pinning": {"tunnel_cpus": bench.tunnel_cpus, "load_cpus": bench.load_cpus} if bench.pinned else None,
        "rounds": bench.args.rounds,
        "seconds": bench.args.seconds,
        "setups": {name: SETUPS[name].label for name in data},
        "raw": data,
        "summary": summary,
        "failures": failures,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    render(doc, out)


def render(doc: dict, out: pathlib.Path) -> None:
    """RESULTS.md from a results document, followed by bench/FINDINGS.md
    (what the numbers led to change, written by hand)."""
    m = doc["machine"]
    pin = doc["pinning"]
    summary = doc["summary"]
    labels = doc["setups"]
    lines = [
        "# strait benchmark results",
        "",
        f"Produced by `{doc['command']}` on {doc['date'][:10]}.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}.",
        (
            f"Pinning: tunnel processes (engine/server, agent/client) on CPU {pin['tunnel_cpus']}; "
            f"load generators, local services and the client's end of each tunnel (its TLS: the load generator "
            f"itself, the iperf3 bridge, `strait connect`) on CPU {pin['load_cpus']}."
            if pin
            else "Pinning: off."
        ),
        f"{doc['rounds']} rounds, setups alternating within each round; each cell is the median, "
        f"with the range (min–max) over rounds. Throughput and HTTP runs last {doc['seconds']:g} s.",
        "",
    ]
    if doc.get("failures"):
        lines += ["Setup rounds that failed (their cells have fewer rounds):", ""]
        lines += [f"- {failure}" for failure in doc["failures"]]
        lines.append("")
    setups = list(summary)
    # Ratio columns: each setup against these when they ran, and a QUIC
    # agent's setup against the same setup with the agent on TLS.
    baselines = [b for b in ("direct", "rathole-tls", "nginx-cache") if b in summary]
    over_tls = {s: SETUPS[s].over_tls for s in setups if s in SETUPS and SETUPS[s].over_tls in summary}
    ratio = lambda v, base: f" {v / base:.2f}x |" if base else " – |"
    for key, title, unit, higher in METRICS:
        rows = [(s, summary[s][key]) for s in setups if key in summary[s]]
        if not rows:
            continue
        lines += [f"### {title} ({unit}, {'higher' if higher else 'lower'} is better)", ""]
        added = key in ADDED and "direct" in summary and key in summary["direct"]
        # A baseline's column where it has the row (nginx-cache: the cache rows only).
        bases = [b for b in baselines if b != "nginx-cache" or key in summary[b]]
        head = "| setup | median | range |" + (" added to direct |" if added else "")
        head += "".join(f" vs {b} |" for b in bases) + (" vs agent on TLS |" if over_tls else "")
        lines += [head, "|---|---:|---:|" + "---:|" * (len(bases) + bool(over_tls) + added)]
        for s, v in rows:
            cell = f"| {labels[s]} | {fmt(v['median'])} | {fmt(v['min'])}–{fmt(v['max'])} |"
            if added:
                cell += f" {v['median'] - summary['direct'][key]['median']:+.1f} |"
            for b in bases:
                cell += ratio(v["median"], summary[b].get(key, {}).get("median"))
            if over_tls:
                cell += ratio(v["median"], summary[over_tls[s]].get(key, {}).get("median") if s in over_tls else None)
            lines.append(cell)
        lines.append("")
    findings = ROOT / "bench" / "FINDINGS.md"
    if findings.exists() and pathlib.Path(out).resolve() == (ROOT / "bench").resolve():
        lines += [findings.read_text()]
    (out / "RESULTS.md").write_text("\n".join(lines))


# ---------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    p.add_argument("--peer-dir", default=str(ROOT / "bench" / "work" / "bin"))
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated: " + ", ".join(SETUPS))
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each throughput and HTTP run")
    p.add_argument("--connections", type=int, default=3000, help="new connections per latency run")
    p.add_argument("--streams", type=int, default=1000, help="open streams for the memory scenario")
    p.add_argument("--agents", type=int, default=1000, help="idle agents for the memory scenario")
    p.add_argument("--udp-rates", default=",".join(UDP_RATES), help="offered rates for the UDP scenario: " + ", ".join(UDP_RATES))
    p.add_argument("--cache-object-mib", type=int, default=200, help="the cache scenario's cold object, MiB")
    p.add_argument("--cache-clients", type=int, default=50, help="concurrent cold GETs in the cache scenario")
    p.add_argument("--no-pin", dest="pin", action="store_false")
    p.add_argument("--sdk-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--out", default=str(ROOT / "bench"))
    p.add_argument("--command", default="bench/run.sh", help="the command line recorded in the report")
    p.add_argument("--render", action="store_true", help="only rewrite RESULTS.md from OUT/results.json")
    args = p.parse_args()
    if args.render:
        out = pathlib.Path(args.out)
        render(json.loads((out / "results.json").read_text()), out)
        return 0

    setups = [s for s in args.setups.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in setups:
        if s not in SETUPS:
            p.error(f"unknown setup {s!r}")
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}")
    setups = [s for s in setups if SETUPS[s].available()]

    bench = Bench(args)
    data: dict[str, dict[str, list[float]]] = {s: {} for s in setups}
    failures = []
    try:
        bench.start_services(scenarios)
        for round_no in range(1, args.rounds + 1):
            # Alternate the order each round so no setup always goes first.
            order = setups if round_no % 2 else list(reversed(setups))
            for name in order:
                setup = SETUPS[name](bench)
                print(f"round {round_no}/{args.rounds}: {setup.label}", file=sys.stderr, flush=True)
                try:
                    setup.start()
                    for scenario in scenarios:
                        if scenario in setup.scenarios:
                            SCENARIOS[scenario](bench, setup, data[name])
                except Exception as error:  # noqa: BLE001 - one setup's failure is reported, the run goes on
                    failures.append(f"{name}: {error}")
                    print(f"  FAILED: {error}", file=sys.stderr, flush=True)
                finally:
                    setup.stop()
    finally:
        bench.stop_all()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report(bench, {k: v for k, v in data.items() if v}, out, args.command, failures)
    print((out / "RESULTS.md").read_text())
    if failures:
        print("failures:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    shutil.rmtree(bench.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

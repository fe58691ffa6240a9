#!/usr/bin/env python3
"""strait's soak: one real engine under an hour of churn, and a verdict on
whether its memory or file descriptors grow.

What runs, all real: `strait-engine` from a config file (`--print-ready`,
metrics listener on), `strait forward` agents (the CLI) in front of
`strait-bench soak-services`, and `strait-bench soak-load` as every client.

- Stable agents (never killed): a published HTTP tunnel, a published TLS
  tunnel and three private tunnels (echo, an echo that resets, the
  checksummed transfer service).
- Churned agents: `strait forward` processes, published and private, that
  this script kills (SIGKILL) or stops (SIGTERM, a clean close) and starts
  again, over and over; each comes back on the same hostname (the engine's
  hostname hold) and is proved with a request or a `strait dial` each time.
- In-process agents (soak-load) connecting, opening a tunnel, proving it,
  closing or vanishing, again.
- Steady published HTTP requests and private dials; requests and streams
  cut mid-flight by the client and by the service; checksummed transfers of
  1 GiB (SHA-256 at both ends), one after another.

Every --sample-every seconds the engine's RSS, open fds and gauges
(clients, tunnels, streams_active) go to samples.csv. Every --pause-every
seconds, and at the end, the load pauses (in-flight work finishes,
connections close, churned agents are brought up): the engine's fds and
gauges must then return to the baseline taken before the load began, within
a timeout. It fails (exit 1, the reasons printed) on: growth of RSS or fds
(see `growth`), a pause that does not return to baseline, a checksum
mismatch, an unexpected error of the load, a churned agent that does not
come back on its hostname or does not answer, an engine that exits.

    bench/soak.py                    one hour (release binaries)
    bench/soak.py --seconds 60 ...   a smoke run (what scripts/test.sh runs)

Standard library only. See bench/SOAK.md for the figures and how to read
them.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import pathlib
import queue
import random
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import Proc, machine  # noqa: E402  (same folder, standard library only)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECRET = "soak-secret-soak-secret-soak-secret-0123456"

# Growth tolerance, RSS: the median of the last quarter of samples may
# exceed the median of the second quarter (after a first quarter of warm-up)
# by this fraction plus this many KiB. Measured noise (bench/SOAK.md): the
# engine's RSS under this load moves by a few MiB between samples (allocator
# arenas, the splice buffers of whatever is in flight), and its quiesced
# RSS by well under 8 MiB once warm. The leaks this must catch are larger:
# one stream's state (~25 KiB) kept per thousand requests of the hour's
# ~400,000 is ~10 MiB between those quarters; a control channel's (~33 KiB)
# kept per churned agent (~20,000 an hour) is over 300 MiB.
RSS_TOLERANCE = (0.10, 8 * 1024)
# fds under load follow what is in flight (a transfer, a few keep-alive
# connections, cut streams closing): tens. A leaked fd per churned agent or
# per cut stream is thousands an hour. The hard check is the pause's: fds
# back to the baseline exactly.
FD_TOLERANCE = (0.25, 16)

# Every wait on the system under test has one of these bounds.
READY_TIMEOUT = 60.0
ANNOUNCE_TIMEOUT = 30.0
PROBE_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0
SETTLE_TIMEOUT = 90.0
ENGINE_STOP_TIMEOUT = 45.0


class Failure(Exception):
    """The soak found something wrong."""


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the engine


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def metric_by_label(metrics: dict[str, float], name: str, label: str) -> dict[str, float]:
    found = {}
    rx = re.compile(re.escape(name) + r"\{.*" + re.escape(label) + r'="([^"]*)"')
    for k, v in metrics.items():
        m = rx.match(k)
        if m:
            found[m.group(1)] = found.get(m.group(1), 0) + v
    return found


class Engine:
    """A strait-engine run from a config file, the way an operator runs it."""

    def __init__(self, work: pathlib.Path, bin_dir: pathlib.Path, certs: pathlib.Path, limits: dict[str, int],
                 log_level: str = "info", name: str = "engine") -> None:
        self.work, self.bin, self.certs, self.limits = work, bin_dir, certs, limits
        self.log_level, self.name = log_level, name
        self.proc: Proc | None = None
        self.port = 0
        self.metrics_addr = ""
        self.starts = 0

    def config_text(self, port: int) -> str:
        limits = ", ".join(f"{k}: {v}" for k, v in self.limits.items())
        return (
            f"engine: {{host: localhost, log_level: {self.log_level}}}\n"
            f'tls: {{enabled: true, listen_addr: "127.0.0.1:{port}"}}\n'
            f'certs: {{static: {{enabled: true, cert_file: "{self.certs / "cert.pem"}", key_file: "{self.certs / "key.pem"}"}}}}\n'
            f'auth: {{jwt: {{enabled: true, token_jwt_secret: "{SECRET}"}}}}\n'
            'metrics: {prometheus: {enabled: true, listen_addr: "127.0.0.1:0"}}\n'
            + (f"limits: {{{limits}}}\n" if limits else "")
        )

    def start(self, port: int = 0, attempts: int = 1) -> None:
        """Starts on PORT (0: any). A restart on the same port may meet the
        old engine's connections still closing: it tries ATTEMPTS times."""
        config = self.work / f"{self.name}.yaml"
        config.write_text(self.config_text(port))
        for attempt in range(1, attempts + 1):
            self.starts += 1
            proc = Proc(f"{self.name}-{self.starts}", [str(self.bin / "strait-engine"), "--config", str(config), "--print-ready", "run"],
                        self.work, None)
            try:
                ready = proc.json_line(timeout=READY_TIMEOUT)
            except RuntimeError as error:
                proc.stop()
                if attempt < attempts and "in use" in str(error).lower():
                    log(f"engine: port {port} still in use, attempt {attempt}/{attempts}")
                    time.sleep(0.5)  # pacing between bind attempts, not a synchronisation
                    continue
                raise Failure(f"the engine did not start: {error}") from None
            self.proc = proc
            self.port = int(ready["tls"].rsplit(":", 1)[1])
            self.metrics_addr = ready["metrics"]
            return

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def gauges(self) -> dict[str, float]:
        m = self.metrics()
        return {
            "clients": metric_sum(m, "strait_clients_connected"),
            "tunnels": metric_sum(m, "strait_tunnels"),
            "streams_active": metric_sum(m, "strait_streams_active"),
        }

    def status(self, field: str) -> int:
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise Failure(f"engine: no {field} in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        return self.status("VmRSS")

    def hwm_kib(self) -> int:
        return self.status("VmHWM")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_kinds(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
            except OSError:
                continue
            kind = target.split(":", 1)[0] if ":" in target else "file " + target
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def stop(self, timeout: float = ENGINE_STOP_TIMEOUT) -> tuple[int, float]:
        """SIGTERM; the exit status and how long it took."""
        assert self.proc
        started = time.monotonic()
        self.proc.popen.send_signal(signal.SIGTERM)
        try:
            code = self.proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.popen.kill()
            self.proc.popen.wait()
            raise Failure(f"the engine did not exit within {timeout:.0f}s of SIGTERM") from None
        finally:
            self.proc.log.close()
        return code, time.monotonic() - started


def mint(bin_dir: pathlib.Path, sub: str) -> str:
    return subprocess.run(
        [str(bin_dir / "strait"), "token", "--secret", SECRET, "--sub", sub, "--ttl", "48h"],
        check=True, capture_output=True, text=True, timeout=30,
    ).stdout.strip()


def agent_env(work: pathlib.Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")}
    env.update(HOME=str(work), STRAIT_LOG="info")
    return env


def https_get(port: int, host: str, ca: pathlib.Path, path: str = "/", timeout: float = PROBE_TIMEOUT) -> tuple[int, bytes]:
    """One HTTPS request to the engine at 127.0.0.1:PORT with SNI HOST (the
    resolver does not know *.t.localhost)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = tls.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


# ---------------------------------------------------------------- agents


class Forward:
    """One `strait forward` process: the real CLI."""

    def __init__(self, soak: "Soak", name: str, target: str, token: str, extra: list[str], probe: str) -> None:
        """PROBE: how to prove it serves: `http` (GET / through its
        hostname), `blob-tls` (a small checksummed download through its TLS
        hostname), or through `strait dial`: `echo`, `cut` (an echo that may
        stop early), `blob`."""
        self.soak, self.name, self.target, self.token = soak, name, target, token
        self.extra, self.kind = extra, probe
        self.published = probe in ("http", "blob-tls")
        self.proc: Proc | None = None
        self.url = ""
        self.runs = 0
        self.stopped_by_us = True

    def start(self) -> str:
        """Starts it; returns the address it announces (`Forwarding ADDR -> ...`)."""
        s = self.soak
        self.runs += 1
        argv = [str(s.bin / "strait"), "forward", self.target, "--engine", f"localhost:{s.engine.port}",
                "--ca-file", str(s.certs / "ca.pem"), "--token", self.token, *self.extra]
        if self.proc is not None and not self.stopped_by_us:
            raise Failure(f"strait forward {self.name} exited by itself with {self.proc.popen.returncode}; log: {self.proc.tail()}")
        self.proc = Proc(f"forward-{self.name}-{self.runs}", argv, s.work, None, env=agent_env(s.work))
        self.stopped_by_us = False
        try:
            found = self.proc.line_matching(r"^Forwarding (.+?) -> ", timeout=ANNOUNCE_TIMEOUT)
        except RuntimeError as error:
            raise Failure(f"strait forward {self.name} (run {self.runs}) did not announce its tunnel: {error}") from None
        url = found.group(1)
        if self.url and url != self.url:
            raise Failure(f"strait forward {self.name} came back on {url}, not on its hostname {self.url}")
        self.url = url
        return url

    def kill(self, sig: int) -> int:
        assert self.proc
        if self.proc.popen.poll() is not None:
            raise Failure(f"strait forward {self.name} exited by itself with {self.proc.popen.returncode}; log: {self.proc.tail()}")
        self.stopped_by_us = True
        self.proc.popen.send_signal(sig)
        try:
            code = self.proc.popen.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.popen.kill()
            self.proc.popen.wait()
            raise Failure(f"strait forward {self.name} did not exit within {EXIT_TIMEOUT:.0f}s of signal {sig}") from None
        finally:
            self.proc.log.close()
        if sig == signal.SIGTERM and code != 0:
            raise Failure(f"strait forward {self.name} exited {code} on SIGTERM; log: {self.proc.tail()}")
        return code

    def running(self) -> bool:
        return self.proc is not None and self.proc.popen.poll() is None

    def where(self) -> str:
        """The hostname (without the port) or the private tunnel's name."""
        where = self.url.split("://", 1)[1].split(" ", 1)[0]
        return where.rsplit(":", 1)[0] if self.published else where

    def probe(self) -> None:
        s = self.soak
        where = self.where()
        ca = s.certs / "ca.pem"
        if self.kind == "http":
            try:
                status, body = https_get(s.engine.port, where, ca)
            except OSError as error:
                raise Failure(f"{self.name}: GET / through {where}: {error}") from None
            if status != 200:
                raise Failure(f"{self.name}: GET / through {where} answered {status}: {body[:200]!r}")
            return
        if self.kind == "blob-tls":
            try:
                answer = tls_exchange(s.engine.port, where, ca, b"down 100000 1\n")
            except OSError as error:
                raise Failure(f"{self.name}: a transfer through {where}: {error}") from None
            check_blob(self.name, answer, 100000)
            return
        payload = b"down 100000 1\n" if self.kind == "blob" else f"probe {self.name} {self.runs}\n".encode()
        try:
            done = subprocess.run(
                [str(s.bin / "strait"), "dial", where, "--engine", f"localhost:{s.engine.port}", "--ca-file", str(ca),
                 "--token", self.token],
                input=payload, capture_output=True, timeout=PROBE_TIMEOUT, env=agent_env(s.work),
            )
        except subprocess.TimeoutExpired:
            raise Failure(f"{self.name}: strait dial {where} did not finish in {PROBE_TIMEOUT:.0f}s") from None
        out = done.stdout
        if self.kind == "blob":
            check_blob(self.name, out, 100000)
        elif self.kind == "cut" and out and payload.startswith(out):
            pass  # the resetting echo may stop after any first byte
        elif out != payload:
            raise Failure(f"{self.name}: strait dial {where} echoed {out!r} (exit {done.returncode}): {done.stderr.decode()[-300:]}")


def tls_exchange(port: int, host: str, ca: pathlib.Path, send: bytes, timeout: float = PROBE_TIMEOUT) -> bytes:
    """Sends SEND over TLS (SNI HOST) to 127.0.0.1:PORT, reads to the end."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(send)
            data = b""
            while True:
                try:
                    chunk = tls.recv(65536)
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                data += chunk
    return data


def check_blob(name: str, answer: bytes, size: int) -> None:
    """A download of the transfer service: SIZE bytes, then the hex SHA-256
    the service computed of what it sent."""
    body, digest = answer[:size], answer[size:].strip().decode(errors="replace")
    if len(body) != size or hashlib.sha256(body).hexdigest() != digest:
        raise Failure(f"{name}: a {size}-byte download arrived as {len(answer)} bytes, digest {digest[:16]!r}, "
                      f"sha256 here {hashlib.sha256(body).hexdigest()[:16]}")


class Churner(threading.Thread):
    """Starts a `strait forward`, proves it, lets it live a while, kills it
    (SIGKILL or SIGTERM, alternating at random), waits a little, again. On a
    pause it brings its agent up and holds it there until the resume."""

    def __init__(self, soak: "Soak", forward: Forward, seed: int) -> None:
        super().__init__(name=f"churn-{forward.name}", daemon=True)
        self.soak, self.fwd = soak, forward
        self.rng = random.Random(seed)
        self.settled = threading.Event()
        self.error: str | None = None
        self.kills = {"SIGKILL": 0, "SIGTERM": 0}
        self.cycles = 0

    def up(self) -> None:
        if not self.fwd.running():
            self.fwd.start()
            self.fwd.probe()
            self.cycles += 1

    def run(self) -> None:
        s = self.soak
        try:
            while not s.stopping.is_set():
                if not s.running.is_set():
                    self.up()
                    self.settled.set()
                    while not s.running.wait(0.2):
                        if s.stopping.is_set():
                            return
                    self.settled.clear()
                    continue
                self.up()
                # Live a while, looking every 0.2 s for a pause or the end.
                end = time.monotonic() + self.rng.uniform(*s.args.churn_life)
                while time.monotonic() < end and s.running.is_set() and not s.stopping.wait(0.2):
                    pass
                if s.running.is_set() and not s.stopping.is_set():
                    sig = signal.SIGKILL if self.rng.random() < 0.5 else signal.SIGTERM
                    self.fwd.kill(sig)
                    self.kills[sig.name] += 1
                    s.stopping.wait(self.rng.uniform(*s.args.churn_down))
        except Failure as error:
            self.error = str(error)
            s.fail(str(error))
        except Exception as error:  # noqa: BLE001 - any crash of the harness is a failure to report
            self.error = f"{self.name}: {error!r}"
            s.fail(self.error)


# ---------------------------------------------------------------- the soak


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bin = pathlib.Path(args.bin_dir)
        self.out = pathlib.Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="strait-soak-"))
        self.certs = self.work / "certs"
        self.running = threading.Event()
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.samples: list[dict] = []
        self.pauses: list[dict] = []
        self.transfers: list[dict] = []
        self.stats: dict = {}
        self.load_events: queue.Queue = queue.Queue()
        self.procs: list[Proc] = []
        self.forwards: list[Forward] = []
        self.churners: list[Churner] = []

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)
        log(f"FAILURE: {message}")

    def spawn(self, name: str, argv: list, **kw) -> Proc:
        proc = Proc(name, [str(a) for a in argv], self.work, None, **kw)
        self.procs.append(proc)
        return proc

    # ------------------------------------------------------------ set-up

    def start(self) -> None:
        a = self.args
        subprocess.run([str(self.bin / "strait-engine"), "gen-certs", "--host", "localhost", "--out", str(self.certs)],
                       check=True, capture_output=True, timeout=60)
        self.tokens = {p: mint(self.bin, f"soak-{p}") for p in ("stable", "churn", "inproc")}
        # Defaults for every limit: the load comes from 32 source addresses
        # and three principals, well within them, as a real deployment's.
        self.engine = Engine(self.work, self.bin, self.certs, limits={}, log_level=a.engine_log)
        self.engine.start()
        log(f"engine pid {self.engine.pid} on 127.0.0.1:{self.engine.port}, metrics {self.engine.metrics_addr}")
        services = self.spawn("services", [self.bin / "strait-bench", "soak-services",
                                            *(["--corrupt"] if "corrupt" in a.inject else [])])
        self.services = services.json_line()
        sv = self.services
        stable = self.tokens["stable"]
        self.stable = [
            Forward(self, "web", sv["http"], stable, ["--host", "soak-web"], "http"),
            Forward(self, "blob-tls", sv["blob"], stable, ["--protocol", "tls", "--tls-mode", "terminated", "--host", "soak-blob"], "blob-tls"),
            Forward(self, "echo", sv["echo"], stable, ["--private", "--name", "soak-echo"], "echo"),
            Forward(self, "cut", sv["cut"], stable, ["--private", "--name", "soak-cut"], "cut"),
            Forward(self, "blob", sv["blob"], stable, ["--private", "--name", "soak-blob"], "blob"),
        ]
        for f in self.stable:
            f.start()
            f.probe()
        churn = self.tokens["churn"]
        self.churned = []
        for i in range(a.churn_agents):
            if i % 2 == 0:
                f = Forward(self, f"churn-web-{i}", sv["http"], churn, ["--host", f"soak-churn-{i}"], "http")
            else:
                f = Forward(self, f"churn-echo-{i}", sv["echo"], churn, ["--private", "--name", f"soak-churn-{i}"], "echo")
            f.start()
            f.probe()
            self.churned.append(f)
        self.forwards = self.stable + self.churned
        log(f"{len(self.stable)} stable and {len(self.churned)} churned strait forward agents up")

    def settle(self, what: str) -> dict:
        """Waits until the engine is back at the baseline: every gauge and
        the fd count equal, or fails after SETTLE_TIMEOUT."""
        want = self.baseline
        started = time.monotonic()
        last = {}
        while time.monotonic() - started < SETTLE_TIMEOUT:
            self.check_engine()
            last = {**self.engine.gauges(), "fds": self.engine.fds()}
            if all(last[k] == want[k] for k in ("clients", "tunnels", "streams_active", "fds")):
                return {**last, "rss_kib": self.engine.rss_kib(), "settle_s": round(time.monotonic() - started, 2)}
            time.sleep(0.25)  # polling interval; the loop's bound is SETTLE_TIMEOUT
        kinds = self.engine.fd_kinds()
        raise Failure(
            f"{what}: the engine did not return to its baseline within {SETTLE_TIMEOUT:.0f}s: "
            f"now {last}, baseline {want}; fds by kind now {kinds}, at the baseline {self.baseline_fd_kinds}"
        )

    def take_baseline(self) -> None:
        n = len(self.forwards)
        started = time.monotonic()
        while True:
            g = self.engine.gauges()
            if g["clients"] == n and g["tunnels"] == n and g["streams_active"] == 0:
                break
            if time.monotonic() - started > SETTLE_TIMEOUT:
                raise Failure(f"before the load: the engine shows {g}, expected {n} clients and tunnels, no streams")
            time.sleep(0.25)  # polling interval
        # fds: the lowest of a few looks, as a probe's connection may still be closing.
        fds = []
        for _ in range(8):
            fds.append(self.engine.fds())
            time.sleep(0.25)  # polling interval
        self.baseline = {**g, "fds": min(fds), "rss_kib": self.engine.rss_kib()}
        self.baseline_fd_kinds = self.engine.fd_kinds()
        log(f"baseline: {self.baseline}")

    def start_load(self) -> None:
        a, sv = self.args, self.services
        churn_web = [f.where() for f in self.churned if f.published]
        churn_echo = [f.where() for f in self.churned if not f.published]
        argv = [
            self.bin / "strait-bench", "soak-load",
            "--engine", f"localhost:{self.engine.port}", "--ca", self.certs / "ca.pem",
            "--stable-token", self.tokens["stable"], "--churn-token", self.tokens["churn"],
            "--inproc-token", self.tokens["inproc"],
            "--web", "soak-web.t.localhost", "--echo", "soak-echo", "--cut", "soak-cut",
            "--blob", "soak-blob", "--blob-tls", "soak-blob.t.localhost",
            "--service-http", sv["http"], "--service-echo", sv["echo"],
            "--inproc-agents", a.inproc_agents, "--http-rate", a.http_rate, "--dial-rate", a.dial_rate,
            "--cut-rate", a.cut_rate, "--churn-rate", a.churn_rate,
            "--transfer-bytes", a.transfer_mib * 1024 * 1024, "--transfer-every", a.transfer_every,
            "--report-every", min(a.sample_every, 10),
        ]
        if churn_web:
            argv += ["--churn-web", ",".join(churn_web)]
        if churn_echo:
            argv += ["--churn-echo", ",".join(churn_echo)]
        self.load = self.spawn("load", argv)
        first = self.load.json_line()
        if first.get("event") != "started":
            raise Failure(f"soak-load: unexpected first line {first}")
        threading.Thread(target=self.read_load, name="load-reader", daemon=True).start()

    def read_load(self) -> None:
        """Reads soak-load's JSON lines for as long as it runs."""
        while True:
            try:
                line = self.load.readline(3600)
            except RuntimeError as error:
                self.load_events.put({"event": "exited", "error": str(error)})
                return
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            kind = event.get("event")
            if kind == "transfer":
                with self.lock:
                    self.transfers.append({**event, "t": round(time.monotonic() - self.t0, 1)})
                if not event["matched"]:
                    self.fail(f"transfer checksum mismatch: {event}")
            elif kind in ("stats", "paused", "resumed", "done"):
                with self.lock:
                    self.stats = event
                if kind != "stats":
                    self.load_events.put(event)

    def load_command(self, command: str, expect: str, timeout: float) -> dict:
        self.load.popen.stdin.write(f"{command}\n".encode())
        self.load.popen.stdin.flush()
        end = time.monotonic() + timeout
        while True:
            try:
                event = self.load_events.get(timeout=max(end - time.monotonic(), 0.01))
            except queue.Empty:
                raise Failure(f"soak-load did not answer {command!r} within {timeout:.0f}s") from None
            if event.get("event") == "exited":
                raise Failure(f"soak-load exited: {event['error']}")
            if event.get("event") == expect:
                return event

    def check_engine(self) -> None:
        if not self.engine.alive():
            raise Failure(f"the engine exited with {self.engine.proc.popen.returncode}; log: {self.engine.proc.tail()}")
        for f in self.stable:
            if not f.running():
                raise Failure(f"stable agent {f.name} exited with {f.proc.popen.returncode}; log: {f.proc.tail()}")

    # ------------------------------------------------------------ the run

    def sample(self) -> dict:
        g = self.engine.gauges()
        with self.lock:
            counts = dict(self.stats.get("counts", {}))
        row = {
            "t_s": round(time.monotonic() - self.t0, 1),
            "rss_kib": self.engine.rss_kib(),
            "fds": self.engine.fds(),
            "clients": g["clients"],
            "tunnels": g["tunnels"],
            "streams_active": g["streams_active"],
            "hwm_kib": self.engine.hwm_kib(),
            "web_ok": counts.get("web_ok", 0),
            "dial_ok": counts.get("dial_ok", 0),
            "transfers_ok": counts.get("transfer_ok", 0),
            "unexpected": counts.get("unexpected", 0),
        }
        self.samples.append(row)
        with open(self.out / "samples.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            w.writeheader()
            w.writerows(self.samples)
        return row

    def pause(self, final: bool) -> None:
        t = round(time.monotonic() - self.t0, 1)
        log(f"pause at {t}s{' (final)' if final else ''}: load winding down")
        self.running.clear()
        paused = self.load_command("pause", "paused", timeout=max(600.0, self.args.transfer_mib / 2))
        deadline = time.monotonic() + SETTLE_TIMEOUT
        for c in self.churners:
            if not c.settled.wait(max(deadline - time.monotonic(), 0.01)):
                raise Failure(f"pause at {t}s: churned agent {c.fwd.name} did not come up in {SETTLE_TIMEOUT:.0f}s")
        row = {"t_s": t, **self.settle(f"pause at {t}s")}
        self.pauses.append(row)
        log(f"pause at {t}s: back at baseline after {row['settle_s']}s: rss {row['rss_kib']} KiB, fds {row['fds']}, "
            f"unexpected so far {paused['counts'].get('unexpected', 0)}")
        if not final:
            self.running.set()
            self.load_command("resume", "resumed", timeout=30)

    def run(self) -> int:
        a = self.args
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        try:
            self.start()
            self.take_baseline()
            self.t0 = time.monotonic()
            self.running.set()
            self.churners = [Churner(self, f, i) for i, f in enumerate(self.churned)]
            for c in self.churners:
                c.start()
            self.start_load()
            log(f"load running for {a.seconds:.0f}s (samples every {a.sample_every:g}s, pauses every {a.pause_every:g}s)")
            end = self.t0 + a.seconds
            next_sample = self.t0 + a.sample_every
            next_pause = self.t0 + a.pause_every
            while not self.failures:
                now = time.monotonic()
                if now >= end:
                    break
                self.check_engine()
                if now >= next_sample:
                    row = self.sample()
                    log(f"t={row['t_s']:.0f}s rss {row['rss_kib']} KiB fds {row['fds']} clients {row['clients']:.0f} "
                        f"tunnels {row['tunnels']:.0f} streams {row['streams_active']:.0f} transfers {row['transfers_ok']} "
                        f"unexpected {row['unexpected']}")
                    next_sample += a.sample_every
                    if "held-streams" in a.inject:
                        self.load.popen.stdin.write(b"hold 50\n")
                        self.load.popen.stdin.flush()
                if now >= next_pause and end - now > a.sample_every:
                    self.pause(final=False)
                    next_pause += a.pause_every
                    next_sample = max(next_sample, time.monotonic())
                time.sleep(min(0.5, max(0.0, min(next_sample, end) - time.monotonic())))  # pacing of the sampler
            if not self.failures:
                self.pause(final=True)
        except Failure as error:
            self.fail(str(error))
        finally:
            self.teardown()
        return self.verdict()

    def teardown(self) -> None:
        self.running.clear()
        if hasattr(self, "load") and self.load.popen.poll() is None:
            try:
                done = self.load_command("stop", "done", timeout=120)
                with self.lock:
                    self.stats = done
            except Failure as error:
                self.fail(str(error))
        self.stopping.set()
        for c in self.churners:
            c.join(ANNOUNCE_TIMEOUT + PROBE_TIMEOUT + EXIT_TIMEOUT)
            if c.is_alive():
                self.fail(f"churn thread {c.name} did not stop")
        for f in self.forwards:
            if f.running():
                try:
                    f.kill(signal.SIGTERM)
                except Failure as error:
                    self.fail(str(error))
        if hasattr(self, "engine") and self.engine.alive():
            try:
                code, took = self.engine.stop()
                self.engine_stop = {"exit": code, "seconds": round(took, 2)}
                if code != 0:
                    self.fail(f"the engine exited {code} on SIGTERM")
            except Failure as error:
                self.fail(str(error))
        for proc in reversed(self.procs):
            proc.stop()

    # ------------------------------------------------------------ the verdict

    def verdict(self) -> int:
        a = self.args
        counts = self.stats.get("counts", {})
        if not self.failures:
            if counts.get("unexpected", 0):
                self.fail(f"{counts['unexpected']} unexpected errors in the load: {self.stats.get('unexpected_errors', [])[:10]}")
            if a.transfer_mib and not counts.get("transfer_ok"):
                self.fail("no checksummed transfer completed")
            for key in ("web_ok", "dial_ok", "inproc_cycles"):
                if key == "inproc_cycles" and not a.inproc_agents:
                    continue
                if not counts.get(key):
                    self.fail(f"the load did nothing of {key}")
        growth = {
            "rss_kib": growth_check([s["rss_kib"] for s in self.samples], RSS_TOLERANCE),
            "fds": growth_check([s["fds"] for s in self.samples], FD_TOLERANCE),
            "quiesced_rss_kib": growth_check([p["rss_kib"] for p in self.pauses], RSS_TOLERANCE, minimum=4),
        }
        for name, g in growth.items():
            if g["verdict"] == "grew":
                self.fail(f"{name} grew: {g['detail']}")
        kills = {"SIGKILL": sum(c.kills["SIGKILL"] for c in self.churners), "SIGTERM": sum(c.kills["SIGTERM"] for c in self.churners)}
        result = {
            "date": self.started_at.isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "commit": git_commit(),
            "machine": machine(),
            "seconds": a.seconds,
            "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
            "engine_limits": "defaults (none raised)",
            "baseline": getattr(self, "baseline", None),
            "samples": self.samples,
            "pauses": self.pauses,
            "growth": growth,
            "transfers": self.transfers,
            "load_counts": counts,
            "unexpected_errors": self.stats.get("unexpected_errors", []),
            "churned_forward_restarts": sum(c.cycles for c in self.churners),
            "churned_forward_kills": kills,
            "engine_stop": getattr(self, "engine_stop", None),
            "failures": self.failures,
            "verdict": "fail" if self.failures else "pass",
        }
        (self.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
        self.print_summary(result)
        if not self.failures:
            import shutil

            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"logs kept in {self.work}", file=sys.stderr)
        return 1 if self.failures else 0

    def print_summary(self, r: dict) -> None:
        c = r["load_counts"]
        first, last = (self.samples[0], self.samples[-1]) if self.samples else ({}, {})
        transferred = sum(t["bytes"] for t in self.transfers if t["matched"])
        lines = [
            f"soak {r['verdict'].upper()} after {r['seconds']:.0f}s",
            f"  engine rss KiB: baseline {r['baseline'] and r['baseline']['rss_kib']}, first sample {first.get('rss_kib')}, "
            f"last {last.get('rss_kib')}, peak (VmHWM) {last.get('hwm_kib')}",
            f"  engine fds: baseline {r['baseline'] and r['baseline']['fds']}, first sample {first.get('fds')}, last {last.get('fds')}; "
            f"at pauses {[p['fds'] for p in self.pauses]}",
            f"  quiesced rss KiB at pauses: {[p['rss_kib'] for p in self.pauses]}",
            *(f"  growth {k}: {g['verdict']}: {g['detail']}" for k, g in r["growth"].items()),
            f"  transfers: {len([t for t in self.transfers if t['matched']])} matched of {len(self.transfers)} "
            f"({transferred / 2**30:.0f} GiB), checksum mismatches {len([t for t in self.transfers if not t['matched']])}",
            f"  load: web {c.get('web_ok', 0)}, dials {c.get('dial_ok', 0)}, cuts client {sum(v for k, v in c.items() if k.startswith('cut_client'))}"
            f" service {sum(v for k, v in c.items() if k.startswith('cut_service'))}, in-process agent cycles {c.get('inproc_cycles', 0)}, "
            f"churned forwards restarted {r['churned_forward_restarts']} (kills {r['churned_forward_kills']})",
            f"  unexpected errors: {c.get('unexpected', 0)}",
        ]
        lines += [f"  FAILURE: {f}" for f in r["failures"]]
        print("\n".join(lines), flush=True)


def growth_check(values: list[float], tolerance: tuple[float, float], minimum: int = 8) -> dict:
    """Median of the last quarter against the median of the second (the
    first is warm-up). Grew: last > second * (1 + fraction) + absolute."""
    if len(values) < minimum:
        return {"verdict": "too few samples", "detail": f"{len(values)} samples, {minimum} needed"}
    q = len(values) // 4
    second = statistics.median(values[q : 2 * q] or values[:1])
    last = statistics.median(values[-q:] or values[-1:])
    allowed = second * (1 + tolerance[0]) + tolerance[1]
    verdict = "grew" if last > allowed else "flat"
    return {
        "verdict": verdict,
        "second_quarter_median": second,
        "last_quarter_median": last,
        "allowed": round(allowed, 1),
        "detail": f"second-quarter median {second:g}, last-quarter median {last:g}, allowed up to {allowed:.0f}",
    }


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def pair(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, help="how long the load runs (default 60)")
    p.add_argument("--seconds", type=float, help="how long the load runs, in seconds")
    p.add_argument("--sample-every", type=float, help="seconds between samples (default 60; 5 for runs under 5 minutes)")
    p.add_argument("--pause-every", type=float, help="seconds between pauses (default 600; half the run when shorter)")
    p.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    p.add_argument("--out", default=str(ROOT / "bench" / "soak-out"), help="samples.csv and soak.json go here")
    p.add_argument("--engine-log", default="info")
    p.add_argument("--churn-agents", type=int, default=4, help="strait forward agents killed and restarted")
    p.add_argument("--churn-life", type=pair, default=(3.0, 15.0), help="seconds a churned agent lives, MIN,MAX")
    p.add_argument("--churn-down", type=pair, default=(0.5, 3.0), help="seconds it stays down, MIN,MAX")
    p.add_argument("--inproc-agents", type=int, default=8)
    p.add_argument("--http-rate", type=float, default=100.0)
    p.add_argument("--dial-rate", type=float, default=10.0)
    p.add_argument("--cut-rate", type=float, default=2.0)
    p.add_argument("--churn-rate", type=float, default=4.0)
    p.add_argument("--transfer-mib", type=int, default=1024)
    p.add_argument("--transfer-every", type=float, default=30.0)
    p.add_argument("--inject", default="", help="faults on purpose, to see the soak fail, comma-separated: "
                   "held-streams (50 streams opened after each sample and never closed), "
                   "corrupt (the transfer service flips a bit of every download over 1 MiB)")
    args = p.parse_args()
    args.inject = [f for f in args.inject.split(",") if f]
    for fault in args.inject:
        if fault not in ("held-streams", "corrupt"):
            p.error(f"unknown fault {fault!r}")
    args.seconds = args.seconds if args.seconds is not None else (args.minutes if args.minutes is not None else 60.0) * 60
    if args.sample_every is None:
        args.sample_every = 60.0 if args.seconds >= 300 else 5.0
    if args.pause_every is None:
        args.pause_every = 600.0 if args.seconds >= 1200 else args.seconds / 2
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return Soak(args).run()


if __name__ == "__main__":
    sys.exit(main())

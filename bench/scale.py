#!/usr/bin/env python3
"""strait's scale run: thousands of agents on one engine, then an engine
restart and the reconnect storm.

What runs, all real, over real TLS on 127.0.0.1: one `strait-engine` from a
config file; `strait-bench scale` with --agents in-process agents (strait's
agent library, one control channel and one tunnel each, half published and
half private, reconnecting with `strait forward`'s backoff), spread over
--sources source addresses (127.0.0.2 and up) and --principals principals;
and --forwards real `strait forward` processes (the CLI) from 127.0.0.1.

It measures: the time until every tunnel is up (from the engine's gauges),
the engine's RSS with all connected (and per agent); then SIGTERM, a new
engine on the same port, and the reconnect storm: the time until every
tunnel is back, the engine's peak memory during it (VmHWM of the new
process, and the highest RSS sampled), refusals by reason from the new
engine's metrics, and the agents' errors by kind.

    bench/scale.py                              10,000 agents (200 of them strait forward)
    bench/scale.py --agents 300 --forwards 10   a smoke run

Standard library only. Figures in bench/SOAK.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench import Proc, machine  # noqa: E402
from soak import Engine, Failure, agent_env, git_commit, log, metric_by_label, metric_sum, mint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def proc_rss_kib(pid: int) -> int:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Scale:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bin = pathlib.Path(args.bin_dir)
        self.out = pathlib.Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = pathlib.Path(tempfile.mkdtemp(prefix="strait-scale-"))
        self.certs = self.work / "certs"
        self.total = args.agents
        self.inproc = args.agents - args.forwards
        self.procs: list[Proc] = []
        self.forwards: list[Proc] = []
        self.failures: list[str] = []
        self.progress: dict = {}
        self.lock = threading.Lock()
        self.timeline: list[dict] = []

    def spawn(self, name: str, argv: list, **kw) -> Proc:
        proc = Proc(name, [str(a) for a in argv], self.work, None, **kw)
        self.procs.append(proc)
        return proc

    def limits(self) -> dict[str, int]:
        # Every per-source and per-principal limit at its default: the
        # agents come from --sources addresses and --principals principals,
        # as a fleet would. Only the engine-wide cap is raised: by default it
        # admits 10,000 connections in all, and 10,000 agents need that many
        # control channels alone, plus the reconnect storm's overlap.
        return {"max_connections": self.total + max(2000, self.total // 5)}

    def read_progress(self, proc: Proc) -> None:
        while True:
            try:
                line = proc.readline(3600)
            except RuntimeError:
                return
            if line.startswith("{"):
                event = json.loads(line)
                with self.lock:
                    if event.get("event") == "progress":
                        self.progress = event
                    elif event.get("event") == "all_up":
                        self.all_up_events.append(event["unix"])

    def sample(self, phase: str, t0: float) -> dict:
        e = self.engine
        m = e.metrics()
        row = {
            "phase": phase,
            "t_s": round(time.time() - t0, 2),
            "rss_kib": e.rss_kib(),
            "hwm_kib": e.hwm_kib(),
            "clients": metric_sum(m, "strait_clients_connected"),
            "tunnels": metric_sum(m, "strait_tunnels"),
            "refused": sum(metric_by_label(m, "strait_connections_refused_total", "reason").values()),
        }
        with self.lock:
            row["agents_up"] = self.progress.get("up", 0)
        self.timeline.append(row)
        return row

    def wait_all(self, phase: str, t0: float, timeout: float) -> float:
        """Samples every 0.25 s until the engine shows every agent and
        tunnel; the seconds from T0, or a failure after TIMEOUT."""
        last_log = 0.0
        while True:
            if not self.engine.alive():
                raise Failure(f"{phase}: the engine exited; log: {self.engine.proc.tail()}")
            row = self.sample(phase, t0)
            if row["tunnels"] >= self.total and row["clients"] >= self.total:
                log(f"{phase}: all {self.total} tunnels up after {row['t_s']:.1f}s (rss {row['rss_kib']} KiB)")
                return row["t_s"]
            if row["t_s"] > timeout:
                raise Failure(f"{phase}: after {timeout:.0f}s the engine shows {row['tunnels']:.0f} of {self.total} tunnels")
            if row["t_s"] - last_log >= 5:
                last_log = row["t_s"]
                log(f"{phase}: t={row['t_s']:.0f}s tunnels {row['tunnels']:.0f} clients {row['clients']:.0f} "
                    f"rss {row['rss_kib']} KiB refused {row['refused']:.0f}")
            time.sleep(0.25)  # sampling interval; bounded by TIMEOUT above

    def refusals(self) -> dict:
        m = self.engine.metrics()
        return {
            "connections_refused": metric_by_label(m, "strait_connections_refused_total", "reason"),
            "tls_handshake_failures": metric_sum(m, "strait_tls_handshake_failures_total"),
            "auth_failures": metric_sum(m, "strait_auth_failures_total"),
        }

    def forward_errors(self) -> dict[str, int]:
        """What the strait forward processes said on stderr, by kind."""
        kinds: dict[str, int] = {}
        for f in self.forwards:
            f.log.flush()
            for line in f.log_path.read_text(errors="replace").splitlines():
                if not line.startswith("strait: ") or "reconnected, forwarding" in line:
                    continue
                text = re.sub(r"retrying in [\d.]+s|reconnecting in [\d.]+s", "", line[len("strait: "):])
                text = re.sub(r"127\.0\.0\.1:\d+|localhost:\d+", "ENGINE", text)
                text = re.sub(r"[0-9a-f]{24}", "ID", text).strip(" ;")
                kinds[text] = kinds.get(text, 0) + 1
        return kinds

    def agent_errors(self) -> dict:
        with self.lock:
            return dict(self.progress.get("errors", {}))

    def run(self) -> int:
        a = self.args
        self.all_up_events: list[float] = []
        started_at = datetime.datetime.now(datetime.timezone.utc)
        result: dict = {}
        try:
            subprocess.run([str(self.bin / "strait-engine"), "gen-certs", "--host", "localhost", "--out", str(self.certs)],
                           check=True, capture_output=True, timeout=60)
            tokens = [mint(self.bin, f"scale-{p}") for p in range(a.principals)]
            (self.work / "tokens").write_text("\n".join(tokens) + "\n")
            self.engine = Engine(self.work, self.bin, self.certs, self.limits(), log_level=a.engine_log)
            self.engine.start()
            port = self.engine.port
            idle_rss = self.engine.rss_kib()
            log(f"engine pid {self.engine.pid} on 127.0.0.1:{port}, rss {idle_rss} KiB; limits {self.limits()}")
            services = self.spawn("services", [self.bin / "strait-bench", "soak-services"])
            http = services.json_line()["http"]

            # -------- connect all
            t0 = time.time()
            agents = self.spawn("scale-agents", [
                self.bin / "strait-bench", "scale", "--engine", f"localhost:{port}", "--ca", self.certs / "ca.pem",
                "--tokens", self.work / "tokens", "--count", self.inproc, "--sources", a.sources,
                "--source-first", "127.0.0.2", "--report-every", "1",
            ])
            threading.Thread(target=self.read_progress, args=(agents,), daemon=True).start()
            for i in range(a.forwards):
                extra = ["--host", f"fwd-{i}"] if i % 2 == 0 else ["--private", "--name", f"fwd-{i}"]
                argv = [str(self.bin / "strait"), "forward", http, "--engine", f"localhost:{port}", "--ca-file",
                        str(self.certs / "ca.pem"), "--token", tokens[i % len(tokens)], *extra]
                env = {**agent_env(self.work), "STRAIT_LOG": "warn"}
                self.forwards.append(Proc(f"forward-{i}", argv, self.work, None, env=env))
            connect_s = self.wait_all("connect", t0, a.timeout)
            connect_errors = {"agents": self.agent_errors(), "forwards": self.forward_errors()}
            connect_refusals = self.refusals()

            # -------- all connected: memory
            time.sleep(a.settle)  # let the connect burst's buffers go back before reading RSS (pacing, not synchronisation)
            row = self.sample("connected", t0)
            if row["tunnels"] < self.total:
                raise Failure(f"after settling, only {row['tunnels']:.0f} of {self.total} tunnels remain")
            connected = {
                "engine_rss_kib": row["rss_kib"],
                "engine_idle_rss_kib": idle_rss,
                "engine_kib_per_agent": round((row["rss_kib"] - idle_rss) / self.total, 1),
                "engine_hwm_kib": row["hwm_kib"],
                "engine_fds": self.engine.fds(),
                "agents_process_rss_kib": proc_rss_kib(agents.pid),
                "agents_process_kib_per_agent": round(proc_rss_kib(agents.pid) / max(self.inproc, 1), 1),
                "forward_rss_kib_median": sorted(proc_rss_kib(f.pid) for f in self.forwards)[len(self.forwards) // 2] if self.forwards else None,
            }
            log(f"connected: {connected}")
            with self.lock:
                drops_before = self.progress.get("drops", 0)

            # -------- restart
            t1 = time.time()
            code, stop_s = self.engine.stop()
            if code != 0:
                raise Failure(f"the engine exited {code} on SIGTERM")
            log(f"engine stopped in {stop_s:.2f}s (exit {code}); starting again on port {port}")
            self.engine.start(port=port, attempts=40)
            t_ready = time.time()
            log(f"new engine pid {self.engine.pid} ready {t_ready - t1:.2f}s after SIGTERM")
            agents_before = self.agent_errors()
            back_s = self.wait_all("storm", t_ready, a.timeout)
            storm_rows = [r for r in self.timeline if r["phase"] == "storm"]
            storm = {
                "engine_stop_s": round(stop_s, 2),
                "sigterm_to_ready_s": round(t_ready - t1, 2),
                "ready_to_all_back_s": back_s,
                "sigterm_to_all_back_s": round(t_ready - t1 + back_s, 2),
                "peak_rss_kib_sampled": max(r["rss_kib"] for r in storm_rows),
                "engine_hwm_kib": self.engine.hwm_kib(),
                "refusals": self.refusals(),
                "agent_errors": {k: v - agents_before.get(k, 0) for k, v in self.agent_errors().items()
                                 if v - agents_before.get(k, 0)},
                "forward_messages": {k: v - connect_errors["forwards"].get(k, 0) for k, v in self.forward_errors().items()
                                     if v - connect_errors["forwards"].get(k, 0)},
            }
            log(f"storm: {storm}")

            # -------- still up a while later
            time.sleep(a.settle)  # an interval of quiet, then look again
            row = self.sample("after", t_ready)
            with self.lock:
                drops_after = self.progress.get("drops", 0)
            after = {"tunnels": row["tunnels"], "rss_kib": row["rss_kib"],
                     "in_process_drops_after_all_back": drops_after - drops_before - self.inproc}
            if row["tunnels"] < self.total:
                self.failures.append(f"{a.settle:.0f}s after the storm only {row['tunnels']:.0f} of {self.total} tunnels are up")
            result = {
                "connect": {"all_up_s": connect_s, "refusals": connect_refusals, "errors": connect_errors},
                "connected": connected,
                "storm": storm,
                "after": after,
            }
        except Failure as error:
            self.failures.append(str(error))
            log(f"FAILURE: {error}")
        finally:
            self.teardown()
        doc = {
            "date": started_at.isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "commit": git_commit(),
            "machine": machine(),
            "settings": {k: v for k, v in vars(a).items() if k != "out"},
            "engine_limits_raised": self.limits(),
            **result,
            "failures": self.failures,
            "verdict": "fail" if self.failures else "pass",
        }
        (self.out / "scale.json").write_text(json.dumps(doc, indent=1) + "\n")
        with open(self.out / "scale-timeline.csv", "w") as f:
            if self.timeline:
                f.write(",".join(self.timeline[0]) + "\n")
                for r in self.timeline:
                    f.write(",".join(str(v) for v in r.values()) + "\n")
        print(json.dumps({k: doc[k] for k in ("verdict", "failures", *result)}, indent=1), flush=True)
        if self.failures:
            print(f"logs kept in {self.work}", file=sys.stderr)
            return 1
        shutil.rmtree(self.work, ignore_errors=True)
        return 0

    def teardown(self) -> None:
        for f in self.forwards:
            if f.popen.poll() is None:
                f.popen.terminate()
        for f in self.forwards:
            try:
                f.popen.wait(30)
            except subprocess.TimeoutExpired:
                f.popen.kill()
                f.popen.wait()
            f.log.close()
        for proc in reversed(self.procs):
            proc.stop()
        if hasattr(self, "engine") and self.engine.alive():
            try:
                self.engine.stop()
            except Failure as error:
                self.failures.append(str(error))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10_000, help="agents in all, --forwards of them strait forward processes")
    p.add_argument("--forwards", type=int, default=200)
    p.add_argument("--principals", type=int, default=20)
    p.add_argument("--sources", type=int, default=100, help="source addresses of the in-process agents, from 127.0.0.2")
    p.add_argument("--settle", type=float, default=10.0, help="seconds of quiet before the memory reading and after the storm")
    p.add_argument("--timeout", type=float, default=900.0, help="bound on each wait for every tunnel")
    p.add_argument("--engine-log", default="info")
    p.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    p.add_argument("--out", default=str(ROOT / "bench" / "scale-out"))
    a = p.parse_args()
    if a.forwards > a.agents:
        p.error("--forwards cannot exceed --agents")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = a.agents + a.agents // 5 + 2000
    if hard < need:
        p.error(f"the hard limit on open files is {hard}; {a.agents} agents need about {need} (raise it: ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return Scale(a).run()


if __name__ == "__main__":
    sys.exit(main())

"""The engine makes no outbound connection of its own.

It runs in a network namespace that has only a loopback interface (no
route anywhere else), under strace, which records every connect() any of
its threads makes. Inside the same namespace, agents and clients drive
what an operator's engine does all day: `strait doctor` (DNS, both
certificates, the Engine API, private and published round trips with the
agent on TLS and on QUIC), `strait forward` of a published HTTP service
fetched with curl, the metrics endpoint. The trace must show the engine
accepting that work and never calling connect() on an internet socket.
strait has no telemetry exporter, so there is nothing to switch off.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid

import pytest

from conftest import BIN, Engine
from test_interop import strait_env

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def netns():
    name = f"strait-airgap-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    # `ip netns exec` bind-mounts /etc/netns/<name>/hosts over /etc/hosts
    # for what it runs: the names the doctor checks resolve in there only.
    etc = f"/etc/netns/{name}"
    os.makedirs(etc)
    with open(f"{etc}/hosts", "w") as hosts:
        hosts.write("127.0.0.1 localhost strait-doctor.t.localhost\n")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, timeout=30)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=30)
        shutil.rmtree(etc, ignore_errors=True)


def test_the_engine_connects_nowhere_while_it_serves(netns, tmp_path):
    inside = ["ip", "netns", "exec", netns]
    routes = subprocess.run([*inside, "ip", "route", "show"], capture_output=True, text=True, timeout=30)
    assert routes.stdout.strip() == "", f"the namespace has routes: {routes.stdout}"
    trace = tmp_path / "connect.trace"
    engine = Engine(
        tmp_path,
        'metrics: {prometheus: {enabled: true, listen_addr: "127.0.0.1:0"}}\n',
        prefix=[*inside, "strace", "-f", "-qq", "-e", "trace=connect,accept,accept4", "-o", str(trace)],
    )
    service = None
    forward = None
    try:
        env = strait_env(engine)
        doctor = subprocess.run(
            [*inside, BIN / "strait", "doctor", "-o", "json"], env=env, capture_output=True, text=True, timeout=120
        )
        report = json.loads(doctor.stdout)
        assert report["verdict"] == "pass", json.dumps(report, indent=2) + doctor.stderr

        service = subprocess.Popen(
            [*inside, "python3", "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        serving = service.stdout.readline()
        port = re.search(r"port (\d+)", serving)
        assert port, serving
        (tmp_path / "hello.txt").write_text("hello from inside\n")
        forward = subprocess.Popen(
            [*inside, BIN / "strait", "forward", port[1], "--transport", "quic"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = forward.stdout.readline()
        url = re.match(r"Forwarding (https://(\S+?)(?::\d+)?) -> ", line)
        assert url, line + forward.stderr.read(2000) if forward.poll() is not None else line
        host = url[2]
        fetched = subprocess.run(
            [*inside, "curl", "-sS", "--fail", "--cacert", str(engine.ca),
             "--resolve", f"{host}:{engine.port}:127.0.0.1", f"https://{host}:{engine.port}/hello.txt"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert fetched.stdout == "hello from inside\n", fetched.stderr
        metrics = subprocess.run(
            [*inside, "curl", "-sS", "--fail", f"http://{engine.metrics}/metrics"],
            capture_output=True, text=True, timeout=60,
        )
        assert "strait_clients_connected" in metrics.stdout, metrics.stderr
    finally:
        for proc in (forward, service):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
        engine.stop()

    lines = trace.read_text().splitlines()
    accepted = [line for line in lines if re.search(r"\baccept4?\(", line) and not re.search(r"= -1 ", line)]
    # Every agent channel and client connection came in on the TLS port:
    # the doctor's and forward's control channels, dials and requests.
    assert len(accepted) >= 5, "the trace saw the engine accept nothing:\n" + "\n".join(lines[:50])
    outbound = [line for line in lines if "connect(" in line and re.search(r"AF_INET6?\b", line)]
    assert outbound == [], "the engine called connect() on an internet socket:\n" + "\n".join(outbound)

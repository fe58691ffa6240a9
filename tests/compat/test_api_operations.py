"""Operations as the CE runbook does them, against the real binary: curl on
the API and the metrics, the OpenAPI document under a validator and
schemathesis, certificate rotation seen by openssl, check-config, logs, and
SIGTERM in the middle of a transfer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import shutil
import signal
import ssl
import subprocess
import sys

import pytest

from conftest import BIN, SECRET

METRICS_TOKEN = "scrape-token-scrape-token"
METRICS_YAML = (
    f'metrics: {{prometheus: {{enabled: true, listen_addr: "127.0.0.1:0", path: /metrics, '
    f'bearer_token: "{METRICS_TOKEN}"}}}}\n'
)


def verify(engine) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(engine.ca))


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=30)


def title_of(document: str) -> str:
    """`jq -r .info.title`, with Python standing in where jq is missing."""
    if shutil.which("jq"):
        return subprocess.run(
            ["jq", "-r", ".info.title"], input=document, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    return json.loads(document)["info"]["title"]


def test_runbook_curl_on_the_api_and_the_metrics(make_engine):
    engine = make_engine(METRICS_YAML)
    ca = str(engine.ca)
    document = curl("--cacert", ca, engine.api_url("/api/openapi.json"))
    assert document.returncode == 0, document.stderr
    assert title_of(document.stdout) == "strait Engine API"

    token = engine.token("ops")
    tunnels = curl("--cacert", ca, "-H", f"Authorization: Bearer {token}", engine.api_url("/api/tunnels"))
    assert json.loads(tunnels.stdout) == []
    refused = curl("--cacert", ca, "-w", "%{http_code}", "-o", "/dev/null", engine.api_url("/api/tunnels"))
    assert refused.stdout == "401"

    assert engine.metrics is not None
    scrape_url = f"http://{engine.metrics}/metrics"
    no_token = curl("-w", "\n%{http_code}", scrape_url)
    assert no_token.stdout.splitlines()[-1] == "401"
    scraped = curl("-H", f"Authorization: Bearer {METRICS_TOKEN}", scrape_url)
    assert "strait_build_info{" in scraped.stdout
    assert "strait_auth_failures_total 2" in scraped.stdout
    assert curl(engine.api_url("/readyz"), "--cacert", ca).stdout == "ready\n"


def test_non_loopback_metrics_without_a_token_stop_start_up(tmp_path: pathlib.Path):
    subprocess.run([BIN / "strait-engine", "gen-certs", "--out", tmp_path], check=True, capture_output=True, timeout=60)
    config = tmp_path / "engine.yaml"
    config.write_text(
        "engine: {host: localhost, log_level: info}\n"
        'tls: {enabled: true, listen_addr: "127.0.0.1:0"}\n'
        f'certs: {{static: {{enabled: true, cert_file: "{tmp_path / "cert.pem"}", key_file: "{tmp_path / "key.pem"}"}}}}\n'
        f'auth: {{jwt: {{enabled: true, token_jwt_secret: "{SECRET}"}}}}\n'
        'metrics: {prometheus: {enabled: true, listen_addr: "0.0.0.0:0"}}\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")}
    done = subprocess.run(
        [BIN / "strait-engine", "-c", config, "--print-ready"], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert "metrics.prometheus.bearer_token" in done.stderr


def test_openapi_document_validates(engine):
    # Installed by scripts/test.sh (tests/compat/requirements.txt): a missing
    # validator is a broken setup, never a skip.
    import httpx
    import openapi_spec_validator as validator

    document = httpx.get(engine.api_url("/api/openapi.json"), verify=verify(engine)).json()
    validator.validate(document)
    assert document["openapi"].startswith("3.1")


# Its own 600 s bound on schemathesis comes first.
@pytest.mark.timeout(660)
async def test_schemathesis_finds_no_server_error_and_no_schema_break(engine, echo_port):
    st = pathlib.Path(sys.executable).parent / "st"
    assert st.exists(), "schemathesis is missing: run scripts/test.sh"
    async with engine.client("alice") as agent:
        # Live objects, so the list operations return real data.
        control = await agent.connect()
        await control.create_tunnel(name="db", publish=False, labels={"team": "core"})
        await control.create_tunnel(publish=False)
        process = await asyncio.create_subprocess_exec(
            str(st), "run", engine.api_url("/api/openapi.json"),
            "--tls-verify", str(engine.ca),
            "-H", f"Authorization: Bearer {engine.token('ops')}",
            # The watches never end by design; test_api.py covers them.
            "--exclude-path", "/api/sse",
            "--exclude-path", "/api/websocket",
            "--checks", "all",
            "--max-examples", "30",
            "--request-timeout", "10",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=engine.tmp,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(process.communicate(), 600)
        await control.close()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "5xx" not in text.split("SUMMARY")[-1], text


def fingerprint(pem: str) -> str:
    return subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256"],
        input=pem,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()


def served_fingerprint(engine) -> str:
    hello = subprocess.run(
        ["openssl", "s_client", "-connect", engine.addr, "-servername", "localhost"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    return fingerprint(hello.stdout)


def test_certificate_rotation_seen_by_openssl(make_engine):
    engine = make_engine(METRICS_YAML)
    folder = engine.tmp
    before = served_fingerprint(engine)
    assert before == fingerprint((folder / "cert.pem").read_text())

    # The runbook: write the new pair beside the old, then rename into place.
    staging = folder / "staging"
    staging.mkdir()
    for name in ("ca.pem", "ca-key.pem"):
        shutil.copy(folder / name, staging / name)
    subprocess.run([BIN / "strait-engine", "gen-certs", "--out", staging], check=True, capture_output=True, timeout=60)
    os.replace(staging / "key.pem", folder / "key.pem")
    os.replace(staging / "cert.pem", folder / "cert.pem")
    after = served_fingerprint(engine)
    assert after != before
    assert after == fingerprint((folder / "cert.pem").read_text())

    (staging / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
    os.replace(staging / "broken.pem", folder / "cert.pem")
    assert served_fingerprint(engine) == after
    scraped = curl("-H", f"Authorization: Bearer {METRICS_TOKEN}", f"http://{engine.metrics}/metrics").stdout
    assert "strait_certificate_reloads_total 1" in scraped
    assert "strait_certificate_reload_failures_total 1" in scraped


def run_check(config: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")}
    return subprocess.run(
        [BIN / "strait-engine", "-c", config, "check-config", *extra],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def make_ca_signed_pair(folder: pathlib.Path, host: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A CA that is not the development one, and a leaf for host and *.t.host."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder, timeout=60)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "root-key.pem", "-out", "root.pem", "-days", "30", "-subj", "/CN=Example Root")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "key.pem", "-out", "leaf.csr", "-subj", f"/CN={host}")
    (folder / "ext.cnf").write_text(f"subjectAltName=DNS:{host},DNS:*.t.{host}\n")
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "root.pem", "-CAkey", "root-key.pem", "-CAcreateserial",
            "-out", "cert.pem", "-days", "30", "-extfile", "ext.cnf")  # fmt: skip
    os.chmod(folder / "key.pem", 0o600)
    return folder / "cert.pem", folder / "key.pem"


def test_check_config_development_and_production(tmp_path: pathlib.Path):
    subprocess.run([BIN / "strait-engine", "gen-certs", "--out", tmp_path], check=True, capture_output=True, timeout=60)
    config = tmp_path / "dev.yaml"
    config.write_text(
        "engine: {host: localhost, log_level: info}\n"
        'tls: {enabled: true, listen_addr: ":443"}\n'
        f'certs: {{static: {{enabled: true, cert_file: "{tmp_path / "cert.pem"}", key_file: "{tmp_path / "key.pem"}"}}}}\n'
        'auth: {jwt: {enabled: true, token_jwt_secret: "<secret>"}}\n'
        'metrics: {prometheus: {enabled: true, listen_addr: "127.0.0.1:9090"}}\n'
    )
    relaxed = run_check(config)
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr
    assert "warning: auth.jwt.token_jwt_secret" in relaxed.stdout
    strict = run_check(config, "--production")
    assert strict.returncode == 1, strict.stdout
    for field in ("auth.jwt.token_jwt_secret", "certs.static.cert_file", "metrics.prometheus.bearer_token"):
        assert f"error: {field}" in strict.stdout, strict.stdout
    assert "<secret>" not in strict.stdout

    # The same file for another host: the certificate does not cover it.
    other = tmp_path / "other.yaml"
    other.write_text(config.read_text().replace("host: localhost", "host: edge.example.com"))
    assert "does not cover edge.example.com" in run_check(other).stdout

    prod_dir = tmp_path / "prod"
    prod_dir.mkdir()
    cert, key = make_ca_signed_pair(prod_dir, "edge.example.com")
    good = prod_dir / "engine.yaml"
    good.write_text(
        "engine: {host: edge.example.com, log_level: info}\n"
        'tls: {enabled: true, listen_addr: ":443"}\n'
        f'certs: {{static: {{enabled: true, cert_file: "{cert}", key_file: "{key}"}}}}\n'
        f'auth: {{jwt: {{enabled: true, token_jwt_secret: "{"k" * 64}"}}}}\n'
        f'metrics: {{prometheus: {{enabled: true, listen_addr: ":9090", bearer_token: "{METRICS_TOKEN}"}}}}\n'
    )
    passed = run_check(good, "--production")
    # Thirty days left: fine, and no warning about expiry either.
    assert passed.returncode == 0, passed.stdout
    assert "configuration OK" in passed.stdout
    assert "k" * 64 not in passed.stdout and METRICS_TOKEN not in passed.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: {host: localhost}\n")
    assert run_check(bad).returncode == 2


async def test_logs_name_each_lifecycle_step_and_no_secret(make_engine):
    engine = make_engine(METRICS_YAML, env={"RSTREAM_ENGINE_ENGINE__LOG_FORMAT": "json"})
    token = engine.token("alice")
    async with engine.client(token=token) as agent:
        control = await agent.connect()
        tunnel = await control.create_tunnel(name="logged", publish=False)
        await control.close_tunnel(tunnel.id)
        await control.close()
    async with engine.client(token=engine.token("mallory", secret="wrong-secret-wrong-secret-wrong")) as bad:
        with pytest.raises(Exception):
            await bad.connect()
    import httpx

    httpx.get(engine.api_url(f"/api/sse?rstream.token={token}x"), verify=verify(engine))
    curl("-H", "Authorization: Bearer wrong-metrics-token", f"http://{engine.metrics}/metrics")
    engine.stop()
    text = engine.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    messages = [line["fields"]["message"] for line in lines]
    for wanted in ("client connected", "tunnel opened", "tunnel closed", "client disconnected",
                   "control channel refused", "API request refused", "metrics scrape refused"):  # fmt: skip
        assert wanted in messages, messages
    for secret in (SECRET, token, METRICS_TOKEN, "wrong-metrics-token"):
        assert secret not in text


async def test_sigterm_during_a_transfer_completes_it_and_exits_zero(engine, echo_port):
    size = 8 * 1024 * 1024
    chunk = 64 * 1024
    payload = os.urandom(size)
    async with engine.client("alice") as agent, engine.client("alice") as dialer:
        control = await agent.connect()
        tunnel = await control.create_tunnel(name="echo", publish=False)
        forward = asyncio.create_task(tunnel.forward_to("127.0.0.1", echo_port))
        stream = await dialer.dial("echo")
        first_mib = asyncio.Event()
        received = hashlib.sha256()

        async def download() -> None:
            got = 0
            while got < size:
                data = await stream.read(min(chunk * 4, size - got))
                assert data, f"stream ended after {got} bytes"
                received.update(data)
                got += len(data)
                if got >= 1024 * 1024:
                    first_mib.set()

        reader = asyncio.create_task(download())
        # Half the payload first, then SIGTERM once a MiB came back, then the rest.
        for offset in range(0, size // 2, chunk):
            stream.write(payload[offset : offset + chunk])
            await stream.drain()
        await asyncio.wait_for(first_mib.wait(), 30)
        engine.proc.send_signal(signal.SIGTERM)
        for offset in range(size // 2, size, chunk):
            stream.write(payload[offset : offset + chunk])
            await stream.drain()
        await asyncio.wait_for(reader, 60)
        assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
        stream.close()
        code = await asyncio.to_thread(engine.proc.wait, 30)
        forward.cancel()
    assert code == 0, engine.log()
    log = engine.log()
    assert "draining" in log and "stopped" in log, log

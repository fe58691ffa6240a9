"""The official Python SDK's own real-engine test file, run unchanged
against strait: tests/e2e/test_real_engine.py from the source distribution
of the pinned rstreamlabs-rstream (scripts/venv.sh fetches it into
.venv/sdist), in a pytest subprocess, with every gate the engine can
satisfy set.

The gates the file reads, and what each needs:

- RSTREAM_PYTHON_E2E=1, RSTREAM_PYTHON_E2E_ENGINE, _TOKEN, _CA_FILE: the
  engine address, an agent token, and the CA that signed the engine's
  certificate (the engine is `localhost:<port>`, which its certificate
  names, so RSTREAM_PYTHON_E2E_SERVER_NAME is not needed). Private
  bytestream matrix and private WSGI tunnel.
- RSTREAM_PYTHON_E2E_PUBLISHED=1: published HTTP and ASGI tunnels, fetched
  at the tunnel's `https://<label>.t.localhost:<port>` (certificate not
  checked by the file itself). Names under .localhost have no DNS here:
  the subprocess loads loopback_names.py, which resolves them to
  127.0.0.1.
- RSTREAM_PYTHON_E2E_PUBLISHED_TCP=1 with
  RSTREAM_PYTHON_E2E_PUBLISHED_CONNECT_HOST=127.0.0.1: a published TCP
  tunnel (the engine's tcp section on); the file connects to
  CONNECT_HOST:<port> instead of the returned hostname.
- RSTREAM_PYTHON_E2E_ENGINE_API=1: lists clients and tunnels through the
  Engine API with the same token and CA.

Left unset on purpose:

- RSTREAM_PYTHON_E2E_TLS_INSECURE: the CA is given, so the engine's
  certificate is checked, which is the stronger test.
- RSTREAM_PYTHON_E2E_SERVER_NAME: the engine's name is already the one its
  certificate carries.
- RSTREAM_PYTHON_E2E_CERT_FILE / _KEY_FILE: a client certificate for
  engines behind mutual TLS; strait authenticates agents by their token,
  and the file only passes these to TLSOptions.

With all of those, the file has no test left to skip.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT
from test_published_ports import PORTS_YAML

HERE = pathlib.Path(__file__).resolve().parent


def sdk_version() -> str:
    for line in (HERE / "requirements.txt").read_text().splitlines():
        if line.startswith("rstreamlabs-rstream=="):
            return line.split("==", 1)[1].strip()
    raise RuntimeError("rstreamlabs-rstream is not pinned in requirements.txt")


SDIST = ROOT / ".venv" / "sdist" / f"rstreamlabs_rstream-{sdk_version()}"
E2E = SDIST / "tests" / "e2e" / "test_real_engine.py"

# Every test the file holds (0.7.0), so a test added or renamed upstream
# shows here rather than passing unnoticed.
EXPECTED = {
    "test_real_engine_certificate_http_inventory",
    "test_real_engine_private_bytestream_matrix",
    "test_real_engine_published_http_tunnel",
    "test_real_engine_published_tcp_tunnel",
    "test_real_engine_private_wsgi_tunnel",
    "test_real_engine_published_asgi_tunnel",
}
# Tests allowed to skip, each with the reason (none: every gate is set).
DOCUMENTED_SKIPS: dict[str, str] = {}

# The file's own run takes ~10 s (one 2.2 s heartbeat pause); the rest is
# headroom for a loaded machine.
RUN_DEADLINE = 240


@pytest.mark.timeout(RUN_DEADLINE + 60)
def test_the_sdks_real_engine_tests_pass_against_strait(make_engine, tmp_path):
    assert E2E.is_file(), f"{E2E} is missing: scripts/venv.sh fetches the SDK's sdist"
    engine = make_engine(PORTS_YAML)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")}
    env.update(
        RSTREAM_PYTHON_E2E="1",
        RSTREAM_PYTHON_E2E_ENGINE=engine.engine,
        RSTREAM_PYTHON_E2E_TOKEN=engine.token("sdk-e2e"),
        RSTREAM_PYTHON_E2E_CA_FILE=str(engine.ca),
        RSTREAM_PYTHON_E2E_PUBLISHED="1",
        RSTREAM_PYTHON_E2E_PUBLISHED_TCP="1",
        RSTREAM_PYTHON_E2E_PUBLISHED_CONNECT_HOST="127.0.0.1",
        RSTREAM_PYTHON_E2E_ENGINE_API="1",
        # loopback_names.py, loaded with -p.
        PYTHONPATH=os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]),
        HOME=str(tmp_path),
    )
    junit = tmp_path / "junit.xml"
    try:
        done = subprocess.run(
            [
                sys.executable, "-m", "pytest", str(E2E), "-p", "loopback_names", "-p", "no:cacheprovider",
                "--rootdir", str(SDIST), "-c", str(SDIST / "pyproject.toml"), "-o", "timeout=60",
                "-q", "-rA", f"--junitxml={junit}",
            ],
            cwd=SDIST, env=env, capture_output=True, text=True, timeout=RUN_DEADLINE,
        )  # fmt: skip
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(f"the SDK's tests did not finish in {RUN_DEADLINE}s:\n{hung.stdout}\n{hung.stderr}") from None
    report = f"{done.stdout}\n{done.stderr}\nengine log (tail):\n{engine.log()[-6000:]}"
    assert junit.is_file(), report

    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        outcomes[case.get("name")] = kinds.pop() if kinds else "passed"
    assert set(outcomes) == EXPECTED, f"{sorted(outcomes)}\n{report}"
    failed = {name: kind for name, kind in outcomes.items() if kind in ("failure", "error")}
    assert not failed, f"{failed}\n{report}"
    skipped = {name for name, kind in outcomes.items() if kind == "skipped"}
    assert skipped <= set(DOCUMENTED_SKIPS), f"undocumented skips {sorted(skipped - set(DOCUMENTED_SKIPS))}\n{report}"
    assert done.returncode == 0, report

"""README.md's quickstart, run exactly as printed there."""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import subprocess
import time

import pytest

from conftest import ROOT

# The release build is done by scripts/test.sh before this suite runs, so
# the command only starts the engine; a cold build would take minutes.
DEADLINE = 300.0


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_has_two_commands_and_ci_runs_the_second():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, f"{commands[1]!r} is not what .ci/run runs:\n{ci}"


def _lines_until(proc: subprocess.Popen, wanted: str, seen: list[str]) -> str:
    # Raw reads on the pipe: a buffered readline would hide lines from select.
    fd = proc.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    end = time.monotonic() + DEADLINE
    pending = b""
    while time.monotonic() < end:
        if not selector.select(timeout=end - time.monotonic()):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            seen.append(line + "\n")
            if line.strip().startswith(wanted):
                return line.strip()
    raise AssertionError(f"no line starting with {wanted!r}; output was:\n{''.join(seen)}")


# Its own deadlines (the ready line, curl, the exit) come first.
@pytest.mark.timeout(DEADLINE + 180)
def test_the_first_command_serves_a_demo_a_printed_curl_reaches(tmp_path):
    command = quickstart_commands()[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RSTREAM_", "XDG_STATE_HOME", "STRAIT_"))}
    # A fresh user: the development CA and secret land in this state folder
    # (HOME stays, so cargo and rustup find their toolchain).
    env["XDG_STATE_HOME"] = str(tmp_path)
    log = open(tmp_path / "engine.log", "wb")
    proc = subprocess.Popen(
        shlex.split(command), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=log, start_new_session=True,
    )  # fmt: skip
    seen: list[str] = []
    try:
        curl = _lines_until(proc, "curl ", seen)
        # Run it as a user would paste it.
        done = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, f"{curl}\n{done.stderr}"
        assert "Hello from strait!" in done.stdout, done.stdout
        assert "forwarded proto: https" in done.stdout, done.stdout
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "engine.log").read_text(errors="replace")

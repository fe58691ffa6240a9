"""The strait CLI and the reference SDK, each on one side of a tunnel."""

from __future__ import annotations

import asyncio
import os

from conftest import BIN
from test_protocol import roundtrip, serve


def strait_env(engine, sub: str = "alice") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")}
    env.update(
        RSTREAM_ENGINE=engine.engine,
        RSTREAM_AUTHENTICATION_TOKEN=engine.token(sub),
        SSL_CERT_FILE=str(engine.ca),
        HOME=str(engine.tmp),
    )
    return env


async def test_sdk_publishes_and_strait_dial_connects(engine, echo_port):
    async with engine.client() as agent:
        control = await agent.connect()
        tunnel = await control.create_tunnel(name="sdk-side", publish=False)
        forward = await serve(tunnel, echo_port)
        dial = await asyncio.create_subprocess_exec(
            BIN / "strait",
            "dial",
            "sdk-side",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=strait_env(engine),
        )
        payload = os.urandom(256 * 1024)
        # As an interactive user (or ssh) does: stdin stays open while the
        # answer arrives. The SDK's forward_to closes both directions of
        # the local connection when the stream half-closes, so closing
        # stdin first would cut the echo short.
        dial.stdin.write(payload)
        await dial.stdin.drain()
        out = await asyncio.wait_for(dial.stdout.readexactly(len(payload)), 60)
        dial.stdin.close()
        assert await asyncio.wait_for(dial.wait(), 30) == 0, (await dial.stderr.read()).decode()
        assert out == payload
        forward.cancel()
        await control.close()


async def test_strait_forward_publishes_and_the_sdk_dials(engine, echo_port):
    forward = await asyncio.create_subprocess_exec(
        BIN / "strait",
        "forward",
        str(echo_port),
        "--private",
        "--name",
        "rust-side",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=strait_env(engine),
    )
    try:
        line = (await asyncio.wait_for(forward.stdout.readline(), 30)).decode()
        assert line.startswith("Forwarding rstrm://rust-side"), line
        for zero_rtt in (True, False):
            async with engine.client(zero_rtt=zero_rtt) as dialer:
                stream = await dialer.dial("rust-side")
                payload = b"sdk to strait, zero_rtt=%d" % zero_rtt
                assert await roundtrip(stream, payload) == payload
                stream.close()
    finally:
        forward.send_signal(2)
        assert await asyncio.wait_for(forward.wait(), 30) == 0

"""The agent protocol against the official rstream Python SDK (0.7.0)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time

import pytest
import rstream.config
from rstream.errors import EngineError

UNAUTHORIZED = 1000
TUNNEL_NOT_FOUND = 3000


async def roundtrip(stream, payload: bytes) -> bytes:
    stream.write(payload)
    await stream.drain()
    return await stream.readexactly(len(payload))


async def serve(tunnel, port: int) -> asyncio.Task:
    return asyncio.create_task(tunnel.forward_to("127.0.0.1", port))


async def test_connect_reports_server_details(engine):
    async with engine.client() as client:
        control = await client.connect()
        assert control.server_details is not None
        assert control.server_details.agent == "strait-engine"
        await control.close()


async def test_private_tunnel_properties_are_complete(engine):
    async with engine.client() as client:
        control = await client.connect()
        tunnel = await control.create_tunnel(name="db", publish=False, labels={"team": "core", "x.y/z": ""})
        props = tunnel.properties
        assert props.id and len(props.id) == 24
        assert props.creation_date is not None
        assert props.name == "db"
        assert props.type == "bytestream"
        assert props.publish is False
        assert props.labels == {"team": "core", "x.y/z": ""}
        assert tunnel.forwarding_address == "rstrm://db (unpublished)"
        await control.close()


@pytest.mark.parametrize("zero_rtt", [True, False])
async def test_dial_by_name_and_by_id(engine, echo_port, zero_rtt):
    async with engine.client() as agent, engine.client(zero_rtt=zero_rtt) as dialer:
        control = await agent.connect()
        tunnel = await control.create_tunnel(name="echo", publish=False)
        forward = await serve(tunnel, echo_port)
        for target in ("echo", tunnel.id):
            stream = await dialer.dial(target)
            assert await roundtrip(stream, b"ping " + target.encode()) == b"ping " + target.encode()
            stream.close()
        forward.cancel()
        await control.close()


async def test_five_concurrent_dials(engine, echo_port):
    async with engine.client() as agent, engine.client() as dialer:
        control = await agent.connect()
        tunnel = await control.create_tunnel(name="echo", publish=False)
        forward = await serve(tunnel, echo_port)

        async def one(i: int) -> bool:
            payload = os.urandom(100_000 + i)
            stream = await dialer.dial("echo")
            ok = await roundtrip(stream, payload) == payload
            stream.close()
            return ok

        assert await asyncio.gather(*(one(i) for i in range(5))) == [True] * 5
        forward.cancel()
        await control.close()


async def test_sixteen_mib_each_way_with_checksum(engine, echo_port):
    size = 16 * 1024 * 1024
    payload = os.urandom(size)
    async with engine.client() as agent, engine.client() as dialer:
        control = await agent.connect()
        tunnel = await control.create_tunnel(name="bulk", publish=False)
        forward = await serve(tunnel, echo_port)
        stream = await dialer.dial("bulk")

        async def upload() -> None:
            view = memoryview(payload)
            for offset in range(0, size, 256 * 1024):
                stream.write(view[offset : offset + 256 * 1024])
                await stream.drain()

        up = asyncio.create_task(upload())
        received = await stream.readexactly(size)
        await up
        assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
        stream.close()
        forward.cancel()
        await control.close()


async def test_second_client_dials_first_clients_tunnel(engine, echo_port):
    # A second client of the same principal dials by id; another principal
    # hears what a missing tunnel gets, by id and by name.
    async with engine.client("alice") as alice, engine.client("alice") as laptop, \
            engine.client("bob", zero_rtt=False) as bob:
        control = await alice.connect()
        tunnel = await control.create_tunnel(name="shared", publish=False)
        forward = await serve(tunnel, echo_port)
        stream = await laptop.dial(tunnel.id)
        assert await roundtrip(stream, b"from alice's laptop") == b"from alice's laptop"
        stream.close()
        for target in (tunnel.id, "shared"):
            with pytest.raises(EngineError) as refused:
                await bob.dial(target)
            assert refused.value.engine_code == TUNNEL_NOT_FOUND
        forward.cancel()
        await control.close()


async def test_tunnel_close_then_control_close(engine, echo_port):
    async with engine.client() as agent, engine.client(zero_rtt=False) as dialer:
        control = await agent.connect()
        first = await control.create_tunnel(name="first", publish=False)
        second = await control.create_tunnel(name="second", publish=False)
        await first.close()
        assert first.closed
        with pytest.raises(EngineError) as refused:
            await dialer.dial("first")
        assert refused.value.engine_code == TUNNEL_NOT_FOUND
        await control.close()
        assert control.closed and second.closed
        with pytest.raises(EngineError) as refused:
            await dialer.dial(second.id)
        assert refused.value.engine_code == TUNNEL_NOT_FOUND


async def test_dial_to_missing_tunnel_in_both_modes(engine):
    async with engine.client(zero_rtt=False) as explicit:
        with pytest.raises(EngineError) as refused:
            await explicit.dial("missing")
        assert refused.value.engine_code == TUNNEL_NOT_FOUND
    async with engine.client(zero_rtt=True) as silent:
        stream = await silent.dial("missing")
        # Zero-RTT: the engine signals the error by closing.
        assert await stream.read(1) == b""
        stream.close()


async def test_liveness_negotiated_and_acknowledged_over_many_intervals(engine):
    # The SDK's smallest interval is one second.
    interval = 1.0
    async with engine.client(heartbeat_interval=interval) as client:
        control = await client.connect()
        # The SDK validated the engine's policy on connect; now watch it
        # acknowledge heartbeats for more than three intervals.
        assert control._heartbeat_timeout >= interval
        while control._heartbeat_acknowledgement < 4:
            assert not control.closed, "channel dropped while heartbeating"
            await asyncio.sleep(interval / 4)
        assert not control.closed
        await control.close()


def _b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("kind", ["bad", "expired", "none-alg", "wrong-secret"])
async def test_bad_tokens_are_unauthorized(engine, kind, monkeypatch):
    if kind == "expired":
        # The SDK refuses to send a token it can see has expired; switch that
        # check off so the engine's own expiry check is what answers.
        monkeypatch.setattr(rstream.config, "_validate_token_expiry", lambda token: None)
    if kind == "bad":
        token = "not-a-jwt"
    elif kind == "expired":
        token = engine.token(exp=int(time.time()) - 600)
    elif kind == "wrong-secret":
        token = engine.token(secret="another-secret-another-secret-another")
    else:
        token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': 'alice'})}."
    async with engine.client(token=token) as client:
        with pytest.raises(EngineError) as refused:
            await client.connect()
        assert refused.value.engine_code == UNAUTHORIZED
    # The engine keeps serving everyone else.
    async with engine.client() as good:
        control = await good.connect()
        await control.close()

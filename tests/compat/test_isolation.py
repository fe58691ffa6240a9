"""Tenants kept apart, with the official rstream Python SDK as every
principal: lists, watches, dials and published hostnames reach only their
owner's objects; an operator token (`strait_admin`) sees them all."""

from __future__ import annotations

import asyncio

import pytest
from rstream.errors import EngineError

INVALID_REQUEST = 2000
TUNNEL_NOT_FOUND = 3000


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, who: bytes) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(who), who))
    await writer.drain()
    writer.close()


@pytest.fixture
async def site():
    """A local HTTP service answering with the name it was started for."""
    servers = []

    async def start(who: bytes) -> int:
        server = await asyncio.start_server(lambda r, w: _answer(r, w, who), "127.0.0.1", 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()


async def test_lists_and_watches_show_only_the_callers_objects(engine):
    async with engine.client("alice") as alice, engine.client("bob") as bob, engine.admin("ops") as ops:
        a = await alice.connect()
        b = await bob.connect()
        mine = await a.create_tunnel(name="mine", publish=False)
        theirs = await b.create_tunnel(name="theirs", publish=False)

        assert [t.properties.id for t in await alice.list_tunnels()] == [mine.id]
        assert [c["user_id"] for c in await alice.list_clients()] == ["alice"]
        assert sorted(t.properties.id for t in await ops.list_tunnels()) == sorted([mine.id, theirs.id])

        async with alice.watch(transport="websocket") as events:
            initial = await asyncio.wait_for(events.__anext__(), 10)
            assert [t["id"] for t in initial.object["tunnels"]] == [mine.id]
            await b.create_tunnel(name="later", publish=False)
            await a.create_tunnel(name="mine-too", publish=False)
            event = await asyncio.wait_for(events.__anext__(), 10)
            assert event.type == "tunnel.created"
            assert event.object["name"] == "mine-too", "bob's tunnel.created is not alice's to see"
        await a.close()
        await b.close()


async def test_a_published_hostname_outlives_its_agent_for_its_owner(engine, site):
    alice_port = await site(b"alice")
    host = "shop.t.localhost"
    async with engine.public_client() as public:
        async with engine.client("alice") as alice:
            control = await alice.connect()
            tunnel = await control.create_tunnel(publish=True, hostname=host)
            forward = asyncio.create_task(tunnel.forward_to("127.0.0.1", alice_port))
            assert (await public.get(engine.url(host))).text == "alice"
            forward.cancel()
            await control.close()

        # Offline: the URL says so, and bob cannot take the name.
        offline = await public.get(engine.url(host))
        assert (offline.status_code, offline.text) == (503, "agent offline\n")
        async with engine.client("bob") as bob:
            control = await bob.connect()
            with pytest.raises(EngineError) as refused:
                await control.create_tunnel(publish=True, hostname=host)
            assert refused.value.engine_code == INVALID_REQUEST
            assert "reserved for another principal" in str(refused.value)
            await control.close()

        # Alice is back: the same URL, hers again.
        async with engine.client("alice") as alice:
            control = await alice.connect()
            tunnel = await control.create_tunnel(publish=True, hostname=host)
            forward = asyncio.create_task(tunnel.forward_to("127.0.0.1", alice_port))
            assert (await public.get(engine.url(host))).text == "alice"
            forward.cancel()
            await control.close()


async def test_another_principals_tunnel_is_missing_by_id(engine, echo_port):
    async with engine.client("alice") as alice, engine.client("mallory", zero_rtt=False) as mallory:
        control = await alice.connect()
        tunnel = await control.create_tunnel(name="db", publish=False)
        with pytest.raises(EngineError) as by_id:
            await mallory.dial(tunnel.id)
        with pytest.raises(EngineError) as missing:
            await mallory.dial("000000000000000000000000")
        assert by_id.value.engine_code == missing.value.engine_code == TUNNEL_NOT_FOUND
        await control.close()

"""The Engine API against the official rstream Python SDK (0.7.0): the
inventory with filters, and watches over SSE and WebSocket."""

from __future__ import annotations

import asyncio

import pytest
from rstream import ClientFilters, TunnelFilters

# The most one expected event may take to arrive; only a broken engine
# reaches it.
EVENT_DEADLINE = 10.0


async def next_event(stream, wanted: str):
    """The next event of type `wanted`, skipping none: events arrive in order."""
    event = await asyncio.wait_for(stream.__anext__(), EVENT_DEADLINE)
    assert event.type == wanted, f"expected {wanted}, got {event.type}: {event.raw}"
    return event


async def test_list_clients_and_tunnels_with_filters(engine):
    async with engine.client("alice") as alice, engine.client("bob") as bob, engine.admin("ops") as ops:
        a = await alice.connect()
        b = await bob.connect()
        await a.create_tunnel(name="a-core", publish=False, labels={"team": "core", "env": "prod"})
        await a.create_tunnel(name="a-edge", publish=False, labels={"team": "edge"})
        await b.create_tunnel(name="b-none", publish=False, labels={"env": "dev"})

        clients = await ops.list_clients()
        assert sorted(c["user_id"] for c in clients) == ["alice", "bob"]
        assert all(c["status"] == "online" and len(c["id"]) == 24 for c in clients)
        only_bob = await ops.list_clients(filters=ClientFilters(user_id="bob"))
        assert [c["user_id"] for c in only_bob] == ["bob"]
        assert len(await ops.list_clients(limit=1)) == 1

        every = await ops.list_tunnels()
        assert sorted(t.properties.name for t in every) == ["a-core", "a-edge", "b-none"]
        assert all(t.status == "online" and t.client_id for t in every)
        any_team = await ops.list_tunnels(filters=TunnelFilters(labels={"team": None}))
        assert sorted(t.properties.name for t in any_team) == ["a-core", "a-edge"]
        core = await ops.list_tunnels(filters=TunnelFilters(labels={"team": "core", "env": None}))
        assert [t.properties.name for t in core] == ["a-core"]
        assert core[0].properties.labels == {"team": "core", "env": "prod"}
        assert core[0].properties.creation_date is not None
        bob_id = only_bob[0]["id"]
        by_name = await ops.list_tunnels(filters=TunnelFilters(name="b-none", publish=False, type="bytestream"))
        assert [t.client_id for t in by_name] == [bob_id]
        by_client = await ops.list_tunnels(filters=TunnelFilters(client_id=bob_id, user_id="bob"))
        assert [t.properties.name for t in by_client] == ["b-none"]
        assert await ops.list_tunnels(filters=TunnelFilters(status="offline")) == []
        assert len(await ops.list_tunnels(limit=2)) == 2
        await a.close()
        await b.close()


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_watch_sees_snapshot_and_each_lifecycle_event(engine, transport):
    async with engine.client("alice") as alice, engine.client("carol") as carol, engine.admin("ops") as ops:
        first = await alice.connect()
        existing = await first.create_tunnel(name="existing", publish=False, labels={"team": "core"})
        async with ops.watch(transport=transport) as events:
            initial = await next_event(events, "state.initial")
            snapshot = initial.object
            assert [c["user_id"] for c in snapshot["clients"]] == ["alice"]
            assert [t["id"] for t in snapshot["tunnels"]] == [existing.id]
            assert initial.created_at and initial.id

            second = await carol.connect()
            created = await next_event(events, "client.created")
            assert created.user_id == "carol"
            assert created.object["user_id"] == "carol"
            carol_id = created.object["id"]

            tunnel = await second.create_tunnel(name="new", publish=False, labels={"team": "edge"})
            opened = await next_event(events, "tunnel.created")
            assert opened.object["id"] == tunnel.id
            assert opened.object["labels"] == {"team": "edge"}
            assert opened.object["status"] == "online"
            assert opened.object["client_id"] == carol_id

            await second.close_tunnel(tunnel.id)
            closed = await next_event(events, "tunnel.deleted")
            assert closed.object["id"] == tunnel.id
            assert closed.object["status"] == "offline"

            await second.close()
            gone = await next_event(events, "client.deleted")
            assert gone.object["id"] == carol_id
            assert gone.object["status"] == "offline"
        await first.close()


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_watch_filters_apply_server_side(engine, transport):
    async with engine.client("alice") as alice, engine.admin("ops") as ops:
        control = await alice.connect()
        await control.create_tunnel(name="edge-1", publish=False, labels={"team": "edge"})
        await control.create_tunnel(name="core-1", publish=False, labels={"team": "core"})
        watch = ops.watch(
            tunnels=TunnelFilters(labels={"team": "core"}),
            clients=ClientFilters(user_id="nobody"),
            transport=transport,
        )
        async with watch as events:
            initial = await next_event(events, "state.initial")
            assert initial.object["clients"] == []
            assert [t["name"] for t in initial.object["tunnels"]] == ["core-1"]
            # Neither the new client nor the edge tunnel passes.
            other = await alice.connect()
            await other.create_tunnel(name="edge-2", publish=False, labels={"team": "edge"})
            core = await other.create_tunnel(name="core-2", publish=False, labels={"team": "core"})
            event = await next_event(events, "tunnel.created")
            assert event.object["id"] == core.id
            await other.close()
        await control.close()


async def test_websocket_query_token_and_the_close_reason_on_shutdown(engine):
    import json
    import ssl
    from urllib.parse import quote

    import websockets

    context = ssl.create_default_context(cafile=str(engine.ca))
    context.set_alpn_protocols(["http/1.1"])
    url = f"wss://localhost:{engine.port}/api/websocket?rstream.token={quote(engine.token('ops'))}"
    async with websockets.connect(url, ssl=context) as socket:
        initial = json.loads(await asyncio.wait_for(socket.recv(), EVENT_DEADLINE))
        assert initial["type"] == "state.initial"
        assert initial["object"] == {"snapshot_at": initial["object"]["snapshot_at"], "clients": [], "tunnels": []}
        engine.proc.terminate()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), EVENT_DEADLINE)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "engine shutting down")
    assert await asyncio.to_thread(engine.proc.wait, 30) == 0


async def test_websocket_refuses_a_bad_token(engine):
    import ssl

    import websockets

    context = ssl.create_default_context(cafile=str(engine.ca))
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"wss://localhost:{engine.port}/api/websocket?rstream.token=nope", ssl=context):
            pass
    assert refused.value.response.status_code == 401

"""The three workloads of spec/workloads.md, played end to end through a
published tunnel with small stand-in services and the rstream SDK agent.

- Keystone (live streaming): WHIP `POST application/sdp` answered `201`
  with `Location`, then trickle-ICE `PATCH` with `If-Match`, then `DELETE`,
  behind a CORS preflight that exposes `Location`; the workload's own
  `Authorization: Bearer` passes untouched.
- Rivet (actor engine): a long-lived binary WebSocket with
  `Sec-WebSocket-Protocol: rivet_token.<token>`, `x-rivet-*` headers and a
  `/gateway/{actor}@{token}/...` path kept byte for byte.
- Rend (video): a session cookie with `Domain` and `HttpOnly`, then byte
  ranges of a segment answered `206` with `Content-Range`, `ETag` and
  credentialed CORS intact.
"""

from __future__ import annotations

import asyncio

import pytest
import websockets

from test_published import published, standin  # noqa: F401  (fixture)


@pytest.mark.parametrize("http2", [False, True])
async def test_keystone_whip_session(engine, standin, http2):  # noqa: F811
    async with published(engine, "live", standin.server_address[1]):
        async with engine.public_client(http2=http2) as client:
            base = engine.url("live.t.localhost", "/rtc/v1/whip")
            preflight = await client.options(
                base,
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            assert preflight.status_code == 204
            assert "Location" in preflight.headers["access-control-expose-headers"]
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"

            offer = await client.post(
                base,
                content=b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n",
                headers={"Content-Type": "application/sdp", "Authorization": "Bearer workload-token"},
            )
            assert offer.status_code == 201, offer.text
            assert offer.headers["content-type"] == "application/sdp"
            location = offer.headers["location"]
            assert location == "/rtc/v1/whip/sessions/s1"
            etag = offer.headers["etag"]

            session = engine.url("live.t.localhost", location)
            patch = await client.patch(
                session,
                content=b"a=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host\r\n",
                headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": etag},
            )
            assert patch.status_code == 204 and patch.headers["etag"] == '"e2"'
            stale = await client.patch(
                session, content=b"a=x\r\n", headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": etag}
            )
            assert stale.status_code == 412
            assert (await client.delete(session)).status_code == 200
            assert (await client.delete(session)).status_code == 404


async def test_rivet_long_lived_binary_websocket(make_engine):
    engine = make_engine("timeouts: {http_idle_seconds: 1}\n")
    seen = {}

    async def gateway(ws):
        seen["path"] = ws.request.path
        seen["headers"] = ws.request.headers
        async for frame in ws:
            await ws.send(frame)

    def choose(connection, offered):
        return next((p for p in offered if p.startswith("rivet_token.")), None)

    async with websockets.serve(gateway, "127.0.0.1", 0, select_subprotocol=choose, ping_interval=0.3) as server:
        async with published(engine, "rivet", server.sockets[0].getsockname()[1]):
            path = "/gateway/01HQ3X@tok.abc/%2Factors/ws/"
            async with websockets.connect(
                f"wss://rivet.t.localhost:{engine.port}{path}",
                ssl=engine.ssl_context(),
                host="127.0.0.1",
                port=engine.port,
                server_hostname="rivet.t.localhost",
                subprotocols=["rivet", "rivet_token.tok.abc"],
                additional_headers={"x-rivet-target": "actor", "x-rivet-actor": "01HQ3X"},
                ping_interval=None,
            ) as ws:
                assert ws.subprotocol == "rivet_token.tok.abc"
                # Only the runner's side pings; the client stays silent
                # between frames for several idle timeouts.
                for round_ in range(3):
                    frame = bytes([round_]) * 4096 + bytes(range(256))
                    await ws.send(frame)
                    assert await ws.recv() == frame
                    await asyncio.sleep(1.5)
            assert seen["path"] == path
            assert seen["headers"]["x-rivet-actor"] == "01HQ3X"
            assert seen["headers"]["host"] == f"rivet.t.localhost:{engine.port}"


@pytest.mark.parametrize("http2", [False, True])
async def test_rend_cookies_and_byte_ranges(engine, standin, http2):  # noqa: F811
    async with published(engine, "rend", standin.server_address[1]):
        async with engine.public_client(http2=http2) as client:
            login = await client.get(engine.url("rend.t.localhost", "/v/login"), headers={"Origin": "https://site.example"})
            assert login.headers.get_list("set-cookie") == [
                "rend_session=abc123; Domain=rend.t.localhost; Path=/; HttpOnly; Secure; SameSite=None",
                "rend_pref=hd; Path=/v",
            ]
            assert login.headers["access-control-allow-credentials"] == "true"
            segment = engine.url("rend.t.localhost", "/v/seg/0.ts")
            assert (await client.get(segment, headers={"Cookie": ""})).status_code == 403
            cookies = {"Cookie": "rend_session=abc123; rend_pref=hd"}
            whole = await client.get(segment, headers=cookies)
            assert whole.status_code == 200 and len(whole.content) == 1000
            part = await client.get(segment, headers={**cookies, "Range": "bytes=100-199"})
            assert part.status_code == 206
            assert part.headers["content-range"] == "bytes 100-199/1000"
            assert part.content == whole.content[100:200]
            assert part.headers["etag"] == '"seg-0"'
            assert part.headers["cache-control"] == "public, max-age=31536000, immutable"
            tail = await client.get(segment, headers={**cookies, "Range": "bytes=990-"})
            assert tail.status_code == 206 and tail.headers["content-range"] == "bytes 990-999/1000"

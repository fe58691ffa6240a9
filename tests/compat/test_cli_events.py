"""`strait events --webhook`: deliveries verified with the SDK's verifier."""

from __future__ import annotations

import asyncio
import os
import signal

from rstream.webhooks import WEBHOOK_DELIVERABLE_EVENT_TYPES, generate_signing_secret, verify_event

from conftest import BIN


class Receiver:
    """A minimal HTTP/1.1 endpoint that keeps every POST it gets."""

    def __init__(self) -> None:
        self.deliveries: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self.deliveries.put((headers, body))
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_webhook_deliveries_verify_with_the_sdk(engine):
    receiver = Receiver()
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    secret = generate_signing_secret()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RSTREAM_")}
    env.update(
        RSTREAM_ENGINE=engine.engine,
        RSTREAM_AUTHENTICATION_TOKEN=engine.admin_token("ops"),
        SSL_CERT_FILE=str(engine.ca),
        HOME=str(engine.tmp),
        STRAIT_WEBHOOK_SECRET=secret,
    )
    events = await asyncio.create_subprocess_exec(
        BIN / "strait", "events", "--forward-to", f"http://127.0.0.1:{port}/hooks/strait", "--webhook",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(events.stderr.readline(), 30)).decode()
        assert "watching events" in line, line
        async with engine.client("alice") as agent:
            control = await agent.connect()
            tunnel = await control.create_tunnel(name="hooked", publish=False)
            await tunnel.close()
            await control.close()
        kinds = []
        for _ in range(4):
            headers, body = await asyncio.wait_for(receiver.deliveries.get(), 30)
            event = verify_event(body, headers["rstream-signature"], secret)
            assert event.type in WEBHOOK_DELIVERABLE_EVENT_TYPES
            assert headers["rstream-event-type"] == event.type
            assert headers["rstream-event-id"] == event.id
            assert headers["rstream-webhook-id"] and headers["rstream-delivery-id"]
            assert headers["content-type"] == "application/json"
            if event.type.startswith("tunnel."):
                assert event.object["name"] == "hooked"
            kinds.append(event.type)
        assert kinds == ["client.created", "tunnel.created", "tunnel.deleted", "client.deleted"]
        # A wrong secret does not verify.
        try:
            verify_event(body, headers["rstream-signature"], generate_signing_secret())
        except Exception as refused:  # noqa: BLE001 - the SDK's own error type
            assert "Signature" in str(refused)
        else:
            raise AssertionError("a wrong secret verified")
    finally:
        # One shutdown signal, never lost: Ctrl-C ends the command even
        # while a delivery is in flight.
        events.send_signal(signal.SIGINT)
        try:
            code = await asyncio.wait_for(events.wait(), 10)
        except TimeoutError:
            events.kill()
            await events.wait()
            raise AssertionError("strait events was still running 10 s after SIGINT") from None
        server.close()
    assert code == 0

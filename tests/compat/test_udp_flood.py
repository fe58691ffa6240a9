"""A published UDP port under a flood of spoofed sources: the engine binary
keeps a bounded session table (the longest idle evicted and counted), its
memory stays flat, and a real source is still served."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request

from conftest import BIN
from test_interop import strait_env

PORTS = (
    'udp: {enabled: true, port_range: "20000-29999", max_sessions_per_tunnel: 128}\n'
    'metrics: {prometheus: {enabled: true, listen_addr: "127.0.0.1:0"}}\n'
)


def metric(engine, name: str) -> float:
    with urllib.request.urlopen(f"http://{engine.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


def flood(port: int, sources: int) -> None:
    """One packet from each of `sources` new source addresses (a new
    socket, so a new port, each time), paced so the kernel keeps them."""
    for i in range(sources):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(i.to_bytes(4, "big"), ("127.0.0.1", port))
        if i % 100 == 0:
            # The engine asks for a 4 MiB receive buffer (several thousand
            # small packets); a flood far faster than a debug build takes
            # new sources would only test the kernel's drops.
            time.sleep(0.005)


async def echo_once(port: int, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    received: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            if not received.done():
                received.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=("127.0.0.1", port))
    try:
        # As any UDP client does, it asks again until answered: right after
        # a flood the agent may still be working through the channels the
        # flood's sessions asked for.
        for _ in range(20):
            transport.sendto(payload)
            try:
                return await asyncio.wait_for(asyncio.shield(received), 1)
            except asyncio.TimeoutError:
                continue
        raise AssertionError(f"no answer to {payload!r} in 20 s")
    finally:
        transport.close()


async def test_ten_thousand_spoofed_sources_keep_the_engine_bounded(make_engine):
    engine = make_engine(PORTS)
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    local = echo.get_extra_info("sockname")[1]
    forward = await asyncio.create_subprocess_exec(
        BIN / "strait", "forward", str(local), "--protocol", "udp", "--transport", "quic",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=strait_env(engine),
    )
    drain = None
    try:
        line = (await asyncio.wait_for(forward.stdout.readline(), 30)).decode()
        match = re.match(r"Forwarding udp://localhost:(\d+) -> ", line)
        assert match, line
        drain = asyncio.create_task(forward.stdout.read())
        port = int(match.group(1))
        assert await echo_once(port, b"first") == b"first"

        # Warm up, then measure over 10,000 more sources.
        await asyncio.to_thread(flood, port, 1000)
        before = engine.memory_kib()
        await asyncio.to_thread(flood, port, 10_000)
        assert await echo_once(port, b"still served") == b"still served"
        after = engine.memory_kib()
        evicted = metric(engine, "strait_udp_sessions_evicted_total")
        sessions = metric(engine, 'strait_published_connections{protocol="udp"}')
        assert evicted >= 5000, f"evictions: {evicted}"
        assert sessions <= 128, f"sessions: {sessions}"
        # The table holds at most 128 sessions whatever the flood: growth
        # is allocator noise, not one entry per source.
        assert after - before < 8 * 1024, f"engine RSS grew from {before} KiB to {after} KiB"
    finally:
        forward.send_signal(2)
        assert await asyncio.wait_for(forward.wait(), 30) == 0
        if drain is not None:
            await asyncio.wait_for(drain, 30)
        echo.close()

"""The QUIC port against an independent QUIC stack: aioquic (PyPI), with the
rstream Python SDK's generated protobuf module for every message.

The engine's QUIC listener (quinn, ALPN `rstrm/1`, the UDP side of the TLS
port) carries on each client-opened bidirectional stream exactly the bytes
one TLS connection would. Here an aioquic client plays the agent (control
channel, reverse dials, a published HTTP tunnel) and the dialer (StreamReq,
with and without zero-RTT) against the real engine binary, with the strait
CLI or the rstream SDK over TLS on the other side, and then sends what a
broken or idle client would.

Every wait is bounded; nothing waits on a timer for synchronisation. The
aioquic side binds 127.0.0.1 with a kernel-picked port and talks only to
the engine's ready-line address.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import time
import uuid

import pytest
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from google.protobuf.wrappers_pb2 import BoolValue, StringValue
from rstream._proto import rstream_pb2 as pb

from conftest import BIN, Engine
from test_interop import strait_env

PROTOCOL_VERSION = "1.4.5"
ALPN = "rstrm/1"
MIB = 1024 * 1024
# The most one step (a handshake, a frame, a MiB's echo) may take on a
# loaded two-core machine; only a broken engine ever reaches it.
STEP = 30.0
# TLS alert no_application_protocol (120) as a QUIC CRYPTO_ERROR (0x100 + alert).
CRYPTO_NO_APPLICATION_PROTOCOL = 0x100 + 120
# The engine's application close code for "no stream opened in time".
NO_STREAM = 1


# ------------------------------------------------------------------ engine


@pytest.fixture
def qengine(make_engine) -> Engine:
    """conftest's engine, with the QUIC port its ready line names."""
    return make_engine(quic=True)


# ------------------------------------------------------------- aioquic side


class Peer(QuicConnectionProtocol):
    """aioquic's asyncio protocol, plus what the stock one drops: a stream
    reset ends its reader (and is recorded), and the connection's close
    event is kept for the tests to read."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.terminated: events.ConnectionTerminated | None = None
        self.resets: dict[int, int] = {}
        self.stop_sending: dict[int, int] = {}
        self.alpn: str | None = None
        self._adapters: dict[int, asyncio.Transport] = {}

    def _create_stream(self, stream_id: int):
        reader, writer = super()._create_stream(stream_id)
        self._adapters[stream_id] = writer.transport
        return reader, writer

    def _sending_over(self, stream_id: int) -> None:
        # aioquic's adapter would otherwise try to finish a stream whose
        # sending side the peer stopped (and aioquic reset), when the
        # writer is collected.
        adapter = self._adapters.get(stream_id)
        if adapter is not None:
            adapter._closing = True

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.ConnectionTerminated):
            self.terminated = event
        elif isinstance(event, events.HandshakeCompleted):
            self.alpn = event.alpn_protocol
        elif isinstance(event, events.StopSendingReceived):
            self.stop_sending[event.stream_id] = event.error_code
            self._sending_over(event.stream_id)
        elif isinstance(event, events.StreamReset):
            self.resets[event.stream_id] = event.error_code
            reader = self._stream_readers.get(event.stream_id)
            if reader is not None:
                reader.feed_eof()
        super().quic_event_received(event)

    async def stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new client-opened bidirectional stream."""
        return await self.create_stream()


@contextlib.asynccontextmanager
async def quic_connect(engine: Engine, alpn: str = ALPN, wait_connected: bool = True):
    """An aioquic connection to the engine's QUIC port, trusting its dev CA,
    SNI = engine.host."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name="localhost")
    configuration.load_verify_locations(cafile=str(engine.ca))
    host, port = engine.quic.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(
        lambda: Peer(QuicConnection(configuration=configuration)), local_addr=("127.0.0.1", 0)
    )
    try:
        peer.connect((host, int(port)))
        if wait_connected:
            await asyncio.wait_for(peer.wait_connected(), STEP)
        yield peer
    finally:
        if peer.terminated is None:
            peer.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(peer.wait_closed(), 5)
        transport.close()


def frame(message: pb.Message) -> bytes:
    body = message.SerializeToString()
    return struct.pack(">I", len(body)) + body


async def read_frame(reader: asyncio.StreamReader, timeout: float | None = STEP) -> pb.Message:
    async def read() -> bytes:
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        return await reader.readexactly(length)

    message = pb.Message()
    message.ParseFromString(await asyncio.wait_for(read(), timeout))
    return message


def details(token: str) -> pb.ClientDetails:
    return pb.ClientDetails(
        agent=StringValue(value="aioquic-compat"),
        channel=StringValue(value="test"),
        version=StringValue(value="0.0.0"),
        os=StringValue(value="linux"),
        arch=StringValue(value="amd64"),
        token=StringValue(value=token),
        protocol_version=StringValue(value=PROTOCOL_VERSION),
    )


def stream_req(token: str, target: str, zero_rtt: bool) -> pb.Message:
    return pb.Message(
        stream_req=pb.StreamReq(
            client_details=pb.ClientDetails(token=StringValue(value=token)),
            tunnel_id_name=target,
            zero_rtt=BoolValue(value=zero_rtt),
        )
    )


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes a stream until its peer finishes, then finishes too."""
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), STEP)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class QuicAgent:
    """A minimal rstream agent on one aioquic connection: the control
    channel on its first stream, each reverse dial on a new stream."""

    def __init__(self, peer: Peer, token: str) -> None:
        self.peer = peer
        self.token = token
        self.client_id = ""
        self.server_details: pb.ServerDetails | None = None
        self._tunnels: dict[str, asyncio.Future] = {}
        self._proxy_conns: asyncio.Queue[pb.ProxyConnReq] = asyncio.Queue()
        self.others: asyncio.Queue[pb.Message] = asyncio.Queue()
        self._reader_task: asyncio.Task | None = None

    async def open(self, heartbeat_interval_ms: int | None = None) -> None:
        self.reader, self.writer = await self.peer.stream()
        request = pb.OpenControlChannelReq(client_details=details(self.token))
        if heartbeat_interval_ms is not None:
            request.liveness.heartbeat_interval_ms = heartbeat_interval_ms
        self.writer.write(frame(pb.Message(open_control_channel_req=request)))
        rsp = await read_frame(self.reader)
        assert rsp.WhichOneof("payload") == "open_control_channel_rsp", rsp
        assert rsp.open_control_channel_rsp.WhichOneof("payload") == "ok", rsp
        ok = rsp.open_control_channel_rsp.ok
        self.client_id = ok.client_id
        self.server_details = ok.server_details
        self.liveness = ok.liveness if ok.HasField("liveness") else None
        self._reader_task = asyncio.create_task(self._read_control())

    async def _read_control(self) -> None:
        while True:
            try:
                # The control channel is idle between requests: no deadline.
                message = await read_frame(self.reader, timeout=None)
            except asyncio.IncompleteReadError:
                for future in self._tunnels.values():
                    if not future.done():
                        future.set_exception(ConnectionError("control stream ended"))
                return
            kind = message.WhichOneof("payload")
            if kind == "open_tunnel_rsp":
                future = self._tunnels.pop(message.open_tunnel_rsp.request_id, None)
                if future is not None and not future.done():
                    future.set_result(message.open_tunnel_rsp)
            elif kind == "proxy_conn_req":
                self._proxy_conns.put_nowait(message.proxy_conn_req)
            else:
                self.others.put_nowait(message)

    async def open_tunnel(self, **properties) -> pb.TunnelProperties:
        request_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._tunnels[request_id] = future
        props = pb.TunnelProperties()
        for name, value in properties.items():
            wrapper = BoolValue(value=value) if isinstance(value, bool) else StringValue(value=value)
            getattr(props, name).CopyFrom(wrapper)
        self.writer.write(frame(pb.Message(open_tunnel_req=pb.OpenTunnelReq(request_id=request_id, tunnel_properties=props))))
        rsp = await asyncio.wait_for(future, STEP)
        assert rsp.WhichOneof("payload") == "tunnel_properties", rsp
        return rsp.tunnel_properties

    async def next_other(self) -> pb.Message:
        """The next control message that is neither a tunnel answer nor a
        ProxyConnReq (heartbeats, close answers)."""
        return await asyncio.wait_for(self.others.get(), STEP)

    async def next_proxy_conn(self) -> pb.ProxyConnReq:
        return await asyncio.wait_for(self._proxy_conns.get(), STEP)

    async def accept(self, request: pb.ProxyConnReq, zero_rtt: bool = True):
        """Answers one ProxyConnReq: a NEW stream with ProxyReq, and
        ProxyConnRsp on the control channel; returns the stream."""
        reader, writer = await self.peer.stream()
        writer.write(
            frame(
                pb.Message(
                    proxy_req=pb.ProxyReq(
                        client_details=pb.ClientDetails(token=StringValue(value=request.secret.value)),
                        stream_id=request.stream_id,
                        zero_rtt=BoolValue(value=zero_rtt),
                    )
                )
            )
        )
        if not zero_rtt:
            rsp = await read_frame(reader)
            assert rsp.WhichOneof("payload") == "proxy_rsp", rsp
            assert not rsp.proxy_rsp.HasField("error"), rsp
        self.writer.write(frame(pb.Message(proxy_conn_rsp=pb.ProxyConnRsp(stream_id=request.stream_id))))
        return reader, writer

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()


@contextlib.asynccontextmanager
async def quic_agent(peer: Peer, token: str, **options):
    """A QuicAgent with its control channel open, stopped on the way out."""
    agent = QuicAgent(peer, token)
    try:
        await agent.open(**options)
        yield agent
    finally:
        agent.close()


# ------------------------------------------------------ 1. aioquic as agent


@pytest.mark.timeout(120)
async def test_aioquic_control_channel_opens_heartbeats_and_closes(qengine):
    async with quic_connect(qengine) as peer:
        assert peer.alpn == ALPN
        async with quic_agent(peer, qengine.token(), heartbeat_interval_ms=1000) as agent:
            assert agent.client_id
            assert agent.server_details.agent.value == "strait-engine"
            # Liveness as over TLS: the same interval echoed, a timeout at least that.
            assert agent.liveness is not None
            assert agent.liveness.heartbeat_interval_ms == 1000
            assert 1000 <= agent.liveness.heartbeat_timeout_ms <= 900_000
            for sequence in (1, 2, 3):
                agent.writer.write(frame(pb.Message(heartbeat=pb.Heartbeat(sequence=sequence))))
                answer = await agent.next_other()
                assert answer.WhichOneof("payload") == "heartbeat", answer
                assert (answer.heartbeat.sequence, answer.heartbeat.acknowledgement) == (0, sequence)
            # A bad token on a second stream of the same connection is refused
            # as over TLS, and the first channel stays.
            reader, writer = await peer.stream()
            writer.write(frame(pb.Message(open_control_channel_req=pb.OpenControlChannelReq(
                client_details=details(qengine.token(secret="another-secret-another-secret-another"))))))
            refused = await read_frame(reader)
            assert refused.open_control_channel_rsp.WhichOneof("payload") == "error", refused
            assert refused.open_control_channel_rsp.error.code == pb.ERROR_CODE_UNAUTHORIZED, refused
            # Close: CloseControlChannelReq gets its answer, then the stream ends.
            agent.writer.write(frame(pb.Message(close_control_channel_req=pb.CloseControlChannelReq())))
            while (answer := await agent.next_other()).WhichOneof("payload") == "heartbeat":
                pass
            assert answer.WhichOneof("payload") == "close_control_channel_rsp", answer
            await asyncio.wait_for(agent._reader_task, STEP)
            assert agent.reader.at_eof()
            assert peer.terminated is None, peer.terminated


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "dialer, proxy_zero_rtt",
    [("strait-cli", True), ("sdk", False)],
    ids=["strait-dial-tls/proxy-zero-rtt", "sdk-tls/proxy-rsp"],
)
async def test_aioquic_agent_serves_a_private_tunnel(qengine, dialer, proxy_zero_rtt):
    payload = os.urandom(MIB)
    async with quic_connect(qengine) as peer:
        async with quic_agent(peer, qengine.token()) as agent:
            tunnel = await agent.open_tunnel(name="aq-private", type="bytestream", publish=False)
            assert len(tunnel.id.value) == 24 and tunnel.name.value == "aq-private"

            async def serve_one() -> None:
                request = await agent.next_proxy_conn()
                assert request.tunnel_id == tunnel.id.value
                assert len(request.stream_id) == 24 and request.secret.value
                await echo(*await agent.accept(request, zero_rtt=proxy_zero_rtt))

            served = asyncio.create_task(serve_one())
            if dialer == "strait-cli":
                dial = await asyncio.create_subprocess_exec(
                    BIN / "strait", "dial", "aq-private", "--transport", "tls",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=strait_env(qengine),
                )
                try:
                    # stdin stays open until the echo is back (as ssh does).
                    dial.stdin.write(payload)
                    await dial.stdin.drain()
                    out = await asyncio.wait_for(dial.stdout.readexactly(len(payload)), STEP * 2)
                    dial.stdin.close()
                    assert await asyncio.wait_for(dial.wait(), STEP) == 0, (await dial.stderr.read()).decode()
                finally:
                    if dial.returncode is None:
                        dial.kill()
                        await dial.wait()
            else:
                async with qengine.client(zero_rtt=False) as sdk:
                    stream = await sdk.dial("aq-private")
                    stream.write(payload)
                    await stream.drain()
                    out = await asyncio.wait_for(stream.readexactly(len(payload)), STEP * 2)
                    stream.close()
            assert sha(out) == sha(payload)
            await asyncio.wait_for(served, STEP)


@pytest.mark.timeout(120)
async def test_aioquic_agent_serves_a_published_http_tunnel(qengine):
    body = b"hello from aioquic\n"
    async with quic_connect(qengine) as peer:
        async with quic_agent(peer, qengine.token()) as agent:
            tunnel = await agent.open_tunnel(name="aq-web", type="bytestream", publish=True, protocol="http")
            hostname = tunnel.hostname.value
            assert hostname.endswith(".t.localhost"), tunnel

            async def serve_one() -> bytes:
                request = await agent.next_proxy_conn()
                reader, writer = await agent.accept(request)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                    b"X-Served-By: aioquic\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
                writer.write_eof()
                return head

            served = asyncio.create_task(serve_one())
            async with qengine.public_client() as http:
                response = await asyncio.wait_for(http.get(qengine.url(hostname, "/via/quic?x=1")), STEP)
            assert response.status_code == 200, response.text
            assert response.content == body
            assert response.headers["x-served-by"] == "aioquic"
            head = await asyncio.wait_for(served, STEP)
            assert head.startswith(b"GET /via/quic?x=1 HTTP/1.1\r\n"), head
            assert f"host: {hostname}".encode() in head.lower(), head


# ----------------------------------------------------- 2. aioquic as dialer


@contextlib.asynccontextmanager
async def strait_forward(engine: Engine, port: int, name: str):
    """`strait forward PORT --no-publish --name NAME --transport tls`, up
    once it prints its forwarding line."""
    forward = await asyncio.create_subprocess_exec(
        BIN / "strait", "forward", str(port), "--no-publish", "--name", name, "--transport", "tls",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=strait_env(engine),
    )
    try:
        line = (await asyncio.wait_for(forward.stdout.readline(), STEP)).decode()
        assert line.startswith(f"Forwarding rstrm://{name}"), line + (await forward.stderr.read()).decode()
        yield forward
    finally:
        if forward.returncode is None:
            forward.send_signal(2)
            try:
                await asyncio.wait_for(forward.wait(), STEP)
            except asyncio.TimeoutError:
                forward.kill()
                await forward.wait()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("zero_rtt", [False, True], ids=["stream-rsp", "zero-rtt"])
async def test_aioquic_dials_a_strait_agents_tunnel(qengine, echo_port, zero_rtt):
    payload = os.urandom(MIB)
    async with strait_forward(qengine, echo_port, "aq-target"):
        async with quic_connect(qengine) as peer:
            reader, writer = await peer.stream()
            request = frame(stream_req(qengine.token(), "aq-target", zero_rtt))
            if zero_rtt:
                # The payload rides right behind the frame, in one write.
                writer.write(request + payload)
                await writer.drain()
            else:
                writer.write(request)
                rsp = await read_frame(reader)
                assert rsp.WhichOneof("payload") == "stream_rsp", rsp
                assert rsp.stream_rsp.WhichOneof("payload") == "stream_id", rsp
                stream_id = rsp.stream_rsp.stream_id
                assert len(stream_id) == 24 and all(c in "0123456789abcdef" for c in stream_id), stream_id
                writer.write(payload)
                await writer.drain()
            out = await asyncio.wait_for(reader.readexactly(len(payload)), STEP * 2)
            assert sha(out) == sha(payload)
            # A half-close travels to the echo service and back.
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(1), STEP) == b""
            assert peer.terminated is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("zero_rtt", [False, True], ids=["stream-rsp", "zero-rtt"])
async def test_aioquic_dial_to_a_missing_tunnel(qengine, zero_rtt):
    async with quic_connect(qengine) as peer:
        reader, writer = await peer.stream()
        writer.write(frame(stream_req(qengine.token(), "missing", zero_rtt)) + (b"early bytes" if zero_rtt else b""))
        if zero_rtt:
            # Zero-RTT: the engine answers nothing and signals by ending the stream.
            assert await asyncio.wait_for(reader.read(1), STEP) == b""
        else:
            rsp = await read_frame(reader)
            assert rsp.stream_rsp.WhichOneof("payload") == "error", rsp
            assert rsp.stream_rsp.error.code == pb.ERROR_CODE_TUNNEL_NOT_FOUND, rsp
        assert peer.terminated is None, peer.terminated


# ----------------------------------------------------- 3. bad input on QUIC


@pytest.mark.timeout(60)
async def test_alpn_h3_is_refused_in_the_handshake(qengine):
    async with quic_connect(qengine, alpn="h3", wait_connected=False) as peer:
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(peer.wait_connected(), STEP)
        assert peer.terminated is not None
        assert peer.terminated.error_code == CRYPTO_NO_APPLICATION_PROTOCOL, peer.terminated
    # The port keeps serving rstrm/1.
    async with quic_connect(qengine) as peer:
        async with quic_agent(peer, qengine.token()) as agent:
            assert agent.client_id


@pytest.mark.timeout(90)
async def test_garbage_first_frame_closes_only_its_stream(qengine):
    async with quic_connect(qengine) as peer:
        async with quic_agent(peer, qengine.token()) as agent:
            reader, writer = await peer.stream()
            garbage_id = writer.get_extra_info("stream_id")
            writer.write(b"\xff\xff\xff\xff" + os.urandom(64))
            await writer.drain()
            # The engine ends that stream (a finish or a reset; strait finishes
            # it and sends STOP_SENDING), as it closes such a TLS connection:
            # its reader sees the end without a byte.
            assert await asyncio.wait_for(reader.read(1), STEP) == b""
            assert peer.terminated is None, peer.terminated

            # The same connection's control stream keeps working...
            tunnel = await agent.open_tunnel(name="after-garbage", type="bytestream", publish=False)
            assert tunnel.name.value == "after-garbage"
            # ...and so do new streams on it.
            reader2, writer2 = await peer.stream()
            writer2.write(frame(stream_req(qengine.token(), "no-such-tunnel", zero_rtt=False)))
            rsp = await read_frame(reader2)
            assert rsp.stream_rsp.WhichOneof("payload") == "error", rsp
            assert rsp.stream_rsp.error.code == pb.ERROR_CODE_TUNNEL_NOT_FOUND, rsp
            assert peer.terminated is None, peer.terminated
            assert writer2.get_extra_info("stream_id") != garbage_id


@pytest.mark.timeout(60)
async def test_a_connection_that_opens_no_stream_is_closed(make_engine):
    engine = make_engine(env={"RSTREAM_ENGINE_LIMITS__FIRST_FRAME_SECONDS": "2"}, quic=True)
    started = time.monotonic()
    async with quic_connect(engine) as peer:
        await asyncio.wait_for(peer.wait_closed(), STEP)
        elapsed = time.monotonic() - started
        assert peer.terminated is not None
        assert peer.terminated.error_code == NO_STREAM, peer.terminated
        assert peer.terminated.reason_phrase == "no stream opened in time", peer.terminated
        # It was the first-stream timer (2 s), not the 30 s idle timeout.
        assert 1.5 <= elapsed < 20, elapsed

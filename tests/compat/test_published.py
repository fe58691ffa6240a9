"""Published tunnels against the official rstream Python SDK (0.7.0) as the
agent (`forward_to` and its ASGI helper), with httpx, curl, websockets and
openssl as the public side.

`*.t.localhost` has no DNS here: clients connect to 127.0.0.1 and keep the
name for SNI and Host (httpx through `Engine.public_client`, curl with
`--resolve`, websockets with `host=`, openssl with `-servername`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import threading
import urllib.parse

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import websockets
from rstream import asgi
from rstream.errors import EngineError

FEATURE_NOT_AVAILABLE = 5000
MIB = 1024 * 1024
BLOCK = bytes(range(256)) * 256  # 64 KiB of a known pattern


def pattern(size: int):
    """The bytes `/blob?size=N` serves, in blocks."""
    while size > 0:
        chunk = BLOCK[: min(size, len(BLOCK))]
        size -= len(chunk)
        yield chunk


# ---------------------------------------------------------------- stand-ins


class StandIn(http.server.BaseHTTPRequestHandler):
    """A small keep-alive HTTP/1.1 service with the shapes the workloads
    need: echo, large bodies, SSE, byte ranges, cookies, WHIP sessions."""

    protocol_version = "HTTP/1.1"
    SEGMENT = bytes((i * 7) % 251 for i in range(1000))

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        if status not in (204, 304):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _read_body(self):
        """Yields the request body (Content-Length or chunked) in pieces."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    piece = self.rfile.read(min(remaining, MIB))
                    remaining -= len(piece)
                    yield piece
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                piece = self.rfile.read(min(remaining, MIB))
                if not piece:
                    return
                remaining -= len(piece)
                yield piece

    def _route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        path = url.path
        if path == "/echo" or path.startswith("/gateway/"):
            digest, length = hashlib.sha256(), 0
            for piece in self._read_body():
                digest.update(piece)
                length += len(piece)
            body = json.dumps(
                {
                    "method": self.command,
                    "target": self.path,
                    "headers": list(self.headers.items()),
                    "length": length,
                    "sha256": digest.hexdigest(),
                }
            ).encode()
            self._send(
                200,
                body,
                [
                    ("Content-Type", "application/json"),
                    ("Set-Cookie", "a=1; Path=/"),
                    ("Set-Cookie", "b=2; Path=/"),
                    ("ETag", '"echo-1"'),
                    ("X-Service-Header", "Mixed-Case"),
                ],
            )
        elif path == "/moved":
            self._send(302, b"", [("Location", "https://elsewhere.example/next?x=1")])
        elif path == "/blob":
            size = int(query["size"][0])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            for chunk in pattern(size):
                self.wfile.write(chunk)
        elif path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event, wait in ((b"data: first\n\n", True), (b"data: second\n\n", False)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                if wait:
                    self.server.release.wait(30)
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/rtc/v1/whip" and self.command == "OPTIONS":
            self._send(
                204,
                headers=[
                    ("Access-Control-Allow-Origin", "https://app.example"),
                    ("Access-Control-Allow-Methods", "POST, PATCH, DELETE, OPTIONS"),
                    ("Access-Control-Allow-Headers", "Authorization, Content-Type, If-Match"),
                    ("Access-Control-Expose-Headers", "Location, ETag"),
                    ("Access-Control-Max-Age", "600"),
                ],
            )
        elif path == "/rtc/v1/whip" and self.command == "POST":
            offer = b"".join(self._read_body())
            ok = (
                self.headers.get("Content-Type") == "application/sdp"
                and self.headers.get("Authorization") == "Bearer workload-token"
                and offer.startswith(b"v=0")
            )
            if not ok:
                self._send(400, b"bad offer")
                return
            self.server.sessions["s1"] = '"e1"'
            self._send(
                201,
                b"v=0\r\no=answer\r\n",
                [
                    ("Content-Type", "application/sdp"),
                    ("Location", "/rtc/v1/whip/sessions/s1"),
                    ("ETag", '"e1"'),
                    ("Access-Control-Allow-Origin", "https://app.example"),
                    ("Access-Control-Expose-Headers", "Location, ETag"),
                ],
            )
        elif path.startswith("/rtc/v1/whip/sessions/"):
            session = path.rsplit("/", 1)[1]
            body = b"".join(self._read_body())
            if session not in self.server.sessions:
                self._send(404, b"no session")
            elif self.command == "PATCH":
                if self.headers.get("If-Match") != self.server.sessions[session]:
                    self._send(412, b"etag mismatch")
                elif self.headers.get("Content-Type") != "application/trickle-ice-sdpfrag" or not body:
                    self._send(415, b"not a fragment")
                else:
                    self.server.sessions[session] = '"e2"'
                    self._send(204, headers=[("ETag", '"e2"')])
            elif self.command == "DELETE":
                del self.server.sessions[session]
                self._send(200, b"")
        elif path == "/v/login":
            self._send(
                200,
                b"welcome",
                [
                    ("Set-Cookie", "rend_session=abc123; Domain=rend.t.localhost; Path=/; HttpOnly; Secure; SameSite=None"),
                    ("Set-Cookie", "rend_pref=hd; Path=/v"),
                    ("Access-Control-Allow-Origin", "https://site.example"),
                    ("Access-Control-Allow-Credentials", "true"),
                ],
            )
        elif path.startswith("/v/seg/"):
            if "rend_session=abc123" not in (self.headers.get("Cookie") or ""):
                self._send(403, b"no session")
                return
            data = self.SEGMENT
            common = [
                ("ETag", '"seg-0"'),
                ("Cache-Control", "public, max-age=31536000, immutable"),
                ("Accept-Ranges", "bytes"),
                ("Content-Type", "video/mp2t"),
                ("Access-Control-Allow-Origin", "https://site.example"),
                ("Access-Control-Allow-Credentials", "true"),
            ]
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                first, _, last = wanted[6:].partition("-")
                first, last = int(first), int(last or len(data) - 1)
                self._send(206, data[first : last + 1], common + [("Content-Range", f"bytes {first}-{last}/{len(data)}")])
            else:
                self._send(200, data, common)
        else:
            self._send(404, b"stand-in: no route")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _route


class StandInServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StandIn)
        self.release = threading.Event()
        self.sessions: dict[str, str] = {}
        self.connections = 0

    def get_request(self):
        self.connections += 1
        return super().get_request()


@pytest.fixture
def standin():
    server = StandInServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@contextlib.asynccontextmanager
async def published(engine, label: str, port: int | None = None, **options):
    """A published tunnel `<label>.t.localhost` served by `forward_to(port)`
    (or by nothing when port is None), closed at the end."""
    async with engine.client() as client:
        control = await client.connect()
        tunnel = await control.create_tunnel(publish=True, hostname=f"{label}.t.localhost", **options)
        forward = asyncio.create_task(tunnel.forward_to("127.0.0.1", port)) if port else None
        try:
            yield tunnel
        finally:
            if forward:
                forward.cancel()
            await control.close()


async def run(*argv: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """Runs a command without blocking the event loop the SDK agent lives on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=60)
    return proc.returncode, out, err


async def s_client(engine, host: str, *extra: str, send: bytes) -> bytes:
    """`openssl s_client` to a published name; returns its output once the
    echo of `send` came back (the echo service never closes first)."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{engine.port}", "-servername", host, *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    proc.stdin.write(send)
    await proc.stdin.drain()
    out = b""
    try:
        while send.strip() not in out:
            chunk = await asyncio.wait_for(proc.stdout.read(4096), timeout=30)
            if not chunk:
                break
            out += chunk
    finally:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 30)
    return out


def curl_args(engine, host: str, *extra: str) -> list[str]:
    return ["curl", "-sS", "--cacert", str(engine.ca), "--resolve", f"{host}:{engine.port}:127.0.0.1", *extra]


def published_streams(engine) -> int:
    """Not exposed over the network here: count the agent streams from the log."""
    return engine.log().count("agent stream opened")


# ---------------------------------------------------------------- HTTP


@pytest.mark.parametrize("http2", [False, True])
async def test_get_and_post_through_forward_to(engine, standin, http2):
    async with published(engine, "app", standin.server_address[1]) as tunnel:
        assert tunnel.properties.hostname == "app.t.localhost"
        assert tunnel.forwarding_address == f"https://app.t.localhost:{engine.port}"
        async with engine.public_client(http2=http2) as client:
            response = await client.get(engine.url("app.t.localhost", "/echo?b=2&a=1&a=%2F"))
            assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
            assert response.status_code == 200
            seen = response.json()
            assert seen["method"] == "GET" and seen["target"] == "/echo?b=2&a=1&a=%2F"
            headers = dict(seen["headers"])
            assert headers["x-forwarded-for"] == "127.0.0.1"
            assert headers["x-forwarded-proto"] == "https"
            assert headers["x-forwarded-host"] == f"app.t.localhost:{engine.port}"
            assert response.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
            assert response.headers["etag"] == '"echo-1"'
            body = b"x" * 300_000
            response = await client.post(engine.url("app.t.localhost", "/echo"), content=body)
            assert response.json()["length"] == len(body)
            assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()
            response = await client.get(engine.url("app.t.localhost", "/moved"))
            assert response.status_code == 302
            assert response.headers["location"] == "https://elsewhere.example/next?x=1"


async def test_curl_http1_and_http2_keep_header_case_and_reuse_streams(engine, standin):
    host = "curl.t.localhost"
    async with published(engine, "curl", standin.server_address[1]):
        before = published_streams(engine)
        urls = [engine.url(host, f"/echo?n={i}") for i in range(20)]
        code, out, err = await run(*curl_args(engine, host, "--http1.1", "-H", "X-Custom-Case: Kept", *urls))
        assert code == 0, err
        answers = [json.loads(line) for line in out.decode().replace("}{", "}\n{").splitlines()]
        assert [a["target"] for a in answers] == [f"/echo?n={i}" for i in range(20)]
        assert ["X-Custom-Case", "Kept"] in answers[0]["headers"]
        assert published_streams(engine) - before == 1, "20 keep-alive requests cost one agent stream"

        code, out, err = await run(*curl_args(engine, host, "--http2", "-i", engine.url(host, "/echo")))
        assert code == 0, err
        assert out.startswith(b"HTTP/2 200"), out[:200]


async def test_asgi_helper_get_post_and_streamed_events(engine):
    release = asyncio.Event()

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/events":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data: one\n\n", "more_body": True})
            await release.wait()
            await send({"type": "http.response.body", "body": b"data: two\n\n", "more_body": False})
            return
        answer = json.dumps(
            {"method": scope["method"], "path": scope["raw_path"].decode(), "query": scope["query_string"].decode(), "length": len(body)}
        ).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": answer})

    async with engine.client() as client:
        control = await client.connect()
        tunnel = await control.create_tunnel(publish=True, hostname="asgi.t.localhost")
        serving = asyncio.create_task(asgi.serve(app, tunnel))
        for http2 in (False, True):
            async with engine.public_client(http2=http2) as public:
                response = await public.get(engine.url("asgi.t.localhost", "/items/%2Fa@b?q=1"))
                assert response.json() == {"method": "GET", "path": "/items/%2Fa@b", "query": "q=1", "length": 0}
                response = await public.post(engine.url("asgi.t.localhost", "/items"), content=b"z" * 100_000)
                assert response.json()["length"] == 100_000
                release.clear()
                async with public.stream("GET", engine.url("asgi.t.localhost", "/events")) as events:
                    chunks = events.aiter_raw()
                    assert await chunks.__anext__() == b"data: one\n\n"
                    release.set()
                    assert b"".join([c async for c in chunks]) == b"data: two\n\n"
        serving.cancel()
        await control.close()


async def test_server_sent_events_first_event_before_the_end(engine, standin):
    async with published(engine, "sse", standin.server_address[1]):
        async with engine.public_client() as client:
            async with client.stream("GET", engine.url("sse.t.localhost", "/events")) as response:
                assert response.headers["content-type"] == "text/event-stream"
                chunks = response.aiter_raw()
                assert await chunks.__anext__() == b"data: first\n\n"
                standin.release.set()
                assert b"".join([c async for c in chunks]) == b"data: second\n\n"


async def test_64_mib_up_and_down_with_bounded_engine_memory(engine, standin):
    size = 64 * MIB
    expected = hashlib.sha256()
    for chunk in pattern(size):
        expected.update(chunk)
    async with published(engine, "big", standin.server_address[1]):
        for http2 in (False, True):
            async with engine.public_client(http2=http2) as client:
                await client.get(engine.url("big.t.localhost", "/echo"))
                baseline = engine.memory_kib("VmRSS")

                async def upload():
                    for chunk in pattern(size):
                        yield chunk

                response = await client.post(engine.url("big.t.localhost", "/echo"), content=upload())
                assert response.json()["length"] == size
                assert response.json()["sha256"] == expected.hexdigest()

                got = hashlib.sha256()
                length = 0
                async with client.stream("GET", engine.url("big.t.localhost", f"/blob?size={size}")) as response:
                    async for chunk in response.aiter_raw():
                        got.update(chunk)
                        length += len(chunk)
                assert length == size and got.hexdigest() == expected.hexdigest()
                peak = engine.memory_kib("VmHWM")
                print(f"http2={http2}: engine VmRSS before {baseline} KiB, VmHWM after 2x64 MiB {peak} KiB")
                # The engine never holds a body: 128 MiB crossed it, its peak
                # grew by a few buffers.
                assert peak - baseline < 32 * 1024, f"engine RSS peak {peak} KiB from {baseline} KiB"


async def test_websocket_echo_with_subprotocol_binary_frames_and_pings(make_engine):
    engine = make_engine("timeouts: {http_idle_seconds: 1}\n")
    seen = {}

    async def echo(ws):
        seen["path"] = ws.request.path
        seen["headers"] = ws.request.headers
        async for message in ws:
            await ws.send(message)

    def choose(connection, offered):
        return next((p for p in offered if p.startswith("rivet_token.")), None)

    async with websockets.serve(echo, "127.0.0.1", 0, select_subprotocol=choose, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with published(engine, "ws", port):
            async with websockets.connect(
                f"wss://ws.t.localhost:{engine.port}/gateway/actor-1@tok/%2Fraw/",
                ssl=engine.ssl_context(),
                host="127.0.0.1",
                port=engine.port,
                server_hostname="ws.t.localhost",
                subprotocols=["rivet_token.secret", "rivet"],
                additional_headers={"x-rivet-target": "actor"},
                ping_interval=0.25,
                ping_timeout=5,
            ) as ws:
                assert ws.subprotocol == "rivet_token.secret"
                payload = bytes(range(256)) * 400
                await ws.send(payload)
                assert await ws.recv() == payload
                # Three idle timeouts with nothing but pings.
                await asyncio.sleep(3)
                await ws.send(payload[::-1])
                assert await ws.recv() == payload[::-1]
            assert seen["path"] == "/gateway/actor-1@tok/%2Fraw/"
            assert seen["headers"]["x-rivet-target"] == "actor"


async def test_idle_keep_alive_connection_is_closed(make_engine, standin):
    engine = make_engine("timeouts: {http_idle_seconds: 1}\n")
    async with published(engine, "idle", standin.server_address[1]):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", engine.port, ssl=engine.ssl_context(), server_hostname="idle.t.localhost"
        )
        writer.write(b"GET /echo HTTP/1.1\r\nHost: idle.t.localhost\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")).split(b":")[1])
        await reader.readexactly(length)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), timeout=10) == b""
        assert asyncio.get_running_loop().time() - started >= 0.9
        writer.close()


async def _h2c_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    while data := await reader.read(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                body = b"h2c " + headers[b":method"] + b" " + headers[b":path"] + b" " + headers[b":authority"]
                conn.send_headers(event.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(event.stream_id, body, end_stream=True)
        writer.write(conn.data_to_send())
        await writer.drain()
    writer.close()


async def test_h2c_upstream(engine):
    server = await asyncio.start_server(_h2c_service, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with published(engine, "h2c", port, http_version="h2c"):
        for http2 in (False, True):
            async with engine.public_client(http2=http2) as client:
                for i in range(3):
                    response = await client.get(engine.url("h2c.t.localhost", f"/p/{i}?q=%2F"))
                    assert response.text == f"h2c GET /p/{i}?q=%2F h2c.t.localhost:{engine.port}"
    server.close()


# ---------------------------------------------------------------- access


async def test_token_auth(engine, standin):
    async with published(engine, "locked", standin.server_address[1], token_auth=True):
        good, bad = engine.token("bob"), engine.token("bob", secret="not-the-engine-secret-not-the-engine!")
        url = engine.url("locked.t.localhost", "/echo?keep=1")
        async with engine.public_client() as client:
            assert (await client.get(url)).status_code == 401
            assert (await client.get(url, headers={"Authorization": f"Bearer {bad}"})).status_code == 401
            response = await client.get(url, headers={"Authorization": f"Bearer {good}"})
            assert response.status_code == 200
            assert all(name.lower() != "authorization" for name, _ in response.json()["headers"])
            response = await client.get(url + f"&rstream.token={good}&z=%20")
            assert response.status_code == 200
            assert response.json()["target"] == "/echo?keep=1&z=%20"
            two = await client.get(url + f"&rstream.token={good}", headers={"Authorization": f"Bearer {good}"})
            assert two.status_code == 400


async def test_trusted_ips(engine, standin):
    async with published(engine, "trusted", standin.server_address[1], trusted_ips=("127.0.0.2", "10.0.0.0/8", "::1")):
        url = engine.url("trusted.t.localhost", "/echo")
        async with engine.public_client(local_address="127.0.0.2") as allowed:
            response = await allowed.get(url)
            assert response.status_code == 200
            assert dict((k.lower(), v) for k, v in response.json()["headers"])["x-forwarded-for"] == "127.0.0.2"
        async with engine.public_client(local_address="127.0.0.3") as refused:
            response = await refused.get(url)
            assert response.status_code == 403 and response.text == "source address not allowed\n"


# ---------------------------------------------------------------- failures


async def test_failure_statuses(engine, standin):
    async with engine.public_client() as client:
        response = await client.get(engine.url("nobody.t.localhost", "/"))
        assert (response.status_code, response.text) == (404, "no tunnel for nobody.t.localhost\n")
    # The agent's service hangs up at once: the agent closes the stream.
    async def hang_up(reader, writer):
        writer.close()

    dead = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    async with published(engine, "dead", dead.sockets[0].getsockname()[1]):
        async with engine.public_client() as client:
            response = await client.get(engine.url("dead.t.localhost", "/"))
            assert (response.status_code, response.text) == (502, "upstream refused the stream\n")
    dead.close()
    for option in ("rstream_auth", "challenge_mode", "mtls_auth"):
        async with engine.client() as agent:
            control = await agent.connect()
            with pytest.raises(EngineError) as refused:
                await control.create_tunnel(publish=True, **{option: True})
            assert refused.value.engine_code == FEATURE_NOT_AVAILABLE
            await control.close()


async def test_http_listener_redirects(make_engine):
    engine = make_engine('http: {enabled: true, listen_addr: "127.0.0.1:0"}\n')
    code, out, err = await run("curl", "-sS", "-i", "-H", "Host: app.t.localhost", f"http://{engine.http_addr}/a/%2Fb?c=d")
    assert code == 0, err
    assert out.startswith(b"HTTP/1.1 308"), out
    assert f"location: https://app.t.localhost:{engine.port}/a/%2Fb?c=d\r\n".encode() in out


# ---------------------------------------------------------------- TLS tunnels


async def test_tls_terminated_with_openssl(engine, echo_port):
    async with published(engine, "term", echo_port, protocol="tls", tls_mode="terminated", tls_alpns=("x-echo",), tls_min_version="1.3"):
        out = await s_client(
            engine, "term.t.localhost", "-CAfile", str(engine.ca), "-verify_return_error", "-alpn", "x-echo",
            send=b"hello terminated\n",
        )
        assert out.count(b"hello terminated") == 1, out
        assert b"Verify return code: 0 (ok)" in out
        assert b"ALPN protocol: x-echo" in out
        assert b"TLSv1.3" in out


async def test_tls_passthrough_serves_the_agents_certificate(engine, tmp_path):
    import ssl
    import subprocess

    from conftest import BIN

    agent_dir = tmp_path / "agent-certs"
    agent_dir.mkdir()
    subprocess.run(
        [BIN / "strait-engine", "gen-certs", "--host", "localhost", "--out", agent_dir],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(agent_dir / "cert.pem", agent_dir / "key.pem")

    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with published(engine, "pass", port, protocol="tls", tls_mode="passthrough"):
        out = await s_client(
            engine, "pass.t.localhost", "-CAfile", str(agent_dir / "ca.pem"), "-verify_return_error",
            send=b"hello passthrough\n",
        )
        assert out.count(b"hello passthrough") == 1, out
        assert b"Verify return code: 0 (ok)" in out
        # The engine's CA does not vouch for what the client sees.
        code, out, err = await run(
            "openssl", "s_client", "-connect", f"127.0.0.1:{engine.port}", "-servername", "pass.t.localhost",
            "-CAfile", str(engine.ca), "-verify_return_error", stdin=b"",
        )
        assert code != 0
    server.close()

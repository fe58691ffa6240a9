"""Path routing and per-tunnel policy (the `strait.route.path`,
`strait.route.strip` and `strait.policy` labels) set through the official
rstream Python SDK's `create_tunnel(labels=...)`, with httpx (HTTP/1.1 and
HTTP/2) and httpcore (request targets httpx would normalise) as the public
side. The engine's own proof is crates/engine/tests/routing_policy.rs;
this one shows that any rstream client gets the same behaviour.

- Keystone (spec/workloads.md): one hostname from two SDK agents of one
  principal: `/api/` stripped to a control API stand-in (SSE, CORS
  preflight), `/rtc/` to a WHIP stand-in (POST 201 + Location, PATCH and
  DELETE 204), everything else to the static UI served by a real nginx.
- Rend: `/internal/*` and `/metrics` denied (404, the services count no
  hit, encoded and dotted spellings included), `/v1/` and `/v/` split to
  two services, a fallback that joins later (before it: 404 "no route for
  this path"), and `allow_methods` (405 + Allow). Its 200 MiB immutable
  artifact behind the edge cache: 50 concurrent cold GETs by curl
  (HTTP/1.1 and HTTP/2 mixed) reach the service once and all get the same
  bytes (cksum); a Range is then a 206 HIT.
- Policies: basic auth with bcrypt hashes from the Python `bcrypt` package
  (`$2b$` and htpasswd's `$2y$`), the rate limit reaching 429 and
  recovering, the upstream Host, header rules, cookie and Location
  rewriting and the body limit, and bad labels refused with INVALID_REQUEST
  naming the key, raised by the SDK as `EngineError`.

No port is fixed (services bind port 0; nginx gets one found free by
binding port 0), every wait is bounded, and readiness is a port that
accepts or a line printed, never a timer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import pathlib
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import bcrypt
import httpcore
import httpx
import pytest
from rstream.errors import EngineError

import media
from conftest import _Loopback
from test_published import StandIn

INVALID_REQUEST = 2000
# The most one public request or one step of a stream may take here; only
# a broken engine reaches it.
REQUEST_TIMEOUT = 30.0


# ---------------------------------------------------------------- stand-ins


@dataclass
class Seen:
    """One request as a stand-in service received it."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class Handler(StandIn):
    """Records every request, then lets its server's `answer` respond
    (StandIn brings keep-alive HTTP/1.1, `_send` and `_read_body`)."""

    def _handle(self) -> None:
        seen = Seen(self.command, self.path, list(self.headers.items()), b"".join(self._read_body()))
        with self.server.lock:
            self.server.seen.append(seen)
        self.server.answer(self, seen)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _handle


class Service(http.server.ThreadingHTTPServer):
    """A stand-in service on 127.0.0.1:0 in its own threads."""

    daemon_threads = True

    def __init__(self, name: str, answer: Callable[[Handler, Seen], None]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.name = name
        self.answer = answer
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        # Holds the SSE stream after its first event until the test has it.
        self.release = threading.Event()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def targets(self) -> list[str]:
        with self.lock:
            return [f"{s.method} {s.target}" for s in self.seen]


@pytest.fixture
def services():
    """Starts stand-in services; stops them all at the end."""
    started: list[Service] = []

    def start(name: str, answer: Callable[[Handler, Seen], None]) -> Service:
        service = Service(name, answer)
        threading.Thread(target=service.serve_forever, daemon=True).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.release.set()
        service.shutdown()
        service.server_close()


def echo(name: str, extra: list[tuple[str, str]] = ()) -> Callable[[Handler, Seen], None]:
    """Answers 200 with what it was sent, as JSON."""

    def answer(handler: Handler, seen: Seen) -> None:
        body = json.dumps(
            {"service": name, "method": seen.method, "target": seen.target, "headers": seen.headers, "length": len(seen.body)}
        ).encode()
        if seen.method == "HEAD":
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            return
        handler._send(200, body, [("Content-Type", "application/json"), *extra])

    return answer


SSE_EVENTS = [
    b'id: 1\nevent: stream\ndata: {"stream": "cam-1", "state": "starting"}\n\n',
    b'id: 2\nevent: stream\ndata: {"stream": "cam-1", "state": "live"}\n\n',
    b"id: 3\nevent: viewers\ndata: 42\n\n",
]

CORS_ORIGIN = "https://studio.example"


def control_api(handler: Handler, seen: Seen) -> None:
    """The Keystone control API: `/events` (SSE: the first event, then,
    once the test has it, the rest), CORS preflights, JSON otherwise."""
    path = urllib.parse.urlsplit(seen.target).path
    if seen.method == "OPTIONS":
        handler._send(
            204,
            headers=[
                ("Access-Control-Allow-Origin", seen.header("Origin") or "*"),
                ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", "Authorization, Content-Type"),
                ("Access-Control-Allow-Credentials", "true"),
                ("Access-Control-Max-Age", "600"),
                ("Vary", "Origin"),
            ],
        )
    elif path == "/events":
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for n, event in enumerate(SSE_EVENTS):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            handler.wfile.flush()
            if n == 0:
                # Bounded: the test releases it as soon as the first
                # event reached the public client.
                handler.server.release.wait(REQUEST_TIMEOUT)
        handler.wfile.write(b"0\r\n\r\n")
    else:
        echo("api")(handler, seen)


def whip(handler: Handler, seen: Seen) -> None:
    """The Keystone edge-gateway's WHIP: POST an offer -> 201 + Location;
    PATCH (trickle ICE) and DELETE the session -> 204."""
    sessions = handler.server.__dict__.setdefault("sessions", {})
    path = urllib.parse.urlsplit(seen.target).path
    if path == "/rtc/v1/whip/live/cam-1" and seen.method == "POST":
        if seen.header("Content-Type") != "application/sdp" or not seen.body.startswith(b"v=0"):
            handler._send(400, b"not an SDP offer")
            return
        sessions["s1"] = '"e1"'
        handler._send(
            201,
            b"v=0\r\no=- 2 2 IN IP4 127.0.0.1\r\ns=answer\r\n",
            [
                ("Content-Type", "application/sdp"),
                ("Location", "/rtc/v1/whip/sessions/s1"),
                ("ETag", '"e1"'),
                ("Access-Control-Expose-Headers", "Location, ETag"),
            ],
        )
    elif path.startswith("/rtc/v1/whip/sessions/"):
        session = path.rsplit("/", 1)[1]
        if session not in sessions:
            handler._send(404, b"no such session")
        elif seen.method == "PATCH":
            if seen.header("Content-Type") != "application/trickle-ice-sdpfrag" or not seen.body:
                handler._send(415, b"not an ICE fragment")
            elif seen.header("If-Match") != sessions[session]:
                handler._send(412, b"etag mismatch")
            else:
                sessions[session] = '"e2"'
                handler._send(204, headers=[("ETag", '"e2"')])
        elif seen.method == "DELETE":
            del sessions[session]
            handler._send(204)
        else:
            handler._send(405, b"", [("Allow", "PATCH, DELETE")])
    else:
        handler._send(404, b"whip: no route")


# ---------------------------------------------------------------- nginx


INDEX_HTML = (
    "<!doctype html>\n<html><head><title>Keystone studio</title>"
    '<script type="module" src="/assets/app.js"></script></head>\n'
    "<body><main id=keystone-ui>go live</main></body></html>\n"
)
APP_JS = 'fetch("/api/v1/streams").then((r) => r.json());\n'


async def nginx_static(folder: pathlib.Path) -> media.Nginx:
    """A real nginx serving the static UI from `folder/www`: one
    foreground process (`-g 'daemon off;'`, no master) on 127.0.0.1 with
    its own prefix, config, pid, temp and log paths in `folder`."""
    www = folder / "www"
    (www / "assets").mkdir(parents=True)
    (www / "index.html").write_text(INDEX_HTML)
    (www / "assets" / "app.js").write_text(APP_JS)

    async def start(port: int) -> media.Nginx:
        config = folder / "nginx.conf"
        config.write_text(
            "master_process off;\n"
            "worker_processes 1;\n"
            f"pid {folder / 'nginx.pid'};\n"
            "error_log stderr notice;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            "    types { text/html html; text/javascript js; }\n"
            "    default_type application/octet-stream;\n"
            f"    access_log {folder / 'access.log'};\n"
            f"    client_body_temp_path {folder / 'client_body'};\n"
            f"    proxy_temp_path {folder / 'proxy'};\n"
            f"    fastcgi_temp_path {folder / 'fastcgi'};\n"
            f"    uwsgi_temp_path {folder / 'uwsgi'};\n"
            f"    scgi_temp_path {folder / 'scgi'};\n"
            "    server {\n"
            f"        listen 127.0.0.1:{port};\n"
            f"        root {www};\n"
            "        index index.html;\n"
            "    }\n"
            "}\n"
        )
        argv = [media.sbin("nginx"), "-p", str(folder), "-c", str(config), "-e", "stderr", "-g", "daemon off;"]
        service = await media.Service.start("nginx", argv, folder / f"nginx-{port}.log")
        try:
            await service.wait_port(port)
        except RuntimeError:
            await service.stop()
            raise
        return media.Nginx(service, port)

    return await media.start_on_a_free_port(start)


@pytest.fixture
async def nginx(tmp_path):
    server = await nginx_static(tmp_path / "nginx")
    yield server
    await server.stop()


# ---------------------------------------------------------------- SDK agents


def labels(path: str | None = None, strip: bool = False, policy: dict | str | None = None) -> dict[str, str]:
    """The routing and policy labels of one tunnel."""
    found: dict[str, str] = {}
    if path is not None:
        found["strait.route.path"] = path
    if strip:
        found["strait.route.strip"] = "true"
    if policy is not None:
        found["strait.policy"] = policy if isinstance(policy, str) else json.dumps(policy)
    return found


@dataclass
class Agent:
    """One SDK client with its control channel and the tunnels it serves."""

    control: object
    tunnels: list = field(default_factory=list)
    forwards: list[asyncio.Task] = field(default_factory=list)

    async def publish(self, hostname: str, port: int, tunnel_labels: dict[str, str], **options):
        tunnel = await asyncio.wait_for(
            self.control.create_tunnel(publish=True, hostname=hostname, labels=tunnel_labels, **options),
            REQUEST_TIMEOUT,
        )
        self.tunnels.append(tunnel)
        self.forwards.append(asyncio.create_task(tunnel.forward_to("127.0.0.1", port)))
        return tunnel


@contextlib.asynccontextmanager
async def agent(engine):
    """An SDK agent of alice (its own client and control channel), closed
    at the end."""
    async with engine.client() as client:
        control = await asyncio.wait_for(client.connect(), REQUEST_TIMEOUT)
        running = Agent(control)
        try:
            yield running
        finally:
            for task in running.forwards:
                task.cancel()
            await asyncio.wait_for(control.close(), REQUEST_TIMEOUT)


def public(engine, http2: bool) -> httpx.AsyncClient:
    client = engine.public_client(http2=http2)
    client.timeout = httpx.Timeout(REQUEST_TIMEOUT)
    return client


@contextlib.asynccontextmanager
async def raw_public(engine, http2: bool):
    """An httpcore pool that sends request targets as given: httpx
    resolves `..` and `.` segments before sending, a hostile client does
    not."""
    pool = httpcore.AsyncConnectionPool(
        ssl_context=engine.ssl_context(), http1=not http2, http2=http2, network_backend=_Loopback(None)
    )
    async with pool:
        yield pool


async def raw_request(pool, engine, host: str, method: str, target: str) -> tuple[int, bytes]:
    response = await pool.request(
        method,
        httpcore.URL(scheme="https", host=host, port=engine.port, target=target),
        headers=[("Host", f"{host}:{engine.port}")],
        extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), REQUEST_TIMEOUT)},
    )
    return response.status, response.content


def version(http2: bool) -> str:
    return "HTTP/2" if http2 else "HTTP/1.1"


# ---------------------------------------------------------------- Keystone


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_keystone_one_hostname_from_two_agents(engine, services, nginx, http2):
    host = "keystone.t.localhost"
    api = services("api", control_api)
    rtc = services("rtc", whip)
    async with agent(engine) as first, agent(engine) as second:
        # The control API and the UI on one agent, the WHIP gateway on
        # another (its own SDK client and control channel).
        api_tunnel = await first.publish(host, api.port, labels("/api/", strip=True))
        ui_tunnel = await first.publish(host, nginx.port, labels())
        rtc_tunnel = await second.publish(host, rtc.port, labels("/rtc/"))
        assert first.control is not second.control
        for tunnel, path in ((api_tunnel, "/api/"), (ui_tunnel, None), (rtc_tunnel, "/rtc/")):
            assert tunnel.properties.hostname == host
            assert tunnel.forwarding_address == f"https://{host}:{engine.port}"
            assert tunnel.properties.labels.get("strait.route.path") == path

        async with public(engine, http2) as client:
            url = lambda target: engine.url(host, target)  # noqa: E731

            # The static UI: nginx's own index.html at `/`.
            index = await client.get(url("/"))
            assert index.http_version == version(http2)
            assert index.status_code == 200, index.text
            assert index.headers["server"].startswith("nginx"), index.headers
            assert index.headers["content-type"] == "text/html"
            assert index.text == INDEX_HTML
            script = await client.get(url("/assets/app.js"))
            assert (script.status_code, script.text) == (200, APP_JS)
            assert script.headers["content-type"] == "text/javascript"
            # Paths the prefixes do not take fall back to the UI (nginx's 404).
            for target in ("/api", "/apix/streams", "/rtc"):
                miss = await client.get(url(target))
                assert miss.status_code == 404 and miss.headers["server"].startswith("nginx"), (target, miss.text)

            # The control API, stripped of `/api`, the query byte for byte.
            streams = await client.get(url("/api/v1/streams?state=live&q=%2Fcam%201&x"))
            assert streams.status_code == 200, streams.text
            assert streams.json()["target"] == "/v1/streams?state=live&q=%2Fcam%201&x"
            assert (await client.get(url("/api/"))).json()["target"] == "/"

            # Its CORS preflight, answered by the API itself.
            preflight = await client.options(
                url("/api/v1/streams"),
                headers={
                    "Origin": CORS_ORIGIN,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            assert preflight.status_code == 204, preflight.text
            assert preflight.headers["access-control-allow-origin"] == CORS_ORIGIN
            assert preflight.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
            assert preflight.headers["access-control-allow-headers"] == "Authorization, Content-Type"
            assert preflight.headers["access-control-allow-credentials"] == "true"
            assert preflight.headers["access-control-max-age"] == "600"

            # Server-sent events: the first one arrives while the API
            # holds the rest back (nothing buffers the stream), then the
            # others, then the end.
            async with client.stream("GET", url("/api/events"), headers={"Accept": "text/event-stream"}) as events:
                assert events.status_code == 200
                assert events.headers["content-type"] == "text/event-stream"
                assert events.headers["cache-control"] == "no-cache"
                chunks = events.aiter_raw()
                received = b""
                while b"\n\n" not in received:
                    received += await asyncio.wait_for(chunks.__anext__(), REQUEST_TIMEOUT)
                assert received == SSE_EVENTS[0]
                api.release.set()
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    received += b"".join([chunk async for chunk in chunks])
            assert received == b"".join(SSE_EVENTS)

            # WHIP: offer, trickle ICE, teardown; `/rtc/` is not stripped
            # and the workload's own Authorization passes untouched.
            offer = await client.post(
                url("/rtc/v1/whip/live/cam-1"),
                content=b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=offer\r\n",
                headers={"Content-Type": "application/sdp", "Authorization": "Bearer workload-token"},
            )
            assert offer.status_code == 201, offer.text
            assert offer.headers["content-type"] == "application/sdp"
            assert offer.content.startswith(b"v=0\r\n")
            location = offer.headers["location"]
            assert location == "/rtc/v1/whip/sessions/s1"
            assert offer.headers["access-control-expose-headers"] == "Location, ETag"
            patch = await client.patch(
                url(location),
                content=b"a=candidate:1 1 udp 2130706431 192.0.2.1 5000 typ host\r\n",
                headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": offer.headers["etag"]},
            )
            assert (patch.status_code, patch.content, patch.headers["etag"]) == (204, b"", '"e2"')
            stale = await client.patch(
                url(location), content=b"a=x\r\n", headers={"Content-Type": "application/trickle-ice-sdpfrag", "If-Match": '"e1"'}
            )
            assert stale.status_code == 412
            delete = await client.delete(url(location), headers={"Authorization": "Bearer workload-token"})
            assert (delete.status_code, delete.content) == (204, b"")
            assert (await client.delete(url(location))).status_code == 404

    # Each service saw only its own paths, in the form it should.
    assert api.targets() == [
        "GET /v1/streams?state=live&q=%2Fcam%201&x",
        "GET /",
        "OPTIONS /v1/streams",
        "GET /events",
    ]
    assert rtc.targets() == [
        "POST /rtc/v1/whip/live/cam-1",
        "PATCH /rtc/v1/whip/sessions/s1",
        "PATCH /rtc/v1/whip/sessions/s1",
        "DELETE /rtc/v1/whip/sessions/s1",
        "DELETE /rtc/v1/whip/sessions/s1",
    ]
    assert rtc.seen[0].header("Authorization") == "Bearer workload-token"
    assert rtc.seen[3].header("Authorization") == "Bearer workload-token"
    assert all(s.header("X-Forwarded-Host") == f"{host}:{engine.port}" for s in api.seen + rtc.seen)
    # nginx served the UI's requests (and its misses) itself.
    access = (nginx.service.log_path.parent / "access.log").read_text()
    assert '"GET / HTTP/1.1" 200' in access and '"GET /assets/app.js HTTP/1.1" 200' in access, access
    assert '"GET /apix/streams HTTP/1.1" 404' in access, access


# ---------------------------------------------------------------- Rend


REND_DENY = ["/internal/*", "/metrics"]


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_rend_denied_paths_and_split_services(engine, services, http2):
    host = "rend.t.localhost"
    api = services("api", echo("api"))
    edge = services("edge", echo("edge"))
    site = services("site", echo("site"))
    async with agent(engine) as origin:
        await origin.publish(host, api.port, labels("/v1/", policy={"deny_paths": [*REND_DENY, "/v1/internal/*"]}))
        await origin.publish(
            host, edge.port, labels("/v/", policy={"deny_paths": REND_DENY, "allow_methods": ["GET", "HEAD", "OPTIONS"]})
        )
        async with public(engine, http2) as client, raw_public(engine, http2) as raw:
            url = lambda target: engine.url(host, target)  # noqa: E731
            # No fallback yet: paths no prefix takes have no route.
            for target in ("/", "/v1", "/internal/x"):
                answer = await client.get(url(target))
                assert answer.http_version == version(http2)
                assert (answer.status_code, answer.text) == (404, "no route for this path\n"), target

            async with agent(engine) as site_agent:
                await site_agent.publish(host, site.port, labels(policy={"deny_paths": REND_DENY}))

                # Denied, however spelt, by whichever tunnel the path
                # routes to; no service sees any of them.
                for target in (
                    "/internal/x",
                    "/internal/",
                    "/internal/a/b?c=d",
                    "/metrics",
                    "/metrics?format=prometheus",
                    "/%69nternal/x",
                    "/%2Finternal/x",
                    "//internal/y",
                    "/v1/internal/keys",
                ):
                    answer = await client.get(url(target))
                    assert (answer.status_code, answer.text) == (404, "not found\n"), target
                for target in ("/v1/../internal/x", "/v/../metrics", "/./metrics", "/x/..//internal/z", "/v/%2e%2e/metrics"):
                    # The service would resolve these differently from the
                    # route: refused, never guessed at.
                    status, body = await raw_request(raw, engine, host, "GET", target)
                    assert (status, body) == (400, b"bad request: dot segments in the path\n"), target
                head = await client.head(url("/metrics"))
                assert (head.status_code, head.content) == (404, b"")
                assert api.targets() == edge.targets() == site.targets() == [], "a denied request reached a service"

                # The split: `/v1/` to the API, `/v/` to the playback
                # edge, the rest to the site; nothing stripped.
                cases = {
                    "/v1/videos?id=7&sig=a%2Fb+c": "api",
                    "/v1/metrics": "api",
                    "/v1/": "api",
                    "/v/abc/master.m3u8?token=x%3D": "edge",
                    "/v/abc/seg-0.ts": "edge",
                    "/": "site",
                    "/v1": "site",
                    "/v": "site",
                    "/internals": "site",
                    "/metrics2": "site",
                    "/watch/abc": "site",
                }
                for target, service in cases.items():
                    answer = await client.get(url(target))
                    assert answer.status_code == 200, (target, answer.text)
                    assert answer.json()["service"] == service and answer.json()["target"] == target, answer.json()

                # The edge takes reads only.
                refused = await client.delete(url("/v/abc/seg-0.ts"))
                assert refused.status_code == 405
                assert refused.headers["allow"] == "GET, HEAD, OPTIONS"
                preflight = await client.options(url("/v/abc/seg-0.ts"), headers={"Origin": "https://site.example"})
                assert preflight.json()["service"] == "edge"

            # The fallback leaves with its agent; the prefixes stay.
            gone = await client.get(url("/watch/abc"))
            assert (gone.status_code, gone.text) == (404, "no route for this path\n")
            assert (await client.get(url("/v1/videos"))).json()["service"] == "api"

    assert api.targets() == ["GET /v1/videos?id=7&sig=a%2Fb+c", "GET /v1/metrics", "GET /v1/", "GET /v1/videos"]
    assert edge.targets() == [
        "GET /v/abc/master.m3u8?token=x%3D",
        "GET /v/abc/seg-0.ts",
        "OPTIONS /v/abc/seg-0.ts",
    ]
    assert site.targets() == [f"GET {t}" for t in ("/", "/v1", "/v", "/internals", "/metrics2", "/watch/abc")]


# ---------------------------------------------------------------- policies


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_basic_auth_with_bcrypt_hashes(engine, services, http2):
    host = "private.t.localhost"
    app = services("app", echo("app"))
    ann = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    # htpasswd -B writes $2y$, the same algorithm under another name.
    bob = "$2y$" + bcrypt.hashpw(b"pa:ss w0rd", bcrypt.gensalt(rounds=5)).decode()[4:]
    assert ann.startswith("$2b$04$") and bob.startswith("$2y$05$")
    async with agent(engine) as alice:
        await alice.publish(host, app.port, labels(policy={"basic_auth": [f"ann:{ann}", f"bob:{bob}"]}))
        async with public(engine, http2) as client:
            url = engine.url(host, "/in?x=1")
            refused = await client.get(url)
            assert refused.http_version == version(http2)
            assert (refused.status_code, refused.text) == (401, "authentication required\n")
            assert refused.headers["www-authenticate"] == 'Basic realm="strait", charset="UTF-8"'
            for authorization in (
                basic("ann", "wrong"),
                basic("ann", "S3cret"),
                basic("eve", "s3cret"),
                basic("bob", "pa:ss w0rx"),
                "Bearer s3cret",
                "Basic !!not-base64",
            ):
                answer = await client.get(url, headers={"Authorization": authorization})
                assert answer.status_code == 401, authorization
                assert answer.headers["www-authenticate"].startswith("Basic ")
            assert app.targets() == [], "a refused request reached the service"

            for user, password in (("ann", "s3cret"), ("bob", "pa:ss w0rd"), ("ann", "s3cret")):
                answer = await client.get(url, headers={"Authorization": basic(user, password), "X-Keep": "1"})
                assert answer.status_code == 200, (user, answer.text)
                seen = dict((k.lower(), v) for k, v in answer.json()["headers"])
                assert "authorization" not in seen, f"the proof was forwarded: {seen}"
                assert seen["x-keep"] == "1"
    assert app.targets() == ["GET /in?x=1"] * 3


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_rate_limit_reaches_429_and_recovers(engine, services, http2):
    host = "limited.t.localhost"
    app = services("app", echo("app"))
    async with agent(engine) as alice:
        await alice.publish(host, app.port, labels(policy={"rate_limit": {"requests_per_second": 1, "burst": 3}}))
        async with public(engine, http2) as client:
            url = engine.url(host, "/")
            answers = [await client.get(url) for _ in range(6)]
            statuses = [a.status_code for a in answers]
            # Three at once, then refusals: at one token a second, at most
            # one of the next three can find a token back.
            assert statuses[:3] == [200, 200, 200], statuses
            assert statuses[3:].count(429) >= 2, statuses
            for answer in answers:
                if answer.status_code == 429:
                    assert answer.text == "too many requests, retry later\n"
                    assert answer.headers["retry-after"] == "1"
            assert len(app.seen) == statuses.count(200), "a refused request reached the service"
            # Time semantics, not synchronisation: a token comes back
            # after a second, so the bucket has one again after 1.2 s.
            await asyncio.sleep(1.2)
            recovered = await client.get(url)
            assert recovered.status_code == 200, recovered.text
            assert recovered.http_version == version(http2)


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_upstream_host_header_rules_and_body_limit(engine, services, http2):
    host = "rewrite.t.localhost"
    app = services(
        "app",
        echo(
            "app",
            [("Location", "http://api.internal/next?x=1"), ("Set-Cookie", "sid=1; Domain=api.internal; Path=/; HttpOnly")],
        ),
    )
    policy = {
        "host": "api.internal",
        "rewrite_location": True,
        "request_headers": {"set": {"x-env": "prod"}, "remove": ["x-debug"]},
        "response_headers": {"set": {"strict-transport-security": "max-age=60"}, "remove": ["server"]},
        "max_request_body_bytes": 10,
    }
    async with agent(engine) as alice:
        await alice.publish(host, app.port, labels(policy=policy))
        async with public(engine, http2) as client:
            url = engine.url(host, "/a?b=%2F")
            answer = await client.get(url, headers={"x-debug": "1", "x-env": "dev", "x-keep": "k"})
            assert answer.status_code == 200, answer.text
            assert answer.http_version == version(http2)
            seen = app.seen[-1]
            assert seen.target == "/a?b=%2F"
            assert seen.header("Host") == "api.internal"
            assert seen.header("X-Forwarded-Host") == f"{host}:{engine.port}"
            assert seen.header("x-env") == "prod" and seen.header("x-debug") is None and seen.header("x-keep") == "k"
            assert answer.headers["strict-transport-security"] == "max-age=60"
            assert "server" not in answer.headers
            assert answer.headers["set-cookie"] == f"sid=1; Domain={host}; Path=/; HttpOnly"
            # The Location is rewritten to the published name (the port
            # is checked by test_a_rewritten_location_keeps_the_public_port).
            assert urllib.parse.urlsplit(answer.headers["location"]).hostname == host
            assert answer.headers["location"].endswith("/next?x=1")

            small = await client.post(url, content=b"0123456789")
            assert small.status_code == 200 and small.json()["length"] == 10
            large = await client.post(url, content=b"0123456789a")
            assert (large.status_code, large.text) == (413, "request body too large\n")
    assert [s.method for s in app.seen] == ["GET", "POST"], "the body over the limit reached the service"


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
async def test_a_rewritten_location_keeps_the_public_port(engine, services, http2):
    """The client reached `https://<name>:<port>`; a Location pointed back
    at the public side must name the same origin, or a browser follows it
    to port 443."""
    host = "origin.t.localhost"
    app = services("app", echo("app", [("Location", "http://api.internal/next?x=1")]))
    async with agent(engine) as alice:
        tunnel = await alice.publish(host, app.port, labels(policy={"host": "api.internal", "rewrite_location": True}))
        async with public(engine, http2) as client:
            answer = await client.get(engine.url(host, "/"))
            assert answer.status_code == 200, answer.text
            assert answer.headers["location"] == f"{tunnel.forwarding_address}/next?x=1"


BAD_LABELS = [
    ({"strait.route.path": "api/"}, "strait.route.path"),
    ({"strait.route.path": "/a/../b/"}, "strait.route.path"),
    ({"strait.route.strip": "true"}, "strait.route.strip needs strait.route.path"),
    ({"strait.route.path": "/a/", "strait.route.strip": "maybe"}, "strait.route.strip"),
    ({"strait.policy": "not json"}, "strait.policy: not JSON"),
    ({"strait.policy": "[]"}, "strait.policy: must be an object"),
    ({"strait.policy": '{"deny_paths": [1]}'}, "strait.policy: deny_paths[0]: invalid type"),
    ({"strait.policy": '{"deny_paths": ["internal"]}'}, "deny_paths"),
    ({"strait.policy": '{"colour": 1}'}, "unknown field `colour`"),
    ({"strait.policy": '{"allow_methods": []}'}, "allow_methods"),
    ({"strait.policy": '{"basic_auth": ["ann:plaintext"]}'}, "basic_auth: user ann"),
    ({"strait.policy": '{"basic_auth": ["ann:$2y$10$short"]}'}, "bcrypt"),
    ({"strait.policy": '{"rate_limit": {"requests_per_second": -1}}'}, "rate_limit"),
    ({"strait.policy": '{"rate_limit": {"requests_per_second": 5, "burst": 0}}'}, "burst"),
    ({"strait.policy": '{"rate_limit": {"rps": 5}}'}, "unknown field `rps`"),
    ({"strait.policy": '{"host": "a b"}'}, "host"),
    ({"strait.policy": '{"rewrite_location": true}'}, "rewrite_location"),
    ({"strait.policy": '{"request_headers": {"set": {"content-length": "1"}}}'}, "request_headers"),
    ({"strait.policy": '{"response_timeout_seconds": 0}'}, "response_timeout_seconds"),
]


# Values of the wrong JSON type: refused with INVALID_REQUEST, the message
# naming the key it is about.
BAD_TYPES = [
    ('{"max_request_body_bytes": -1}', "max_request_body_bytes"),
    ('{"deny_paths": [1]}', "deny_paths"),
    ('{"rate_limit": 5}', "rate_limit"),
    ('{"rate_limit": {"requests_per_second": "fast"}}', "requests_per_second"),
    ('{"rewrite_location": "yes"}', "rewrite_location"),
    ('{"response_timeout_seconds": 1.5}', "response_timeout_seconds"),
    ('{"host": 5}', "host"),
]


async def test_a_value_of_the_wrong_type_is_refused_naming_the_key(engine, services):
    app = services("app", echo("app"))
    unnamed = []
    async with agent(engine) as alice:
        for policy, key in BAD_TYPES:
            with pytest.raises(EngineError) as refused:
                await alice.publish("bad.t.localhost", app.port, {"strait.policy": policy})
            assert refused.value.engine_code == INVALID_REQUEST, (policy, refused.value)
            if key not in str(refused.value):
                unnamed.append(f"{policy} -> {refused.value}")
    assert app.targets() == []
    assert not unnamed, "refusals that do not name the key:\n" + "\n".join(unnamed)


async def test_bad_routes_and_policies_are_refused_naming_the_key(engine, services):
    app = services("app", echo("app"))
    async with agent(engine) as alice:
        for bad, key in BAD_LABELS:
            with pytest.raises(EngineError) as refused:
                await alice.publish("bad.t.localhost", app.port, bad)
            assert refused.value.engine_code == INVALID_REQUEST, (bad, refused.value)
            assert key in str(refused.value), (bad, str(refused.value))
        # Policy labels on what is not a published http tunnel, and basic
        # auth beside token auth.
        with pytest.raises(EngineError) as refused:
            await asyncio.wait_for(alice.control.create_tunnel(labels={"strait.policy": "{}"}), REQUEST_TIMEOUT)
        assert refused.value.engine_code == INVALID_REQUEST
        assert "apply to published http tunnels only" in str(refused.value)
        hash_ = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
        with pytest.raises(EngineError) as refused:
            await alice.publish(
                "bad.t.localhost", app.port, labels(policy={"basic_auth": [f"ann:{hash_}"]}), token_auth=True
            )
        assert refused.value.engine_code == INVALID_REQUEST
        assert "basic_auth and token_auth" in str(refused.value)

        # Nothing of a refused tunnel is served, and the control channel
        # carries on: the same hostname with a good policy works.
        async with public(engine, False) as client:
            answer = await client.get(engine.url("bad.t.localhost", "/"))
            assert (answer.status_code, answer.text) == (404, "no tunnel for bad.t.localhost\n")
            await alice.publish("bad.t.localhost", app.port, labels(policy={"deny_paths": ["/metrics"]}))
            assert (await client.get(engine.url("bad.t.localhost", "/ok"))).json()["target"] == "/ok"
            assert (await client.get(engine.url("bad.t.localhost", "/metrics"))).status_code == 404
    assert app.targets() == ["GET /ok"]


# ------------------------------------------------------ Rend's edge cache

ARTIFACT_BYTES = 200 << 20
COLD_GETS = 50


def artifact(body: bytes) -> Callable[[Handler, Seen], None]:
    """Serves one immutable object, as Rend's playback edge does."""

    def answer(handler: Handler, seen: Seen) -> None:
        headers = [("Content-Type", "application/octet-stream"), ("Cache-Control", "public, max-age=31536000, immutable")]
        if seen.method == "HEAD":
            handler.send_response(200)
            for name, value in headers:
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            return
        handler._send(200, body, headers)

    return answer


async def curl_digest(
    engine, host: str, target: str, http2: bool, headers: pathlib.Path, extra: tuple[str, ...] = ()
) -> tuple[str, str, str]:
    """GETs an object with curl (HTTP/1.1 or HTTP/2) and returns the status
    line, the x-strait-cache value and the body's CRC as `cksum` prints it
    (`headers`: where curl puts the head). curl and cksum keep 200 MiB out
    of Python."""
    command = (
        f"curl --silent --show-error --fail-with-body {'--http2' if http2 else '--http1.1'} "
        f"--cacert {engine.ca} --resolve {host}:{engine.port}:127.0.0.1 --dump-header {headers} "
        f"{' '.join(extra)} {engine.url(host, target)} | cksum; cat {headers}"
    )
    proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    digest, _, head = out.decode().partition("\n")
    lines = head.splitlines()
    cache = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-strait-cache:")), "")
    return lines[0].strip(), cache, digest.strip()


async def test_rend_artifact_behind_the_edge_cache(engine, services, tmp_path):
    """spec/workloads.md, Rend: a 200 MiB immutable artifact behind the
    cache set through the SDK's labels; 50 concurrent GETs on a cold cache
    (HTTP/1.1 and HTTP/2 mixed) cause exactly one request at the service
    and all get the same bytes; a Range is then served from the cache."""
    host = "rend-cache.t.localhost"
    body = os.urandom(ARTIFACT_BYTES)
    proc = await asyncio.create_subprocess_exec("cksum", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    want, _ = await asyncio.wait_for(proc.communicate(body), 60)
    edge = services("edge", artifact(body))
    policy = {"cache": {"paths": ["/v/*"], "max_bytes": 512 << 20, "max_object_bytes": 256 << 20}}
    async with agent(engine) as origin:
        await origin.publish(host, edge.port, labels("/v/", policy=policy))
        answers = await asyncio.gather(
            *(curl_digest(engine, host, "/v/artifact.bin", i % 2 == 1, tmp_path / f"{i}.h") for i in range(COLD_GETS))
        )
        assert edge.targets() == ["GET /v/artifact.bin"], "one upstream request for 50 cold GETs"
        for status, cache, digest in answers:
            assert status.split()[1] == "200", status
            assert cache in ("MISS", "COALESCED", "HIT"), cache
            assert digest == want.decode().strip(), "every body is the artifact"
        assert sum(cache == "MISS" for _, cache, _ in answers) == 1, answers

        # A range of the stored object, from the cache.
        status, cache, digest = await curl_digest(
            engine, host, "/v/artifact.bin", False, tmp_path / "range.h", ("--range", "1000-1999")
        )
        assert (status.split()[1], cache) == ("206", "HIT"), (status, cache)
        proc = await asyncio.create_subprocess_exec("cksum", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        part, _ = await asyncio.wait_for(proc.communicate(body[1000:2000]), 60)
        assert digest == part.decode().strip()
        assert edge.targets() == ["GET /v/artifact.bin"]

#!/usr/bin/env python3
"""Small stand-ins for Rend's own services, Python standard library only.

    python3 standin.py api  --port 8000 --key "$REND_URL_KEY" --origin https://rend.t.edge.example.com
    python3 standin.py edge --port 8090 --key "$REND_URL_KEY" --hls http://127.0.0.1:8081

`api`: the Rend API.
  GET  /v1/session            Set-Cookie rend_session (Domain, HttpOnly, Secure, SameSite=None)
  GET  /v1/playback/<video>   {"url": "/v/<video>/index.m3u8?expires=…&sig=…"}: a signed URL
  GET  /v1/events             the SSE event stream (an event per upload, `: keep-alive` every 15 s)
  POST|PUT /v1/uploads/<name> streams the body through SHA-256: {"name", "bytes", "sha256"}
  GET  /admin/edges           the edge registry (the operators' page)
  OPTIONS *                   CORS preflight; every answer to an allowed Origin carries
                              credentialed CORS (Allow-Origin: that origin, Allow-Credentials)
  /internal/*, /metrics, /v1/internal/*, /v1/metrics answer 200: they exist here, the
  engine must keep the public from them.

`edge`: the playback edge. GET|HEAD /v/<video>/<file>?expires=E&sig=S, where
S = hex HMAC-SHA256(key, "/v/<video>/|E") and E (Unix seconds) is in the
future; otherwise 403. It fetches <hls>/<video>/<file> from the HLS origin
(nginx), passing Range and If-None-Match, and answers what nginx answers
(200, 206 with Content-Range, 304, 416; ETag, Last-Modified). Segments get
`Cache-Control: public, max-age=31536000, immutable, s-maxage=<seconds the
signature has left>`: a shared cache (the engine's edge cache, which keys on
path and query) never serves a signed URL past its expiry. Playlists get
their segment URIs signed with the same query and `no-cache`.

Every request a stand-in receives is recorded (`Service.requests`), so a test
can tell what reached it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import http.server
import json
import queue
import socket
import threading
import time
import urllib.parse

SSE_KEEPALIVE_SECONDS = 15
CHUNK = 1 << 20


def sign(key: bytes, video: str, expires: int) -> str:
    return hmac.new(key, f"/v/{video}/|{expires}".encode(), hashlib.sha256).hexdigest()


def signed_query(key: bytes, video: str, ttl: int = 3600, now: float | None = None) -> str:
    expires = int(now if now is not None else time.time()) + ttl
    return urllib.parse.urlencode({"expires": expires, "sig": sign(key, video, expires)})


class Service(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, **options) -> None:
        self.requests: list[str] = []
        self.lock = threading.Lock()
        # Open event streams, ended by stop().
        self.streams: set[socket.socket] = set()
        self.options = options
        super().__init__(address, handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def record(self, line: str) -> None:
        with self.lock:
            self.requests.append(line)

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(r.startswith(prefix) for r in self.requests)

    def start(self) -> Service:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stops listening and ends every open event stream."""
        self.shutdown()
        self.server_close()
        with self.lock:
            streams = list(self.streams)
        for stream in streams:
            try:
                stream.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Service

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def json(self, status: int, value, headers: dict[str, str] | None = None) -> None:
        self.answer(status, json.dumps(value).encode() + b"\n", headers)

    def body_chunks(self):
        """The request body as it arrives (Content-Length or chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(left, CHUNK))
                    if not chunk:
                        raise ConnectionError("body cut short")
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                chunk = self.rfile.read(min(left, CHUNK))
                if not chunk:
                    raise ConnectionError("body cut short")
                left -= len(chunk)
                yield chunk

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.record(f"{self.command} {self.path}")
        return ok


class ApiHandler(Handler):
    def cors(self) -> dict[str, str]:
        origin = self.headers.get("Origin")
        if origin and origin in self.server.options["origins"]:
            return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}
        return {}

    def do_OPTIONS(self) -> None:
        headers = self.cors()
        if headers:
            headers |= {
                "Access-Control-Allow-Methods": "GET, POST, PUT, OPTIONS",
                "Access-Control-Allow-Headers": self.headers.get("Access-Control-Request-Headers", "content-type"),
                "Access-Control-Max-Age": "600",
            }
        self.answer(204, b"", headers)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        key = self.server.options["key"]
        if path.startswith(("/internal/", "/v1/internal/")) or path in ("/metrics", "/v1/metrics"):
            self.answer(200, b"rend_uploads_total 1\n", ctype="text/plain")
        elif path == "/v1/session":
            cookie = f"rend_session=s{time.time_ns()}; Path=/; HttpOnly; Secure; SameSite=None"
            if domain := self.server.options.get("cookie_domain"):
                cookie += f"; Domain={domain}"
            self.json(200, {"user": "demo"}, {"Set-Cookie": cookie, **self.cors()})
        elif path.startswith("/v1/playback/"):
            video = path.removeprefix("/v1/playback/")
            url = f"/v/{video}/index.m3u8?{signed_query(key, video)}"
            self.json(200, {"video": video, "url": url}, {"Cache-Control": "no-store", **self.cors()})
        elif path == "/v1/events":
            self.events()
        elif path == "/admin/edges":
            self.json(200, {"edges": [{"name": "edge-1", "url": "http://127.0.0.1:8090"}]})
        else:
            self.json(404, {"error": "not found", "path": path}, self.cors())

    def events(self) -> None:
        inbox: queue.Queue[bytes] = queue.Queue()
        with self.server.lock:
            self.server.options["subscribers"].append(inbox)
            self.server.streams.add(self.connection)
        try:
            self.send_response(200)
            for name, value in {
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "Transfer-Encoding": "chunked",
                **self.cors(),
            }.items():
                self.send_header(name, value)
            self.end_headers()
            self.chunk(b"event: ready\ndata: {}\n\n")
            while True:
                try:
                    event = inbox.get(timeout=SSE_KEEPALIVE_SECONDS)
                except queue.Empty:
                    event = b": keep-alive\n\n"
                self.chunk(event)
        except (OSError, ValueError):
            pass
        finally:
            with self.server.lock:
                self.server.options["subscribers"].remove(inbox)
                self.server.streams.discard(self.connection)
            self.close_connection = True

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def publish(self, kind: str, data: dict) -> None:
        event = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
        with self.server.lock:
            for inbox in self.server.options["subscribers"]:
                inbox.put(event)

    def do_PUT(self) -> None:
        self.do_POST()

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if not path.startswith("/v1/uploads/"):
            for _ in self.body_chunks():
                pass
            self.json(404, {"error": "not found", "path": path}, self.cors())
            return
        name = path.removeprefix("/v1/uploads/")
        digest, size = hashlib.sha256(), 0
        for chunk in self.body_chunks():
            digest.update(chunk)
            size += len(chunk)
        result = {"name": name, "bytes": size, "sha256": digest.hexdigest()}
        self.publish("upload.done", result)
        self.json(201, result, self.cors())


class EdgeHandler(Handler):
    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/")  # ["", "v", video, file]
        if len(parts) != 4 or parts[1] != "v" or not parts[2] or not parts[3]:
            self.answer(404, b"not found\n", ctype="text/plain")
            return
        video, name = parts[2], parts[3]
        query = urllib.parse.parse_qs(url.query)
        try:
            expires = int(query["expires"][0])
            given = query["sig"][0]
        except (KeyError, ValueError):
            self.answer(403, b"unsigned\n", ctype="text/plain")
            return
        left = expires - int(time.time())
        if not hmac.compare_digest(given, sign(self.server.options["key"], video, expires)) or left <= 0:
            self.answer(403, b"bad or expired signature\n", ctype="text/plain")
            return
        origin = urllib.parse.urlsplit(self.server.options["hls"])
        upstream = http.client.HTTPConnection(origin.hostname, origin.port, timeout=30)
        forward = {k: v for k in ("Range", "If-Range", "If-None-Match") if (v := self.headers.get(k))}
        upstream.request(self.command, f"{origin.path.rstrip('/')}/{video}/{name}", headers=forward)
        reply = upstream.getresponse()
        headers = {k: v for k in ("Content-Range", "ETag", "Last-Modified", "Accept-Ranges") if (v := reply.getheader(k))}
        headers["Access-Control-Allow-Origin"] = "*"
        if name.endswith(".m3u8") and reply.status == 200:
            signed = url.query
            lines = [
                line if not line or line.startswith("#") else f"{line}?{signed}"
                for line in reply.read().decode().splitlines()
            ]
            headers.pop("ETag", None)
            headers["Cache-Control"] = "no-cache"
            self.answer(200, ("\n".join(lines) + "\n").encode(), headers, "application/vnd.apple.mpegurl")
            upstream.close()
            return
        if reply.status in (200, 206, 304):
            headers["Cache-Control"] = f"public, max-age=31536000, immutable, s-maxage={min(left, 31536000)}"
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.getheader("Content-Type", "video/mp2t"))
        if (length := reply.getheader("Content-Length")) is not None:
            self.send_header("Content-Length", length)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and reply.status not in (204, 304):
            while chunk := reply.read(CHUNK):
                self.wfile.write(chunk)
        upstream.close()


def api(port: int, key: bytes, origins: list[str], cookie_domain: str | None = None, host: str = "127.0.0.1") -> Service:
    return Service(
        (host, port), ApiHandler, key=key, origins=set(origins), cookie_domain=cookie_domain, subscribers=[]
    )


def edge(port: int, key: bytes, hls: str, host: str = "127.0.0.1") -> Service:
    return Service((host, port), EdgeHandler, key=key, hls=hls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["api", "edge"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True, help="the HMAC key of playback URLs (the same for api and edge)")
    parser.add_argument("--origin", action="append", default=[], help="a site origin allowed credentialed CORS (api)")
    parser.add_argument("--cookie-domain", help="the session cookie's Domain (api), e.g. t.edge.example.com")
    parser.add_argument("--hls", default="http://127.0.0.1:8081", help="the HLS origin (edge)")
    args = parser.parse_args()
    key = args.key.encode()
    if args.role == "api":
        service = api(args.port, key, args.origin, args.cookie_domain)
    else:
        service = edge(args.port, key, args.hls)
    print(f"rend {args.role} on 127.0.0.1:{service.port}", flush=True)
    service.serve_forever()


if __name__ == "__main__":
    main()

"""A pytest plugin (`-p loopback_names`) for running the SDK's own test
files against a local engine: names under `.localhost` resolve to
127.0.0.1, as RFC 6761 says they should and as systemd-resolved does.
glibc here resolves only `localhost` itself, so a published tunnel's
`https://<label>.t.localhost:<port>` would not resolve otherwise; this is
the same stand-in for DNS that conftest's `_Loopback` is for httpx.
Every other name goes to the real resolver."""

from __future__ import annotations

import socket

_resolve = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.rstrip(".").lower().endswith(".localhost"):
        host = "127.0.0.1"
    return _resolve(host, *args, **kwargs)


socket.getaddrinfo = _getaddrinfo

"""Published TCP and UDP tunnels (issue 14) proven with real software:
`strait forward --protocol tcp|udp` in front of a private service, and the
service's own client on the engine's public port.

- RTMP: nginx with the RTMP module behind a published TCP port; ffmpeg
  publishes a generated stream through it and ffprobe plays it back
  through the same port (frames, codec, resolution checked).
- SRT: srt-live-transmit as the listener behind a published UDP port;
  ffmpeg as the SRT caller from the public side; the MPEG-TS it received
  checked with ffprobe.
- SSH to a throwaway sshd over a published TCP port.
- A UDP echo behind a published UDP port: 10,000 packets of random sizes
  (1 to 1,400 bytes) from 4 public sources at once, each reply checked byte
  for byte, no loss on loopback, over a TLS agent, and over a QUIC agent
  whose tunnel asks for guaranteed delivery (packets framed in a stream).
  A QUIC agent's packets otherwise ride QUIC datagrams, as the rstream Go
  SDK sends them; a packet too big for one (past quic.max_datagram_bytes
  less the 12-byte channel id, 1,338 bytes by default, or the path's
  limit) crosses on the channel's spill stream, which strait's agent opens
  when the first such packet comes either way, up to 65,507 bytes. (An
  agent that does not speak that extension gets datagrams only:
  crates/engine/tests/published_ports.rs proves that the drop is counted.)

test_media_direct.py proves the same software and clients with nothing in
between, so a failure here is strait's. No port is fixed: the engine picks
free ones from wide ranges, the services from port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
from dataclasses import dataclass

import pytest

import media
from conftest import BIN
from test_interop import strait_env

PORTS_YAML = (
    'tcp: {enabled: true, port_range: "20000-29999", listen_ip: "", public_host: ""}\n'
    'udp: {enabled: true, port_range: "30000-39999", listen_ip: "", public_host: "", session_idle_seconds: 60}\n'
)


@pytest.fixture
def ports_engine(make_engine):
    """An engine with published TCP and UDP ports on (127.0.0.1, the IP of
    its tls.listen_addr)."""
    return make_engine(PORTS_YAML)


@dataclass
class Published:
    """A running `strait forward --protocol tcp|udp` and the public
    address it printed."""

    host: str
    port: int
    proc: asyncio.subprocess.Process
    stdout: list[str]


@contextlib.asynccontextmanager
async def forward(engine, local_port: int, protocol: str, transport: str = "tls", extra: tuple[str, ...] = ()):
    """`strait forward 127.0.0.1:<local_port> --protocol <protocol>` until
    the block ends (then Ctrl-C, which it must obey), yielding the public
    host and port it printed: `Forwarding <protocol>://<host>:<port> ->
    127.0.0.1:<local_port> (over <transport>)`. `--request-log on`: its
    line per connection or session, which it prints by itself only on a
    terminal, is kept in `stdout`."""
    log_path = engine.tmp / f"forward-{protocol}-{transport}-{local_port}.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            BIN / "strait", "forward", f"127.0.0.1:{local_port}", "--protocol", protocol, "--transport", transport,
            "--request-log", "on", *extra,
            stdin=subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log, env=strait_env(engine),
        )  # fmt: skip
    stdout: list[str] = []
    drain = None
    try:
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), media.STEP)).decode()
        except TimeoutError:
            line = "(nothing in 30 s)"
        shape = rf"Forwarding {protocol}://(?P<host>[^\s:]+):(?P<port>\d+) -> 127\.0\.0\.1:{local_port} \(over {transport}\)"
        found = re.fullmatch(shape, line.rstrip("\n"))
        assert found, f"strait forward printed {line!r}\n{log_path.read_text()}\nengine:\n{engine.log()[-4000:]}"
        # The public host is engine.host (tcp/udp.public_host is empty).
        assert found["host"] == "localhost", line

        async def keep_reading() -> None:
            while more := await proc.stdout.readline():
                stdout.append(more.decode(errors="replace"))

        drain = asyncio.create_task(keep_reading())
        yield Published(found["host"], int(found["port"]), proc, stdout)
        assert proc.returncode is None, f"strait forward exited {proc.returncode}:\n{log_path.read_text()}"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            code = await asyncio.wait_for(proc.wait(), media.STEP)
        except TimeoutError:
            proc.kill()
            await asyncio.wait_for(proc.wait(), media.STEP)
            raise AssertionError(f"strait forward still running 30 s after SIGINT:\n{log_path.read_text()}") from None
        if drain:
            await asyncio.wait_for(drain, media.STEP)
    assert code == 0, f"strait forward exited {code} on SIGINT:\n{log_path.read_text()}"


SESSION_LINE = re.compile(
    r"(?P<protocol>tcp|udp) (?P<source>\S+) in (?P<into>\d+(?:\.\d+)? [KMG]?i?B)(?: \((?P<packets_in>\d+) packets\))?"
    r" out (?P<out>\d+(?:\.\d+)? [KMG]?i?B)(?: \((?P<packets_out>\d+) packets\))? \d+\.\ds"
)


def sessions(public: Published, protocol: str) -> list[re.Match]:
    """The line strait forward printed for each TCP connection or UDP
    session that ended (`tcp 127.0.0.1 in 1.2 KiB out 38.0 KiB 2.4s`)."""
    found = [SESSION_LINE.fullmatch(line.rstrip("\n")) for line in public.stdout]
    assert all(found), public.stdout
    assert all(line["protocol"] == protocol and line["source"] == "127.0.0.1" for line in found), public.stdout
    return found


async def test_rtmp_publish_and_playback_through_a_published_tcp_port(ports_engine, tmp_path):
    nginx = await media.nginx_rtmp(tmp_path / "nginx")
    try:
        async with forward(ports_engine, nginx.port, "tcp") as public:
            assert public.port != nginx.port
            probe = await media.rtmp_publish_and_read_back(nginx, "127.0.0.1", public.port)
        # ffprobe joins a second or so into the 5 s stream.
        media.check_test_stream(probe, min_frames=50)
        # Both the publisher and the player reached nginx through strait:
        # the URL they connected with names the public port.
        log = nginx.service.log()
        assert log.count(f"tc_url='rtmp://127.0.0.1:{public.port}/live'") == 2, log
        assert "publish: name='test'" in log and "play: name='test'" in log, log
        # One line per connection: the publisher's and the player's.
        assert len(sessions(public, "tcp")) == 2, public.stdout
    finally:
        await nginx.stop()


@pytest.mark.parametrize("transport", ["tls", "quic"])
async def test_srt_caller_through_a_published_udp_port(ports_engine, tmp_path, transport):
    listener = await media.srt_listener(tmp_path / "srt")
    try:
        async with forward(ports_engine, listener.port, "udp", transport) as public:
            probe = await media.srt_send_and_check(listener, "127.0.0.1", public.port)
        media.check_test_stream(probe, min_frames=100)
        # The caller's one session, both ways (SRT acknowledges).
        (line,) = sessions(public, "udp")
        assert int(line["packets_in"]) > 100 and int(line["packets_out"]) > 0, public.stdout
    finally:
        await listener.stop()


async def test_ssh_over_a_published_tcp_port(ports_engine, tmp_path):
    server = await media.sshd(tmp_path / "sshd")
    try:
        async with forward(ports_engine, server.port, "tcp") as public:
            code, out, err = await media.run(server.ssh_argv(public.port, "echo", "ok"))
            assert (code, out) == (0, b"ok\n"), err.decode()
            # A MiB up the session, its digest back.
            payload = os.urandom(1 << 20)
            code, out, err = await media.run(server.ssh_argv(public.port, "sha256sum"), stdin=payload)
            assert code == 0, err.decode()
            assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()
        assert server.service.log().count("Accepted publickey") == 2, server.service.log()
        assert len(sessions(public, "tcp")) == 2, public.stdout
    finally:
        await server.stop()


# (transport, extra forward flags, largest packet)
ECHO_CASES = {
    "tls": ("tls", (), 1400),
    "quic-datagrams": ("quic", (), 1400),
    "quic-guaranteed": ("quic", ("--datagram-guaranteed-delivery",), 1400),
}


@pytest.mark.parametrize("case", list(ECHO_CASES))
async def test_udp_echo_through_a_published_udp_port(ports_engine, case):
    transport, extra, largest = ECHO_CASES[case]
    async with media.udp_echo() as port:
        async with forward(ports_engine, port, "udp", transport, extra) as public:
            report = await media.udp_echo_load("127.0.0.1", public.port, max_size=largest)
    media.check_echo(report, 10_000)
    # One line per public source, printed when its session ends (here:
    # when strait forward stops), counting every packet each way.
    lines = sessions(public, "udp")
    assert len(lines) == 4, public.stdout
    assert sum(int(line["packets_in"]) for line in lines) == 10_000, public.stdout
    assert sum(int(line["packets_out"]) for line in lines) == 10_000, public.stdout


async def test_packets_too_big_for_a_quic_datagram_cross_whole_on_the_spill_stream(make_engine):
    """Packets of up to 65,507 bytes (the IPv4 limit) through a QUIC agent:
    what fits a datagram rides one, the rest goes on the channel's spill
    stream, opened for the first of them. None is dropped for its size."""
    engine = make_engine(PORTS_YAML + 'metrics: {prometheus: {enabled: true, listen_addr: "127.0.0.1:0"}}\n')
    async with media.udp_echo() as port:
        async with forward(engine, port, "udp", "quic") as public:
            # One packet in flight: a few of this size fill a socket's
            # default receive buffer.
            report = await media.udp_echo_load(
                "127.0.0.1", public.port, packets=300, sources=1, window=1, max_size=65_507
            )
    media.check_echo(report, 300)
    import urllib.request

    with urllib.request.urlopen(f"http://{engine.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r'^strait_datagrams_dropped_total\{reason="oversized"\} (\S+)$', text, re.M)
    assert found is None or float(found[1]) == 0, found[0]
    # Sizes are random up to 65,507 bytes, so most packets are too large
    # for a datagram: they crossed on the spill stream, both ways.
    spilled = re.search(r"^strait_datagrams_spilled_total (\S+)$", text, re.M)
    assert spilled is not None and float(spilled[1]) >= 2 * 30, spilled

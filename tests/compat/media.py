"""Real software for the published TCP and UDP proofs, run on loopback:
nginx with the RTMP module, srt-live-transmit, sshd, ffmpeg and ffprobe
(Debian's packages, installed by scripts/test.sh), and a UDP echo with a
client that checks every packet.

test_media_direct.py proves each of them directly, with nothing between
client and server; test_published_ports.py then runs the same clients
through strait's published ports, so there only strait in the middle is new.

Every wait is bounded (STEP), and readiness is a line a server prints or a
port that accepts, never a timer. Servers get a port found free by binding
port 0 and releasing it; a server that then fails to start (someone took
the port in between) is tried once more on another.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import getpass
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field

RTMP_MODULE = pathlib.Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")

# The most one step (a server's start, a command, a reply) may take on a
# loaded two-core machine; only something broken ever reaches it.
STEP = 30.0

# The generated test stream: 5 s of 320x240 at 25 fps with a sine tone.
# `-g 25` puts a keyframe every second, so a player that joins the live
# stream late (ffprobe on RTMP) decodes from the next second on.
STREAM_SECONDS = 5
TEST_SOURCE = [
    "-re", "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25", "-f", "lavfi", "-i", "sine",
    "-t", str(STREAM_SECONDS), "-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-c:a", "aac",
]  # fmt: skip


def sbin(command: str) -> str:
    """A command's path, /usr/sbin included when PATH lacks it."""
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if not found:
        raise RuntimeError(f"{command} is not installed: scripts/test.sh installs it")
    return found


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago (TCP or UDP)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Service:
    """A server process whose stderr is kept (in memory and in a log file)
    and can be waited on for a line."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: pathlib.Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._eof = False
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, name: str, argv: list[str], log_path: pathlib.Path, stdout: int | object = subprocess.DEVNULL
    ) -> Service:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=asyncio.subprocess.PIPE
        )
        return cls(name, proc, log_path)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        with open(self.log_path, "w") as log:
            while line := await self.proc.stderr.readline():
                text = line.decode(errors="replace")
                log.write(text)
                log.flush()
                self.lines.append(text)
                self._changed.set()
        self._eof = True
        self._changed.set()

    def log(self) -> str:
        return "".join(self.lines)

    def running(self) -> bool:
        return self.proc.returncode is None and not self._eof

    async def wait_for(self, text: str, timeout: float = STEP) -> str:
        """The first line containing `text`, waiting for it while the
        process runs."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    for line in self.lines:
                        if text in line:
                            return line
                    if self._eof:
                        raise RuntimeError(f"{self.name} exited before printing {text!r}:\n{self.log()}")
                    await self._changed.wait()
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not print {text!r} in {timeout}s:\n{self.log()}") from None

    async def wait_port(self, port: int, timeout: float = STEP) -> None:
        """Until 127.0.0.1:port accepts a TCP connection (closed at once)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if not self.running():
                        raise RuntimeError(f"{self.name} exited before listening on {port}:\n{self.log()}")
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        # The listening socket is not there yet: look again
                        # shortly (bounded by the timeout above).
                        await asyncio.sleep(0.05)
                        continue
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                    return
        except TimeoutError:
            raise RuntimeError(f"{self.name} did not listen on {port} in {timeout}s:\n{self.log()}") from None

    async def exited(self, timeout: float = STEP) -> int:
        """Its exit status, waiting for it to end by itself."""
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.name} still running after {timeout}s:\n{self.log()}") from None
        await asyncio.wait_for(self._reader, STEP)
        return code

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), STEP)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, STEP)


async def start_on_a_free_port(start, kind: int = socket.SOCK_STREAM):
    """`await start(port)` on a free port; once more on another when the
    first start fails (the port was taken between probe and bind)."""
    try:
        return await start(free_port(kind))
    except RuntimeError:
        return await start(free_port(kind))


# ------------------------------------------------------------------ RTMP


@dataclass
class Nginx:
    service: Service
    port: int

    async def stop(self) -> None:
        await self.service.stop()


async def nginx_rtmp(folder: pathlib.Path) -> Nginx:
    """nginx with the RTMP module, unprivileged-style: one foreground
    process (no master, no daemon) with its own prefix and config in
    `folder`, logging to stderr, `application live` on 127.0.0.1."""
    folder.mkdir(parents=True, exist_ok=True)

    async def start(port: int) -> Nginx:
        config = folder / "nginx.conf"
        config.write_text(
            f"load_module {RTMP_MODULE};\n"
            "daemon off;\n"
            "master_process off;\n"
            "worker_processes 1;\n"
            f"pid {folder / 'nginx.pid'};\n"
            "error_log stderr info;\n"
            "events { worker_connections 64; }\n"
            "rtmp {\n"
            "    server {\n"
            f"        listen 127.0.0.1:{port};\n"
            # idle_streams off: players are let go when the publisher
            # ends, so ffprobe ends with the stream; wait_key: a player
            # starts on a keyframe.
            "        application live { live on; record off; idle_streams off; wait_key on; }\n"
            "    }\n"
            "}\n"
        )
        service = await Service.start(
            "nginx", [sbin("nginx"), "-p", str(folder), "-c", str(config), "-e", "stderr"], folder / f"nginx-{port}.log"
        )
        try:
            await service.wait_port(port)
        except RuntimeError:
            await service.stop()
            raise
        return Nginx(service, port)

    return await start_on_a_free_port(start)


async def run(argv: list[str], timeout: float = STEP, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """A one-shot command: (exit status, stdout, stderr), bounded."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await asyncio.wait_for(proc.wait(), STEP)
        raise RuntimeError(f"{argv[0]} did not finish in {timeout}s: {argv}") from None
    return proc.returncode, out, err


def ffmpeg_publish_argv(url: str, container: str) -> list[str]:
    return [sbin("ffmpeg"), "-hide_banner", "-nostdin", "-loglevel", "error", *TEST_SOURCE, "-f", container, url]


async def ffprobe(source: str, timeout: float = STEP) -> dict:
    """ffprobe's view of a stream or file, every frame decoded and counted."""
    code, out, err = await run(
        [
            sbin("ffprobe"), "-v", "error", "-count_frames",
            "-show_entries", "stream=codec_type,codec_name,width,height,nb_read_frames", "-of", "json", source,
        ],
        timeout,
    )  # fmt: skip
    assert code == 0, f"ffprobe {source} exited {code}:\n{err.decode(errors='replace')}"
    return json.loads(out)


def check_test_stream(probe: dict, min_frames: int) -> None:
    """The generated stream came through: h264 at 320x240 with at least
    `min_frames` frames decoded, and its AAC audio."""
    kinds = {s.get("codec_type"): s for s in probe.get("streams", [])}
    video, audio = kinds.get("video"), kinds.get("audio")
    assert video is not None and audio is not None, probe
    assert video["codec_name"] == "h264", probe
    assert (video["width"], video["height"]) == (320, 240), probe
    assert int(video.get("nb_read_frames", 0)) >= min_frames, probe
    assert audio["codec_name"] == "aac" and int(audio.get("nb_read_frames", 0)) > 0, probe


async def rtmp_publish_and_read_back(nginx: Nginx, host: str, port: int) -> dict:
    """ffmpeg publishes the test stream to rtmp://host:port/live/test; once
    nginx says the publish arrived, ffprobe plays it from the same address
    until the publisher ends. Returns ffprobe's view."""
    url = f"rtmp://{host}:{port}/live/test"
    publisher = await asyncio.create_subprocess_exec(
        *ffmpeg_publish_argv(url, "flv"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        await nginx.service.wait_for("publish: name='test'")
        probe = await ffprobe(url, timeout=STEP + STREAM_SECONDS)
        _, err = await asyncio.wait_for(publisher.communicate(), STEP)
        assert publisher.returncode == 0, f"ffmpeg publish exited {publisher.returncode}:\n{err.decode()}"
    finally:
        if publisher.returncode is None:
            publisher.kill()
            await asyncio.wait_for(publisher.wait(), STEP)
    return probe


# ------------------------------------------------------------------- SRT


@dataclass
class SrtListener:
    service: Service
    port: int
    output: pathlib.Path

    async def stop(self) -> None:
        await self.service.stop()


async def srt_listener(folder: pathlib.Path) -> SrtListener:
    """srt-live-transmit as an SRT listener on 127.0.0.1, writing what one
    caller sends to a file and exiting when that caller leaves (-a:no)."""
    folder.mkdir(parents=True, exist_ok=True)

    async def start(port: int) -> SrtListener:
        output = folder / f"received-{port}.ts"
        with open(output, "wb") as sink:
            service = await Service.start(
                "srt-live-transmit",
                [sbin("srt-live-transmit"), "-a:no", "-v", f"srt://127.0.0.1:{port}?mode=listener", "file://con"],
                folder / f"srt-{port}.log",
                stdout=sink,
            )
        try:
            await service.wait_for("listen...")
        except RuntimeError:
            await service.stop()
            raise
        return SrtListener(service, port, output)

    return await start_on_a_free_port(start, socket.SOCK_DGRAM)


async def srt_send_and_check(listener: SrtListener, host: str, port: int) -> dict:
    """ffmpeg as the SRT caller sends the test stream as MPEG-TS to
    srt://host:port; the listener writes it down and exits when the caller
    leaves; ffprobe reads the file. Returns ffprobe's view."""
    code, _, err = await run(
        ffmpeg_publish_argv(f"srt://{host}:{port}?mode=caller&pkt_size=1316", "mpegts"), STEP + STREAM_SECONDS
    )
    assert code == 0, f"ffmpeg (SRT caller) exited {code}:\n{err.decode(errors='replace')}"
    status = await listener.service.exited()
    assert status == 0, f"srt-live-transmit exited {status}:\n{listener.service.log()}"
    assert "Accepted SRT source connection" in listener.service.log(), listener.service.log()
    return await ffprobe(str(listener.output))


# ------------------------------------------------------------------- SSH


@dataclass
class Sshd:
    service: Service
    port: int
    key: pathlib.Path
    user: str

    async def stop(self) -> None:
        await self.service.stop()

    def ssh_argv(self, port: int, *command: str, host: str = "127.0.0.1") -> list[str]:
        """ssh to this sshd's user at host:port with the throwaway key,
        reading no user configuration and trusting any host key."""
        return [
            "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=20", "-i", str(self.key), "-p", str(port), f"{self.user}@{host}", *command,
        ]  # fmt: skip


async def sshd(folder: pathlib.Path) -> Sshd:
    """sshd in the foreground as the current user on 127.0.0.1, with a
    throwaway host key and user key made by ssh-keygen in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    host_key, user_key = folder / "host_ed25519", folder / "user_ed25519"
    for key in (host_key, user_key):
        code, _, err = await run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "strait-test", "-f", str(key)])
        assert code == 0, err.decode()
    (folder / "authorized_keys").write_bytes(user_key.with_suffix(".pub").read_bytes())
    if os.geteuid() == 0:
        # Run as root, sshd wants its privilege separation directory, which
        # the Debian service (not started here) would make.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    user = getpass.getuser()

    async def start(port: int) -> Sshd:
        config = folder / "sshd_config"
        config.write_text(
            f"Port {port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {host_key}\n"
            f"AuthorizedKeysFile {folder / 'authorized_keys'}\n"
            f"PidFile {folder / 'sshd.pid'}\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
        )
        service = await Service.start("sshd", [sbin("sshd"), "-D", "-e", "-f", str(config)], folder / f"sshd-{port}.log")
        try:
            await service.wait_for(f"Server listening on 127.0.0.1 port {port}")
        except RuntimeError:
            await service.stop()
            raise
        return Sshd(service, port, user_key, user)

    return await start_on_a_free_port(start)


# -------------------------------------------------------------- UDP echo


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.transport.sendto(data, addr)


@contextlib.asynccontextmanager
async def udp_echo():
    """A UDP echo service on 127.0.0.1: each packet back to its sender."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


class _Source(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.errors: list[Exception] = []

    def datagram_received(self, data: bytes, addr) -> None:
        self.replies.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)


@dataclass
class EchoReport:
    sent: int = 0
    echoed: int = 0
    # Replies that match no packet in flight: merged, split or altered.
    stray: int = 0
    # Replies that came back after a later packet of the same source did.
    reordered: int = 0
    # Packets never answered within REPLY_WAIT, and their sizes.
    lost: int = 0
    lost_sizes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# How long a source waits for the next reply before counting what it has in
# flight as lost and stopping.
REPLY_WAIT = 5.0


async def udp_echo_load(
    host: str, port: int, packets: int = 10_000, sources: int = 4, window: int = 8, seed: int = 14, max_size: int = 1400
) -> EchoReport:
    """`packets` UDP packets of random sizes (1 to `max_size` bytes, random
    content) to host:port from `sources` sockets at once, each keeping at
    most `window` packets in flight (so the rate follows the round trip:
    moderate, never a flood). Every reply must be byte for byte one of the
    source's packets in flight, so a merged, split or altered packet shows
    as stray; a packet not answered in REPLY_WAIT is lost, and a source
    whose window is all lost packets stops there."""
    loop = asyncio.get_running_loop()
    report = EchoReport()

    async def source(index: int, count: int) -> None:
        rng = random.Random(seed * 1000 + index)
        transport, proto = await loop.create_datagram_endpoint(
            _Source, local_addr=("127.0.0.1", 0), remote_addr=(host, port)
        )
        # Each packet in flight by its bytes: the send numbers of its copies.
        in_flight: dict[bytes, collections.deque[int]] = {}
        waiting = 0
        sent = 0
        latest = -1
        try:
            while sent < count or waiting:
                while sent < count and waiting < window:
                    packet = rng.randbytes(rng.randint(1, max_size))
                    transport.sendto(packet)
                    in_flight.setdefault(packet, collections.deque()).append(sent)
                    waiting += 1
                    sent += 1
                    report.sent += 1
                try:
                    reply = await asyncio.wait_for(proto.replies.get(), REPLY_WAIT)
                except TimeoutError:
                    report.lost += waiting
                    report.lost_sizes += sorted(len(p) for p, copies in in_flight.items() for _ in copies)
                    return
                copies = in_flight.get(reply)
                if not copies:
                    report.stray += 1
                    continue
                number = copies.popleft()
                if not copies:
                    del in_flight[reply]
                waiting -= 1
                if number < latest:
                    report.reordered += 1
                latest = max(latest, number)
                report.echoed += 1
        finally:
            report.errors.extend(f"source {index}: {e!r}" for e in proto.errors)
            transport.close()

    share = [packets // sources + (1 if i < packets % sources else 0) for i in range(sources)]
    await asyncio.gather(*(source(i, n) for i, n in enumerate(share)))
    return report


def check_echo(report: EchoReport, packets: int) -> None:
    assert (report.lost, report.stray, report.errors) == (0, 0, []), report
    assert report.sent == report.echoed == packets, report

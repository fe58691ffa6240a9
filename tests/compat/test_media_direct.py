"""The real software of test_published_ports.py, proven directly on
loopback with no strait in between: nginx-rtmp with ffmpeg and ffprobe,
srt-live-transmit with an ffmpeg SRT caller, sshd with ssh, and the UDP
echo with its checking client. When one of these fails, the machine is at
fault, not strait."""

from __future__ import annotations

import hashlib
import os

import media


async def test_rtmp_publish_and_read_back_directly(tmp_path):
    nginx = await media.nginx_rtmp(tmp_path / "nginx")
    try:
        probe = await media.rtmp_publish_and_read_back(nginx, "127.0.0.1", nginx.port)
        # ffprobe joins a second or so into the 5 s stream.
        media.check_test_stream(probe, min_frames=50)
    finally:
        await nginx.stop()


async def test_srt_caller_to_srt_live_transmit_directly(tmp_path):
    listener = await media.srt_listener(tmp_path / "srt")
    try:
        probe = await media.srt_send_and_check(listener, "127.0.0.1", listener.port)
        media.check_test_stream(probe, min_frames=100)
    finally:
        await listener.stop()


async def test_ssh_to_a_throwaway_sshd_directly(tmp_path):
    server = await media.sshd(tmp_path / "sshd")
    try:
        code, out, err = await media.run(server.ssh_argv(server.port, "echo", "ok"))
        assert (code, out) == (0, b"ok\n"), err.decode()
        payload = os.urandom(1 << 20)
        code, out, err = await media.run(server.ssh_argv(server.port, "sha256sum"), stdin=payload)
        assert code == 0, err.decode()
        assert out.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    finally:
        await server.stop()


async def test_udp_echo_directly():
    async with media.udp_echo() as port:
        report = await media.udp_echo_load("127.0.0.1", port)
    media.check_echo(report, 10_000)

"""frontsocket.FrontSocket's own ends, on a real socket pair: the close handshakes, the wait for a
client that never answers, a slow consumer, a failing handler. (What it reads and answers frame
by frame is held to Tornado's protocol in test_frame_reader.py.)"""

import asyncio
import logging
import socket
import struct

from pusherd.fast import frontsocket
from pusherd.fast.direct import FlushQueue
from pusherd.fast.frontsocket import FrontSocket

from test_frame_reader import FrontService, frame  # (rootdir-relative: pytest puts this folder on sys.path)


async def _recv_until(loop, peer, predicate, timeout=5.0):
    got = bytearray()
    async def read():
        while not predicate(bytes(got)):
            chunk = await loop.sock_recv(peer, 65536)
            if not chunk:
                break
            got.extend(chunk)
    await asyncio.wait_for(read(), timeout)
    return bytes(got)


def _pair(service, **kwargs):
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    conn = FrontSocket(service, FlushQueue(), ours, "203.0.113.9", None, None, b"HTTP/1.1 101 x\r\n\r\n", **kwargs)
    return conn, peer


def test_a_close_from_pusherd_answered_by_the_client_ends_the_socket():
    async def go():
        loop = asyncio.get_running_loop()
        service = FrontService(4096)
        conn, peer = _pair(service)
        conn.close_with(1001, "server shutting down")
        got = await _recv_until(loop, peer, lambda b: b.endswith(b"shutting down"))
        assert got == b"HTTP/1.1 101 x\r\n\r\n\x88\x16\x03\xe9server shutting down"
        assert conn in service.open  # waiting for the client's close frame
        await loop.sock_sendall(peer, frame(0x8, struct.pack("!H", 1001)))
        assert await _recv_until(loop, peer, lambda b: False) == b""  # closed, nothing echoed twice
        assert conn not in service.open and conn.sock.fileno() == -1
    asyncio.run(go())


def test_a_client_that_never_answers_a_close_is_dropped_after_the_wait(monkeypatch):
    monkeypatch.setattr(frontsocket, "CLOSE_WAIT_SECONDS", 0.2)

    async def go():
        loop = asyncio.get_running_loop()
        service = FrontService(4096)
        conn, peer = _pair(service)
        conn.close_with(1000, "bye")
        await asyncio.sleep(0.1)
        assert conn in service.open
        await asyncio.sleep(0.3)
        assert conn not in service.open and conn.sock.fileno() == -1
        peer.close()
    asyncio.run(go())


def test_a_client_close_is_echoed_with_its_code_and_ends_the_socket():
    async def go():
        loop = asyncio.get_running_loop()
        service = FrontService(4096)
        conn, peer = _pair(service)
        await loop.sock_sendall(peer, frame(0x1, b"[1]") + frame(0x8, struct.pack("!H", 4000) + b"gone"))
        got = await _recv_until(loop, peer, lambda b: False)
        assert got == b"HTTP/1.1 101 x\r\n\r\n\x88\x02\x0f\xa0"  # the code echoed, not the reason
        assert service.events == [("message", "[1]"), ("closed",)]
        peer.close()
    asyncio.run(go())


def test_frames_sent_with_the_head_are_the_sockets_first():
    async def go():
        service = FrontService(4096)
        conn, peer = _pair(service, rest=frame(0x1, b"[\"join\"]") + frame(0x1, b"[2]")[:3])
        assert service.events == [("message", '["join"]')]  # the second is not whole yet
        await asyncio.get_running_loop().sock_sendall(peer, frame(0x1, b"[2]")[3:])
        await asyncio.sleep(0.05)
        assert service.events == [("message", '["join"]'), ("message", "[2]")]
        conn.abort()
        peer.close()
    asyncio.run(go())


def test_a_slow_consumer_is_closed_1013_behind_its_backlog_and_dropped_after_the_wait(monkeypatch):
    monkeypatch.setattr(frontsocket, "CLOSE_WAIT_SECONDS", 0.3)

    async def go():
        service = FrontService(4096)
        service.config.settings.max_outbox_bytes = 64 * 1024
        conn, peer = _pair(service)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        big = b"\x81\x7e\x10\x00" + b"x" * 4096
        for _ in range(400):  # 1.6 MB the peer never reads
            conn.send_frame(big)
            await asyncio.sleep(0)
            if conn.closing:
                break
        assert conn.closing and service.counters.slow_consumer_closes == 1
        assert conn in service.open  # its close frame waits behind what the peer left unread
        await asyncio.sleep(0.5)
        assert conn not in service.open
        peer.close()
    asyncio.run(go())


def test_a_handler_that_raises_ends_that_socket_alone_and_is_logged(caplog):
    async def go():
        loop = asyncio.get_running_loop()
        service = FrontService(4096)

        def receive(conn, message):
            raise RuntimeError("boom")
        service.receive = receive
        conn, peer = _pair(service)
        other, other_peer = _pair(service)
        await loop.sock_sendall(peer, frame(0x1, b"[]"))
        await _recv_until(loop, peer, lambda b: False)
        assert conn not in service.open and other in service.open
        other.abort()
        peer.close()
        other_peer.close()
    with caplog.at_level(logging.ERROR, logger="pusherd"):
        asyncio.run(go())
    assert "message handling failed" in caplog.text


def test_a_send_that_fails_ends_the_socket():
    async def go():
        service = FrontService(4096)
        conn, peer = _pair(service)
        conn._pause_reading()  # only the write side may notice: not the end of the stream
        peer.close()
        conn.send_frame(b"\x81\x02[]")
        for _ in range(50):
            await asyncio.sleep(0.01)
            if conn not in service.open:
                break
        assert conn not in service.open and conn.sock.fileno() == -1
    asyncio.run(go())

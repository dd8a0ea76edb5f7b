"""Every Tornado internal pusherd/fast/ relies on is where it expects it, and behaves as expected.

The speed-ups and the listener's limits reach into Tornado's private layout (fast/__init__.py
lists where). A Tornado release that moves one of them would not break anything loudly: the
trimming would silently keep the memory, the direct writes would silently stop, a hook would
silently not be called. Each test here fails instead. .ci/run runs them on the lowest and the
highest Tornado of the supported range (fast.CHECKED_TORNADO); a new Tornado is adopted by
making them pass on it.
"""

import asyncio
import re
import collections
import socket
import time

import pytest
import tornado
import tornado.httpserver
import tornado.iostream
import tornado.testing
import tornado.web
import tornado.websocket
from tornado import http1connection, httputil

from pusherd import config, fast
from pusherd.daemon import Daemon
from pusherd.fast import lean
from pusherd.fast.lean import _DROPPED_AFTER_OPEN, _ListQueue
from pusherd.fast.websocket import FastSocketHandler


def test_the_installed_tornado_is_within_the_checked_range():
    low, high = (tuple(int(p) for p in v.split(".")) for v in fast.CHECKED_TORNADO)
    assert low <= tornado.version_info[:3] <= high, (tornado.version, fast.CHECKED_TORNADO)


# --- direct.py: the outbox reads IOStream's write buffer ---------------------------------------

def test_iostream_write_buffer_holds_its_size_and_the_stream_its_socket():
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        async def run():
            stream = tornado.iostream.IOStream(a)
            assert stream.socket is a
            assert isinstance(stream._write_buffer._size, int) and stream._write_buffer._size == 0
            assert stream.writing() is False
            for _ in range(1000):             # the peer reads nothing: Tornado keeps the rest
                stream.write(b"x" * 4096)
                if stream.writing():
                    break
            assert stream.writing() and stream._write_buffer._size > 0
            stream.max_write_buffer_size = stream._write_buffer._size   # the bound direct.py sets
            with pytest.raises(tornado.iostream.StreamBufferFullError):
                stream.write(b"y")
            stream.close()
        asyncio.run(run())
    finally:
        b.close()


def test_every_frame_tornado_writes_after_the_upgrade_goes_through_write_frame(monkeypatch):
    """fast/websocket.py hooks WebSocketProtocol13._write_frame so the outbox knows when Tornado
    writes: a message, a pong to the client's ping, a ping, the close frame all go through it."""
    from pusherd.fast import websocket as fastws
    opcodes = []
    original = fastws._Protocol._write_frame

    def recording(self, fin, opcode, data, flags=0):
        opcodes.append(opcode)
        return original(self, fin, opcode, data, flags)

    monkeypatch.setattr(fastws._Protocol, "_write_frame", recording)
    handlers = []

    class Probe(FastSocketHandler):
        def open(self, *args, **kwargs):
            super().open(*args, **kwargs)
            handlers.append(self)

    async def run():
        daemon = Daemon(settings(), fast_paths=True)
        from pusherd.transports.app import make_app
        http, port = serve(make_app(daemon.service, Probe, {"rounds": daemon.rounds}))
        client = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/events/websocket?vsn=2.0.0" % port)
        while not handlers:
            await asyncio.sleep(0.01)
        (handler,) = handlers
        handler.write_message("hello")        # Tornado's own message path (pusherd writes its own)
        client.ping(b"p")
        await asyncio.sleep(0.1)
        handler.ping(b"q")
        await asyncio.sleep(0.1)
        handler.close(1001, "bye")
        await asyncio.sleep(0.1)
        client.close()
        http.stop()

    asyncio.run(run())
    assert {0x1, 0xA, 0x9, 0x8} <= set(opcodes), opcodes   # text, pong, ping, close


def serve(app):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    http = tornado.httpserver.HTTPServer(app)
    http.add_sockets([listener])
    return http, listener.getsockname()[1]


# --- lean.py: what an open socket keeps of its upgrade -----------------------------------------

def settings():
    return config.from_mapping({"test": {"allowed_origins": ["*"]}}, "test", "<t>", {}, lambda p: "")


def test_the_frame_reader_finds_what_it_reads_and_calls_on_the_protocol():
    """websocket._Protocol._receive_frame_loop replaces Tornado's reader: Tornado must still start
    it as the accept's last step, and keep the state and the methods it shares with Tornado's
    own (tests/unit/fast/test_frame_reader.py checks that the two behave the same)."""
    import inspect

    from pusherd.fast.websocket import _Protocol

    cls = tornado.websocket.WebSocketProtocol13
    assert "await self._receive_frame_loop()" in inspect.getsource(cls._accept_connection)
    assert inspect.iscoroutinefunction(cls._receive_frame_loop)
    assert set(inspect.signature(cls._handle_message).parameters) == {"self", "opcode", "data"}
    params = tornado.websocket._WebSocketParams(max_message_size=123)
    protocol = _Protocol(object(), False, params)
    for name in ("client_terminated", "server_terminated", "close_code", "close_reason", "_decompressor",
                 "_fragmented_message_buffer", "_fragmented_message_opcode", "_wire_bytes_in"):
        assert hasattr(protocol, name), name
    assert protocol.params.max_message_size == 123
    assert protocol._decompressor is None and protocol._fragmented_message_buffer is None
    for name in ("_abort", "close", "_handle_message"):
        assert callable(getattr(protocol, name)), name


def test_an_open_socket_sheds_what_lean_drops_and_its_stream_wears_list_queues():
    seen = {}

    class Probe(FastSocketHandler):
        def open(self, *args, **kwargs):
            seen["before"] = set(self.__dict__)
            seen["headers"] = self.request.headers
            stream = self.ws_connection.stream
            seen["queues"] = (type(stream._write_buffer._buffers), type(stream._write_futures))
            super().open(*args, **kwargs)
            seen["after"] = set(self.__dict__)
            seen["after_queues"] = (type(stream._write_buffer._buffers), type(stream._write_futures))

    async def run():
        daemon = Daemon(settings(), fast_paths=True)
        from pusherd.transports.app import make_app
        http, port = serve(make_app(daemon.service, Probe, {"rounds": daemon.rounds}))
        client = await tornado.websocket.websocket_connect("ws://127.0.0.1:%d/events/websocket?vsn=2.0.0" % port)
        deadline = time.monotonic() + 2
        while "after" not in seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        client.close()
        http.stop()

    asyncio.run(run())
    # Every name lean.py drops is there to drop (a renamed attribute would be kept silently)...
    ours = {"legacy_path", "rounds", "issued", "done", "unsent_frames", "stalled_since", "_check", "socket_claims"}
    missing = (_DROPPED_AFTER_OPEN - ours) - seen["before"]
    assert not missing, "Tornado no longer sets %s: re-check fast/lean.py" % sorted(missing)
    assert not (_DROPPED_AFTER_OPEN & seen["after"])
    # ... the upgrade's header object was emptied in place, the write queues swapped for lists.
    assert isinstance(seen["headers"], httputil.HTTPHeaders) and not list(seen["headers"].get_all())
    assert seen["queues"] == (collections.deque, collections.deque)
    assert seen["after_queues"] == (_ListQueue, _ListQueue)
    assert lean.UpgradedRequest.headers == {}


# --- listener.py: the HTTP server's connection bookkeeping -------------------------------------

def test_http_server_keeps_its_connections_and_calls_back_on_each_request_and_close():
    assert hasattr(tornado.httpserver.HTTPServer, "start_request")
    assert hasattr(tornado.httpserver.HTTPServer, "on_close")
    server = tornado.httpserver.HTTPServer(lambda request: None, idle_connection_timeout=3, body_timeout=4)
    assert isinstance(server._connections, set)
    assert (server.conn_params.header_timeout, server.conn_params.body_timeout) == (3, 4)
    # each request's connection carries the parameters its timeouts are read from (listener.py
    # gives a handed-over connection's first request a copy with what is left of the front's)
    a, b = socket.socketpair()
    params = http1connection.HTTP1ConnectionParameters(header_timeout=1.0)

    async def run():
        conn = http1connection.HTTP1Connection(tornado.iostream.IOStream(a), False, params)
        assert conn.params is params and conn.params.header_timeout == 1.0
        conn.close()
    asyncio.run(run())
    b.close()


def test_an_oversized_head_closes_the_stream_with_unsatisfiable_read_error():
    """listener.py answers 431 where Tornado closes such a connection silently: it recognizes
    the case by the error IOStream.close is given while a head (up to a blank line) is read."""
    a, b = socket.socketpair()
    got = {}

    class Watch(tornado.iostream.IOStream):
        def close(self, exc_info=False):
            got.setdefault("exc", exc_info)
            got.setdefault("regex", getattr(self, "_read_regex", "absent"))
            super().close(exc_info)

    async def run():
        stream = Watch(a, max_buffer_size=1 << 20)
        b.sendall(b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 3000)
        with pytest.raises(tornado.iostream.StreamClosedError):
            await stream.read_until_regex(b"\r?\n\r?\n", max_bytes=1024)
    asyncio.run(run())
    b.close()
    assert isinstance(got["exc"], tornado.iostream.UnsatisfiableReadError)
    assert got["regex"] is not None and got["regex"] != "absent"


# --- upgrade.py: the 101 written on the front ---------------------------------------------------

@pytest.mark.parametrize("offered", [None, "phoenix", "phoenix, base64url.bearer.phx.bm9wZQ"])
def test_the_front_writes_the_101_tornados_websocket_handler_writes(offered):
    """upgrade.handshake is Tornado's 101, header for header, for the subprotocols pusherd picks
    (SocketHandler.select_subprotocol): a Tornado release that changes its 101 fails here."""
    from pusherd.fast.upgrade import handshake
    from pusherd.transports.websocket import SocketHandler

    class Handler(tornado.websocket.WebSocketHandler):
        select_subprotocol = SocketHandler.select_subprotocol

    async def run():
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(tornado.web.Application([("/ws", Handler)]))
        server.add_sockets([sock])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = "Sec-WebSocket-Protocol: %s\r\n" % offered if offered else ""
        writer.write(("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
                      % extra).encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        server.stop()
        return head

    head = asyncio.run(run())
    date = re.search(rb"Date: ([^\r]*)", head).group(1).decode()
    assert head == handshake("dGhlIHNhbXBsZSBub25jZQ==", "phoenix" if offered else None, date)


def test_tcp_server_keeps_the_sizes_listener_accepts_with_and_stops_without_sockets_of_its_own():
    """listener.Server accepts itself (it can pause before accept()): it makes each IOStream with
    TCPServer's ``max_buffer_size`` and ``read_chunk_size``, and TCPServer.stop, holding no socket
    of its own, has nothing to do."""
    server = tornado.httpserver.HTTPServer(lambda request: None, max_buffer_size=12345, chunk_size=678)
    assert (server.max_buffer_size, server.read_chunk_size) == (12345, 678)
    server.stop()
    server.stop()


@pytest.mark.parametrize("family, address", [(socket.AF_INET, ("127.0.0.1", 0)), (socket.AF_INET6, ("::1", 0)),
                                             (socket.AF_UNIX, "")])
def test_the_listeners_accept_makes_the_socket_and_address_accept_makes(family, address, tmp_path):
    """listener._accept_one (CPython's ``socket._accept``) against ``socket.accept`` itself."""
    from pusherd.fast.listener import _accept_one
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    if family == socket.AF_UNIX:
        address = str(tmp_path / "s")
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.bind(address)
    except OSError as exc:  # pragma: no cover - a host without ::1
        listening.close()
        pytest.skip("cannot bind %r: %s" % (address, exc))
    listening.listen(8)
    listening.setblocking(False)
    kind = (listening.family, listening.type, listening.proto)
    peers = []
    try:
        for _ in range(2):
            peer = socket.socket(family, socket.SOCK_STREAM)
            peer.connect(listening.getsockname())
            peers.append(peer)
        time.sleep(0.05)
        ours, our_address = _accept_one(listening, kind)
        theirs, their_address = listening.accept()
        with ours, theirs:
            assert (ours.family, ours.type, ours.proto, ours.gettimeout()) == \
                (theirs.family, theirs.type, theirs.proto, theirs.gettimeout())
            assert type(our_address) is type(their_address)
            assert (our_address[0] == their_address[0]) if family != socket.AF_UNIX else our_address == their_address
            assert ours.get_inheritable() is theirs.get_inheritable() is False
            peers[0].sendall(b"x")
            ours.settimeout(1)
            assert ours.recv(1) == b"x"
    finally:
        for peer in peers:
            peer.close()
        listening.close()


def test_the_front_computes_the_accept_value_tornado_computes():
    """upgrade.handshake's Sec-WebSocket-Accept against WebSocketProtocol13's, for keys of
    every shape read_upgrade admits (16 random bytes in base64)."""
    import base64
    import os
    from pusherd.fast.upgrade import handshake
    for raw in [bytes(16), b"\xff" * 16] + [os.urandom(16) for _ in range(500)]:
        key = base64.b64encode(raw).decode()
        accept = tornado.websocket.WebSocketProtocol13.compute_accept_value(key)
        assert ("\r\nSec-Websocket-Accept: %s\r\n\r\n" % accept).encode() in handshake(key, None, "d")

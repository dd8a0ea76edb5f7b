"""fast.websocket in-process over loopback, for what only a real Tornado protocol object shows."""

import asyncio
import socket
import sys
import time
from pathlib import Path

from pusherd import config
from pusherd.core.broadcast import Broadcast
from pusherd.core.protocol import V2
from pusherd.daemon import Daemon


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def settings():
    return config.from_mapping({"test": {"allowed_origins": ["*"]}}, "test", "<t>", {}, lambda p: "")


async def eventually(predicate, seconds=1.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return predicate()


def test_a_pong_tornado_writes_for_a_socket_handler_marks_the_socket_dirty():
    """SocketHandler's protocol tells the outbox before Tornado writes a frame of its own, so the
    fan-out never writes into the middle of a pong or a close frame Tornado has not finished."""
    import tornado.httpserver
    import tornado.websocket

    async def run():
        daemon = Daemon(settings(), fast_paths=True)
        sock = listener()
        sock.setblocking(False)
        http = tornado.httpserver.HTTPServer(daemon.make_app())
        http.add_sockets([sock])
        url = "ws://127.0.0.1:%d%s/websocket?vsn=2.0.0" % (sock.getsockname()[1], daemon.settings.path.rstrip("/"))
        client = await tornado.websocket.websocket_connect(url)
        (handler,) = daemon.service.connections
        register = daemon.rounds
        fast = handler.outbox.fast_sock
        assert fast is not None and fast in register.owners
        assert fast not in register.dirty
        daemon.service.hub.subscribe("public:a", handler)
        client.ping(b"hi")
        assert await eventually(lambda: fast in register.dirty)  # Tornado wrote the pong
        daemon.service.deliver(Broadcast("public:a", "e", {"n": 1}))  # through the outbox, which finds the pong written
        assert fast not in register.dirty
        message = await asyncio.wait_for(client.read_message(), 5)
        assert message == V2.encode_broadcast("public:a", "e", {"n": 1}, None)
        client.close()
        assert await eventually(lambda: not daemon.service.connections)
        assert fast not in register.owners and fast not in register.dirty  # released at close
        http.stop()
    asyncio.run(run())

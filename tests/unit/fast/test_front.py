"""front.PublishConnection on a real socket pair, where a storm's timing decides what happens: an
upgrade that waits for its batch (PublishConnections.upgrade) reads nothing, whatever its client
sends meanwhile, and leaves it on the socket for the WebSocket to read. (Whole conversations on
the front, against Tornado's own answers: tests/integration/test_fast_paths.py.)"""

import asyncio
import socket
import types

from pusherd.fast.front import PublishConnection, PublishConnections


def _front():
    settings = types.SimpleNamespace(http_header_timeout=10.0, http_body_timeout=10.0)
    service = types.SimpleNamespace(config=types.SimpleNamespace(settings=settings), requests=set())
    server = types.SimpleNamespace(fresh={}, idle={}, left=lambda: None)
    return PublishConnections(service, server)


def _connection():
    """A PublishConnection on one end of a socket pair: (it, its socket, the client's)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return PublishConnection(_front(), ours, ("203.0.113.9", 1)), ours, theirs


def test_an_upgrade_waiting_for_its_batch_leaves_what_comes_meanwhile_on_its_socket():
    async def main():
        conn, ours, theirs = _connection()
        assert conn.reading
        conn.busy = conn.waiting = True  # as PublishConnections.upgrade leaves one whose batch has not come
        theirs.sendall(b"\x81\x85early")  # its first frame, sent before the 101 (or anything at all)
        await asyncio.sleep(0.05)  # the loop sees the socket readable
        assert not conn.reading, "still registered for reading: the loop would call it again and again"
        assert conn.buf == b"" and conn.sock is ours  # nothing read, nothing closed
        assert ours.recv(100) == b"\x81\x85early"  # the socket's, for the WebSocket to read
        conn.close()
        theirs.close()
    asyncio.run(main())


def test_a_connection_not_waiting_reads_what_comes():
    async def main():
        conn, ours, theirs = _connection()
        theirs.sendall(b"POST /publ")  # the start of a head: read, more awaited
        await asyncio.sleep(0.05)
        assert conn.buf == b"POST /publ" and conn.reading
        conn.close()
        theirs.close()
    asyncio.run(main())


def test_the_front_recognizes_the_socket_paths_the_routes_were_made_for():
    """`path` takes a restart: the Tornado routes are made at start. A reload that changes it
    (pending, logged as needing a restart) leaves the front's paths as the routes' too."""
    import types
    from pusherd.fast.upgrade import Upgrades
    service = types.SimpleNamespace(config=types.SimpleNamespace(settings=types.SimpleNamespace(path="/events/")))
    upgrades = Upgrades(service, None, str, None)
    assert upgrades.paths() == ("/events/websocket", "/events")
    service.config = types.SimpleNamespace(settings=types.SimpleNamespace(path="/other"))
    assert upgrades.paths() == ("/events/websocket", "/events")
    root = Upgrades(types.SimpleNamespace(config=types.SimpleNamespace(settings=types.SimpleNamespace(path="/"))),
                    None, str, None)
    assert root.paths() == ("/websocket", "/")

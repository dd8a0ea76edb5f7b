"""The HTTP listener's own limits, which Tornado's public API cannot express (Tornado
internals: checked against Tornado 6.5.3 and 6.6.1). Always on, with or without the speed-ups.

`Server` is Tornado's ``HTTPServer`` with: a cap on the connections that are not (yet)
WebSockets (``max_http_connections``); a 431 answer for a request head over 16 KiB (Tornado
closes such a connection without a word); nothing executed after ``Connection: close`` (RFC 9112
9.6; Tornado parses and runs what it had buffered); and, with the publisher front (front.py),
the hand-over of a connection to Tornado with the bytes read so far and one header timeout.

What it relies on of Tornado's: ``HTTPServer._connections`` (its live connections),
``HTTPServer.start_request``/``on_close`` (HTTP1ServerConnection's callbacks into the server,
``server_conn.stream``), ``HTTP1ConnectionParameters.header_timeout`` read per request from
``request_conn.params``, ``IOStream._read_regex`` (set while a head is read), that
``IOStream.close`` is told ``UnsatisfiableReadError`` for a head over ``max_header_size``, and
``IOStream.read_from_fd`` (documented as the override point for a stream's reads).
tests/unit/fast/test_tornado_internals.py checks each.
"""

import copy
import json
import time
import weakref
from typing import TYPE_CHECKING, Optional

import tornado
import tornado.httpserver
from tornado import httputil
from tornado.iostream import IOStream, UnsatisfiableReadError

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

#: Largest request head Tornado's HTTP server reads (its ``max_header_size``); a longer one gets 431.
MAX_HEADER_SIZE = 16384
#: Retry-After of the 503 for a connection over max_http_connections.
RETRY_AFTER_SECONDS = 1

_DISCARD = bytearray(65536)  # where a refused connection's first bytes are read to and dropped


def http_answer(status: int, answer: dict, headers=()) -> bytes:
    """A whole answer after which the connection is closed, as PublishHandler would format it."""
    data = json.dumps(answer).encode("utf-8")
    lines = ["HTTP/1.1 %d %s" % (status, httputil.responses.get(status, "Unknown")),
             "Server: TornadoServer/%s" % tornado.version,
             "Content-Type: application/json; charset=utf-8",
             "Date: " + httputil.format_timestamp(time.time()),
             "Cache-Control: no-store",
             "Connection: close"]
    lines.extend("%s: %s" % pair for pair in headers)
    lines.append("Content-Length: %d" % len(data))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1") + data


class Server(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server; with a `PublishConnections` in ``front``, new connections go to it.

    It also bounds the connections that are not (yet) WebSockets, publishers on the front and
    connections in Tornado's HTTP server alike, to ``max_http_connections`` (an upgraded
    connection leaves Tornado's and counts against ``max_connections`` instead). At the cap a
    new connection is let in by closing the one that has waited longest for a request head:
    first among connections that never completed a request (silent or slow ones), then among
    keep-alive ones between requests. Only when every connection is inside a request is the
    newcomer refused: 503 with Retry-After, then closed. So a flood of idle connections costs
    its sender the race, not the WebSocket upgrades and publishers that send their heads.
    """

    front = None  # fast.front.PublishConnections when the publisher front is on (set by Daemon.start)
    service: Optional["Service"] = None  # max_http_connections and the refusal logs (set by Daemon.start)

    def initialize(self, *args, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        # Connections waiting for a request head, oldest first: never served a request yet
        # (`fresh`), or keep-alive between requests (`idle`); entries are checked when used.
        # Keys: a PublishConnection, or the IOStream of one of Tornado's connections (its
        # HTTP1ServerConnection as the value once its serving loop has begun).
        self.fresh: dict = {}
        self.idle: dict = {}
        self._evicted = set()  # streams closed here whose connection is not out of Tornado's _connections yet
        # Handed-over streams -> the loop time their current head is due by (the front's deadline).
        self._head_deadlines: "weakref.WeakKeyDictionary[IOStream, float]" = weakref.WeakKeyDictionary()
        # The class a handed-over stream wears until its first read returned the bytes already
        # read from its socket: one per server, so the prefixes are this server's, not a global.
        self._prefilled = type("PrefilledIOStream", (_PrefilledIOStream,), {"prefixes": weakref.WeakKeyDictionary()})

    def apply_timeouts(self, header_timeout: float, body_timeout: float) -> None:
        """New connections get these (a reload): Tornado reads them from ``conn_params``."""
        self.conn_params.header_timeout = header_timeout
        self.conn_params.body_timeout = body_timeout

    def http_connections(self) -> int:
        """Connections not (yet) WebSockets: on the front, and in Tornado's HTTP server."""
        front = self.front
        return (len(front.open) if front is not None else 0) + len(self._connections) - len(self._evicted)

    def handle_stream(self, stream: IOStream, address) -> None:
        service = self.service
        if service is not None:
            limit = service.config.settings.max_http_connections
            if self.http_connections() >= limit and not self._make_room(limit):
                self._refuse(stream, limit)
                return
        front = self.front
        if type(stream) is not IOStream:
            super().handle_stream(stream, address)
        elif front is not None:  # the stream has registered nothing with the loop yet: its socket is the front's
            front.adopt(stream, address)
        else:
            stream.__class__ = _ServedIOStream
            self.fresh[stream] = None
            super().handle_stream(stream, address)

    def hand_over(self, stream: IOStream, address, prefix: bytes, head_deadline: float) -> None:
        """Serve `stream` as Tornado would have from the start, `prefix` being what it sent so
        far, its head due by `head_deadline` (loop time) as it was on the front."""
        cls = self._prefilled
        cls.prefixes[stream] = prefix, stream.read_chunk_size
        stream.read_chunk_size = max(stream.read_chunk_size, len(prefix))
        stream.__class__ = cls
        self._head_deadlines[stream] = head_deadline
        self.fresh[stream] = None
        super().handle_stream(stream, address)

    def start_request(self, server_conn, request_conn):
        stream = server_conn.stream
        if stream.closed():
            # The previous request said Connection: close (or was refused before its body), and
            # Tornado goes on parsing what it had buffered. RFC 9112 9.6: not executed.
            return _Unanswerable()
        if self._head_deadlines:
            deadline = self._head_deadlines.pop(stream, None)
            if deadline is not None:  # the head timeout started on the front: what is left of it
                params = request_conn.params = copy.copy(request_conn.params)
                params.header_timeout = max(0.0, deadline - stream.io_loop.time())
        if getattr(server_conn, "pusherd_served", False):  # a keep-alive connection's next request
            self.fresh.pop(stream, None)
            self.idle.pop(stream, None)
            self.idle[stream] = server_conn
        else:
            server_conn.pusherd_served = True
            if stream in self.fresh:  # (not once given up as inside a request)
                self.fresh[stream] = server_conn  # its place in the queue kept
        return super().start_request(server_conn, request_conn)

    def on_close(self, server_conn) -> None:
        stream = server_conn.stream
        self.fresh.pop(stream, None)
        self.idle.pop(stream, None)
        self._evicted.discard(stream)
        super().on_close(server_conn)

    def _make_room(self, limit: int) -> bool:
        """Close the connection that has waited longest for a request head; False if none waits."""
        for waiting in (self.fresh, self.idle):
            while waiting:
                conn = next(iter(waiting))
                server_conn = waiting.pop(conn)
                if not isinstance(conn, IOStream):  # a publisher connection on the front
                    if not conn.waiting_for_head():
                        continue  # gone, or inside a request: it registers again when it waits
                    conn.close()
                else:  # one of Tornado's: waiting if it has not begun, or reads up to a blank line
                    if conn.closed() or (server_conn is not None and getattr(conn, "_read_regex", None) is None):
                        continue
                    conn.close()
                    self._evicted.add(conn)
                self.service.refusals.http_evictions.note(time.monotonic(), limit)
                return True
        return False

    def _refuse(self, stream: IOStream, limit: int) -> None:
        """503 to a connection over max_http_connections, then closed; it registered nothing yet."""
        self.service.refusals.http.note(time.monotonic(), limit)
        sock = stream.socket
        try:
            # What the client sent already is read (and dropped) first: closing a socket with
            # unread bytes resets the connection, and the client may lose the answer.
            sock.recv_into(_DISCARD)
        except OSError:  # nothing yet (BlockingIOError), or gone
            pass
        try:
            # "status": 500 is for phoenix.js's long-poll, which reads the body's status (not the
            # HTTP one) and retries only on 0 or 500: anything else strands the page for good.
            sock.send(http_answer(503, {"error": "too many HTTP connections", "status": 500},
                                  (("Retry-After", str(RETRY_AFTER_SECONDS)),)))
        except OSError:
            pass
        stream.close()


class _Unanswerable(httputil.HTTPMessageDelegate):
    """A request read from a connection already closed: parsed by Tornado, handled by nothing."""


class _ServedIOStream(IOStream):
    """The class an IOStream wears while Tornado's HTTP server reads requests from it (until its
    WebSocket opens: `handlers.SocketHandler.open` makes it a plain IOStream again).

    A head over ``max_header_size`` gets a 431 here before the stream closes: Tornado closes
    such a connection without a word (`close` is told why: UnsatisfiableReadError, while the
    pending read is the head's, up to a blank line).
    """

    plain_class = IOStream

    def close(self, exc_info=False) -> None:
        if (isinstance(exc_info, UnsatisfiableReadError) and getattr(self, "_read_regex", None) is not None
                and not self.closed() and not self.writing()):
            try:
                self.socket.send(http_answer(431, {"error": "request head larger than %d bytes" % MAX_HEADER_SIZE}))
            except OSError:
                pass
        super().close(exc_info)


class _PrefilledIOStream(_ServedIOStream):
    """The class an IOStream wears until its first read has returned the bytes already read
    from its socket (`read_from_fd` is the documented override point for a stream's reads).

    The whole prefix is returned by that first read (the read size is raised to fit): Tornado
    waits for the socket to be readable only after a read that did not satisfy it, and the
    socket will not signal bytes it no longer holds. Then the stream is a `_ServedIOStream`
    (and a plain IOStream once its WebSocket opens), with the same instance dict as any other
    (the prefix waits in the class's ``prefixes``, not on the instance), so the outbox bypasses it and an
    open WebSocket costs no more than before.
    """

    #: stream -> (bytes its first read returns, its usual read size), until that read (per server).
    prefixes: "weakref.WeakKeyDictionary[IOStream, tuple]"

    def read_from_fd(self, buf) -> Optional[int]:
        prefixes = type(self).prefixes
        prefix, chunk_size = prefixes[self]
        n = min(len(buf), len(prefix))  # all of it, unless Tornado reads into a smaller buffer
        if n < len(prefix):
            buf[:n] = prefix[:n]
            prefixes[self] = prefix[n:], chunk_size
            return n
        del prefixes[self]
        self.read_chunk_size = chunk_size
        self.__class__ = _ServedIOStream
        if not n:
            return IOStream.read_from_fd(self, buf)
        buf[:n] = prefix
        return n

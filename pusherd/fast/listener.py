"""The HTTP listener's own limits, which Tornado's public API cannot express (Tornado
internals: checked against Tornado 6.5.3 and 6.6.1). Always on, with or without the speed-ups.

`Server` is Tornado's ``HTTPServer`` with: a cap on the connections that are not (yet)
WebSockets (``max_http_connections``), held by closing silent ones or else by not accepting
(its own accept, which can pause: Tornado's public ``IOLoop.add_handler``); a 431 answer for a
request head over 16 KiB (Tornado closes such a connection without a word); nothing executed
after ``Connection: close`` (RFC 9112 9.6; Tornado parses and runs what it had buffered); and,
with the publisher front (front.py), the hand-over of a connection to Tornado with the bytes read
so far and one header timeout.

What it relies on of Tornado's: ``HTTPServer._connections`` (its live connections),
``HTTPServer.start_request``/``on_close`` (HTTP1ServerConnection's callbacks into the server,
``server_conn.stream``), ``HTTP1ConnectionParameters.header_timeout`` read per request from
``request_conn.params``, ``IOStream._read_regex`` (set while a head is read), that
``IOStream.close`` is told ``UnsatisfiableReadError`` for a head over ``max_header_size``,
``IOStream.read_from_fd`` (documented as the override point for a stream's reads), and
``TCPServer.max_buffer_size``/``read_chunk_size`` (what its own accept makes streams with).
Of CPython's: ``socket._accept``, what ``socket.accept`` calls (`_accept_one`; without it,
``accept`` itself). tests/unit/fast/test_tornado_internals.py checks each.
"""

import copy
import errno
import json
import logging
import socket
import time
import weakref
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import tornado
import tornado.httpserver
from tornado import httputil
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, UnsatisfiableReadError

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

#: Largest request head Tornado's HTTP server reads (its ``max_header_size``); a longer one gets 431.
MAX_HEADER_SIZE = 16384
#: At max_http_connections, a connection waiting for a request head is closed to let a new one
#: in only once it has waited this long with nothing unread on its socket: a silent or slow one
#: (slowloris). One that has sent its head but was not read yet (a reconnect storm: thousands of
#: upgrades at once, the loop busy with the ones before) is never closed, nor one whose head is
#: still on its way (a retransmission, a busy client). The price: silent connections faster than
#: max_http_connections per second keep newcomers waiting in the listen queue.
EVICT_GRACE_SECONDS = 1.0
#: While accepting is paused (max_http_connections reached, no connection to close), how often
#: the listener looks again, besides at once when a connection leaves the count.
PAUSE_RECHECK_SECONDS = 0.1
#: At the cap for this long with no connection leaving it (every one inside a long request:
#: long-poll GETs held for up to longpoll_window, slow bodies), newcomers are accepted and refused
#: (503, Retry-After) instead of waiting in the listen queue with no end in sight. In a storm
#: connections leave the count all the time (each upgrade), so it never comes to this.
STUCK_SECONDS = 3.0
#: Retry-After of that 503.
RETRY_AFTER_SECONDS = 1
_DISCARD = bytearray(65536)
#: Connections accepted per readiness of a listening socket before other callbacks get the loop
#: (Tornado's add_accept_handler accepts up to 128).
ACCEPTS_PER_TURN = 128
#: accept() errors that mean "out of descriptors or memory": the listener pauses and retries
#: instead of spinning on a socket that stays readable.
_ACCEPT_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _accept_one(listening: socket.socket, kind: Tuple[int, int, int]):
    """``listening.accept()`` for a non-blocking listening socket of `kind` (family, type,
    proto), without asking it for them on every call: CPython's accept reads ``family`` and
    ``type`` through properties that convert them to enums in Python, ~1 µs per connection of
    a storm (bench/profile_storm.py). CPython 3.11-3.13's accept is this: ``_accept`` and a
    socket made on the descriptor (its "blocking if the listener has a timeout" rule never
    applies to a non-blocking listener). Another Python without ``_accept``: its own accept."""
    if _RAW_ACCEPT is None:  # pragma: no cover
        return listening.accept()
    fd, address = _RAW_ACCEPT(listening)
    return socket.socket(*kind, fileno=fd), address


_RAW_ACCEPT = getattr(socket.socket, "_accept", None)

log = logging.getLogger("pusherd")


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
    new connection is let in by closing the one that has waited longest for a request head, if
    it has waited `EVICT_GRACE_SECONDS` and nothing it sent is left unread on its socket: first
    among connections that never completed a request (silent or slow ones), then, when none of
    those waits at all, among keep-alive ones between requests. When no connection may be
    closed, the listener stops accepting (as nginx at worker_connections): new connections wait
    in the kernel's listen queue, not refused, and are accepted as soon as one leaves the count
    (upgraded, answered and closed, or closed) or becomes closable. So a reconnect storm of
    well-behaved clients is served in full, however many arrive at once, and a flood of idle
    connections costs its sender the race, not the upgrades and publishers that send their heads.

    The accepting is its own (Tornado's public ``IOLoop.add_handler`` and ``IOStream``, as
    ``tornado.netutil.add_accept_handler`` and ``TCPServer`` do), so that it can pause before
    ``accept()``: a connection taken from the queue could only be refused.
    """

    front = None  # fast.front.PublishConnections when the publisher front is on (set by Daemon.start)
    service: Optional["Service"] = None  # max_http_connections and the refusal logs (set by Daemon.start)

    def initialize(self, *args, **kwargs) -> None:
        super().initialize(*args, **kwargs)
        # Connections waiting for a request head, oldest first: never served a request yet
        # (`fresh`), or keep-alive between requests (`idle`); entries are checked when used.
        # Keys: a PublishConnection, or the IOStream of one of Tornado's connections (its
        # HTTP1ServerConnection as the value once its serving loop has begun).
        # Values: (time.monotonic() it began waiting, the HTTP1ServerConnection or None).
        self.fresh: dict = {}
        self.idle: dict = {}
        self._listeners: Dict[int, socket.socket] = {}  # fd -> listening socket (add_sockets)
        self._kinds: Dict[int, Tuple[int, int, int]] = {}  # fd -> its family, type, proto
        self._accepting = False  # the listeners are registered with the loop
        self._listen_stopped = False
        self._recheck = None  # the timer that looks again while accepting is paused
        self._stuck_since: Optional[float] = None  # at the cap since, no connection left it (`left`)
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

    # -- accepting ---------------------------------------------------------------------------

    def add_sockets(self, sockets) -> None:
        """Accept on `sockets` (TCPServer's method, with an accept that can pause: `_accept`)."""
        for sock in sockets:
            sock.setblocking(False)
            self._listeners[sock.fileno()] = sock
            self._kinds[sock.fileno()] = (sock.family, sock.type, sock.proto)
            if self._accepting:
                IOLoop.current().add_handler(sock.fileno(), self._accept, IOLoop.READ)
        self._listen_stopped = False
        self._resume()

    def stop(self) -> None:
        """Stop accepting and close the listening sockets (an inherited one stays open in systemd)."""
        self._pause()
        self._listen_stopped = True
        if self._recheck is not None:
            IOLoop.current().remove_timeout(self._recheck)
            self._recheck = None
        for sock in self._listeners.values():
            sock.close()
        self._listeners, self._kinds = {}, {}
        super().stop()

    def _pause(self) -> None:
        if self._accepting:
            self._accepting = False
            loop = IOLoop.current()
            for fd in self._listeners:
                loop.remove_handler(fd)

    def _resume(self) -> None:
        """Accept again (if paused): a connection left the count, or the recheck timer fired."""
        if self._recheck is not None:
            IOLoop.current().remove_timeout(self._recheck)
            self._recheck = None
        if not self._accepting and not self._listen_stopped and self._listeners:
            self._accepting = True
            loop = IOLoop.current()
            for fd in self._listeners:  # (registered by descriptor: `_accept` is called with it)
                loop.add_handler(fd, self._accept, IOLoop.READ)

    def _pause_for(self, delay: float) -> None:
        self._pause()
        if self._recheck is None and not self._listen_stopped:
            self._recheck = IOLoop.current().call_later(delay, self._resume)

    def _has_room(self) -> bool:
        """Room for one more connection, closing one that waits to make it if need be."""
        service = self.service
        if service is None:
            return True
        limit = service.config.settings.max_http_connections
        return self.http_connections() < limit or self._make_room(limit)

    def _accept(self, fd: int, events: int) -> None:
        sock, kind = self._listeners.get(fd), self._kinds.get(fd)
        for _ in range(ACCEPTS_PER_TURN):
            if sock is None or not self._accepting:
                return
            refuse = False
            if not self._has_room():  # the rest wait in the listen queue
                service = self.service
                now = time.monotonic()
                limit = service.config.settings.max_http_connections
                if self._stuck_since is None:
                    self._stuck_since = now
                if now - self._stuck_since < STUCK_SECONDS:
                    service.refusals.http_paused.note(now, limit)
                    self._pause_for(PAUSE_RECHECK_SECONDS)
                    return
                service.refusals.http.note(now, limit)  # nobody leaves: refused, not left waiting
                refuse = True
            try:
                connection, address = _accept_one(sock, kind)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    log.warning("cannot accept connections: %s; retrying in 1 s", exc)
                    self._pause_for(1.0)
                    return
                raise
            if refuse:
                _refuse(connection)
                continue
            self._handle_connection_socket(connection, address)

    def _handle_connection_socket(self, connection: socket.socket, address) -> None:
        """What TCPServer does with an accepted socket (pusherd serves no TLS itself). With the
        front on, the socket is the front's, and its IOStream is made only if it is handed over
        to Tornado (`stream`): most connections of a storm are upgraded on the front and never
        need one (bench/run.py --only storm)."""
        try:
            if self.front is not None:
                connection.setblocking(False)  # (as IOStream would)
                self.front.adopt(connection, address)
                return
            self.handle_stream(self.stream(connection), address)
        except Exception:
            log.error("error in connection callback", exc_info=True)
            connection.close()

    def stream(self, connection: socket.socket) -> IOStream:
        """The IOStream TCPServer makes for an accepted socket."""
        return IOStream(connection, max_buffer_size=self.max_buffer_size, read_chunk_size=self.read_chunk_size)

    def left(self) -> None:
        """A connection left the count (closed, or upgraded to a WebSocket): accept again."""
        self._stuck_since = None
        if not self._accepting:
            self._resume()

    # -- connections ---------------------------------------------------------------------------

    def handle_stream(self, stream: IOStream, address) -> None:
        if type(stream) is not IOStream:
            super().handle_stream(stream, address)
        else:
            stream.__class__ = _ServedIOStream
            self.fresh[stream] = (time.monotonic(), None)
            super().handle_stream(stream, address)

    def hand_over(self, connection: socket.socket, address, prefix: bytes, head_deadline: float) -> None:
        """Serve the front's `connection` as Tornado would have from the start, `prefix` being
        what it sent so far, its head due by `head_deadline` (loop time) as it was on the front."""
        stream = self.stream(connection)
        cls = self._prefilled
        cls.prefixes[stream] = prefix, stream.read_chunk_size
        stream.read_chunk_size = max(stream.read_chunk_size, len(prefix))
        stream.__class__ = cls
        self._head_deadlines[stream] = head_deadline
        self.fresh[stream] = (time.monotonic(), None)
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
            self.idle[stream] = (time.monotonic(), server_conn)
        else:
            server_conn.pusherd_served = True
            waiting = self.fresh.get(stream)
            if waiting is not None:  # (not once given up as inside a request)
                self.fresh[stream] = (waiting[0], server_conn)  # its place in the queue kept
        return super().start_request(server_conn, request_conn)

    def on_close(self, server_conn) -> None:
        stream = server_conn.stream
        self.fresh.pop(stream, None)
        self.idle.pop(stream, None)
        self._evicted.discard(stream)
        super().on_close(server_conn)
        self.left()

    def _make_room(self, limit: int) -> bool:
        """Close the connection that has waited longest for a request head, if it has waited
        `EVICT_GRACE_SECONDS` with nothing unread; False if none may be closed (yet).

        Both queues are in the order connections began to wait: the scan stops at the first
        one too young. One with bytes unread (its head arrived, the loop has not read it yet)
        goes to the back with a new grace; one gone or inside a request leaves the queue."""
        now = time.monotonic()
        for waiting in (self.fresh, self.idle):
            while waiting:
                conn = next(iter(waiting))
                since, server_conn = waiting[conn]
                if now - since < EVICT_GRACE_SECONDS:
                    return False  # younger ones follow; keep-alive ones wait while these do
                del waiting[conn]
                if not isinstance(conn, IOStream):  # a publisher connection on the front
                    if not conn.waiting_for_head():
                        continue  # gone, or inside a request: it registers again when it waits
                    sock = conn.sock
                else:  # one of Tornado's: waiting if it has not begun, or reads up to a blank line
                    if conn.closed() or (server_conn is not None and getattr(conn, "_read_regex", None) is None):
                        continue
                    if conn in self._prefilled.prefixes:  # handed over with bytes not read yet
                        waiting[conn] = (now, server_conn)
                        continue
                    sock = conn.socket
                if _unread(sock):
                    waiting[conn] = (now, server_conn)
                    continue
                conn.close()
                if isinstance(conn, IOStream):
                    self._evicted.add(conn)
                self.service.refusals.http_evictions.note(now, limit)
                return True
        return False


def _refuse(sock: socket.socket) -> None:
    """503 to a connection accepted over max_http_connections (`STUCK_SECONDS`), then closed."""
    sock.setblocking(False)
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
    sock.close()


def _unread(sock: Optional[socket.socket]) -> bool:
    """Bytes from the peer wait on `sock`, not read yet (False when none, at EOF, or gone)."""
    if sock is None:
        return False
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except OSError:  # nothing yet (BlockingIOError), or gone
        return False


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

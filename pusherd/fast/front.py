"""The publisher front: publisher connections answered on a lean path, everything else to Tornado
(Tornado internals: checked against Tornado 6.5.3 and 6.6.1).

Tornado's HTTP/1.1 server costs more per request than a publish itself: a coroutine and a
timeout per read, header objects, a Future per write, two ``setsockopt`` calls for Nagle, a
Task per request. A Rails app publishes request after request over one keep-alive connection,
so with the speed-ups on the listener (listener.Server) gives each new connection to a
`PublishConnection` first. It reads the first request's head and, while requests have the
plain shape `http1.read_head` recognizes, answers them itself: the same `answer_publish`, the
same statuses, bodies and headers as transports.http.PublishHandler (tests/integration/
test_fast_paths.py compares both byte for byte). At the first request of any other shape (a
WebSocket upgrade, a health check, a chunked body, HTTP/1.0...) the connection, with every byte
read so far, goes to Tornado's own ``HTTPServer.handle_stream`` for good (`Server.hand_over`).

What it relies on of Tornado's: nothing of the connection before a hand-over (the listener gives
the front the accepted socket, non-blocking and registered with nothing; an IOStream is made for
it only when it goes to Tornado), the loop's ``add_reader``/``add_writer`` on its descriptor.
Benchmark that justifies it: ``python bench/run.py --only publish`` (bench/README.md: publish
requests/s against the floor).
"""

import asyncio
import collections
import json
import logging
import socket
import time
import types
from typing import TYPE_CHECKING, Optional

import tornado
from tornado import httputil

from ..transports.http import answer_publish, authorize_head, body_too_large, log_access
from .http1 import MORE, OTHER, PublishHead, read_head, read_upgrade

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service
    from .listener import Server

log = logging.getLogger("pusherd")

_RECV = 65536
#: Pipelined requests answered in one go before other callbacks get the loop.
REQUESTS_PER_TURN = 16
#: WebSocket upgrades completed per loop iteration, at most (the rest wait for the next ones, in
#: order): a reconnect storm must not hold the loop for long, so the sockets already joined and
#: the publishers are served between every batch. 32 upgrades and their joins are ~10 ms of the
#: loop (bench/run.py --only storm20k: fan-out latency to joined sockets during a storm).
UPGRADES_PER_TURN = 32
#: How often the deadlines of open connections are checked: a timeout fires up to this late.
SWEEP_SECONDS = 0.5


class PublishConnections:
    """Every connection `PublishConnection` serves, and what they share."""

    def __init__(self, service: "Service", server: "Server"):
        self.service = service
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.open = set()
        # One read buffer for every connection: no large allocation per read (during a storm of
        # handshakes, a fresh 64 KB buffer per read would fragment the heap for good).
        self.read_view = memoryview(bytearray(_RECV))
        self.server_header = "TornadoServer/%s" % tornado.version
        self._sweeper: Optional[asyncio.TimerHandle] = None
        self.upgrades = None  # upgrade.Upgrades: WebSocket upgrades completed here (set by Daemon.start)
        self.waiting_upgrades: "collections.deque" = collections.deque()  # (connection, head), in arrival order
        self._upgrading = False  # a batch is scheduled
        self._turn_left = UPGRADES_PER_TURN  # upgrades this loop iteration may still complete at once
        self._date_second = -1
        self._date = ""
        self._plain_heads = {}  # status -> `plain_head`, for the second of `_date`

    def adopt(self, sock: socket.socket, address) -> None:
        PublishConnection(self, sock, address)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def upgrade(self, conn: "PublishConnection", head) -> None:
        """Complete `conn`'s upgrade now while this loop iteration has completed fewer than
        `UPGRADES_PER_TURN` and none waits, else in a later batch (in arrival order). Now, the
        connection's reader registration passes to its socket as it is (no removal and new
        registration of the descriptor: bench/run.py --only stormrails)."""
        if not self.waiting_upgrades and self._turn_left:
            if self._turn_left == UPGRADES_PER_TURN:
                self.loop.call_soon(self._new_turn)
            self._turn_left -= 1
            self._upgrade_one(conn, head)
            return
        # Waiting for its batch: not read, not evicted (Server._make_room). Its registration
        # stays, to pass to its socket as it is (no removal and new registration of the
        # descriptor); nothing comes before the 101, but if anything does, `_readable` pauses.
        conn.busy = conn.waiting = True
        self.waiting_upgrades.append((conn, head))
        if not self._upgrading:
            self._upgrading = True
            self.loop.call_soon(self._upgrade_batch)

    def _new_turn(self) -> None:
        self._turn_left = UPGRADES_PER_TURN

    @staticmethod
    def _upgrade_one(conn: "PublishConnection", head) -> None:
        try:
            conn.upgrade_now(head)
        except Exception:  # one connection's failure must not strand the others
            log.exception("WebSocket upgrade failed")
            conn.close()

    def _upgrade_batch(self) -> None:
        waiting = self.waiting_upgrades
        for _ in range(min(UPGRADES_PER_TURN, len(waiting))):
            conn, head = waiting.popleft()
            self._upgrade_one(conn, head)
        if waiting:
            self.loop.call_soon(self._upgrade_batch)
        else:
            self._upgrading = False

    def _sweep(self) -> None:
        """The timeouts of every open connection, checked once a second while there are any
        (one timer for all: a WebSocket handshake passes through here and leaves at once)."""
        now = self.loop.time()
        for conn in list(self.open):
            conn.check_deadline(now)
        self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep) if self.open else None

    def date(self, now: float) -> str:
        second = int(now)
        if second != self._date_second:
            self._date_second, self._date = second, httputil.format_timestamp(now)
            self._plain_heads.clear()
        return self._date

    def head_lines(self, status: int, now: float) -> list:
        """An answer's first header lines, as PublishHandler's answers begin."""
        return ["HTTP/1.1 %d %s" % (status, httputil.responses.get(status, "Unknown")),
                "Server: " + self.server_header,
                "Content-Type: application/json; charset=utf-8",
                "Date: " + self.date(now),
                "Cache-Control: no-store"]

    def plain_head(self, status: int, now: float) -> bytes:
        """An answer's head up to Content-Length's value when nothing follows `head_lines` but
        Content-Length (no extra header, no Connection: close), kept for the second its Date
        names: a keep-alive publisher's every answer (bench/run.py --only publish)."""
        self.date(now)  # (a new second empties the kept heads)
        head = self._plain_heads.get(status)
        if head is None:
            head = self._plain_heads[status] = ("\r\n".join(self.head_lines(status, now))
                                                + "\r\nContent-Length: ").encode("latin1")
        return head

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class PublishConnection:
    """One client connection, answered here while it sends plain ``POST /publish`` requests.

    Requests are answered one at a time, in order (pipelined ones wait in ``buf``). Reading
    pauses while an answer waits for the broker or for the socket to take it, so a client that
    pipelines without reading its answers holds at most one request's worth of bytes here. The
    timeouts are Tornado's: ``http_header_timeout`` for a head (and between requests),
    ``http_body_timeout`` for a body, checked by `PublishConnections`'s sweep.
    """

    __slots__ = ("front", "sock", "fd", "address", "remote_ip", "buf", "head", "grant", "out", "busy",
                 "reading", "closing", "deadline", "started", "last_head", "waiting", "_readable_cb", "_writable_cb")

    def __init__(self, front: PublishConnections, sock: socket.socket, address):
        self.front = front
        self.sock = sock  # non-blocking, registered with nothing yet
        self.fd = sock.fileno()
        self.address = address
        # (an IPv4 or IPv6 peer's address is a tuple, a Unix socket's a string: asking the socket
        # its family is an enum conversion in Python)
        self.remote_ip = address[0] if type(address) is tuple and address else "0.0.0.0"
        self.buf = bytearray()
        self.head: Optional[PublishHead] = None
        self.last_head: Optional[PublishHead] = None  # the previous request's, which the next often repeats
        self.grant = None  # what the credential of `head` may publish
        self.out = b""  # answer bytes the socket has not taken yet
        self.busy = False  # a request is being answered
        self.waiting = False  # an upgrade waiting for its batch (PublishConnections.upgrade)
        self.reading = False
        self.closing = False  # close once `out` is sent
        self.started = 0.0
        self._readable_cb = self._readable
        self._writable_cb = self._writable
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # every answer is one write
        except OSError:
            pass  # not TCP (an inherited Unix socket)
        front.open.add(self)
        front.server.fresh[self] = (time.monotonic(), None)  # waiting for its first request (Server._make_room)
        self.deadline = front.loop.time() + front.service.config.settings.http_header_timeout
        self._resume()

    # -- reading --------------------------------------------------------------------------

    def _resume(self) -> None:
        if not self.reading and self.sock is not None:
            self.reading = True
            self.front.loop.add_reader(self.fd, self._readable_cb)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.front.loop.remove_reader(self.fd)

    def _readable(self) -> None:
        if self.waiting:  # (an upgrade waiting for its batch: read by its socket, later)
            self._pause()
            return
        view = self.front.read_view
        try:
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not n:  # the client closed its side
            self.close()
            return
        self.buf += view[:n]
        self._serve_buffered()
        if (self.busy or self.out) and not self.waiting:  # answering takes a while: read no more until it is done
            self._pause()

    def _serve_buffered(self) -> None:
        """Answer each complete request in ``buf``, in order, until one must wait."""
        settings = self.front.service.config.settings
        answered = 0
        while not self.busy and not self.out and self.sock is not None:
            head = self.head
            if head is None:
                if not self.buf:
                    return
                if answered == REQUESTS_PER_TURN:  # a long pipeline: let the loop serve others first
                    self.busy = True
                    self._pause()
                    self.front.loop.call_soon(self._next_turn)
                    return
                head = read_head(self.buf, self.last_head)
                if head is MORE:
                    return
                if head is OTHER:
                    upgrades = self.front.upgrades
                    if upgrades is not None and self.buf.startswith(b"GET "):
                        upgrade = read_upgrade(self.buf, upgrades.paths())
                        if upgrade is MORE:
                            return
                        if upgrade is not OTHER:  # (what follows its head: its first frames)
                            self.front.upgrade(self, upgrade)
                            return
                    self._hand_over()
                    return
                self.started = time.time()
                # As PublishHandler.prepare: a wrong credential or a body too large is answered
                # before the body, which is never read (nor buffered); then the connection closes.
                self.grant, refusal = authorize_head(self.front.service, head.authorizations)
                if refusal is not None:
                    self._respond(head, *refusal, refused=True)
                    return
                if head.content_length > settings.max_publish_bytes:
                    self._respond(head, 413, {"error": body_too_large(settings.max_publish_bytes)}, (),
                                  refused=True)
                    return
                del self.buf[:head.length]
                self.head = self.last_head = head
                self.deadline = self.front.loop.time() + settings.http_body_timeout
            if len(self.buf) < head.content_length:
                return
            body = bytes(self.buf[:head.content_length])
            del self.buf[:head.content_length]
            self.head = None
            self._answer(head, body)
            answered += 1

    def _next_turn(self) -> None:
        self.busy = False
        if self.sock is not None:
            self._serve_buffered()
            if not self.busy and not self.out and not self.closing:
                self._resume()

    # -- answering ------------------------------------------------------------------------

    def _answer(self, head: PublishHead, body: bytes) -> None:
        service = self.front.service
        self.busy = True
        service.requests.add(self)  # a shutdown lets it finish (Daemon.drain)
        coro = answer_publish(service, self.grant, body, head.content_type)
        try:
            awaited = coro.send(None)  # the memory broker never waits: answered right here
        except StopIteration as done:
            status, answer, extra = done.value
        except Exception:
            log.exception("publish failed")
            status, answer, extra = 500, {"error": "internal server error"}, ()
        else:  # the broker waits (Redis): the rest runs as a task, the connection waits
            self._pause()
            service.spawn(self._finish_later(head, coro, awaited))
            return
        self._respond(head, status, answer, extra)

    async def _finish_later(self, head: PublishHead, coro, awaited) -> None:
        try:
            status, answer, extra = await _resume(coro, awaited)
        except Exception:
            log.exception("publish failed")
            status, answer, extra = 500, {"error": "internal server error"}, ()
        if self.sock is None:  # the client went away meanwhile (_detach let the drain go)
            return
        self._respond(head, status, answer, extra)
        self._serve_buffered()
        if not self.out and not self.busy and not self.closing:
            self._resume()

    def _respond(self, head: PublishHead, status: int, answer: dict, extra, refused: bool = False) -> None:
        front = self.front
        service = front.service
        settings = service.config.settings
        now = time.time()
        data = json.dumps(answer).encode("utf-8")
        close = refused or service.draining
        if not close and not extra and not head.close:
            out = b"%s%d\r\n\r\n%s" % (front.plain_head(status, now), len(data), data)
        else:
            lines = front.head_lines(status, now)
            # The order PublishHandler's answers have: Connection (draining, or a refused body)
            # and the extra headers as the handler sets them, Content-Length at finish(), and
            # last the Connection: close Tornado adds when the client asked for it.
            if close:  # shutting down, or a body refused unread: no further request on this connection
                lines.append("Connection: close")
            lines.extend("%s: %s" % ("-".join(w.capitalize() for w in name.split("-")), value)
                         for name, value in extra)
            lines.append("Content-Length: %d" % len(data))
            if head.close and not close:
                close = True
                lines.append("Connection: close")
            lines.append("\r\n")
            out = "\r\n".join(lines).encode("latin1") + data
        self.busy = False
        service.requests.discard(self)
        service.counters.publish_requests[status] += 1
        if settings.access_log:
            log_access(status, "POST", head.path, self.remote_ip, now - self.started)
        if close:
            self.closing = True
            self._pause()
        else:  # waiting for its next request: the last to be closed to make room (Server._make_room)
            server = front.server
            server.fresh.pop(self, None)
            idle = server.idle
            idle.pop(self, None)
            idle[self] = (time.monotonic(), None)
        self.deadline = front.loop.time() + settings.http_header_timeout
        self._write(out)

    # -- writing --------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.out = data[sent:]
            self._pause()
            self.front.loop.add_writer(self.fd, self._writable_cb)
        elif self.closing:
            self.close()

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if self.out:
            return
        self.front.loop.remove_writer(self.fd)
        if self.closing:
            self.close()
            return
        self._serve_buffered()
        if not self.out and not self.busy and self.sock is not None:
            self._resume()

    # -- the end ----------------------------------------------------------------------------

    def waiting_for_head(self) -> bool:
        """Open and between requests (what the listener may close to make room)."""
        return self.sock is not None and self.head is None and not self.busy and not self.out

    def check_deadline(self, now: float) -> None:
        if self.busy:  # the broker is answering: no read is waited for
            self.deadline = now + self.front.service.config.settings.http_header_timeout
        elif now >= self.deadline:  # a head, a body or an answer's write took too long: closed, as Tornado does
            self.close()

    def upgrade_now(self, head) -> None:
        """A plain WebSocket upgrade: completed here when pusherd accepts it (upgrade.py), else
        given to Tornado, which answers it."""
        self.busy = self.waiting = False
        if self.sock is None:  # closed while it waited (the sweep's head timeout, shutting down)
            return
        address, remote_ip, deadline = self.address, self.remote_ip, self.deadline
        fd, loop = self.fd, self.front.loop
        # Still registered for reading unless something came while it waited for its batch: the
        # registration is left for the socket, whose add_reader replaces the callback. Not
        # completed, whatever is registered (this connection's, or a half-made socket's) is
        # removed here.
        sock, prefix = self._detach(keep_reader=True)
        try:
            completed = self.front.upgrades.complete(sock, head, remote_ip, prefix[head.length:])
        except Exception:
            loop.remove_reader(fd)
            sock.close()  # detached from here already: nobody else would close it
            raise
        if not completed:
            loop.remove_reader(fd)  # (none registered, from a batch: a no-op)
            self.front.server.hand_over(sock, address, prefix, deadline)

    def _hand_over(self) -> None:
        """Give the connection to Tornado, with the bytes it has sent so far."""
        deadline = self.deadline
        sock, prefix = self._detach()
        if sock is not None:
            self.front.server.hand_over(sock, self.address, prefix, deadline)

    def _detach(self, keep_reader: bool = False):
        """Let the connection go: ``(socket, the bytes read)``. `keep_reader`: the descriptor stays
        registered for reading, with this connection's callback, for the caller to replace or remove."""
        sock = self.sock
        if sock is None:
            return None, b""
        if keep_reader:
            self.reading = False
        else:
            self._pause()
        if self.out:
            self.front.loop.remove_writer(self.fd)
        # No cycle left (self -> bound method -> self): freed at once, not by a later collection.
        self._readable_cb = self._writable_cb = None
        self.sock = None
        front = self.front
        front.open.discard(self)
        front.server.fresh.pop(self, None)
        front.server.idle.pop(self, None)
        front.service.requests.discard(self)
        front.server.left()  # (handed over, it counts in Tornado's connections: the listener checks)
        prefix, self.buf = bytes(self.buf), bytearray()
        return sock, prefix

    def close(self) -> None:
        sock, _ = self._detach()
        if sock is not None:
            sock.close()


@types.coroutine
def _resume(coro, awaited):
    """Await the rest of `coro`, which already ran up to yielding `awaited` (``yield from``,
    entered midway: the Task running this waits on `awaited` as it would have for `coro`)."""
    value = awaited
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation, or an exception thrown in by the Task
            try:
                value = coro.throw(exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value

"""The WebSocket connections the front completed (upgrade.py): pusherd's own objects, no Tornado
handler, request or stream under them.

A Tornado WebSocket costs a ``WebSocketHandler`` (an ``HTTPServerRequest``, its headers, the
HTTP response state), a ``WebSocketProtocol13``, an ``IOStream`` and a coroutine reading frames,
made anew for every page that connects. Right after a deploy every page does, at once. A
`FrontSocket` is one object with slots and a `SocketWriter`: it reads with the loop's
``add_reader`` on its socket and cuts the frames with `framing.MessageReader` (Tornado's rules),
and writes through the same bounded outbox as the fast handler (direct.Outbox, over the writer).
What it answers is what Tornado's protocol answers: a pong with the ping's payload, the close
code echoed, 1009 for a message over ``max_frame_bytes``, an abort for a frame Tornado aborts
on, a 5 s wait for the client's close frame after pusherd's own (tests/unit/fast/
test_frame_reader.py runs it on the bytes Tornado's reader is run on; tests/integration/
test_fast_paths.py compares whole conversations with ``PUSHERD_FAST=0``). Upgrades the front
does not complete go to Tornado and get fast/websocket.py's handler, as before.

It uses no Tornado internals: the loop's ``add_reader``/``add_writer`` and the socket.
Benchmark that justifies it: ``python bench/run.py --only storm,stormrails,storm20k``
(bench/README.md, "The deploy storm, fourth pass").
"""

import asyncio
import logging
import struct
import time
from typing import TYPE_CHECKING, Callable, List, Optional

from tornado.iostream import StreamBufferFullError, StreamClosedError

from ..core import errors
from ..core.session import Session
from .direct import FlushQueue, Outbox
from .framing import ABORT, CLOSE_FIRST, PAUSE, TOO_BIG, UNMASKED, MessageReader
from .websocket import READ_SIZE, ws_text_frame

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

log = logging.getLogger("pusherd")

#: How long pusherd waits for the client's close frame after sending its own (Tornado's wait).
CLOSE_WAIT_SECONDS = 5.0

# One read buffer for every socket (the loop runs one callback at a time): no 64 KB allocation
# per read during a storm (fast/front.py's reason for its own).
_READ_VIEW = memoryview(bytearray(READ_SIZE))


def _control_frame(opcode: int, data: bytes) -> bytes:
    """A server control frame (never masked; its payload under 126 bytes: the caller's)."""
    return bytes((0x80 | opcode, len(data))) + data


class SocketWriter:
    """The write side of a `FrontSocket`, with the part of an IOStream the outbox uses
    (direct.Outbox): ``socket``, ``write`` (at once when nothing waits; what the kernel does not
    take waits here, ``StreamBufferFullError`` past ``max_write_buffer_size``,
    ``StreamClosedError`` once closed), ``writing()``, ``_write_buffer._size`` (bytes waiting:
    itself). A failed send ends the socket (``on_error``, from the loop, not from inside the
    write); ``on_drained`` is called when the bytes waiting are all sent."""

    __slots__ = ("socket", "_fd", "_loop", "_chunks", "_size", "max_write_buffer_size", "_closed", "_on_error",
                 "on_drained", "_writable_cb")

    #: The outbox may write to `socket` itself while nothing waits here (direct.Outbox).
    direct_writes = True

    def __init__(self, sock, loop: asyncio.AbstractEventLoop, on_error: Callable[[], None]):
        self.socket = sock
        self._fd = sock.fileno()
        self._loop = loop
        self._chunks: List[bytes] = []
        self._size = 0
        self.max_write_buffer_size: Optional[int] = None
        self._closed = False
        self._on_error = on_error
        self.on_drained: Optional[Callable[[], None]] = None
        self._writable_cb = None

    @property
    def _write_buffer(self) -> "SocketWriter":
        return self

    def writing(self) -> bool:
        return self._size > 0

    def closed(self) -> bool:
        return self._closed

    def write(self, data) -> None:
        if self._closed:
            raise StreamClosedError()
        size = len(data)
        limit = self.max_write_buffer_size
        if limit is not None and self._size + size > limit:  # as IOStream: before the socket is tried
            raise StreamBufferFullError("Reached maximum write buffer size")
        if not self._size:
            try:
                sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._failed()
                return
            if sent == size:
                return
            data = data[sent:]
            self._writable_cb = self._writable
            self._loop.add_writer(self._fd, self._writable_cb)
        self._chunks.append(bytes(data))
        self._size += len(data)

    def _writable(self) -> None:
        chunks = self._chunks
        if len(chunks) > 1:
            chunks[:] = [b"".join(chunks)]
        try:
            sent = self.socket.send(chunks[0])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._failed()
            return
        self._size -= sent
        if sent < len(chunks[0]):
            chunks[0] = chunks[0][sent:]
            return
        chunks.clear()
        self._stop_writing()
        if self.on_drained is not None:
            self.on_drained()

    def _stop_writing(self) -> None:
        if self._writable_cb is not None:
            self._writable_cb = None
            self._loop.remove_writer(self._fd)

    def _failed(self) -> None:
        if not self._closed:
            on_error = self._on_error
            self.close()
            self._loop.call_soon(on_error)

    def close(self) -> None:
        """Nothing more is written (what waits is dropped); the socket is its owner's to close."""
        self._closed = True
        self._stop_writing()
        self._chunks = []
        self._size = 0
        self._on_error = self.on_drained = None


class FrontSocket:
    """One browser socket the front completed: frames in, `Session` decides, the service carries
    it out; frames out through the outbox. A connection as the service sees it (service.py)."""

    __slots__ = ("service", "sock", "fd", "loop", "session", "serializer", "writer", "outbox", "reader",
                 "closing", "client_terminated", "server_terminated", "_waiting",
                 "_readable_cb", "_ended")

    wire = staticmethod(ws_text_frame)

    def __init__(self, service: "Service", rounds: FlushQueue, sock, remote_ip: str, serializer, claims,
                 response: bytes, rest: bytes = b"", loop: Optional[asyncio.AbstractEventLoop] = None):
        """`response`: the 101, written first; `rest`: what the client sent after its head;
        `loop`: the running loop (asked for when not given: a system call on Python 3.11)."""
        self.service = service
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = loop = loop or asyncio.get_running_loop()
        self.serializer = serializer
        self.closing = False  # closed by pusherd: nothing more is written but its close frame
        self.client_terminated = False  # its close frame came (or the connection is gone)
        self.server_terminated = False  # pusherd's close frame is sent
        self._waiting: Optional[asyncio.TimerHandle] = None
        self._ended = False
        self.reader = MessageReader()
        self.writer = writer = SocketWriter(sock, loop, self.abort)
        writer.write(response)
        settings = service.config.settings
        counters = service.counters
        self.outbox = Outbox(writer, rounds.add, settings.max_outbox_bytes, self._overflowed,
                             on_drop=counters.dropped, direct=True, rounds=rounds)
        self.session = Session(serializer, service.policy, time.time(), peer=remote_ip or "-", socket_claims=claims)
        service.opened(self)
        self._readable_cb = self._readable
        loop.add_reader(self.fd, self._readable_cb)
        if rest:
            self._frames(rest)

    # -- frames in ------------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            n = self.sock.recv_into(_READ_VIEW)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset
            self.abort()
            return
        if not n:  # the client went away (or half-closed: Tornado reads that as gone too)
            self.abort()
            return
        self._frames(bytes(_READ_VIEW[:n]))

    def _frames(self, chunk: bytes) -> None:
        service = self.service
        for item in self.reader.feed(chunk, service.config.settings.max_frame_bytes):
            if item is PAUSE:  # the rest after the loop has served others
                self._pause_reading()
                self.loop.call_soon(self._go_on)
                return
            if item is ABORT or item is TOO_BIG or item is UNMASKED:
                if item is not ABORT:
                    self._send_close(*CLOSE_FIRST[item])
                self.abort()
                return
            opcode, payload = item
            if opcode == 0x1 or opcode == 0x2:
                if opcode == 0x1:
                    try:
                        payload = payload.decode("utf-8")
                    except UnicodeDecodeError:  # as Tornado: not text, not answered
                        self.abort()
                        return
                try:
                    service.receive(self, payload)
                except Exception:  # as Tornado's protocol: logged, and this socket alone ends
                    log.exception("%s: message handling failed", self.session.peer)
                    self.abort()
                    return
            elif opcode == 0x8:
                self._client_closed(payload)
                return
            elif opcode == 0x9:
                if not self.server_terminated:  # (the outbox takes frames until then)
                    self._write_now(_control_frame(0xA, payload))
            elif opcode != 0xA:  # a pong needs nothing; any other opcode is not RFC 6455
                self.abort()
                return
            if self._ended:  # the service closed it meanwhile
                return

    def _go_on(self) -> None:
        if not self._ended and not self.client_terminated:
            self._resume_reading()
            self._frames(b"")

    def _pause_reading(self) -> None:
        if self._readable_cb is not None:
            self._readable_cb = None
            self.loop.remove_reader(self.fd)

    def _resume_reading(self) -> None:
        if self._readable_cb is None and not self._ended:
            self._readable_cb = self._readable
            self.loop.add_reader(self.fd, self._readable_cb)

    def _client_closed(self, payload: bytes) -> None:
        """Its close frame: the code echoed (RFC 6455 5.5.1, as Tornado), then the end."""
        self.client_terminated = True
        self._pause_reading()
        if not self.server_terminated:
            code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
            self._send_close(code, None)
        self._end_when_sent()

    # -- frames out -----------------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """A broadcast frame (shared with the topic) or this socket's own."""
        self.outbox.send(frame)

    def send_text(self, text: str) -> None:
        self.outbox.send(ws_text_frame(text))

    def _write_now(self, frame: bytes) -> None:
        """A pong: written now, after every frame queued before it, as Tornado does."""
        self.outbox.queue(frame)
        self.outbox.flush()

    def _send_close(self, code: Optional[int], reason: Optional[str]) -> None:
        """pusherd's close frame, once, after what the outbox holds (which then takes no more)."""
        if self.server_terminated:
            return
        self.server_terminated = True
        if code is None and reason is not None:
            code = 1000
        data = b"" if code is None else struct.pack(">H", code)
        if reason is not None:
            data += reason.encode("utf-8")
        outbox = self.outbox
        outbox.flush()
        outbox.detach()  # the close frame must not hit the bound: the wait below ends it
        try:
            self.writer.write(_control_frame(0x8, data))
        except StreamClosedError:
            pass

    def close_with(self, code: int, reason: str) -> None:
        self.closing = True
        self._send_close(code, reason)
        if self.client_terminated:
            self._end_when_sent()
        elif self._waiting is None and not self._ended:
            self._waiting = self.loop.call_later(CLOSE_WAIT_SECONDS, self.abort)

    def _overflowed(self) -> None:
        self._slow_consumer("outbox over %d bytes" % self.service.config.settings.max_outbox_bytes)

    def _slow_consumer(self, why: str) -> None:
        if self.closing:
            return
        self.service.counters.slow_consumer_closes += 1
        log.info("%s: closing slow consumer (%s)", self.session.peer, why)
        # The close frame waits behind what the peer does not read: dropped after the wait.
        self.close_with(errors.CLOSE_TRY_AGAIN, "slow consumer")

    # -- time and the end -----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Called by the service's periodic sweep (one timer for every socket)."""
        if self._ended:
            return
        if self.outbox.stalled_for(time.monotonic()) > self.service.config.settings.slow_consumer_seconds:
            self.closing = True
            self.service.counters.slow_consumer_closes += 1
            log.info("%s: dropping slow consumer (writes stalled)", self.session.peer)
            self.abort()  # a close frame could not get through either
            return
        actions = self.session.tick(now)
        if actions:
            self.service.execute(self, actions)

    def _end_when_sent(self) -> None:
        if self.writer.writing():
            self.writer.on_drained = self.abort
            if self._waiting is None:
                self._waiting = self.loop.call_later(CLOSE_WAIT_SECONDS, self.abort)
        else:
            self.abort()

    def abort(self) -> None:
        """The end, at once (also when the connection is gone: the peer closed or reset it, a
        send failed): the socket closed, out of the service, every callback let go."""
        if self._ended:
            return
        self._ended = True
        self.client_terminated = self.server_terminated = True
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        self._pause_reading()
        self.writer.close()
        self.outbox.release()
        try:
            self.sock.close()
        except OSError:
            pass
        self.service.closed(self)

    def __repr__(self) -> str:
        return "FrontSocket(%s, fd %d%s)" % (self.session.peer, self.fd, ", ended" if self._ended else "")

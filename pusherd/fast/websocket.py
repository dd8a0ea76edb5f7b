"""The WebSocket transport with the speed-ups (Tornado internals: checked against Tornado 6.5.3
and 6.6.1): the same handler as transports/websocket.py, whose frames are built once for every
socket of a topic and written straight to the sockets through a bounded outbox (direct.py), and
whose open sockets keep less memory (lean.py).

What it relies on of Tornado's, beyond direct.py and lean.py: ``ws_connection.stream`` (the
socket's IOStream), that ``WebSocketProtocol13._write_frame`` is how Tornado writes every frame
of its own after the upgrade (a pong, a close frame), so hooking it keeps the outbox from writing
past bytes Tornado holds (`_Protocol`), and the listener's stream classes (listener.py).
tests/unit/fast/test_tornado_internals.py checks each.
"""

import asyncio
import logging

import tornado.websocket
from tornado.iostream import StreamClosedError
from tornado.util import _websocket_mask

from ..core import errors
from ..transports.websocket import SocketHandler
from .direct import Outbox
from .framing import client_frame_head, text_frame
from .lean import open_class, trim_open_socket

log = logging.getLogger("pusherd")


def ws_text_frame(text: str) -> bytes:
    """The wire of this transport: a message as one whole WebSocket text frame (shared bytes)."""
    return text_frame(text.encode("utf-8"))


class FastSocketHandler(SocketHandler):
    """`SocketHandler` writing pre-built frames through an `Outbox`; ``rounds`` is the process's
    `direct.FlushQueue` (given in the route's arguments, with the service)."""

    wire = staticmethod(ws_text_frame)

    def initialize(self, service, rounds, legacy_path: bool = False):
        super().initialize(service, legacy_path)
        self.rounds = rounds
        self.outbox = None

    def get_websocket_protocol(self):
        protocol = super().get_websocket_protocol()
        if type(protocol) is tornado.websocket.WebSocketProtocol13:
            protocol.__class__ = _Protocol  # its own frames must tell the outbox (see _Protocol)
        return protocol

    def open(self, *args, **kwargs):
        service = self.service
        stream = self.ws_connection.stream
        plain = getattr(type(stream), "plain_class", None)
        if plain is not None:  # the class it wore while Tornado read HTTP from it (listener._ServedIOStream)
            stream.__class__ = plain
        settings = service.config.settings
        counters = service.counters
        self.outbox = Outbox(stream, self.rounds.add, settings.max_outbox_bytes, self._overflowed,
                             on_drop=counters.dropped, direct=True, rounds=self.rounds)
        super().open(*args, **kwargs)
        # Nothing reads the upgrade request, its headers or the HTTP connection objects again.
        trim_open_socket(self, _OPEN_CLASS)

    def send_frame(self, frame: bytes) -> None:
        outbox = self.outbox
        if outbox is not None:
            outbox.send(frame)

    def close_with(self, code: int, reason: str) -> None:
        self._asked_to_close()
        if self.outbox is not None:
            self.outbox.flush()
            self.outbox.detach()
        self.close(code, reason)

    def _overflowed(self) -> None:
        self._slow_consumer("outbox over %d bytes" % self.service.config.settings.max_outbox_bytes)

    def stalled_for(self, now: float) -> float:
        outbox = self.outbox
        return 0.0 if outbox is None else outbox.stalled_for(now)

    def _frames_waiting(self) -> int:
        return 0  # the outbox counts what it drops itself

    def _drop_stalled(self) -> None:
        self.closing = True
        self._asked_to_close()
        self.service.counters.slow_consumer_closes += 1
        log.info("%s: dropping slow consumer (writes stalled)", self.session.peer if self.session else "-")
        self.outbox.detach()
        self.ws_connection.stream.close()  # a close frame could not get through either

    def on_close(self):
        super().on_close()
        if self.outbox is not None:
            self.outbox.release()  # in no topic any more: out of the fan-out's register


_OPEN_CLASS = open_class(FastSocketHandler)


#: Bytes asked of the stream per read (Tornado's own read chunk).
READ_SIZE = 65536
#: After this much work the reader lets the loop serve others (a client sending frames faster
#: than they are handled must not hold the loop), each frame counting as `FRAME_WORK` bytes
#: beside its own: Tornado 6.6's ``_YIELD_THRESHOLD`` and ``_FRAME_YIELD_COST``, on every release.
YIELD_AFTER = 256 * 1024
FRAME_WORK = 1024


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol with two changes.

    It tells the socket's outbox before Tornado writes a frame of its own (a pong, a close
    frame): the fan-out writes straight to clean sockets, and a socket with bytes in Tornado's
    buffer is not clean.

    And it reads frames its own way (`_receive_frame_loop`): what has arrived is read at once
    and the frames are cut out of it, where Tornado awaits a ``read_bytes`` for each part of
    each frame (2 to 4 Futures and coroutines a frame). The rules are Tornado's, check for
    check: reserved bits, long control frames and unfinished fragments abort, a message over
    ``max_message_size`` is closed with 1009, every message goes to Tornado's own
    ``_handle_message`` (text decoding, ping, pong, close). One check is added: a close frame
    whose reason is not UTF-8 aborts the connection (Tornado raises out of its reader there).
    Benchmark that justifies it: ``python bench/client_frames.py`` (server CPU per frame a client
    sends, 56 → 30 µs in bench/README.md; a storm's one join frame per page does not show it).
    """

    def _write_frame(self, fin, opcode, data, flags=0):
        outbox = getattr(self.handler, "outbox", None)
        if outbox is not None:
            outbox.tornado_writes()
        return super()._write_frame(fin, opcode, data, flags)

    async def _receive_frame_loop(self) -> None:
        if self._decompressor is not None:  # never negotiated (get_compression_options): Tornado's reader
            return await super()._receive_frame_loop()
        try:
            await self._read_frames()
        except StreamClosedError:
            self._abort()
        finally:
            self.handler.on_ws_connection_close(self.close_code, self.close_reason)

    async def _read_frames(self) -> None:
        stream = self.stream
        max_size = self.params.max_message_size
        data = b""  # read, not handled yet: the start of a frame at most, between reads
        pos = 0
        work = 0
        while not self.client_terminated:
            head = client_frame_head(data, pos)
            if head is None:  # keep only the unhandled bytes while waiting: an idle socket holds none
                data = data[pos:]
                pos = 0
                chunk = await stream.read_bytes(READ_SIZE, partial=True)
                self._wire_bytes_in += len(chunk)
                data = data + chunk if data else chunk
                continue
            opcode = head.opcode
            if head.rsv or (opcode & 0x8 and head.length >= 126):
                self._abort()  # an extension nobody negotiated; a control frame must be short
                return
            fragments = self._fragmented_message_buffer
            if head.length + (len(fragments) if fragments is not None else 0) > max_size:
                self.close(1009, "message too big")
                self._abort()
                return
            start = pos + head.size
            end = start + head.length
            if end > len(data):  # the rest of this frame has not arrived: read exactly that much
                rest = await stream.read_bytes(end - len(data))
                self._wire_bytes_in += len(rest)
                data = data[pos:] + rest
                start, end, pos = start - pos, end - pos, 0
            payload = data[start:end]
            if head.masked:
                payload = _websocket_mask(data[start - 4:start], payload)
            pos = end
            fin = head.fin
            if opcode & 0x8:  # control frames may come between the fragments of a message
                if not fin:
                    self._abort()
                    return
            elif opcode == 0:  # a continuation
                if fragments is None:
                    self._abort()
                    return
                fragments.extend(payload)
                if fin:
                    opcode = self._fragmented_message_opcode
                    payload = bytes(fragments)
                    self._fragmented_message_buffer = None
            else:  # a new message
                if fragments is not None:
                    self._abort()
                    return
                if not fin:
                    self._fragmented_message_opcode = opcode
                    self._fragmented_message_buffer = bytearray(payload)
            if fin:
                if opcode == 0x8 and not _utf8(payload[2:]):
                    # A close reason must be UTF-8 (RFC 6455 7.1.6). Tornado's _handle_message
                    # raises out of the reader on one that is not (its to_unicode): the socket
                    # would stay open, read by nobody, and on Tornado 6.5 counted for good.
                    self._abort()
                    return
                handled = self._handle_message(opcode, payload)
                if handled is not None:
                    await handled
            work += FRAME_WORK + head.size + head.length
            if work >= YIELD_AFTER:
                work = 0
                await asyncio.sleep(0)

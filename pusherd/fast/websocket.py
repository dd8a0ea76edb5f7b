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

from ..core import errors
from ..transports.websocket import SocketHandler
from .direct import Outbox
from .framing import ABORT, CLOSE_FIRST, PAUSE, TOO_BIG, UNMASKED, MessageReader, text_frame
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


class _Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol with two changes.

    It tells the socket's outbox before Tornado writes a frame of its own (a pong, a close
    frame): the fan-out writes straight to clean sockets, and a socket with bytes in Tornado's
    buffer is not clean.

    And it reads frames its own way (`_receive_frame_loop`): what has arrived is read at once
    and the frames are cut out of it (`framing.MessageReader`, Tornado's rules), where Tornado
    awaits a ``read_bytes`` for each part of each frame (2 to 4 Futures and coroutines a
    frame). A message over ``max_message_size`` is closed with 1009, every message goes to
    Tornado's own ``_handle_message`` (text decoding, ping, pong, close). One check is added:
    a close frame whose reason is not UTF-8 aborts the connection (Tornado raises out of its
    reader there).
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
        reader = MessageReader()
        while not self.client_terminated:
            chunk = await stream.read_bytes(READ_SIZE, partial=True)
            self._wire_bytes_in += len(chunk)
            for item in reader.feed(chunk, self.params.max_message_size):
                if item is PAUSE:
                    await asyncio.sleep(0)
                    continue
                if item is ABORT or item is TOO_BIG or item is UNMASKED:
                    if item is not ABORT:
                        self.close(*CLOSE_FIRST[item])
                    self._abort()
                    return
                handled = self._handle_message(*item)
                if handled is not None:
                    await handled
                if self.client_terminated:  # a close frame: nothing after it is read
                    break

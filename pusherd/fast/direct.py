"""Direct writes: the fan-out and the replies handed straight to the sockets, through a bounded,
coalescing outbox per socket (Tornado internals: checked against Tornado 6.5.3 and 6.6.1).

Frames queued during one event-loop iteration go out in one write (one syscall). The bytes a
socket may hold unsent are bounded: past ``max_bytes`` the socket is a slow consumer and is
closed (1013) without ever slowing delivery to anyone else. Tornado's IOStream has no bound of
its own unless ``max_write_buffer_size`` is set, which is what the second half of the bound uses.

"Unsent" means not taken by the kernel: a large burst is written in pieces, so a socket that keeps
up is never closed because one publish carried more than ``max_bytes`` (Tornado checks its bound
before it tries the socket).

The hot path allocates next to nothing per socket: every outbox with something to send joins
one `FlushQueue` (one loop callback per iteration, not one per socket), and with ``direct`` a
flush hands its bytes straight to ``socket.send`` when Tornado's own write buffer is empty,
skipping the Future and buffer bookkeeping of ``IOStream.write``. Whatever the kernel does not
take, and every write while Tornado still has bytes queued (a pong, a close frame, an earlier
remainder), goes through ``IOStream.write``, so the order of bytes on the wire is unchanged.

A broadcast's first frame in a round does not even reach the outbox: `FlushQueue.fan_out`
writes it to each clean socket itself, and only sockets with something pending (the ``dirty``
register, kept by the outboxes) or a short write go through their outbox. `DirectGroup` is how
the hub (core/fanout.py) gets there: `make_group` gives it for a group whose every member has a
registered outbox, else the hub's own `PlainGroup`.

What this reads of Tornado's: ``IOStream._write_buffer._size`` (bytes Tornado still holds),
``IOStream.socket`` and ``writing()``, ``max_write_buffer_size``; that every byte Tornado writes
after the upgrade goes through ``WebSocketProtocol13._write_frame`` (websocket.py hooks it).
tests/unit/fast/test_tornado_internals.py checks each.

Benchmark that justifies it: ``python bench/run.py --only fanout`` (bench/README.md: fan-out CPU
per delivered message at 5k sockets, pusherd against the bare-asyncio floor).
"""

import _socket
import asyncio
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError

log = logging.getLogger("pusherd.outbox")

_socket_send = _socket.socket.send  # called as send(sock, frame): no bound method per socket


class FlushQueue:
    """Callbacks to run once at the end of this loop iteration, in order, in one loop callback.

    Also the clock of broadcast rounds: ``epoch`` moves on at the first broadcast of a loop
    iteration (`broadcast_begins`), so an outbox can tell the first frame it gets in a round
    (written at once) from the ones after it (coalesced into one write at the end).

    And the register the fan-out writes through (`fan_out`): ``owners`` maps every registered
    outbox's socket to it, ``dirty`` holds the ones that must not be written to directly right
    now (bytes queued in the outbox or in Tornado's buffer, or the outbox detached). A socket
    outside ``dirty`` has nothing pending anywhere, so a frame written straight to it cannot
    overtake or split anything.

    One object for the three because an outbox consults all of them on its writes: a second
    one would cost every socket another slot.
    """

    __slots__ = ("_pending", "_call_soon", "epoch", "_in_round", "owners", "dirty")

    def __init__(self, call_soon: Optional[Callable] = None):
        self._pending: List[Callable[[], None]] = []
        self._call_soon = call_soon
        self.epoch = 0
        self._in_round = False
        self.owners: Dict[object, "Outbox"] = {}
        self.dirty: Dict[object, "Outbox"] = {}

    def broadcast_begins(self) -> None:
        if not self._in_round:
            self._in_round = True
            self.epoch += 1
            call_soon = self._call_soon
            if call_soon is None:
                call_soon = self._call_soon = asyncio.get_running_loop().call_soon
            call_soon(self._end_round)

    def _end_round(self) -> None:
        self._in_round = False

    def add(self, callback: Callable[[], None]) -> None:
        pending = self._pending
        pending.append(callback)
        if len(pending) == 1:
            call_soon = self._call_soon
            if call_soon is None:
                call_soon = self._call_soon = asyncio.get_running_loop().call_soon
            call_soon(self.run)

    def run(self) -> None:
        batch = self._pending
        self._pending = []
        for callback in batch:
            try:
                callback()
            except Exception:  # one socket's failure must not keep the others' bytes back
                log.exception("flush failed for one socket")

    def fan_out(self, frame: bytes, socks: tuple) -> int:
        """Write `frame` to every socket of `socks` (registered outboxes' sockets) at once.

        This is the hot loop of a broadcast: one C call per clean socket, touching nothing but
        the socket object, as a bare asyncio writer does with its transports. A dirty socket's
        frame goes through its outbox; what the kernel does not take goes back to the outbox
        (`Outbox.unsent`). Returns how many sockets failed (an exception, logged).
        """
        send = _socket_send
        size = len(frame)
        dirty = self.dirty
        failed = 0
        for sock in socks:
            if dirty:  # usually empty: then no lookup per socket
                box = dirty.get(sock)
                if box is not None:
                    try:
                        box.send(frame)
                    except Exception:
                        failed += 1
                        log.exception("delivery to one socket failed")
                    continue
            try:
                sent = send(sock, frame)
            except OSError:  # would block, or an error the outbox's Tornado write will meet
                sent = 0
            if sent != size:
                failed += self._unsent(sock, frame, sent)
        return failed

    def _unsent(self, sock, frame: bytes, sent: int) -> int:
        box = self.owners.get(sock)
        if box is None:
            return 1
        try:
            box.unsent(frame, sent)
        except Exception:
            log.exception("delivery to one socket failed")
            return 1
        return 0


class Outbox:
    __slots__ = ("_stream", "_chunks", "_pending", "_scheduled", "_call_soon", "_max", "_piece", "_on_overflow",
                 "stalled_since", "_on_drop", "_flush", "_rounds", "_round", "_sock", "_wbuf")

    #: Largest single write handed to Tornado: its bound is checked before the socket is tried.
    PIECE = 65536

    def __init__(self, stream, call_soon: Callable, max_bytes: int, on_overflow: Callable[[], None],
                 on_drop: Optional[Callable[[int], None]] = None, direct: bool = False,
                 rounds: Optional[FlushQueue] = None):
        self._stream = stream
        self._chunks: List[bytes] = []
        self._pending = 0
        self._scheduled = False
        self._call_soon = call_soon
        self._max = max_bytes
        self._piece = max(1, min(self.PIECE, max_bytes // 2))
        self._on_overflow = on_overflow
        self.stalled_since: Optional[float] = None
        self._on_drop = on_drop  # told how many frames were discarded unsent (metrics)
        self._flush = self.flush  # one bound method for the life of the socket
        # Only a plain socket stream may be bypassed (an SSLIOStream must encrypt), and only
        # when its write buffer looks as this module expects (Tornado 6's _StreamBuffer), or a
        # writer that says it may (frontsocket.SocketWriter).
        direct = (direct and (type(stream) is IOStream or getattr(type(stream), "direct_writes", False))
                  and isinstance(getattr(getattr(stream, "_write_buffer", None), "_size", None), int))
        # Read once here rather than per write from the stream's (cold) instance dict. A closed
        # socket object refuses send() (EBADF): it never writes to a reused descriptor, and the
        # write then goes to IOStream.write, which reports the stream closed.
        self._sock = stream.socket if direct else None
        self._wbuf = stream._write_buffer if direct else None
        # With `rounds` (and direct), the first frame of each broadcast round is written at once,
        # and the socket is registered for the rounds' fan-out.
        self._rounds = rounds if direct else None
        self._round = rounds.epoch if self._rounds is not None else -1  # no round yet: queued
        if self._rounds is not None:
            rounds.owners[self._sock] = self
            if stream.writing():  # the handshake's last bytes: no direct write before them
                self._mark_dirty()
        stream.max_write_buffer_size = max_bytes

    @property
    def fast_sock(self):
        """The socket `FlushQueue.fan_out` may write to, or None when this outbox is not registered."""
        return self._sock if self._rounds is not None else None

    def send(self, frame: bytes) -> None:
        """Send one frame: at once when it is the first this socket gets in the round and nothing
        is pending, else queued (`queue`)."""
        stream = self._stream
        if stream is None:
            self._dropped(1)
            return
        rounds = self._rounds
        if rounds is not None and self._round != rounds.epoch and not self._pending:
            self._round = rounds.epoch
            if self._write_direct(frame, 1):
                return
        self.queue(frame)

    def queue(self, frame: bytes) -> None:
        """Queue one frame: it leaves with the others queued in this loop iteration, in one write."""
        stream = self._stream
        if stream is None:
            self._dropped(1)
            return
        if not self._pending:
            self._mark_dirty()
        self._pending += len(frame)
        self._chunks.append(frame)
        if self._pending >= self._max:
            self.flush()  # a burst within one loop iteration must not pile up past the bound
        elif not self._scheduled:
            self._scheduled = True
            self._call_soon(self._flush)

    def unsent(self, frame: bytes, sent: int) -> None:
        """The fan-out wrote `sent` bytes of `frame` straight to the socket (maybe none): take
        the rest. A tail goes to Tornado at once, so nothing written later can split the frame."""
        if self._rounds is not None:
            self._round = self._rounds.epoch  # had its write of the round: what follows coalesces
        if sent:
            self._to_tornado(frame[sent:], 1)
        else:
            self.queue(frame)

    def tornado_writes(self) -> None:
        """Tornado is about to write a frame of its own (a pong, a close frame): until the outbox
        sees its buffer empty again, nothing may be written to the socket directly."""
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        """Out of the fan-out's direct writes until `_write_direct` finds nothing pending."""
        if self._rounds is not None:
            self._rounds.dirty[self._sock] = self

    def flush(self) -> None:
        self._scheduled = False
        stream = self._stream
        if stream is None or not self._chunks:
            return
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._pending = 0
        if self._sock is not None and self._write_direct(data, len(chunks)):
            return
        self._to_tornado(data, len(chunks))

    def _write_direct(self, data: bytes, frames: int) -> bool:
        """Hand `data` (nothing else is queued in the outbox) straight to the socket, unless
        Tornado still holds bytes of its own (a pong, a close frame, an earlier remainder: they
        go first). True when it is dealt with: all in the kernel, or the tail given to Tornado."""
        if self._wbuf._size:
            return False
        try:
            sent = self._sock.send(data)
        except OSError:  # would block, or an error IOStream.write will meet and handle
            return False
        if sent == len(data):
            self.stalled_since = None
            if self._rounds is not None:
                self._rounds.dirty.pop(self._sock, None)  # nothing pending anywhere: clean
            return True
        if not sent:
            return False
        self._to_tornado(data[sent:], frames)
        return True

    def _to_tornado(self, data: bytes, frames: int) -> None:
        """IOStream.write, in pieces, under the bound; the socket stays dirty until a later
        send finds Tornado's buffer empty."""
        stream = self._stream
        if stream is None:
            self._dropped(frames)
            return
        self._mark_dirty()
        piece = self._piece
        try:
            if len(data) <= piece:
                stream.write(data)
            else:
                view = memoryview(data)
                for start in range(0, len(data), piece):
                    stream.write(view[start:start + piece])
        except StreamBufferFullError:
            self._dropped(frames)  # at most: pieces already handed over may still go out
            self._overflow()
            return
        except StreamClosedError:
            self._dropped(frames)
            self.detach()
            return
        if stream.writing():
            if self.stalled_since is None:
                self.stalled_since = time.monotonic()
        else:
            self.stalled_since = None

    def stalled_for(self, now: float) -> float:
        """Seconds this socket's writes have gone undrained (0 when it keeps up)."""
        stream = self._stream
        if stream is None or self.stalled_since is None:
            return 0.0
        if not stream.writing():
            self.stalled_since = None
            return 0.0
        return now - self.stalled_since

    def _dropped(self, frames: int) -> None:
        if self._on_drop is not None and frames:
            self._on_drop(frames)

    def _overflow(self) -> None:
        self.detach()
        self._on_overflow()

    def detach(self) -> None:
        """Stop writing through this outbox. Tornado's own last frames (the close frame) are tiny
        and must not hit the bound: the connection is aborted if the peer never reads them."""
        self._dropped(len(self._chunks))
        stream = self._stream
        self._stream = None
        self._chunks = []
        self._pending = 0
        self._mark_dirty()  # the fan-out's frames come here, and are dropped
        if stream is not None:
            stream.max_write_buffer_size = None

    def release(self) -> None:
        """Leave the rounds' register (the socket is closed and in no topic any more)."""
        self.detach()
        rounds = self._rounds
        if rounds is not None:
            self._rounds = None
            rounds.owners.pop(self._sock, None)
            rounds.dirty.pop(self._sock, None)
        # The cycles through this outbox (itself -> its bound flush; the handler -> it -> the
        # handler's overflow method), broken: a closed socket is freed by its reference counts
        # at once, not by a full collection of the whole heap (fast/gc.py) long after. Neither
        # is called once the stream is detached.
        self._flush = self._on_overflow = None


class DirectGroup:
    """A group of the hub (core/fanout.py) whose members all have a registered outbox: the first
    broadcast of a round is written by `FlushQueue.fan_out` (one C call per socket), the ones
    after it in the same round are queued in the outboxes, to leave in one write per socket at
    the end of the round."""

    __slots__ = ("serializer", "wire", "rounds", "boxes", "socks", "epoch")

    def __init__(self, serializer, wire, boxes: Sequence["Outbox"], rounds: FlushQueue):
        self.serializer = serializer
        self.wire = wire
        self.rounds = rounds
        self.boxes = tuple(boxes)
        self.socks = tuple(box.fast_sock for box in self.boxes)
        self.epoch = -1  # the round of the last fan-out

    def deliver(self, frame: bytes) -> int:
        rounds = self.rounds
        rounds.broadcast_begins()
        if self.epoch != rounds.epoch:
            self.epoch = rounds.epoch
            return len(self.socks) - rounds.fan_out(frame, self.socks)
        sent = 0
        queue = Outbox.queue
        for box in self.boxes:  # later in the same round: queued, to leave in one write per socket
            try:
                queue(box, frame)
                sent += 1
            except Exception:  # one broken socket must never stop the fan-out
                log.exception("delivery to one socket failed")
        return sent


def make_group(rounds: FlushQueue, plain_group: Callable) -> Callable:
    """The hub's ``make_group``: a `DirectGroup` when every member's outbox is registered with
    `rounds` (a plain TCP socket of the fast WebSocket handler), else `plain_group`."""

    def group(serializer, wire, members: Sequence[Any]):
        boxes = [getattr(member, "outbox", None) for member in members]
        if all(box is not None and box.fast_sock is not None for box in boxes):
            return DirectGroup(serializer, wire, boxes, rounds)
        return plain_group(serializer, wire, members)

    return group

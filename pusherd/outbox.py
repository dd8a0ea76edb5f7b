"""A bounded, coalescing outbox per socket.

Frames queued during one event-loop iteration go out in one write (one syscall). The bytes a
socket may hold unsent are bounded: past ``max_bytes`` the socket is a slow consumer and is
closed (1013) without ever slowing delivery to anyone else. Tornado's IOStream has no bound of
its own unless ``max_write_buffer_size`` is set, which is what the second half of the bound uses.

"Unsent" means not taken by the kernel: a large burst is written in pieces, so a socket that keeps
up is never closed because one publish carried more than ``max_bytes`` (Tornado checks its bound
before it tries the socket).
"""

import time
from typing import Callable, List, Optional

from tornado.iostream import StreamBufferFullError, StreamClosedError


class Outbox:
    __slots__ = ("_stream", "_chunks", "_pending", "_scheduled", "_call_soon", "_max", "_piece", "_on_overflow",
                 "stalled_since", "_on_drop")

    #: Largest single write handed to Tornado: its bound is checked before the socket is tried.
    PIECE = 65536

    def __init__(self, stream, call_soon: Callable, max_bytes: int, on_overflow: Callable[[], None],
                 on_drop: Optional[Callable[[int], None]] = None):
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
        stream.max_write_buffer_size = max_bytes

    def send(self, frame: bytes) -> None:
        if self._stream is None:
            self._dropped(1)
            return
        self._pending += len(frame)
        self._chunks.append(frame)
        if self._pending >= self._max:
            self.flush()  # a burst within one loop iteration must not pile up past the bound
        elif not self._scheduled:
            self._scheduled = True
            self._call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        stream = self._stream
        if stream is None or not self._chunks:
            return
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._pending = 0
        piece = self._piece
        try:
            if len(data) <= piece:
                stream.write(data)
            else:
                view = memoryview(data)
                for start in range(0, len(data), piece):
                    stream.write(view[start:start + piece])
        except StreamBufferFullError:
            self._dropped(len(chunks))  # at most: pieces already handed over may still go out
            self._overflow()
            return
        except StreamClosedError:
            self._dropped(len(chunks))
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
        if stream is not None:
            stream.max_write_buffer_size = None

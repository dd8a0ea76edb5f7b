"""The cyclic garbage collector kept off the long-lived sockets (a process-wide speed-up).

Long-lived objects (modules, settings, and later the joined sockets) are moved out of the
collector's reach with ``gc.freeze()``, so a collection walks only what is young instead of every
live socket (Python's collector otherwise costs O(live objects) per full pass, which made the
per-message cost grow with the number of sockets). ``gc.freeze()`` acts on the whole process:
one `GcFreezer` per process, made by the process's entry point (`daemon.serve`) and handed to
the service, which tells it of every connection that opens and closes.
"""

import gc
import time
from typing import Callable

# Young-generation threshold: the fan-out path allocates little, joins allocate a lot; a larger
# first threshold means fewer collections during a reconnect storm, each still cheap. The middle
# generation's: what survives the young collections of a storm is frozen by the next sweep
# anyway; collecting it every 20 young collections walked each new socket's objects once more
# (two passes of ~200 ms in a 5,000-client storm: bench/run.py --only storm).
GC_THRESHOLDS = (20000, 100, 100)

#: The pass that unfreezes and walks the whole heap costs O(every live object) (~0.7 µs each: at
#: 20k sockets, half a second): at most one per this many seconds, so a reconnect storm gets one
#: at most, not one per quarter of its closes. A closed socket leaves no cycle behind (its
#: outbox breaks them: direct.Outbox.release), so this pass only finds what something else left.
FULL_PASS_MIN_SECONDS = 10.0


def tune_gc() -> None:
    """Called once after start-up: freeze what exists, raise the young threshold."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class GcFreezer:
    """Re-freezes the heap as sockets come and go, from the daemon's periodic sweep.

    Freezing after joins keeps the long-lived per-socket objects out of every later collection.
    Frozen objects are never collected, so once enough sockets have closed since the last
    freeze (cycles among their objects would otherwise stay), the heap is unfrozen, collected
    once and frozen again.
    """

    __slots__ = ("opened", "closed", "_min_batch", "_clock", "_min_interval", "_last_full")

    def __init__(self, min_batch: int = 256, clock: Callable[[], float] = time.monotonic,
                 min_interval: float = FULL_PASS_MIN_SECONDS):
        self.opened = 0
        self.closed = 0
        self._min_batch = min_batch
        self._clock = clock
        self._min_interval = min_interval
        self._last_full = float("-inf")

    def on_open(self) -> None:
        self.opened += 1

    def on_close(self) -> None:
        self.closed += 1

    def maybe_refreeze(self, live: int) -> bool:
        if self.closed >= max(self._min_batch, live // 4):
            now = self._clock()
            if now - self._last_full >= self._min_interval:
                gc.unfreeze()
                gc.collect()
                gc.freeze()
                self.opened = self.closed = 0
                self._last_full = now
                return True
        if self.opened >= self._min_batch // 4 or (self.opened and self.opened >= live // 16):
            # The young generation collected, then everything not frozen yet frozen. Garbage
            # must go before freezing, or it would stay until the unfreezing pass above: the
            # young collection finds it where it is made. What survived earlier young
            # collections is not walked again (in a storm that walk was most of the collector's
            # cost, and found nothing: a closed socket leaves no cycle). `closed` keeps
            # counting: only the unfreezing pass above reclaims what was frozen and closed
            # since (resetting it here, under steady churn, meant never).
            gc.collect(0)
            gc.freeze()
            self.opened = 0
            return True
        return False

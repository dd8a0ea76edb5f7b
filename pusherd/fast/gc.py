"""The cyclic garbage collector kept off the long-lived sockets (a process-wide speed-up).

Long-lived objects (modules, settings, and later the joined sockets) are moved out of the
collector's reach with ``gc.freeze()``, so a collection walks only what is young instead of every
live socket (Python's collector otherwise costs O(live objects) per full pass, which made the
per-message cost grow with the number of sockets). ``gc.freeze()`` acts on the whole process:
one `GcFreezer` per process, made by the process's entry point (`daemon.serve`) and handed to
the service, which tells it of every connection that opens and closes.
"""

import gc

# Young-generation threshold: the fan-out path allocates little, joins allocate a lot; a larger
# first threshold means fewer collections during a reconnect storm, each still cheap.
GC_THRESHOLDS = (20000, 20, 100)


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

    __slots__ = ("opened", "closed", "_min_batch")

    def __init__(self, min_batch: int = 256):
        self.opened = 0
        self.closed = 0
        self._min_batch = min_batch

    def on_open(self) -> None:
        self.opened += 1

    def on_close(self) -> None:
        self.closed += 1

    def maybe_refreeze(self, live: int) -> bool:
        if self.closed >= max(self._min_batch, live // 4):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.opened = self.closed = 0
            return True
        if self.opened >= self._min_batch // 4 or (self.opened and self.opened >= live // 16):
            # A full pass, but over the unfrozen objects only: what was made since the last
            # freeze. Garbage must go before freezing, or it would stay for good. `closed` keeps
            # counting: only the unfreezing pass above reclaims the cycles of sockets that were
            # frozen and closed since (resetting it here, under steady churn, meant never).
            gc.collect()
            gc.freeze()
            self.opened = 0
            return True
        return False

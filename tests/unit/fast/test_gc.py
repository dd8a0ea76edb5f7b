"""fast: the event-loop choice, the speed-ups switch, and the garbage-collector freezer (fast.gc)."""

import gc
import weakref

from pusherd import fast
from pusherd.fast.gc import GcFreezer


def test_loop_choice_from_the_environment():
    assert fast.loop_factory({"PUSHERD_LOOP": "asyncio"}) is None
    try:
        import uvloop
    except ImportError:
        assert fast.loop_factory({"PUSHERD_LOOP": "uvloop"}) is None  # falls back, with a warning
    else:
        assert fast.loop_factory({}) is uvloop.new_event_loop
        assert fast.loop_factory({"PUSHERD_LOOP": "uvloop"}) is uvloop.new_event_loop


def test_fast_paths_switch():
    assert fast.enabled({}) is True
    assert fast.enabled({"PUSHERD_FAST": "1"}) is True
    for off in ("0", "false", "off", "no"):
        assert fast.enabled({"PUSHERD_FAST": off}) is False


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freezer_freezes_after_joins_and_reclaims_frozen_cycles_after_closes():
    gc.unfreeze()
    try:
        freezer = GcFreezer(min_batch=8)
        assert freezer.maybe_refreeze(live=100) is False  # nothing happened
        survivors = [Node() for _ in range(10)]
        ref = weakref.ref(survivors[0])
        for _ in survivors:
            freezer.on_open()
        assert freezer.maybe_refreeze(live=10) is True
        frozen = gc.get_freeze_count()
        assert frozen > 0
        # The sockets close; their cycles sit in the frozen generation until enough have closed.
        del survivors
        for _ in range(10):
            freezer.on_close()
        gc.collect()
        assert ref() is not None  # frozen: the collector does not see it
        assert freezer.maybe_refreeze(live=0) is True
        assert ref() is None
    finally:
        gc.unfreeze()


def test_freezer_reclaims_frozen_cycles_under_steady_churn():
    """Sockets open and close in every sweep (a reconnecting population): the young-only
    freezes must not keep postponing the pass that reclaims closed sockets' frozen cycles."""
    gc.unfreeze()
    try:
        clock = [0.0]
        freezer = GcFreezer(min_batch=8, clock=lambda: clock[0], min_interval=10.0)
        closed_refs = []
        live = [Node() for _ in range(40)]
        for _ in live:
            freezer.on_open()
        freezer.maybe_refreeze(live=len(live))
        for sweep in range(20):
            # two sockets close, two new ones open, every sweep
            for _ in range(2):
                gone = live.pop(0)
                closed_refs.append(weakref.ref(gone))
                del gone
                freezer.on_close()
                live.append(Node())
                freezer.on_open()
            freezer.maybe_refreeze(live=len(live))
            clock[0] += 10.0  # one sweep every ten seconds: every due pass may run
        # 40 closes with a bound of max(8, 40 // 4) = 10: every closed socket but the last
        # few (closed since the last unfreezing pass) has been reclaimed.
        assert sum(ref() is not None for ref in closed_refs) < 10
    finally:
        gc.unfreeze()


def test_the_whole_heap_pass_runs_at_most_once_per_interval():
    """A storm of closes: one unfreezing pass, then none until the interval has passed (each
    walks every live object), and the closes keep counting meanwhile."""
    gc.unfreeze()
    try:
        clock = [100.0]
        freezer = GcFreezer(min_batch=8, clock=lambda: clock[0], min_interval=10.0)
        node = Node()
        ref = weakref.ref(node)
        freezer.on_open()
        freezer.maybe_refreeze(live=1)  # frozen
        del node
        for _ in range(8):
            freezer.on_close()
        assert freezer.maybe_refreeze(live=0) is True and ref() is None  # the first pass runs
        node = Node()
        ref = weakref.ref(node)
        freezer.on_open()
        freezer.maybe_refreeze(live=1)
        del node
        for _ in range(8):
            freezer.on_close()
        clock[0] += 9.0
        freezer.maybe_refreeze(live=0)
        assert ref() is not None and freezer.closed == 8  # too soon: still frozen, still counted
        clock[0] += 1.0
        assert freezer.maybe_refreeze(live=0) is True and ref() is None
    finally:
        gc.unfreeze()

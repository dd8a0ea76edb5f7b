"""Event-loop choice, the fast-path switch, and the garbage-collector freezer."""

import gc
import weakref

from pusherd import speedups


def test_loop_choice_from_the_environment():
    assert speedups.loop_factory({"PUSHERD_LOOP": "asyncio"}) is None
    try:
        import uvloop
    except ImportError:
        assert speedups.loop_factory({"PUSHERD_LOOP": "uvloop"}) is None  # falls back, with a warning
    else:
        assert speedups.loop_factory({}) is uvloop.new_event_loop
        assert speedups.loop_factory({"PUSHERD_LOOP": "uvloop"}) is uvloop.new_event_loop


def test_fast_paths_switch():
    assert speedups.fast_paths({}) is True
    assert speedups.fast_paths({"PUSHERD_FAST": "1"}) is True
    for off in ("0", "false", "off", "no"):
        assert speedups.fast_paths({"PUSHERD_FAST": off}) is False


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_freezer_freezes_after_joins_and_reclaims_frozen_cycles_after_closes():
    gc.unfreeze()
    try:
        freezer = speedups.GcFreezer(min_batch=8)
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

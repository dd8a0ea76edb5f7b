"""history.py: positions, the bounded ring, recovery decisions, and the replay/live race."""

import os
import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from pusherd.core.broadcast import Broadcast
from pusherd.brokers.memory import MemoryBroker
from pusherd.config import HistoryRule
from pusherd.core.history import (LIMIT_BYTES, LIMIT_TOPICS, STREAM_OVERHEAD, Rules, Store, Stream, decide_history,
                                  empty_position, empty_since, format_position, parse_position, pending_after)


def test_parse_position():
    assert parse_position("ab12:7") == ("ab12", 7)
    assert parse_position("a:b:7") == ("a:b", 7)
    assert parse_position("\ud800:1") == ("\ud800", 1)      # any epoch: just never ours
    for bad in (None, 7, "", "7", ":7", "ab:", "ab:-1", "ab:x", "ab:1.5", "a" * 300 + ":1",
                "ab:\u00b2", "ab:\u0661\u0662", "ab:\uff11"):   # ², Arabic-Indic 12, fullwidth 1: digits, not ASCII
        assert parse_position(bad) is None


# Epochs up to the length whose positions stay within parse_position's 200 characters (the 16
# digits of 10**15 and the colon); longer texts are refused by design (test_parse_position).
@given(st.text(min_size=1, max_size=183, alphabet=st.characters(blacklist_characters=":")),
       st.integers(0, 10**15))
@settings(max_examples=100, deadline=None)
def test_position_round_trip(epoch, offset):
    assert parse_position(format_position(epoch, offset)) == (epoch, offset)


def stream_with(n, size=10, ttl=100.0, now=1000.0):
    s = Stream(size, ttl, epoch="e1")
    for i in range(n):
        s.append("ev", {"i": i + 1}, now)
    return s


def test_offsets_increase_and_ring_is_bounded():
    s = stream_with(15, size=10)
    assert s.position == "e1:15"
    assert [e.offset for e in s.entries] == list(range(6, 16))


def test_recover_exactly_the_missed_ones_in_order():
    s = stream_with(5)
    r = s.recover("e1:2", 1000.0, 300)
    assert r.recovered and r.position == "e1:5"
    assert [e.payload["i"] for e in r.missed] == [3, 4, 5]


def test_recover_up_to_date_and_from_zero():
    s = stream_with(3)
    assert s.recover("e1:3", 1000.0, 300) == (True, "e1:3", (), "e1")
    assert [e.offset for e in s.recover("e1:0", 1000.0, 300).missed] == [1, 2, 3]


@pytest.mark.parametrize("since,why", [
    ("e0:2", "epoch changed"),
    ("e1:9", "from the future"),
    ("garbage", "not a position"),
    ("e1:1", "gap older than the ring"),
])
def test_no_partial_recovery(since, why):
    s = stream_with(8, size=5)   # keeps offsets 4..8
    r = s.recover(since, 1000.0, 300)
    assert not r.recovered and r.missed == () and r.position == "e1:8", why


def test_ring_edge_is_still_recoverable():
    s = stream_with(8, size=5)   # offsets 4..8: a client at 3 missed exactly 4..8
    assert [e.offset for e in s.recover("e1:3", 1000.0, 300).missed] == [4, 5, 6, 7, 8]


def test_max_recovery():
    s = stream_with(10, size=50)
    assert not s.recover("e1:0", 1000.0, 9).recovered
    assert s.recover("e1:1", 1000.0, 9).recovered


def test_ttl_expiry_makes_a_gap():
    s = Stream(10, ttl=60.0, epoch="e1")
    s.append("a", {}, 1000.0)
    s.append("b", {}, 1100.0)
    assert not s.recover("e1:0", 1100.0, 300).recovered   # offset 1 expired
    assert s.recover("e1:1", 1100.0, 300).recovered


def test_store_only_keeps_history_for_matching_topics_and_drops_idle_streams():
    store = Store(Rules([HistoryRule("deploys:*", 10, 60.0)]), random=os.urandom)
    assert store.append("public:x", "e", {}, 1000.0) is None
    pos = store.append("deploys:web", "e", {}, 1000.0)
    assert parse_position(pos)[1] == 1
    epoch = parse_position(pos)[0]
    store.sweep(1000.0 + 61)
    assert "deploys:web" not in store.streams
    r = store.recover("deploys:web", pos, 1100.0)
    assert not r.recovered and parse_position(r.position)[0] != epoch


def test_pending_after_drops_what_the_replay_covered():
    items = [Broadcast("t", "e", {}, position="e1:%d" % i) for i in (4, 5, 6)]
    assert [b.position for b in pending_after(items, 5)] == ["e1:6"]


def test_replay_live_race_is_gapless_and_duplicate_free():
    """Deterministic race: broadcasts published while a join looks up history."""
    from pusherd.core.fanout import Hub
    from pusherd.core.protocol import V2

    class Sock:
        serializer = V2
        wire = staticmethod(str)

        def __init__(self):
            self.frames = []

        def send_frame(self, frame):
            self.frames.append(frame)

    async def scenario():
        broker = MemoryBroker(Rules([HistoryRule("deploys:*", 100, 3600.0)]))
        hub = Hub()
        await broker.start(hub.broadcast)
        for i in range(3):
            await broker.publish(Broadcast("deploys:web", "v", {"i": i + 1}))
        since = "%s:1" % broker.history.streams["deploys:web"].epoch
        held = []
        hub.hold("deploys:web", held)
        # A publish lands between the hold and the history read (inside the lookup) ...
        await broker.publish(Broadcast("deploys:web", "v", {"i": 4}))
        recovery = await broker.recover("deploys:web", since)
        # ... and one after the read, before the join goes live.
        await broker.publish(Broadcast("deploys:web", "v", {"i": 5}))
        last = parse_position(recovery.position)[1]
        seen = [e.payload["i"] for e in recovery.missed] + [b.payload["i"] for b in pending_after(held, last)]
        hub.release("deploys:web", held)
        return seen

    assert asyncio.run(scenario()) == [2, 3, 4, 5]


# -- empty positions: a join with `since` on a topic without history creates nothing ------------

def test_empty_positions():
    assert empty_position(1000.0) == "n1000000:0"
    assert empty_since("n1000000:0") == 1000.0
    for other in ("n1000000:1", "nx:0", "n:0", "ab12cd34:0", "n" + "1" * 20 + ":0", "n\u0661:0", None):
        assert empty_since(other) is None


def test_decide_history_vouches_for_an_empty_position_only_while_nothing_can_be_lost():
    T = 1000.0
    since = empty_position(T)
    # Still no history: nothing missed, within the ttl, with the store intact since before T.
    assert decide_history(None, (), since, T + 59, 60.0, 300, T - 1) == (True, empty_position(T + 59), (), None)
    assert not decide_history(None, (), since, T + 60, 60.0, 300, T - 1).recovered      # a history may have come and gone
    assert not decide_history(None, (), since, T + 1, 60.0, 300, T + 0.5).recovered     # evicted after T
    assert not decide_history(None, (), "ab:3", T, 60.0, 300, 0.0).recovered            # not an empty position
    assert not decide_history(None, (), empty_position(T + 5), T, 60.0, 300, 0.0).recovered   # from the future
    # A history created after T: recovered from offset 1.
    s = Stream(10, 60.0, epoch="e1", now=T + 2)
    for i in (1, 2):
        s.append("e", {"i": i}, T + 2)
    r = decide_history(("e1", 2, T + 2), s.entries, since, T + 3, 60.0, 300, 0.0)
    assert r.recovered and [e.offset for e in r.missed] == [1, 2]
    # ... not when it was created before T (the client did not see it empty), nor when its
    # first entries are gone.
    assert not decide_history(("e1", 2, T - 1), s.entries, since, T + 3, 60.0, 300, 0.0).recovered
    assert not decide_history(("e1", 2, T + 2), list(s.entries)[1:], since, T + 3, 60.0, 300, 0.0).recovered


def test_store_recover_creates_nothing():
    store = Store(Rules([HistoryRule("public:*", 10, 60.0)]), now=1000.0, random=os.urandom)
    for i in range(1000):
        r = store.recover("public:fresh-%d" % i, "x:1", 1001.0)
        assert not r.recovered and r.position == empty_position(1001.0)
    assert store.streams == {} and store.bytes == 0


# -- global bounds ------------------------------------------------------------------------------

def test_max_topics_evicts_the_history_that_expires_first():
    store = Store(Rules([HistoryRule("a:*", 10, 60.0), HistoryRule("b:*", 10, 3600.0)]), max_topics=3, random=os.urandom)
    store.append("b:long", "e", {}, 1000.0)    # expires at 4600
    store.append("a:1", "e", {}, 1001.0)       # 1061
    store.append("a:2", "e", {}, 1002.0)       # 1062
    store.append("a:1", "e", {}, 1003.0)       # published again: 1063
    store.append("a:3", "e", {}, 1004.0)       # a 4th topic: a:2 goes
    assert sorted(store.streams) == ["a:1", "a:3", "b:long"]
    assert store.evictions == {LIMIT_TOPICS: 1, LIMIT_BYTES: 0}
    assert store.intact_since == 1004.0
    assert not store.recover("a:2", "x:1", 1005.0).recovered


def test_max_bytes_evicts_other_topics_then_trims_the_publishing_one():
    store = Store(Rules([HistoryRule("t:*", 100, 60.0)]), max_bytes=5000, random=os.urandom)
    for i in range(5):           # about 2.1 KB each: two fit
        store.append("t:%d" % i, "e", {"pad": "x" * 800}, 1000.0 + i)
    assert store.bytes <= 5000 and sorted(store.streams) == ["t:3", "t:4"]
    assert store.evictions[LIMIT_BYTES] == 3
    assert store.bytes == sum(s.bytes for s in store.streams.values())
    for n in range(10):          # one topic alone over the bound keeps its newest entries
        store.append("t:4", "e", {"pad": "y" * 800, "n": n}, 1010.0 + n)
    assert store.bytes <= 5000 and list(store.streams) == ["t:4"]
    assert store.streams["t:4"].entries[-1].payload["n"] == 9


def test_byte_accounting_follows_the_ring_expiry_and_sweep():
    store = Store(Rules([HistoryRule("t:*", 3, 60.0)]), random=os.urandom)
    for i in range(10):
        store.append("t:a", "e", {"i": i}, 1000.0)
    stream = store.streams["t:a"]
    assert stream.bytes == STREAM_OVERHEAD + sum(e.size for e in stream.entries) and store.bytes == stream.bytes
    store.recover("t:a", stream.position, 1061.0)     # every entry expired
    assert store.bytes == stream.bytes == STREAM_OVERHEAD
    store.sweep(1061.0)
    assert store.bytes == 0 and store.streams == {}


def test_client_pushes_are_kept_only_when_the_rule_says_so():
    store = Store(Rules([HistoryRule("public:chat:*", 10, 60.0, client_pushes=True),
                         HistoryRule("public:*", 10, 60.0)]), random=os.urandom)
    assert store.append("public:x", "e", {}, 1000.0, client=True) is None and store.streams == {}
    assert store.append("public:x", "e", {}, 1000.0) is not None              # the same topic from Rails
    assert store.append("public:x", "e", {}, 1000.0, client=True) is None     # a push on it: still not kept
    assert parse_position(store.append("public:chat:1", "e", {}, 1000.0, client=True))[1] == 1

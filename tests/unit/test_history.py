"""history.py: positions, the bounded ring, recovery decisions, and the replay/live race."""

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from pusherd.core.broadcast import Broadcast
from pusherd.broker import MemoryBroker
from pusherd.config import HistoryRule
from pusherd.core.history import Rules, Store, Stream, format_position, parse_position, pending_after


def test_parse_position():
    assert parse_position("ab12:7") == ("ab12", 7)
    assert parse_position("a:b:7") == ("a:b", 7)
    for bad in (None, 7, "", "7", ":7", "ab:", "ab:-1", "ab:x", "ab:1.5", "a" * 300 + ":1"):
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
    store = Store(Rules([HistoryRule("deploys:*", 10, 60.0)]))
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
    from pusherd.hub import Hub
    from pusherd.core.protocol import V2

    class Sock:
        serializer = V2

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

"""core.fanout: the hub encodes each broadcast once per serializer and shares the same frame."""

import json
import logging
import struct

import pytest

from pusherd.core.broadcast import Broadcast
from pusherd.core.fanout import Hub as _Hub
from pusherd.core.protocol import LEGACY, V1, V2
from pusherd.fast.framing import text_frame
from pusherd.counters import Counters
from pusherd_testing import parse_frame


def ws_frame(text: str) -> bytes:
    return text_frame(text.encode("utf-8"))


def Hub(**kwargs):
    """A hub that counts into its own Counters (``hub.counters``)."""
    return _Hub(counters=Counters(), **kwargs)


class FakeSocket:
    wire = staticmethod(ws_frame)  # as the fast WebSocket transport: whole frames

    def __init__(self, serializer):
        self.serializer = serializer
        self.frames = []

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


class BrokenSocket(FakeSocket):
    def send_frame(self, frame: bytes) -> None:
        raise OSError("stream closed")


# --- fan-out -------------------------------------------------------------------------------------

def test_thousand_subscribers_two_encodes():
    hub = Hub()
    sockets = [FakeSocket(V1 if i % 2 else V2) for i in range(1000)]
    for sock in sockets:
        hub.subscribe("public:lobby", sock)
    assert hub.members("public:lobby") == 1000
    reached = hub.broadcast(Broadcast("public:lobby", "new_msg", {"body": "hi", "n": 1}))
    assert reached == 1000
    assert hub.counters.encodes == 2
    assert hub.counters.delivered == 1000
    by_version = {V1: set(), V2: set()}
    ids = {V1: set(), V2: set()}
    for sock in sockets:
        assert len(sock.frames) == 1
        by_version[sock.serializer].add(sock.frames[0])
        ids[sock.serializer].add(id(sock.frames[0]))
    assert len(by_version[V1]) == 1 and len(by_version[V2]) == 1
    assert len(ids[V1]) == 1 and len(ids[V2]) == 1, "the very same bytes object goes to every socket"
    v1_frame, = by_version[V1]
    v2_frame, = by_version[V2]
    for frame in (v1_frame, v2_frame):
        fin, opcode, masked, _ = parse_frame(frame)
        assert (fin, opcode, masked) == (1, 1, 0)
    assert json.loads(parse_frame(v2_frame)[3]) == [None, None, "public:lobby", "new_msg", {"body": "hi", "n": 1}]
    assert parse_frame(v2_frame)[3] == b'[null,null,"public:lobby","new_msg",{"body":"hi","n":1}]'
    assert parse_frame(v1_frame)[3] == \
        b'{"topic":"public:lobby","event":"new_msg","payload":{"body":"hi","n":1},"ref":null}'


def test_encodes_counted_per_broadcast_and_per_version_present():
    hub = Hub()
    for _ in range(10):
        hub.subscribe("public:a", FakeSocket(V2))
    hub.broadcast(Broadcast("public:a", "ev", {}))
    hub.broadcast(Broadcast("public:a", "ev", {}))
    assert hub.counters.encodes == 2          # one version present, two broadcasts
    hub.subscribe("public:a", FakeSocket(LEGACY))
    hub.broadcast(Broadcast("public:a", "ev", {}))
    assert hub.counters.encodes == 4


def test_large_broadcast_uses_extended_length():
    hub = Hub()
    sock = FakeSocket(V2)
    hub.subscribe("public:big", sock)
    hub.broadcast(Broadcast("public:big", "ev", {"blob": "x" * 70000}))
    fin, opcode, masked, payload = parse_frame(sock.frames[0])
    assert sock.frames[0][1] == 127
    assert json.loads(payload)[4]["blob"] == "x" * 70000


def test_broadcast_reaches_only_the_topic():
    hub = Hub()
    a, b = FakeSocket(V2), FakeSocket(V2)
    hub.subscribe("public:a", a)
    hub.subscribe("public:b", b)
    assert hub.broadcast(Broadcast("public:a", "ev", {})) == 1
    assert len(a.frames) == 1 and b.frames == []
    assert hub.broadcast(Broadcast("public:none", "ev", {})) == 0
    assert hub.counters.encodes == 1


def test_a_failing_socket_does_not_stop_the_others(caplog):
    hub = Hub()
    good = [FakeSocket(V2) for _ in range(5)] + [FakeSocket(V1) for _ in range(5)]
    broken = [BrokenSocket(V2), BrokenSocket(V1)]
    for sock in good[:5] + broken[:1] + good[5:] + broken[1:]:
        hub.subscribe("public:a", sock)
    with caplog.at_level(logging.ERROR, logger="pusherd.hub"):
        reached = hub.broadcast(Broadcast("public:a", "ev", {"x": 1}))
    assert reached == 10
    assert all(len(sock.frames) == 1 for sock in good)
    assert hub.counters.delivered == 10
    assert hub.counters.encodes == 2
    assert any("delivery" in r.getMessage() for r in caplog.records)


def test_on_first_and_on_last_fire_once():
    events = []
    hub = Hub(on_first=lambda t: events.append(("first", t)), on_last=lambda t: events.append(("last", t)))
    a, b = FakeSocket(V2), FakeSocket(V1)
    hub.subscribe("public:a", a)
    hub.subscribe("public:a", b)
    hub.subscribe("public:a", a)          # same socket twice: still one member
    assert events == [("first", "public:a")]
    assert hub.members("public:a") == 2
    hub.unsubscribe("public:a", a)
    assert events == [("first", "public:a")]
    hub.unsubscribe("public:a", a)        # already gone
    hub.unsubscribe("public:a", b)
    assert events == [("first", "public:a"), ("last", "public:a")]
    assert hub.members("public:a") == 0 and "public:a" not in hub.topics
    hub.unsubscribe("public:a", b)        # unknown topic now: no second on_last
    hub.unsubscribe("never:subscribed", a)
    assert events == [("first", "public:a"), ("last", "public:a")]
    hub.subscribe("public:a", a)
    assert events[-1] == ("first", "public:a") and len(events) == 3


def test_hub_without_callbacks():
    hub = Hub()
    sock = FakeSocket(V2)
    hub.subscribe("t:a", sock)
    hub.unsubscribe("t:a", sock)
    assert hub.topics == {}


def test_unsubscribing_during_delivery_is_safe():
    hub = Hub()

    class Leaver(FakeSocket):
        def send_frame(self, frame):
            super().send_frame(frame)
            hub.unsubscribe("public:a", self)

    leavers = [Leaver(V2) for _ in range(5)]
    for sock in leavers:
        hub.subscribe("public:a", sock)
    assert hub.broadcast(Broadcast("public:a", "ev", {})) == 5
    assert all(len(s.frames) == 1 for s in leavers)
    assert hub.members("public:a") == 0


def test_broadcast_refs_are_null():
    hub = Hub()
    v1, v2 = FakeSocket(V1), FakeSocket(V2)
    hub.subscribe("public:a", v1)
    hub.subscribe("public:a", v2)
    hub.broadcast(Broadcast("public:a", "ev", {}))
    assert json.loads(parse_frame(v1.frames[0])[3])["ref"] is None
    assert json.loads(parse_frame(v2.frames[0])[3])[:2] == [None, None]


def test_membership_changes_between_broadcasts_are_seen_by_the_next_one():
    """The hub groups a topic's members once and reuses the grouping: every change must reset it."""
    hub = Hub()
    a, b, c = FakeSocket(V2), FakeSocket(V1), FakeSocket(V2)
    hub.subscribe("t", a)
    assert hub.broadcast(Broadcast("t", "e", {"n": 1})) == 1
    hub.subscribe("t", b)
    hub.subscribe("t", c)
    assert hub.broadcast(Broadcast("t", "e", {"n": 2})) == 3
    assert hub.counters.encodes == 3  # one frame for the first, one per serializer for the second
    hub.unsubscribe("t", a)
    assert hub.broadcast(Broadcast("t", "e", {"n": 3})) == 2
    hub.unsubscribe("t", b)
    hub.unsubscribe("t", c)
    assert hub.broadcast(Broadcast("t", "e", {"n": 4})) == 0
    hub.subscribe("t", a)
    assert hub.broadcast(Broadcast("t", "e", {"n": 5})) == 1
    counts = [[json.loads(parse_frame(f)[3])[-1]["n"] if s.serializer is V2 else json.loads(parse_frame(f)[3])["payload"]["n"]
               for f in s.frames] for s in (a, b, c)]
    assert counts == [[1, 2, 5], [2, 3], [2, 3]]
    assert b.frames[0] != a.frames[1] and c.frames[0] is a.frames[1]  # V2 members share one frame


def test_a_member_that_fails_is_not_counted_and_does_not_stop_the_others(caplog):
    hub = Hub()
    good = [FakeSocket(V2) for _ in range(3)]
    hub.subscribe("t", good[0])
    hub.subscribe("t", BrokenSocket(V2))
    hub.subscribe("t", good[1])
    hub.subscribe("t", good[2])
    with caplog.at_level(logging.ERROR):
        assert hub.broadcast(Broadcast("t", "e", {})) == 3
    assert all(len(s.frames) == 1 for s in good)
    assert hub.counters.delivered == 3


class TextMember(FakeSocket):
    """A member whose wire is the text itself (as long-poll keeps messages)."""
    wire = staticmethod(str)


def test_members_of_one_serializer_on_two_wires_share_one_encode():
    hub = Hub()
    ws = [FakeSocket(V2) for _ in range(3)]
    polls = [TextMember(V2) for _ in range(3)]
    for member in ws + polls:
        hub.subscribe("public:a", member)
    assert hub.broadcast(Broadcast("public:a", "ev", {"n": 1})) == 6
    assert hub.counters.encodes == 1
    assert len({id(m.frames[0]) for m in ws}) == 1 and len({id(m.frames[0]) for m in polls}) == 1
    assert polls[0].frames[0] == '[null,null,"public:a","ev",{"n":1}]'
    assert parse_frame(ws[0].frames[0])[3] == polls[0].frames[0].encode()


def test_groups_are_made_by_the_make_group_given():
    made = []

    def make_group(serializer, wire, members):
        from pusherd.core.fanout import PlainGroup
        made.append((serializer, len(members)))
        return PlainGroup(serializer, wire, members)

    hub = _Hub(make_group=make_group)
    for serializer in (V1, V2, V2):
        hub.subscribe("t", FakeSocket(serializer))
    hub.broadcast(Broadcast("t", "e", {}))
    hub.broadcast(Broadcast("t", "e", {}))   # grouped once per membership change
    assert sorted((s.vsn, n) for s, n in made) == [("1.0.0", 1), ("2.0.0", 2)]

"""pusherd.hub and pusherd.framing: fan-out encodes once per serializer and shares the same bytes."""

import json
import logging
import struct

import pytest

from pusherd.core.broadcast import Broadcast
from pusherd.framing import text_frame
from pusherd.hub import Hub
from pusherd.core.protocol import LEGACY, V1, V2


class FakeSocket:
    def __init__(self, serializer):
        self.serializer = serializer
        self.frames = []

    def send_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


class BrokenSocket(FakeSocket):
    def send_frame(self, frame: bytes) -> None:
        raise OSError("stream closed")


def parse_frame(frame: bytes):
    """RFC 6455 §5.2: return (fin, opcode, masked, payload) and check the length encoding is minimal."""
    assert len(frame) >= 2
    fin, opcode = frame[0] >> 7, frame[0] & 0x0F
    assert frame[0] & 0x70 == 0, "RSV bits must be clear (no extension negotiated)"
    masked, length = frame[1] >> 7, frame[1] & 0x7F
    pos = 2
    if length == 126:
        (length,) = struct.unpack("!H", frame[2:4])
        assert length >= 126, "16-bit length used for a short payload"
        pos = 4
    elif length == 127:
        (length,) = struct.unpack("!Q", frame[2:10])
        assert length >= 65536, "64-bit length used for a payload that fits 16 bits"
        assert length >> 63 == 0
        pos = 10
    payload = frame[pos:]
    assert len(payload) == length
    return fin, opcode, masked, payload


# --- framing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,header", [
    (0, b"\x81\x00"),
    (1, b"\x81\x01"),
    (125, b"\x81\x7d"),
    (126, b"\x81\x7e\x00\x7e"),
    (127, b"\x81\x7e\x00\x7f"),
    (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    (70000, b"\x81\x7f" + struct.pack("!Q", 70000)),
])
def test_text_frame_length_boundaries(size, header):
    data = b"x" * size
    frame = text_frame(data)
    assert frame[:len(header)] == header
    assert frame[len(header):] == data
    fin, opcode, masked, payload = parse_frame(frame)
    assert (fin, opcode, masked) == (1, 1, 0)
    assert payload == data


def test_text_frame_keeps_utf8_bytes():
    data = '[null,null,"room:é","ev",{"s":"日本"}]'.encode("utf-8")
    assert parse_frame(text_frame(data))[3].decode("utf-8") == '[null,null,"room:é","ev",{"s":"日本"}]'


# --- fan-out -------------------------------------------------------------------------------------

def test_thousand_subscribers_two_encodes():
    hub = Hub()
    sockets = [FakeSocket(V1 if i % 2 else V2) for i in range(1000)]
    for sock in sockets:
        hub.subscribe("public:lobby", sock)
    assert hub.members("public:lobby") == 1000
    reached = hub.broadcast(Broadcast("public:lobby", "new_msg", {"body": "hi", "n": 1}))
    assert reached == 1000
    assert hub.encodes == 2
    assert hub.delivered == 1000
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
    assert hub.encodes == 2          # one version present, two broadcasts
    hub.subscribe("public:a", FakeSocket(LEGACY))
    hub.broadcast(Broadcast("public:a", "ev", {}))
    assert hub.encodes == 4


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
    assert hub.encodes == 1


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
    assert hub.delivered == 10
    assert hub.encodes == 2
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
    assert hub.encodes == 3  # one frame for the first, one per serializer for the second
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
    assert hub.delivered == 3

"""Topic -> local members, and the fan-out: each broadcast encoded once per serializer.

A member is one connection of any transport, seen through the `Member` protocol: its
``serializer`` (which JSON shape it speaks), its ``wire`` (how a transport wants a message:
WebSocket frame bytes, UTF-8 text, the text itself for long-poll) and ``send_frame``. The
members of a topic are grouped once per membership change by (serializer, wire); a broadcast is
encoded once per serializer present, turned into each wire's frame once, and every member of a
group gets the very same object: no per-connection JSON, no per-connection framing.

How a group hands its frame to its members is the group's business (`Group`): `PlainGroup`
calls ``send_frame`` on each; the direct-write speed-up (pusherd/fast/direct.py) supplies
groups that write to the sockets themselves, through ``make_group``. The hub never sees a socket.

Pure: no I/O (tests/unit/test_core_purity.py); delivery is whatever the groups do.
"""

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from .broadcast import Broadcast

log = logging.getLogger("pusherd.hub")

Wire = Callable[[str], Any]


class Member:
    """What the hub needs of a connection (a protocol: any object with these attributes)."""

    serializer: Any   # protocol.Serializer
    wire: Wire        # the encoded text -> what send_frame takes

    def send_frame(self, frame: Any) -> None:  # pragma: no cover - protocol
        raise NotImplementedError


class PlainGroup:
    """Members of one (serializer, wire): each gets the shared frame through ``send_frame``."""

    __slots__ = ("serializer", "wire", "sends")

    def __init__(self, serializer, wire: Wire, members: Sequence[Member]):
        self.serializer = serializer
        self.wire = wire
        self.sends = tuple(member.send_frame for member in members)

    def deliver(self, frame: Any) -> int:
        """Hand `frame` to every member; returns how many took it (a failing one is logged)."""
        sent = 0
        for send in self.sends:
            try:
                send(frame)
                sent += 1
            except Exception:  # one broken connection must never stop the fan-out
                log.exception("delivery to one connection failed")
        return sent


MakeGroup = Callable[[Any, Wire, Sequence[Member]], Any]


class Hub:
    """Local membership and the fan-out. ``on_first``/``on_last`` are told when a topic gains its
    first member (or hold) and loses its last: the broker subscribes and unsubscribes there.

    ``holds``: while a join waits for the broker (its subscription confirmed, its history read),
    the topic's broadcasts are also collected in that join's buffer, so nothing falls between the
    join's reply and its subscription.
    """

    def __init__(self, on_first: Optional[Callable[[str], None]] = None,
                 on_last: Optional[Callable[[str], None]] = None, make_group: MakeGroup = PlainGroup,
                 counters=None):
        self.topics: Dict[str, Set[Member]] = {}
        self._on_first = on_first or (lambda topic: None)
        self._on_last = on_last or (lambda topic: None)
        self._make_group = make_group
        self.holds: Dict[str, List[list]] = {}
        # topic -> (group, ...): built at the first broadcast after a membership change, so a
        # broadcast touches nothing per member but what its group keeps.
        self._fanout: Dict[str, tuple] = {}
        self.counters = counters  # .encodes, .delivered (metrics); None: not counted

    # -- membership ---------------------------------------------------------------------------

    def subscribe(self, topic: str, member: Member) -> None:
        members = self.topics.get(topic)
        if members is None:
            members = self.topics[topic] = set()
            self._on_first(topic)
        members.add(member)
        self._fanout.pop(topic, None)

    def unsubscribe(self, topic: str, member: Member) -> None:
        members = self.topics.get(topic)
        if members is None:
            return
        members.discard(member)
        self._fanout.pop(topic, None)
        if not members and topic not in self.holds:
            del self.topics[topic]
            self._on_last(topic)

    def hold(self, topic: str, buffer: list) -> None:
        """Collect the topic's broadcasts in `buffer` (a join waiting for the broker)."""
        self.holds.setdefault(topic, []).append(buffer)
        if topic not in self.topics:
            self._on_first(topic)
            self.topics[topic] = set()

    def release(self, topic: str, buffer: list) -> None:
        buffers = self.holds.get(topic)
        if buffers is not None:
            buffers[:] = [b for b in buffers if b is not buffer]
            if not buffers:
                del self.holds[topic]
        if not self.topics.get(topic, True) and topic not in self.holds:
            del self.topics[topic]
            self._on_last(topic)

    def members(self, topic: str) -> int:
        return len(self.topics.get(topic, ()))

    # -- fan-out ------------------------------------------------------------------------------

    def broadcast(self, broadcast: Broadcast) -> int:
        """Deliver to every local member of the topic; returns the number of members reached."""
        topic = broadcast.topic
        if self.holds:
            for buffer in self.holds.get(topic, ()):
                buffer.append(broadcast)
        groups = self._fanout.get(topic)
        if groups is None:
            members = self.topics.get(topic)
            if not members:
                return 0
            groups = self._fanout[topic] = self._group(members)
        sent = encodes = 0
        serializer = text = None
        for group in groups:
            if group.serializer is not serializer:  # groups are sorted by serializer: once each
                serializer = group.serializer
                try:
                    text = serializer.encode_broadcast(topic, broadcast.event, broadcast.payload, broadcast.position)
                except (ValueError, TypeError, RecursionError):
                    # Inputs are validated where they enter; this only keeps a slip there from
                    # breaking the caller (a broker's listener loop, a publish handler).
                    log.error("broadcast on %.200s could not be encoded; dropped", topic)
                    break
                encodes += 1
            sent += group.deliver(group.wire(text))
        counters = self.counters
        if counters is not None:
            counters.encodes += encodes
            counters.delivered += sent
        return sent

    def _group(self, members) -> tuple:
        by_kind: Dict[tuple, list] = {}
        for member in members:
            by_kind.setdefault((member.serializer, member.wire), []).append(member)
        ordered = sorted(by_kind.items(), key=lambda item: (id(item[0][0]), id(item[0][1])))
        return tuple(self._make_group(serializer, wire, group) for (serializer, wire), group in ordered)

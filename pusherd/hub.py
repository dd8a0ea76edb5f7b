"""Topic -> local subscribers, and fan-out that encodes each broadcast once per serializer.

A subscriber is anything with a ``serializer`` attribute and a ``send_frame(bytes)`` method
(the socket adapter). For one broadcast the hub builds at most one frame per protocol version
present on the topic and hands the very same bytes to every subscriber: no per-socket JSON,
no per-socket framing.

A subscriber may also have an ``outbox`` registered with the hub's `FlushQueue` (``rounds``).
When every member of a serializer group has one, the group's first broadcast of a round is
written by `FlushQueue.fan_out` (one C call per socket), and the ones after it in the same
round are queued in the outboxes, to leave in one write per socket at the end of the round.
"""

import logging
from typing import Callable, Dict, Optional, Set

from .core.broadcast import Broadcast
from .framing import text_frame
from .outbox import FlushQueue, Outbox

log = logging.getLogger("pusherd.hub")


def _call(send_frame: Callable[[bytes], None], frame: bytes) -> None:
    send_frame(frame)


class Group:
    """The members of a topic that speak one serializer, as the broadcast loop wants them."""

    __slots__ = ("serializer", "sends", "boxes", "socks", "epoch")

    def __init__(self, serializer, subscribers: list, rounds: Optional[FlushQueue]):
        self.serializer = serializer
        boxes = tuple(getattr(sub, "outbox", None) for sub in subscribers)
        socks = tuple(box and box.fast_sock for box in boxes)
        if rounds is not None and None not in socks:
            self.sends = None
            self.boxes = boxes
            self.socks = socks
        else:
            self.sends = tuple(sub.send_frame for sub in subscribers)
            self.boxes = self.socks = None
        self.epoch = -1  # the round of the last fan-out


class Hub:
    def __init__(self, on_first: Optional[Callable[[str], None]] = None,
                 on_last: Optional[Callable[[str], None]] = None, rounds: Optional[FlushQueue] = None):
        self.topics: Dict[str, Set[object]] = {}
        self._on_first = on_first or (lambda topic: None)
        self._on_last = on_last or (lambda topic: None)
        self.holds: Dict[str, list] = {}   # topic -> buffers of joins replaying history
        # topic -> (Group, ...): the members grouped once, rebuilt at the first broadcast after a
        # change, so a broadcast touches nothing per socket but its socket or its send_frame (no
        # attribute lookups on thousands of cold objects).
        self._fanout: Dict[str, tuple] = {}
        self.rounds = rounds
        self.encodes = 0      # frames built (a test can count them)
        self.delivered = 0    # frames handed to sockets

    def subscribe(self, topic: str, subscriber) -> None:
        members = self.topics.get(topic)
        if members is None:
            members = self.topics[topic] = set()
            self._on_first(topic)
        members.add(subscriber)
        self._fanout.pop(topic, None)

    def unsubscribe(self, topic: str, subscriber) -> None:
        members = self.topics.get(topic)
        if members is None:
            return
        members.discard(subscriber)
        self._fanout.pop(topic, None)
        if not members and topic not in self.holds:
            del self.topics[topic]
            self._on_last(topic)

    def hold(self, topic: str, buffer: list) -> None:
        """Collect the topic's broadcasts in `buffer` while a join replays history (no gap)."""
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

    def broadcast(self, broadcast: Broadcast) -> int:
        """Deliver to every local member of the topic; returns the number of sockets reached."""
        if self.holds:
            for buffer in self.holds.get(broadcast.topic, ()):
                buffer.append(broadcast)
        groups = self._fanout.get(broadcast.topic)
        if groups is None:
            members = self.topics.get(broadcast.topic)
            if not members:
                return 0
            groups = self._group(broadcast.topic, members)
        rounds = self.rounds
        if rounds is not None:
            rounds.broadcast_begins()
        sent = 0
        for group in groups:
            try:
                text = group.serializer.encode_broadcast(broadcast.topic, broadcast.event, broadcast.payload,
                                                         broadcast.position).encode("utf-8")
            except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
                # Inputs are validated where they enter; this only keeps a slip there from
                # breaking the caller (a broker's listener loop, a publish handler).
                log.error("broadcast on %.200s could not be encoded; dropped", broadcast.topic)
                break
            frame = text_frame(text)
            self.encodes += 1
            if group.socks is None:
                call, targets = _call, group.sends
            elif group.epoch != rounds.epoch:
                group.epoch = rounds.epoch
                sent += len(group.socks) - rounds.fan_out(frame, group.socks)
                continue
            else:  # later in the same round: queued, to leave in one write per socket
                call, targets = Outbox.queue, group.boxes
            sent += len(targets)
            for target in targets:
                try:
                    call(target, frame)
                except Exception:  # one broken socket must never stop the fan-out
                    sent -= 1
                    log.exception("delivery to one socket failed")
        self.delivered += sent
        return sent

    def _group(self, topic: str, members) -> tuple:
        by_serializer: Dict[object, list] = {}
        for sub in members:
            by_serializer.setdefault(sub.serializer, []).append(sub)
        fanout = self._fanout[topic] = tuple(Group(serializer, subs, self.rounds)
                                             for serializer, subs in by_serializer.items())
        return fanout

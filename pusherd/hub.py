"""Topic -> local subscribers, and fan-out that encodes each broadcast once per serializer.

A subscriber is anything with a ``serializer`` attribute and a ``send_frame(bytes)`` method
(the socket adapter). For one broadcast the hub builds at most one frame per protocol version
present on the topic and hands the very same bytes to every subscriber: no per-socket JSON,
no per-socket framing.
"""

import logging
from typing import Callable, Dict, Optional, Set

from .broker import Broadcast
from .framing import text_frame

log = logging.getLogger("pusherd.hub")


class Hub:
    def __init__(self, on_first: Optional[Callable[[str], None]] = None,
                 on_last: Optional[Callable[[str], None]] = None):
        self.topics: Dict[str, Set[object]] = {}
        self._on_first = on_first or (lambda topic: None)
        self._on_last = on_last or (lambda topic: None)
        self.holds: Dict[str, list] = {}   # topic -> buffers of joins replaying history
        # topic -> ((serializer, (send_frame, ...)), ...): the members grouped once, rebuilt at
        # the first broadcast after a change, so a broadcast touches nothing per socket but its
        # send_frame (no attribute lookups on thousands of cold objects).
        self._fanout: Dict[str, tuple] = {}
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
        sent = 0
        for serializer, sends in groups:
            try:
                text = serializer.encode_broadcast(broadcast.topic, broadcast.event, broadcast.payload,
                                                   broadcast.position).encode("utf-8")
            except (ValueError, TypeError, RecursionError):  # UnicodeEncodeError is a ValueError
                # Inputs are validated where they enter; this only keeps a slip there from
                # breaking the caller (a broker's listener loop, a publish handler).
                log.error("broadcast on %.200s could not be encoded; dropped", broadcast.topic)
                break
            frame = text_frame(text)
            self.encodes += 1
            sent += len(sends)
            for send in sends:
                try:
                    send(frame)
                except Exception:  # one broken socket must never stop the fan-out
                    sent -= 1
                    log.exception("delivery to one socket failed")
        self.delivered += sent
        return sent

    def _group(self, topic: str, members) -> tuple:
        groups: Dict[object, list] = {}
        for sub in members:
            groups.setdefault(sub.serializer, []).append(sub.send_frame)
        fanout = self._fanout[topic] = tuple((serializer, tuple(sends)) for serializer, sends in groups.items())
        return fanout

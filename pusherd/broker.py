"""The Broker interface and the in-process MemoryBroker.

A broker carries every publish (HTTP or client push) to every pusherd process, each of which
delivers it to its own sockets through the hub. The broker never sees sockets.
"""

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from .core.broadcast import Broadcast
from .core.errors import BrokerUnavailable
from .core.history import LIMIT_BYTES, LIMIT_TOPICS, Recovery, Rules, Store

log = logging.getLogger("pusherd.broker")


Deliver = Callable[[Broadcast], Any]


def log_evictions(before: int, evictions: Dict[str, int], topic: str) -> None:
    """A warning at this process's first history eviction, then at every 1000th."""
    after = sum(evictions.values())
    if after > before and (before == 0 or after // 1000 > before // 1000):
        log.warning("history: %d topic(s) evicted so far (%d for max_history_topics, %d for max_history_bytes), "
                    "the last by a publish on %.200s; counted in pusherd_history_evictions_total",
                    after, evictions[LIMIT_TOPICS], evictions[LIMIT_BYTES], topic)


class Broker:
    """Contract: ``start(deliver)``, ``publish(b)``, ``publish_batch(bs)``, ``subscribe/unsubscribe(topic)``,
    ``healthy()``, ``close()``.

    ``publish`` either hands the broadcast on (returns) or raises BrokerUnavailable: it never
    accepts an event it then drops. ``deliver`` is called on the event loop for every broadcast
    on a topic this process subscribed to, in publish order per topic for a single publisher.
    Every payload that ``protocol.loads`` can return is accepted alike by every broker (a lone
    surrogate escape included).
    """

    name = "broker"

    async def start(self, deliver: Deliver) -> None:
        raise NotImplementedError

    async def publish(self, broadcast: Broadcast, client: bool = False) -> Optional[str]:
        """``client``: a push from a socket, kept in history only under a rule with ``client_pushes``."""
        raise NotImplementedError

    async def publish_batch(self, broadcasts: Sequence[Broadcast]) -> List[Optional[str]]:
        """Publish a batch in order; the positions. All or nothing as far as the broker allows
        (see each broker); this default publishes one by one."""
        return [await self.publish(b) for b in broadcasts]

    def subscribe(self, topic: str) -> None:
        """First local member joined `topic` (a hint; the memory broker needs none)."""

    def unsubscribe(self, topic: str) -> None:
        """Last local member left `topic`."""

    def active(self, topic: str) -> bool:
        """True when broadcasts on `topic` from every process already reach this one."""
        return True

    async def activate(self, topic: str) -> None:
        """Return once `active(topic)`, after `subscribe(topic)`; raises BrokerUnavailable (or a
        timeout) when the broker cannot confirm it. The Redis broker needs a round trip."""

    def has_history(self, topic: str) -> bool:
        """True when `topic` keeps history (its broadcasts carry positions)."""
        return False

    async def recover(self, topic: str, since: Any) -> Recovery:
        """What a client that last saw position `since` missed on `topic` (see history.py)."""
        return Recovery(False, None, ())

    def history_stats(self) -> Optional[dict]:
        """{"streams", "messages", "bytes"} held in this process, or None (no local history)."""
        return None

    def history_evictions(self) -> Dict[str, int]:
        """Histories this process evicted to keep a global bound, by the config key of the bound."""
        return {LIMIT_TOPICS: 0, LIMIT_BYTES: 0}

    def healthy(self) -> bool:
        return True

    def describe(self) -> str:
        return self.name

    async def close(self) -> None:
        pass


class MemoryBroker(Broker):
    """One process, no backplane. Delivery is synchronous and exactly-once within this process.

    History lives in this process's memory (`history.Store`, bounded by ``max_topics`` and
    ``max_bytes``): a restart starts every topic on a new epoch, so a client that rejoins with an
    old position is told ``recovered: false``. After close() publishes raise BrokerUnavailable
    (never a silent drop). A batch is all or nothing: nothing in it can fail once the first
    broadcast is delivered.
    """

    name = "memory"

    def __init__(self, history_rules: Rules = Rules(), max_recovery: int = 300, max_topics: int = 10000,
                 max_bytes: int = 64 * 1024 * 1024):
        self._deliver: Optional[Deliver] = None
        self.history = Store(history_rules, max_recovery, max_topics, max_bytes, now=time.time())
        self._closed = False

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._closed = False

    async def publish(self, broadcast: Broadcast, client: bool = False) -> Optional[str]:
        if self._deliver is None:
            raise BrokerUnavailable("memory broker is %s" % ("closed" if self._closed else "not started"))
        self._publish(broadcast, client)
        return broadcast.position

    async def publish_batch(self, broadcasts: Sequence[Broadcast]) -> List[Optional[str]]:
        if self._deliver is None:
            raise BrokerUnavailable("memory broker is %s" % ("closed" if self._closed else "not started"))
        for b in broadcasts:
            self._publish(b, False)
        return [b.position for b in broadcasts]

    def _publish(self, broadcast: Broadcast, client: bool) -> None:
        history = self.history
        if history.rules:
            evictions = history.evictions
            before = evictions[LIMIT_TOPICS] + evictions[LIMIT_BYTES]
            broadcast.position = history.append(broadcast.topic, broadcast.event, broadcast.payload, time.time(),
                                                client)
            if evictions[LIMIT_TOPICS] + evictions[LIMIT_BYTES] != before:
                log_evictions(before, evictions, broadcast.topic)
        self._deliver(broadcast)

    def has_history(self, topic: str) -> bool:
        return self.history.rules.rule_for(topic) is not None

    async def recover(self, topic: str, since: Any) -> Recovery:
        return self.history.recover(topic, since, time.time())

    def sweep(self, now: float) -> None:
        self.history.sweep(now)

    def history_stats(self) -> Optional[dict]:
        streams = self.history.streams.values()
        return {"streams": len(self.history.streams), "messages": sum(len(s.entries) for s in streams),
                "bytes": self.history.approx_bytes()}

    def history_evictions(self) -> Dict[str, int]:
        return dict(self.history.evictions)

    def healthy(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._deliver = None
        self._closed = True

"""The Broker interface and the in-process MemoryBroker.

A broker carries every publish (HTTP or client push) to every pusherd process, each of which
delivers it to its own sockets through the hub. The broker never sees sockets.
"""

import time
from typing import Any, Callable, Optional

from .core.broadcast import Broadcast
from .core.errors import BrokerUnavailable
from .core.history import Recovery, Rules, Store


Deliver = Callable[[Broadcast], Any]


class Broker:
    """Contract: ``start(deliver)``, ``publish(b)``, ``subscribe/unsubscribe(topic)``, ``healthy()``, ``close()``.

    ``publish`` either hands the broadcast on (returns) or raises BrokerUnavailable: it never
    accepts an event it then drops. ``deliver`` is called on the event loop for every broadcast
    on a topic this process subscribed to, in publish order per topic for a single publisher.
    """

    name = "broker"

    async def start(self, deliver: Deliver) -> None:
        raise NotImplementedError

    async def publish(self, broadcast: Broadcast) -> Optional[str]:
        raise NotImplementedError

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

    def healthy(self) -> bool:
        return True

    def describe(self) -> str:
        return self.name

    async def close(self) -> None:
        pass


class MemoryBroker(Broker):
    """One process, no backplane. Delivery is synchronous and exactly-once within this process.

    History lives in this process's memory: a restart starts every topic on a new epoch, so a
    client that rejoins with an old position is told ``recovered: false``. After close()
    publishes raise BrokerUnavailable (never a silent drop).
    """

    name = "memory"

    def __init__(self, history_rules: Rules = Rules(), max_recovery: int = 300):
        self._deliver: Optional[Deliver] = None
        self.history = Store(history_rules, max_recovery)
        self._closed = False

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._closed = False

    async def publish(self, broadcast: Broadcast) -> Optional[str]:
        if self._deliver is None:
            raise BrokerUnavailable("memory broker is %s" % ("closed" if self._closed else "not started"))
        if self.history.rules:
            broadcast.position = self.history.append(broadcast.topic, broadcast.event, broadcast.payload,
                                                     time.time())
        self._deliver(broadcast)
        return broadcast.position

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

    def healthy(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._deliver = None
        self._closed = True

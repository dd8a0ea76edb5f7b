"""The Broker interface and the in-process MemoryBroker.

A broker carries every publish (HTTP or client push) to every pusherd process, each of which
delivers it to its own sockets through the hub. The broker never sees sockets.
"""

import time
from typing import Any, Callable, Optional


class Broadcast:
    """One event for every member of a topic."""

    __slots__ = ("topic", "event", "payload", "published_at", "position")

    def __init__(self, topic: str, event: str, payload: dict, published_at: Optional[float] = None,
                 position: Optional[str] = None):
        self.topic = topic
        self.event = event
        self.payload = payload
        self.published_at = time.time() if published_at is None else published_at
        self.position = position

    def __repr__(self):
        return "Broadcast(%r, %r, %r)" % (self.topic, self.event, self.payload)


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

    def healthy(self) -> bool:
        return True

    def describe(self) -> str:
        return self.name

    async def close(self) -> None:
        pass


class MemoryBroker(Broker):
    """One process, no backplane. Delivery is synchronous and exactly-once within this process."""

    name = "memory"

    def __init__(self):
        self._deliver: Optional[Deliver] = None

    async def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def publish(self, broadcast: Broadcast) -> Optional[str]:
        if self._deliver is not None:
            self._deliver(broadcast)
        return None

    async def close(self) -> None:
        self._deliver = None

"""The Broker interface: what every broker guarantees, and the helpers they share.

A broker carries every publish (HTTP or client push) to every pusherd process, each of which
delivers it to its own connections through the hub. The broker never sees a connection.
The same contract suite (tests/broker/test_contract.py) runs against every broker.
"""

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..core.broadcast import Broadcast
from ..core.errors import BrokerUnavailable
from ..core.history import LIMIT_BYTES, LIMIT_TOPICS, Recovery

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

"""The Broker interface: what every broker guarantees, and the helpers they share.

A broker carries every publish (HTTP or client push) to every pusherd process, each of which
delivers it to its own connections through the hub. The broker never sees a connection.
The same contract suite (tests/broker/test_contract.py) runs against every broker.
"""

import logging
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from ..core.broadcast import Broadcast
from ..core.errors import BrokerUnavailable
from ..core.history import LIMIT_BYTES, LIMIT_TOPICS, Recovery
from ..core.presence import Diff, Entry

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

    def presence_backplane(self, ttl: float = 15.0) -> "PresenceBackplane":
        """Where the presence lists of this broker's processes meet (pusherd/presence_service.py
        drives it); ``ttl``: how long a process may stay silent before its members leave. This
        default serves one process: nothing to share."""
        return PresenceBackplane()

    async def close(self) -> None:
        pass


class PresenceBackplane:
    """How the processes of one broker share presence: each process's entries (its truth) kept
    where the others can read them, each process's diffs carried to the others, and word of a
    process that died. This base class is the one-process version: nothing is shared, nothing
    can fail; a broker with several processes returns a subclass (brokers/redis_presence.py)
    and states its consistency model there.

    ``start(owner)`` hands over the owner (the process's `PresenceService`), which the
    backplane calls back on the event loop: ``owner.remote_diff(node, topic, diff)`` for another
    process's diff, ``owner.node_down(node)`` when a process is found dead,
    ``owner.nodes_alive(nodes)`` with the processes alive (after each heartbeat), ``await
    owner.resync(renamed_from)`` when what the backplane holds may differ from what this process
    holds (after an outage; ``renamed_from``: this process was given up for dead under that
    node id and goes on under `node`), and ``owner.write_failed(topic)``.
    """

    #: True: a single process. Lists start empty and are ready at once; nothing is written.
    local = True
    #: Seconds within which the members of a process that died leave every list (None: no
    #: other processes).
    ttl: Optional[float] = None

    def __init__(self, node: str = "local"):
        self.node = node

    async def start(self, owner) -> None:
        pass

    def healthy(self) -> bool:
        return True

    async def snapshot(self, topic: str) -> Tuple[List[Entry], Set[str]]:
        """Every process's entries on `topic` as the backplane holds them, and the node ids of
        the processes alive. Raises BrokerUnavailable when it cannot be read."""
        return [], {self.node}

    def write(self, topic: str, diff: Diff) -> None:
        """This process's diff on `topic` (its window's joins and leaves): kept, and carried to
        every other process, in the order written. A write that fails is reported to the owner
        (``write_failed``), which resynchronises the topic."""

    async def close(self) -> None:
        """Flush what is written and say goodbye: this process's entries leave at once."""


def backoff_delay(attempt: int, base: float, cap: float, rand=random.random) -> float:
    """Capped exponential backoff with jitter in [50%, 100%] of the step (no thundering herd):
    every reconnecting part of a broker (redis.py's lanes and seeds, redis_presence.py)."""
    step = min(cap, base * (2 ** min(attempt, 30)))
    return step * (0.5 + 0.5 * rand())

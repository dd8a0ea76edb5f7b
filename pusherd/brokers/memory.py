"""The in-process broker: one pusherd process, no backplane."""

import os
import time
from typing import Any, Dict, List, Optional, Sequence

from ..core.broadcast import Broadcast
from ..core.errors import BrokerUnavailable
from ..core.history import LIMIT_BYTES, LIMIT_TOPICS, Recovery, Rules, Store
from .base import Broker, Deliver, log_evictions


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
        self.history = Store(history_rules, max_recovery, max_topics, max_bytes, now=time.time(), random=os.urandom)
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

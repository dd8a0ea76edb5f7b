"""Helpers for the broker tests: a Node is one "process" (a broker plus what it delivered).

A plain module, not a conftest: the tests share the root conftest's fixtures (`redis_server`).
"""

import asyncio
import time

from pusherd_testing import require


def run(coro, timeout=30.0):
    """Run one scenario on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Node:
    def __init__(self, broker):
        self.broker = broker
        self.delivered = []
        self._changed = None

    async def start(self):
        self._changed = asyncio.Event()
        await self.broker.start(self._deliver)
        return self

    def _deliver(self, broadcast):
        self.delivered.append(broadcast)
        self._changed.set()

    async def wait_for(self, count, timeout=5.0):
        """Wait until at least `count` broadcasts were delivered; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.delivered) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("delivered %d of %d: %r" % (len(self.delivered), count, self.delivered))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return self.delivered

    async def settle(self, seconds=0.2):
        """Let in-flight messages arrive (used before asserting that nothing more came)."""
        await asyncio.sleep(seconds)


async def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        await asyncio.sleep(0.01)


def redis_py():
    try:
        import redis  # noqa: F401
    except ImportError:
        require(False, "redis-py not installed (pip install 'pusherd[redis]')")

"""What metrics cost: per-broadcast bookkeeping on the delivery path, and one scrape.

    python bench/bench_metrics.py [--topics 10000] [--members 10]

Prints figures; asserts nothing. The delivery path is measured with fake subscribers (no
sockets), so the numbers are the Python work only.
"""

import argparse
import asyncio
import os
import sys
import time
import timeit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pusherd import config  # noqa: E402
from pusherd.core.broadcast import Broadcast  # noqa: E402
from pusherd.core.protocol import V2  # noqa: E402
from pusherd.daemon import Daemon  # noqa: E402


class Sink:
    __slots__ = ("serializer", "wire", "frames")

    def __init__(self):
        self.serializer = V2
        self.wire = str
        self.frames = 0

    def send_frame(self, frame):
        self.frames += 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--topics", type=int, default=10000)
    ap.add_argument("--members", type=int, default=10)
    args = ap.parse_args()

    doc = {"test": {"metrics": {"listen": "127.0.0.1:0"}}}
    daemon = Daemon(config.from_mapping(doc, "test", "<bench>", {}, lambda p: ""))
    sinks = [Sink() for _ in range(args.members)]
    for sink in sinks:
        daemon.service.hub.subscribe("public:bench", sink)
    b = Broadcast("public:bench", "e", {"n": 1})

    # Interleaved and best-of, so that a busy machine disturbs both sides alike.
    n, hub_runs, deliver_runs = 50000, [], []
    for _ in range(15):
        hub_runs.append(timeit.timeit(lambda: daemon.service.hub.broadcast(b), number=n) / n)
        deliver_runs.append(timeit.timeit(lambda: daemon.service.deliver(b), number=n) / n)
    hub_only, with_counts = min(hub_runs), min(deliver_runs)
    print("delivery to %d members: hub.broadcast %.2f us, Daemon.deliver (with metrics bookkeeping) %.2f us, "
          "overhead %.2f us per broadcast (%.1f%%)" % (args.members, hub_only * 1e6, with_counts * 1e6,
                                                        (with_counts - hub_only) * 1e6,
                                                        100.0 * (with_counts - hub_only) / hub_only))

    from pusherd.metrics import build_registry
    from prometheus_client import generate_latest
    for i in range(args.topics):
        prefix = ("public", "private", "deploys", "users")[i % 4]
        for sink in sinks[: max(1, args.members // 5)]:
            daemon.service.hub.subscribe("%s:t%d" % (prefix, i), sink)
    registry = build_registry(daemon.service)
    started = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        text = generate_latest(registry)
    per_scrape = (time.perf_counter() - started) / repeats
    print("one scrape with %d topics, %d channels: %.2f ms, %d bytes" % (
        len(daemon.service.hub.topics), sum(len(m) for m in daemon.service.hub.topics.values()), per_scrape * 1e3, len(text)))


async def in_loop():
    main()  # the broadcast rounds take their loop callbacks from the running loop


if __name__ == "__main__":
    asyncio.run(in_loop())

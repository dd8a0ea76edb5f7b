#!/usr/bin/env python3
"""What history costs on the Redis broker (not part of the test suite; figures in docs/scaling.md).

    python bench/redis_history.py [--n 3000] [--size 100] [--payload 100]

A private redis-server on a free loopback port and two RedisBrokers in this process (two
"pusherd processes"), both subscribed to the topics. Prints, for a plain topic and for a history
topic: the publish round trip one at a time (p50/p99) and a burst of concurrent publishes
(publishes/s, until the other process received them all); then the recovery of a join `since`
50 events back (p50/p99), and Redis's own memory for one full history topic (MEMORY USAGE).
"""

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pusherd.core.broadcast import Broadcast  # noqa: E402
from pusherd.config import HistoryRule  # noqa: E402
from pusherd.core.history import Rules  # noqa: E402
from pusherd.brokers.redis import RedisBroker  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def run(args, url):
    rules = Rules([HistoryRule("deploys:*", args.size, 3600.0)])
    received = {"a": 0, "b": 0}

    def counter(name):
        def deliver(_b):
            received[name] += 1
        return deliver

    a = RedisBroker(url, prefix="bench", history_rules=rules, max_recovery=1000)
    b = RedisBroker(url, prefix="bench", history_rules=rules, max_recovery=1000)
    await a.start(counter("a"))
    await b.start(counter("b"))
    body = {"pad": "x" * args.payload}
    for topic in ("public:plain", "deploys:hist"):
        for broker in (a, b):
            broker.subscribe(topic)
            await broker.activate(topic)
    for label, topic in (("plain topic  ", "public:plain"), ("history topic", "deploys:hist")):
        rtts = []
        for i in range(args.n // 3):
            t0 = time.perf_counter()
            await a.publish(Broadcast(topic, "e", dict(body, i=i)))
            rtts.append((time.perf_counter() - t0) * 1000)
        start_b = received["b"]
        t0 = time.perf_counter()
        await asyncio.gather(*[a.publish(Broadcast(topic, "e", dict(body, i=i))) for i in range(args.n)])
        while received["b"] - start_b < args.n:
            await asyncio.sleep(0.001)
        burst = args.n / (time.perf_counter() - t0)
        print("%s publish one at a time: p50 %.3f ms p99 %.3f ms | burst %d: %6.0f publishes/s (received by the "
              "other process)" % (label, statistics.median(rtts), pct(rtts, 0.99), args.n, burst))
    last = await a.publish(Broadcast("deploys:hist", "e", body))
    epoch, offset = last.rsplit(":", 1)
    since = "%s:%d" % (epoch, int(offset) - 50)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        r = await b.recover("deploys:hist", since)
        times.append((time.perf_counter() - t0) * 1000)
        assert r.recovered and len(r.missed) == 50
    print("recover 50 missed events (subscription already active): p50 %.3f ms p99 %.3f ms"
          % (statistics.median(times), pct(times, 0.99)))
    client = a._client
    stream = await client.memory_usage("bench:h:deploys:hist", samples=0)
    meta = await client.memory_usage("bench:hm:deploys:hist", samples=0)
    entries = await client.xlen("bench:h:deploys:hist")
    print("Redis memory for one history topic (size %d, %d-byte payloads): stream %d entries %d bytes "
          "(%.0f bytes/entry), meta %d bytes" % (args.size, args.payload, entries, stream, stream / entries, meta))
    await a.close()
    await b.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--payload", type=int, default=100)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", tmp],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.02)
            asyncio.run(run(args, "redis://127.0.0.1:%d/0" % port))
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()

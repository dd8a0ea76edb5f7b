#!/usr/bin/env python3
"""How close `max_history_bytes`'s accounting is to the memory history really holds (not part of
the test suite; figures in docs/scaling.md, "Global bounds").

    python bench/history_bytes.py [--payloads 100,1000]

Memory broker: `history.Store` filled with 200 topics of 100 messages, against what tracemalloc
sees allocated meanwhile. Redis: 20 topics of 150 publishes (trimmed to 100) through a
RedisBroker on a private redis-server, against ``MEMORY USAGE`` of each topic's stream and hash.
Prints counted / real for each payload size.
"""

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pusherd.core.broadcast import Broadcast  # noqa: E402
from pusherd.config import HistoryRule  # noqa: E402
from pusherd.core.history import Rules, Store  # noqa: E402
from pusherd.brokers.redis import RedisBroker  # noqa: E402

UNBOUNDED = dict(max_topics=10**6, max_bytes=10**12)


def memory_broker(payload: int) -> None:
    store = Store(Rules([HistoryRule("t:*", 100, 3600.0)]), random=os.urandom, **UNBOUNDED)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for t in range(200):
        for i in range(100):
            store.append("t:%d" % t, "new_version", {"version": "x" * payload, "i": i}, 1000.0 + i)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    real = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print("memory broker, %5d-byte payloads: counted %9d, allocated %9d: %.2f" % (payload, store.bytes, real,
                                                                                 store.bytes / real))


async def redis_broker(url: str, payload: int) -> None:
    import redis
    client = redis.Redis.from_url(url)
    client.flushall()
    broker = RedisBroker(url, prefix="bench", history_rules=Rules([HistoryRule("t:*", 100, 3600.0)]), random=os.urandom, **UNBOUNDED)
    await broker.start(lambda b: None)
    try:
        for t in range(20):
            for i in range(150):
                await broker.publish(Broadcast("t:%d" % t, "new_version", {"version": "x" * payload, "i": i}))
        real = sum(client.memory_usage("bench:h:t:%d" % t, samples=0) + client.memory_usage("bench:hm:t:%d" % t,
                                                                                             samples=0)
                   for t in range(20))
        counted = int(client.hget("bench:history:info", "bytes"))
        print("redis broker,  %5d-byte payloads: counted %9d, MEMORY USAGE %9d: %.2f" % (payload, counted, real,
                                                                                         counted / real))
    finally:
        await broker.close()
        client.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--payloads", default="100,1000")
    args = parser.parse_args()
    payloads = [int(p) for p in args.payloads.split(",")]
    for payload in payloads:
        memory_broker(payload)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
            for payload in payloads:
                asyncio.run(redis_broker("redis://127.0.0.1:%d/0" % port, payload))
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()

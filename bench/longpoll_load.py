"""Long-poll clients for bench/run.py: what phoenix.js's LongPoll does, over raw keep-alive HTTP.

Each worker process opens its share of sessions (GET: the 410 and its token), joins one topic
(POST, then the GET that brings the reply), and then polls in a loop, counting the messages the
polls bring into a shared counter the coordinator reads while it publishes. One asyncio loop,
one connection per session (a page's GET connection; the join's POST goes on a second one).
"""

import asyncio
import json
import multiprocessing
import os


async def _request(reader, writer, host, port, method, target, body=b"", ctype="application/json"):
    head = "%s %s HTTP/1.1\r\nHost: %s:%d\r\nAccept: application/json\r\n" % (method, target, host, port)
    if method == "POST":
        head += "Content-Type: %s\r\nContent-Length: %d\r\n" % (ctype, len(body))
    writer.write(head.encode() + b"\r\n" + body)
    raw = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in raw.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return json.loads(await reader.readexactly(length)) if length else None


async def _session(host, port, topic, counter, ready, stop, errors):
    try:
        reader, writer = await asyncio.open_connection(host, port)
        opened = await _request(reader, writer, host, port, "GET", "/events/longpoll?vsn=2.0.0")
        target = "/events/longpoll?vsn=2.0.0&token=" + opened["token"]
        preader, pwriter = await asyncio.open_connection(host, port)
        join = json.dumps([None, "1", topic, "phx_join", {}]).encode()
        answer = await _request(preader, pwriter, host, port, "POST", target, join)
        pwriter.close()
        assert answer == {"status": 200}, answer
        reply = await _request(reader, writer, host, port, "GET", target)
        assert reply["status"] == 200 and '"phx_reply"' in reply["messages"][0], reply
        ready()
        while not stop.is_set():
            body = await _request(reader, writer, host, port, "GET", target)
            if body["status"] == 200:
                with counter.get_lock():
                    counter.value += len(body["messages"])
            elif body["status"] != 204:
                raise RuntimeError("poll answered %r" % body)
        writer.close()
    except Exception as exc:  # reported to the coordinator, which fails the scenario
        errors.append(repr(exc)[:200])
        ready()


def _worker(host, port, topic, n, counter, joined, stop, cpus, errors_out):
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def main():
        errors = []

        def ready():
            with joined.get_lock():
                joined.value += 1

        tasks = []
        for i in range(n):
            tasks.append(asyncio.ensure_future(_session(host, port, topic, counter, ready, stop, errors)))
            if i % 50 == 49:
                await asyncio.sleep(0.01)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await asyncio.wait(tasks, timeout=15)
        errors_out.put(errors[:5])

    asyncio.run(main())


class LongPollPool:
    """`n` long-poll sessions on `topic`, spread over `workers` processes."""

    def __init__(self, host, port, topic, n, workers=2, cpus=None):
        ctx = multiprocessing.get_context("fork")
        self.counter = ctx.Value("q", 0)
        self.joined = ctx.Value("q", 0)
        self.stop = ctx.Event()
        self.errors = ctx.Queue()
        self.n = n
        shares = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
        self.procs = [ctx.Process(target=_worker, args=(host, port, topic, share, self.counter, self.joined,
                                                        self.stop, cpus, self.errors), daemon=True)
                      for share in shares]
        for p in self.procs:
            p.start()

    def wait_joined(self, timeout=60.0):
        import time
        deadline = time.monotonic() + timeout
        while self.joined.value < self.n:
            if time.monotonic() > deadline:
                raise RuntimeError("only %d of %d long-poll sessions joined" % (self.joined.value, self.n))
            time.sleep(0.05)

    def received(self) -> int:
        return self.counter.value

    def reset(self) -> None:
        with self.counter.get_lock():
            self.counter.value = 0

    def close(self):
        self.stop.set()
        errors = []
        for _ in self.procs:
            try:
                errors += self.errors.get(timeout=30)
            except Exception:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        return errors

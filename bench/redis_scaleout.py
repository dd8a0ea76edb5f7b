#!/usr/bin/env python3
"""Scale-out benchmark: one pusherd on the memory broker vs two pusherd processes on Redis.

    python bench/redis_scaleout.py                 # both comparisons, default load
    python bench/redis_scaleout.py --quick         # smaller load (a smoke run)
    python bench/redis_scaleout.py --only memory-vs-redis|design|cluster|failover

Everything runs on this machine, on 127.0.0.1: a private redis-server (free port, no
persistence), real pusherd processes (`python -m pusherd`), and in this process raw-socket
WebSocket subscribers (minimal RFC 6455 client, V2 frames) and keep-alive HTTP publishers.

1. memory-vs-redis: the same subscribers and the same publishes against
   (a) one process, `broker: memory`; (b) two processes, `broker: redis://…`, subscribers and
   publishers split evenly over both. Phase "burst": N publishes as fast as K connections can
   send them -> delivered messages/s. Phase "paced": R publishes/s for D seconds -> latency
   (publish timestamp in the payload to the subscriber reading the frame), p50/p99.
   Prints each figure and the ratio redis/memory.
2. design: two processes on Redis, topics partitioned (process 0's browsers on half the topics,
   process 1's on the other half), publishes spread over all topics. One Redis channel per topic
   (what pusherd ships) vs one shared channel for everything (every process receives every
   event and drops what it has no member for). Prints delivered msgs/s and pusherd CPU
   seconds per 1,000 publishes (utime+stime of the pusherd processes, from /proc).

3. cluster: a Redis Cluster of 1, 2 and 3 masters (`redis+cluster://`), one process
   publishing as fast as it can over 64 topics spread over every slot bucket, two processes
   subscribed to all of them (RedisBrokers, no pusherd daemon: the figure is Redis's). Sharded
   pub/sub (SPUBLISH/SSUBSCRIBE, what pusherd ships) vs classic PUBLISH/SUBSCRIBE on the same
   cluster (Redis broadcasts every message to every node over the cluster bus). Prints
   publishes/s and the redis-server CPU per publish, in all and on the busiest master (a master
   saturates at one core: the busiest master's CPU per publish bounds the cluster).
4. failover: SIGKILL the master behind Sentinel (a replica, three sentinels, down-after 1000
   ms) and a cluster shard's master (a replica each, cluster-node-timeout 1000 ms) while one
   process publishes a history topic every 5 ms and another is subscribed: the time from the
   SIGKILL to the first publish acknowledged again, and to the subscriber's first delivery of
   a broadcast published after the promotion. Each repeated --repeat times.

Not part of the test suite; figures go to docs/scaling.md.
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PUBLISH_SECRET = "bench-publish-secret-0123456789"
GUARDIAN_SECRET = "bench-guardian-secret-0123456789abcdef"
ORIGIN = "http://localhost:3000"

# Run as a pusherd whose RedisBroker uses one shared channel (the design comparison).
SHARED_LAUNCHER = r"""
import sys
sys.path.insert(0, sys.argv.pop(1))
from pusherd import daemon as server
from pusherd.brokers.redis import RedisBroker

class SharedChannelRedisBroker(RedisBroker):
    '''Every event on one channel; each process filters by its local topics.'''
    ALL = "*"
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._local = set()
    def channel(self, topic):
        return self._channel_prefix + b"*"
    def subscribe(self, topic):
        self._local.add(topic)
        if len(self._local) == 1:
            super().subscribe(self.ALL)
    def unsubscribe(self, topic):
        self._local.discard(topic)
        if not self._local:
            super().unsubscribe(self.ALL)
    def _wants(self, topic):
        return topic in self._local
    def active(self, topic):
        return topic in self._local and self.ALL in self._confirmed

server.build_broker = lambda s, stats=None: SharedChannelRedisBroker(s.broker, prefix=s.broker_prefix)
from pusherd.__main__ import main
sys.exit(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path("/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


# -- processes ---------------------------------------------------------------------------------

class Redis:
    def __init__(self, tmp):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Pusherd:
    def __init__(self, tmp, broker, shared_channel=False):
        import yaml
        self.port = free_port()
        cfg = Path(tmp) / ("pusher-%d.yml" % self.port)
        cfg.write_text(yaml.safe_dump({"bench": {
            "guardian_secret": GUARDIAN_SECRET, "publish_secret": PUBLISH_SECRET, "broker": broker,
            "allowed_origins": [ORIGIN], "log_level": "warning", "max_outbox_bytes": 64 * 1024 * 1024}}))
        args = ["--config", str(cfg), "--env", "bench", "--listen", "127.0.0.1:%d" % self.port]
        cmd = ([sys.executable, "-c", SHARED_LAUNCHER, str(ROOT)] if shared_channel
               else [sys.executable, "-m", "pusherd"]) + args
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                    if b" 200 " in s.recv(200):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit("pusherd exited: " + self.proc.stderr.read().decode()[-2000:])
            time.sleep(0.05)
        raise SystemExit("pusherd did not become healthy")

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- clients -----------------------------------------------------------------------------------

def _masked_text_frame(text: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(text)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))


class Subscriber:
    """One WebSocket (V2), joined to one topic; records the latency of every `b` event."""

    def __init__(self, stats):
        self.stats = stats

    async def connect(self, port, topic):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        self.writer.write(("GET /events/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                           "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                           "Origin: %s\r\n\r\n" % (port, key, ORIGIN)).encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise SystemExit("upgrade refused: %r" % head[:200])
        self.writer.write(_masked_text_frame(json.dumps(["1", "1", topic, "phx_join", {}]).encode()))
        frame = await self._frame()
        if b'"ok"' not in frame:
            raise SystemExit("join refused: %r" % frame)

    async def _frame(self) -> bytes:
        b0, b1 = await self.reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return await self.reader.readexactly(n)

    async def run(self):
        """Parse frames out of large reads (one await per read, not three per frame)."""
        stats, latencies = self.stats, self.stats["latencies"]
        buf = b""
        try:
            while True:
                chunk = await self.reader.read(262144)
                if not chunk:
                    return
                now = time.time()
                buf = buf + chunk if buf else chunk
                pos, end = 0, len(buf)
                while end - pos >= 2:
                    n = buf[pos + 1] & 0x7F
                    head = 2
                    if n == 126:
                        if end - pos < 4:
                            break
                        n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
                    elif n == 127:
                        if end - pos < 10:
                            break
                        n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
                    if end - pos < head + n:
                        break
                    i = buf.rfind(b'"t":', pos + head, pos + head + n)
                    if i >= 0:
                        stats["delivered"] += 1
                        latencies.append(now - float(buf[i + 4:buf.index(b"}", i)]))
                    pos += head + n
                buf = buf[pos:]
                stats["last"] = now
        except ConnectionError:
            pass

    def close(self):
        self.writer.close()


class Publisher:
    """One keep-alive HTTP connection to POST /publish."""

    async def connect(self, port):
        self.port = port
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)

    async def publish(self, topic: str, pad: str) -> int:
        body = ('{"topic":"%s","event":"b","payload":{"pad":"%s","t":%.6f}}' % (topic, pad, time.time())).encode()
        self.writer.write(b"POST /publish HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer " + PUBLISH_SECRET.encode()
                          + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                          + b"\r\n\r\n" + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return int(head.split(b" ", 2)[1])

    def close(self):
        self.writer.close()


# -- one run -----------------------------------------------------------------------------------

async def measure(ports, placement, topics, args, paced=True):
    """`placement[i]` = (port index, topic) for subscriber i. Returns figures for one setup."""
    stats = {"delivered": 0, "last": 0.0, "latencies": []}
    subs = []
    for port_i, topic in placement:
        s = Subscriber(stats)
        await s.connect(ports[port_i], topic)
        subs.append(s)
    readers = [asyncio.ensure_future(s.run()) for s in subs]
    pubs = []
    for i in range(args.connections):
        p = Publisher()
        await p.connect(ports[i % len(ports)])
        pubs.append(p)
    pad = "x" * args.payload
    members = {t: sum(1 for _, tt in placement if tt == t) for t in topics}
    result = {}

    async def settle(expected, timeout=30):
        deadline = time.monotonic() + timeout
        while stats["delivered"] < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # Burst: as fast as the publishers can go.
    counter = iter(range(args.messages))
    sent_topics = []

    async def burst(p):
        for n in counter:
            topic = topics[n % len(topics)]
            status = await p.publish(topic, pad)
            if status != 200:
                raise SystemExit("publish answered %d" % status)
            sent_topics.append(topic)

    stats["latencies"].clear()
    start = time.time()
    await asyncio.gather(*[burst(p) for p in pubs])
    publish_done = time.time()
    expected = sum(members[t] for t in sent_topics)
    await settle(expected)
    result["burst_delivered"] = stats["delivered"]
    result["burst_expected"] = expected
    result["burst_msgs_per_s"] = stats["delivered"] / max(stats["last"] - start, 1e-9)
    result["burst_publishes_per_s"] = args.messages / (publish_done - start)
    result["burst_p99_ms"] = 1000 * percentile(stats["latencies"], 99)

    if paced:
        await asyncio.sleep(0.3)
        stats["delivered"] = 0
        stats["latencies"].clear()
        interval = 1.0 / args.rate
        total = int(args.rate * args.seconds)
        expected = 0
        t0 = time.monotonic()
        inflight = set()
        for n in range(total):
            delay = t0 + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            topic = topics[n % len(topics)]
            expected += members[topic]
            p = pubs[n % len(pubs)]
            # One request at a time per connection: wait for this connection's previous one.
            prev = getattr(p, "pending", None)
            if prev is not None and not prev.done():
                await prev
            p.pending = asyncio.ensure_future(p.publish(topic, pad))
            inflight.add(p.pending)
        await asyncio.gather(*inflight)
        await settle(expected)
        lat = stats["latencies"]
        result["paced_rate"] = args.rate
        result["paced_delivered"] = stats["delivered"]
        result["paced_expected"] = expected
        result["paced_p50_ms"] = 1000 * percentile(lat, 50)
        result["paced_p99_ms"] = 1000 * percentile(lat, 99)
        result["paced_max_ms"] = 1000 * max(lat) if lat else float("nan")

    for p in pubs:
        p.close()
    for s in subs:
        s.close()
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    return result


def spread(n_subs, n_ports, topics):
    """Subscribers evenly over ports and topics (every topic has members on every port)."""
    return [(i % n_ports, topics[(i // n_ports) % len(topics)]) for i in range(n_subs)]


def partitioned(n_subs, topics):
    """Two ports; port 0's subscribers on the first half of the topics, port 1's on the rest."""
    half = len(topics) // 2
    return [(i % 2, topics[(i // 2) % half + (half if i % 2 else 0)]) for i in range(n_subs)]


def run_setup(tmp, brokers, placement, topics, args, paced=True, shared=False):
    """The median of --repeat runs, metric by metric (this machine may be shared: look at the spread)."""
    runs = [run_once(tmp, brokers, placement, topics, args, paced, shared) for _ in range(args.repeat)]
    result = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    result["spread"] = (min(r["burst_msgs_per_s"] for r in runs), max(r["burst_msgs_per_s"] for r in runs))
    return result


def run_once(tmp, brokers, placement, topics, args, paced=True, shared=False):
    daemons = [Pusherd(tmp, b, shared_channel=shared) for b in brokers]
    try:
        cpu0 = sum(d.cpu() for d in daemons)
        own0 = time.process_time()
        result = asyncio.run(measure([d.port for d in daemons], placement, topics, args, paced))
        result["cpu_s"] = sum(d.cpu() for d in daemons) - cpu0
        result["bench_cpu_s"] = time.process_time() - own0
        return result
    finally:
        for d in daemons:
            d.stop()


def receive_cost_us(redis_url: str, n: int = 20000) -> float:
    """CPU one process spends to receive one event from Redis (redis-py read + envelope decode).

    With one shared channel every process pays this for every event in the cluster; with one
    channel per topic only for events on its own topics. The events are pushed by Redis from a
    raw pipelined PUBLISH sent by a thread, so this process's CPU time is the receive side.
    """
    sys.path.insert(0, str(ROOT))
    import threading
    from pusherd.core.broadcast import Broadcast
    from pusherd.brokers.redis import RedisBroker, encode_envelope

    async def measure_it():
        got = [0]
        done = asyncio.Event()

        def deliver(_b):
            got[0] += 1
            if got[0] == n:
                done.set()

        broker = RedisBroker(redis_url, prefix="cost")
        await broker.start(deliver)
        broker.subscribe("public:c")
        await asyncio.sleep(0.2)
        data = encode_envelope("another-process", Broadcast("public:c", "b", {"pad": "x" * 100, "t": 1.0}))
        channel = b"cost:t:public:c"
        cmd = b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(data), data)
        port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        sock = socket.create_connection(("127.0.0.1", port))
        t0 = time.process_time()
        threading.Thread(target=sock.sendall, args=(cmd * n,), daemon=True).start()
        await asyncio.wait_for(done.wait(), 60)
        used = time.process_time() - t0
        sock.close()
        await broker.close()
        return 1e6 * used / n

    return asyncio.run(measure_it())


# -- 3. and 4.: cluster and failover, on the broker --------------------------------------------

def _topologies():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import redis_topologies
    return redis_topologies


def _classic_on_cluster(broker):
    """Classic pub/sub on the same cluster: PUBLISH, SUBSCRIBE (broadcast to every node)."""
    broker._pub_cmd, broker._sub_cmd, broker._unsub_cmd = b"PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE"
    return broker


def _subscriber_process(url, topics, classic, ready, stop, out):
    import asyncio as aio
    from pusherd.brokers.redis import RedisBroker
    count = [0]

    async def main():
        broker = RedisBroker(url, prefix="bench")
        if classic:
            _classic_on_cluster(broker)
        await broker.start(lambda b: count.__setitem__(0, count[0] + 1))
        for t in topics:
            broker.subscribe(t)
        for t in topics:
            await broker.activate(t)
        ready.set()
        while not stop.is_set():
            await aio.sleep(0.05)
        last = -1
        while count[0] != last:        # drained: nothing more for half a second
            last = count[0]
            await aio.sleep(0.5)
        out.put((count[0], time.process_time(), broker.stats["outages"]))
        await broker.close()
    aio.run(main())


def cluster_run(tmp, shards, classic, seconds, payload):
    import multiprocessing as mp
    topo = _topologies()
    setup = topo.ClusterSetup(Path(tempfile.mkdtemp(dir=tmp)), masters=shards, replicas=0).start()
    try:
        from pusherd.brokers.redis import RedisBroker
        from pusherd.core.broadcast import Broadcast
        topics = ["public:shard%d" % i for i in range(64)]
        ctx = mp.get_context("fork")
        stop, out = ctx.Event(), ctx.Queue()
        subs = []
        for _ in range(2):
            ready = ctx.Event()
            proc = ctx.Process(target=_subscriber_process, args=(setup.url, topics, classic, ready, stop, out))
            proc.start()
            ready.wait(30)
            subs.append(proc)
        masters = [setup.server(p) for p in setup.master_ports()]

        async def publish():
            broker = RedisBroker(setup.url, prefix="bench")
            if classic:
                _classic_on_cluster(broker)
            await broker.start(lambda b: None)
            done = [0]
            deadline = time.monotonic() + seconds
            pad = "x" * payload

            async def worker(k):
                i = k
                while time.monotonic() < deadline:
                    await broker.publish(Broadcast(topics[i % len(topics)], "b", {"pad": pad}))
                    done[0] += 1
                    i += 7
            cpu0 = [cpu_seconds(m.proc.pid) for m in masters]
            t0 = time.monotonic()
            await asyncio.gather(*[worker(k) for k in range(64)])
            elapsed = time.monotonic() - t0
            cpu = [cpu_seconds(m.proc.pid) - c for m, c in zip(masters, cpu0)]
            await broker.close()
            return done[0], elapsed, cpu
        published, elapsed, cpu = asyncio.run(publish())
        stop.set()
        reports = [out.get(timeout=60) for _ in subs]
        received = ["%d%s" % (r[0], " (%d outages)" % r[2] if r[2] else "") for r in reports]
        for proc in subs:
            proc.join(10)
        return {"published": published, "rate": published / elapsed, "received": received,
                "cpu_us_total": 1e6 * sum(cpu) / published, "cpu_us_busiest": 1e6 * max(cpu) / published,
                "busiest_util": max(cpu) / elapsed}
    finally:
        setup.stop()


def failover_once(tmp, kind):
    """Seconds from the SIGKILL to the first acknowledged publish and to the first delivery of
    a broadcast published after it, on the other process."""
    topo = _topologies()
    from pusherd.brokers.redis import RedisBroker
    from pusherd.core.broadcast import Broadcast
    from pusherd.config import HistoryRule
    from pusherd.core.errors import BrokerUnavailable
    from pusherd.core.history import Rules
    where = Path(tempfile.mkdtemp(dir=tmp))
    setup = (topo.SentinelSetup(where) if kind == "sentinel"
             else topo.ClusterSetup(where, masters=3, replicas=1)).start()
    try:
        async def scenario():
            rules = Rules([HistoryRule("deploys:*", 1000, 3600.0)])
            got = []
            a = RedisBroker(setup.url, prefix="bench", history_rules=rules)
            b = RedisBroker(setup.url, prefix="bench", history_rules=rules)
            await a.start(lambda x: None)
            await b.start(lambda x: got.append((time.monotonic(), x.payload["n"])))
            b.subscribe("deploys:web")
            await b.activate("deploys:web")
            victim = (setup.master() if kind == "sentinel"
                      else setup.server(setup.owner_port(a.channel("deploys:web"))))
            n, acked, killed, first_ack, refused = 0, {}, None, None, 0
            while first_ack is None or time.monotonic() < first_ack + 1.0:
                if n == 20:
                    victim.kill()
                    killed = time.monotonic()
                try:
                    await a.publish(Broadcast("deploys:web", "e", {"n": n}))
                    acked[n] = time.monotonic()
                    if killed is not None and first_ack is None and n > 20:
                        first_ack = acked[n]
                except BrokerUnavailable:
                    refused += 1
                n += 1
                await asyncio.sleep(0.005)
                if killed is not None and time.monotonic() - killed > 60:
                    raise SystemExit("no switch-over within 60 s")
            await asyncio.sleep(0.5)
            after = [t for t, m in got if m > 20 and m in acked]
            await a.close()
            await b.close()
            return first_ack - killed, min(after) - killed, refused
        return asyncio.run(scenario())
    finally:
        setup.stop()


def show(name, r):
    line = "  %-32s burst %6.0f delivered msgs/s [%.0f..%.0f] (%d/%d, p99 %5.1f ms)" % (
        name, r["burst_msgs_per_s"], r["spread"][0], r["spread"][1], r["burst_delivered"], r["burst_expected"],
        r["burst_p99_ms"])
    if "paced_p99_ms" in r:
        line += " | paced %d/s: p50 %5.2f ms p99 %6.2f ms (%d/%d)" % (
            r["paced_rate"], r["paced_p50_ms"], r["paced_p99_ms"], r["paced_delivered"], r["paced_expected"])
    print(line + " | cpu: pusherd %.2fs, load generator %.2fs" % (r["cpu_s"], r["bench_cpu_s"]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=200)
    ap.add_argument("--topics", type=int, default=4)
    ap.add_argument("--messages", type=int, default=3000, help="burst publishes")
    ap.add_argument("--connections", type=int, default=8, help="concurrent publisher connections")
    ap.add_argument("--rate", type=int, default=100, help="paced publishes per second")
    ap.add_argument("--seconds", type=float, default=5.0, help="paced phase duration")
    ap.add_argument("--payload", type=int, default=100, help="payload padding bytes")
    ap.add_argument("--repeat", type=int, default=3, help="runs per setup; medians are printed")
    ap.add_argument("--only", choices=["memory-vs-redis", "design", "cluster", "failover"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.subscribers, args.messages, args.seconds, args.repeat = 40, 500, 2.0, 1
    import logging
    logging.getLogger("pusherd.broker").setLevel(logging.ERROR)   # the failovers' outage warnings
    # A SIGTERM still runs the finally blocks that stop redis-server and the pusherd processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(tmp)
        try:
            print("pusherd scale-out benchmark: %d subscribers, %d B payload, %d CPUs, python %s" % (
                args.subscribers, args.payload, os.cpu_count(), sys.version.split()[0]))
            if args.only in (None, "memory-vs-redis"):
                topics = ["public:bench%d" % i for i in range(args.topics)]
                print("\n1. memory broker (1 process) vs Redis (2 processes); %d topics, every topic on "
                      "every process; burst %d publishes over %d connections" % (
                          args.topics, args.messages, args.connections))
                mem = run_setup(tmp, ["memory"], spread(args.subscribers, 1, topics), topics, args)
                show("memory, 1 process", mem)
                red = run_setup(tmp, [redis.url, redis.url], spread(args.subscribers, 2, topics), topics, args)
                show("redis, 2 processes", red)
                print("  ratio redis/memory: delivered msgs/s x%.2f, burst p99 x%.2f, paced p99 x%.2f" % (
                    red["burst_msgs_per_s"] / mem["burst_msgs_per_s"], red["burst_p99_ms"] / mem["burst_p99_ms"],
                    red["paced_p99_ms"] / mem["paced_p99_ms"]))
            if args.only in (None, "cluster"):
                seconds = 2.0 if args.quick else 5.0
                print("\n3. Redis Cluster, 1 process publishing over 64 topics for %.0fs (64 in flight), 2 processes "
                      "subscribed to all; redis-server CPU per publish" % seconds)
                for classic in (False, True):
                    for shards in (1, 2, 3):
                        r = cluster_run(tmp, shards, classic, seconds, args.payload)
                        print("  %-30s %d shard(s): %6.0f publishes/s, %d published, received %s; redis CPU per publish %5.1f us in "
                              "all, %5.1f us on the busiest master (%.0f%% busy)" % (
                                  "classic PUBLISH/SUBSCRIBE" if classic else "sharded SPUBLISH (shipped)", shards,
                                  r["rate"], r["published"], "/".join(r["received"]), r["cpu_us_total"],
                                  r["cpu_us_busiest"], 100 * r["busiest_util"]), flush=True)
            if args.only in (None, "failover"):
                print("\n4. failover switch-over (SIGKILL of the master; publishing every 5 ms)")
                for kind in ("sentinel", "cluster"):
                    runs = [failover_once(tmp, kind) for _ in range(args.repeat)]
                    for ack, delivered, refused in runs:
                        print("  %-8s acknowledged again after %.2fs, delivered to the other process after %.2fs "
                              "(%d publishes refused meanwhile)" % (kind, ack, delivered, refused), flush=True)
            if args.only in (None, "design"):
                topics = ["public:part%d" % i for i in range(max(2, args.topics * 2))]
                print("\n2. channel layout, 2 processes on Redis, %d topics partitioned between the processes "
                      "(each process has members on half)" % len(topics))
                placement = partitioned(args.subscribers, topics)
                per = run_setup(tmp, [redis.url, redis.url], placement, topics, args, paced=False)
                show("one channel per topic (shipped)", per)
                sh = run_setup(tmp, [redis.url, redis.url], placement, topics, args, paced=False, shared=True)
                show("one shared channel", sh)
                print("  per-topic/shared: delivered msgs/s x%.2f; pusherd CPU per 1000 publishes %.3fs vs %.3fs" % (
                    per["burst_msgs_per_s"] / sh["burst_msgs_per_s"], 1000 * per["cpu_s"] / args.messages,
                    1000 * sh["cpu_s"] / args.messages))
                print("  receiving one event from Redis costs a process %.0f us of CPU (redis-py read + decode): with a "
                      "shared channel every process pays it for every event in the cluster" % receive_cost_us(redis.url))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()

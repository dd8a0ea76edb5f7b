"""pusherd side by side with the classic Tornado pattern, the bare-asyncio floor and Node's ws.

    python bench/run.py            # full run (about 8 minutes on 2 cores)
    python bench/run.py --quick    # shorter phases, fewer sizes (about 2 minutes)

Every scenario starts a fresh server process per contender (pinned to CPU 0 when the machine has
two cores or more; the load generator and this coordinator go to the others), drives it from
worker processes over loopback, and reads the server's CPU time and RSS from /proc/<pid>.
Figures are printed as a table with pusherd's ratio to the baseline (and to the floor) measured
in the same run; ``--json FILE`` also writes them out.
"""

import argparse
import asyncio
import importlib.util
import json
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from pusherd.client import mint_token  # noqa: E402

GSECRET = "bench-guardian-secret-0123456789abcdef"
PSECRET = "bench-publish-secret-0123456789abcdef"
CSRF = "bench-csrf-token"
ISSUER = "https://rails.bench.example"  # every contender checks iss against it
NODE_WS = ROOT / "tests" / "interop" / "node_modules" / "ws"
HOST = "127.0.0.1"
CLK = os.sysconf("SC_CLK_TCK")
# Publishes per second in the latency scenarios. 1k x 200/s (the issue's figure) is 200k frames/s,
# more than one core of this load generator reads (about 100k/s at one frame per read): the
# latency then measured is the load generator's. 1k x 50/s and 10k x 5/s stay within it.
LATENCY_RATE_1K = 50
LATENCY_RATE_10K = 5
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * PAGE


def payload(pad: int = 60, **extra) -> dict:
    body = {"t": time.time(), "pad": "x" * pad}
    body.update(extra)
    return body


class Server:
    """One contender in its own process."""

    def __init__(self, kind: str, opts, overrides=None):
        self.kind = kind
        self.opts = opts
        self.port = free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="pusherd-bench-")
        self.log = open(os.path.join(self.tmp.name, "server.log"), "w+")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env.pop("NOTIFY_SOCKET", None)
        # The server runs in the checkout it comes from: ``python -m`` puts the working directory
        # first on sys.path, before PYTHONPATH (run from this checkout, 'before' was this code).
        cwd = str(ROOT)
        if kind == "before":  # pusherd from another checkout (--before DIR): a change measured in one run
            env["PYTHONPATH"] = cwd = opts.before
        if kind in ("pusherd", "before"):
            cfg = {"guardian_secret": GSECRET, "publish_secret": PSECRET,
                   "allowed_origins": ["http://localhost:3000"], "heartbeat_timeout": 3600,
                   "max_connections": 20000, "log_level": "info", "issuer": [ISSUER],
                   # The baseline and the floor log no access lines: compare like with like.
                   "access_log": False}
            cfg.update(overrides or {})
            path = os.path.join(self.tmp.name, "pusher.yml")
            with open(path, "w") as f:
                json.dump({"bench": cfg}, f)  # JSON is YAML
            env["PUSHERD_LOOP"] = opts.loop
            if opts.fast is not None:
                env["PUSHERD_FAST"] = opts.fast
            cmd = [sys.executable, "-m", "pusherd", "--config", path, "--env", "bench",
                   "--listen", "%s:%d" % (HOST, self.port)]
        elif kind == "node":
            cmd = ["node", str(HERE / "node_ws_server.js"), str(self.port), GSECRET, PSECRET, opts.loop, ISSUER]
        else:
            script = {"baseline": "baseline_server.py", "floor": "floor_server.py"}[kind]
            cmd = [sys.executable, str(HERE / script), str(self.port), GSECRET, PSECRET, opts.loop]
            if kind == "floor":
                cmd.append(ISSUER)
        cpus = opts.server_cpus

        def child_setup():
            loadgen.raise_nofile()
            if cpus:  # before exec: every thread the server starts (node's too) inherits it
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     preexec_fn=child_setup)
        if opts.server_cpus:
            os.sched_setaffinity(self.proc.pid, opts.server_cpus)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    raise RuntimeError("%s did not start:\n%s" % (kind, self.log.read()[-3000:]))
                time.sleep(0.05)
        time.sleep(0.3)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.tmp.cleanup()


class Pool:
    """The load generator's worker processes."""

    def __init__(self, n: int, cpus, loop_kind: str):
        ctx = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=loadgen.worker_main, args=(child, cpus, loop_kind), daemon=True)
            p.start()
            self.pipes.append(parent)
            self.procs.append(p)

    def all(self, cmd, *args_per_worker, timeout=120):
        for i, pipe in enumerate(self.pipes):
            args = args_per_worker[i] if args_per_worker else ()
            pipe.send((cmd, args))
        out = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise RuntimeError("load generator did not answer %s" % cmd)
            out.append(pipe.recv())
        return out

    def connect(self, server: Server, n: int, topic: str, tokens=None, sample_every=0, concurrency=256,
                timeout=60, rcvbuf=0, gate_joins=False, spread=False):
        k = len(self.pipes)
        shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
        path = "/events/websocket?vsn=2.0.0"
        per = [(HOST, server.port, path, shares[i], topic,
                tokens[i::k] if tokens else None, CSRF, sample_every, max(1, concurrency // k), timeout, rcvbuf,
                gate_joins, 10 + i if spread else 0)
               for i in range(k)]
        t0 = time.monotonic()
        res = self.all("connect", *per, timeout=timeout + 30)
        return {"joined": sum(r["joined"] for r in res), "failed": sum(r["failed"] for r in res),
                "seconds": time.monotonic() - t0, "errors": [e for r in res for e in r["errors"]][:5],
                # from each worker's own clock, started once its join frames were built
                "worker_seconds": max(r["seconds"] for r in res)}

    def received(self) -> int:
        return sum(r["received"] for r in self.all("received"))

    def cpu(self) -> float:
        return sum(r["cpu"] for r in self.all("cpu"))

    def latencies(self):
        return [x for r in self.all("latencies") for x in r["latencies"]]

    def close_all(self):
        self.all("close_all")

    def exit(self):
        for pipe in self.pipes:
            pipe.send(("exit", ()))
        for p in self.procs:
            p.join(5)


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --- scenarios -------------------------------------------------------------------------------

def fanout(pool: Pool, server: Server, n: int, seconds: float, burst: int = 1, window: int = 32) -> dict:
    """As fast as delivery keeps up, with at most `window` messages in flight per socket."""
    c = pool.connect(server, n, "public:fanout")
    assert c["joined"] == n, c

    async def drive():
        p = await loadgen.Publisher(HOST, server.port, PSECRET).open()
        sent = 0
        seen = 0
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            events = [{"topic": "public:fanout", "event": "tick", "payload": payload(seq=sent + i)}
                      for i in range(burst)]
            body = json.dumps(events if burst > 1 else events[0]).encode()
            status = await p.post(body)
            assert status == 200, status
            sent += burst
            need = (sent - window) * n
            while seen < need:
                seen = pool.received()
                if seen < need:
                    await asyncio.sleep(0.001)
        deadline = time.monotonic() + 60
        while pool.received() < sent * n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        p.close()
        return sent

    pool.all("reset")
    cpu0, lcpu0, t0 = server.cpu(), pool.cpu(), time.monotonic()
    sent = asyncio.run(drive())
    elapsed = time.monotonic() - t0
    cpu1, lcpu1 = server.cpu(), pool.cpu()
    got = pool.received()
    pool.close_all()
    return {"sockets": n, "burst": burst, "published": sent, "delivered": got, "lost": sent * n - got,
            "msgs_per_s": got / elapsed, "us_per_msg": 1e6 * (cpu1 - cpu0) / max(1, got),
            "loadgen_us_per_msg": 1e6 * (lcpu1 - lcpu0) / max(1, got),
            "server_cpu_share": (cpu1 - cpu0) / elapsed}


def latency(pool: Pool, server: Server, n: int, rate: float, seconds: float, grace: float) -> dict:
    """Open loop at `rate` publishes/s (4 keep-alive publishers); latency from the scheduled time."""
    c = pool.connect(server, n, "public:latency", sample_every=max(1, n // 100))
    assert c["joined"] == n, c
    samplers = len(range(0, n, max(1, n // 100)))  # approximately; exact count from the workers below
    count = int(rate * seconds)

    async def drive():
        pubs = [await loadgen.Publisher(HOST, server.port, PSECRET).open() for _ in range(4)]
        queues = [asyncio.Queue() for _ in pubs]

        async def run(p, q):
            while True:
                body = await q.get()
                if body is None:
                    return
                await p.post(body)

        tasks = [asyncio.ensure_future(run(p, q)) for p, q in zip(pubs, queues)]
        start = time.time() + 0.1
        for i in range(count):
            at = start + i / rate
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            body = json.dumps({"topic": "public:latency", "event": "tick",
                               "payload": {"t": at, "pad": "x" * 60, "seq": i}}).encode()
            min(queues, key=lambda q: q.qsize()).put_nowait(body)
        for q in queues:
            q.put_nowait(None)
        await asyncio.wait(tasks, timeout=grace)
        deadline = time.monotonic() + grace
        while pool.received() < count * n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for p in pubs:
            p.close()

    pool.all("reset")
    cpu0, lcpu0, t0 = server.cpu(), pool.cpu(), time.monotonic()
    asyncio.run(drive())
    elapsed = time.monotonic() - t0
    cpu1 = server.cpu()
    got = pool.received()
    lats = pool.latencies()
    pool.close_all()
    expected_samples = samplers * count
    missing = max(0, expected_samples - len(lats))
    # Messages not delivered within the grace period count as late beyond every percentile.
    full = sorted(lats) + [float("inf")] * missing
    lcpu = pool.cpu() - lcpu0
    return {"sockets": n, "rate": rate, "seconds": seconds, "delivered": got, "lost": count * n - got,
            "loadgen_cpu_share": lcpu / elapsed,
            "p50_ms": 1e3 * pct(full, 0.50), "p99_ms": 1e3 * pct(full, 0.99), "max_ms": 1e3 * max(full or [0]),
            "server_cpu_share": (cpu1 - cpu0) / elapsed}


def memory(pool: Pool, server: Server, n: int) -> dict:
    time.sleep(0.5)
    rss0 = server.rss()
    c = pool.connect(server, n, "public:idle")
    assert c["joined"] == n, c
    time.sleep(2.5)  # let a periodic sweep / gc run
    rss1 = server.rss()
    pool.close_all()
    return {"sockets": n, "kb_per_socket": (rss1 - rss0) / n / 1024, "rss_mb": rss1 / 2**20}


def longpoll_fanout(server: Server, n: int, seconds: float, window: int = 32) -> dict:
    """`fanout` to `n` long-poll sessions (bench/longpoll_load.py): CPU per delivered message."""
    from longpoll_load import LongPollPool

    lp = LongPollPool(HOST, server.port, "public:lpfanout", n, cpus=server.opts.client_cpus)
    try:
        lp.wait_joined()

        async def drive():
            p = await loadgen.Publisher(HOST, server.port, PSECRET).open()
            sent = 0
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                body = json.dumps({"topic": "public:lpfanout", "event": "tick", "payload": payload(seq=sent)})
                assert await p.post(body.encode()) == 200
                sent += 1
                while lp.received() < (sent - window) * n:
                    await asyncio.sleep(0.001)
            deadline = time.monotonic() + 30
            while lp.received() < sent * n and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            p.close()
            return sent

        lp.reset()
        cpu0, t0 = server.cpu(), time.monotonic()
        sent = asyncio.run(drive())
        elapsed = time.monotonic() - t0
        cpu1 = server.cpu()
        got = lp.received()
    finally:
        errors = lp.close()
    assert not errors, errors
    return {"sessions": n, "published": sent, "delivered": got, "lost": sent * n - got,
            "msgs_per_s": got / elapsed, "us_per_msg": 1e6 * (cpu1 - cpu0) / max(1, got),
            "server_cpu_share": (cpu1 - cpu0) / elapsed}


def longpoll_memory(server: Server, n: int) -> dict:
    """RSS per idle long-poll session: joined, its GET pending (its connection held)."""
    from longpoll_load import LongPollPool

    time.sleep(0.5)
    rss0 = server.rss()
    lp = LongPollPool(HOST, server.port, "public:lpidle", n, cpus=server.opts.client_cpus)
    try:
        lp.wait_joined()
        time.sleep(2.5)  # a periodic sweep / gc
        rss1 = server.rss()
    finally:
        errors = lp.close()
    assert not errors, errors
    return {"sessions": n, "kb_per_session": (rss1 - rss0) / n / 1024, "rss_mb": rss1 / 2**20}


def publish_api(pool: Pool, server: Server, seconds: float, conns: int = 8) -> dict:
    """Keep-alive POST /publish with the Bearer secret, to a topic with one subscriber."""
    c = pool.connect(server, 1, "public:api")
    assert c["joined"] == 1, c
    body = json.dumps({"topic": "public:api", "event": "tick", "payload": payload()}).encode()
    loop_kind = server.opts.loop

    cpu0 = server.cpu()
    t0 = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_publish_client, args=(q, server.port, body, seconds, conns // 2,
                                                        server.opts.client_cpus, loop_kind))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - t0
    cpu1 = server.cpu()
    pool.close_all()
    ok = sum(r[0] for r in results)
    bad = sum(r[1] for r in results)
    return {"requests": ok, "errors": bad, "req_per_s": ok / seconds,
            "us_per_req": 1e6 * (cpu1 - cpu0) / max(1, ok), "elapsed": elapsed}


def _publish_client(q, port, body, seconds, conns, cpus, loop_kind):
    if cpus:
        os.sched_setaffinity(0, cpus)
    loop = loadgen.new_loop(loop_kind)

    async def one():
        p = await loadgen.Publisher(HOST, port, PSECRET).open()
        req = p.request_bytes(body)
        ok = bad = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            p.writer.write(req)
            if await p.response() == 200:
                ok += 1
            else:
                bad += 1
        p.close()
        return ok, bad

    async def main():
        res = await asyncio.gather(*(one() for _ in range(conns)))
        return sum(r[0] for r in res), sum(r[1] for r in res)

    q.put(loop.run_until_complete(main()))


def node_missing():
    """Why the node contender cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not NODE_WS.is_dir():
        return "the ws package is missing (cd tests/interop && npm ci --no-audit --no-fund)"
    return None


def rails_tokens(n: int, first_id: int = 0) -> list:
    """n distinct join tokens as the Rails helper mints them on a page render: HS256, aud "csrf",
    a sub object of its own per user, iss, exp, s_csrf of the page's csrf token, listen/publish."""
    return [mint_token(GSECRET, sub={"id": i, "name": "User %d" % i, "email": "user%d@example.com" % i,
                                     "crews": ["web", "crew-%d" % (i % 7)]},
                       listen=["deploys:web", "public:*"], publish=[], csrf_token=CSRF, issuer=ISSUER,
                       ttl=3600)
            for i in range(first_id, first_id + n)]


def storm(pool: Pool, server: Server, n: int, rails: bool = False) -> dict:
    """n sockets connect and join at once: anonymously on a public topic, or (rails) each with
    its own Rails token on deploys:web. Tokens are minted before the clock starts."""
    tokens = rails_tokens(n) if rails else None
    topic = "deploys:web" if rails else "public:storm"
    time.sleep(0.2)
    cpu0, lcpu0 = server.cpu(), pool.cpu()
    c = pool.connect(server, n, topic, tokens=tokens, concurrency=n, timeout=60, spread=True)
    cpu1, lcpu1 = server.cpu(), pool.cpu()
    pool.close_all()
    return {"sockets": n, "joined": c["joined"], "errors": c["failed"], "seconds": c["worker_seconds"],
            "cpu_seconds": cpu1 - cpu0, "us_per_conn": 1e6 * (cpu1 - cpu0) / max(1, c["joined"]),
            "loadgen_cpu_seconds": lcpu1 - lcpu0,
            "first_errors": c["errors"]}


def storm20k_size(base: int, want: int = 20000) -> int:
    """The storm's size: 20,000, unless the server cannot hold base + 20,000 sockets under this
    machine's hard RLIMIT_NOFILE (no raising it without CAP_SYS_RESOURCE)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return want
    return max(1000, min(want, (hard - base - 1500) // 500 * 500))


class PeakRss(threading.Thread):
    """Polls the server's RSS every 50 ms; .peak after stop()."""

    def __init__(self, server: Server, every: float = 0.05):
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.peak = server.rss()
        self._stop_evt = threading.Event()

    def run(self):
        while not self._stop_evt.wait(self.every):
            try:
                self.peak = max(self.peak, self.server.rss())
            except OSError:
                return

    def stop(self):
        self._stop_evt.set()
        self.join()
        return self.peak


def storm20k(pool: Pool, observer: Pool, server: Server, base: int, n: int, rate: float = 20, grace: float = 10,
             in_flight: int = 1000) -> dict:
    """base sockets joined on deploys:web (Rails tokens, every one sampled for latency); then, while
    a publisher posts to deploys:web at `rate`/s (open loop, latency from the scheduled time), n
    more connect and join as fast as they are answered, `in_flight` at a time (connecting,
    upgrading or awaiting their join reply), each with its own Rails token, on public:storm20k (a
    topic of their own: the load generator could not read a 20/s fan-out to all of them).
    1000 in flight stays within every contender's accept backlog (1024); at 2000 the queue
    overflowed on this machine and a few hundred connections were reset.

    The base sockets live in `observer`, a load generator process of their own that takes no
    part in the storm: in the storm's processes, a frame waited for the loop to finish a batch of
    connects and joins, and every contender's p99 (the bare floor's too, 250-320 ms) measured
    the load generator's stall, not the server's fan-out.

    All n at once, the storm overflows every contender's accept queue (SYNs dropped, retried after
    1 s, 3 s) and the load generator's own loop stalls on thousands of completions at a time,
    which shows as seconds of latency for every contender: `storm` shows that case."""
    tokens = rails_tokens(base)
    storm_tokens = rails_tokens(n, first_id=base)
    c = observer.connect(server, base, "deploys:web", tokens=tokens, sample_every=1)
    assert c["joined"] == base, c
    stop = threading.Event()
    out = {}

    def publisher():
        async def drive():
            p = await loadgen.Publisher(HOST, server.port, PSECRET).open()
            sent = bad = 0
            start = time.time()
            while not stop.is_set():
                at = start + sent / rate
                delay = at - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                body = json.dumps({"topic": "deploys:web", "event": "new_version",
                                   "payload": {"t": at, "pad": "x" * 60, "seq": sent}}).encode()
                if await p.post(body) != 200:
                    bad += 1
                sent += 1
            p.close()
            out["sent"], out["bad"] = sent, bad

        try:
            asyncio.run(drive())
        except Exception as exc:  # reported, not raised: the storm's figures still stand
            out.setdefault("sent", 0)
            out["bad"] = out.get("bad", 0) + 1
            out["error"] = repr(exc)

    time.sleep(0.3)
    observer.all("reset")
    rss0 = server.rss()
    rss = PeakRss(server)
    rss.start()
    pub = threading.Thread(target=publisher, daemon=True)
    cpu0, lcpu0 = server.cpu(), pool.cpu()
    pub.start()
    s = pool.connect(server, n, "public:storm20k", tokens=storm_tokens, concurrency=in_flight, gate_joins=True,
                     timeout=60, spread=True)
    cpu1, lcpu1 = server.cpu(), pool.cpu()
    stop.set()
    pub.join(30)
    peak = rss.stop()
    sent = out.get("sent", 0)
    deadline = time.monotonic() + grace
    while observer.received() < sent * base and time.monotonic() < deadline:
        time.sleep(0.02)
    got = observer.received()
    lats = observer.latencies()
    pool.close_all()
    observer.close_all()
    full = sorted(lats) + [float("inf")] * max(0, sent * base - len(lats))
    return {"base": base, "sockets": n, "joined": s["joined"], "errors": s["failed"],
            "seconds": s["worker_seconds"], "peak_rss_mb": peak / 2**20, "rss_growth_mb": (peak - rss0) / 2**20,
            "cpu_seconds": cpu1 - cpu0, "us_per_conn": 1e6 * (cpu1 - cpu0) / max(1, s["joined"]),
            "loadgen_cpu_seconds": lcpu1 - lcpu0, "published": sent, "publish_errors": out.get("bad", 0), "lost": max(0, sent * base - got),
            "p50_ms": 1e3 * pct(full, 0.50), "p99_ms": 1e3 * pct(full, 0.99),
            "max_ms": 1e3 * max(full or [0]), "first_errors": s["errors"] + ([out["error"]] if "error" in out else [])}


def overload(pool: Pool, server: Server, n: int, paused: int, seconds: float) -> dict:
    """A few sockets stop reading while the rest are fanned out to as fast as they read.

    pusherd must cut the stalled ones off (1013) once their outbox passes max_outbox_bytes (they
    cannot read the close frame: they see the connection end) and keep
    the readers whole; a server without a bound keeps buffering for them.
    """
    k = len(pool.pipes)
    paused = (paused // k) * k
    c = pool.connect(server, paused, "public:overload", rcvbuf=4096)
    assert c["joined"] == paused, c
    pool.all("pause", *[(paused // k,) for _ in range(k)])  # the first joined: these
    readers = n - paused
    c = pool.connect(server, readers, "public:overload")
    assert c["joined"] == readers, c
    rss0 = server.rss()
    pad = "x" * 32000

    async def drive():
        p = await loadgen.Publisher(HOST, server.port, PSECRET).open()
        sent = 0
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            body = json.dumps({"topic": "public:overload", "event": "tick", "payload": {"t": time.time(), "pad": pad}})
            assert await p.post(body.encode()) == 200
            sent += 1
            while pool.received() < (sent - 2) * readers:
                await asyncio.sleep(0.002)
        deadline = time.monotonic() + 30
        while pool.received() < sent * readers and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        p.close()
        return sent

    pool.all("reset")
    sent = asyncio.run(drive())
    time.sleep(0.5)
    rss1 = server.rss()
    got = pool.received()
    # Let the stalled sockets read again: one the server cut off then sees its connection end.
    pool.all("resume")
    deadline = time.monotonic() + 5
    dropped = 0
    while time.monotonic() < deadline:
        dropped = sum(r["lost"] for r in pool.all("closes"))
        if dropped >= paused:
            break
        time.sleep(0.1)
    pool.close_all()
    return {"sockets": n, "paused": paused, "published": sent,
            "readers_lost": max(0, sent * readers - got), "stalled_dropped": dropped,
            "rss_growth_mb": (rss1 - rss0) / 2**20,
            "backlog_kb_per_paused": (rss1 - rss0) / 1024 / max(1, paused)}


# --- the run ---------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases and fewer sizes")
    ap.add_argument("--servers", default="pusherd,baseline,floor,node",
                    help="comma-separated contenders (node is skipped with a message when node or ws is missing)")
    ap.add_argument("--only", default="", help="comma-separated scenario names (fanout,burst,latency,"
                                                "latency10k,memory,lpfanout,lpmemory,publish,storm,"
                                                "stormrails,storm20k,overload)")
    ap.add_argument("--workers", type=int, default=2, help="load generator processes")
    ap.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                    help="event loop for every contender and the load generator")
    ap.add_argument("--fast", default=None, choices=("0", "1"), help="PUSHERD_FAST for pusherd (default: its own)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and load generator to CPUs")
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario (contenders interleaved); "
                                                          "the table shows medians")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--before", metavar="DIR", help="also run pusherd from this checkout, as the contender "
                                                    "'before' (e.g. a git worktree of the previous commit)")
    opts = ap.parse_args(argv)
    if "node" in opts.servers.split(","):
        why = node_missing()
        if why:
            print("skipping the node contender: %s" % why, flush=True)
            opts.servers = ",".join(k for k in opts.servers.split(",") if k != "node")
            if not opts.servers:
                ap.error("no contender left to run")
    if opts.before and "before" not in opts.servers.split(","):
        opts.servers += ",before"
    if opts.loop == "auto":
        opts.loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 and not opts.no_pin:
        opts.server_cpus, opts.client_cpus = {cpus[0]}, set(cpus[1:])
        os.sched_setaffinity(0, opts.client_cpus)
    else:
        opts.server_cpus = opts.client_cpus = None
    loadgen.raise_nofile()
    q = opts.quick
    servers = opts.servers.split(",")
    plan = [
        ("fanout", [(n,) for n in ((1000, 5000) if q else (1000, 5000, 10000))]),
        ("burst", [(5000,)]),
        ("latency", [(1000,)]),
        ("latency10k", [(10000,)]),
        ("memory", [(n,) for n in ((5000,) if q else (5000, 10000))]),
        ("lpfanout", [(1000,)]),
        ("lpmemory", [(2000,)]),
        ("publish", [()]),
        ("storm", [(5000,)]),
        ("stormrails", [(5000,)]),
        ("storm20k", [(1000, storm20k_size(1000))]),
        ("overload", [(200,)]),
    ]
    only = set(filter(None, opts.only.split(",")))
    phase = 2.0 if q else 4.0
    pool = Pool(opts.workers, opts.client_cpus, opts.loop)
    # storm20k's latency-sampling sockets: one more process, out of the storm's way
    observer = Pool(1, opts.client_cpus, opts.loop) if not only or "storm20k" in only else None
    results = {}
    print("pusherd bench: loop=%s, server CPUs %s, load generator CPUs %s (%d workers), %s"
          % (opts.loop, opts.server_cpus or "any", opts.client_cpus or "any", opts.workers,
             "quick" if q else "full"), flush=True)
    try:
        for name, cases in plan:
            if only and name not in only:
                continue
            for case in cases:
                for _ in range(opts.repeat):
                    for kind in servers:
                        if name == "overload" and kind in ("floor", "node"):
                            continue  # the floor (and node's ws) has no bound by design: nothing to show
                        if name.startswith("lp") and kind != "pusherd":
                            continue  # long-poll: pusherd's own (the others, and 'before' it, have none)
                        key, r = run_one(name, case, kind, opts, pool, phase, q, observer)
                        results.setdefault(key, {}).setdefault(kind, []).append(r)
                        print("  %-16s %-9s %s" % (key, kind, _fmt(r)), flush=True)
    finally:
        pool.exit()
        if observer is not None:
            observer.exit()
    print()
    print(table(median_of(results), servers))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"loop": opts.loop, "results": results}, f, indent=1, default=str)


def run_one(name, case, kind, opts, pool, phase, q, observer=None):
    overrides = {"max_outbox_bytes": 262144} if name == "overload" else None
    if name.startswith("lp"):  # each long-poll page holds an HTTP connection (two while it POSTs)
        overrides = {"max_http_connections": 3 * case[0] + 100}
    # storm / stormrails keep pusherd's defaults (max_http_connections too): what a deploy meets.
    if name == "storm20k":
        overrides = {"max_connections": sum(case) + 100, "max_http_connections": sum(case) + 100}
    server = Server(kind, opts, overrides)
    try:
        if name == "fanout":
            r = fanout(pool, server, case[0], phase)
        elif name == "burst":
            r = fanout(pool, server, case[0], phase, burst=10)
        elif name == "latency":
            r = latency(pool, server, case[0], LATENCY_RATE_1K, 3 if q else 10, grace=10 if q else 15)
        elif name == "latency10k":
            r = latency(pool, server, case[0], LATENCY_RATE_10K, 3 if q else 6, grace=10 if q else 15)
        elif name == "memory":
            r = memory(pool, server, case[0])
        elif name == "lpfanout":
            r = longpoll_fanout(server, case[0], phase)
        elif name == "lpmemory":
            r = longpoll_memory(server, case[0])
        elif name == "publish":
            r = publish_api(pool, server, phase)
        elif name == "storm":
            r = storm(pool, server, case[0])
        elif name == "stormrails":
            r = storm(pool, server, case[0], rails=True)
        elif name == "storm20k":
            r = storm20k(pool, observer, server, case[0], case[1])
        elif name == "overload":
            r = overload(pool, server, case[0], 20, phase)
        else:
            raise ValueError(name)
    finally:
        server.stop()
    return "%s %s" % (name, "+".join(map(str, case)) if name == "storm20k" else " ".join(map(str, case))), r


def median_of(results):
    out = {}
    for key, by_kind in results.items():
        for kind, runs in by_kind.items():
            merged = {}
            for metric in runs[0]:
                vals = [r[metric] for r in runs]
                if all(isinstance(v, (int, float)) for v in vals):
                    # lost/errors: the worst run, not the median
                    worst = metric in ("lost", "errors", "readers_lost", "publish_errors")
                    merged[metric] = max(vals) if worst else statistics.median(vals)
                else:
                    merged[metric] = vals[-1]
            out.setdefault(key, {})[kind] = merged
    return out


def _fmt(r: dict) -> str:
    return ", ".join("%s=%s" % (k, ("%.3g" % v) if isinstance(v, float) else v) for k, v in r.items())


METRICS = {
    "fanout": [("us_per_msg", "CPU µs per delivered msg"), ("msgs_per_s", "delivered msgs/s"),
               ("lost", "lost"), ("loadgen_us_per_msg", "load generator µs per msg")],
    "burst": [("us_per_msg", "CPU µs per delivered msg (10 events per publish)"),
              ("msgs_per_s", "delivered msgs/s"), ("lost", "lost")],
    "latency": [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"),
                ("lost", "lost")],
    "latency10k": [("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("max_ms", "max ms"),
                   ("lost", "lost")],
    "memory": [("kb_per_socket", "KB per idle joined socket")],
    "lpfanout": [("us_per_msg", "CPU µs per delivered msg (long-poll)"), ("msgs_per_s", "delivered msgs/s"),
                 ("lost", "lost")],
    "lpmemory": [("kb_per_session", "KB per idle long-poll session (GET pending)")],
    "publish": [("req_per_s", "publish req/s (keep-alive, auth)"), ("us_per_req", "CPU µs per request"),
                ("errors", "errors")],
    "storm": [("seconds", "seconds until all joined (anonymous, public:storm)"), ("joined", "joined"),
              ("errors", "errors"), ("cpu_seconds", "server CPU seconds"), ("us_per_conn", "server CPU µs per joined connection")],
    "stormrails": [("seconds", "seconds until all joined (own Rails token each, deploys:web)"), ("joined", "joined"),
                   ("errors", "errors"), ("cpu_seconds", "server CPU seconds"),
                   ("us_per_conn", "server CPU µs per joined connection")],
    "storm20k": [("seconds", "seconds until the storm joined"), ("joined", "storm sockets joined"), ("errors", "errors"),
                 ("peak_rss_mb", "peak server RSS MB (50 ms polls)"),
                 ("us_per_conn", "server CPU µs per joined connection (with the 20/s fan-out)"),
                 ("p50_ms", "fan-out p50 ms to the first 1k"), ("p99_ms", "fan-out p99 ms to the first 1k"),
                 ("max_ms", "fan-out max ms to the first 1k"),
                 ("published", "events published during the storm (20/s scheduled, one connection)"),
                 ("lost", "lost by the first 1k"),
                 ("publish_errors", "publish errors")],
    "overload": [("readers_lost", "lost by readers"), ("stalled_dropped", "stalled sockets cut off by the server"),
                 ("rss_growth_mb", "server RSS growth MB")],
}


def table(results, servers) -> str:
    extra = [k for k in ("node", "before") if k in servers]
    rows = ["| scenario | figure | " + " | ".join(servers) + " | pusherd ÷ baseline | pusherd ÷ floor |"
            + "".join(" pusherd ÷ %s |" % k for k in extra),
            "|---|---|" + "---|" * len(servers) + "---|---|" + "---|" * len(extra)]
    for key, by_kind in results.items():
        name = key.split()[0]
        for metric, label in METRICS.get(name, []):
            vals = [by_kind.get(k, {}).get(metric) for k in servers]
            cells = [_cell(v) for v in vals]
            p = by_kind.get("pusherd", {}).get(metric)
            b = by_kind.get("baseline", {}).get(metric)
            f = by_kind.get("floor", {}).get(metric)
            row = "| %s | %s | %s | %s | %s |" % (key, label, " | ".join(cells), _ratio(p, b), _ratio(p, f))
            for k in extra:
                row += " %s |" % _ratio(p, by_kind.get(k, {}).get(metric))
            rows.append(row)
    return "\n".join(rows)


def _cell(v):
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if v == float("inf"):
            return "∞ (not delivered)"
        return "%.3g" % v if v < 1000 else "%.0f" % v
    return str(v)


def _ratio(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b or a != a or b != b:
        return ""
    if b == float("inf") or a == float("inf"):
        return ""
    return "%.2f×" % (a / b)


if __name__ == "__main__":
    main()

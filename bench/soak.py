"""Soak test (not in CI): thousands of sockets join, chat, leave and reconnect for N minutes while
a publisher posts to /publish; prints pusherd's RSS, connections and errors over time, and at the
end the RSS drift after warm-up (it should be flat).

    python bench/soak.py --sockets 3000 --minutes 5 --workers 2

Starts its own pusherd on a free loopback port (or use --url to soak a running one; RSS then
needs --pid). Every client follows phoenix.js habits: vsn 2.0.0 (a quarter on 1.0.0), a
heartbeat every 30 s, joins one to three topics (a token-protected one for a third of them),
pushes now and then, stays for a random lifetime, leaves and comes back.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GUARDIAN_SECRET = "soak-guardian-secret-0123456789abcdef"
PUBLISH_SECRET = "soak-publish-secret-0123456789abcdef"
TOPICS = 200


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def start_pusherd(sockets):
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    config = tmp / "pusher.yml"
    config.write_text(json.dumps({"soak": {
        "guardian_secret": GUARDIAN_SECRET, "publish_secret": PUBLISH_SECRET, "allowed_origins": ["*"],
        "max_connections": sockets * 2 + 100, "log_level": "warning", "access_log": False,
        "client_push_rate": 5, "client_push_burst": 10}}))
    log = open(tmp / "pusherd.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pusherd", "--config", str(config), "--env", "soak",
                             "--listen", "127.0.0.1:%d" % port], cwd=str(tmp), stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=1).read()
            return proc, "127.0.0.1:%d" % port, tmp
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("pusherd did not start; see %s" % (tmp / "pusherd.log"))


# --- one worker process: many sockets on one asyncio loop --------------------------------------

class Counters(dict):
    def add(self, key, n=1):
        self[key] = self.get(key, 0) + n


async def client_life(base, counters, token, stop_at, rng):
    import websockets
    from websockets.asyncio.client import connect
    v2 = rng.random() < 0.75
    url = "ws://%s/events/websocket?vsn=%s" % (base, "2.0.0" if v2 else "1.0.0")
    ref = 0

    def frame(join_ref, topic, event, payload):
        nonlocal ref
        ref += 1
        if v2:
            return json.dumps([join_ref, str(ref), topic, event, payload])
        return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": str(ref)})

    try:
        async with connect(url, open_timeout=20, ping_interval=None, max_size=None, compression=None) as ws:
            counters.add("connects")
            topics = ["public:soak%d" % rng.randrange(TOPICS) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.33:
                topics.append("private:soak%d" % rng.randrange(TOPICS))
            joined = {}
            for t in dict.fromkeys(topics):
                payload = {"guardian_token": token[0], "csrf_token": token[1]} if t.startswith("private:") else {}
                joined[t] = str(ref + 1)
                await ws.send(frame(joined[t], t, "phx_join", payload))
            lifetime = rng.uniform(5, 60)
            end = min(stop_at, time.monotonic() + lifetime)
            next_beat = time.monotonic() + 30
            next_push = time.monotonic() + rng.uniform(1, 10)
            while time.monotonic() < end:
                timeout = max(0.01, min(end, next_beat, next_push) - time.monotonic())
                try:
                    raw = await asyncio.wait_for(ws.recv(), timeout)
                except asyncio.TimeoutError:
                    raw = None
                if raw is not None:
                    msg = json.loads(raw)
                    event, payload = (msg[3], msg[4]) if v2 else (msg["event"], msg["payload"])
                    if event == "phx_reply":
                        if payload.get("status") != "ok":
                            counters.add("error_reply:%s" % payload.get("response", {}).get("reason"))
                        else:
                            counters.add("ok_replies")
                    elif event in ("chat", "news"):
                        counters.add("received")
                    elif event == "phx_close":
                        counters.add("phx_close")
                now = time.monotonic()
                if now >= next_beat:
                    await ws.send(frame(None, "phoenix", "heartbeat", {}))
                    next_beat = now + 30
                if now >= next_push:
                    t = rng.choice([t for t in joined if t.startswith("public:")] or list(joined))
                    await ws.send(frame(joined[t], t, "chat", {"body": "x" * rng.randint(10, 300)}))
                    counters.add("pushed")
                    next_push = now + rng.uniform(5, 30)
            for t, jr in joined.items():
                await ws.send(frame(jr, t, "phx_leave", {}))
            counters.add("leaves")
    except websockets.ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
        counters.add("closed_by_server:%s" % code)
    except (OSError, asyncio.TimeoutError, websockets.InvalidStatus, websockets.InvalidHandshake) as exc:
        counters.add("connect_error:%s" % type(exc).__name__)


async def worker_main(base, sockets, seconds, queue, seed):
    from pusherd.client import mint_token
    rng = random.Random(seed)
    token = (mint_token(GUARDIAN_SECRET, listen=["private:*"], csrf_token="soak-csrf", ttl=86400), "soak-csrf")
    counters = Counters()
    stop_at = time.monotonic() + seconds

    async def slot(i):
        await asyncio.sleep(rng.uniform(0, 10))  # ramp up
        while time.monotonic() < stop_at:
            await client_life(base, counters, token, stop_at, rng)
            await asyncio.sleep(rng.uniform(0, 2))

    async def report():
        while True:
            await asyncio.sleep(2)
            queue.put(dict(counters))
            counters.clear()

    reporter = asyncio.ensure_future(report())
    await asyncio.gather(*(slot(i) for i in range(sockets)))
    reporter.cancel()
    queue.put(dict(counters))


def worker(base, sockets, seconds, queue, seed):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile(sockets + 256)
    asyncio.run(worker_main(base, sockets, seconds, queue, seed))


# --- the publisher and the report -------------------------------------------------------------

def publish_batch(base, rng):
    batch = [{"topic": "public:soak%d" % rng.randrange(TOPICS), "event": "news", "payload": {"n": rng.random()}}
             for _ in range(rng.randint(1, 20))]
    batch.append({"topic": "private:soak%d" % rng.randrange(TOPICS), "event": "news", "payload": {}})
    req = urllib.request.Request("http://%s/publish" % base, data=json.dumps(batch).encode(), method="POST",
                                 headers={"Authorization": "Bearer " + PUBLISH_SECRET,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status


def connections(base):
    with urllib.request.urlopen("http://%s/healthz" % base, timeout=5) as resp:
        return json.loads(resp.read())["connections"]


def slope_mib_per_min(samples):
    """Least-squares slope of (seconds, KiB) samples, in MiB per minute."""
    n = len(samples)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in samples) / n
    my = sum(r for _, r in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    cov = sum((t - mx) * (r - my) for t, r in samples)
    return (cov / var) * 60 / 1024 if var else 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sockets", type=int, default=3000, help="concurrent client slots (default 3000)")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between report lines")
    p.add_argument("--warmup", type=float, default=0.3, help="share of the run treated as warm-up (default 0.3)")
    p.add_argument("--url", help="host:port of a running pusherd instead of starting one")
    p.add_argument("--pid", type=int, help="pid of that pusherd, for RSS")
    p.add_argument("--summary-json", metavar="FILE", help="also write the end figures to FILE as JSON")
    args = p.parse_args(argv)

    raise_nofile(args.sockets * 2 + 512)
    proc = None
    if args.url:
        base, pid = args.url, args.pid
    else:
        proc, base, tmp = start_pusherd(args.sockets)
        pid = proc.pid
        print("pusherd pid %d on %s (log %s)" % (pid, base, tmp / "pusherd.log"))
    seconds = args.minutes * 60
    queue = multiprocessing.Queue()
    per = -(-args.sockets // args.workers)
    procs = [multiprocessing.Process(target=worker, args=(base, per, seconds, queue, i), daemon=True)
             for i in range(args.workers)]
    for w in procs:
        w.start()
    totals = Counters()
    rng = random.Random(0)
    samples = []
    publishes = publish_errors = 0
    start = time.monotonic()
    next_report = start + args.interval
    print("%7s %9s %7s %9s %9s %9s %8s  %s" % ("t(s)", "RSS(MiB)", "conns", "connects", "received", "pushed",
                                              "pubs", "errors"))
    try:
        while any(w.is_alive() for w in procs) or not queue.empty():
            try:
                status = publish_batch(base, rng)
                publishes += 1
                if status != 200:
                    totals.add("publish_status:%d" % status)
            except OSError as exc:  # includes timeouts (10 s) and HTTP errors
                publishes += 1
                publish_errors += 1
                totals.add("publish_error:%s" % type(getattr(exc, "reason", exc)).__name__)
            while not queue.empty():
                for k, v in queue.get().items():
                    totals.add(k, v)
            now = time.monotonic()
            if now >= next_report:
                rss = rss_kib(pid) if pid else 0
                if now - start <= seconds:  # not once the clients are winding down
                    samples.append((now - start, rss))
                errors = {k: v for k, v in totals.items() if ":" in k and not k.startswith("closed_by_server:1001")}
                try:
                    conns = connections(base)
                except OSError:
                    conns = -1
                print("%7.0f %9.1f %7d %9d %9d %9d %8d  %s" % (
                    now - start, rss / 1024, conns, totals.get("connects", 0), totals.get("received", 0),
                    totals.get("pushed", 0), publishes, errors or "-"), flush=True)
                next_report = now + args.interval
            time.sleep(0.25)
    finally:
        for w in procs:
            w.join(5)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    warm = [(t, r) for t, r in samples if t >= seconds * args.warmup]
    print()
    print("totals: %s" % dict(sorted(totals.items())))
    print("publish requests: %d, failed: %d" % (publishes, publish_errors))
    summary = {"totals": dict(totals.items()), "publishes": publishes, "publish_errors": publish_errors,
               "samples": samples, "warm_samples": len(warm), "slope_mib_per_min": None}
    if warm:
        rss = [r / 1024 for _, r in warm]
        summary["slope_mib_per_min"] = slope_mib_per_min(warm)
        print("RSS after warm-up (%d samples): min %.1f MiB, max %.1f MiB, last %.1f MiB, slope %+.2f MiB/min"
              % (len(warm), min(rss), max(rss), rss[-1], summary["slope_mib_per_min"]))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

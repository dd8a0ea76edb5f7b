"""Lifecycle figures on loopback: how a SIGTERM drain spreads its 1001 closes over many
sockets, and what publishers see while pusherd restarts on a held listener (as under
pusherd.socket). Prints figures; asserts nothing.

    python bench/lifecycle.py [--sockets 2000] [--drain 2] [--publishers 8] [--restarts 3]
"""

import argparse
import asyncio
import collections
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from lifecycle_testing import ManagedPusherd, listening_socket  # noqa: E402

PUBLISH_SECRET = "bench-publish-secret-0123456789abcdef"


def write_config(path: Path, drain: float, max_connections: int) -> Path:
    path.write_text(yaml.safe_dump({"test": {
        "guardian_secret": "bench-guardian-secret-0123456789abcdef", "publish_secret": PUBLISH_SECRET,
        "drain_seconds": drain, "max_connections": max_connections, "log_level": "info",
        "access_log": False}}))
    return path


async def drain_figures(port: int, daemon: ManagedPusherd, sockets: int) -> dict:
    import websockets

    url = "ws://127.0.0.1:%d/events/websocket?vsn=2.0.0" % port
    conns = []
    for i in range(0, sockets, 200):
        conns += await asyncio.gather(*(websockets.connect(url, open_timeout=30, compression=None)
                                        for _ in range(min(200, sockets - i))))
    closed = []

    async def watch(ws):
        try:
            await ws.recv()
        except websockets.ConnectionClosed as exc:
            closed.append((time.monotonic(), exc.rcvd.code if exc.rcvd else None))

    watchers = [asyncio.ensure_future(watch(ws)) for ws in conns]
    began = time.monotonic()
    daemon.signal(signal.SIGTERM)
    await asyncio.wait(watchers, timeout=60)
    rc = await asyncio.get_running_loop().run_in_executor(None, daemon.wait, 60)
    exited = time.monotonic() - began
    ticks = collections.Counter(int((at - began) * 10) for at, _ in closed)
    per_tick = [ticks.get(t, 0) for t in range(max(ticks) + 1)] if ticks else []
    return {"sockets": sockets, "codes": dict(collections.Counter(code for _, code in closed)),
            "first_close_s": round(min(at for at, _ in closed) - began, 3),
            "last_close_s": round(max(at for at, _ in closed) - began, 3),
            "closes_per_100ms_max": max(per_tick), "closes_per_100ms_min": min(per_tick),
            "exit_s": round(exited, 3), "rc": rc}


async def publish_once(port: int) -> float:
    body = json.dumps({"topic": "public:bench", "event": "tick", "payload": {}}).encode()
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /publish HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + PUBLISH_SECRET.encode() + b"\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 30)
    writer.close()
    if not status.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(status)
    return time.monotonic() - began


async def restart_figures(port: int, config: Path, sock, first: ManagedPusherd, publishers: int,
                          restarts: int) -> dict:
    latencies, failures, stop = [], [], asyncio.Event()

    async def publisher():
        while not stop.is_set():
            try:
                latencies.append(await publish_once(port))
            except Exception as exc:  # noqa: BLE001 - counted
                failures.append(repr(exc))

    tasks = [asyncio.ensure_future(publisher()) for _ in range(publishers)]
    loop = asyncio.get_running_loop()
    current, gaps = first, []
    await asyncio.sleep(1)
    for _ in range(restarts):
        began = time.monotonic()
        current.signal(signal.SIGTERM)
        await loop.run_in_executor(None, current.wait, 30)
        current = ManagedPusherd(config, listeners=[sock])
        await loop.run_in_executor(None, current.start)
        gaps.append(time.monotonic() - began)
        await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*tasks)
    current.stop()
    lat = sorted(latencies)
    return {"publishers": publishers, "restarts": restarts, "ok": len(lat), "failed": len(failures),
            "failures": failures[:5], "latency_ms_p50": round(statistics.median(lat) * 1000, 1),
            "latency_ms_p99": round(lat[int(len(lat) * 0.99)] * 1000, 1),
            "latency_ms_max": round(lat[-1] * 1000, 1),
            "no_process_s_mean": round(statistics.mean(gaps), 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sockets", type=int, default=2000)
    ap.add_argument("--drain", type=float, default=2.0)
    ap.add_argument("--publishers", type=int, default=8)
    ap.add_argument("--restarts", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp) / "pusher.yml", args.drain, args.sockets + 100)
        sock = listening_socket(backlog=4096)
        port = sock.getsockname()[1]
        d = ManagedPusherd(config, listeners=[sock]).start()
        print("drain:", json.dumps(asyncio.run(drain_figures(port, d, args.sockets))))
        write_config(config, 0.5, 1000)
        d = ManagedPusherd(config, listeners=[sock]).start()
        print("restart under load:", json.dumps(asyncio.run(
            restart_figures(port, config, sock, d, args.publishers, args.restarts))))


if __name__ == "__main__":
    main()

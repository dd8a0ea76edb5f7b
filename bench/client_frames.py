"""Frames from clients: server CPU per frame a page sends (heartbeats, pushes), what the frame
reader (pusherd/fast/websocket.py, `_Protocol._receive_frame_loop`) is justified by.

    python bench/client_frames.py                               # this checkout
    python bench/client_frames.py --root /work/wt/before --root .   # side by side, alternating

One socket sends heartbeats in batches of 1,000 (one ``sendall`` each) and reads the replies of a
batch before sending the next; server pinned to CPU 0, this process to CPU 1. Each phoenix.js page
sends a heartbeat every 30 s, and pages of public messaging push: this is the cost per frame.
"""

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run  # noqa: E402  (bench/run.py: free_port, cpu_seconds)

BATCH = 1000


def masked_text_frame(text: str) -> bytes:
    data = text.encode()
    return bytes((0x81, 0x80 | len(data))) + b"\0\0\0\0" + data  # a zero mask key: the bytes as they are


def measure(root: str, frames: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="pusherd-client-frames-")
    path = os.path.join(tmp, "pusher.yml")
    with open(path, "w") as f:
        json.dump({"bench": {"guardian_secret": run.GSECRET, "publish_secret": run.PSECRET, "allowed_origins": ["*"],
                             "heartbeat_timeout": 3600, "log_level": "warning", "access_log": False}}, f)
    port = run.free_port()
    env = dict(os.environ, PYTHONPATH=root, PUSHERD_LOOP=os.environ.get("PUSHERD_LOOP", "uvloop"))
    proc = subprocess.Popen([sys.executable, "-m", "pusherd", "--config", path, "--env", "bench", "--listen",
                             "%s:%d" % (run.HOST, port)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(proc.pid, {cpus[0]})
        os.sched_setaffinity(0, set(cpus[1:]))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = socket.create_connection((run.HOST, port))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("pusherd did not start from %s" % root)
                time.sleep(0.05)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(("GET /events/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                      % (run.HOST, key)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101"), head[:80]
        batch = b"".join(masked_text_frame('[null,"%d","phoenix","heartbeat",{}]' % i) for i in range(BATCH))
        cpu0, t0 = run.cpu_seconds(proc.pid), time.monotonic()
        for _ in range(frames // BATCH):
            sock.sendall(batch)
            waiting, tail = BATCH, b""
            while waiting:
                data = tail + sock.recv(1 << 20)
                waiting -= data.count(b"phx_reply")
                tail = data[-16:]  # a reply cut between two reads is counted once
                waiting += tail.count(b"phx_reply")
        cpu, seconds = run.cpu_seconds(proc.pid) - cpu0, time.monotonic() - t0
        sock.close()
        return {"root": root, "frames": frames // BATCH * BATCH, "seconds": seconds,
                "us_per_frame": cpu / (frames // BATCH * BATCH) * 1e6}
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", action="append", help="a pusherd checkout (repeatable; default: this one)")
    ap.add_argument("--frames", type=int, default=200000)
    ap.add_argument("--repeat", type=int, default=2)
    opts = ap.parse_args(argv)
    roots = [os.path.abspath(r) for r in (opts.root or [str(HERE.parent)])]
    for _ in range(opts.repeat):
        for root in roots:
            r = measure(root, opts.frames)
            print("%s: %d heartbeats in %.2f s, server CPU %.1f µs per frame" % (r["root"], r["frames"], r["seconds"],
                                                                                r["us_per_frame"]), flush=True)


if __name__ == "__main__":
    main()

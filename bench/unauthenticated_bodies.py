"""RSS growth of a pusherd process while unauthenticated publishers announce large bodies.

    python bench/unauthenticated_bodies.py [--fast 0|1] [--connections 40] [--root DIR]

Each connection sends a POST /publish head with a wrong secret and Content-Length 1,000,000, then
trickles 950,000 bytes of body (never the rest). Prints pusherd's VmRSS before and with the
connections open, and how many got their 401 before the body. ``--root`` runs the pusherd package
found in DIR (e.g. an older checkout, to compare).
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAD = (b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")


def rss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", default="1", choices=("0", "1"), help="PUSHERD_FAST of the daemon")
    ap.add_argument("--connections", type=int, default=40)
    ap.add_argument("--root", default=str(ROOT), help="directory holding the pusherd package to run")
    opts = ap.parse_args()
    tmp = tempfile.mkdtemp()
    config = os.path.join(tmp, "pusher.yml")
    with open(config, "w") as fh:
        fh.write("test:\n  http_header_timeout: 120\n  http_body_timeout: 120\n  access_log: false\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=opts.root, PUSHERD_FAST=opts.fast)
    proc = subprocess.Popen([sys.executable, "-m", "pusherd", "--config", config, "--env", "test",
                             "--listen", "127.0.0.1:%d" % port], env=env, cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socks = []
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)
        before = rss_mib(proc.pid)
        for _ in range(opts.connections):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(HEAD)
            s.setblocking(False)
            socks.append(s)
        for _ in range(95):  # the body, 10,000 bytes at a time on every connection
            for s in socks:
                try:
                    s.send(b"x" * 10000)
                except OSError:
                    pass
            time.sleep(0.01)
        time.sleep(1.0)
        after = rss_mib(proc.pid)
        refused = 0
        for s in socks:
            s.setblocking(True)
            s.settimeout(0.2)
            try:
                refused += s.recv(100).startswith(b"HTTP/1.1 401")
            except OSError:
                pass
        print("PUSHERD_FAST=%s: RSS %.1f MiB before, %.1f MiB with %d connections (%+.1f MiB); "
              "401 before the body: %d of %d" % (opts.fast, before, after, len(socks), after - before, refused,
                                                 len(socks)))
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()

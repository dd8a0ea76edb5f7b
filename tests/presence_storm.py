"""A join storm with the real phoenix.js 1.8 (tests/interop/presence_storm.js): N sockets join one
topic, each keeps its presence list; the lists are compared with the server's (GET /presence).
Used by tests/interop/test_presence_storm.py and bench/presence_storm.py."""

import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

from pusherd.client import mint_token

INTEROP_DIR = Path(__file__).resolve().parent / "interop"
STORM_JS = INTEROP_DIR / "presence_storm.js"
ORIGIN = "http://localhost:3000"


def meta_digest(listing: Dict) -> str:
    """The digest presence_storm.js computes of a list: XOR over the metas of two FNV-1a 32-bit
    hashes of ``key "|" phx_ref`` (UTF-16 code units; keys and refs here are ASCII)."""
    lo = hi = 0
    for key, presence in listing.items():
        for meta in presence["metas"]:
            a, b = 0x811C9DC5, 0x01000193 ^ 0x5BD1E995
            for ch in key + "|" + meta["phx_ref"]:
                assert ord(ch) < 0x10000
                a = ((a ^ ord(ch)) * 0x01000193) & 0xFFFFFFFF
                b = ((b ^ ord(ch)) * 0x01000193) & 0xFFFFFFFF
            lo ^= a
            hi ^= b
    return "%08x%08x" % (hi, lo)


def run_storm(ws_url: str, topic: str, n: int, guardian_secret: str, presence: bool,
              server_list: Optional[Callable[[], Dict]] = None, rate: int = 1000, full: int = 20,
              timeout: float = 120.0, issuer: str = "od-web-test") -> dict:
    """Open `n` phoenix.js 1.8 sockets on `ws_url` (the mount point phoenix.js appends
    ``/websocket`` to) at `rate` a second, each joining `topic` as user i (a
    Rails-style token with ``sub: {id: i, name}``); return presence_storm.js's summary, plus
    ``server`` (the digest and size of `server_list()`, read while every socket is still joined)."""
    tokens = []
    for i in range(n):
        csrf = "csrf-%d" % i
        tokens.append([mint_token(guardian_secret, sub={"id": i, "name": "user %d" % i}, listen=[topic],
                                  ttl=3600, csrf_token=csrf, issuer=issuer), csrf])
    cfg = {"url": ws_url, "topic": topic,
           "origin": ORIGIN, "tokens": tokens, "presence": presence, "rate": rate, "full": min(full, n),
           "timeout_ms": int(timeout * 1000)}
    proc = subprocess.Popen([shutil.which("node") or "node", str(STORM_JS)], cwd=str(INTEROP_DIR),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(json.dumps(cfg) + "\n")
        proc.stdin.flush()
        answer = []
        reader = threading.Thread(target=lambda: answer.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout + 30)
        if not answer or not answer[0]:
            raise AssertionError("presence_storm.js gave no summary (exit %s)" % proc.poll())
        summary = json.loads(answer[0])
        if server_list is not None:
            listing = server_list()
            summary["server"] = {"digest": meta_digest(listing),
                                 "size": sum(len(p["metas"]) for p in listing.values())}
        proc.stdin.write("exit\n")
        proc.stdin.flush()
        proc.wait(15)
        return summary
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

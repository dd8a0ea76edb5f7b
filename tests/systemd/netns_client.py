"""Clients that run inside the PID 1 rig's network namespace (``nsenter -n``: the rig's
loopback, the host's files), started by tests/systemd/test_e2e_pid1.py.

    netns_client.py load URL SECRET STOPFILE THREADS   POST /publish in a loop until STOPFILE
        exists (at most 60 s), a fresh connection per request as the Rails publisher makes
        them; prints {"ok": n, "failed": n, "errors": [...]} at the end.
    netns_client.py ws URL TOPIC                       joins TOPIC (V2), prints one JSON line
        per step: {"joined": status}, {"event": name}, {"closed": code}; exits on close.
"""

import http.client
import json
import os
import sys
import threading
import time
from urllib.parse import urlsplit


def load(url: str, secret: str, stop_file: str, threads: int) -> None:
    parts = urlsplit(url)
    counts = {"ok": 0, "failed": 0, "errors": []}
    lock = threading.Lock()
    body = json.dumps({"topic": "public:load", "event": "tick", "payload": {}}).encode()
    deadline = time.monotonic() + 60

    def worker() -> None:
        while not os.path.exists(stop_file) and time.monotonic() < deadline:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
            try:
                conn.request("POST", "/publish", body=body, headers={
                    "Authorization": "Bearer " + secret, "Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                ok, error = resp.status == 200, "HTTP %d" % resp.status
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                ok, error = False, repr(exc)
            finally:
                conn.close()
            with lock:
                if ok:
                    counts["ok"] += 1
                else:
                    counts["failed"] += 1
                    counts["errors"].append(error)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    counts["errors"] = counts["errors"][:20]
    print(json.dumps(counts), flush=True)


def ws(url: str, topic: str) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(url + "/websocket?vsn=2.0.0", open_timeout=10) as sock:
        sock.send(json.dumps(["1", "1", topic, "phx_join", {}]))
        try:
            while True:
                join_ref, ref, _topic, event, payload = json.loads(sock.recv(timeout=60))
                if event == "phx_reply" and ref == "1":
                    print(json.dumps({"joined": payload["status"]}), flush=True)
                else:
                    print(json.dumps({"event": event}), flush=True)
        except ConnectionClosed as exc:
            print(json.dumps({"closed": exc.rcvd.code if exc.rcvd else None}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    elif sys.argv[1] == "ws":
        ws(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: netns_client.py load|ws ...")

"""Admission under a reconnect storm (issue 18), against a real pusherd over real sockets, on both
listener paths (the publisher front, PUSHERD_FAST=1, and Tornado's own HTTP server, PUSHERD_FAST=0):
a burst of upgrades far over ``max_http_connections`` all join (the listener stops accepting
instead of closing connections whose heads it has not read yet), and
``max_new_connections_per_second`` refuses what is over its token bucket with 503 + Retry-After: 1."""

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
import urllib.error
import urllib.request

import pytest

from pusherd_testing import free_port

pytestmark = pytest.mark.integration

PATHS = pytest.mark.parametrize("fast", ["1", "0"], ids=["front", "tornado"])
METRICS_TOKEN = "scrape-token-0123456789"


def start(pusherd_factory, fast, overrides=None, **kwargs):
    return pusherd_factory(overrides, extra_env={"PUSHERD_FAST": fast}, **kwargs)


def upgrade_head(port, path="/events/websocket?vsn=2.0.0"):
    key = base64.b64encode(os.urandom(16)).decode()
    return ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path, port, key)).encode()


def text_frame(text):
    data, mask = text.encode(), os.urandom(4)
    assert len(data) < 126
    return struct.pack("!BB", 0x81, 0x80 | len(data)) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def read_head(reader):
    """(status, headers, body bytes) of an HTTP answer (the body only with a Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ", 2)[1]), headers, body


async def upgrade_and_join(port, topic, results, i):
    """One client of the storm: connect, upgrade, join `topic`; its outcome in results[i]."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_head(port))
        status, _, _ = await read_head(reader)
        if status != 101:
            results[i] = "status %d" % status
            return
        writer.write(text_frame(json.dumps(["1", "1", topic, "phx_join", {}])))
        first, second = await reader.readexactly(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        reply = json.loads(await reader.readexactly(n))
        results[i] = "joined" if reply[3] == "phx_reply" and reply[4]["status"] == "ok" else repr(reply)
    except (OSError, asyncio.IncompleteReadError) as exc:
        results[i] = "%s: %s" % (type(exc).__name__, exc)
    finally:
        if writer is not None:
            results.setdefault("writers", []).append(writer)


def storm(port, n, topic="public:storm", timeout=60.0):
    """`n` clients connect, upgrade and join at once; returns the outcome of each."""
    async def run():
        results = {}
        await asyncio.wait_for(asyncio.gather(*(upgrade_and_join(port, topic, results, i) for i in range(n))),
                               timeout)
        for writer in results.pop("writers", []):
            writer.close()
        return [results[i] for i in range(n)]
    return asyncio.run(run())


async def try_upgrade(port, path):
    """(status, headers, JSON body or None) of one upgrade; the connection is closed after."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(upgrade_head(port, path))
        status, headers, body = await asyncio.wait_for(read_head(reader), 10)
        return status, headers, (json.loads(body) if body else None)
    finally:
        writer.close()


def upgrades(port, n, path="/events/websocket?vsn=2.0.0"):
    """`n` upgrades at once."""
    async def run():
        return await asyncio.gather(*(try_upgrade(port, path) for _ in range(n)))
    return asyncio.run(run())


@PATHS
def test_reconnect_storm_of_500_upgrades_all_join_with_max_http_connections_50(pusherd_factory, fast):
    """500 clients connect, upgrade and join at once against max_http_connections: 50. At the cap
    the connections whose upgrade head arrived but was not read yet are not closed (before: every
    newcomer closed the oldest of them, "connection lost before join"): the listener stops
    accepting, the rest wait in the listen queue, and every one of them joins."""
    d = start(pusherd_factory, fast, {"max_http_connections": 50})
    results = storm(d.port, 500)
    failed = [r for r in results if r != "joined"]
    assert not failed, "%d of 500 did not join, e.g. %s" % (len(failed), sorted(set(failed))[:5])
    assert "stopped accepting" in d.log(), "the storm never reached the cap: the test proves nothing"
    assert "waiting for a request to let new ones in" not in d.log(), d.log()  # nobody was closed
    assert not [l for l in d.lines if " ERROR " in l], d.log()


def read_status(sock):
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None  # closed without an answer
        data += chunk
    return int(data.split(b" ", 2)[1])


@PATHS
def test_at_the_cap_an_old_connection_whose_head_arrived_unread_is_not_closed(pusherd_factory, fast):
    """max_http_connections: 1. A connects and stays silent past the 1 s grace; then, while the
    daemon is stopped (SIGSTOP: its loop busy, as in a storm), B connects and A sends its upgrade
    head. When the daemon resumes it sees B first, at the cap: A is old enough to be closed, but
    its head waits unread on its socket, so it is kept (before: closed, "connection lost before
    join"); B waits in the listen queue until A has upgraded. Both get 101."""
    d = start(pusherd_factory, fast, {"max_http_connections": 1})
    a = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    time.sleep(1.5)  # past the grace: A would be closed if it had sent nothing
    d.send_signal(signal.SIGSTOP)
    try:
        b = socket.create_connection(("127.0.0.1", d.port), timeout=10)  # the kernel's listen queue
        b.sendall(upgrade_head(d.port))
        time.sleep(0.1)
        a.sendall(upgrade_head(d.port))
        time.sleep(0.1)
    finally:
        d.send_signal(signal.SIGCONT)
    try:
        assert read_status(a) == 101, "the connection whose head was unread was closed"
        assert read_status(b) == 101
    finally:
        a.close()
        b.close()
    assert "waiting for a request to let new ones in" not in d.log(), d.log()


def refused_rate_limited(answer):
    status, headers, body = answer
    return (status == 503 and headers.get("retry-after") == "1"
            and body == {"error": "connection rate limited"})


def scrape(metrics_listen):
    req = urllib.request.Request("http://%s/metrics" % metrics_listen,
                                 headers={"Authorization": "Bearer " + METRICS_TOKEN})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.read().decode()


@PATHS
def test_max_new_connections_per_second_refuses_over_the_bucket_with_503_retry_after(pusherd_factory, fast):
    """Rate 5: of 30 upgrades at once about 5 (the burst) open, the rest get 503 with Retry-After: 1
    and a JSON reason, counted in the metrics and logged once (not a line each); a second later
    the bucket has refilled and upgrades open again, on /events/websocket and the legacy /events."""
    metrics_port = free_port()
    port = free_port()
    while port == metrics_port:
        port = free_port()
    metrics = "127.0.0.1:%d" % metrics_port
    d = start(pusherd_factory, fast, {"max_new_connections_per_second": 5,
                                      "metrics": {"listen": metrics, "token": METRICS_TOKEN}}, port=port)
    answers = upgrades(d.port, 30)
    opened = [a for a in answers if a[0] == 101]
    refused = [a for a in answers if a[0] != 101]
    assert 5 <= len(opened) <= 7, [a[0] for a in answers]  # the burst, and what refilled meanwhile
    assert all(refused_rate_limited(a) for a in refused), refused[:3]
    assert refused_rate_limited(upgrades(d.port, 1, "/events?vsn=1.0.0")[0])  # the legacy path too, bucket empty
    time.sleep(1.2)
    again = upgrades(d.port, 6)
    assert 5 <= sum(a[0] == 101 for a in again) <= 6, [a[0] for a in again]
    time.sleep(1.2)
    assert upgrades(d.port, 1, "/events?vsn=1.0.0")[0][0] == 101
    text = scrape(metrics)
    line = [l for l in text.splitlines() if 'reason="connection_rate_limited"' in l]
    assert line and float(line[0].split()[-1]) == len(refused) + 1 + sum(a[0] != 101 for a in again), line
    storm_lines = [l for l in d.lines if "max_new_connections_per_second (5)" in l]
    assert storm_lines and len(storm_lines) <= 2 and "WARNING" in storm_lines[0], storm_lines
    assert not [l for l in d.lines if "access" in l.lower() and " 503 " in l], d.log()


@PATHS
def test_max_new_connections_per_second_also_bounds_long_poll_opens(pusherd_factory, fast):
    """A long-poll session open is a new connection: over the bucket it gets 503, Retry-After: 1,
    and the JSON body phoenix.js retries (status 500)."""
    d = start(pusherd_factory, fast, {"max_new_connections_per_second": 2})
    answers = []
    for _ in range(5):
        req = urllib.request.Request("http://127.0.0.1:%d/events/longpoll?vsn=2.0.0" % d.port)
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                answers.append((resp.status, None, json.loads(resp.read())))
        except urllib.error.HTTPError as exc:
            answers.append((exc.code, exc.headers.get("Retry-After"), json.loads(exc.read())))
    assert [a[0] for a in answers].count(200) in (2, 3), answers
    refused = [a for a in answers if a[0] != 200]
    assert refused and all(a[0] == 503 and a[1] == "1" and a[2].get("status") == 500 for a in refused), refused


def test_max_new_connections_per_second_reloads_on_sighup(pusherd_factory):
    """Off at start (every one of 20 upgrades opens); after a SIGHUP with rate 3, only the burst."""
    d = pusherd_factory()
    assert [a[0] for a in upgrades(d.port, 20)] == [101] * 20
    d.settings["max_new_connections_per_second"] = 3
    d.write_config(d.settings)
    d.send_signal(signal.SIGHUP)
    assert "max_new_connections_per_second" in d.wait_log("configuration reloaded")
    answers = upgrades(d.port, 20)
    assert 3 <= sum(a[0] == 101 for a in answers) <= 4, [a[0] for a in answers]
    assert all(refused_rate_limited(a) for a in answers if a[0] != 101)


def read_answer(sock, buf=b""):
    """(status, the bytes after the head) of the answer to an upgrade, from a blocking socket."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("closed before its answer: %r" % buf)
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return int(head.split(b" ", 2)[1]), rest


def read_reply(sock, buf):
    """The first server frame (unmasked, short) as JSON, reading after `buf`."""
    while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("closed before its reply")
        buf += chunk
    assert buf[1] & 0x7F < 126, buf
    return json.loads(buf[2:2 + buf[1]])


@PATHS
def test_upgrades_that_wait_for_their_batch_answer_early_frames_and_survive_early_closes(pusherd_factory, fast):
    """300 upgrade heads reach a stopped daemon (SIGSTOP: its loop busy, as in a storm), so that it
    finds them all at once and completes most in later batches (UPGRADES_PER_TURN on the front). A
    quarter send their join frame with their head, a quarter as soon as the daemon resumes, before
    they read their 101, a quarter close right after their
    head, the rest join after the 101. Each upgrade gets its 101, each join its reply, in that
    order; the ones that left disturb nobody and log no error. (What the front does with bytes
    that come while an upgrade waits: tests/unit/fast/test_front.py.)"""
    d = start(pusherd_factory, fast)
    join = text_frame(json.dumps(["1", "1", "public:batch", "phx_join", {}]))
    socks = []
    d.send_signal(signal.SIGSTOP)
    try:
        for i in range(300):
            sock = socket.create_connection(("127.0.0.1", d.port), timeout=20)
            sock.sendall(upgrade_head(d.port) + (join if i % 4 == 0 else b""))
            if i % 4 == 1:
                sock.close()
            socks.append(sock)
    finally:
        d.send_signal(signal.SIGCONT)
    try:
        for i in range(2, 300, 4):
            socks[i].sendall(join)
        for i, sock in enumerate(socks):
            if i % 4 == 1:
                continue
            status, rest = read_answer(sock)
            assert status == 101, (i, status)
            if i % 4 == 3:
                sock.sendall(join)
            reply = read_reply(sock, rest)
            assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", (i, reply)
    finally:
        for sock in socks:
            sock.close()
    assert not [line for line in d.lines if " ERROR " in line or "Traceback" in line], d.log()

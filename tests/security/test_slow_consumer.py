"""Slow consumers against a real pusherd: a socket that stops reading is closed and cannot grow the
daemon's memory; the sockets that read get every message (docs/security.md, "Slow consumers")."""

import json
import threading
import time

import pytest

from sec_helpers import OP_PING, OP_PONG, OP_TEXT, PUBLISH_SECRET, PhxClient, RawWS, rss_kib, still_serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MESSAGE_BYTES = 32 * 1024
PER_POST = 28            # 28 x 32 KiB per request, under max_publish_bytes (1 MiB)


class Reader(threading.Thread):
    """Reads every frame of one socket in the background and records the sequence numbers seen."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.client = PhxClient(url)
        assert self.client.join("public:firehose")[0] == "ok"
        self.seen = []
        self.error = None

    def run(self):
        try:
            while True:
                msg = self.client.recv(timeout=30)
                if msg["event"] == "n":
                    self.seen.append(msg["payload"]["i"])
                    if msg["payload"].get("last"):
                        return
        except Exception as exc:  # reported by the test
            self.error = exc


def stalled_socket(daemon):
    """Joins, then never reads again; a 4 KiB receive buffer so the server's writes back up fast."""
    ws = RawWS(daemon.port, rcvbuf=4096)
    ws.send_text('["1","1","public:firehose","phx_join",{}]')
    return ws


def connections(daemon):
    return daemon.request("GET", "/healthz")[1]["connections"]


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


def run_scenario(daemon, total_messages):
    readers = [Reader(daemon.ws_url) for _ in range(2)]
    stalled = stalled_socket(daemon)
    wait_until(lambda: connections(daemon) == 3, 5, "3 sockets")
    for r in readers:
        r.start()
    pid = daemon.proc.pid
    before = rss_kib(pid)
    peak = before
    step = max(1, total_messages // 16)
    for start in range(0, total_messages, step):
        # firehose in slices so that RSS can be sampled while the stalled socket would be filling up
        firehose_slice(daemon, start, min(total_messages, start + step), total_messages)
        peak = max(peak, rss_kib(pid))
    for r in readers:
        r.join(60)
    return readers, stalled, before, peak


def firehose_slice(daemon, start, stop, total):
    blob = "x" * (MESSAGE_BYTES - 64)
    i = start
    while i < stop:
        batch = []
        for j in range(i, min(stop, i + PER_POST)):
            payload = {"i": j, "blob": blob}
            if j == total - 1:
                payload["last"] = True
            batch.append({"topic": "public:firehose", "event": "n", "payload": payload})
        i += len(batch)
        status, body, _ = daemon.request("POST", "/publish", json.dumps(batch).encode(), {
            "Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": "application/json"}, timeout=30)
        assert status == 200, body


TOTAL = 2048  # 64 MiB through the topic


def test_stalled_reader_is_closed_and_memory_stays_bounded(pusherd_factory):
    d = pusherd_factory({"max_outbox_bytes": "256KiB", "slow_consumer_seconds": 600, "log_level": "info"})
    readers, stalled, before, peak = run_scenario(d, TOTAL)
    try:
        for r in readers:
            assert r.error is None, r.error
            assert r.seen == list(range(TOTAL))                    # every message, in order
        d.wait_log("closing slow consumer (outbox over 262144 bytes)")
        wait_until(lambda: connections(d) == 2, 10, "the stalled socket to be gone")
        growth_mib = (peak - before) / 1024
        print("slow consumer: RSS %.1f MiB -> peak %.1f MiB (+%.1f MiB) for %d MiB published"
              % (before / 1024, peak / 1024, growth_mib, TOTAL * MESSAGE_BYTES >> 20))
        # Without the bound the stalled socket alone would hold ~64 MiB (see the control test).
        assert growth_mib < 24, growth_mib
    finally:
        stalled.close()
        for r in readers:
            r.client.close()


def test_control_without_the_bound_memory_grows(pusherd_factory):
    """The same scenario with the limits lifted: proves the scenario would catch a missing bound."""
    d = pusherd_factory({"max_outbox_bytes": "1GiB", "slow_consumer_seconds": 600, "log_level": "info"})
    readers, stalled, before, peak = run_scenario(d, TOTAL)
    try:
        for r in readers:
            assert r.seen == list(range(TOTAL))
        growth_mib = (peak - before) / 1024
        print("control: RSS +%.1f MiB" % growth_mib)
        assert growth_mib > 40, growth_mib
        assert connections(d) == 3
    finally:
        stalled.close()
        for r in readers:
            r.client.close()


def test_writes_stalled_too_long_are_dropped(pusherd_factory):
    """The time bound: unsent data that does not drain for slow_consumer_seconds drops the socket."""
    d = pusherd_factory({"max_outbox_bytes": "64MiB", "slow_consumer_seconds": 1, "log_level": "info"})
    readers = [Reader(d.ws_url)]
    stalled = stalled_socket(d)
    try:
        wait_until(lambda: connections(d) == 2, 5, "2 sockets")
        readers[0].start()
        firehose_slice(d, 0, 256, 256)  # 8 MiB: more than the kernel buffers hold
        readers[0].join(30)
        assert readers[0].seen == list(range(256))
        d.wait_log("dropping slow consumer (writes stalled)", timeout=6)
        wait_until(lambda: connections(d) == 1, 5, "the stalled socket to be gone")
    finally:
        stalled.close()
        readers[0].client.close()


class PingingReader(threading.Thread):
    """A raw socket with a small receive window that pings while it reads a firehose, and checks
    every frame it gets: a frame written into the middle of another (a broadcast inside a pong,
    a pong inside a broadcast's tail) shows as a bad opcode or a payload that is not JSON."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.ws = RawWS(port, rcvbuf=4096, timeout=30)
        reply = self.ws.join("public:firehose")
        assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", reply
        self.seen, self.pings, self.pongs, self.error = [], [], [], None

    def run(self):
        try:
            frames = 0
            while True:
                op, data = self.ws.recv_frame()
                if op == OP_PONG:
                    self.pongs.append(data)
                    continue
                assert op == OP_TEXT, (op, data[:80])
                msg = json.loads(data)
                if msg[3] == "n":
                    self.seen.append(msg[4]["i"])
                    if msg[4].get("last"):
                        return
                frames += 1
                time.sleep(0.002)  # slower than the publisher: the server's send buffer fills up
                if frames % 3 == 0:
                    ping = b"p%d" % frames
                    self.pings.append(ping)
                    self.ws.send_frame(OP_PING, ping)
        except Exception as exc:  # reported by the test
            self.error = exc



def test_pings_from_slow_readers_during_a_firehose_never_split_a_frame(pusherd_factory):
    """Tornado writes the pongs, the fan-out writes the broadcasts straight to the sockets that
    have nothing pending. Readers slower than the publisher fill the server's send buffers, so
    writes come out short and sockets go from clean to backlogged and back; no frame may ever
    be written into another (mutation check: a fan-out that ignores its dirty register splits
    frames here within a few hundred messages)."""
    d = pusherd_factory({"max_outbox_bytes": "32MiB", "slow_consumer_seconds": 600})
    readers = [PingingReader(d.port) for _ in range(4)]
    for r in readers:
        r.start()
    total, step, blob = 1200, 1, "y" * (16 * 1024)
    for start in range(0, total, step):
        batch = [{"topic": "public:firehose", "event": "n",
                  "payload": {"i": j, "blob": blob, **({"last": True} if j == total - 1 else {})}}
                 for j in range(start, start + step)]
        status, body, _ = d.request("POST", "/publish", json.dumps(batch).encode(), {
            "Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": "application/json"}, timeout=30)
        assert status == 200, body
        # keep the backlog far under the bound: this is about framing, not about slow consumers
        wait_until(lambda: all(r.error or len(r.seen) >= start - 600 for r in readers), 30, "the readers")
    for r in readers:
        r.join(60)
    for r in readers:
        assert r.error is None, r.error
        assert r.seen == list(range(total))
        assert r.pongs, "no pong came back"
        it = iter(r.pings)
        assert all(pong in it for pong in r.pongs), "pongs out of order or unknown"  # a subsequence
        r.ws.close()
    assert still_serving(d)

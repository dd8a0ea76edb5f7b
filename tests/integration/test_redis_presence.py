"""Presence across pusherd processes on a real Redis (brokers/redis_presence.py), with Python
clients: lists shared, a drained process's members leaving at once (its goodbye, not the ttl),
a process frozen past the ttl listed again under a new id, GET /presence from a process with no
member of its own, and garbage in Redis's presence keys and channel changing nothing."""

import signal
import time

import pytest

from presence_testing import Page
from pusherd_testing import PUBLISH_SECRET
from redis_topologies import redis_sentinel  # noqa: F401

pytestmark = pytest.mark.integration

PRESENCE = [{"topics": "private:*", "key": "id", "meta": ["name"]}]
AUTH = {"Authorization": "Bearer " + PUBLISH_SECRET}


def test_a_drained_process_s_members_leave_at_once_and_rails_reads_any_process(redis_server, pusherd_factory):
    cfg = {"broker": redis_server.url, "presence": PRESENCE, "presence_ttl": "60s", "drain_seconds": 0.2}
    a, b, c = pusherd_factory(cfg), pusherd_factory(cfg), pusherd_factory(cfg)
    on_a = Page(a, "private:ops", {"id": 1, "name": "A"})
    on_b = Page(b, "private:ops", {"id": 2, "name": "B"})
    for page in (on_a, on_b):
        page.wait({"1": 1, "2": 1})
    # C has nobody on the topic: it answers Rails from Redis.
    status, body, _ = c.request("GET", "/presence?topic=private:ops", headers=AUTH)
    assert status == 200 and sorted(body) == ["1", "2"]
    stopped = time.monotonic()
    assert b.stop() == 0
    on_a.wait({"1": 1}, timeout=5)          # long before the 60 s ttl: B said goodbye
    assert time.monotonic() - stopped < 10
    status, body, _ = c.request("GET", "/presence?topic=private:ops", headers=AUTH)
    assert status == 200 and sorted(body) == ["1"]
    keys = sorted(k.decode() for k in redis_server.client().keys("{pusherd:presence}:*"))
    assert [k for k in keys if k.startswith("{pusherd:presence}:n:")].__len__() == 1, keys   # only A's counts


def test_a_process_frozen_past_the_ttl_is_dropped_then_listed_again_under_a_new_id(redis_server, pusherd_factory):
    cfg = {"broker": redis_server.url, "presence": PRESENCE, "presence_ttl": "2s", "heartbeat_timeout": 600}
    a, b = pusherd_factory(cfg), pusherd_factory(cfg)
    on_a = Page(a, "private:ops", {"id": 1, "name": "A"})
    on_b = Page(b, "private:ops", {"id": 2, "name": "B"})
    on_a.wait({"1": 1, "2": 1})
    b.send_signal(signal.SIGSTOP)
    try:
        on_a.wait({"1": 1}, timeout=2 * 4 / 3 + 4)
    finally:
        b.send_signal(signal.SIGCONT)
    b.wait_log("was given up for dead", timeout=10)
    on_a.wait({"1": 1, "2": 1}, timeout=10)
    on_b.wait({"1": 1, "2": 1}, timeout=10)
    # and its member's leave is heard under the new id
    on_b.close()
    on_a.wait({"1": 1}, timeout=5)


def test_garbage_in_redis_presence_keys_and_channel_changes_nothing(redis_server, pusherd_factory):
    cfg = {"broker": redis_server.url, "presence": PRESENCE}
    a, b = pusherd_factory(cfg), pusherd_factory(cfg)
    r = redis_server.client()
    r.hset("{pusherd:presence}:t:private:ops", mapping={
        "nodeX|ref1": "not json", "nodeX|ref2": '{"v":1,"key":"__proto__","meta":{"phx_ref":"ref2"}}',
        "nodeX|ref3": '{"v":1,"key":"k","meta":{"phx_ref":"other"}}', "bad": '{"v":1}',
        "nodeX|ref4": '{"v":1,"key":"k","meta":{"phx_ref":"ref4","x":{"nested":1}}}'})
    for garbage in (b"\xff", b"[]", b'{"v":1}', b'{"v":1,"n":"x","t":"private:ops","d":{"joins":{"k":{"metas":'
                    b'[{"phx_ref":"r","x":[1]}]}},"leaves":5}}', b'{"v":1,"dead":5}', b'{"v":2,"dead":"x"}'):
        r.publish("{pusherd:presence}:diffs", garbage)
    on_a = Page(a, "private:ops", {"id": 1, "name": "A"})
    on_b = Page(b, "private:ops", {"id": 2, "name": "B"})
    for page in (on_a, on_b):
        page.wait({"1": 1, "2": 1})
    r.publish("{pusherd:presence}:diffs", b'{"v":1,"n":"intruder","t":"private:ops","d":{"joins":'
              b'{"constructor":{"metas":[{"phx_ref":"p"}]},"toString":{"metas":[{"phx_ref":"q"}]}},"leaves":{}}}')
    time.sleep(0.3)
    for page in (on_a, on_b):
        page.wait({"1": 1, "2": 1})
    assert a.request("GET", "/healthz")[0] == 200 and b.request("GET", "/healthz")[0] == 200
    a.wait_log("dropped 1 unreadable message(s)")


def test_presence_on_sentinel_follows_a_failover(redis_sentinel, pusherd_factory):
    """Two processes on a Sentinel URL list each other; the master is SIGKILLed: once the replica
    is promoted, both move to it by themselves, write their entries there, and a join after the
    failover reaches the other process's page. Nobody who stayed left a list."""
    cfg = {"broker": redis_sentinel.url, "presence": PRESENCE, "presence_ttl": "3s"}
    a, b = pusherd_factory(cfg), pusherd_factory(cfg)
    on_a = Page(a, "private:ops", {"id": 1, "name": "A"})
    on_b = Page(b, "private:ops", {"id": 2, "name": "B"})
    for page in (on_a, on_b):
        page.wait({"1": 1, "2": 1})
    marks = {p: len(p.frames) for p in (on_a, on_b)}
    old = redis_sentinel.master_port()
    redis_sentinel.master().kill()
    redis_sentinel.wait_promoted(old)
    late = Page(b, "private:ops", {"id": 3, "name": "Late"})
    for page in (on_a, on_b, late):
        page.wait({"1": 1, "2": 1, "3": 1}, timeout=20)
    for page, mark in marks.items():
        for frame in page.frames[mark:]:
            if frame["event"] == "presence_diff":
                assert set(frame["payload"]["leaves"]) == set(), frame
    # The promoted master holds both processes' entries.
    status, body, _ = a.request("GET", "/presence?topic=private:ops", headers=AUTH)
    assert status == 200 and sorted(body) == ["1", "2", "3"]


def test_presence_is_refused_at_start_on_a_redis_cluster(tmp_path):
    import subprocess
    import sys
    import yaml
    from pusherd_testing import BASE_CONFIG, ROOT
    config = tmp_path / "pusher.yml"
    config.write_text(yaml.safe_dump({"test": dict(BASE_CONFIG, broker="redis+cluster://127.0.0.1:1",
                                                   presence=PRESENCE)}))
    done = subprocess.run([sys.executable, "-m", "pusherd", "--config", str(config), "--env", "test",
                           "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=30,
                          env=dict(__import__("os").environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "presence: not available with a redis+cluster:// broker" in done.stderr

"""Failovers end to end: two pusherd processes on Redis behind Sentinel, and on a Redis Cluster,
the real phoenix.js (1.8 on one process, 1.2 on the other), a publisher posting in a loop, and
the master killed with SIGKILL (tests/redis_topologies.py starts every server on loopback).

What is checked: every event answered 200 reaches both browsers, in order, once, and more than
once only if the publisher retried it after a 503; /healthz says 503 during the switch; the
browsers' sockets are never closed; delivery resumes by itself (each wait is bounded by 15 s
after the promotion).
"""

import time

import pytest

from pusherd_testing import rails_token
from redis_topologies import _client, redis_cluster, redis_sentinel  # noqa: F401

pytestmark = pytest.mark.interop

ORIGIN = "http://localhost:3000"
FAST = dict(heartbeatIntervalMs=1000, reconnectAfterMs=100, rejoinAfterMs=100, timeout=3000)
RESUME_BOUND = 15.0      # seconds after the promotion (docs/scaling.md: 2-3 s measured)


def config(url):
    return {"broker": url, "history": [{"topics": "deploys:*", "size": 1000, "ttl": 3600}]}


def joined(client, daemon, version, topics):
    token, csrf = rails_token(listen=["deploys:*"])
    client.connect(daemon.ws_url, origin=ORIGIN, version=version, **FAST)
    client.expect(type="open")
    for i, topic in enumerate(topics):
        client.join("j%d" % i, topic, {"guardian_token": token, "csrf_token": csrf})
        assert client.expect(type="join", id="j%d" % i)["status"] == "ok"


def publish_until_200(daemons, topic, n, attempts, health, deadline):
    """POST {"n": n} until a 200 (alternating between the processes); 503s are retried. Records
    the tries in `attempts` and every /healthz status seen after a 503 in `health`."""
    while True:
        attempts[n] = attempts.get(n, 0) + 1
        daemon = daemons[(n + attempts[n]) % len(daemons)]
        status, body = daemon.publish(topic, "e", {"n": n})
        if status == 200:
            return
        assert status == 503, (status, body)
        health.add(daemon.request("GET", "/healthz", timeout=3)[0])
        assert time.monotonic() < deadline, "no 200 again before the deadline"
        time.sleep(0.05)


def received(client, topic_id):
    return [e["payload"]["n"] for e in client.events(id=topic_id)]


def wait_all(client, topic_id, attempts, timeout):
    deadline = time.monotonic() + timeout
    while not set(attempts) <= set(received(client, topic_id)):
        assert time.monotonic() < deadline, "missing %r" % sorted(set(attempts) - set(received(client, topic_id)))
        time.sleep(0.05)


def assert_each_once_in_order(got, attempts, who):
    assert list(dict.fromkeys(got)) == sorted(attempts), (who, got)
    for n in set(got):
        assert got.count(n) == 1 or got.count(n) <= attempts[n], (who, n, got.count(n), attempts[n])


def assert_never_closed(client):
    assert [l for l in client.lines if l.get("type") == "transport_connect"].__len__() == 1, client.transcript()
    assert not [l for l in client.lines if l.get("type") == "close"], client.transcript()


def test_sentinel_failover_under_publishing_reaches_both_browsers(redis_sentinel, pusherd_factory, phx):
    setup = redis_sentinel
    a, b = pusherd_factory(config(setup.url)), pusherd_factory(config(setup.url))
    on_a, on_b = phx("1.8"), phx("1.2")
    joined(on_a, a, "1.8", ["deploys:web"])
    joined(on_b, b, "1.2", ["deploys:web"])
    attempts, health = {}, set()
    deadline = time.monotonic() + 60
    for n in range(120):
        if n == 30:
            old = setup.master_port()
            setup.master().kill()
        publish_until_200([a, b], "deploys:web", n, attempts, health, deadline)
        time.sleep(0.01)
    setup.wait_promoted(old)
    for c in (on_a, on_b):
        wait_all(c, "j0", attempts, RESUME_BOUND)
    time.sleep(0.3)
    assert sum(attempts.values()) > len(attempts), "no publish was refused: the failover went unnoticed"
    assert 503 in health, "/healthz never said the broker was unavailable"
    for who, c in (("1.8 on a", on_a), ("1.2 on b", on_b)):
        assert_each_once_in_order(received(c, "j0"), attempts, who)
        assert_never_closed(c)
    for d in (a, b):
        assert d.request("GET", "/healthz")[0] == 200
        assert "the master is now 127.0.0.1:" in d.log()


def test_cluster_topics_on_every_shard_and_a_shard_failover(redis_cluster, pusherd_factory, phx):
    setup = redis_cluster
    from pusherd.brokers.redis import RedisBroker
    naming = RedisBroker(setup.url)            # not started: only its channel names
    masters = setup.master_ports()
    topics, owners = [], []
    for i in range(200):                       # one history topic per shard
        topic = "deploys:app%d" % i
        owner = setup.owner_port(naming.channel(topic))
        if owner not in owners:
            topics.append(topic)
            owners.append(owner)
    assert sorted(owners) == sorted(masters)
    a, b = pusherd_factory(config(setup.url)), pusherd_factory(config(setup.url))
    on_a, on_b = phx("1.8"), phx("1.2")
    joined(on_a, a, "1.8", topics)
    joined(on_b, b, "1.2", topics)
    # Each topic is subscribed by both processes on the master owning it, and nowhere else.
    for topic, owner in zip(topics, owners):
        channel = naming.channel(topic)
        counts = {p: int(_client(p).execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]) for p in masters}
        assert counts == {p: 2 if p == owner else 0 for p in masters}, (topic, counts)
    # Across the two processes, on every shard.
    for i, topic in enumerate(topics):
        assert (a, b)[i % 2].publish(topic, "e", {"n": -1})[0] == 200
    for c in (on_a, on_b):
        for i in range(len(topics)):
            assert c.expect(type="event", id="j%d" % i)["payload"] == {"n": -1}
    # The first topic's master dies (it has a replica) while the publisher posts on it.
    attempts, health = {}, set()
    deadline = time.monotonic() + 60
    victim = owners[0]
    for n in range(120):
        if n == 30:
            setup.server(victim).kill()
        publish_until_200([a, b], topics[0], n, attempts, health, deadline)
        time.sleep(0.01)
    setup.wait_failover(victim)
    for c in (on_a, on_b):
        wait_all(c, "j0", attempts, RESUME_BOUND)
    time.sleep(0.3)
    assert sum(attempts.values()) > len(attempts), "no publish was refused: the failover went unnoticed"
    assert 503 in health
    for who, c in (("1.8 on a", on_a), ("1.2 on b", on_b)):
        assert_each_once_in_order([n for n in received(c, "j0") if n >= 0], attempts, who)
        assert_never_closed(c)
    # The other shards' topics still deliver, and so does the promoted one.
    for i, topic in enumerate(topics):
        assert b.publish(topic, "e", {"n": 1000 + i})[0] == 200
    for c in (on_a, on_b):
        for i in range(len(topics)):
            c.expect(type="event", id="j%d" % i, payload={"n": 1000 + i}, timeout=RESUME_BOUND)

"""Hostile clients against history and the brokers, on a real pusherd: each test runs on the memory
broker and on Redis, with the fast paths on and off (PUSHERD_FAST=1/0). Rows of docs/security.md,
table "History and brokers" (issue 13, items 4 and 6).

What the server holds is read from outside: the ``pusherd_history_*`` metrics (memory broker) or
the keys in Redis.
"""

import json
import time

import pytest

from sec_helpers import PUBLISH_SECRET, PhxClient, still_serving
from pusherd_testing import free_port

prometheus_parser = pytest.importorskip("prometheus_client.parser")  # a test extra: always there in CI

pytestmark = pytest.mark.integration

PUBLIC_HISTORY = {"history": [{"topics": "public:*", "size": 10, "ttl": 3600}], "max_recovery": 50}
SURROGATE_BODY = b'{"topic":"%s","event":"e","payload":{"s":"\\ud800","\\udfff":"x"}}'


@pytest.fixture(params=[("memory", "1"), ("memory", "0"), ("redis", "1"), ("redis", "0")],
                ids=["memory-fast", "memory-plain", "redis-fast", "redis-plain"])
def start(request, pusherd_factory):
    """``start(**config)``: a pusherd with metrics on the parametrized broker and fast path."""
    broker, fast = request.param

    def make(**config):
        # client_events "*": these attacks push whatever event names clients send
        overrides = dict(config, metrics={"listen": "127.0.0.1:%d" % free_port()}, client_events=["*"])
        redis = None
        if broker == "redis":
            redis = request.getfixturevalue("redis_server")
            overrides.setdefault("broker", redis.url)
        d = pusherd_factory(overrides, extra_env={"PUSHERD_FAST": fast})
        d.metrics_url = "http://%s/metrics" % overrides["metrics"]["listen"]
        d.redis = redis
        return d
    return make


def scrape(daemon):
    import urllib.request
    with urllib.request.urlopen(daemon.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def evictions(daemon, limit):
    return scrape(daemon).get(("pusherd_history_evictions_total", frozenset({("limit", limit)})), 0.0)


def held(daemon):
    """(topics, approximate bytes) of history the server holds."""
    if daemon.redis is None:
        samples = scrape(daemon)
        return (int(samples[("pusherd_history_streams", frozenset())]),
                int(samples[("pusherd_history_bytes", frozenset())]))
    client = daemon.redis.client()
    topics = {k.split(b":", 2)[2] for k in client.keys("pusherd:h:*") + client.keys("pusherd:hm:*")}
    return len(topics), int(client.hget("pusherd:history:info", "bytes") or 0)


def post(daemon, body: bytes):
    status, parsed, _ = daemon.request("POST", "/publish", body, {
        "Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": "application/json"})
    return status, parsed


def assert_quiet_log(daemon):
    log = daemon.log()
    for bad in ("Traceback", "publish failed", "history lookup failed", "background task failed"):
        assert bad not in log, log


# -- item 4: history memory is bounded whatever clients do ------------------------------------

def test_since_join_flood_on_fresh_topics_creates_no_history(start):
    """One anonymous socket, 400 joins with `since` on fresh public:* topics (history rule on
    public:*), each left again: nothing is kept (before: a stream, or two Redis keys, per topic)."""
    d = start(**PUBLIC_HISTORY)
    c = PhxClient(d.ws_url)
    try:
        for i in range(400):
            topic = "public:flood-%d" % i
            status, response, ref = c.join(topic, {"since": "deadbeef:%d" % i})
            assert status == "ok" and response["recovered"] is False
            assert response["position"].startswith("n") and response["position"].endswith(":0")
            c.send(ref, c.next_ref(), topic, "phx_leave", {})
        c.join("public:flood-last", {"since": "deadbeef:1"})
        assert held(d) == (0, 0)
    finally:
        c.close()
    still_serving(d)
    assert_quiet_log(d)


def test_anonymous_pushes_on_a_public_history_topic_are_not_kept(start):
    """Pushes from anonymous sockets on a public:* history topic are delivered, without a
    position, and not kept (before: held for the full ttl, a stream per topic pushed to)."""
    d = start(**PUBLIC_HISTORY)
    a, b = PhxClient(d.ws_url), PhxClient(d.ws_url)
    try:
        for c in (a, b):
            assert c.join("public:room")[0] == "ok"
        for i in range(10):
            assert a.push("public:room", "chat", {"i": i}) == ("ok", {})
        got = [b.expect(event="chat") for _ in range(10)]
        assert [(m["payload"]["i"], m["ref"]) for m in got] == [(i, None) for i in range(10)]
        assert held(d)[0] == 0
        # The same topic keeps what the server publishes.
        status, body = d.publish("public:room", "news", {})
        assert status == 200 and body["position"].endswith(":1")
        assert held(d)[0] == 1
    finally:
        a.close()
        b.close()
    assert_quiet_log(d)


def test_push_flood_on_fresh_topics_is_bounded_by_max_history_topics(start):
    """With ``client_pushes: true`` on public:*, an anonymous socket pushing on 40 fresh topics
    leaves at most max_history_topics histories; the oldest are evicted and counted."""
    d = start(history=[{"topics": "public:*", "size": 10, "ttl": 3600, "client_pushes": True}],
              max_history_topics=5, client_push_rate=1000, client_push_burst=1000)
    c = PhxClient(d.ws_url)
    try:
        for i in range(40):
            topic = "public:t%d" % i
            status, _, ref = c.join(topic)
            assert status == "ok"
            assert c.push(topic, "e", {"i": i}, join_ref=ref) == ("ok", {})
            c.send(ref, c.next_ref(), topic, "phx_leave", {})
            time.sleep(0.002)       # distinct publish times (Redis orders by milliseconds)
        assert held(d)[0] == 5
        assert evictions(d, "max_history_topics") == 35
        if d.redis is not None:
            assert sorted(d.redis.client().zrange("pusherd:history:topics", 0, -1)) == \
                sorted(b"public:t%d" % i for i in range(35, 40))
    finally:
        c.close()
    still_serving(d)


def test_big_pushes_are_bounded_by_max_history_bytes(start):
    """8 KB pushes on fresh topics under ``max_history_bytes: 32KiB``: the history held stays
    under the bound, the oldest topics are evicted and counted."""
    d = start(history=[{"topics": "public:*", "size": 10, "ttl": 3600, "client_pushes": True}],
              max_history_bytes="32KiB", client_push_rate=1000, client_push_burst=1000)
    c = PhxClient(d.ws_url)
    try:
        for i in range(20):
            topic = "public:big%d" % i
            status, _, ref = c.join(topic)
            assert c.push(topic, "e", {"pad": "x" * 8000}, join_ref=ref) == ("ok", {})
            c.send(ref, c.next_ref(), topic, "phx_leave", {})
            time.sleep(0.002)
        topics, size = held(d)
        assert 0 < size <= 32 * 1024 and 1 <= topics <= 4
        assert evictions(d, "max_history_bytes") == 20 - topics
    finally:
        c.close()
    still_serving(d)


# -- item 6: the Redis broker accepts what the memory broker accepts ----------------------------

def test_lone_surrogate_payload_in_a_publish_a_batch_and_a_push(start):
    """A payload with a lone surrogate escape: a 200 for a publish and for the batch [ok, it],
    an ok reply for a client push, and delivered escaped to subscribers, on both brokers
    (Redis before: 500, the batch's first item delivered before the 500, the push unanswered
    with a traceback in the log)."""
    d = start(history=[{"topics": "public:hist", "size": 10, "ttl": 3600}])
    sub, pusher = PhxClient(d.ws_url), PhxClient(d.ws_url)
    try:
        for topic in ("public:s", "public:hist"):
            assert sub.join(topic)[0] == "ok"
        assert pusher.join("public:s")[0] == "ok"
        assert post(d, SURROGATE_BODY % b"public:s") == (200, {"status": "ok", "published": 1})
        batch = b'[{"topic":"public:s","event":"ok","payload":{"n":1}},' + SURROGATE_BODY % b"public:hist" + b"]"
        status, body = post(d, batch)
        assert status == 200 and body["published"] == 2 and body["positions"][0] is None
        assert pusher.push("public:s", "e", {"s": "\ud800"}) == ("ok", {})
        raws = [sub.ws.recv(timeout=5) for _ in range(4)]
        for raw in raws:
            raw.encode("utf-8")                      # valid UTF-8 on the wire
        got = [json.loads(raw) for raw in raws]
        assert [(m[2], m[3], m[4]) for m in got] == [
            ("public:s", "e", {"s": "\ud800", "\udfff": "x"}), ("public:s", "ok", {"n": 1}),
            ("public:hist", "e", {"s": "\ud800", "\udfff": "x"}), ("public:s", "e", {"s": "\ud800"})]
        assert got[2][1] == body["positions"][1]
        # ... and a rejoin with `since` replays it.
        epoch = body["positions"][1].rsplit(":", 1)[0]
        late = PhxClient(d.ws_url)
        try:
            status, response, _ = late.join("public:hist", {"since": epoch + ":0"})
            assert status == "ok" and response == {"recovered": True, "position": body["positions"][1]}
            assert late.expect(event="e")["payload"] == {"s": "\ud800", "\udfff": "x"}
        finally:
            late.close()
    finally:
        sub.close()
        pusher.close()
    assert_quiet_log(d)


@pytest.mark.parametrize("since", ["\ud800:1", "x\udfff:0", "n\ud800:0", "ab:\u00b2", "ab:\u0661\u0662"])
def test_since_with_a_lone_surrogate_or_unicode_digits(start, since):
    """`since` with a lone surrogate in its epoch (which reached redis-py's encoder) or non-ASCII
    digits (which int() refused): answered recovered false with the current position, the same
    on both brokers, nothing logged."""
    d = start(history=[{"topics": "public:*", "size": 10, "ttl": 3600}])
    status, body = d.publish("public:pos", "e", {})
    assert status == 200
    c = PhxClient(d.ws_url)
    try:
        status, response, _ = c.join("public:pos", {"since": since})
        assert (status, response) == ("ok", {"recovered": False, "position": body["position"]})
        status, response, _ = c.join("public:nothing-here", {"since": since})
        assert status == "ok" and response["recovered"] is False and response["position"].endswith(":0")
    finally:
        c.close()
    assert held(d)[0] == 1
    still_serving(d)
    assert_quiet_log(d)


@pytest.mark.parametrize("fast", ["1", "0"], ids=["redis-fast", "redis-plain"])
def test_a_batch_redis_refuses_in_part_publishes_nothing(redis_server, pusherd_factory, fast):
    """The batch [allowed topic, topic an ACL refuses] on Redis: 503 and nothing delivered (before:
    the first item was delivered, then 500, and a retrying publisher duplicated it). The memory
    broker has nothing that can refuse part of a batch."""
    # The user may use the channels of public:ok and pusherd's own (the long-poll relay's), no other.
    redis_server.client().execute_command("ACL", "SETUSER", "pub", "on", ">pw", "~*", "resetchannels",
                                          "&pusherd:t:public:ok*", "&pusherd:t:?longpoll:*", "+@all")
    d = pusherd_factory({"broker": "redis://pub:pw@127.0.0.1:%d/0" % redis_server.port},
                        extra_env={"PUSHERD_FAST": fast})
    c = PhxClient(d.ws_url)
    try:
        assert c.join("public:ok")[0] == "ok"
        status, body = post(d, b'[{"topic":"public:ok","event":"first","payload":{}},'
                               b'{"topic":"public:denied","event":"second","payload":{}}]')
        assert status == 503 and "0 of 2 events published" in body["error"]
        status, _ = d.publish("public:ok", "after", {})
        assert status == 200
        assert c.recv()["event"] == "after"           # "first" never came
    finally:
        c.close()
    assert "pw@" not in d.log()

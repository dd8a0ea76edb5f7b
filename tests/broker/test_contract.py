"""One contract, every broker (phoenix_pubsub's shared suite): memory and Redis must agree,
and Redis alike on a single server, behind Sentinel (a master, a replica, three sentinels) and
on a three-master Redis Cluster (sharded pub/sub).

A Node is one pusherd process's view of the broker. Redis runs against real redis-servers.
"""

import asyncio
import time

import pytest

from brokerkit import Node, redis_py, run
from pusherd.core.broadcast import Broadcast
from pusherd.brokers.memory import MemoryBroker
from pusherd.core.errors import BrokerUnavailable
from redis_topologies import _shared_cluster, _shared_sentinel, redis_cluster_clean, redis_sentinel_clean  # noqa: F401

SETUPS = ["memory", "redis", "sentinel", "cluster"]


def redis_url(request, kind):
    """The broker URL of a clean Redis of that kind (the cluster and Sentinel setups are shared
    by the module's tests and flushed before each)."""
    redis_py()
    fixture = {"redis": "redis_server", "sentinel": "redis_sentinel_clean", "cluster": "redis_cluster_clean"}[kind]
    return request.getfixturevalue(fixture).url


@pytest.fixture(params=SETUPS)
def make_broker(request):
    """Builds an unstarted broker of the parametrized kind."""
    if request.param == "memory":
        return MemoryBroker
    url = redis_url(request, request.param)
    from pusherd.brokers.redis import RedisBroker
    return lambda: RedisBroker(url, prefix="contract")


def test_publisher_process_receives_its_own_publish(make_broker):
    async def scenario():
        node = await Node(make_broker()).start()
        try:
            assert node.broker.healthy()
            node.broker.subscribe("public:lobby")
            payload = {"body": "hé ☃", "n": [1, {"x": None}]}
            sent = Broadcast("public:lobby", "msg", dict(payload))
            await node.broker.publish(sent)
            (got,) = await node.wait_for(1)
            assert (got.topic, got.event, got.payload) == ("public:lobby", "msg", payload)
            assert got.published_at == pytest.approx(sent.published_at)
            await node.settle()
            assert len(node.delivered) == 1, "delivered more than once"
        finally:
            await node.broker.close()
    run(scenario())


def test_order_per_topic_for_one_publisher(make_broker):
    async def scenario():
        node = await Node(make_broker()).start()
        try:
            topics = ["public:a", "public:b", "public:c"]
            for t in topics:
                node.broker.subscribe(t)
            # Concurrent publishes (as concurrent client pushes are): started in order, they keep it.
            await asyncio.gather(*[node.broker.publish(Broadcast(topics[i % 3], "n", {"n": i})) for i in range(300)])
            await node.wait_for(300)
            for t in topics:
                got = [b.payload["n"] for b in node.delivered if b.topic == t]
                assert got == sorted(got) and len(got) == 100, (t, got)
            # Sequential publishes, too.
            for i in range(20):
                await node.broker.publish(Broadcast("public:a", "seq", {"i": i}))
            await node.wait_for(320)
            assert [b.payload["i"] for b in node.delivered if b.event == "seq"] == list(range(20))
        finally:
            await node.broker.close()
    run(scenario())


def test_subscribe_and_unsubscribe_hints(make_broker):
    async def scenario():
        node = await Node(make_broker()).start()
        try:
            b = node.broker
            b.subscribe("public:x")
            b.unsubscribe("public:x")
            b.unsubscribe("public:never")      # unknown topic: harmless
            b.subscribe("public:x")
            b.subscribe("public:x")            # twice: harmless
            await b.publish(Broadcast("public:x", "after", {}))
            await node.wait_for(1)
            await node.settle()
            assert [d.event for d in node.delivered] == ["after"]
        finally:
            await node.broker.close()
    run(scenario())


def test_close_refuses_later_publishes(make_broker):
    async def scenario():
        node = await Node(make_broker()).start()
        node.broker.subscribe("public:z")
        await node.broker.publish(Broadcast("public:z", "before", {}))
        await node.wait_for(1)
        await node.broker.close()
        assert not node.broker.healthy()
        with pytest.raises(BrokerUnavailable):
            await node.broker.publish(Broadcast("public:z", "after", {}))
        await node.broker.close()              # idempotent
        await node.settle()
        assert [d.event for d in node.delivered] == ["before"]
    run(scenario())


def test_describe_names_the_broker(make_broker):
    async def scenario():
        broker = make_broker()
        await broker.start(lambda b: None)
        try:
            text = broker.describe()
            assert text == "memory" or text.startswith(("redis://127.0.0.1:", "redis+sentinel://127.0.0.1:",
                                                         "redis+cluster://127.0.0.1:"))
        finally:
            await broker.close()
    run(scenario())


# -- history and recovery: memory and Redis decide alike --------------------------------------

from pusherd.config import HistoryRule  # noqa: E402
from pusherd.core.history import Rules, parse_position  # noqa: E402


@pytest.fixture(params=SETUPS)
def make_history_broker(request):
    """``make(size=10, ttl=3600.0, max_recovery=300, rules=None, **bounds)`` -> an unstarted broker
    keeping history on deploys:* (or under `rules`); ``bounds``: max_topics, max_bytes.

    On a cluster the bounds hold per slot bucket (``max / CLUSTER_BUCKETS`` each, the keys of one
    publish script sharing a slot): the bounds given are those of one bucket, and the bound tests
    put their topics in one bucket (`one_bucket`), so the same scenario holds."""
    def rules_for(size, ttl, rules):
        return Rules(rules if rules is not None else [HistoryRule("deploys:*", size, ttl)])
    if request.param == "memory":
        return lambda size=10, ttl=3600.0, max_recovery=300, rules=None, **bounds: MemoryBroker(
            rules_for(size, ttl, rules), max_recovery, **bounds)
    url = redis_url(request, request.param)
    from pusherd.brokers.redis import CLUSTER_BUCKETS, RedisBroker
    scale = CLUSTER_BUCKETS if request.param == "cluster" else 1
    return lambda size=10, ttl=3600.0, max_recovery=300, rules=None, **bounds: RedisBroker(
        url, prefix="contract", history_rules=rules_for(size, ttl, rules), max_recovery=max_recovery,
        **{k: v * scale for k, v in bounds.items()})


def one_bucket(broker, base, n):
    """`n` topic names ``base<i>`` that share one history bucket (every name on one Redis)."""
    bucket = getattr(broker, "history_bucket", lambda t: 0)
    names = [base + str(i) for i in range(10000) if bucket(base + str(i)) == bucket(base + "0")]
    return names[:n]


def redis_admins(url):
    """A client per node holding pusherd's keys: the server, Sentinel's master, every cluster master."""
    import redis
    from pusherd.config.values import multi_host_url
    if not url.startswith(("redis+sentinel://", "redis+cluster://")):
        return [redis.Redis.from_url(url)]
    parsed = multi_host_url(url)
    if parsed.scheme == "redis+sentinel":
        host, port = redis.Redis(*parsed.hosts[0]).sentinel_get_master_addr_by_name(parsed.service)
        return [redis.Redis(host, int(port), db=parsed.db)]
    slots = redis.Redis(*parsed.hosts[0]).execute_command("CLUSTER", "SLOTS")
    return [redis.Redis(host.decode(), int(port)) for host, port in {(e[2][0], e[2][1]) for e in slots}]


def history_topics(broker):
    """The topics whose history the broker holds (memory: its streams; Redis: its keys)."""
    if isinstance(broker, MemoryBroker):
        return sorted(broker.history.streams)
    topics = set()
    for client in redis_admins(broker.url):
        try:
            for k in client.keys(broker.prefix + ":h:*") + client.keys(broker.prefix + ":hm:*"):
                name = k.decode().split(":", 2)[2]
                topics.add(name.split("}", 1)[1] if name.startswith("{") else name)   # a cluster's hash tag
        finally:
            client.close()
    return sorted(topics)


async def publish_n(broker, topic, n, start=1):
    return [await broker.publish(Broadcast(topic, "e", {"n": i})) for i in range(start, start + n)]


def offsets(positions):
    return [parse_position(p)[1] for p in positions]


def test_history_positions_increase_and_travel_with_the_broadcast(make_history_broker):
    async def scenario():
        node = await Node(make_history_broker()).start()
        try:
            b = node.broker
            assert b.has_history("deploys:web") and not b.has_history("public:x")
            b.subscribe("deploys:web")
            await b.activate("deploys:web")
            positions = await publish_n(b, "deploys:web", 3)
            assert offsets(positions) == [1, 2, 3]
            assert len({parse_position(p)[0] for p in positions}) == 1       # one epoch
            got = await node.wait_for(3)
            assert [d.position for d in got] == positions
            assert await b.publish(Broadcast("public:x", "e", {})) is None   # no history, no position
        finally:
            await node.broker.close()
    run(scenario())


def test_recover_returns_exactly_the_missed_entries_in_order(make_history_broker):
    async def scenario():
        node = await Node(make_history_broker()).start()
        try:
            b = node.broker
            positions = await publish_n(b, "deploys:web", 5)
            r = await b.recover("deploys:web", positions[1])
            assert r.recovered and r.position == positions[4]
            assert [(e.offset, e.event, e.payload) for e in r.missed] == [(3, "e", {"n": 3}), (4, "e", {"n": 4}),
                                                                          (5, "e", {"n": 5})]
            assert r.epoch == parse_position(positions[0])[0]
            assert tuple(await b.recover("deploys:web", positions[4]))[:3] == (True, positions[4], ())
            epoch = parse_position(positions[0])[0]
            zero = await b.recover("deploys:web", epoch + ":0")
            assert zero.recovered and [e.offset for e in zero.missed] == [1, 2, 3, 4, 5]
            # A topic that never published: an empty position, nothing to replay, nothing created.
            fresh = await b.recover("deploys:new", "x:1")
            assert not fresh.recovered and fresh.position.startswith("n") and parse_position(fresh.position)[1] == 0
            again = await b.recover("deploys:new", fresh.position)   # still nothing: nothing missed
            assert again.recovered and again.missed == () and parse_position(again.position)[1] == 0
            # ... and a client holding it recovers the topic's first publishes.
            first = await b.publish(Broadcast("deploys:new", "e", {"n": 1}))
            r = await b.recover("deploys:new", fresh.position)
            assert r.recovered and r.position == first and [e.payload for e in r.missed] == [{"n": 1}]
            # No history rule: never recovered.
            assert tuple(await b.recover("public:x", positions[0]))[:3] == (False, None, ())
        finally:
            await node.broker.close()
    run(scenario())


@pytest.mark.parametrize("case", ["other epoch", "from the future", "garbage"])
def test_recover_refuses_positions_that_are_not_ours(make_history_broker, case):
    async def scenario():
        node = await Node(make_history_broker()).start()
        try:
            positions = await publish_n(node.broker, "deploys:web", 3)
            epoch = parse_position(positions[0])[0]
            since = {"other epoch": "0" + epoch + ":1", "from the future": epoch + ":9", "garbage": "nope"}[case]
            r = await node.broker.recover("deploys:web", since)
            assert (r.recovered, r.position, r.missed) == (False, positions[2], ())
        finally:
            await node.broker.close()
    run(scenario())


def test_recover_overflow_and_max_recovery(make_history_broker):
    async def scenario():
        node = await Node(make_history_broker(size=3, max_recovery=2)).start()
        try:
            b = node.broker
            positions = await publish_n(b, "deploys:web", 6)
            # size 3 keeps offsets 4..6 (Redis trims approximately, pusherd decides exactly)
            assert not (await b.recover("deploys:web", positions[0])).recovered
            # offsets 4..6 are kept, but 3 > max_recovery 2
            r = await b.recover("deploys:web", positions[2])
            assert (r.recovered, r.missed) == (False, ())
            r = await b.recover("deploys:web", positions[3])
            assert r.recovered and [e.payload["n"] for e in r.missed] == [5, 6]
        finally:
            await node.broker.close()
    run(scenario())


def test_recover_after_ttl(make_history_broker):
    async def scenario():
        node = await Node(make_history_broker(ttl=0.5)).start()
        try:
            b = node.broker
            (first,) = await publish_n(b, "deploys:web", 1)
            await asyncio.sleep(0.3)
            (second,) = await publish_n(b, "deploys:web", 1, start=2)
            await asyncio.sleep(0.3)      # the first is now older than the ttl, the second is not
            epoch = parse_position(first)[0]
            assert not (await b.recover("deploys:web", epoch + ":0")).recovered
            r = await b.recover("deploys:web", first)
            assert r.recovered and [e.payload["n"] for e in r.missed] == [2]
            await asyncio.sleep(0.6)      # idle past the ttl: the history is gone, a new epoch starts
            sweep = getattr(b, "sweep", None)
            if sweep is not None:
                sweep(time.time())
            r = await b.recover("deploys:web", second)
            assert not r.recovered and parse_position(r.position)[0] != epoch
        finally:
            await node.broker.close()
    run(scenario())


# -- hostile input and global bounds: the same answer on both brokers (issue 13) ---------------

SURROGATE = {"s": "\ud800", "\udfff": ["x\udc00y", "ok \u2603"]}


def test_lone_surrogate_payloads_are_delivered_and_recovered_alike(make_history_broker):
    """A payload with a lone surrogate escape (from JSON "\\ud800") is published, delivered and
    replayed unchanged (Redis: 'surrogates not allowed' raised out of publish before the fix)."""
    async def scenario():
        node = await Node(make_history_broker()).start()
        try:
            b = node.broker
            for topic in ("public:plain", "deploys:web"):
                b.subscribe(topic)
                await b.activate(topic)
            assert await b.publish(Broadcast("public:plain", "e", dict(SURROGATE))) is None
            first = await b.publish(Broadcast("deploys:web", "e", dict(SURROGATE)))
            got = await node.wait_for(2)
            assert [(d.topic, d.payload) for d in got] == [("public:plain", SURROGATE), ("deploys:web", SURROGATE)]
            epoch = parse_position(first)[0]
            r = await b.recover("deploys:web", epoch + ":0")
            assert r.recovered and [e.payload for e in r.missed] == [SURROGATE]
        finally:
            await node.broker.close()
    run(scenario())


def test_a_batch_is_published_whole_and_in_order(make_history_broker):
    """[ok, lone surrogate, history] in one batch: every item, in order, with its position (Redis
    published the first item and then raised out of the batch before the fix)."""
    async def scenario():
        node = await Node(make_history_broker()).start()
        try:
            b = node.broker
            for topic in ("public:a", "deploys:web"):
                b.subscribe(topic)
                await b.activate(topic)
            batch = [Broadcast("public:a", "e", {"n": 1}), Broadcast("public:a", "e", dict(SURROGATE, n=2)),
                     Broadcast("deploys:web", "e", {"n": 3}), Broadcast("deploys:web", "e", {"n": 4})]
            positions = await b.publish_batch(batch)
            assert positions[:2] == [None, None] and offsets(positions[2:]) == [1, 2]
            got = await node.wait_for(4)
            assert [d.payload["n"] for d in got if d.topic == "deploys:web"] == [3, 4]
            assert [d.payload for d in got if d.topic == "public:a"] == [{"n": 1}, dict(SURROGATE, n=2)]
            await node.settle()
            assert len(node.delivered) == 4
        finally:
            await node.broker.close()
    run(scenario())


@pytest.mark.parametrize("since", ["\ud800:1", "\ud800:0", "x\udfff:3", "\ud800", "n\ud800:0", "ab:\u00b2",
                                   "ab:\u0661", "\u2603:1"])
def test_since_with_a_lone_surrogate_or_unicode_digits_is_a_clean_no(make_history_broker, since):
    """Every `since` a client can send gets an answer: recovered false and the current position
    (Redis: redis-py raised UnicodeEncodeError encoding the script argument, int() raised on '²')."""
    async def scenario():
        node = await Node(make_history_broker()).start()
        try:
            b = node.broker
            positions = await publish_n(b, "deploys:web", 2)
            r = await b.recover("deploys:web", since)
            assert (r.recovered, r.position, r.missed) == (False, positions[1], ())
            fresh = await b.recover("deploys:none", since)          # and on a topic without history
            assert not fresh.recovered and parse_position(fresh.position)[1] == 0
        finally:
            await node.broker.close()
    run(scenario())


def test_since_joins_on_fresh_topics_create_no_history(make_history_broker):
    """One socket's thousand joins with `since` on topics nobody published on: nothing is kept
    (a stream or two Redis keys per topic before the fix)."""
    async def scenario():
        node = await Node(make_history_broker(rules=[HistoryRule("public:*", 10, 3600.0)])).start()
        try:
            b = node.broker
            for i in range(1000):
                r = await b.recover("public:fresh-%d" % i, "deadbeef:%d" % i)
                assert not r.recovered and parse_position(r.position)[1] == 0
            assert history_topics(b) == []
        finally:
            await node.broker.close()
    run(scenario())


def test_max_history_topics_evicts_the_oldest_history(make_history_broker):
    async def scenario():
        node = await Node(make_history_broker(max_topics=3)).start()
        try:
            b = node.broker
            names = one_bucket(b, "deploys:", 5)
            first = {}
            for i in range(5):
                first[i] = await b.publish(Broadcast(names[i], "e", {"i": i}))
                await asyncio.sleep(0.002)     # distinct publish times (Redis: milliseconds)
            assert history_topics(b) == sorted(names[2:])
            assert b.history_evictions() == {"max_history_topics": 2, "max_history_bytes": 0}
            assert not (await b.recover(names[0], first[0])).recovered
            for i in (2, 3, 4):
                epoch = parse_position(first[i])[0]
                r = await b.recover(names[i], epoch + ":0")
                assert r.recovered and [e.payload for e in r.missed] == [{"i": i}]
        finally:
            await node.broker.close()
    run(scenario())


def test_max_history_bytes_evicts_the_oldest_history(make_history_broker):
    async def scenario():
        node = await Node(make_history_broker(max_bytes=12000)).start()
        try:
            b = node.broker
            names = one_bucket(b, "deploys:", 5)
            for i in range(5):              # 4.2 KB (Redis) to 5.3 KB (memory) each: two fit
                await b.publish(Broadcast(names[i], "e", {"pad": "x" * 4000}))
                await asyncio.sleep(0.002)
            assert history_topics(b) == sorted(names[3:])
            assert b.history_evictions() == {"max_history_topics": 0, "max_history_bytes": 3}
        finally:
            await node.broker.close()
    run(scenario())


def test_client_pushes_stay_out_of_history_unless_the_rule_keeps_them(make_history_broker):
    """An anonymous push on a public history topic is delivered, in order, without a position,
    and the server keeps nothing of it (held for the full ttl before the fix)."""
    async def scenario():
        rules = [HistoryRule("public:chat:*", 10, 3600.0, client_pushes=True), HistoryRule("public:*", 10, 3600.0)]
        node = await Node(make_history_broker(rules=rules)).start()
        try:
            b = node.broker
            for topic in ("public:room", "public:chat:1"):
                b.subscribe(topic)
                await b.activate(topic)
            assert await b.publish(Broadcast("public:room", "push", {"n": 1}), client=True) is None
            assert history_topics(b) == []
            rails = await b.publish(Broadcast("public:room", "rails", {"n": 2}))
            assert await b.publish(Broadcast("public:room", "push", {"n": 3}), client=True) is None
            kept = await b.publish(Broadcast("public:chat:1", "push", {"n": 4}), client=True)
            got = await node.wait_for(4)
            assert [(d.payload["n"], d.position) for d in got] == [(1, None), (2, rails), (3, None), (4, kept)]
            r = await b.recover("public:room", parse_position(rails)[0] + ":0")
            assert r.recovered and [e.payload["n"] for e in r.missed] == [2]
            await node.settle()
            assert len(node.delivered) == 4
        finally:
            await node.broker.close()
    run(scenario())

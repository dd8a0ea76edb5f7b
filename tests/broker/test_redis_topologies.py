"""RedisBroker on Sentinel and on a Redis Cluster, beyond the shared contract: failovers and
sharded pub/sub, against real servers (tests/redis_topologies.py) killed with SIGKILL.

Nodes are RedisBrokers in this process, each standing for one pusherd process.
"""

import asyncio
import logging
import time

import pytest

from brokerkit import Node, redis_py, run, wait_until
from pusherd.core.broadcast import Broadcast
from pusherd.core.errors import BrokerUnavailable
from redis_topologies import _client, redis_cluster, redis_sentinel  # noqa: F401

redis_py()
from pusherd.brokers.redis import RedisBroker  # noqa: E402
from pusherd.config import HistoryRule  # noqa: E402
from pusherd.core.history import Rules, parse_position  # noqa: E402

FAST = dict(backoff_base=0.02, backoff_cap=0.5, connect_timeout=0.5, command_timeout=1.0)
RULES = Rules([HistoryRule("deploys:*", 1000, 3600.0)])


def node(url, **kw):
    return Node(RedisBroker(url, prefix="t", history_rules=RULES, **dict(FAST, **kw)))


async def publish_until_acknowledged(broker, topic, n, attempts, stop_after=None):
    """Publish {"n": n} until the broker acknowledges it; count the tries in `attempts`."""
    while True:
        attempts[n] = attempts.get(n, 0) + 1
        try:
            return await broker.publish(Broadcast(topic, "e", {"n": n}))
        except BrokerUnavailable:
            await asyncio.sleep(0.02)


def numbers(node, topic):
    return [d.payload["n"] for d in node.delivered if d.topic == topic]


def assert_each_once_in_order(got, attempts, who):
    """Every event arrived, in order; more than once only if it was refused (503) and retried."""
    first = list(dict.fromkeys(got))
    assert first == sorted(attempts), "%s: missing or out of order: %r" % (who, sorted(set(attempts) - set(got)))
    for n in set(got):
        assert got.count(n) == 1 or got.count(n) <= attempts[n], (who, n, got.count(n), attempts[n])


# -- Sentinel ---------------------------------------------------------------------------------

def test_sentinel_failover_is_followed_with_no_loss_on_a_history_topic(redis_sentinel, caplog):
    """SIGKILL the master while one process publishes in a loop: publishes are refused while
    there is no master, both processes move to the promoted replica by themselves, and every
    event reaches the other process once (history catch-up), in order."""
    setup = redis_sentinel

    async def scenario():
        a, b = await node(setup.url).start(), await node(setup.url).start()
        try:
            assert a.broker.healthy() and b.broker.healthy()
            for n in (a, b):
                n.broker.subscribe("deploys:web")
                await n.broker.activate("deploys:web")
            attempts = {}
            refused_before = 0
            old = setup.master_port()
            killed_at = None
            for i in range(400):
                if i == 50:
                    setup.master().kill()
                    killed_at = time.monotonic()
                await publish_until_acknowledged(a.broker, "deploys:web", i, attempts)
                if i == 50:
                    resumed = time.monotonic() - killed_at
                await asyncio.sleep(0.002)
                refused_before = sum(attempts.values()) - len(attempts)
            new = setup.master_port()
            assert new != old and refused_before > 0, (new, old, refused_before)
            await b.wait_for(400, timeout=10)
            await b.settle(0.3)
            assert_each_once_in_order(numbers(b, "deploys:web"), attempts, "b")
            assert_each_once_in_order(numbers(a, "deploys:web"), attempts, "a")
            for n in (a, b):
                assert n.broker.stats["failovers"] == 1 and n.broker.healthy()
            # One epoch and one offset sequence across the failover (nothing lost by Redis here).
            positions = [parse_position(d.position) for d in b.delivered]
            assert len({e for e, _ in positions}) == 1
            logging.getLogger("test").warning("sentinel switch-over: publishes acknowledged again %.1fs after "
                                              "the SIGKILL", resumed)
        finally:
            await a.broker.close()
            await b.broker.close()

    with caplog.at_level(logging.WARNING, "pusherd.broker"):
        run(scenario(), timeout=60)
    assert any("the master is now 127.0.0.1:" in r.getMessage() for r in caplog.records)


def test_sentinel_a_master_demoted_by_hand_is_never_acknowledged(redis_sentinel):
    """The node pusherd publishes to becomes a read-only replica without Sentinel's failover (so
    nobody closes pusherd's connections): a plain PUBLISH there would answer 0 and go nowhere;
    pusherd's guarded publish is refused instead (503), and it reconnects."""
    setup = redis_sentinel

    async def scenario():
        a = await node(setup.url).start()
        try:
            await a.broker.publish(Broadcast("public:x", "e", {}))          # the publish connection is open
            master, replica = setup.master(), setup.replica()
            _client(master.port).execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
            _client(replica.port).execute_command("REPLICAOF", "NO", "ONE")
            with pytest.raises(BrokerUnavailable, match="READONLY|read-only|replica"):
                await a.broker.publish(Broadcast("public:x", "e", {}))
            with pytest.raises(BrokerUnavailable):
                await a.broker.publish(Broadcast("deploys:x", "e", {}))   # the history script too
        finally:
            await a.broker.close()
    run(scenario())


# -- Cluster ----------------------------------------------------------------------------------

def shardnumsub(setup, port, channel):
    reply = _client(port).execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1])


def test_cluster_topics_spread_over_every_shard_and_subscribe_on_the_owner_only(redis_cluster):
    """Topics on all three shards: each is SSUBSCRIBEd on the master owning its slot only, an event
    reaches the other process, and history and recovery work on every shard."""
    setup = redis_cluster

    async def scenario():
        a, b = await node(setup.url).start(), await node(setup.url).start()
        try:
            masters = setup.master_ports()
            assert len(masters) == 3 and a.broker.healthy()
            topics, owners = [], {}
            for i in range(200):           # two topics per shard, half of them with history
                for kind in ("public:room", "deploys:app"):
                    topic = "%s%d" % (kind, i)
                    owner = setup.owner_port(b.broker.channel(topic))
                    if sum(1 for t in topics if owners[t] == owner and t.startswith(kind)) < 1:
                        topics.append(topic)
                        owners[topic] = owner
            assert len(topics) == 6 and set(owners.values()) == set(masters)
            for n in (a, b):
                for t in topics:
                    n.broker.subscribe(t)
                    await n.broker.activate(t)
            for t in topics:
                channel = b.broker.channel(t)
                counts = {p: shardnumsub(setup, p, channel) for p in masters}
                assert counts == {p: (2 if p == owners[t] else 0) for p in masters}, (t, counts)
            positions = {}
            for t in topics:
                positions[t] = [await a.broker.publish(Broadcast(t, "e", {"n": i})) for i in range(3)]
            await b.wait_for(18)
            for t in topics:
                assert numbers(b, t) == [0, 1, 2], t
                if t.startswith("deploys:"):
                    r = await b.broker.recover(t, positions[t][0])
                    assert r.recovered and [e.payload["n"] for e in r.missed] == [1, 2], t
                    owner = _client(owners[t])
                    assert owner.exists(b"t:h:" + b.broker.tag(t) + t.encode()) == 1
                else:
                    assert positions[t] == [None] * 3
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario(), timeout=60)


def test_cluster_shard_failover_is_followed(redis_cluster, caplog):
    """SIGKILL the master of a history topic's shard (it has a replica): publishes there are
    refused until the replica is promoted, then both processes subscribe on it by themselves and
    every event reaches the other process once, in order; the other shards keep working."""
    setup = redis_cluster

    async def scenario():
        a, b = await node(setup.url).start(), await node(setup.url).start()
        try:
            topic = "deploys:web"
            victim = setup.owner_port(a.broker.channel(topic))
            other = next("public:o%d" % i for i in range(100)
                         if setup.owner_port(a.broker.channel("public:o%d" % i)) != victim)
            for n in (a, b):
                for t in (topic, other):
                    n.broker.subscribe(t)
                    await n.broker.activate(t)
            attempts = {}
            for i in range(300):
                if i == 30:
                    # The first 30 events replicated before the kill (a lagging replica would take
                    # them along: pusherd then logs that members missed them, and the test is moot).
                    setup.wait_replicated(victim)
                    setup.server(victim).kill()
                    killed_at = time.monotonic()
                    # Another shard's topic is still served meanwhile.
                    await a.broker.publish(Broadcast(other, "e", {"n": 0}))
                await publish_until_acknowledged(a.broker, topic, i, attempts)
                if i == 30:
                    resumed = time.monotonic() - killed_at
                await asyncio.sleep(0.002)
            assert victim not in setup.master_ports()
            assert sum(attempts.values()) > len(attempts), "nothing was refused: no failover happened"
            await b.wait_for(301, timeout=10)
            await b.settle(0.3)
            assert_each_once_in_order(numbers(b, topic), attempts, "b")
            assert numbers(b, other) == [0]
            assert a.broker.healthy() and b.broker.healthy()
            logging.getLogger("test").warning("cluster switch-over: publishes acknowledged again %.1fs after "
                                              "the SIGKILL", resumed)
        finally:
            await a.broker.close()
            await b.broker.close()

    with caplog.at_level(logging.WARNING, "pusherd.broker"):
        run(scenario(), timeout=90)
    assert any("new slot map" in r.getMessage() for r in caplog.records)


def test_cluster_publish_to_a_moved_slot_follows_moved(redis_cluster):
    """A process whose slot map is stale (the slot moved to another master) sends the publish to
    the old owner: MOVED; the publish goes to the new owner and is acknowledged."""
    setup = redis_cluster

    async def scenario():
        a, b = await node(setup.url, map_refresh=3600).start(), await node(setup.url).start()
        try:
            topic = "public:moving"
            b.broker.subscribe(topic)
            await b.broker.activate(topic)
            channel = a.broker.channel(topic)
            from redis.crc import key_slot
            slot = key_slot(channel)
            source = setup.owner_port(channel)
            target = next(p for p in setup.master_ports() if p != source)
            ids = {p: _client(p).execute_command("CLUSTER", "MYID").decode() for p in (source, target)}
            # Move the (empty: pub/sub has no keys) slot: SETSLOT NODE on both, as redis-cli does.
            for p in (target, source):
                _client(p).execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
            await a.broker.publish(Broadcast(topic, "e", {"n": 1}))
            assert a.broker.stats["redirects"] == 1
            # b's subscription moved with the slot too (Redis SUNSUBSCRIBEs it; b subscribes at the owner).
            await wait_until(lambda: shardnumsub(setup, target, channel) == 1, timeout=10, what="b on the new owner")
            await b.broker.activate(topic)
            await a.broker.publish(Broadcast(topic, "e", {"n": 2}))
            await b.wait_for(1, timeout=5)
            assert 2 in numbers(b, topic)
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario(), timeout=60)


def test_cluster_keys_share_the_channel_slot_and_buckets_spread():
    """Every key of a topic and its channel hash to one slot (one atomic script); the 64 bucket
    tags spread topics over the slot space; a prefix with braces is refused on a cluster."""
    from redis.crc import key_slot
    from pusherd.core.errors import StartupError
    broker = RedisBroker("redis+cluster://127.0.0.1:7000", prefix="p")
    for topic in ("deploys:web", "}odd{topic", "é{x}", "public:room:42"):
        tag = broker.tag(topic)
        keys = [broker.channel(topic), b"p:h:" + tag + topic.encode(), b"p:hm:" + tag + topic.encode(),
                b"p:history:topics" + tag, b"p:history:bytes" + tag, b"p:history:info" + tag]
        assert len({key_slot(k) for k in keys}) == 1, topic
    slots = {key_slot(broker.channel("public:%d" % i)) for i in range(2000)}
    assert len(slots) == 64 and min(slots) < 16384 // 3 and max(slots) > 2 * 16384 // 3
    with pytest.raises(StartupError, match="broker_prefix"):
        RedisBroker("redis+cluster://127.0.0.1:7000", prefix="a{b}")
    assert RedisBroker("redis://127.0.0.1:1/0", prefix="p").channel("x{y}") == b"p:t:x{y}"   # unchanged there

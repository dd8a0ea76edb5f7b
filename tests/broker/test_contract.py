"""One contract, every broker (phoenix_pubsub's shared suite): memory and Redis must agree.

A Node is one pusherd process's view of the broker. Redis runs against a real redis-server.
"""

import asyncio

import pytest

from brokerkit import Node, redis_py, run
from pusherd.broker import Broadcast, MemoryBroker
from pusherd.errors import BrokerUnavailable


@pytest.fixture(params=["memory", "redis"])
def make_broker(request):
    """Builds an unstarted broker of the parametrized kind."""
    if request.param == "memory":
        return MemoryBroker
    redis_py()
    server = request.getfixturevalue("redis_server")
    from pusherd.redis_broker import RedisBroker
    return lambda: RedisBroker(server.url, prefix="contract")


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
            assert text == "memory" or text.startswith("redis://127.0.0.1:")
        finally:
            await broker.close()
    run(scenario())

"""RedisBroker beyond the shared contract: several processes, subscriptions in Redis, outages.

Every test runs against its own real redis-server (the `redis_server` fixture); nodes are
RedisBrokers in this process, each standing for one pusherd process.
"""

import asyncio
import json
import logging
import random

import pytest

from brokerkit import Node, redis_py, run, wait_until
from pusherd_testing import RedisServer, free_port, require
from pusherd.core.broadcast import Broadcast
from pusherd.core.errors import BrokerUnavailable

redis_py()
from pusherd.brokers import redis as redis_broker  # noqa: E402
from pusherd.brokers.base import backoff_delay  # noqa: E402
from pusherd.brokers.redis import RedisBroker, decode_envelope, encode_envelope  # noqa: E402
from pusherd.config.values import mask_url  # noqa: E402

FAST = dict(backoff_base=0.02, backoff_cap=0.2, connect_timeout=0.5, command_timeout=1.0)


def node(url, prefix="t", **kw):
    return Node(RedisBroker(url, prefix=prefix, **dict(FAST, **kw)))


def numsub(server, channel):
    return dict(server.client().pubsub_numsub(channel)).get(channel.encode(), 0)


# -- pure parts -----------------------------------------------------------------------------

def test_envelope_roundtrip_and_version():
    b = Broadcast("private:a:b", "new_version", {"v": "é", "n": 1}, published_at=12.5, position="e:3")
    data = encode_envelope("abc", b)
    assert data.startswith(b'{"v":1,"o":"abc"')
    origin, back = decode_envelope(data)
    assert origin == "abc" and (back.topic, back.event, back.payload, back.published_at, back.position) == \
        ("private:a:b", "new_version", {"v": "é", "n": 1}, 12.5, "e:3")
    for bad in (b"[]", b'{"v":2,"o":"x","t":"a","e":"b","p":{}}', b'{"v":1,"o":"x","t":"a","e":"b","p":[]}',
                b'{"v":1,"t":"a","e":"b","p":{}}', b"not json"):
        with pytest.raises(ValueError):
            decode_envelope(bad)


def test_describe_masks_every_password_form():
    for url in ("redis://u:s3cret@127.0.0.1:1/0", "redis://127.0.0.1:1/0?password=s3cret",
                "unix:///run/redis.sock?db=0&password=s3cret"):
        assert "s3cret" not in RedisBroker(url).describe()


def test_backoff_is_capped_and_jittered():
    rng = random.Random(7).random
    delays = [backoff_delay(a, 0.1, 5.0, rng) for a in range(40)]
    assert all(0.05 <= d <= 5.0 for d in delays)
    assert max(delays[-10:]) <= 5.0 and min(delays[-10:]) >= 2.5     # capped, never below half the cap
    assert len(set(round(d, 6) for d in delays[-10:])) > 1            # jittered, not lock-step


# -- several processes ----------------------------------------------------------------------

def test_other_process_receives_once_and_only_what_it_subscribed(redis_server):
    async def scenario():
        a = await node(redis_server.url).start()
        b = await node(redis_server.url).start()
        try:
            b.broker.subscribe("public:shared")
            a.broker.subscribe("public:shared")
            await wait_until(lambda: numsub(redis_server, "t:t:public:shared") == 2, what="both subscribed")
            await a.broker.publish(Broadcast("public:shared", "m", {"i": 1}))
            await a.broker.publish(Broadcast("public:only-a", "m", {"i": 2}))   # b has no member there
            await b.wait_for(1)
            await a.wait_for(2)
            await b.settle()
            assert [(d.topic, d.payload) for d in b.delivered] == [("public:shared", {"i": 1})]
            assert len(a.delivered) == 2                          # own copy from Redis skipped
            assert a.broker.stats["own_skipped"] == 1
            # Redis holds a subscription only for topics with local members.
            assert numsub(redis_server, "t:t:public:only-a") == 0
            b.broker.unsubscribe("public:shared")
            await wait_until(lambda: numsub(redis_server, "t:t:public:shared") == 1, what="b unsubscribed")
            await a.broker.publish(Broadcast("public:shared", "m", {"i": 3}))
            await b.settle()
            assert len(b.delivered) == 1
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario())


def test_prefix_separates_deployments(redis_server):
    async def scenario():
        a = await node(redis_server.url, prefix="prod").start()
        b = await node(redis_server.url, prefix="staging").start()
        try:
            b.broker.subscribe("public:x")
            await wait_until(lambda: numsub(redis_server, "staging:t:public:x") == 1, what="subscribed")
            await a.broker.publish(Broadcast("public:x", "m", {}))
            await b.settle()
            assert b.delivered == []
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario())


def test_foreign_or_future_messages_are_dropped_not_fatal(redis_server, caplog):
    async def scenario():
        b = await node(redis_server.url).start()
        try:
            b.broker.subscribe("public:x")
            await wait_until(lambda: numsub(redis_server, "t:t:public:x") == 1, what="subscribed")
            client = redis_server.client()
            client.publish("t:t:public:x", b"\xff garbage")
            client.publish("t:t:public:x", json.dumps({"v": 2, "o": "z", "t": "public:x", "e": "m", "p": {}}))
            client.publish("t:t:public:x", json.dumps({"v": 1, "o": "z", "t": "public:x", "e": "ok", "p": {}}))
            (got,) = await b.wait_for(1)
            assert got.event == "ok" and b.broker.stats["bad_envelopes"] == 2 and b.broker.healthy()
        finally:
            await b.broker.close()
    with caplog.at_level(logging.WARNING, "pusherd.broker"):
        run(scenario())
    assert sum("unreadable message" in r.getMessage() for r in caplog.records) == 1


# -- outages ----------------------------------------------------------------------------------

def _outage_logs(caplog):
    msgs = [r.getMessage() for r in caplog.records if r.name == "pusherd.broker"]
    return ([m for m in msgs if "unavailable (" in m], [m for m in msgs if "connected again" in m],
            [m for m in msgs if "reconnect attempt" in m])


def test_unreachable_at_start_then_recovers(tmp_path, caplog):
    require(__import__("shutil").which("redis-server") is not None, "redis-server not installed")
    server = RedisServer(tmp_path, port=free_port())

    async def scenario():
        b = node(server.url)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await b.start()
        assert loop.time() - started < 3.0 and not b.broker.healthy()
        b.broker.subscribe("public:late")                      # a member joins while Redis is down
        with pytest.raises(BrokerUnavailable):
            await b.broker.publish(Broadcast("public:late", "m", {}))
        await wait_until(lambda: b.broker.stats["outages"] == 1 and b.broker.stats["failed_attempts"] >= 3,
                         what="failed attempts")
        await loop.run_in_executor(None, server.start)
        try:
            await wait_until(b.broker.healthy, what="healthy after redis started")
            a = await node(server.url).start()
            await a.broker.publish(Broadcast("public:late", "m", {"ok": 1}))
            (got,) = await b.wait_for(1)
            assert got.payload == {"ok": 1}
            await a.broker.close()
        finally:
            await b.broker.close()
            server.stop()

    with caplog.at_level(logging.DEBUG, "pusherd.broker"):
        run(scenario())
    down, up, attempts = _outage_logs(caplog)
    assert len(down) == 1 and len(up) == 1 and len(attempts) >= 2, (down, up, attempts)


@pytest.mark.parametrize("how", ["kill-server", "client-kill-pubsub"])
def test_outage_refuses_then_resumes_without_duplicates(redis_server, caplog, how):
    async def scenario():
        loop = asyncio.get_running_loop()
        a = await node(redis_server.url).start()
        b = await node(redis_server.url).start()
        try:
            for n in (a, b):
                n.broker.subscribe("public:o")
            await wait_until(lambda: numsub(redis_server, "t:t:public:o") == 2, what="subscribed")
            await a.broker.publish(Broadcast("public:o", "m", {"i": 0}))
            await b.wait_for(1)
            if how == "kill-server":
                redis_server.kill()
                await wait_until(lambda: not a.broker.healthy() and not b.broker.healthy(), what="both down")
                for n in (a, b):
                    with pytest.raises(BrokerUnavailable):
                        await n.broker.publish(Broadcast("public:o", "m", {"lost": True}))
                await wait_until(lambda: min(n.broker.stats["failed_attempts"] for n in (a, b)) >= 3,
                                 what="failed attempts")
                await loop.run_in_executor(None, redis_server.start)
            else:
                killed = redis_server.client().client_kill_filter(_type="pubsub")
                assert killed == 2
            await wait_until(lambda: a.broker.stats["reconnects"] == 1 and b.broker.stats["reconnects"] == 1,
                             what="both reconnected")
            await wait_until(lambda: numsub(redis_server, "t:t:public:o") == 2, what="resubscribed")
            for i in range(1, 21):
                await a.broker.publish(Broadcast("public:o", "m", {"i": i}))
            await b.broker.publish(Broadcast("public:o", "m", {"i": 21}))
            await b.wait_for(22)
            await a.wait_for(22)
            await b.settle(0.3)
            for n in (a, b):
                assert [d.payload["i"] for d in n.delivered] == list(range(22))   # no loss after, no duplicate
        finally:
            await a.broker.close()
            await b.broker.close()

    with caplog.at_level(logging.DEBUG, "pusherd.broker"):
        run(scenario())
    down, up, attempts = _outage_logs(caplog)
    assert len(down) == 2 and len(up) == 2, (down, up)       # once per outage per process
    if how == "kill-server":
        assert len(attempts) >= 2


def test_publishes_in_flight_when_closing_are_refused(redis_server):
    async def scenario():
        a = await node(redis_server.url).start()
        pending = [asyncio.ensure_future(a.broker.publish(Broadcast("public:p", "m", {"i": i}))) for i in range(50)]
        await asyncio.sleep(0)
        await a.broker.close()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(r is None or isinstance(r, BrokerUnavailable) for r in results)
        assert len(a.delivered) == sum(r is None for r in results)   # accepted <=> handed on and delivered
    run(scenario())


def test_backlog_is_bounded(redis_server):
    async def scenario():
        a = await node(redis_server.url, max_pending=10).start()
        try:
            results = await asyncio.gather(*[a.broker.publish(Broadcast("public:q", "m", {"i": i}))
                                             for i in range(100)], return_exceptions=True)
            refused = [r for r in results if isinstance(r, BrokerUnavailable)]
            assert refused and len(refused) < 100
            assert len(a.delivered) == 100 - len(refused)
        finally:
            await a.broker.close()
    run(scenario())


def test_unix_socket_url(tmp_path):
    require(__import__("shutil").which("redis-server") is not None, "redis-server not installed")
    import shutil
    import subprocess
    import time as _time

    import redis
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", "0", "--unixsocket", str(path), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = _time.monotonic() + 10
        while not path.exists():
            assert _time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            _time.sleep(0.02)
        url = "unix://%s?db=0" % path

        async def scenario():
            a = await node(url).start()
            b = await node(url).start()
            try:
                assert a.broker.healthy() and b.broker.healthy()
                b.broker.subscribe("public:u")
                admin = redis.Redis(unix_socket_path=str(path))
                await wait_until(lambda: dict(admin.pubsub_numsub("t:t:public:u")).get(b"t:t:public:u") == 1,
                                 what="subscribed over the unix socket")
                await a.broker.publish(Broadcast("public:u", "m", {"via": "unix"}))
                (got,) = await b.wait_for(1)
                assert got.payload == {"via": "unix"}
            finally:
                await a.broker.close()
                await b.broker.close()
        run(scenario())
    finally:
        proc.terminate()
        proc.wait(10)


def test_build_broker_without_redis_py_is_a_clear_startup_error(monkeypatch):
    import sys
    from types import SimpleNamespace
    from pusherd.brokers import build_broker
    from pusherd.core.errors import StartupError
    bounds = {"max_history_topics": 10, "max_history_bytes": 1000, "history": [], "max_recovery": 300}
    monkeypatch.setitem(sys.modules, "pusherd.brokers.redis", None)   # as if redis-py were missing
    with pytest.raises(StartupError, match=r"pip install 'pusherd\[redis\]'"):
        build_broker(SimpleNamespace(broker="redis://h:6379/0", broker_prefix="p", **bounds))
    assert type(build_broker(SimpleNamespace(broker="memory", broker_prefix="p", **bounds))).__name__ == "MemoryBroker"


# -- history on Redis: one epoch and one offset sequence for every process --------------------

from pusherd.config import HistoryRule  # noqa: E402
from pusherd.core.history import Rules, parse_position, pending_after  # noqa: E402

RULES = Rules([HistoryRule("deploys:*", 50, 3600.0)])


def hnode(url, **kw):
    return node(url, history_rules=RULES, **kw)


def test_history_is_shared_by_every_process(redis_server):
    async def scenario():
        a, b = await hnode(redis_server.url).start(), await hnode(redis_server.url).start()
        try:
            for n in (a, b):
                n.broker.subscribe("deploys:web")
                await n.broker.activate("deploys:web")
            # Interleaved concurrent publishes from both: one contiguous offset sequence, one epoch.
            got = await asyncio.gather(*[(a, b)[i % 2].broker.publish(Broadcast("deploys:web", "e", {"i": i}))
                                         for i in range(40)])
            assert sorted(parse_position(p)[1] for p in got) == list(range(1, 41))
            assert len({parse_position(p)[0] for p in got}) == 1
            for n in (a, b):       # every process saw every broadcast with the same position
                seen = await n.wait_for(40)
                assert sorted(d.position for d in seen) == sorted(got)
            # Either process recovers what the other published, identically.
            since = next(p for p in got if parse_position(p)[1] == 30)
            ra, rb = await a.broker.recover("deploys:web", since), await b.broker.recover("deploys:web", since)
            assert ra == rb and ra.recovered and [e.offset for e in ra.missed] == list(range(31, 41))
            keys = sorted(redis_server.client().keys("t:h:*") + redis_server.client().keys("t:hm:*"))
            assert keys == [b"t:h:deploys:web", b"t:hm:deploys:web"]
            assert 0 < redis_server.client().ttl("t:h:deploys:web") <= 3600
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario())


def test_flushall_loses_the_history_and_starts_a_new_epoch(redis_server):
    async def scenario():
        a = await hnode(redis_server.url).start()
        try:
            before = await a.broker.publish(Broadcast("deploys:web", "e", {}))
            redis_server.client().flushall()
            r = await a.broker.recover("deploys:web", before)
            assert not r.recovered and parse_position(r.position)[1] == 0     # no history: an empty position
            after = await a.broker.publish(Broadcast("deploys:web", "e", {}))
            assert parse_position(after)[0] not in (parse_position(before)[0], parse_position(r.position)[0])
            assert parse_position(after)[1] == 1
            # The client told of the loss, back with the empty position, misses nothing after it.
            again = await a.broker.recover("deploys:web", r.position)
            assert again.recovered and [e.offset for e in again.missed] == [1]
        finally:
            await a.broker.close()
    run(scenario())


def test_script_flush_is_survived(redis_server):
    async def scenario():
        a = await hnode(redis_server.url).start()
        try:
            await a.broker.publish(Broadcast("deploys:web", "e", {}))
            redis_server.client().script_flush()
            outcomes = []
            for _ in range(3):     # at most the first is refused (NOSCRIPT), then the script is reloaded
                try:
                    outcomes.append(parse_position(await a.broker.publish(Broadcast("deploys:web", "e", {})))[1])
                except BrokerUnavailable as exc:
                    assert "No matching script" in str(exc)
                    outcomes.append("refused")
            assert outcomes[-2:] == [2, 3] or outcomes == [2, 3, 4]
        finally:
            await a.broker.close()
    run(scenario())


def test_recover_while_redis_is_down_fails_fast(redis_server):
    async def scenario():
        a = await hnode(redis_server.url).start()
        try:
            pos = await a.broker.publish(Broadcast("deploys:web", "e", {}))
            redis_server.kill()
            await wait_until(lambda: not a.broker.healthy(), what="outage noticed")
            a.broker.subscribe("deploys:web")
            started = asyncio.get_running_loop().time()
            with pytest.raises(BrokerUnavailable):
                await a.broker.recover("deploys:web", pos)
            assert asyncio.get_running_loop().time() - started < 0.5
        finally:
            await a.broker.close()
    run(scenario())


def test_activate_confirms_the_subscription_in_redis(redis_server):
    async def scenario():
        a = await hnode(redis_server.url).start()
        try:
            a.broker.subscribe("public:x")
            assert not a.broker.active("public:x")
            await a.broker.activate("public:x")
            assert a.broker.active("public:x") and numsub(redis_server, "t:t:public:x") == 1
            a.broker.unsubscribe("public:x")
            assert not a.broker.active("public:x")
            await wait_until(lambda: numsub(redis_server, "t:t:public:x") == 0, what="unsubscribed")
            # Leave then join again at once (before the UNSUBSCRIBE went out), and after it.
            a.broker.subscribe("public:x")
            await a.broker.activate("public:x")
            assert numsub(redis_server, "t:t:public:x") == 1
        finally:
            await a.broker.close()
    run(scenario())


def test_recover_during_publishes_from_another_process_has_no_gap_and_no_duplicate(redis_server):
    """The replay/live race across processes: B recovers (held broadcasts + the stream read)
    while A publishes as fast as it can; what B would send is exactly every offset once, in order."""
    async def scenario():
        a, b = await hnode(redis_server.url).start(), await hnode(redis_server.url).start()
        try:
            first = await a.broker.publish(Broadcast("deploys:race", "e", {"i": 0}))
            sent = []

            async def publisher():   # 45 publishes, one every ~2 ms (within size and max_recovery)
                for i in range(1, 46):
                    sent.append(await a.broker.publish(Broadcast("deploys:race", "e", {"i": i})))
                    await asyncio.sleep(0.002)
            task = asyncio.ensure_future(publisher())
            await wait_until(lambda: len(sent) >= 10, what="publishes under way")
            # What Daemon.recover_join does: hold (subscribe) first, then recover.
            held = b.delivered
            b.broker.subscribe("deploys:race")
            recovery = await b.broker.recover("deploys:race", first)
            assert len(sent) < 45, "the publisher finished before the recovery: no race"
            await task
            last = await a.broker.publish(Broadcast("deploys:race", "e", {"end": True}))
            await wait_until(lambda: any(d.position == last for d in held), what="the last publish")
            assert recovery.recovered
            got = [e.offset for e in recovery.missed] + \
                [parse_position(d.position)[1] for d in pending_after(held, parse_position(recovery.position)[1])]
            assert got == list(range(2, parse_position(last)[1] + 1)), got
            assert len(recovery.missed) > 0 and len(got) > len(recovery.missed)   # both sides of the race
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario())


def kill_subscriber(server, broker):
    """CLIENT KILL the subscriber connection of one broker (the others keep theirs)."""
    name = "pusherd-" + broker.origin
    client = server.client()
    (sub,) = [c for c in client.client_list() if c["name"] == name and int(c.get("sub", 0)) > 0]
    client.execute_command("CLIENT", "KILL", "ID", sub["id"])


def test_a_process_catches_up_from_the_history_after_its_subscriber_reconnects(redis_server):
    """Pub/sub loses what is published while one process's subscriber connection is down; on a
    history topic that process delivers it from the stream once back, in order, exactly once."""
    async def scenario():
        a = await hnode(redis_server.url).start()
        b = await hnode(redis_server.url, backoff_base=0.5, backoff_cap=0.5).start()   # a visible window
        try:
            for n in (a, b):
                for topic in ("deploys:web", "public:plain"):
                    n.broker.subscribe(topic)
                    await n.broker.activate(topic)
            await a.broker.publish(Broadcast("deploys:web", "e", {"i": 0}))
            await b.wait_for(1)
            kill_subscriber(redis_server, b.broker)
            await wait_until(lambda: not b.broker.healthy(), what="b notices")
            for i in (1, 2, 3):
                await a.broker.publish(Broadcast("deploys:web", "e", {"i": i}))
            await a.broker.publish(Broadcast("public:plain", "lost", {}))     # no history: lost for b
            await wait_until(lambda: b.broker.healthy(), what="b reconnects")
            await a.broker.publish(Broadcast("deploys:web", "e", {"i": 4}))
            await b.wait_for(5)
            await b.settle()
            assert [(d.payload["i"], d.position.rsplit(":", 1)[1]) for d in b.delivered] == \
                [(0, "1"), (1, "2"), (2, "3"), (3, "4"), (4, "5")]
            # 1..3 from the stream; 4 from the stream too when it beat the catch-up read (its live copy dropped)
            stats = b.broker.stats
            assert stats["caught_up"] - stats["duplicates"] == 3 and stats["caught_up"] in (3, 4)
            assert [d.event for d in a.delivered].count("lost") == 1
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario())


# -- batches and global history bounds (issue 13) --------------------------------------------

def acl_user(server, *channels):
    """A Redis user allowed every command and key but only these pub/sub channels."""
    server.client().execute_command("ACL", "SETUSER", "pub", "on", ">pw", "~*", "resetchannels",
                                    *["&" + c for c in channels], "+@all")
    return "redis://pub:pw@127.0.0.1:%d/0" % server.port


def test_a_batch_that_redis_refuses_in_part_publishes_nothing(redis_server):
    """[allowed, refused by an ACL]: Redis discards the whole MULTI/EXEC, nothing reaches anyone,
    and the batch is refused (the first item was published, then 503, before the fix: a retrying
    publisher duplicated it)."""
    async def scenario():
        url = acl_user(redis_server, "t:t:public:ok*")
        a = await node(url).start()
        b = await node(url).start()
        try:
            for n in (a, b):
                n.broker.subscribe("public:ok")
                await n.broker.activate("public:ok")
            with pytest.raises(BrokerUnavailable, match="0 of 2 events published"):
                await a.broker.publish_batch([Broadcast("public:ok", "e", {"n": 1}),
                                              Broadcast("public:denied", "e", {"n": 2})])
            await a.broker.publish_batch([Broadcast("public:ok", "e", {"n": 3}), Broadcast("public:ok", "e", {"n": 4})])
            for n in (a, b):
                await n.wait_for(2)
            await b.settle()
            assert [d.payload["n"] for d in a.delivered] == [3, 4] == [d.payload["n"] for d in b.delivered]
            assert a.broker.healthy()
        finally:
            await a.broker.close()
            await b.broker.close()
    run(scenario())


def test_a_history_batch_after_script_flush_is_published_whole(redis_server):
    """The SCRIPT LOAD travels inside the batch's MULTI: a flushed script cache cannot make EXEC
    publish the plain items of a batch and refuse its history items."""
    async def scenario():
        a = await hnode(redis_server.url).start()
        try:
            await a.broker.publish(Broadcast("deploys:web", "e", {}))
            redis_server.client().script_flush()
            positions = await a.broker.publish_batch([Broadcast("public:x", "e", {}),
                                                      Broadcast("deploys:web", "e", {}), Broadcast("deploys:web", "e", {})])
            assert positions[0] is None and [parse_position(p)[1] for p in positions[1:]] == [2, 3]
            assert parse_position(await a.broker.publish(Broadcast("deploys:web", "e", {})))[1] == 4
        finally:
            await a.broker.close()
    run(scenario())


def test_history_bounds_hold_across_processes(redis_server, caplog):
    """max_history_topics is one bound for every process sharing the Redis: two processes that
    each publish on fresh topics leave at most max_topics histories, the oldest evicted."""
    async def scenario():
        rules = Rules([HistoryRule("public:*", 10, 3600.0)])
        a = await node(redis_server.url, history_rules=rules, max_topics=4).start()
        b = await node(redis_server.url, history_rules=rules, max_topics=4).start()
        try:
            for i in range(10):
                await (a, b)[i % 2].broker.publish(Broadcast("public:t%d" % i, "e", {}))
                await asyncio.sleep(0.002)
            client = redis_server.client()
            assert sorted(client.keys("t:hm:*")) == [b"t:hm:public:t%d" % i for i in (6, 7, 8, 9)]
            assert len(client.keys("t:h:*")) == 4 and client.zcard("t:history:topics") == 4
            ea, eb = a.broker.history_evictions(), b.broker.history_evictions()
            assert ea["max_history_topics"] + eb["max_history_topics"] == 6
            # The byte total is the sum of what the topics hold.
            sizes = client.hgetall("t:history:bytes")
            assert int(client.hget("t:history:info", "bytes")) == sum(int(v) for v in sizes.values()) > 0
        finally:
            await a.broker.close()
            await b.broker.close()
    with caplog.at_level(logging.WARNING, "pusherd.broker"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if "evicted so far" in r.getMessage()]
    assert len(warnings) == 2 and all("max_history_topics" in w for w in warnings)   # once per process


def test_expired_histories_are_forgotten_not_counted_as_evictions(redis_server):
    async def scenario():
        rules = Rules([HistoryRule("public:short:*", 10, 0.2), HistoryRule("public:*", 10, 3600.0)])
        a = await node(redis_server.url, history_rules=rules, max_topics=2).start()
        try:
            await a.broker.publish(Broadcast("public:short:1", "e", {}))
            await a.broker.publish(Broadcast("public:long", "e", {}))
            await asyncio.sleep(0.3)                     # public:short:1 expired in Redis
            await a.broker.publish(Broadcast("public:other", "e", {}))
            client = redis_server.client()
            assert sorted(client.zrange("t:history:topics", 0, -1)) == [b"public:long", b"public:other"]
            assert a.broker.history_evictions()["max_history_topics"] == 0
        finally:
            await a.broker.close()
    run(scenario())


def test_a_history_rolled_back_by_a_failover_is_followed_not_deduplicated(redis_server, caplog):
    """Redis replicates asynchronously: a promoted replica may lack the last writes the old master
    acknowledged, and hands their offsets out again for new broadcasts. A process that delivered
    the lost ones notices when it catches up (the history is behind what it delivered) and
    delivers the new ones (dropped as duplicates of the lost ones before the fix)."""
    async def scenario():
        a = await hnode(redis_server.url).start()
        b = await hnode(redis_server.url, backoff_base=0.3, backoff_cap=0.3).start()
        try:
            for n in (a, b):
                n.broker.subscribe("deploys:web")
                await n.broker.activate("deploys:web")
            for i in range(1, 6):
                await a.broker.publish(Broadcast("deploys:web", "e", {"i": i}))
            await b.wait_for(5)
            # What the promoted replica holds: offsets 1..3 only.
            client = redis_server.client()
            kept = client.xrange("t:h:deploys:web", "-", "3-0")
            client.delete("t:h:deploys:web")
            for entry_id, fields in kept:
                client.xadd("t:h:deploys:web", fields, id=entry_id)
            client.hset("t:hm:deploys:web", "offset", 3)
            kill_subscriber(redis_server, b.broker)
            await wait_until(lambda: not b.broker.healthy(), what="b notices")
            await wait_until(lambda: b.broker.stats["rolled_back"] == 1, what="b caught up, seeing the rollback")
            for i in (6, 7):
                await a.broker.publish(Broadcast("deploys:web", "e", {"i": i}))
            await b.wait_for(7)
            assert [d.payload["i"] for d in b.delivered] == [1, 2, 3, 4, 5, 6, 7]
        finally:
            await a.broker.close()
            await b.broker.close()
    with caplog.at_level(logging.WARNING, "pusherd.broker"):
        run(scenario())
    assert any("writes acknowledged before a failover were lost" in r.getMessage() for r in caplog.records)

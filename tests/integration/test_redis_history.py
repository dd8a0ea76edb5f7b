"""History and join races on real pusherd processes sharing a real redis-server (Python client).

A "slow" process reaches Redis through a TcpProxy that delays every chunk, so a Redis round
trip takes a visible time: what a join does before it is subscribed in Redis becomes testable.
"""

import threading
import time

import pytest

from pusherd_testing import TcpProxy, rails_token

pytestmark = pytest.mark.integration

HISTORY = {"history": [{"topics": "deploys:*", "size": 100, "ttl": 3600}], "max_recovery": 100}
DELAY = 0.05     # seconds each way between the slow process and Redis


def auth():
    token, csrf = rails_token(listen=["deploys:*"])
    return {"guardian_token": token, "csrf_token": csrf}


@pytest.fixture
def slow_link(redis_server):
    proxy = TcpProxy(redis_server.port, delay=DELAY)
    yield proxy
    proxy.close()


def offset(position):
    return int(position.rsplit(":", 1)[1])


def test_publish_positions_are_shared_by_the_processes(redis_server, pusherd_factory, phx_connect):
    a = pusherd_factory(dict(HISTORY, broker=redis_server.url))
    b = pusherd_factory(dict(HISTORY, broker=redis_server.url))
    positions = [(a, b)[i % 2].publish("deploys:web", "new_version", {"i": i})[1]["position"] for i in range(6)]
    assert [offset(p) for p in positions] == [1, 2, 3, 4, 5, 6]
    assert len({p.rsplit(":", 1)[0] for p in positions}) == 1
    # A client on B recovers what was published through A and B, with the same positions.
    c = phx_connect(b.ws_url)
    status, response, _ = c.join("deploys:web", dict(auth(), since=positions[2]))
    assert (status, response) == ("ok", {"recovered": True, "position": positions[5]})
    got = [c.recv() for _ in range(3)]
    assert [(m["payload"]["i"], m["ref"]) for m in got] == [(3, positions[3]), (4, positions[4]), (5, positions[5])]
    status, body = a.publish("public:plain", "e", {})
    assert status == 200 and "position" not in body


def test_a_plain_join_is_answered_once_redis_delivers_the_topic(redis_server, slow_link, pusherd_factory,
                                                                  phx_connect):
    """The join reply waits for the SUBSCRIBE to take effect: an event published on another
    process right after the client saw its reply is not lost (it was, before the fix)."""
    fast = pusherd_factory({"broker": redis_server.url})
    slow = pusherd_factory({"broker": "redis://127.0.0.1:%d/0" % slow_link.port})
    for round_ in range(3):
        topic = "public:race-%d" % round_
        c = phx_connect(slow.ws_url)
        assert c.join(topic)[0] == "ok"
        assert fast.publish(topic, "news", {"round": round_})[0] == 200
        assert c.expect(event="news", timeout=5)["payload"] == {"round": round_}
        c.assert_silent(0.2)
    # A second member of a topic already subscribed is answered at once (no round trip).
    c2 = phx_connect(slow.ws_url)
    assert c2.join("public:race-0")[0] == "ok"


@pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])
def test_recovering_join_while_another_process_publishes(redis_server, slow_link, pusherd_factory, phx_connect,
                                                          vsn):
    """The replay/live race on Redis: events keep coming from process A while the client's join
    with `since` is recovering on the slow process B; it gets every offset once, in order."""
    history = {"history": [{"topics": "deploys:*", "size": 300, "ttl": 3600}], "max_recovery": 300}
    a = pusherd_factory(dict(history, broker=redis_server.url))
    b = pusherd_factory(dict(history, broker="redis://127.0.0.1:%d/0" % slow_link.port))
    since = a.publish("deploys:race", "e", {"i": 0})[1]["position"]
    sent, go, N = [], threading.Event(), 200

    def publisher():
        for i in range(1, N + 1):     # every ~10 ms for 2 s, across the join's round trips
            sent.append(a.publish("deploys:race", "e", {"i": i})[1]["position"])
            if i == 10:
                go.set()
            threading.Event().wait(0.01)
    thread = threading.Thread(target=publisher)
    thread.start()
    try:
        assert go.wait(5)
        c = phx_connect(b.ws_url, vsn=vsn)
        status, response, _ = c.join("deploys:race", dict(auth(), since=since))
        during = len(sent)
    finally:
        thread.join(10)
    assert status == "ok" and response["recovered"] is True
    assert during < N, "the publisher finished before the join: no race"
    got = [offset(c.expect(event="e", timeout=5)["ref"]) for _ in range(N)]
    assert got == list(range(2, N + 2)), (str(got), response)
    c.assert_silent(0.3)


def test_recovering_join_while_redis_is_down_is_answered_at_once(redis_server, pusherd_factory, phx_connect):
    a = pusherd_factory(dict(HISTORY, broker=redis_server.url))
    since = a.publish("deploys:down", "e", {})[1]["position"]
    redis_server.kill()
    deadline = time.monotonic() + 10
    while a.request("GET", "/healthz", timeout=3)[0] != 503:
        assert time.monotonic() < deadline, a.log()
        time.sleep(0.05)
    c = phx_connect(a.ws_url)
    started = time.monotonic()
    status, response, _ = c.join("deploys:down", dict(auth(), since=since))
    assert (status, response) == ("ok", {"recovered": False, "position": None})
    assert time.monotonic() - started < 1.0
    redis_server.start()           # back (empty: the history is lost): a later rejoin learns the new epoch
    a.wait_log("connected again", timeout=10)
    c2 = phx_connect(a.ws_url)
    status, response, _ = c2.join("deploys:down", dict(auth(), since=since))
    assert status == "ok" and response["recovered"] is False
    assert response["position"].rsplit(":", 1)[0] != since.rsplit(":", 1)[0]

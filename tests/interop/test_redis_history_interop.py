"""Recovery across pusherd processes sharing one real Redis, with the real phoenix.js (1.8 and 1.2)
and pusherd's page helper (pusherd-recovery.js): the history lives in Redis, so a client recovers
whichever process it comes back to, and after a pusherd restart.
"""

import pytest

from pusherd_testing import TcpProxy, rails_token

pytestmark = pytest.mark.interop

FAST = {"reconnectAfterMs": 100, "rejoinAfterMs": 100}


def config(redis_server, size=10):
    return {"broker": redis_server.url, "history": [{"topics": "deploys:*", "size": size, "ttl": 3600}],
            "max_recovery": 50}


def join_params():
    token, csrf = rails_token(listen=["deploys:*"])
    return {"guardian_token": token, "csrf_token": csrf}


def joined(c, url):
    c.connect(url, **FAST)
    c.expect(type="open")
    c.send({"cmd": "join", "id": "d", "topic": "deploys:web", "params": join_params(), "recovery": {}})
    c.expect(type="join", id="d", status="ok")


def offset(ref):
    return int(ref.rsplit(":", 1)[1])


@pytest.fixture
def proxy():
    proxies = []

    def make(port):
        proxies.append(TcpProxy(port))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


@pytest.mark.parametrize("version", ["1.8", "1.2"])
def test_after_a_pusherd_restart_the_client_recovers_from_redis(redis_server, pusherd_factory, phx, version):
    a = pusherd_factory(config(redis_server))
    b = pusherd_factory(config(redis_server))
    c = phx(version)
    joined(c, a.ws_url)
    a.publish("deploys:web", "new_version", {"n": 1})
    assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": 1}
    a.stop()                              # the process the client is on goes away ...
    c.expect(type="close")
    for n in (2, 3, 4):                   # ... deploys happen meanwhile, through the other process
        assert b.publish("deploys:web", "new_version", {"n": n})[0] == 200
    a.start()                             # same port: phoenix.js reconnects and rejoins with `since`
    rejoin = c.expect(type="join", id="d", status="ok", timeout=15)
    assert rejoin["response"]["recovered"] is True
    got = [c.expect(type="event", id="d", event="new_version") for _ in range(3)]
    assert [e["payload"]["n"] for e in got] == [2, 3, 4]
    assert [offset(e["ref"]) for e in got] == [2, 3, 4]
    b.publish("deploys:web", "new_version", {"n": 5})     # then live, from the other process
    assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": 5}
    assert [e["payload"]["n"] for e in c.events(id="d")] == [1, 2, 3, 4, 5]
    c.expect_none(type="gap", within=0.2)


@pytest.mark.parametrize("version", ["1.8", "1.2"])
def test_rejoin_on_the_other_process_recovers_exactly_the_missed_events(redis_server, pusherd_factory, phx,
                                                                        proxy, version):
    a = pusherd_factory(config(redis_server))
    b = pusherd_factory(config(redis_server))
    net = proxy(a.port)
    c = phx(version)
    joined(c, "ws://127.0.0.1:%d/events" % net.port)
    a.publish("deploys:web", "new_version", {"n": 1})
    c.expect(type="event", id="d", event="new_version")
    net.blocked = True                    # the network drops ...
    net.cut()
    c.expect(type="close")
    for n in (2, 3, 4):                   # ... deploys are published on the process it was on ...
        a.publish("deploys:web", "new_version", {"n": n})
    net.target_port = b.port              # ... and it comes back through the balancer to the other one
    net.blocked = False
    rejoin = c.expect(type="join", id="d", status="ok", timeout=10)
    assert rejoin["response"]["recovered"] is True and offset(rejoin["response"]["position"]) == 4
    b.wait_log("joined deploys:web")      # it is B that answered
    for n in (2, 3, 4):
        assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": n}
    a.publish("deploys:web", "new_version", {"n": 5})     # live, from the process it left
    assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": 5}
    assert [e["payload"]["n"] for e in c.events(id="d")] == [1, 2, 3, 4, 5]
    assert [offset(e["ref"]) for e in c.events(id="d")] == [1, 2, 3, 4, 5]
    c.expect_none(type="gap", within=0.2)


def test_history_overflow_on_redis_reports_a_gap(redis_server, pusherd_factory, phx, proxy):
    a = pusherd_factory(config(redis_server, size=3))
    b = pusherd_factory(config(redis_server, size=3))
    net = proxy(a.port)
    c = phx("1.8")
    joined(c, "ws://127.0.0.1:%d/events" % net.port)
    a.publish("deploys:web", "new_version", {"n": 1})
    c.expect(type="event", id="d", event="new_version")
    net.blocked = True
    net.cut()
    c.expect(type="close")
    for n in range(2, 8):                 # 6 missed, the history keeps 3
        b.publish("deploys:web", "new_version", {"n": n})
    net.target_port = b.port
    net.blocked = False
    rejoin = c.expect(type="join", id="d", status="ok", timeout=10)
    assert rejoin["response"]["recovered"] is False and offset(rejoin["response"]["position"]) == 7
    c.expect(type="gap", id="d")
    c.expect_none(type="event", id="d", within=0.3)


@pytest.mark.parametrize("version", ["1.8", "1.2"])
def test_flushall_loses_the_history_the_client_is_told_with_a_new_epoch(redis_server, pusherd_factory, phx,
                                                                        proxy, version):
    a = pusherd_factory(config(redis_server))
    net = proxy(a.port)
    c = phx(version)
    joined(c, "ws://127.0.0.1:%d/events" % net.port)
    _, body = a.publish("deploys:web", "new_version", {"n": 1})
    c.expect(type="event", id="d", event="new_version")
    net.blocked = True
    net.cut()
    c.expect(type="close")
    redis_server.client().flushall()      # the history is lost
    _, after = a.publish("deploys:web", "new_version", {"n": 2})
    net.blocked = False
    rejoin = c.expect(type="join", id="d", status="ok", timeout=10)
    position = rejoin["response"]["position"]
    assert rejoin["response"]["recovered"] is False and position == after["position"]
    assert position.rsplit(":", 1)[0] != body["position"].rsplit(":", 1)[0]      # a new epoch
    assert c.expect(type="gap", id="d")["response"]["position"] == position
    c.expect_none(type="event", id="d", within=0.3)
    # The helper now holds the new position: the next deploy arrives live and a later rejoin recovers.
    a.publish("deploys:web", "new_version", {"n": 3})
    assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": 3}

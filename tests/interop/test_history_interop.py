"""Recovery of missed events with the real phoenix.js and pusherd's page helper (pusherd-recovery.js).

A client joined to deploys:web drops its connection, three deploy events are published, it
reconnects and rejoins BY ITSELF with `since` (the helper keeps it up to date) and receives
exactly the three, in order, then live ones.
"""

import pytest

from pusherd_testing import TcpProxy, rails_token

pytestmark = pytest.mark.interop

HISTORY = {"history": [{"topics": "deploys:*", "size": 10, "ttl": 3600}], "max_recovery": 50}
FAST = {"reconnectAfterMs": 100, "rejoinAfterMs": 100}


def join_params():
    token, csrf = rails_token(listen=["deploys:*"])
    return {"guardian_token": token, "csrf_token": csrf}


def payloads(client, id):
    return [e["payload"]["n"] for e in client.events(id=id)]


@pytest.fixture
def proxy():
    proxies = []

    def make(port):
        p = TcpProxy(port)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


@pytest.mark.parametrize("version", ["1.8", "1.5", "1.2"])
def test_missed_deploys_are_replayed_after_a_network_drop(pusherd_factory, phx, proxy, version):
    d = pusherd_factory(HISTORY)
    net = proxy(d.port)
    c = phx(version)
    c.connect("ws://127.0.0.1:%d/events" % net.port, **FAST)
    c.expect(type="open")
    c.send({"cmd": "join", "id": "d", "topic": "deploys:web", "params": join_params(), "recovery": {}})
    c.expect(type="join", id="d", status="ok")
    d.publish("deploys:web", "new_version", {"n": 1})
    first = c.expect(type="event", id="d", event="new_version")
    assert first["ref"].endswith(":1")

    net.blocked = True      # the network drops; the client keeps retrying in vain
    net.cut()
    c.expect(type="close")
    for n in (2, 3, 4):
        d.publish("deploys:web", "new_version", {"n": n})
    net.blocked = False     # back: phoenix.js reconnects and rejoins by itself
    rejoin = c.expect(type="join", id="d", status="ok", timeout=10)
    assert rejoin["response"]["recovered"] is True
    for n in (2, 3, 4):
        assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": n}
    d.publish("deploys:web", "new_version", {"n": 5})
    assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": 5}
    assert payloads(c, "d") == [1, 2, 3, 4, 5]        # no duplicate, no gap
    c.expect_none(type="gap", within=0.2)


@pytest.mark.parametrize("version", ["1.8", "1.2"])
def test_memory_broker_restart_reports_a_gap(pusherd_factory, phx, version):
    d = pusherd_factory(HISTORY)
    c = phx(version)
    c.connect(d.ws_url, **FAST)
    c.send({"cmd": "join", "id": "d", "topic": "deploys:web", "params": join_params(), "recovery": {}})
    c.expect(type="join", id="d", status="ok")
    d.publish("deploys:web", "new_version", {"n": 1})
    c.expect(type="event", id="d", event="new_version")
    d.restart()           # history was in memory: lost
    d.publish("deploys:web", "new_version", {"n": 2})   # usually before the client is back
    rejoin = c.expect(type="join", id="d", status="ok", timeout=15)
    assert rejoin["response"]["recovered"] is False
    gap = c.expect(type="gap", id="d")
    assert gap["response"]["position"] == rejoin["response"]["position"]


def test_history_overflow_reports_a_gap(pusherd_factory, phx, proxy):
    d = pusherd_factory(dict(HISTORY, history=[{"topics": "deploys:*", "size": 3, "ttl": 3600}]))
    net = proxy(d.port)
    c = phx("1.8")
    c.connect("ws://127.0.0.1:%d/events" % net.port, **FAST)
    c.send({"cmd": "join", "id": "d", "topic": "deploys:web", "params": join_params(), "recovery": {}})
    c.expect(type="join", id="d", status="ok")
    d.publish("deploys:web", "new_version", {"n": 1})
    c.expect(type="event", id="d", event="new_version")
    net.blocked = True
    net.cut()
    c.expect(type="close")
    for n in range(2, 8):
        d.publish("deploys:web", "new_version", {"n": n})
    net.blocked = False
    rejoin = c.expect(type="join", id="d", status="ok", timeout=10)
    assert rejoin["response"]["recovered"] is False
    c.expect(type="gap", id="d")
    c.expect_none(type="event", id="d", within=0.3)


def test_initial_position_from_the_publish_response_closes_the_page_load_gap(pusherd_factory, phx):
    # Rails renders the position of the last deploy into the page; a deploy that happens
    # while the page loads (before the join) is then replayed on the first join.
    d = pusherd_factory(HISTORY)
    _, body = d.publish("deploys:web", "new_version", {"n": 1})
    d.publish("deploys:web", "new_version", {"n": 2})
    c = phx("1.8")
    c.connect(d.ws_url, **FAST)
    c.send({"cmd": "join", "id": "d", "topic": "deploys:web", "params": join_params(),
            "recovery": {"since": body["position"]}})
    join = c.expect(type="join", id="d", status="ok")
    assert join["response"]["recovered"] is True
    assert c.expect(type="event", id="d", event="new_version")["payload"] == {"n": 2}

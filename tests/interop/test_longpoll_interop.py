"""Interop: the long-poll transport with the real phoenix.js 1.2, 1.5, 1.7 and 1.8 (``transport:
LongPoll``; under Node through npm's xhr2 as the browser's XMLHttpRequest, see driver.js).

Each version joins a public and a token topic, receives POSTed events in order, pushes ``msg``
and gets the reply, and recovers what it missed with ``since``; a socket token is verified at
the long-poll open; 1.8.16 rejoins by itself after its session is gone (the 410 of section 5.2);
and a page whose polls alternate between two pusherd processes on Redis gets every event once.
"""

from __future__ import annotations

import pytest

from longpoll_testing import RequestProxy
from pusherd_testing import rails_token

pytestmark = pytest.mark.interop

ORIGIN = "http://localhost:3000"
FAST = dict(reconnectAfterMs=100, rejoinAfterMs=100, timeout=5000)
HISTORY = {"history": [{"topics": "deploys:*", "size": 10, "ttl": 3600}], "max_recovery": 50}
XHR = {"PHX_XHR": "1"}


def longpoll(phx, version):
    return phx(version, env=XHR)


def deploy_params():
    token, csrf = rails_token(listen=["deploys:*"])
    return {"guardian_token": token, "csrf_token": csrf}


@pytest.mark.parametrize("version", ["1.2", "1.5", "1.7", "1.8"])
def test_long_poll_joins_receives_pushes_and_recovers(pusherd_factory, phx, version):
    d = pusherd_factory(HISTORY)
    c = longpoll(phx, version)
    c.connect(d.ws_url, transport="longpoll", origin=ORIGIN, trace_frames=True, **FAST)
    c.expect(type="open")
    assert any(line.get("type") == "http_request" and "/events/longpoll?" in line["url"] for line in c.lines)
    public = "public:lp-%s" % version.replace(".", "")
    c.join("pub", public)
    c.expect(type="join", id="pub", status="ok")
    c.join("dep", "deploys:web", deploy_params())
    c.expect(type="join", id="dep", status="ok")

    for n in (1, 2, 3):
        assert d.publish("deploys:web", "new_version", {"n": n})[0] == 200
    events = [c.expect(type="event", id="dep", event="new_version") for _ in range(3)]
    assert [e["payload"] for e in events] == [{"n": 1}, {"n": 2}, {"n": 3}]

    c.push("pub", "msg", {"body": "hello"}, tag="p1")
    reply = c.expect(type="push_reply", tag="p1")
    assert reply["status"] == "ok", c.transcript()
    assert c.expect(type="event", id="pub", event="msg")["payload"] == {"body": "hello"}

    # What a page missed, from the position it last saw (the first event's ref is its position).
    missed_from = events[0]["ref"]
    later = longpoll(phx, version)
    later.connect(d.ws_url, transport="longpoll", origin=ORIGIN, **FAST)
    later.expect(type="open")
    later.join("dep", "deploys:web", dict(deploy_params(), since=missed_from))
    rejoin = later.expect(type="join", id="dep", status="ok")
    assert rejoin["response"]["recovered"] is True
    assert [later.expect(type="event", id="dep", event="new_version")["payload"] for _ in range(2)] == \
        [{"n": 2}, {"n": 3}]


@pytest.mark.parametrize("version,style", [("1.5", "params"), ("1.7", "params"), ("1.8", "authToken")])
def test_a_socket_token_is_verified_at_the_long_poll_open(pusherd_factory, phx, version, style):
    d = pusherd_factory()
    topic = "private:lp-sock-%s" % version.replace(".", "")
    token, csrf = rails_token(listen=[topic])
    c = longpoll(phx, version)
    if style == "authToken":   # 1.8 sends it in X-Phoenix-AuthToken
        c.connect(d.ws_url, {"csrf_token": csrf}, transport="longpoll", origin=ORIGIN, authToken=token, **FAST)
    else:
        c.connect(d.ws_url, {"guardian_token": token, "csrf_token": csrf}, transport="longpoll", origin=ORIGIN,
                  **FAST)
    c.expect(type="open")
    c.join("c1", topic, {})
    assert c.expect(type="join", id="c1")["status"] == "ok", c.transcript()
    assert d.publish(topic, "notification", {"n": 1})[0] == 200
    assert c.expect(type="event", id="c1", event="notification")["payload"] == {"n": 1}

    stale, csrf = rails_token(listen=[topic], ttl=-60)
    bad = longpoll(phx, version)
    if style == "authToken":
        bad.connect(d.ws_url, {"csrf_token": csrf}, transport="longpoll", origin=ORIGIN, authToken=stale, **FAST)
    else:
        bad.connect(d.ws_url, {"guardian_token": stale, "csrf_token": csrf}, transport="longpoll", origin=ORIGIN,
                    **FAST)
    bad.expect(type="error")
    bad.expect_none(type="open", within=0.5)
    d.wait_log("refused long-poll open: socket token token_expired")
    assert stale not in d.log()


def test_phoenix_1_8_16_rejoins_when_its_session_is_gone(pusherd_factory, phx):
    """A poll naming a session the process does not know (here: another process took over the
    address) is answered 410; 1.8.16 then reconnects and rejoins by itself."""
    a, b = pusherd_factory(), pusherd_factory()
    proxy = RequestProxy([a.port, b.port], mode="fixed")
    try:
        c = longpoll(phx, "1.8")
        c.connect("ws://127.0.0.1:%d/events" % proxy.port, transport="longpoll", origin=ORIGIN, **FAST)
        c.expect(type="open")
        c.join("pub", "public:lp-gone")
        c.expect(type="join", id="pub", status="ok")
        proxy.switch_to(1)           # the next poll reaches b, which never heard of the session
        c.expect(type="close", code=3410, timeout=15)
        c.expect(type="join", id="pub", status="ok", timeout=10)
        assert b.publish("public:lp-gone", "after", {"n": 1})[0] == 200
        assert c.expect(type="event", id="pub", event="after")["payload"] == {"n": 1}
    finally:
        proxy.close()


@pytest.mark.parametrize("version", ["1.2", "1.8"])
def test_polls_alternating_between_two_processes_get_every_event_once(pusherd_factory, redis_server, phx, version):
    shared = {"broker": redis_server.url}
    a, b = pusherd_factory(shared), pusherd_factory(shared)
    proxy = RequestProxy([a.port, b.port])
    try:
        c = longpoll(phx, version)
        c.connect("ws://127.0.0.1:%d/events" % proxy.port, transport="longpoll", origin=ORIGIN, **FAST)
        c.expect(type="open")
        c.join("pub", "public:lp-two")
        c.expect(type="join", id="pub", status="ok", timeout=10)
        for n in range(1, 11):
            assert (a if n % 2 else b).publish("public:lp-two", "tick", {"n": n})[0] == 200
        got = [c.expect(type="event", id="pub", event="tick", timeout=10)["payload"]["n"] for _ in range(10)]
        assert sorted(got) == list(range(1, 11))
        c.push("pub", "msg", {"body": "through either"}, tag="p")
        assert c.expect(type="push_reply", tag="p")["status"] == "ok"
        assert c.expect(type="event", id="pub", event="msg")["payload"] == {"body": "through either"}
        c.expect_none(type="event", event="tick", within=0.5)
        c.expect_none(type="close", within=0.1)
        assert set(proxy.ports_seen("GET")) == {a.port, b.port}
        assert set(proxy.ports_seen("POST")) == {a.port, b.port}
    finally:
        proxy.close()

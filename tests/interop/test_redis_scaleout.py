"""The real phoenix.js on two pusherd processes sharing one real Redis: one service for the browser.

phoenix.js 1.8 (V2 arrays) on process A, 1.2 (V1 objects) on process B. Shared fixtures
(`redis_server`, `pusherd_factory`) come from tests/conftest.py; this directory's conftest provides
the Node driver (`phx`).
"""

import time

import pytest

from pusherd.client import mint_token

pytestmark = pytest.mark.interop

ORIGIN = "http://localhost:3000"
FAST = dict(heartbeatIntervalMs=1000, reconnectAfterMs=100, rejoinAfterMs=100, timeout=3000)


def wait_health(daemon, status, timeout=10.0):
    deadline = time.monotonic() + timeout
    while daemon.request("GET", "/healthz", timeout=3)[0] != status:
        assert time.monotonic() < deadline, "healthz never answered %s:\n%s" % (status, daemon.log())
        time.sleep(0.05)


def auth(daemon, listen, publish=()):
    csrf = "csrf-token-from-the-page"
    token = mint_token(daemon.settings["guardian_secret"], sub={"id": 1}, listen=listen, publish=publish,
                       csrf_token=csrf, issuer="od-web-test")
    return {"guardian_token": token, "csrf_token": csrf}


def joined(client, daemon, version, params):
    client.connect(daemon.ws_url, origin=ORIGIN, version=version, **FAST)
    client.expect(type="open")
    client.join("c1", "private:ops", params)
    assert client.expect(type="join", id="c1")["status"] == "ok"


def test_phoenix_clients_on_two_processes_share_publishes_pushes_and_outages(redis_server, pusherd_factory, phx):
    a = pusherd_factory({"broker": redis_server.url})
    b = pusherd_factory({"broker": redis_server.url})
    on_a, on_b = phx("1.8"), phx("1.2")
    joined(on_a, a, "1.8", auth(a, ["private:*"]))
    joined(on_b, b, "1.2", auth(b, ["private:*"], publish=["private:ops"]))

    # An HTTP publish to A reaches the browser on A and the one on B.
    assert a.publish("private:ops", "new_version", {"version": "abc"})[0] == 200
    for c in (on_a, on_b):
        assert c.expect(type="event", id="c1", event="new_version")["payload"] == {"version": "abc"}

    # A client push on B reaches the member on A (and B's own member).
    on_b.push("c1", "msg", {"body": "hi"}, tag="p1")
    assert on_b.expect(type="push_reply", tag="p1")["status"] == "ok"
    for c in (on_a, on_b):
        assert c.expect(type="event", id="c1", event="msg")["payload"] == {"body": "hi"}

    # Redis dies: the push is refused with "unavailable"; the sockets stay open.
    redis_server.kill()
    wait_health(b, 503)
    on_b.push("c1", "msg", {"body": "lost"}, tag="p2")
    reply = on_b.expect(type="push_reply", tag="p2")
    assert (reply["status"], reply["response"]) == ("error", {"reason": "unavailable"})
    redis_server.start()
    wait_health(a, 200)
    wait_health(b, 200)

    # Delivery resumes without a reconnect of the browsers, exactly once.
    assert b.publish("private:ops", "new_version", {"version": "def"})[0] == 200
    for c in (on_a, on_b):
        assert c.expect(type="event", id="c1", event="new_version")["payload"] == {"version": "def"}
        c.expect_none(type="event", within=0.3)
        assert [e["payload"]["version"] for e in c.events(event="new_version")] == ["abc", "def"]
        assert [l for l in c.lines if l.get("type") == "transport_connect"].__len__() == 1

"""Several real pusherd processes on one real redis-server: they behave as one service.

Each test starts its own redis-server on a free port (`redis_server`), and pusherd processes with
`broker: redis://127.0.0.1:PORT/0`. Outages are real: the server is killed and started again on the
same port, or its pub/sub connections are killed with CLIENT KILL TYPE pubsub.
"""

import json
import shutil
import socket
import time

import pytest

from pusherd_testing import PUBLISH_SECRET, RedisServer, free_port, require

pytestmark = pytest.mark.integration


def wait_health(daemon, status, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        code, body, _ = daemon.request("GET", "/healthz", timeout=3)
        if code == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError("healthz stayed %s %r, wanted %s\n%s" % (code, body, status, daemon.log()))
        time.sleep(0.05)


def heartbeat(client):
    ref = client.next_ref()
    client.send(None, ref, "phoenix", "heartbeat", {})
    reply = client.expect(topic="phoenix", event="phx_reply", ref=ref)
    assert reply["payload"]["status"] == "ok"


def events(client, event, n, timeout=5.0):
    return [client.expect(event=event, timeout=timeout)["payload"] for _ in range(n)]


@pytest.fixture
def pair(redis_server, pusherd_factory):
    a = pusherd_factory({"broker": redis_server.url, "client_events": ["msg", "m"]})
    b = pusherd_factory({"broker": redis_server.url, "client_events": ["msg", "m"]})
    return a, b


def test_publish_on_one_process_reaches_members_on_both(pair, phx_connect):
    a, b = pair
    ca = phx_connect(a.ws_url, vsn="2.0.0")
    cb = phx_connect(b.ws_url, vsn="1.0.0")
    ca.join("public:room")
    _, _, join_ref = cb.join("public:room")
    status, body = a.publish("public:room", "news", {"n": 1})
    assert (status, body["status"]) == (200, "ok")
    assert ca.expect(event="news")["payload"] == {"n": 1}
    assert cb.expect(event="news")["payload"] == {"n": 1}
    # A client push on b reaches the member on a (and the sender itself), once each.
    assert cb.push("public:room", "msg", {"body": "hi"}, join_ref=join_ref) == ("ok", {})
    assert ca.expect(event="msg")["payload"] == {"body": "hi"}
    assert cb.expect(event="msg")["payload"] == {"body": "hi"}
    # Per-topic order for one publisher, across processes.
    for i in range(30):
        assert b.publish("public:room", "seq", {"i": i})[0] == 200
    assert [p["i"] for p in events(ca, "seq", 30)] == list(range(30))
    assert [p["i"] for p in events(cb, "seq", 30)] == list(range(30))
    ca.assert_silent(0.3)
    cb.assert_silent(0.1)
    status, body, _ = a.request("GET", "/healthz")
    assert status == 200 and body["broker"] == "redis"   # the kind only: never the address


@pytest.mark.parametrize("how", ["kill-server", "client-kill-pubsub"])
def test_outage_refuses_keeps_serving_and_resumes_without_duplicates(pair, redis_server, phx_connect, how):
    a, b = pair
    ca = phx_connect(a.ws_url)
    cb = phx_connect(b.ws_url)
    ca.join("public:o")
    _, _, join_ref = cb.join("public:o")
    assert a.publish("public:o", "m", {"i": 0})[0] == 200
    assert ca.expect(event="m")["payload"] == cb.expect(event="m")["payload"] == {"i": 0}

    if how == "kill-server":
        redis_server.kill()
        for d in (a, b):
            body = wait_health(d, 503)
            assert body["status"] == "unavailable" and body["broker"] == "redis"
            assert redis_server.url not in json.dumps(body)
        lost = {"topic": "public:o", "event": "m", "payload": {"lost": 1}}
        status, body, headers = a.request("POST", "/publish", lost, {"Authorization": "Bearer " + PUBLISH_SECRET})
        assert status == 503 and body["error"].startswith("broker unavailable") and headers["Retry-After"]
        assert cb.push("public:o", "m", {"lost": 2}, join_ref=join_ref) == ("error", {"reason": "unavailable"})
        # Sockets are still served: heartbeats answered, new clients join.
        heartbeat(ca)
        late = phx_connect(b.ws_url)
        assert late.join("public:o")[0] == "ok"
        for d in (a, b):         # several reconnect attempts fail: still one warning per outage
            d.wait_log("reconnect attempt 3 failed", timeout=10)
        redis_server.start()
    else:
        assert redis_server.client().client_kill_filter(_type="pubsub") == 2
        late = None
    for d in (a, b):
        d.wait_log("connected again", timeout=10)
        wait_health(d, 200)
    # Delivery resumes, nothing lost after recovery, nothing delivered twice.
    for i in range(1, 11):
        assert a.publish("public:o", "m", {"i": i})[0] == 200
    assert cb.push("public:o", "m", {"i": 11}, join_ref=join_ref) == ("ok", {})
    for c in filter(None, (ca, cb, late)):
        assert [p["i"] for p in events(c, "m", 11)] == list(range(1, 12))
        c.assert_silent(0.3)
    for d in (a, b):
        assert sum("unavailable (" in line for line in d.lines) == 1, d.log()
        assert sum("connected again" in line for line in d.lines) == 1, d.log()
        assert d.proc.poll() is None


def test_redis_down_at_start_then_up(tmp_path, pusherd_factory, phx_connect):
    require(shutil.which("redis-server") is not None, "redis-server not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path, port=free_port())
    try:
        d = pusherd_factory({"broker": server.url})
        d.wait_log("unavailable at start")
        body = wait_health(d, 503)
        assert body["broker"] == "redis"
        c = phx_connect(d.ws_url)
        assert c.join("public:boot")[0] == "ok"             # sockets are served without Redis
        assert d.publish("public:boot", "m", {})[0] == 503
        server.start()
        wait_health(d, 200)
        assert d.publish("public:boot", "m", {"after": True})[0] == 200
        assert c.expect(event="m")["payload"] == {"after": True}
    finally:
        server.stop()


def test_processes_share_a_port_with_reuse_port(redis_server, pusherd_factory, phx_connect):
    port = free_port()
    a = pusherd_factory({"broker": redis_server.url, "reuse_port": True}, port=port)
    b = pusherd_factory({"broker": redis_server.url, "reuse_port": True}, port=port)
    # The kernel spreads new connections over both processes.
    for _ in range(24):
        assert a.request("GET", "/healthz")[0] == 200
    deadline = time.monotonic() + 5
    while not all(any("GET /healthz" in line for line in d.lines) for d in (a, b)):
        assert time.monotonic() < deadline, "one process got no request:\n%s\n---\n%s" % (a.log(), b.log())
        time.sleep(0.05)
    # Whichever process each client landed on, a publish through the shared port reaches all.
    clients = [phx_connect(a.ws_url) for _ in range(6)]
    for c in clients:
        c.join("public:shared-port")
    assert a.publish("public:shared-port", "m", {"x": 1})[0] == 200
    for c in clients:
        assert c.expect(event="m")["payload"] == {"x": 1}
        c.assert_silent(0.1)


def test_without_reuse_port_a_second_process_cannot_bind(pusherd_factory):
    port = free_port()
    pusherd_factory({}, port=port)
    with pytest.raises(AssertionError, match="did not start"):
        pusherd_factory({}, port=port)

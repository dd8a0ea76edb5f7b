"""The fast paths (PUSHERD_FAST=1, the default) answer byte for byte as the plain Tornado ones.

The whole integration suite also runs with PUSHERD_FAST=0 in .ci/run; these tests put the two
side by side on the same requests.
"""

import http.client
import json

import pytest

from pusherd_testing import PUBLISH_SECRET

AUTH = {"Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": "application/json"}

REQUESTS = [
    ("POST", "/publish", json.dumps({"topic": "public:fast", "event": "e", "payload": {"n": 1}}), AUTH),
    ("POST", "/publish?x=1", json.dumps([{"topic": "public:fast", "event": "e"}] * 3), AUTH),
    ("POST", "/publish", json.dumps({"topic": "public:fast", "event": "e"}), {"Authorization": "Bearer nope"}),
    ("POST", "/publish", json.dumps({"topic": "public:fast", "event": "e"}), {}),
    ("POST", "/publish", "{not json", AUTH),
    ("POST", "/publish", json.dumps({"topic": "bad topic!", "event": "e"}), AUTH),
    ("POST", "/publish", "topic=public%3Afast&event=e&payload=%7B%7D",
     {"Authorization": PUBLISH_SECRET, "Content-Type": "application/x-www-form-urlencoded"}),
    ("POST", "/publish", "x" * 5000, AUTH),  # over max_publish_bytes below: 413
    ("GET", "/publish", None, AUTH),
    ("PUT", "/publish", "{}", AUTH),
]


def exchange(port, method, path, body, headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        got = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders() if k.lower() != "date"}
        return resp.status, hdrs, got
    finally:
        conn.close()


def test_publish_answers_are_identical_with_and_without_the_fast_paths(pusherd_factory, phx_connect):
    config = {"max_publish_bytes": 4096}
    fast = pusherd_factory(config, extra_env={"PUSHERD_FAST": "1"})
    plain = pusherd_factory(config, extra_env={"PUSHERD_FAST": "0"})
    clients = {}
    for d in (fast, plain):
        clients[d] = phx_connect(d.ws_url)
        assert clients[d].join("public:fast")[0] == "ok"
    for method, path, body, headers in REQUESTS:
        a = exchange(fast.port, method, path, body, headers)
        b = exchange(plain.port, method, path, body, headers)
        assert a == b, (method, path, body[:40] if body else body)
    # and the same events were delivered by both
    for d in (fast, plain):
        got = [clients[d].expect(topic="public:fast", event="e")["payload"] for _ in range(5)]
        assert got == [{"n": 1}, {}, {}, {}, {}]
        clients[d].assert_silent(0.2)


@pytest.mark.parametrize("fast", ["1", "0"])
def test_keep_alive_publishes_and_websocket_on_one_port(pusherd_factory, phx_connect, fast):
    d = pusherd_factory(extra_env={"PUSHERD_FAST": fast})
    client = phx_connect(d.ws_url)
    assert client.join("public:ka")[0] == "ok"
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
    for i in range(20):  # one connection, many requests
        conn.request("POST", "/publish", body=json.dumps({"topic": "public:ka", "event": "n", "payload": {"i": i}}),
                     headers=AUTH)
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (200, {"status": "ok", "published": 1})
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["connections"] == 1
    conn.close()
    assert [client.expect(topic="public:ka", event="n")["payload"]["i"] for _ in range(20)] == list(range(20))

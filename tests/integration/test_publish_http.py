"""The HTTP side against a real pusherd: /publish (auth, bodies, limits) and /healthz."""

import http.client
import json
import socket
import time

import pytest

from pusherd_testing import PUBLISH_SECRET

pytestmark = pytest.mark.integration


def post(daemon, body, headers=None, auth="Bearer " + PUBLISH_SECRET):
    hdrs = {"Content-Type": "application/json"}
    if auth is not None:
        hdrs["Authorization"] = auth
    hdrs.update(headers or {})
    return daemon.request("POST", "/publish", body, hdrs)


def test_healthz(pusherd_server):
    status, body, headers = pusherd_server.request("GET", "/healthz")
    assert status == 200 and body["status"] == "ok"
    assert headers["Content-Type"].startswith("application/json")


def test_publish_with_raw_secret_and_bearer(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:auth")
    for auth in (PUBLISH_SECRET, "Bearer " + PUBLISH_SECRET, "bearer " + PUBLISH_SECRET):
        status, body, _ = post(pusherd_server, {"topic": "public:auth", "event": "e", "payload": {"a": auth[:3]}},
                               auth=auth)
        assert status == 200, body
        assert c.expect(event="e")["payload"] == {"a": auth[:3]}


@pytest.mark.parametrize("auth", [None, "", "Bearer ", "wrong", "Bearer wrong", PUBLISH_SECRET + "x",
                                  PUBLISH_SECRET[:-1], "Basic " + PUBLISH_SECRET])
def test_wrong_or_missing_secret_is_401_and_delivers_nothing(pusherd_server, phx_connect, auth):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:secret")
    status, body, headers = post(pusherd_server, {"topic": "public:secret", "event": "e"}, auth=auth)
    assert status == 401 and "error" in body
    assert PUBLISH_SECRET not in json.dumps(body)
    c.assert_silent(0.3)


def test_secret_never_logged(pusherd_server):
    post(pusherd_server, {"topic": "public:x", "event": "e"}, auth="Bearer wrong-guess-secret")
    post(pusherd_server, {"topic": "public:x", "event": "e"})
    time.sleep(0.2)
    log = pusherd_server.log()
    assert PUBLISH_SECRET not in log and "wrong-guess-secret" not in log


@pytest.mark.parametrize("body,needle", [
    (b"not json", "JSON"),
    (b"[]", "empty"),
    (b"42", "object"),
    (b'{"event": "e"}', "topic"),
    (b'{"topic": "", "event": "e"}', "topic"),
    (b'{"topic": "has space", "event": "e"}', "topic"),
    (b'{"topic": "public:x"}', "event"),
    (b'{"topic": "public:x", "event": 5}', "event"),
    (b'{"topic": "public:x", "event": "phx_reply"}', "event"),
    (b'{"topic": "public:x", "event": "e", "payload": [1]}', "payload"),
    (b'{"topic": "public:x", "event": "e", "payload": "text"}', "payload"),
    (b'{"topic": "public:x", "event": "e", "extra": 1}', "extra"),
    (b'[{"topic": "public:x", "event": "e"}, {"topic": "public:y"}]', "item 1"),
    (b'{"topic": "public:x", "event": "e", "payload": ' + b"[" * 100000 + b"]" * 100000 + b"}", "JSON"),
    (b"\xff\xfe\x00garbage", "JSON"),
])
def test_malformed_bodies_are_400_with_a_reason(pusherd_server, phx_connect, body, needle):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:x")
    status, parsed, _ = post(pusherd_server, body)
    assert status == 400, parsed
    assert needle.lower() in parsed["error"].lower()
    c.assert_silent(0.2)


def test_form_encoded_publish(pusherd_server, phx_connect):
    from urllib.parse import urlencode
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:form")
    body = urlencode({"topic": "public:form", "event": "new_version", "payload": json.dumps({"v": "9"})}).encode()
    status, parsed, _ = post(pusherd_server, body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, parsed
    assert c.expect(event="new_version")["payload"] == {"v": "9"}


def test_payload_defaults_to_empty_object(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:default")
    assert post(pusherd_server, {"topic": "public:default", "event": "ping"})[0] == 200
    assert c.expect(event="ping")["payload"] == {}


def test_batch_publish_is_all_or_nothing(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:b1")
    c.join("public:b2")
    bad = [{"topic": "public:b1", "event": "one"}, {"topic": "public:b2", "event": "two", "payload": 3}]
    assert post(pusherd_server, bad)[0] == 400
    c.assert_silent(0.3)
    good = [{"topic": "public:b1", "event": "one"}, {"topics": ["public:b1", "public:b2"], "event": "two"}]
    status, body, _ = post(pusherd_server, good)
    assert status == 200 and body["published"] == 3
    got = [c.recv() for _ in range(3)]
    assert [(m["topic"], m["event"]) for m in got] == [("public:b1", "one"), ("public:b1", "two"), ("public:b2", "two")]


def test_oversized_body_is_413(pusherd_factory, phx_connect):
    d = pusherd_factory({"max_publish_bytes": 1000})
    c = phx_connect(d.ws_url)
    c.join("public:big")
    status, body, _ = post(d, {"topic": "public:big", "event": "e", "payload": {"x": "y" * 2000}})
    assert status == 413 and "max_publish_bytes" in body["error"]
    c.assert_silent(0.3)
    # the limit is about size, not about the request: a small one still works afterwards
    assert post(d, {"topic": "public:big", "event": "e", "payload": {"x": "y"}})[0] == 200


def test_oversized_chunked_body_is_413(pusherd_factory):
    d = pusherd_factory({"max_publish_bytes": 1000})
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
    conn.putrequest("POST", "/publish")
    conn.putheader("Authorization", PUBLISH_SECRET)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b'{"topic":"public:x","event":"e","payload":{"x":"' + b"y" * 3000 + b'"}}'
    try:
        for i in range(0, len(chunk), 500):
            part = chunk[i:i + 500]
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass
    resp = conn.getresponse()
    assert resp.status == 413


def test_get_on_publish_is_405_and_unknown_path_is_404(pusherd_server):
    assert pusherd_server.request("GET", "/publish")[0] == 405
    status, body, _ = pusherd_server.request("GET", "/nope")
    assert status == 404 and body == {"error": "not found"}


def test_slow_partial_request_does_not_block_others(pusherd_server):
    # slowloris-style: a client sends half a request line and stalls.
    s = socket.create_connection(("127.0.0.1", pusherd_server.port))
    s.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n")
    try:
        status, body, _ = pusherd_server.request("GET", "/healthz", timeout=3)
        assert status == 200
    finally:
        s.close()

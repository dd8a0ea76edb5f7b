"""The fast paths (PUSHERD_FAST=1, the default) answer byte for byte as the plain Tornado ones.

The whole integration suite also runs with PUSHERD_FAST=0 in .ci/run; these tests put the two
side by side on the same requests.
"""

import http.client
import json
import re
import socket
import time

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


# -- raw bytes: what only a hand-written client sends -------------------------------------------

def conversation(port, chunks, idle=0.4, pause=0.05):
    """Send `chunks` (with a pause between them) on one connection; every byte answered until the
    server closes or stays silent for `idle` seconds; Date values blanked."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for i, chunk in enumerate(chunks):
            if i:
                time.sleep(pause)
            s.sendall(chunk)
        s.settimeout(idle)
        data = b""
        while True:
            try:
                got = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                data += b"<reset>"
                break
            if not got:
                data += b"<closed>"
                break
            data += got
    return re.sub(rb"Date: [^\r]*", b"Date: -", data)


def publish(body, *extra, version=b"HTTP/1.1", auth=b"Bearer " + PUBLISH_SECRET.encode()):
    body = body.encode() if isinstance(body, str) else body
    lines = [b"POST /publish " + version, b"Host: 127.0.0.1", b"Content-Type: application/json",
             b"Authorization: " + auth, b"Content-Length: %d" % len(body)] + list(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def event(n):
    return json.dumps({"topic": "public:raw", "event": "e", "payload": {"n": n}})


UPGRADE = (b"GET /events/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")



def ws_text(text):
    """A masked client text frame (under 126 bytes)."""
    data, mask = text.encode(), b"\x01\x02\x03\x04"
    return bytes((0x81, 0x80 | len(data))) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def upgrade(*extra, path=b"/events/websocket?vsn=2.0.0"):
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13"] + list(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


JOIN = ws_text('["1","1","public:raw","phx_join",{}]')
ORIGIN = b"Origin: http://localhost:3000"

CONVERSATIONS = {
    # WebSocket upgrades: the front completes the ones pusherd accepts (fast/upgrade.py)
    "upgrade-then-join": [upgrade(ORIGIN), JOIN],
    "upgrade-and-join-in-one-write": [upgrade(ORIGIN) + JOIN],
    "upgrade-without-origin": [upgrade(), JOIN],
    "upgrade-split": [upgrade(ORIGIN)[:25], upgrade(ORIGIN)[25:], JOIN],
    "upgrade-legacy-path": [upgrade(ORIGIN, path=b"/events"), ws_text('{"topic":"public:raw","event":"phx_join","payload":{},"ref":"1"}')],
    "upgrade-v1": [upgrade(ORIGIN, path=b"/events/websocket?vsn=1.0.0"),
                   ws_text('{"topic":"public:raw","event":"phx_join","payload":{},"ref":"1"}')],
    "upgrade-phoenix-subprotocol": [upgrade(ORIGIN, b"Sec-WebSocket-Protocol: phoenix"), JOIN],
    "upgrade-bad-auth-token": [upgrade(ORIGIN, b"Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.bm9wZQ")],
    "upgrade-bad-socket-token": [upgrade(ORIGIN, path=b"/events/websocket?vsn=2.0.0&token=nope")],
    "upgrade-bad-origin": [upgrade(b"Origin: http://evil.example")],
    "upgrade-bad-vsn": [upgrade(ORIGIN, path=b"/events/websocket?vsn=9.9.9")],
    "upgrade-cross-site-without-origin": [upgrade(b"Sec-Fetch-Site: cross-site")],
    "upgrade-same-origin-fetch": [upgrade(b"Origin: http://evil.example", b"Sec-Fetch-Site: same-origin")],
    "upgrade-two-origins": [upgrade(ORIGIN, b"Origin: http://evil.example")],
    "upgrade-version-8": [upgrade(ORIGIN).replace(b"Version: 13", b"Version: 8")],
    "upgrade-bad-key": [upgrade(ORIGIN).replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"short")],
    "upgrade-no-upgrade-header": [upgrade(ORIGIN).replace(b"Upgrade: websocket\r\n", b"")],
    "upgrade-then-more-requests": [upgrade(b"Origin: http://evil.example")
                                   + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"],

    "pipelined": [publish(event(1)) + publish(event(2)) + publish(event(3))],
    "split-everywhere": [publish(event(4))[:7], publish(event(4))[7:30], publish(event(4))[30:-3],
                         publish(event(4))[-3:]],
    "client-close": [publish(event(5), b"Connection: close")],
    "then-health": [publish(event(8)) + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"],
    "then-upgrade": [publish(event(9)) + UPGRADE],
    "then-404": [publish(event(10)), b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" + publish(event(11))],
    "http10": [publish(event(12), version=b"HTTP/1.0")],
    "http10-keep-alive": [publish(event(13), b"Connection: keep-alive", version=b"HTTP/1.0") + publish(event(14))],
    "chunked": [b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + PUBLISH_SECRET.encode()
                + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(event(15)), event(15).encode()) + publish(event(16))],
    "expect-continue": [publish(event(17), b"Expect: 100-continue")],
    "too-large": [publish(json.dumps({"topic": "public:raw", "event": "e", "payload": "x" * 5000}))],
    "too-large-huge-length": [b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nabc"],
    "bad-auth-then-good": [publish(event(18), auth=b"Bearer nope") + publish(event(19))],
    "bad-json": [publish("{nope") + publish(event(20))],
    "space-before-colon": [b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length : 2\r\n\r\n{}"],
    "no-host": [b"POST /publish HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"],
    "two-lengths": [b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"],
    "bare-lf": [publish(event(21)).replace(b"\r\n", b"\n")],
    "leading-crlf": [b"\r\n" + publish(event(22))],
    "header-too-long": [b"POST /publish HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n"],
    "query-string": [publish(event(23)).replace(b"POST /publish ", b"POST /publish?token=abc ")],
    "empty-body": [publish("")],
    # a wrong credential is answered from the head, the body never awaited (the connection closes)
    "bad-auth-large-body": [publish("{", auth=b"Bearer nope").replace(b"Content-Length: 1", b"Content-Length: 4000")],
    "content-length-superscript": [publish("").replace(b"Content-Length: 0", b"Content-Length: \xb2")],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_raw_conversations_are_answered_alike(pusherd_factory, phx_connect, name):
    config = {"max_publish_bytes": 4096}
    fast = pusherd_factory(config, extra_env={"PUSHERD_FAST": "1"})
    plain = pusherd_factory(config, extra_env={"PUSHERD_FAST": "0"})
    clients = {d: phx_connect(d.ws_url) for d in (fast, plain)}
    for client in clients.values():
        assert client.join("public:raw")[0] == "ok"
    answers = {d: conversation(d.port, CONVERSATIONS[name]) for d in (fast, plain)}
    assert answers[fast] == answers[plain]
    assert answers[fast].startswith(b"HTTP/1.")
    events = {}
    for d, client in clients.items():
        events[d] = []
        while True:
            try:
                events[d].append(client.expect(topic="public:raw", event="e", timeout=0.3)["payload"]["n"])
            except AssertionError:
                break
    assert events[fast] == events[plain]


@pytest.mark.parametrize("fast", ["1", "0"])
def test_nothing_after_connection_close_is_processed(pusherd_factory, phx_connect, fast):
    """RFC 9112 9.6: after a request with Connection: close, a server MUST NOT process further
    requests on that connection. (Tornado's own HTTP server, PUSHERD_FAST=0, published them and
    answered nobody: front.Server.start_request now hands them to no handler.)"""
    d = pusherd_factory(extra_env={"PUSHERD_FAST": fast})
    client = phx_connect(d.ws_url)
    assert client.join("public:raw")[0] == "ok"
    answers = conversation(d.port, [publish(event(6), b"Connection: close") + publish(event(7))])
    assert answers.count(b"HTTP/1.1 200 OK") == 1 and answers.endswith(b"Connection: close\r\n\r\n"
                                                                       b'{"status": "ok", "published": 1}<closed>')
    assert client.expect(topic="public:raw", event="e")["payload"] == {"n": 6}
    client.assert_silent(0.3)


def test_pipelined_publishes_keep_their_order(pusherd_server, phx_connect):
    client = phx_connect(pusherd_server.ws_url)
    assert client.join("public:raw")[0] == "ok"
    answers = conversation(pusherd_server.port, [b"".join(publish(event(n)) for n in range(200))], idle=1.0)
    assert answers.count(b"HTTP/1.1 200 OK") == 200
    assert [client.expect(topic="public:raw", event="e")["payload"]["n"] for _ in range(200)] == list(range(200))


def test_a_publisher_that_does_not_read_its_answers_is_held_back_not_buffered(pusherd_server, phx_connect):
    """Reading pauses while an answer waits for the socket: the server holds one request's worth
    of the hog's bytes, and every other client is served meanwhile."""
    client = phx_connect(pusherd_server.ws_url)
    assert client.join("public:raw")[0] == "ok"
    hog = socket.create_connection(("127.0.0.1", pusherd_server.port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setblocking(False)
    request = publish(event(-1))
    sent = 0
    deadline = time.monotonic() + 10
    stuck_since = None
    while time.monotonic() < deadline:  # write until the server stops taking requests
        try:
            sent += hog.send(request * 50)
            stuck_since = None
        except BlockingIOError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > 0.5:
                break
            time.sleep(0.01)
    assert stuck_since is not None, "the server kept reading a client that reads nothing"
    status, body = pusherd_server.request("POST", "/publish", event(1).encode(),
                                          {"Authorization": "Bearer " + PUBLISH_SECRET,
                                           "Content-Type": "application/json"})[:2]
    assert (status, body) == (200, {"status": "ok", "published": 1})
    assert client.expect(topic="public:raw", event="e", payload={"n": 1}, timeout=10)
    hog.close()
    assert pusherd_server.request("GET", "/healthz")[0] == 200


def test_publishes_through_redis_are_answered_in_order(redis_server, pusherd_factory, phx_connect):
    """With Redis each publish waits for the broker: pipelined requests still answer in order."""
    d = pusherd_factory({"broker": redis_server.url})
    client = phx_connect(d.ws_url)
    assert client.join("public:raw")[0] == "ok"
    answers = conversation(d.port, [b"".join(publish(event(n)) for n in range(50)) + publish(event(50), b"Connection: close")],
                           idle=2.0)
    assert answers.count(b"HTTP/1.1 200 OK") == 51 and answers.endswith(b"<closed>")
    assert [client.expect(topic="public:raw", event="e")["payload"]["n"] for _ in range(51)] == list(range(51))

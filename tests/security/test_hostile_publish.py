"""POST /publish against a real pusherd: header tricks, publisher tokens, hostile bodies, batches,
oversized and slow requests. Rows of docs/security.md, table "HTTP /publish"."""

import http.client
import json
import socket
import time

import jwt
import pytest

from pusherd.client import mint_publish_token
from sec_helpers import GUARDIAN_SECRET, PUBLISH_SECRET, rails_token, still_serving

pytestmark = pytest.mark.integration


def raw_request(port, head: bytes, body: bytes = b"", timeout=5.0):
    """Send exact bytes; return (status, parsed body). Headers are written as given."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                hdrs, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in hdrs.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    if not data:
        return None, None
    hdrs, _, rest = data.partition(b"\r\n\r\n")
    status = int(hdrs.split(b" ", 2)[1])
    try:
        return status, json.loads(rest)
    except ValueError:
        return status, rest


def publish_head(port, auth_lines, body, extra=b""):
    lines = [b"POST /publish HTTP/1.1", b"Host: 127.0.0.1:%d" % port, b"Content-Type: application/json",
             b"Content-Length: %d" % len(body), b"Connection: close"] + auth_lines
    return b"\r\n".join(lines) + extra


def post(daemon, body, auth):
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    return daemon.request("POST", "/publish", body, headers)[:2]


EVENT = json.dumps({"topic": "public:hdr", "event": "e"}).encode()

HEADER_TRICKS = [
    ("duplicate-both-right", [b"Authorization: Bearer " + PUBLISH_SECRET.encode()] * 2, 401),
    ("duplicate-right-then-wrong", [b"Authorization: Bearer " + PUBLISH_SECRET.encode(),
                                    b"Authorization: Bearer wrong"], 401),
    ("duplicate-wrong-then-right", [b"Authorization: wrong", b"Authorization: " + PUBLISH_SECRET.encode()], 401),
    ("comma-joined", [b"Authorization: Bearer " + PUBLISH_SECRET.encode() + b", Bearer x"], 401),
    ("leading-trailing-spaces", [b"Authorization:    Bearer   " + PUBLISH_SECRET.encode() + b"   "], 200),
    ("scheme-upper-case", [b"Authorization: BEARER " + PUBLISH_SECRET.encode()], 200),
    ("header-name-lower-case", [b"authorization: Bearer " + PUBLISH_SECRET.encode()], 200),
    ("tab-after-scheme", [b"Authorization: Bearer\t" + PUBLISH_SECRET.encode()], 401),
    ("basic-scheme", [b"Authorization: Basic " + PUBLISH_SECRET.encode()], 401),
    ("secret-prefix", [b"Authorization: Bearer " + PUBLISH_SECRET[:-1].encode()], 401),
    ("secret-plus-nul", [b"Authorization: Bearer " + PUBLISH_SECRET.encode() + b"\x00"], 400),  # Tornado
    ("secret-latin1-suffix", [b"Authorization: Bearer " + PUBLISH_SECRET.encode() + b"\xe9"], 401),
    ("double-bearer", [b"Authorization: Bearer Bearer " + PUBLISH_SECRET.encode()], 401),
    ("secret-in-other-header", [b"X-Authorization: Bearer " + PUBLISH_SECRET.encode()], 401),
    ("no-authorization", [], 401),
    ("long-authorization-10k", [b"Authorization: Bearer " + b"a" * 10000], 401),
    ("very-long-header-20k", [b"Authorization: Bearer " + PUBLISH_SECRET.encode(), b"X-Pad: " + b"a" * 20000], 431),
    ("header-line-folding-wrong-secret", [b"Authorization: Bearer", b" wrong"], (400, 401)),
    # RFC 9112 5.2: a server refuses obs-fold or unfolds it into a space. Tornado 6.6 refuses;
    # 6.5 unfolds, and then the credential is the genuine one. Either way nothing is ambiguous.
    ("header-line-folding", [b"Authorization: Bearer", b" " + PUBLISH_SECRET.encode()], (400, 200)),
]


@pytest.mark.parametrize("lines,status", [pytest.param(l, s, id=i) for i, l, s in HEADER_TRICKS])
def test_authorization_header_tricks(pusherd_server, phx_connect, lines, status):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:hdr")
    got, body = raw_request(pusherd_server.port, publish_head(pusherd_server.port, lines, EVENT), EVENT)
    if isinstance(status, tuple):
        assert got in status, body
    else:
        assert got == status, body  # 431: a header block over 16 KiB (front.py answers it; Tornado just closed)
    if got == 200:
        c.expect(event="e")
    else:
        c.assert_silent(0.3)
    assert PUBLISH_SECRET not in pusherd_server.log()
    assert still_serving(pusherd_server)


def test_secret_in_query_string_is_not_accepted(pusherd_server):
    status, _, _ = pusherd_server.request("POST", "/publish?secret=%s&authorization=%s" % (PUBLISH_SECRET, PUBLISH_SECRET),
                                          EVENT, {"Content-Type": "application/json"})
    assert status == 401


# --- publisher tokens -------------------------------------------------------------------------

def bearer(token):
    return "Bearer " + token


@pytest.fixture
def listener(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    for t in ("public:pt1", "public:pt2", "public:other"):
        c.join(t)
    return c


def test_publisher_token_limited_to_its_topics(pusherd_server, listener):
    token = mint_publish_token(PUBLISH_SECRET, ["public:pt1", "public:pt2"], ttl=60)
    assert post(pusherd_server, {"topic": "public:pt1", "event": "a"}, bearer(token))[0] == 200
    assert post(pusherd_server, {"topics": ["public:pt1", "public:pt2"], "event": "b"}, bearer(token))[0] == 200
    assert [(m["topic"], m["event"]) for m in (listener.recv(), listener.recv(), listener.recv())] == \
        [("public:pt1", "a"), ("public:pt1", "b"), ("public:pt2", "b")]
    status, body = post(pusherd_server, {"topic": "public:other", "event": "c"}, bearer(token))
    assert status == 403 and "public:other" in body["error"]
    # Batch: one uncovered topic refuses the whole batch, naming it.
    status, body = post(pusherd_server, [{"topic": "public:pt1", "event": "d"},
                                         {"topics": ["public:pt2", "public:other"], "event": "d"}], bearer(token))
    assert status == 403 and "public:other" in body["error"]
    listener.assert_silent(0.3)


def test_publisher_token_wildcard(pusherd_server, listener):
    token = mint_publish_token(PUBLISH_SECRET, ["public:pt*", "public:*x"], ttl=60)  # literal text, no glob
    assert post(pusherd_server, {"topic": "public:pt1", "event": "w"}, bearer(token))[0] == 403
    token = mint_publish_token(PUBLISH_SECRET, ["public:*"], ttl=60)
    assert post(pusherd_server, {"topic": "public:pt1", "event": "w"}, bearer(token))[0] == 200
    listener.expect(event="w")


def _claims(**over):
    c = {"exp": int(time.time()) + 60, "publish": ["public:pt1"]}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


PUBLISH_TOKENS = [
    ("expired", lambda: mint_publish_token(PUBLISH_SECRET, ["public:pt1"], ttl=-1), 401, "expired"),
    ("no-exp", lambda: jwt.encode({"publish": ["public:pt1"]}, PUBLISH_SECRET, "HS256"), 401, "invalid"),
    ("exp-string", lambda: jwt.encode(_claims(exp="9999999999"), PUBLISH_SECRET, "HS256"), 401, "invalid"),
    ("nbf-future", lambda: jwt.encode(_claims(nbf=int(time.time()) + 600), PUBLISH_SECRET, "HS256"), 401, "invalid"),
    ("wrong-secret", lambda: mint_publish_token("x" * 40, ["public:pt1"]), 401, "invalid"),
    ("guardian-secret", lambda: mint_publish_token(GUARDIAN_SECRET, ["public:pt1"]), 401, "invalid"),
    ("hs512", lambda: jwt.encode(_claims(), PUBLISH_SECRET + "x" * 40, "HS512"), 401, "invalid"),
    ("alg-none", lambda: jwt.encode(_claims(), None, "none"), 401, "secret"),  # empty 3rd part: not JWT-shaped
    ("no-publish-claim", lambda: jwt.encode(_claims(publish=None), PUBLISH_SECRET, "HS256"), 401, "invalid"),
    ("publish-empty", lambda: jwt.encode(_claims(publish=[]), PUBLISH_SECRET, "HS256"), 401, "invalid"),
    ("publish-string", lambda: jwt.encode(_claims(publish="public:pt1"), PUBLISH_SECRET, "HS256"), 401, "invalid"),
    ("join-token-aud-csrf", lambda: jwt.encode(_claims(aud="csrf", s_csrf="x"), PUBLISH_SECRET, "HS256"), 401,
     "invalid"),
    ("signature-stripped", lambda: mint_publish_token(PUBLISH_SECRET, ["public:pt1"]).rsplit(".", 1)[0] + ".x",
     401, "invalid"),
    ("not-jwt-shaped", lambda: "a.b", 401, "secret"),
]


@pytest.mark.parametrize("make,status,needle", [pytest.param(m, s, n, id=i) for i, m, s, n in PUBLISH_TOKENS])
def test_bad_publisher_tokens(pusherd_server, listener, make, status, needle):
    got, body = post(pusherd_server, {"topic": "public:pt1", "event": "bad"}, bearer(make()))
    assert got == status and needle in body["error"], body
    listener.assert_silent(0.2)


def test_browser_join_token_cannot_publish_even_when_secrets_match(pusherd_factory, phx_connect):
    """dev/test fall back to the same secret for both: a page's join token is still no publisher token."""
    d = pusherd_factory({"guardian_secret": PUBLISH_SECRET})
    token, _ = rails_token(listen=["private:*"], publish=["private:*"], secret=PUBLISH_SECRET)
    assert post(d, {"topic": "private:x", "event": "e"}, bearer(token))[0] == 401


# --- bodies ------------------------------------------------------------------------------------

BODIES = [
    ("nan", b'{"topic":"public:body","event":"e","payload":{"x":NaN}}', "JSON"),
    ("infinity", b'{"topic":"public:body","event":"e","payload":{"x":Infinity}}', "JSON"),
    ("float-overflow", b'{"topic":"public:body","event":"e","payload":{"x":1e400}}', "JSON"),
    ("int-5000-digits", b'{"topic":"public:body","event":"e","payload":{"x":' + b"1" * 5000 + b"}}", "JSON"),
    ("depth-65", b'{"topic":"public:body","event":"e","payload":{"x":' + b"[" * 63 + b"]" * 63 + b"}}", "JSON"),
    ("invalid-utf8", b'{"topic":"public:body","event":"\xff"}', "JSON"),
    ("utf16-bom", '{"topic":"public:body","event":"e"}'.encode("utf-16"), "JSON"),
    ("topic-int", b'{"topic":5,"event":"e"}', "topic"),
    ("topic-null", b'{"topic":null,"event":"e"}', "topic"),
    ("topic-list", b'{"topic":["public:body"],"event":"e"}', "topic"),
    ("topic-too-long", b'{"topic":"public:' + b"x" * 300 + b'","event":"e"}', "topic"),
    ("topic-control-char", b'{"topic":"public:\\u0007","event":"e"}', "topic"),
    ("topics-empty", b'{"topics":[],"event":"e"}', "topics"),
    ("topics-string", b'{"topics":"public:body","event":"e"}', "topics"),
    ("topics-with-int", b'{"topics":["public:body",5],"event":"e"}', "topic"),
    ("topic-and-topics", b'{"topic":"public:body","topics":["public:body"],"event":"e"}', "not both"),
    ("event-int", b'{"topic":"public:body","event":1}', "event"),
    ("event-object", b'{"topic":"public:body","event":{}}', "event"),
    ("event-empty", b'{"topic":"public:body","event":""}', "event"),
    ("event-too-long", b'{"topic":"public:body","event":"' + b"e" * 256 + b'"}', "event"),
    ("event-newline", b'{"topic":"public:body","event":"a\\nb"}', "event"),
    ("event-phx", b'{"topic":"public:body","event":"phx_close"}', "event"),
    ("payload-list", b'{"topic":"public:body","event":"e","payload":[]}', "payload"),
    ("payload-string", b'{"topic":"public:body","event":"e","payload":"{}"}', "payload"),
    ("payload-number", b'{"topic":"public:body","event":"e","payload":1}', "payload"),
    ("unknown-field", b'{"topic":"public:body","event":"e","ref":"1"}', "unknown"),
    ("body-string", b'"hello"', "object"),
    ("body-null", b"null", "object"),
    ("batch-empty", b"[]", "empty"),
    ("batch-of-strings", b'["a"]', "object"),
    ("batch-too-large", json.dumps([{"topic": "public:body", "event": "e"}] * 1001).encode(), "larger"),
    ("batch-bad-item-named", json.dumps([{"topic": "public:body", "event": "e"}] * 3
                                        + [{"topic": "public:body"}]).encode(), "item 3"),
    ("form-bad-payload", b"topic=public:body&event=e&payload=%7Bnope", "payload"),
    ("form-nan-payload", b"topic=public:body&event=e&payload=%7B%22x%22%3ANaN%7D", "payload"),
    ("form-deep-payload", b"topic=public:body&event=e&payload=%7B%22x%22%3A" + b"%5B" * 70 + b"%5D" * 70 + b"%7D",
     "payload"),
    ("form-invalid-utf8", b"topic=public:body&event=%ff", "decoded"),
]


@pytest.mark.parametrize("body,needle", [pytest.param(b, n, id=i) for i, b, n in BODIES])
def test_hostile_bodies_are_400_and_deliver_nothing(pusherd_server, phx_connect, body, needle):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:body")
    ctype = "application/x-www-form-urlencoded" if body.startswith(b"topic=") else "application/json"
    status, parsed, _ = pusherd_server.request("POST", "/publish", body, {
        "Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": ctype})
    assert status == 400, parsed
    assert needle.lower() in parsed["error"].lower(), parsed
    c.assert_silent(0.2)
    assert still_serving(pusherd_server)


def test_depth_64_and_lone_surrogates_are_published(pusherd_server, phx_connect):
    """The deepest body accepted, and a lone surrogate escape, reach subscribers as valid UTF-8 JSON."""
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:edge")
    body = b'{"topic":"public:edge","event":"e","payload":{"x":' + b"[" * 62 + b"]" * 62 + b',"s":"\\ud800"}}'
    status, parsed, _ = pusherd_server.request("POST", "/publish", body, {
        "Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": "application/json"})
    assert status == 200, parsed
    raw = c.ws.recv(timeout=5)
    raw.encode("utf-8")
    assert json.loads(raw)[4]["s"] == "\ud800"


def test_batch_all_or_nothing_and_order(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    c.join("public:batch1")
    c.join("public:batch2")
    batch = [{"topic": "public:batch1", "event": "e%d" % i, "payload": {"i": i}} for i in range(50)]
    bad = batch + [{"topic": "public:batch2", "event": "e", "payload": "no"}]
    status, body = post(pusherd_server, bad, "Bearer " + PUBLISH_SECRET)
    assert status == 400 and "item 50" in body["error"]
    c.assert_silent(0.3)
    batch.append({"topics": ["public:batch1", "public:batch2"], "event": "last"})
    status, body = post(pusherd_server, batch, "Bearer " + PUBLISH_SECRET)
    assert status == 200 and body["published"] == 52
    got = [c.recv() for _ in range(52)]
    assert [m["event"] for m in got[:50]] == ["e%d" % i for i in range(50)]
    assert [(m["topic"], m["event"]) for m in got[50:]] == [("public:batch1", "last"), ("public:batch2", "last")]


# --- sizes and slow requests --------------------------------------------------------------------

SMALL = {"max_publish_bytes": 2048, "http_header_timeout": 1, "http_body_timeout": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from sec_helpers import Pusherd
    d = Pusherd(tmp_path_factory.mktemp("small"), SMALL).start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def small_tornado(tmp_path_factory):
    """As `small`, every connection on Tornado's HTTP server (PUSHERD_FAST=0)."""
    from sec_helpers import Pusherd
    d = Pusherd(tmp_path_factory.mktemp("small"), SMALL, extra_env={"PUSHERD_FAST": "0"}).start()
    yield d
    d.stop()


def test_oversized_body_by_content_length(small):
    body = json.dumps({"topic": "public:s", "event": "e", "payload": {"x": "y" * 5000}}).encode()
    status, parsed = raw_request(small.port, publish_head(small.port, [b"Authorization: " + PUBLISH_SECRET.encode()],
                                                          body), body)
    assert status == 413 and "max_publish_bytes" in parsed["error"]


def test_content_length_announced_small_but_chunked_large(small):
    """Content-Length and chunked together (a smuggling shape): refused, nothing published."""
    head = (b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: " + PUBLISH_SECRET.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 10\r\nTransfer-Encoding: chunked")
    status, _ = raw_request(small.port, head, b"5\r\nhello\r\n0\r\n\r\n")
    assert status in (400, None)


def test_oversized_content_length_huge_number(small):
    head = publish_head(small.port, [b"Authorization: " + PUBLISH_SECRET.encode()], b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: 99999999999999999999999")
    status, _ = raw_request(small.port, head, b"")
    assert status in (400, 413)


def test_oversized_chunked_body(small):
    conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=5)
    conn.putrequest("POST", "/publish")
    conn.putheader("Authorization", PUBLISH_SECRET)
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    try:
        for _ in range(20):
            conn.send(b"200\r\n" + b"x" * 512 + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass
    assert conn.getresponse().status == 413


def _closed_within(sock, seconds):
    """Seconds until the server closed `sock`, or None if it stayed open that long."""
    sock.settimeout(seconds)
    start = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


@pytest.mark.parametrize("partial", [
    b"POST /publish HTTP/1.1\r\nHost: x\r\n",                                    # headers never finish
    b"PO",                                                                       # request line never finishes
    b"GET /events/websocket?vsn=2.0.0 HTTP/1.1\r\nUpgrade: websocket\r\n",       # upgrade never finishes
    b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: " + PUBLISH_SECRET.encode()
    + b"\r\nContent-Length: 100\r\n\r\n{\"topic\"",                              # body never finishes
], ids=["headers", "request-line", "upgrade", "body"])
@pytest.mark.parametrize("daemon", ["small", "small_tornado"], ids=["front", "tornado"])
def test_slowloris_connections_are_closed(request, daemon, partial):
    """Partial requests trickled in are cut off after http_header_timeout / http_body_timeout."""
    small = request.getfixturevalue(daemon)
    socks = [socket.create_connection(("127.0.0.1", small.port)) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(partial)
        # Trickle one more byte a little later: the timeout is for the whole header/body, not per byte.
        time.sleep(0.5)
        for s in socks:
            try:
                s.sendall(b"X")
            except OSError:
                pass
        assert still_serving(small)
        for s in socks:
            waited = _closed_within(s, 5)
            assert waited is not None and waited < 4, "partial request still open"
    finally:
        for s in socks:
            s.close()

"""Hostile HTTP clients against a real pusherd, on both listener paths (the publisher front,
PUSHERD_FAST=1, and Tornado's own HTTP server, PUSHERD_FAST=0): unauthenticated bodies, floods of
connections, oversized and slow heads, non-ASCII digits, storms of refused upgrades.
Rows of docs/security.md, tables "HTTP /publish" and "Connections"."""

import json
import socket
import time

import jwt
import pytest

from pusherd.client import mint_publish_token
from sec_helpers import GUARDIAN_SECRET, PUBLISH_SECRET, RawWS, rails_token, rss_kib, still_serving

pytestmark = pytest.mark.integration

PATHS = pytest.mark.parametrize("fast", ["1", "0"], ids=["front", "tornado"])
EVENT = json.dumps({"topic": "public:http", "event": "e"}).encode()


def start(pusherd_factory, fast, overrides=None, **kwargs):
    return pusherd_factory(overrides, extra_env={"PUSHERD_FAST": fast}, **kwargs)


def publish_head(auth, length, extra=b""):
    lines = [b"POST /publish HTTP/1.1", b"Host: 127.0.0.1", b"Content-Type: application/json",
             b"Content-Length: %d" % length] + ([b"Authorization: " + auth] if auth is not None else [])
    return b"\r\n".join(lines) + extra + b"\r\n\r\n"


def read_answer(sock, timeout=5.0, wait_close=True):
    """Everything the server sends until it closes (or, without `wait_close`, until one answer is
    complete): (status, headers dict, JSON body, closed). (None, ...) when nothing came within
    `timeout` seconds."""
    sock.settimeout(timeout)
    data, closed = b"", False
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = [int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                      if k.strip().lower() == b"content-length"]
            if length and len(body) >= length[0]:
                if not wait_close:
                    break
                sock.settimeout(2.0)  # the answer is complete: does the server close?
    if not data:
        return None, {}, None, closed
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = body
    return int(lines[0].split(" ", 2)[1]), headers, parsed, closed


def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=5)


# --- item 5: nothing is buffered for an unauthenticated publisher ---------------------------------

@PATHS
def test_unauthenticated_publishers_with_large_bodies_are_refused_before_the_body(pusherd_factory, fast):
    """40 connections announce a 1,000,000-byte body with a wrong, missing or expired credential.
    Each gets its 401 as soon as its head is read, before it sent a byte of the body, and is
    closed; the bodies they then try to send are never buffered (before: +40 MiB of RSS)."""
    d = start(pusherd_factory, fast, {"http_body_timeout": 60})
    expired = mint_publish_token(PUBLISH_SECRET, ["public:http"], ttl=-10).encode()
    credentials = [b"Bearer wrong", None, b"Bearer " + expired, PUBLISH_SECRET.encode() + b"x"]
    socks = []
    try:
        before = rss_kib(d.proc.pid)
        for i in range(40):
            s = connect(d.port)
            s.sendall(publish_head(credentials[i % len(credentials)], 1_000_000))
            socks.append(s)
        for i, s in enumerate(socks):
            status, headers, body, closed = read_answer(s)
            assert status == 401, (i, status, body)  # None: the server waited for the body
            assert "www-authenticate" in headers and headers.get("connection") == "close"
            assert closed, "the connection stays open after a 401 answered before the body"
        for s in socks:  # what the client then sends goes nowhere
            try:
                for _ in range(60):
                    s.sendall(b"x" * 16384)
            except OSError:
                pass
        grown_mib = (rss_kib(d.proc.pid) - before) / 1024
        assert grown_mib < 10, "RSS grew by %.1f MiB" % grown_mib
        assert still_serving(d)
    finally:
        for s in socks:
            s.close()


@PATHS
@pytest.mark.parametrize("method", ["PUT", "GET"])
def test_publish_bodies_sent_with_another_method_are_not_buffered(pusherd_factory, fast, method):
    """20 connections send /publish a 1,000,000-byte body with another method than POST, no
    credential checked: each is still answered 405, but its body is read and dropped, never
    kept (it was: +18 MiB with 950,000 bytes of each sent)."""
    d = start(pusherd_factory, fast, {"http_body_timeout": 60})
    head = publish_head(None, 1_000_000).replace(b"POST ", method.encode() + b" ", 1)
    socks = []
    try:
        before = rss_kib(d.proc.pid)
        for _ in range(20):
            s = connect(d.port)
            s.sendall(head + b"x" * 950_000)
            socks.append(s)
        time.sleep(0.5)
        grown_mib = (rss_kib(d.proc.pid) - before) / 1024
        assert grown_mib < 8, "RSS grew by %.1f MiB" % grown_mib
        for s in socks:
            s.sendall(b"x" * 50_000)
            status, _, body, _ = read_answer(s, wait_close=False)
            assert status == 405, (status, body)
    finally:
        for s in socks:
            s.close()


@PATHS
def test_authenticated_publisher_is_still_served_keep_alive(pusherd_factory, phx_connect, fast):
    """The credential is decided from the head; the right one still publishes, body and all,
    and keeps its connection for the next request."""
    d = start(pusherd_factory, fast)
    c = phx_connect(d.ws_url)
    c.join("public:http")
    s = connect(d.port)
    try:
        for _ in range(2):
            s.sendall(publish_head(b"Bearer " + PUBLISH_SECRET.encode(), len(EVENT)) + EVENT)
            s.settimeout(5)
            data = b""
            while not data.endswith(b'"published": 1}'):
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in data
            c.expect(event="e")
    finally:
        s.close()


# --- item 5: max_http_connections -------------------------------------------------------------------

def stalled_publishers(port, n):
    """`n` authenticated publishers each inside a request: head sent, 10 of 100 body bytes."""
    socks = []
    for _ in range(n):
        s = connect(port)
        s.sendall(publish_head(b"Bearer " + PUBLISH_SECRET.encode(), 100) + b'{"topic":')
        socks.append(s)
    time.sleep(0.5)  # the server has read every head
    return socks


@PATHS
def test_connection_flood_beyond_max_http_connections_waits_in_the_listen_queue(pusherd_factory, fast):
    """Every connection inside a request: one more, be it a publish or a WebSocket upgrade, is
    neither refused nor closed: the listener stops accepting, and it waits in the listen queue
    (its head unread) until a slot frees; then it is served. Logged once, rate-limited."""
    d = start(pusherd_factory, fast, {"max_http_connections": 4, "http_body_timeout": 60})
    socks = stalled_publishers(d.port, 4)
    try:
        s = connect(d.port)
        s.sendall(publish_head(b"Bearer " + PUBLISH_SECRET.encode(), len(EVENT)) + EVENT)
        assert read_answer(s, timeout=1.5, wait_close=False) == (None, {}, None, False)  # waits, not refused
        ws = socket.create_connection(("127.0.0.1", d.port), timeout=5)  # an upgrade waits as well
        ws.sendall(b"GET /events/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   b"Sec-WebSocket-Version: 13\r\n\r\n")
        socks.pop().close()  # a slot frees: the publish is accepted and answered
        status, headers, body, closed = read_answer(s, wait_close=False)
        assert status == 200, (status, body)
        s.close()  # ... and its slot goes to the upgrade
        ws.settimeout(5)
        assert ws.recv(65536).startswith(b"HTTP/1.1 101 "), "the waiting upgrade was not served"
        ws.close()
        line = d.wait_log("stopped accepting")
        assert "WARNING" in line and "max_http_connections (4)" in line and "listen queue" in line
        assert not [l for l in d.lines if " ERROR " in l], d.log()
    finally:
        for s in socks:
            s.close()


@PATHS
def test_a_cap_no_connection_leaves_refuses_newcomers_after_a_while_instead_of_holding_them(pusherd_factory, fast):
    """Every connection inside a request that does not end (long-poll GETs, slow bodies) and none
    leaving the cap for STUCK_SECONDS: a newcomer is not left in the listen queue with no end in
    sight (a publisher would hang until its own timeout), it gets 503 with Retry-After and a
    long-poll-readable status, and the refusals are one rate-limited WARNING."""
    from pusherd.fast.listener import STUCK_SECONDS
    d = start(pusherd_factory, fast, {"max_http_connections": 4, "http_body_timeout": 60})
    socks = stalled_publishers(d.port, 4)
    try:
        s = connect(d.port)
        s.sendall(publish_head(b"Bearer " + PUBLISH_SECRET.encode(), len(EVENT)) + EVENT)
        status, headers, body, closed = read_answer(s, timeout=STUCK_SECONDS + 5)
        assert status == 503 and headers.get("retry-after") == "1", (status, headers, body)
        assert body == {"error": "too many HTTP connections", "status": 500} and closed
        line = d.wait_log("refused 1 new HTTP connection(s) with 503")
        assert "WARNING" in line and "max_http_connections (4)" in line
        socks.pop().close()  # a slot frees: once the server has seen it go, newcomers are served again
        deadline = time.monotonic() + 5
        while True:
            s = connect(d.port)
            s.sendall(publish_head(b"Bearer " + PUBLISH_SECRET.encode(), len(EVENT)) + EVENT)
            status = read_answer(s, wait_close=False)[0]
            s.close()
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert status == 200
        assert not [l for l in d.lines if " ERROR " in l], d.log()
    finally:
        for s in socks:
            s.close()


@PATHS
def test_idle_connection_flood_does_not_starve_websockets_or_keep_alive_publishers(pusherd_factory, phx_connect, fast):
    """20 connections that never send a byte, against max_http_connections: 5. Each newcomer at
    the cap closes the one that has waited longest for its first request, so a WebSocket still
    connects and joins, and the publisher's keep-alive connection (idle between requests, last
    in line) still publishes; upgraded sockets do not count against the cap."""
    d = start(pusherd_factory, fast, {"max_http_connections": 5})
    keep_alive = connect(d.port)
    keep_alive.sendall(publish_head(b"Bearer " + PUBLISH_SECRET.encode(), len(EVENT)) + EVENT)
    keep_alive.settimeout(5)
    assert keep_alive.recv(65536).startswith(b"HTTP/1.1 200 OK")
    silent = [connect(d.port) for _ in range(20)]
    try:
        time.sleep(0.3)
        sockets = [RawWS(d.port) for _ in range(8)]  # 8 > 5: WebSockets leave the HTTP count
        assert [ws.status for ws in sockets] == [101] * 8
        assert sockets[0].join("public:http")[4]["status"] == "ok"
        keep_alive.sendall(publish_head(b"Bearer " + PUBLISH_SECRET.encode(), len(EVENT)) + EVENT)
        assert keep_alive.recv(65536).startswith(b"HTTP/1.1 200 OK")
        assert sockets[0].recv_json()[3] == "e"
        closed = 0
        for s in silent:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 15, "only %d of the 20 idle connections were closed" % closed
        assert "HTTP connection(s) waiting for a request to let new ones in" in d.log()
        for ws in sockets:
            ws.close()
    finally:
        keep_alive.close()
        for s in silent:
            s.close()


# --- item 11: smaller ones -------------------------------------------------------------------------

@PATHS
def test_slow_head_handed_to_tornado_gets_one_header_timeout_not_two(pusherd_factory, fast):
    """A head that looks like a publish for 2.5 s, then turns into something else (a bare LF):
    on the front it moves to Tornado, which used to start http_header_timeout (4 s) afresh.
    It is closed when the first one ends."""
    d = start(pusherd_factory, fast, {"http_header_timeout": 4})
    s = connect(d.port)
    try:
        s.sendall(b"POST /publish HTTP/1.1\r\nHost: x\r\n")
        time.sleep(2.5)
        s.sendall(b"X-Bare: lf\n")
        s.settimeout(2.75)  # the first timeout ends 1.5 s from here; a second one 4 s from here
        try:
            assert s.recv(65536) == b""
        except ConnectionResetError:
            pass
        except socket.timeout:
            raise AssertionError("still open past http_header_timeout")
    finally:
        s.close()


@PATHS
@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /events/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nCookie: " + b"c" * 20000
    + b"\r\n\r\n",
    publish_head(b"Bearer " + PUBLISH_SECRET.encode(), len(EVENT), b"\r\nX-Pad: " + b"a" * 20000) + EVENT,
], ids=["health-check", "upgrade-with-huge-cookie", "publish"])
def test_header_block_over_16k_is_answered_431(pusherd_factory, fast, request_bytes):
    """Tornado closed such a connection without a word; docs/security.md promised an answer."""
    d = start(pusherd_factory, fast)
    s = connect(d.port)
    try:
        s.sendall(request_bytes)
        status, headers, body, closed = read_answer(s)
        assert (status, body) == (431, {"error": "request head larger than 16384 bytes"}), (status, body)
        assert closed
    finally:
        s.close()
    assert still_serving(d)


@PATHS
@pytest.mark.parametrize("value", [b"\xb2", b"\xb3", b"1\xb9", "\u0663".encode()],
                         ids=["superscript-2", "superscript-3", "digit-superscript-1", "arabic-indic-3-utf8"])
def test_content_length_in_non_ascii_digits_is_a_clean_400(pusherd_factory, fast, value):
    """`Content-Length: ²` (one Latin-1 byte, as HTTP headers are read) passed str.isdigit() and
    crashed int(): a 500 and a traceback in the log, before authentication. Now a 400 with a
    JSON reason, after the credential check."""
    d = start(pusherd_factory, fast)
    head = (b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %s\r\n\r\n"
            % (PUBLISH_SECRET.encode(), value))
    for credential_ok in (True, False):
        s = connect(d.port)
        try:
            s.sendall(head if credential_ok else head.replace(PUBLISH_SECRET.encode(), b"wrong"))
            status, _, body, closed = read_answer(s)
        finally:
            s.close()
        if credential_ok:
            assert (status, body) == (400, {"error": "invalid Content-Length"}), (status, body)
        else:
            assert status == 401, (status, body)
        assert closed
    assert "Traceback" not in d.log() and " ERROR " not in d.log(), d.log()
    assert still_serving(d)


@pytest.mark.parametrize("broker", ["memory", "redis"])
@pytest.mark.parametrize("offset", ["\u00b2", "\u0663"], ids=["superscript-2", "arabic-indic-3"])
def test_since_offset_in_non_ascii_digits_is_not_a_position(pusherd_factory, phx_connect, request, broker, offset):
    """A join with since "<epoch>:²" made the history lookup raise (a warning per join, the
    page told to refetch with no position); "<epoch>:٣" was read as offset 3 and replayed.
    Both are no position: the join is answered "not recovered" with the current position."""
    overrides = {"history": [{"topics": "deploys:*", "size": 10, "ttl": 3600}]}
    if broker == "redis":
        overrides["broker"] = request.getfixturevalue("redis_server").url
    d = pusherd_factory(overrides)
    token, csrf = rails_token(listen=["deploys:*"])
    positions = [d.publish("deploys:digits", "e", {"n": n})[1]["position"] for n in range(5)]
    epoch = positions[0].rsplit(":", 1)[0]
    c = phx_connect(d.ws_url)
    status, response, _ = c.join("deploys:digits", {"guardian_token": token, "csrf_token": csrf,
                                                     "since": epoch + ":" + offset})
    assert status == "ok" and response == {"recovered": False, "position": positions[-1]}, response
    c.assert_silent(0.3)  # nothing replayed
    assert "history lookup failed" not in d.log(), d.log()


@pytest.mark.parametrize("vsn", ["%D9%A2.0.0", "2.%D9%A0.0", "%C2%B2.0.0"], ids=["arabic-indic-2", "arabic-indic-0",
                                                                          "superscript-2"])
def test_vsn_in_non_ascii_digits_is_no_protocol_version(pusherd_server, vsn):
    """vsn=٢.0.0 was read as 2.0.0 (the version pattern's \\d takes any Unicode digit)."""
    ws = RawWS(pusherd_server.port, path="/events/websocket?vsn=" + vsn)
    try:
        assert ws.status == 403
    finally:
        ws.close()
    ws = RawWS(pusherd_server.port, path="/events/websocket?vsn=2.0.0")
    try:
        assert ws.status == 101
    finally:
        ws.close()


@pytest.mark.parametrize("exp,reply", [("\u0663" * 10, ("error", {"reason": "invalid_token"})),
                                       ("3" * 10, ("ok", {}))], ids=["arabic-indic-digits", "ascii-digits"])
def test_token_exp_as_a_string_of_non_ascii_digits_is_invalid(pusherd_server, phx_connect, exp, reply):
    """A signed exp of "٣٣٣٣٣٣٣٣٣٣" was read by int() as 3333333333 (year 2075); a numeric
    string of ASCII digits is accepted, as PyJWT accepts it."""
    token, csrf = rails_token(listen=["private:digits"])
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["exp"] = exp
    forged = jwt.encode(claims, GUARDIAN_SECRET, algorithm="HS256")
    c = phx_connect(pusherd_server.ws_url)
    assert c.join("private:digits", {"guardian_token": forged, "csrf_token": csrf})[:2] == reply


@PATHS
def test_storm_of_upgrades_over_max_connections_is_one_warning_not_an_error_each(pusherd_factory, fast):
    """Every refused upgrade was an ERROR access line. Now: one WARNING at once, then at most
    one per 10 s counting the refusals since the previous one."""
    d = start(pusherd_factory, fast, {"max_connections": 2})
    open_sockets = [RawWS(d.port) for _ in range(2)]
    try:
        assert [ws.status for ws in open_sockets] == [101, 101]
        for _ in range(30):
            ws = RawWS(d.port)
            assert ws.status == 503
            ws.close()
        first = d.wait_log("connection(s) with 503")
        assert "WARNING" in first and "refused 1 connection(s) with 503: max_connections (2) reached" in first
        later = d.wait_log("refused 29 connection(s)", timeout=15)  # the sweep reports the rest
        assert "WARNING" in later
        refusals = [l for l in d.lines if "connection(s) with 503: max_connections" in l]
        assert len(refusals) == 2, refusals
        assert not [l for l in d.lines if " ERROR " in l or " 503 GET " in l], d.log()
    finally:
        for ws in open_sockets:
            ws.close()

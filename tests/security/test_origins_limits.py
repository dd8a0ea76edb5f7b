"""Origins and connection limits against a real pusherd (docs/security.md, table "Connections")."""

import pytest

from sec_helpers import RawWS, still_serving

pytestmark = pytest.mark.integration

# BASE_CONFIG allows http://localhost:3000 and https://*.example.com
ORIGINS = [
    ("http://localhost:3000", 101),
    ("HTTP://LOCALHOST:3000", 101),
    ("https://app.example.com", 101),
    ("https://a.b.example.com", 101),
    ("https://app.example.com:443", 101),
    ("https://example.com", 403),               # *.example.com is subdomains only
    ("https://evilexample.com", 403),
    ("https://app.example.com.evil.com", 403),
    ("http://app.example.com", 403),            # scheme
    ("https://app.example.com:8443", 403),      # port
    ("http://localhost:3001", 403),
    ("http://localhost", 403),
    ("http://localhost:3000@evil.com", 403),
    ("http://evil.com#@localhost:3000", 403),
    ("http://localhost:3000/path", 403),
    ("null", 403),                              # sandboxed iframes, file:// pages
    ("", 403),
    ("*", 403),
    ("http://127.0.0.1:3000", 403),
]


@pytest.mark.parametrize("origin,status", ORIGINS)
def test_origin_check_on_upgrade(pusherd_server, origin, status, raw_ws):
    ws = raw_ws(pusherd_server.port, headers={"Origin": origin})
    assert ws.status == status


@pytest.mark.parametrize("path", ["/events/websocket", "/events"])
@pytest.mark.parametrize("attack,headers", [pytest.param(*row, id=row[0]) for row in [
    # A DNS-rebinding page served over ws:// from the name the daemon answers to: Origin equals Host.
    ("origin-equals-host", lambda port: {"Origin": "http://127.0.0.1:%d" % port, "Host": "127.0.0.1:%d" % port}),
    ("origin-equals-host-by-name", lambda port: {"Origin": "http://rebind.evil:%d" % port,
                                                  "Host": "rebind.evil:%d" % port}),
    # Sec-Fetch-Site claims same-origin or a direct navigation: Tornado 6.6 skips check_origin for both.
    ("sec-fetch-same-origin", lambda port: {"Origin": "https://evil.com", "Sec-Fetch-Site": "same-origin"}),
    ("sec-fetch-none", lambda port: {"Origin": "https://evil.com", "Sec-Fetch-Site": "none"}),
    ("sec-fetch-cross-site", lambda port: {"Origin": "https://evil.com", "Sec-Fetch-Site": "cross-site"}),
    # A browser that hides its origin: Sec-Fetch-Site without any Origin.
    ("sec-fetch-without-origin", lambda port: {"Sec-Fetch-Site": "same-origin"}),
    # Pre-RFC 6455 drafts sent the origin in Sec-WebSocket-Origin.
    ("sec-websocket-origin", lambda port: {"Sec-WebSocket-Origin": "https://evil.com"}),
]])
def test_origins_are_decided_by_pusherd_not_tornado(pusherd_server, attack, headers, path, raw_ws):
    """Every upgrade's origin is checked against allowed_origins by pusherd itself, whatever the
    installed Tornado considers same-origin (6.6 lets the first four through unasked)."""
    ws = raw_ws(pusherd_server.port, path=path, headers=headers(pusherd_server.port))
    assert ws.status == 403
    assert still_serving(pusherd_server)


def test_localhost_port_wildcard_takes_only_a_numeric_port(pusherd_factory, raw_ws):
    d = pusherd_factory({"allowed_origins": ["http://localhost:*"]})
    for origin, status in [("http://localhost:8080", 101), ("http://localhost:evil.com", 403),
                           ("http://localhost:80x", 403), ("http://localhost:\u0661\u0662", 403)]:
        ws = raw_ws(d.port, headers={"Origin": origin})
        assert ws.status == status, origin


def test_upgrade_without_origin_is_not_a_browser_and_is_allowed(pusherd_server, raw_ws):
    ws = raw_ws(pusherd_server.port)
    assert ws.status == 101


def test_refused_origin_on_the_legacy_path_too(pusherd_server, raw_ws):
    ws = raw_ws(pusherd_server.port, path="/events", headers={"Origin": "https://evil.com"})
    assert ws.status == 403


def test_development_default_allows_localhost_only(pusherd_factory, raw_ws):
    d = pusherd_factory({"allowed_origins": None})
    for origin, status in [("http://localhost:8080", 101), ("https://127.0.0.1:3000", 101), ("http://[::1]:1", 101),
                           ("https://app.example.com", 403), ("http://localhost.evil.com:80", 403)]:
        ws = raw_ws(d.port, headers={"Origin": origin})
        assert ws.status == status, origin


def test_any_origin_only_when_explicit(pusherd_factory, raw_ws):
    d = pusherd_factory({"allowed_origins": ["*"]})
    ws = raw_ws(d.port, headers={"Origin": "https://anything.invalid"})
    assert ws.status == 101


def test_max_connections(pusherd_factory):
    d = pusherd_factory({"max_connections": 5})
    socks = [RawWS(d.port) for _ in range(5)]
    try:
        assert [s.status for s in socks] == [101] * 5
        over = RawWS(d.port)
        assert over.status == 503
        over.close()
        status, body, headers = d.request("GET", "/healthz")  # HTTP still answers at the limit
        assert status == 200 and body["connections"] == 5
        status, body, headers = d.request("GET", "/events/websocket?vsn=2.0.0", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13"})
        assert status == 503 and body == {"error": "too many connections"} and headers["Retry-After"]
        socks.pop().close()
        import time
        deadline = time.monotonic() + 5
        while d.request("GET", "/healthz")[1]["connections"] != 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        again = RawWS(d.port)
        assert again.status == 101
        socks.append(again)
    finally:
        for s in socks:
            s.close()


def test_many_connections_are_served(pusherd_factory):
    """1,000 sockets open at once (well under the default cap): each joins and gets a broadcast."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    from sec_helpers import require
    require(soft >= 2200 or hard >= 2200, "needs RLIMIT_NOFILE >= 2200 for 1,000 loopback sockets")
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    d = pusherd_factory({"max_connections": 1000})
    socks = []
    try:
        for i in range(1000):
            ws = RawWS(d.port)
            assert ws.status == 101
            ws.send_text('["1","1","public:many","phx_join",{}]')
            socks.append(ws)
        for ws in socks:
            assert ws.recv_json()[4]["status"] == "ok"
        assert RawWS(d.port).status == 503
        assert d.publish("public:many", "all", {"n": 1})[0] == 200
        for ws in socks:
            assert ws.recv_json()[3] == "all"
    finally:
        for ws in socks:
            ws.close()
    assert still_serving(d)

"""Hostile input to the long-poll transport: forged and stale session tokens, a token used from
another origin, oversized and malformed ndjson, 101 messages in one POST, a flood of opens,
origins. None of it disturbs another session, raises out of a handler, or shows a token."""

import pytest

from longpoll_testing import LongPoll
from sec_helpers import still_serving

pytestmark = pytest.mark.integration

ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from pusherd_testing import Pusherd
    d = Pusherd(tmp_path_factory.mktemp("lp-hostile"), {"longpoll_window": "1s", "max_frame_bytes": 4096,
                                                                        "max_publish_bytes": 65536}).start()
    yield d
    d.stop()


def forged(token: str) -> str:
    """The same process and session id, another secret."""
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


def test_a_forged_or_stale_session_token_takes_over_nothing(daemon):
    victim = LongPoll(daemon.http_url)
    victim.join("public:lp-victim")
    attacker = LongPoll(daemon.http_url, open_session=False)
    for token in (forged(victim.token), victim.token[:17] + "0" * 16 + victim.token[33:],
                  "0" * 16 + victim.token[16:]):
        body = attacker.poll(token=token)
        assert body["status"] == 410 and body["token"] != victim.token     # a new session of its own
        status, answer, _ = attacker.post([None, "9", "public:lp-victim", "msg", {"stolen": True}], token=token)
        assert (status, answer) == (200, {"status": 410})
    daemon.publish("public:lp-victim", "mine", {"n": 1})
    assert victim.expect(event="mine")["payload"] == {"n": 1}   # the victim's messages stayed the victim's
    assert not [m for m in victim.messages if m["event"] == "msg"]
    assert victim.token not in daemon.log()
    # A `token` that is no session token is the page's socket token: verified, refused if bad.
    status, body, _ = attacker.request("GET", attacker.url(token="x" * 500))
    assert (status, body) == (403, {"status": 403, "error": "invalid_token"})


def test_a_token_used_from_another_page_origin_is_not_the_session(daemon):
    page = LongPoll(daemon.http_url, headers={"Origin": ORIGIN})
    other = LongPoll(daemon.http_url, headers={"Origin": "https://app.example.com"}, open_session=False)
    assert other.poll(token=page.token)["token"] != page.token


def test_origins_not_allowed_get_403_and_no_cors_headers(daemon):
    c = LongPoll(daemon.http_url, headers={"Origin": "https://evil.test"}, open_session=False)
    status, body, headers = c.request("GET", c.url())
    assert (status, body) == (403, {"status": 403, "error": "origin not allowed"})
    assert "Access-Control-Allow-Origin" not in headers
    # A browser hiding its origin (Sec-Fetch-Site without Origin) is judged by the Host it named.
    hidden = LongPoll(daemon.http_url, open_session=False)
    status, body, _ = hidden.request("GET", hidden.url(), headers={"Sec-Fetch-Site": "same-origin"})
    assert (status, body) == (403, {"status": 403, "error": "origin not allowed"})
    ok = LongPoll(daemon.http_url, headers={"Origin": ORIGIN}, open_session=False)
    status, body, headers = ok.request("GET", ok.url())
    assert body["status"] == 410 and headers["Access-Control-Allow-Origin"] == ORIGIN


def test_oversized_and_malformed_posts_are_refused_and_end_only_their_session(daemon):
    neighbour = LongPoll(daemon.http_url)
    neighbour.join("public:lp-neighbour")
    c = LongPoll(daemon.http_url)
    big = [None, "1", "public:lp-x", "msg", {"blob": "x" * 5000}]
    status, body, _ = c.post([big], ndjson=True)
    assert (status, body) == (413, {"status": 413, "error": "message larger than max_frame_bytes (4096)"})
    status, body, _ = c.post(b"\xff\xfe[1]\n", ctype="application/x-ndjson")
    assert (status, body["error"]) == (400, "ndjson line is neither a JSON array nor base64")
    status, body, _ = c.post(b"[\xff]", ctype="application/x-ndjson")
    assert (status, body["error"]) == (400, "message is not UTF-8")
    status, body, _ = c.post(b"x" * 70000, ctype="application/x-ndjson")
    assert status == 413 and "max_publish_bytes" in body["error"]
    # Well-formed lines, but not Phoenix messages: the session ends, as a WebSocket would close.
    c2 = LongPoll(daemon.http_url)
    status, body, _ = c2.post(b"[1, 2", ctype="application/x-ndjson")
    assert (status, body) == (400, {"status": 400, "error": "invalid JSON"})
    assert c2.poll() == {"status": 500, "error": "session ended: invalid JSON"}
    daemon.publish("public:lp-neighbour", "fine", {})
    assert neighbour.expect(event="fine")["topic"] == "public:lp-neighbour"
    assert still_serving(daemon)


def test_101_messages_in_one_post_are_refused_whole(daemon):
    c = LongPoll(daemon.http_url)
    joins = [[None, str(i), "public:lp-101-%d" % i, "phx_join", {}] for i in range(101)]
    status, body, _ = c.post(joins, ndjson=True)
    assert (status, body) == (413, {"status": 413, "error": "more than 100 messages in one POST"})
    assert c.poll()["status"] == 204                  # nothing of it was dispatched
    status, body, _ = c.post(joins[:100], ndjson=True)
    assert (status, body) == (200, {"status": 200})
    replies = set()
    while len(replies) < 100:
        c.poll()
        replies |= {m["ref"] for m in c.messages if m["event"] == "phx_reply"}
    assert replies == {str(i) for i in range(100)}


def test_a_flood_of_opens_is_capped_and_reaped_without_disturbing_live_sessions(pusherd_factory):
    d = pusherd_factory({"longpoll_window": "2s", "max_connections": 20})
    live = LongPoll(d.http_url)
    live.join("public:lp-flood")
    flood = LongPoll(d.http_url, open_session=False)
    answers = [flood.request("GET", flood.url())[:2] for _ in range(40)]
    assert sum(1 for s, b in answers if b["status"] == 410) == 19
    assert all((s, b) == (503, {"status": 500, "error": "too many connections"}) for s, b in answers if s != 200)
    assert live.poll()["status"] == 204          # the live session polls on
    d.wait_log("long-poll session reaped", timeout=10)   # never polled: reaped after half a window
    assert LongPoll(d.http_url).opened["status"] == 410
    d.publish("public:lp-flood", "still", {})
    assert live.expect(event="still")["topic"] == "public:lp-flood"

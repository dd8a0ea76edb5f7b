"""The long-poll transport against a real pusherd over real HTTP: the status rules of
reference/phoenix-protocol.md section 5, the same session as a WebSocket's (channel rules, limits,
history, token expiry), the bounded outbox, the reaper, max_connections and the drain."""

import json
import signal
import threading
import time

import pytest

from longpoll_testing import LongPoll
from pusherd_testing import PhxClient, rails_token

pytestmark = pytest.mark.integration

ORIGIN = "http://localhost:3000"
WINDOW = {"longpoll_window": "1s"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from pusherd_testing import Pusherd
    d = Pusherd(tmp_path_factory.mktemp("lp"), dict(WINDOW, history=[{"topics": "deploys:*", "size": 10,
                                                                      "ttl": 3600}])).start()
    yield d
    d.stop()


def health(d):
    return d.request("GET", "/healthz")[1]["connections"]


def test_open_is_410_with_a_token_then_204_after_the_window_then_200_with_messages(daemon):
    c = LongPoll(daemon.http_url)
    assert c.opened["messages"] == [] and c.opened["token"]
    assert c.poll() == {"status": 204, "token": c.token, "messages": []}
    assert c.join("public:lp-rules") == {"status": "ok", "response": {}}
    assert daemon.publish("public:lp-rules", "a", {"n": 1})[0] == 200
    assert daemon.publish("public:lp-rules", "b", {"n": 2})[0] == 200
    body = c.poll()
    assert body["status"] == 200 and body["token"] == c.token
    assert [json.loads(m)[3] for m in body["messages"]] == ["a", "b"]   # V2: each the text of a frame


def test_v1_clients_get_message_objects(daemon):
    c = LongPoll(daemon.http_url, vsn="1.0.0")
    c.join("public:lp-v1")
    daemon.publish("public:lp-v1", "ev", {"n": 1})
    body = c.poll()
    assert body["messages"] == [{"topic": "public:lp-v1", "event": "ev", "payload": {"n": 1}, "ref": None}]


def test_an_unknown_vsn_is_refused_403(daemon):
    c = LongPoll(daemon.http_url, vsn="3.0.0", open_session=False)
    status, body, _ = c.request("GET", c.url())
    assert (status, body) == (403, {"status": 403, "error": "unsupported protocol version (vsn)"})


def test_a_second_get_answers_the_first_with_204(daemon):
    c = LongPoll(daemon.http_url)
    first = {}
    t = threading.Thread(target=lambda: first.update(c.poll(timeout=5)))
    t.start()
    time.sleep(0.3)
    second = {}
    t2 = threading.Thread(target=lambda: second.update(c.poll(timeout=5)))
    t2.start()                      # takes the first one's place: the first is answered at once
    t.join(5)
    assert first == {"status": 204, "token": c.token, "messages": []}
    assert t2.is_alive() and not second      # ... while the second still waits for its window
    daemon.publish("public:lp-none", "x", {})
    t2.join(5)
    assert second == {"status": 204, "token": c.token, "messages": []}


def test_an_ndjson_batch_is_dispatched_in_order_like_websocket_frames(daemon):
    c = LongPoll(daemon.http_url)
    frames = [[None, "1", "public:lp-batch", "phx_join", {}], [None, "2", "public:lp-batch", "msg", {"k": 1}],
              [None, "3", "phoenix", "heartbeat", {}]]
    assert c.post(frames, ndjson=True)[:2] == (200, {"status": 200})
    replies = [c.expect(event="phx_reply", ref=ref) for ref in ("1", "2", "3")]
    assert [r["payload"]["status"] for r in replies] == ["ok", "ok", "ok"]
    assert c.expect(event="msg", topic="public:lp-batch")["payload"] == {"k": 1}


def test_channel_rules_limits_and_token_claims_are_the_websockets(daemon):
    c = LongPoll(daemon.http_url)
    assert c.join("private:lp-nope") == {"status": "error", "response": {"reason": "authentication_required"}}
    token, csrf = rails_token(listen=["private:lp-yes"])
    assert c.join("private:lp-yes", {"guardian_token": token, "csrf_token": csrf})["status"] == "ok"
    assert c.push("private:lp-yes", "msg", {}) == {"status": "error", "response": {"reason": "forbidden"}}
    assert c.push("public:lp-unjoined", "msg", {})["response"] == {"reason": "unmatched topic"}


def test_a_channel_whose_token_expires_is_closed_over_long_poll(daemon):
    c = LongPoll(daemon.http_url)
    token, csrf = rails_token(listen=["private:lp-expiring"], ttl=2)
    assert c.join("private:lp-expiring", {"guardian_token": token, "csrf_token": csrf})["status"] == "ok"
    closed = c.expect(timeout=10, topic="private:lp-expiring", event="phx_close")
    assert closed["join_ref"] == c.join_ref


def test_recovery_with_since_works_over_long_poll(daemon):
    c = LongPoll(daemon.http_url)
    token, csrf = rails_token(listen=["deploys:*"])
    c.join("deploys:lp", {"guardian_token": token, "csrf_token": csrf})
    for n in (1, 2, 3):
        daemon.publish("deploys:lp", "new_version", {"n": n})
    first = c.expect(event="new_version")
    later = LongPoll(daemon.http_url)
    reply = later.join("deploys:lp", {"guardian_token": token, "csrf_token": csrf, "since": first["ref"]})
    assert reply["response"]["recovered"] is True
    assert later.collect("deploys:lp", "new_version", 2) == [{"n": 2}, {"n": 3}]


def test_polls_keep_a_session_alive_without_heartbeats(pusherd_factory):
    d = pusherd_factory({"longpoll_window": "1s", "heartbeat_timeout": "1s"})
    c = LongPoll(d.http_url)
    c.join("public:lp-alive")
    deadline = time.monotonic() + 4.5    # past two sweeps, longer than heartbeat_timeout
    while time.monotonic() < deadline:
        assert c.poll()["status"] == 204
    d.publish("public:lp-alive", "still", {})
    assert c.expect(event="still")["topic"] == "public:lp-alive"


def test_a_session_not_polled_is_reaped_and_its_channels_leave(pusherd_factory):
    d = pusherd_factory(WINDOW)
    c = LongPoll(d.http_url)
    c.join("public:lp-reaped")
    assert health(d) == 1
    time.sleep(1.5 * 1 + 2.5)          # 1.5 windows, and a sweep
    assert health(d) == 0
    d.wait_log("long-poll session reaped")
    again = c.poll()
    assert again["status"] == 410 and again["token"] != c.token   # a dead session: the 410 of a new one


def test_a_slow_consumer_session_ends_and_its_next_poll_is_told_to_reconnect(pusherd_factory):
    d = pusherd_factory(dict(WINDOW, max_outbox_bytes=2000))
    c = LongPoll(d.http_url)
    c.join("public:lp-slow")
    for n in range(5):
        d.publish("public:lp-slow", "big", {"blob": "x" * 600, "n": n})
    d.wait_log("ending long-poll session: slow consumer")
    assert c.poll() == {"status": 500, "error": "session ended: slow consumer"}
    assert c.poll()["status"] == 410            # then it is forgotten
    assert PhxClient(d.ws_url).join("public:lp-slow")[0] == "ok"   # nobody else disturbed


def test_long_poll_sessions_count_against_max_connections(pusherd_factory):
    d = pusherd_factory({"max_connections": 2})
    LongPoll(d.http_url)
    ws = PhxClient(d.ws_url)
    refused = LongPoll(d.http_url, open_session=False)
    status, body, headers = refused.request("GET", refused.url())
    assert (status, body) == (503, {"status": 500, "error": "too many connections"})
    assert headers["Retry-After"] == "5"
    ws.close()


def test_sigterm_answers_a_pending_poll_so_every_client_reconnects(pusherd_factory):
    d = pusherd_factory({"longpoll_window": "30s", "drain_seconds": "0s"})
    c = LongPoll(d.http_url)
    c.join("public:lp-drain")
    answer = {}
    t = threading.Thread(target=lambda: answer.update(c.poll(timeout=10)))
    t.start()
    time.sleep(0.3)
    d.send_signal(signal.SIGTERM)
    t.join(10)      # long before the 30 s window
    assert answer == {"status": 500, "error": "session ended: server shutting down"}
    d.proc.wait(15)


def test_options_answers_the_preflight_for_allowed_origins_only(daemon):
    c = LongPoll(daemon.http_url, open_session=False)
    status, _, headers = c.request("OPTIONS", c.path, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-phoenix-authtoken"})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "X-Phoenix-AuthToken" in headers["Access-Control-Allow-Headers"]
    assert headers["Access-Control-Max-Age"] == "3600"
    status, body, headers = c.request("OPTIONS", c.path, headers={"Origin": "https://evil.test"})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    assert body == {"status": 403, "error": "origin not allowed"}

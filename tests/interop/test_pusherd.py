"""Interop: the real pusherd daemon driven by the REAL, unmodified phoenix.js clients.

Every assertion is made on what the client library itself reported (join/push/leave replies,
`channel.on` events, socket open/close/error), through the harness in conftest.py. Versions:
1.2.1 (vsn 1.0.0, JSON objects) and 1.4.18 / 1.5.14 / 1.8.16 (vsn 2.0.0, arrays).

Most tests share the module-scoped daemon and use topics of their own; the tests that need a
different configuration or a restart start a daemon of their own.
"""

from __future__ import annotations

import json
import uuid

import pytest

from pusherd_testing import rails_token
from rails_app import rails_app_script, render_rails_pages

pytestmark = pytest.mark.interop

ORIGIN = "http://localhost:3000"  # allowed by conftest.BASE_CONFIG; browsers always send an Origin
ANN = {"id": 1, "name": "Ann", "email": "a@example.com", "crews": [3]}
#: fast reconnect/rejoin, for the tests that want the client to come back by itself
FAST = dict(reconnectAfterMs=100, rejoinAfterMs=100, timeout=3000)
#: no automatic retry within a test (1.4.3+ retries a refused join every rejoinAfterMs forever)
NO_RETRY = dict(reconnectAfterMs=60000, rejoinAfterMs=60000, timeout=3000)


@pytest.fixture
def phx(phx, request):
    """The harness factory, plus: no client saw an exception inside phoenix.js, and the shared
    daemon logged no traceback (checked after each test)."""
    made = []

    def factory(*args, **kwargs):
        client = phx(*args, **kwargs)
        made.append(client)
        return client

    yield factory
    for client in made:
        bad = [l for l in client.lines if l.get("type") in ("exception", "driver_error", "raw")]
        assert not bad, "phoenix.js did not like something:\n" + client.transcript()
    if "pusherd_server" in request.fixturenames:
        log = request.getfixturevalue("pusherd_server").log()
        assert "Traceback" not in log, log


def uid() -> str:
    return uuid.uuid4().hex[:10]


def join_params(token):
    jwt, csrf = token
    return {"guardian_token": jwt, "csrf_token": csrf}


def open_client(phx, version, url, origin=ORIGIN, **opts):
    """A phoenix.js Socket connected to `url`, after its `open` event."""
    c = phx(version)
    c.connect(url, origin=origin, **opts)
    c.expect(type="open")
    return c


def join_ok(c, id, topic, params):
    c.join(id, topic, params)
    reply = c.expect(type="join", id=id)
    assert (reply["status"], reply["response"]) == ("ok", {}), "join %s refused: %r\n%s" % (
        topic, reply, c.transcript())
    return reply


def push_reply(c, id, event, payload, tag):
    c.push(id, event, payload, tag=tag)
    return c.expect(type="push_reply", tag=tag)


def is_heartbeat_reply(line):
    """A frame_in (trace_frames) that answers a heartbeat, in either serializer."""
    if line.get("type") != "frame_in":
        return False
    msg = json.loads(line["data"])
    if isinstance(msg, list):
        msg = dict(zip(("join_ref", "ref", "topic", "event", "payload"), msg))
    return msg["topic"] == "phoenix" and msg["event"] == "phx_reply" and msg["payload"] == {
        "status": "ok", "response": {}}


# ---------------------------------------------------------------------------------------------
# join + Rails publish
# ---------------------------------------------------------------------------------------------

def test_join_with_rails_token_and_receive_rails_publish(phx, phx_version, pusherd_server):
    """The page's join on deploys:web with the Rails token (user and anonymous), then the deploy hook."""
    c = open_client(phx, phx_version, pusherd_server.ws_url, **NO_RETRY)
    assert c.vsn == ("1.0.0" if phx_version == "1.2" else "2.0.0")
    user = join_ok(c, "user", "deploys:web", join_params(rails_token(listen=["deploys:web"], sub=ANN)))
    assert user["join_ref"]
    # A second socket for the anonymous visitor (one socket may join a topic only once).
    anon_c = open_client(phx, phx_version, pusherd_server.ws_url, **NO_RETRY)
    join_ok(anon_c, "anon", "deploys:web", join_params(rails_token(listen=["deploys:web"], sub={})))

    status, body = pusherd_server.publish("deploys:web", "new_version", {"version": "abc"})
    assert (status, body.get("status")) == (200, "ok"), body

    for client, id in ((c, "user"), (anon_c, "anon")):
        ev = client.expect(type="event", id=id, event="new_version")
        assert ev["topic"] == "deploys:web"
        assert ev["payload"] == {"version": "abc"}
        assert ev["ref"] is None  # a broadcast, not a reply
        client.expect_none(type="event", within=0.2)  # delivered exactly once
        assert len(client.events(id)) == 1
        client.expect_none(type="close", within=0)


@pytest.fixture(scope="module")
def rails_pages(tmp_path_factory):
    """Pages rendered by real Rails (Debian's actionpack) with docs/rails.md's pusher_token and
    csrf_meta_tags: alice's session three times, bob's twice (tests/rails_app.py)."""
    return render_rails_pages(rails_app_script(tmp_path_factory.mktemp("rails-app")), urlsafe=True)[0]


def test_join_with_rails_own_authenticity_token(phx, phx_version, pusherd_server, rails_pages):
    """docs/rails.md §4's page: phoenix.js joins with the csrf-token meta tag Rails rendered as
    csrf_token; another session's meta tag is refused."""
    alice, bob = rails_pages["alice"], rails_pages["bob"]

    def params(page, csrf_page):
        return {"guardian_token": page["pusher-token"], "csrf_token": csrf_page["csrf-token"]}

    intruder = open_client(phx, phx_version, pusherd_server.ws_url, **NO_RETRY)
    intruder.join("bobs", "private:user-7", params(alice[0], bob[0]))
    reply = intruder.expect(type="join", id="bobs")
    assert (reply["status"], reply["response"]) == ("error", {"reason": "csrf_mismatch"}), reply
    c = open_client(phx, phx_version, pusherd_server.ws_url, **NO_RETRY)
    join_ok(c, "own", "private:user-7", params(alice[0], alice[0]))
    join_ok(c, "other_render", "deploys:web", params(alice[1], alice[2]))   # same session, other mask

    pusherd_server.publish("private:user-7", "notification", {"text": "hi"})
    assert c.expect(type="event", id="own", event="notification")["payload"] == {"text": "hi"}
    intruder.expect_none(type="event", within=0.2)   # its socket was never subscribed
    c.expect_none(lambda l: l.get("type") in ("close", "error"), within=0)


# ---------------------------------------------------------------------------------------------
# client pushes
# ---------------------------------------------------------------------------------------------

def test_push_on_public_topic_reaches_every_member_of_every_version(phx, pusherd_server):
    topic = "public:room-" + uid()
    clients = {}
    for version in ("1.2", "1.4", "1.5", "1.8"):
        c = open_client(phx, version, pusherd_server.ws_url, **NO_RETRY)
        # public topics need no token; 1.4 joins with a (valid) token anyway, like a signed-in page
        params = join_params(rails_token(listen=["deploys:web"], sub=ANN)) if version == "1.4" else {}
        join_ok(c, "room", topic, params)
        clients[version] = c

    for sender in ("1.8", "1.2"):
        body = {"body": "hello from " + sender, "n": [1, 2.5, None, True], "nested": {"ü": "✓"}}
        reply = push_reply(clients[sender], "room", "msg", body, tag="from-" + sender)
        assert (reply["status"], reply["response"]) == ("ok", {}), reply
        for version, c in clients.items():
            ev = c.expect(type="event", id="room", event="msg", payload={"body": body["body"]})
            assert ev["payload"] == body, (version, ev)
            assert ev["topic"] == topic

    for version, c in clients.items():
        c.expect_none(type="event", within=0 if version != "1.8" else 0.2)
        assert [e["payload"]["body"] for e in c.events("room")] == ["hello from 1.8", "hello from 1.2"], version


@pytest.mark.parametrize("version", ["1.2", "1.8", "1.5"])
def test_push_on_private_topic_needs_a_publish_claim(phx, version, pusherd_server):
    topic = "private:ops-" + uid()
    listener = open_client(phx, "1.4", pusherd_server.ws_url, **NO_RETRY)
    join_ok(listener, "l", topic, join_params(rails_token(listen=[topic])))

    reader = open_client(phx, version, pusherd_server.ws_url, **NO_RETRY)
    join_ok(reader, "r", topic, join_params(rails_token(listen=[topic], sub=ANN)))
    refused = push_reply(reader, "r", "msg", {"body": "let me in"}, tag="nope")
    assert (refused["status"], refused["response"]) == ("error", {"reason": "forbidden"}), refused

    writer = open_client(phx, version, pusherd_server.ws_url, **NO_RETRY)
    join_ok(writer, "w", topic, join_params(rails_token(listen=["private:*"], publish=["private:*"], sub=ANN)))
    accepted = push_reply(writer, "w", "msg", {"body": "deploying"}, tag="yes")
    assert (accepted["status"], accepted["response"]) == ("ok", {}), accepted

    # The allowed push arrives everywhere; the refused one (sent earlier) nowhere.
    for c, id in ((listener, "l"), (reader, "r"), (writer, "w")):
        ev = c.expect(type="event", id=id, event="msg")
        assert ev["payload"] == {"body": "deploying"}, ev
    for c, id in ((listener, "l"), (reader, "r"), (writer, "w")):
        c.expect_none(type="event", within=0.1)
        assert [e["payload"] for e in c.events(id)] == [{"body": "deploying"}], c.transcript()
    # the refusal did not end the channel nor the socket
    reader.expect_none(lambda l: l.get("type") in ("channel_close", "channel_error", "close"), within=0)
    assert reader.state()["channels"]["r"]["state"] == "joined"


# ---------------------------------------------------------------------------------------------
# refused joins
# ---------------------------------------------------------------------------------------------

def test_refused_joins_as_the_client_sees_them(phx, phx_version, pusherd_server):
    suffix = uid()
    priv = "private:" + suffix
    cases = [
        # (id, topic, join params, expected reason)
        ("no_token", "deploys:web", {}, "authentication_required"),
        ("csrf_only", "deploys:web", {"csrf_token": "csrf-token-from-the-page"}, "authentication_required"),
        ("expired", "deploys:web", join_params(rails_token(listen=["deploys:web"], sub=ANN, ttl=-60)),
         "token_expired"),
        ("csrf", "deploys:web", {"guardian_token": rails_token(listen=["deploys:web"], sub=ANN)[0],
                                 "csrf_token": "some-other-csrf-token"}, "csrf_mismatch"),
        ("no_csrf", "deploys:web", {"guardian_token": rails_token(listen=["deploys:web"], sub=ANN)[0]},
         "csrf_mismatch"),
        ("other_topic", "deploys:web", join_params(rails_token(listen=["deploys:api", "deploys:*x"])),
         "forbidden"),
        ("regex_dot_star", priv, join_params(rails_token(listen=["private:.*"])), "forbidden"),
        ("regex_dot", priv, join_params(rails_token(listen=["priv.te:*"])), "forbidden"),
        ("prefix_no_colon", priv, join_params(rails_token(listen=["private*", "private"])), "forbidden"),
        ("wrong_secret", "deploys:web",
         join_params(rails_token(listen=["deploys:web"], secret="not-the-guardian-secret-0123456789")),
         "invalid_token"),
        ("garbage", "deploys:web", {"guardian_token": "not.a.jwt", "csrf_token": "x"}, "invalid_token"),
    ]
    c = open_client(phx, phx_version, pusherd_server.ws_url, **NO_RETRY)
    # One at a time: 1.5+ clients leave a channel of the same topic that is still joining.
    for id, topic, params, reason in cases:
        c.join(id, topic, params)
        reply = c.expect(type="join", id=id)
        assert (reply["status"], reply["response"]) == ("error", {"reason": reason}), (id, reply)

    # The socket was not subscribed to any refused topic (an errored channel object still gets,
    # client side, whatever arrives on its topic, so nothing may arrive at all).
    pusherd_server.publish(priv, "secret", {"n": 0})
    pusherd_server.publish("deploys:web", "new_version", {"version": "refused-" + suffix})
    # Controls, on the same socket, after all the refusals: the claims grant exactly their literal text.
    join_ok(c, "literal", "private:.*", join_params(rails_token(listen=["private:.*"])))
    join_ok(c, "good", priv + ":ok", join_params(rails_token(listen=["private:*"])))
    pusherd_server.publish("private:.*", "secret", {"n": 1})
    pusherd_server.publish(priv + ":ok", "secret", {"n": 2})
    assert c.expect(type="event", id="literal", event="secret")["payload"] == {"n": 1}
    assert c.expect(type="event", id="good", event="secret")["payload"] == {"n": 2}
    c.expect_none(type="event", within=0.2)
    assert [(e["id"], e["payload"]) for e in c.events()] == [("literal", {"n": 1}), ("good", {"n": 2})]
    c.expect_none(lambda l: l.get("type") in ("close", "error"), within=0)
    # exactly one answer per refused join: no client retry happened (NO_RETRY) and none was needed
    joins = [l["id"] for l in c.lines if l.get("type") == "join"]
    assert joins == [case[0] for case in cases] + ["literal", "good"], joins
    assert pusherd_server.wait_log("reason=csrf_mismatch")


# ---------------------------------------------------------------------------------------------
# leave, duplicate join
# ---------------------------------------------------------------------------------------------

def test_leave_and_duplicate_join(phx, phx_version, pusherd_server):
    topic = "private:dup-" + uid()
    params = join_params(rails_token(listen=[topic], sub=ANN))
    c = open_client(phx, phx_version, pusherd_server.ws_url, trace_frames=True, **NO_RETRY)

    def frames_with(event):  # raw frames: a closed channel object would hide them from `event` lines
        return [l for l in c.lines if l.get("type") == "frame_in" and '"%s"' % event in l["data"]]

    join_ok(c, "first", topic, params)
    c.leave("first")
    assert c.expect(type="leave", id="first")["status"] == "ok"
    c.expect(type="channel_close", id="first")
    assert c.state()["channels"]["first"]["state"] == "closed"
    pusherd_server.publish(topic, "after_leave", {"n": 0})

    # Join again with a new channel object, then a duplicate one on the same topic while joined:
    # the old channel is closed (1.5+ leave it themselves first, 1.2/1.4 get the server's phx_close),
    # the new one joins, and broadcasts reach the new one only, once.
    old = join_ok(c, "old", topic, params)
    new = join_ok(c, "new", topic, params)
    assert new["join_ref"] != old["join_ref"]
    closed = c.expect(type="channel_close", id="old")
    assert closed["payload"] == ("leave" if phx_version in ("1.5", "1.8") else {}), closed
    pusherd_server.publish(topic, "after_dup", {"n": 1})
    ev = c.expect(type="event", event="after_dup")
    assert (ev["id"], ev["payload"]) == ("new", {"n": 1}), ev
    c.expect_none(type="event", within=0.2)
    assert (len(frames_with("after_leave")), len(frames_with("after_dup"))) == (0, 1), c.transcript()
    c.expect_none(lambda l: l.get("type") in ("channel_error", "close")
                  or (l.get("type") == "channel_close" and l.get("id") == "new"), within=0)
    state = c.state()["channels"]
    assert (state["old"]["state"], state["new"]["state"]) == ("closed", "joined"), state

    # the surviving channel can push and still leaves cleanly
    reply = push_reply(c, "new", "msg", {}, tag="p")
    assert (reply["status"], reply["response"]) == ("error", {"reason": "forbidden"}), reply
    c.leave("new")
    c.expect(type="channel_close", id="new")


# ---------------------------------------------------------------------------------------------
# heartbeats
# ---------------------------------------------------------------------------------------------

def test_heartbeats_keep_clients_connected(phx, pusherd_factory):
    """heartbeat_timeout 1 s: a silent client is closed (1001) by the sweep, heartbeating ones stay."""
    d = pusherd_factory({"heartbeat_timeout": 1, "drain_seconds": 0})
    topic = "public:hb-" + uid()
    clients = {}
    for version in ("1.8", "1.2", "1.4", "1.5"):
        c = open_client(phx, version, d.ws_url, trace_frames=True, heartbeatIntervalMs=200, **NO_RETRY)
        join_ok(c, "c", topic, {})
        clients[version] = c
    silent = open_client(phx, "1.8", d.ws_url, heartbeatIntervalMs=30000, **NO_RETRY)
    join_ok(silent, "c", topic, {})

    # The silent socket is closed by the server within heartbeat_timeout + one sweep (2 s) ...
    close = silent.expect(type="close", timeout=6)
    assert close["code"] == 1001, close
    # ... while the heartbeating ones, opened before it, stay open through that and beyond:
    # 12 answered heartbeats each (>= 2.4 s at 200 ms; 1.4+ close the socket on a missed reply).
    for version, c in clients.items():
        for _ in range(12):
            c.expect(is_heartbeat_reply, timeout=3)
    for version, c in clients.items():
        c.expect_none(lambda l: l.get("type") in ("close", "error", "channel_error"), within=0)
        assert c.state()["connection"] == "open", version
    # and the connection is still usable
    d.publish(topic, "still_here", {"ok": True})
    for c in clients.values():
        assert c.expect(type="event", event="still_here")["payload"] == {"ok": True}
    assert "Traceback" not in d.log(), d.log()


# ---------------------------------------------------------------------------------------------
# restart
# ---------------------------------------------------------------------------------------------

def test_restart_client_reconnects_and_rejoins_by_itself(phx, pusherd_factory):
    d = pusherd_factory({"drain_seconds": 0.5})
    params = join_params(rails_token(listen=["deploys:web"], sub=ANN))
    clients = {}
    first_join = {}
    for version in ("1.8", "1.2", "1.4", "1.5"):
        c = open_client(phx, version, d.ws_url, **FAST)
        first_join[version] = join_ok(c, "deploys", "deploys:web", params)
        clients[version] = c
    port = d.port

    d.restart()  # SIGTERM (drain), then a new process on the same port
    assert d.port == port

    for version, c in clients.items():
        close = c.expect(type="close", timeout=10)
        # SIGTERM drains with 1001: never 1000, which some clients take as "do not reconnect"
        assert close["code"] == 1001, (version, close)
        c.expect(type="channel_error", id="deploys", timeout=10)
        c.expect(type="open", timeout=10)
        rejoin = c.expect(type="join", id="deploys", timeout=10)
        assert (rejoin["status"], rejoin["response"]) == ("ok", {}), (version, rejoin)
        assert rejoin["join_ref"] != first_join[version]["join_ref"]
    # no command was sent after the first join: reconnect and rejoin were the client's own doing
    for c in clients.values():
        cmds = [l["cmd"] for l in c.lines if l.get("type") == "ack"]
        assert cmds == ["connect", "join"], cmds

    status, _ = d.publish("deploys:web", "new_version", {"version": "after-restart"})
    assert status == 200
    for version, c in clients.items():
        ev = c.expect(type="event", id="deploys", event="new_version")
        assert ev["payload"] == {"version": "after-restart"}, (version, ev)
        c.expect_none(type="event", within=0.1)
    assert "Traceback" not in d.log(), d.log()


# ---------------------------------------------------------------------------------------------
# origin
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.2", "1.8"])
def test_origin_check(phx, version, pusherd_server):
    evil = phx(version)
    evil.connect(pusherd_server.ws_url, origin="https://evil.example.org", **NO_RETRY)
    err = evil.expect(type="error")
    assert "403" in (err["message"] or ""), err
    assert evil.expect(type="close")["code"] == 1006
    evil.expect_none(type="open", within=0.1)
    assert pusherd_server.wait_log("refused WebSocket upgrade from origin https://evil.example.org")

    bare = phx(version)
    bare.connect(pusherd_server.ws_url, origin="https://example.com", **NO_RETRY)  # *.example.com only
    assert "403" in (bare.expect(type="error")["message"] or "")
    bare.expect_none(type="open", within=0.1)

    topic = "public:origin-" + uid()
    for origin in ("http://localhost:3000", "https://app.example.com"):
        good = open_client(phx, version, pusherd_server.ws_url, origin=origin, **NO_RETRY)
        join_ok(good, "c", topic, {})
        pusherd_server.publish(topic, "hello", {"origin": origin})
        assert good.expect(type="event", event="hello")["payload"] == {"origin": origin}
        good.expect_none(lambda l: l.get("type") in ("error", "close"), within=0)


def test_auth_token_option_of_phoenix_18_connects(pusherd_server, phx):
    """phoenix.js 1.8's `authToken` socket option sends the token as a WebSocket subprotocol."""
    token, csrf = rails_token(listen=["private:authtoken"])
    c = phx("1.8")
    c.connect(pusherd_server.ws_url, {"csrf_token": csrf}, authToken=token)
    c.expect(type="open")
    c.join("a", "public:authtoken")
    c.expect(type="join", id="a", status="ok")

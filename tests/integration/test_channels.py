"""The Phoenix Channels protocol against a real pusherd, over real sockets (V2 and V1)."""

import json
import time

import pytest

from pusherd_testing import rails_token

pytestmark = pytest.mark.integration


@pytest.fixture(params=["2.0.0", "1.0.0"])
def vsn(request):
    return request.param


def test_heartbeat_is_answered(pusherd_server, phx_connect, vsn):
    c = phx_connect(pusherd_server.ws_url, vsn=vsn)
    c.send(None, "7", "phoenix", "heartbeat", {})
    reply = c.expect(event="phx_reply", ref="7")
    assert reply["topic"] == "phoenix"
    assert reply["payload"] == {"status": "ok", "response": {}}


def test_join_with_rails_token_and_receive_publish(pusherd_server, phx_connect, vsn):
    token, csrf = rails_token(listen=["deploys:web"], sub={"id": 1, "name": "Ann", "email": "a@x", "crews": [1]})
    c = phx_connect(pusherd_server.ws_url, vsn=vsn)
    status, response, ref = c.join("deploys:web", {"guardian_token": token, "csrf_token": csrf})
    assert (status, response) == ("ok", {})
    status, body = pusherd_server.publish("deploys:web", "new_version", {"version": "abc123"})
    assert status == 200 and body["status"] == "ok"
    msg = c.expect(event="new_version")
    assert msg["topic"] == "deploys:web" and msg["payload"] == {"version": "abc123"}
    assert msg["ref"] is None and msg["join_ref"] is None


def test_join_reply_echoes_refs_exactly(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url, vsn="2.0.0")
    c.send("11", "12", "public:refs", "phx_join", {})
    reply = c.expect(event="phx_reply", ref="12")
    assert reply["join_ref"] == "11"


def test_broadcast_frames_match_the_serializer(pusherd_server, phx_connect):
    v2 = phx_connect(pusherd_server.ws_url, vsn="2.0.0")
    v1 = phx_connect(pusherd_server.ws_url, vsn="1.0.0")
    for c in (v1, v2):
        assert c.join("public:shapes")[0] == "ok"
    pusherd_server.publish("public:shapes", "msg", {"n": 1})
    assert json.loads(v2.ws.recv(timeout=5)) == [None, None, "public:shapes", "msg", {"n": 1}]
    assert json.loads(v1.ws.recv(timeout=5)) == {"topic": "public:shapes", "event": "msg",
                                                 "payload": {"n": 1}, "ref": None}


@pytest.mark.parametrize("case,params,reason", [
    ("no token", {}, "authentication_required"),
    ("garbage token", {"guardian_token": "not.a.jwt", "csrf_token": "x"}, "invalid_token"),
    ("wrong secret", "wrong-secret", "invalid_token"),
    ("expired", "expired", "token_expired"),
    ("csrf mismatch", "csrf", "csrf_mismatch"),
    ("csrf missing", "nocsrf", "csrf_mismatch"),
    ("listen does not match", "other-topic", "forbidden"),
])
def test_join_refusals(pusherd_server, phx_connect, vsn, case, params, reason):
    if params == "wrong-secret":
        token, csrf = rails_token(listen=["private:admin"], secret="another-secret-0123456789abcdefghij")
        params = {"guardian_token": token, "csrf_token": csrf}
    elif params == "expired":
        token, csrf = rails_token(listen=["private:admin"], ttl=-10)
        params = {"guardian_token": token, "csrf_token": csrf}
    elif params == "csrf":
        token, _ = rails_token(listen=["private:admin"])
        params = {"guardian_token": token, "csrf_token": "another-csrf"}
    elif params == "nocsrf":
        token, _ = rails_token(listen=["private:admin"])
        params = {"guardian_token": token}
    elif params == "other-topic":
        token, csrf = rails_token(listen=["private:other", "private:.*", "priv.te:*"])
        params = {"guardian_token": token, "csrf_token": csrf}
    c = phx_connect(pusherd_server.ws_url, vsn=vsn)
    status, response, _ = c.join("private:admin", params)
    assert (status, response) == ("error", {"reason": reason})
    # A refused join receives nothing published on the topic.
    pusherd_server.publish("private:admin", "notice", {"x": 1})
    c.assert_silent(0.3)
    # ... and the socket still works.
    assert c.join("public:after-refusal")[0] == "ok"


def test_regex_looking_claims_grant_only_their_literal_text(pusherd_server, phx_connect):
    token, csrf = rails_token(listen=["private:.*", "priv.te:*"])
    c = phx_connect(pusherd_server.ws_url)
    auth = {"guardian_token": token, "csrf_token": csrf}
    assert c.join("private:admin", auth)[:2] == ("error", {"reason": "forbidden"})
    assert c.join("privXte:admin", auth)[:2] == ("error", {"reason": "forbidden"})
    assert c.join("private:.*", auth)[:2] == ("ok", {})
    assert c.join("priv.te:anything", auth)[:2] == ("ok", {})


def test_wildcard_claim(pusherd_server, phx_connect):
    token, csrf = rails_token(listen=["private:*"])
    c = phx_connect(pusherd_server.ws_url)
    auth = {"guardian_token": token, "csrf_token": csrf}
    assert c.join("private:admins", auth)[0] == "ok"
    assert c.join("private:a:b", auth)[0] == "ok"
    assert c.join("privately:x", auth)[:2] == ("error", {"reason": "forbidden"})


def test_public_topic_needs_no_token(pusherd_server, phx_connect, vsn):
    c = phx_connect(pusherd_server.ws_url, vsn=vsn)
    assert c.join("public:lobby")[:2] == ("ok", {})


def test_anonymous_sub_token_works(pusherd_server, phx_connect):
    token, csrf = rails_token(listen=["deploys:web"], sub={})
    c = phx_connect(pusherd_server.ws_url)
    assert c.join("deploys:web", {"guardian_token": token, "csrf_token": csrf})[0] == "ok"


def test_duplicate_join_closes_the_old_channel_first(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url, vsn="2.0.0")
    c.send("1", "1", "public:dup", "phx_join", {})
    c.expect(event="phx_reply", ref="1")
    c.send("2", "2", "public:dup", "phx_join", {})
    close = c.recv()
    assert (close["event"], close["join_ref"], close["ref"], close["payload"]) == ("phx_close", "1", "1", {})
    reply = c.recv()
    assert (reply["event"], reply["ref"], reply["join_ref"]) == ("phx_reply", "2", "2")
    assert reply["payload"]["status"] == "ok"
    # Still subscribed exactly once: one publish, one frame.
    pusherd_server.publish("public:dup", "msg", {"once": True})
    c.expect(event="msg")
    c.assert_silent(0.3)


def test_leave_replies_ok_then_closes_and_stops_delivery(pusherd_server, phx_connect, vsn):
    c = phx_connect(pusherd_server.ws_url, vsn=vsn)
    _, _, join_ref = c.join("public:leave")
    c.send(join_ref, "9", "public:leave", "phx_leave", {})
    reply = c.recv()
    assert (reply["event"], reply["ref"], reply["payload"]["status"]) == ("phx_reply", "9", "ok")
    close = c.recv()
    assert close["event"] == "phx_close" and close["ref"] == join_ref
    pusherd_server.publish("public:leave", "msg", {})
    c.assert_silent(0.3)


def test_push_to_unjoined_topic(pusherd_server, phx_connect, vsn):
    c = phx_connect(pusherd_server.ws_url, vsn=vsn)
    status, response = c.push("public:never-joined", "msg", {"body": "hi"})
    assert (status, response) == ("error", {"reason": "unmatched topic"})


def test_client_push_on_public_topic_reaches_everyone_including_sender(pusherd_server, phx_connect):
    a = phx_connect(pusherd_server.ws_url, vsn="2.0.0")
    b = phx_connect(pusherd_server.ws_url, vsn="1.0.0")
    _, _, join_ref = a.join("public:chat")
    b.join("public:chat")
    assert a.push("public:chat", "msg", {"body": "hello"}, join_ref=join_ref) == ("ok", {})
    assert a.expect(event="msg")["payload"] == {"body": "hello"}
    assert b.expect(event="msg")["payload"] == {"body": "hello"}


def test_client_push_needs_publish_claim_on_private_topics(pusherd_server, phx_connect):
    listener_token, csrf = rails_token(listen=["private:ticker"])
    publisher_token, csrf2 = rails_token(listen=["private:ticker"], publish=["private:*"])
    watcher = phx_connect(pusherd_server.ws_url)
    watcher.join("private:ticker", {"guardian_token": listener_token, "csrf_token": csrf})
    a = phx_connect(pusherd_server.ws_url)
    _, _, jr = a.join("private:ticker", {"guardian_token": listener_token, "csrf_token": csrf})
    assert a.push("private:ticker", "msg", {"x": 1}, join_ref=jr) == ("error", {"reason": "forbidden"})
    watcher.assert_silent(0.3)
    p = phx_connect(pusherd_server.ws_url)
    _, _, jr = p.join("private:ticker", {"guardian_token": publisher_token, "csrf_token": csrf2})
    assert p.push("private:ticker", "msg", {"x": 2}, join_ref=jr) == ("ok", {})
    assert watcher.expect(event="msg")["payload"] == {"x": 2}


@pytest.mark.parametrize("frame,answer", [
    ('["1","1","public:x","phx_join"]', "reply"),                              # too short, but addressed
    ('{"topic": 5, "event": "phx_join", "payload": {}, "ref": "1"}', "close"),  # an object on V2
    ('["1","1","public:x","phx_join",[1,2]]', "reply"),                        # payload not an object
    ('["1",{"a":1},"public:x","phx_join",{}]', "close"),                       # ref not a string: unaddressable
    ('[null,"1","public:x","",{}]', "reply"),                                  # empty event
])
def test_wrong_shapes_get_an_error_reply_or_a_close(pusherd_server, phx_connect, frame, answer):
    from websockets.exceptions import ConnectionClosed
    c = phx_connect(pusherd_server.ws_url, vsn="2.0.0")
    other = phx_connect(pusherd_server.ws_url, vsn="2.0.0")
    other.join("public:bystander")
    c.send_raw(frame)
    if answer == "reply":
        msg = c.recv()
        assert msg["event"] == "phx_reply" and msg["payload"]["status"] == "error"
        assert msg["payload"]["response"]["reason"] == "malformed_message"
    else:
        with pytest.raises(ConnectionClosed) as info:
            c.recv()
        assert info.value.rcvd.code == 1007
    # A bystander is never disturbed.
    pusherd_server.publish("public:bystander", "msg", {"still": "here"})
    assert other.expect(event="msg")["payload"] == {"still": "here"}


def test_invalid_json_closes_with_1007(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    c.send_raw("this is not json")
    assert c.close_code() == 1007


def test_binary_frame_is_refused_clearly(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    c.ws.send(b"\x00\x01\x01\x08\x03" + b"1" + b"2" + b"public:x" + b"msg" + b"data")
    msg = c.recv()
    assert msg["payload"] == {"status": "error", "response": {"reason": "binary_not_supported"}}
    assert msg["ref"] == "2"


def test_oversized_frame_closes_with_1009(pusherd_factory, phx_connect):
    d = pusherd_factory({"max_frame_bytes": 1024})
    c = phx_connect(d.ws_url)
    c.send(None, "1", "public:big", "msg", {"blob": "x" * 4096})
    assert c.close_code() == 1009
    ok = phx_connect(d.ws_url)
    assert ok.join("public:big")[0] == "ok"


@pytest.mark.parametrize("vsn", ["3.0.0", "2.1.0", "banana", "1.1.0"])
def test_unknown_vsn_is_refused_with_403(pusherd_server, vsn):
    status, body, _ = pusherd_server.request(
        "GET", "/events/websocket?vsn=" + vsn,
        headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert status == 403 and "vsn" in body["error"]


def test_bare_endpoint_serves_the_2015_client(pusherd_server, phx_connect):
    # socket.chan() clients open the endpoint URL verbatim, with no vsn, and read reply refs
    # from the payload (0.13) or the top level (0.14): both are present.
    c = phx_connect(pusherd_server.ws_url, vsn=None, path_suffix="")
    c.send(None, "1", "public:old", "phx_join", {})
    reply = c.expect(event="phx_reply")
    assert reply["ref"] == "1" and reply["payload"]["ref"] == "1" and reply["payload"]["status"] == "ok"
    pusherd_server.publish("public:old", "new_version", {"v": 2})
    msg = c.expect(event="new_version")
    assert msg["payload"] == {"v": 2} and msg["ref"] is None


def test_websocket_path_without_vsn_is_v1(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url, vsn=None)
    c.send(None, "1", "public:v1", "phx_join", {})
    reply = c.expect(event="phx_reply")
    assert reply["ref"] == "1" and "ref" not in reply["payload"]


@pytest.mark.parametrize("origin,allowed", [
    ("http://localhost:3000", True),
    ("https://app.example.com", True),
    ("https://evil.com", False),
    ("https://example.com.evil.com", False),
    ("http://localhost:3001", False),
    (None, True),   # not a browser
])
def test_origin_check(pusherd_server, phx_connect, origin, allowed):
    from websockets.exceptions import InvalidStatus
    if allowed:
        c = phx_connect(pusherd_server.ws_url, origin=origin)
        assert c.join("public:origin")[0] == "ok"
    else:
        with pytest.raises(InvalidStatus) as err:
            phx_connect(pusherd_server.ws_url, origin=origin)
        assert err.value.response.status_code == 403


def test_idle_socket_is_closed_but_not_with_1000(pusherd_factory, phx_connect):
    d = pusherd_factory({"heartbeat_timeout": 1})
    c = phx_connect(d.ws_url)
    c.join("public:idle")
    code = c.close_code(timeout=8)
    assert code is not None and code != 1000


def test_heartbeats_keep_a_socket_open(pusherd_factory, phx_connect):
    d = pusherd_factory({"heartbeat_timeout": 1})
    c = phx_connect(d.ws_url)
    for i in range(8):
        c.send(None, str(100 + i), "phoenix", "heartbeat", {})
        c.expect(event="phx_reply", ref=str(100 + i))
        time.sleep(0.4)
    # 3.2 s of activity with a 1 s timeout and a 2 s sweep: still open.
    c.send(None, "200", "phoenix", "heartbeat", {})
    c.expect(event="phx_reply", ref="200")


def test_phoenix_subprotocol_is_selected_and_the_bearer_entry_never_echoed(pusherd_server):
    import base64
    from websockets.sync.client import connect
    token, csrf = rails_token(listen=["private:sub"])
    bearer = "base64url.bearer.phx." + base64.b64encode(token.encode()).decode().rstrip("=")
    url = pusherd_server.ws_url + "/websocket?vsn=2.0.0&csrf_token=" + csrf
    with connect(url, subprotocols=["phoenix", bearer]) as ws:
        assert ws.subprotocol == "phoenix"
        ws.send('[null,"1","phoenix","heartbeat",{}]')
        assert '"ok"' in ws.recv(timeout=5)

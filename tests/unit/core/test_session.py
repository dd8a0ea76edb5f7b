"""pusherd.core.session: feed Phoenix frames to a Session and assert on the actions it returns.

No socket, no event loop: every call passes an explicit `now`.
"""

import json
from unittest.mock import ANY

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pusherd.core import errors
from pusherd.core.protocol import LEGACY, V1, V2
from pusherd.core.access import compile_event_patterns
from pusherd.core.history import Entry, Recovery
from pusherd.core.broadcast import Broadcast
from pusherd.core.session import Close, Join, Limits, Policy, Publish, Send, Session, Subscribe, Unsubscribe
from pusherd.core.tokens import Verifier
from pusherd.client import mint_token
from pusherd.core.topics import is_public

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECRET = "session-test-guardian-secret-0123456789"
CSRF = "csrf-token-from-the-page"
NOW = 1_700_000_000.0
HOUR = 3600


def token(listen=(), publish=(), exp=NOW + HOUR, csrf=CSRF, secret=SECRET):
    return mint_token(secret, sub={"id": 1}, listen=list(listen), publish=list(publish), ttl=exp - NOW,
                      csrf_token=csrf, issuer="od-web-test", now=NOW)


def auth(tok, csrf=CSRF):
    payload = {"guardian_token": tok}
    if csrf is not None:
        payload["csrf_token"] = csrf
    return payload


class ReadySession(Session):
    """A session whose adapter has a broker that is always ready: every `Join` it returns is
    settled at once with ``joined(join)`` (reply, then Subscribe), as `Service.join` does when the
    topic is already delivered here. The two steps themselves are tested in test_join_flow_*."""

    __slots__ = ()

    def receive(self, frame, now):
        actions = []
        for action in super().receive(frame, now):
            actions += self.joined(action) if isinstance(action, Join) else [action]
        return actions


def make_session(serializer=V2, limits=Limits(), now=NOW):
    return ReadySession(serializer, Policy(Verifier([SECRET]), limits), now, peer="test")


# --- frames the client sends ------------------------------------------------------------------

def frame(serializer, join_ref, ref, topic, event, payload=None):
    payload = {} if payload is None else payload
    if serializer is V2:
        return json.dumps([join_ref, ref, topic, event, payload])
    msg = {"topic": topic, "event": event, "payload": payload, "ref": ref}
    return json.dumps(msg)            # phoenix.js 1.2 and the 2015 client send no join_ref


def join_frame(serializer, ref, topic, payload=None):
    return frame(serializer, ref, ref, topic, "phx_join", payload)


def heartbeat_frame(serializer, ref):
    return frame(serializer, None, ref, "phoenix", "heartbeat")


# --- what the session sends back -------------------------------------------------------------

def decode(action):
    """A sent frame as (join_ref, ref, topic, event, payload), whatever the serializer."""
    assert isinstance(action, Send), action
    data = json.loads(action.text)
    if isinstance(data, list):
        assert len(data) == 5
        return tuple(data)
    assert set(data) == {"topic", "event", "payload", "ref"}, "V1 frames carry exactly four keys"
    return (None, data["ref"], data["topic"], data["event"], data["payload"])


def only(actions):
    if isinstance(actions, list):
        assert len(actions) == 1, actions
        return actions[0]
    return actions


def assert_reply(actions, ref, status, response, join_ref=ANY, topic=ANY):
    join_ref_, ref_, topic_, event, payload = decode(only(actions))
    assert event == "phx_reply"
    assert ref_ == ref and type(ref_) is type(ref)
    assert join_ref_ == join_ref
    assert topic_ == topic
    assert payload["status"] == status and payload["response"] == response
    assert set(payload) <= {"status", "response", "ref"}


def assert_error(actions, ref, reason, join_ref=ANY, topic=ANY):
    assert_reply(actions, ref, "error", {"reason": reason}, join_ref=join_ref, topic=topic)


def assert_close_frame(action, join_ref, topic):
    """phx_close carries the channel's join_ref both as join_ref (V2) and as ref (server >= 1.2)."""
    j, r, t, event, payload = decode(action)
    assert (event, t, payload) == ("phx_close", topic, {})
    assert r == join_ref
    assert j in (join_ref, None)


def assert_joined(actions, ref, topic, join_ref=ANY):
    assert len(actions) == 2, actions
    assert_reply(actions[0], ref, "ok", {}, join_ref=join_ref, topic=topic)
    assert isinstance(actions[1], Subscribe) and actions[1].topic == topic


def assert_close(actions, code):
    action = only(actions)
    assert isinstance(action, Close) and action.code == code
    assert action.code != 1000


def joined_session(topic="public:lobby", payload=None, serializer=V2, limits=Limits(), ref="1"):
    s = make_session(serializer, limits)
    assert_joined(s.receive(join_frame(serializer, ref, topic, payload), NOW), ref, topic)
    return s


# --- heartbeat ---------------------------------------------------------------------------------

def test_heartbeat_v2_golden():
    s = make_session(V2)
    actions = s.receive('[null,"5","phoenix","heartbeat",{}]', NOW)
    assert len(actions) == 1 and actions[0].text == '[null,"5","phoenix","phx_reply",{"status":"ok","response":{}}]'


def test_heartbeat_v1_golden():
    s = make_session(V1)
    actions = s.receive('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"5"}', NOW)
    assert [a.text for a in actions] == [
        '{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"5"}']


def test_heartbeat_legacy_has_ref_in_payload():
    s = make_session(LEGACY)
    data = json.loads(only(s.receive(heartbeat_frame(LEGACY, "5"), NOW)).text)
    assert data["ref"] == "5" and data["payload"]["ref"] == "5" and data["payload"]["status"] == "ok"


def test_heartbeat_echoes_integer_ref():
    assert_reply(make_session(V2).receive("[null,5,\"phoenix\",\"heartbeat\",{}]", NOW), 5, "ok", {})


def test_other_events_on_the_phoenix_topic_are_unmatched():
    s = make_session(V2)
    assert_error(s.receive(frame(V2, None, "1", "phoenix", "phx_join"), NOW), "1", errors.UNMATCHED_TOPIC,
                 join_ref=None, topic="phoenix")
    assert_error(s.receive(frame(V2, None, "2", "phoenix", "ping"), NOW), "2", errors.UNMATCHED_TOPIC)


# --- join ----------------------------------------------------------------------------------------

def test_join_public_without_token_replies_then_subscribes():
    s = make_session(V2)
    actions = s.receive('["3","3","public:lobby","phx_join",{"user":"x"}]', NOW)
    assert actions[0].text == '["3","3","public:lobby","phx_reply",{"status":"ok","response":{}}]'
    assert isinstance(actions[1], Subscribe) and actions[1].topic == "public:lobby"
    assert actions[1].params == {"user": "x"}
    assert len(actions) == 2
    assert set(s.channels) == {"public:lobby"}


def test_join_without_v2_join_ref_uses_the_ref():
    s = make_session(V2)
    assert_joined(s.receive('[null,"4","public:a","phx_join",{}]', NOW), "4", "public:a", join_ref="4")
    assert s.channels["public:a"].join_ref == "4"


def test_join_private_with_token():
    s = make_session(V2)
    actions = s.receive(join_frame(V2, "1", "private:user:42", auth(token(listen=["private:user:42"]))), NOW)
    assert_joined(actions, "1", "private:user:42", join_ref="1")


def test_join_with_wildcard_grant():
    s = make_session(V2)
    tok = token(listen=["deploys:*"])
    assert_joined(s.receive(join_frame(V2, "1", "deploys:7", auth(tok)), NOW), "1", "deploys:7")
    assert_joined(s.receive(join_frame(V2, "2", "deploys:7:logs", auth(tok)), NOW), "2", "deploys:7:logs")
    assert_error(s.receive(join_frame(V2, "3", "deploys", auth(tok)), NOW), "3", errors.FORBIDDEN)


def test_join_v1_reply_has_no_join_ref():
    s = make_session(V1)
    actions = s.receive(join_frame(V1, "1", "public:a"), NOW)
    assert actions[0].text == \
        '{"topic":"public:a","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"1"}'
    assert isinstance(actions[1], Subscribe)


def test_join_legacy_reply_has_ref_inside_payload():
    s = make_session(LEGACY)
    actions = s.receive(join_frame(LEGACY, "1", "rooms:123", auth(token(listen=["rooms:*"]))), NOW)
    data = json.loads(actions[0].text)
    assert data == {"topic": "rooms:123", "event": "phx_reply",
                    "payload": {"status": "ok", "response": {}, "ref": "1"}, "ref": "1"}
    assert isinstance(actions[1], Subscribe)


REFUSALS = [
    ("private:user:42", {}, errors.AUTHENTICATION_REQUIRED),
    ("private:user:42", {"csrf_token": CSRF}, errors.AUTHENTICATION_REQUIRED),
    ("private:user:42", {"guardian_token": "not.a.token"}, errors.INVALID_TOKEN),
    ("private:user:42", {"guardian_token": 42}, errors.INVALID_TOKEN),
    ("private:user:42", {"guardian_token": ""}, errors.INVALID_TOKEN),
    ("private:user:42", auth(token(listen=["private:user:42"], secret="another-secret-0123456789abcdef0123")),
     errors.INVALID_TOKEN),
    ("private:user:42", auth(token(listen=["private:user:42"], exp=NOW - 1)), errors.TOKEN_EXPIRED),
    ("private:user:42", auth(token(listen=["private:user:42"]), csrf="wrong"), errors.CSRF_MISMATCH),
    ("private:user:42", auth(token(listen=["private:user:42"]), csrf=None), errors.CSRF_MISMATCH),
    ("private:user:42", auth(token(listen=["private:user:43"])), errors.FORBIDDEN),
    ("private:user:42", auth(token(publish=["private:user:42"])), errors.FORBIDDEN),   # publish is not listen
    ("private:user:42", auth(token(listen=["private:.*"])), errors.FORBIDDEN),
    ("public:", {}, errors.AUTHENTICATION_REQUIRED),
    ("room lobby", {}, errors.INVALID_TOPIC),
    ("room\tlobby", {}, errors.INVALID_TOPIC),
    ("room\x00", {}, errors.INVALID_TOPIC),
    ("x" * 256, {}, errors.INVALID_TOPIC),
    ("public:" + "x" * 300, {}, errors.INVALID_TOPIC),
]


@pytest.mark.parametrize("serializer", [V2, V1], ids=["v2", "v1"])
@pytest.mark.parametrize("topic,payload,reason", REFUSALS)
def test_join_refused(serializer, topic, payload, reason):
    s = make_session(serializer)
    actions = s.receive(join_frame(serializer, "7", topic, payload), NOW)
    assert_error(actions, "7", reason, join_ref="7" if serializer is V2 else None, topic=topic)
    assert s.channels == {}
    assert not s.closed


def test_topic_length_limit_is_configurable():
    s = make_session(V2, Limits(max_topic_length=10))
    assert_error(s.receive(join_frame(V2, "1", "public:abcd"), NOW), "1", errors.INVALID_TOPIC)
    assert_joined(s.receive(join_frame(V2, "2", "public:abc"), NOW), "2", "public:abc")


def test_public_topic_with_a_bad_token_joins_without_claims():
    s = make_session(V2)
    actions = s.receive(join_frame(V2, "1", "public:a", {"guardian_token": "garbage"}), NOW)
    assert_joined(actions, "1", "public:a")
    assert s.channels["public:a"].claims is None


def test_public_topic_with_a_valid_token_never_expires():
    s = make_session(V2, Limits(heartbeat_timeout=10 * HOUR))
    assert_joined(s.receive(join_frame(V2, "1", "public:a", auth(token(exp=NOW + 60))), NOW), "1", "public:a")
    assert s.channels["public:a"].claims is not None
    assert s.channels["public:a"].expires_at is None
    assert s.tick(NOW + 2 * HOUR) == []


def test_duplicate_join_closes_the_old_channel_first():
    s = joined_session("public:a", ref="1")
    actions = s.receive(join_frame(V2, "5", "public:a"), NOW + 1)
    assert len(actions) == 4, actions
    assert_close_frame(actions[0], "1", "public:a")
    assert json.loads(actions[0].text) == ["1", "1", "public:a", "phx_close", {}]
    assert isinstance(actions[1], Unsubscribe) and actions[1].topic == "public:a"
    assert_joined(actions[2:], "5", "public:a", join_ref="5")
    assert s.channels["public:a"].join_ref == "5"


def test_duplicate_join_v1_close_carries_old_ref():
    s = joined_session("public:a", serializer=V1, ref="1")
    actions = s.receive(join_frame(V1, "5", "public:a"), NOW)
    assert actions[0].text == '{"topic":"public:a","event":"phx_close","payload":{},"ref":"1"}'
    assert isinstance(actions[1], Unsubscribe)
    assert_joined(actions[2:], "5", "public:a")


def test_refused_duplicate_join_still_closes_the_old_channel():
    tok = token(listen=["private:a"])
    s = joined_session("private:a", auth(tok), ref="1")
    actions = s.receive(join_frame(V2, "5", "private:a", auth(tok, csrf="wrong")), NOW)
    assert len(actions) == 3
    assert_close_frame(actions[0], "1", "private:a")
    assert isinstance(actions[1], Unsubscribe)
    assert_error(actions[2], "5", errors.CSRF_MISMATCH, join_ref="5")
    assert s.channels == {}


def test_too_many_channels():
    s = make_session(V2, Limits(max_channels=2))
    assert_joined(s.receive(join_frame(V2, "1", "public:a"), NOW), "1", "public:a")
    assert_joined(s.receive(join_frame(V2, "2", "public:b"), NOW), "2", "public:b")
    assert_error(s.receive(join_frame(V2, "3", "public:c"), NOW), "3", errors.TOO_MANY_CHANNELS, join_ref="3")
    assert set(s.channels) == {"public:a", "public:b"}
    # rejoining an open channel at the limit is fine: the old one closes first
    actions = s.receive(join_frame(V2, "4", "public:a"), NOW)
    assert_joined(actions[2:], "4", "public:a")
    # leaving one makes room
    s.receive(frame(V2, "2", "5", "public:b", "phx_leave"), NOW)
    assert_joined(s.receive(join_frame(V2, "6", "public:c"), NOW), "6", "public:c")


# --- leave ---------------------------------------------------------------------------------------

def test_leave_replies_ok_then_closes_and_unsubscribes():
    s = joined_session("public:a", ref="3")
    actions = s.receive('["3","9","public:a","phx_leave",{}]', NOW)
    assert len(actions) == 3
    assert actions[0].text == '["3","9","public:a","phx_reply",{"status":"ok","response":{}}]'
    assert actions[1].text == '["3","3","public:a","phx_close",{}]'
    assert isinstance(actions[2], Unsubscribe) and actions[2].topic == "public:a"
    assert s.channels == {}


def test_leave_v1():
    s = joined_session("public:a", serializer=V1, ref="3")
    actions = s.receive(frame(V1, None, "9", "public:a", "phx_leave"), NOW)
    assert_reply(actions[0], "9", "ok", {}, join_ref=None, topic="public:a")
    assert_close_frame(actions[1], "3", "public:a")
    assert isinstance(actions[2], Unsubscribe)


def test_leave_of_an_unjoined_topic_is_ok_only():
    s = make_session(V2)
    actions = s.receive('["3","9","private:x","phx_leave",{}]', NOW)
    assert_reply(actions, "9", "ok", {}, join_ref="3", topic="private:x")


def test_push_after_leave_is_unmatched():
    s = joined_session("public:a", ref="3")
    s.receive('["3","9","public:a","phx_leave",{}]', NOW)
    assert_error(s.receive('["3","10","public:a","msg",{}]', NOW), "10", errors.UNMATCHED_TOPIC, join_ref=None)


# --- push ----------------------------------------------------------------------------------------

def test_push_to_unjoined_topic_is_unmatched_with_null_join_ref():
    s = make_session(V2)
    actions = s.receive('["3","7","room:lobby","msg",{"body":"hi"}]', NOW)
    assert actions[0].text == \
        '[null,"7","room:lobby","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]'
    assert len(actions) == 1


def test_push_allowed_on_public_topic():
    s = joined_session("public:a", ref="3")
    actions = s.receive('["3","7","public:a","msg",{"body":"hi"}]', NOW)
    push = only(actions)
    assert isinstance(push, Publish)
    assert (push.topic, push.event, push.payload, push.join_ref, push.ref) == \
        ("public:a", "msg", {"body": "hi"}, "3", "7")
    assert s.push_ok(push).text == '["3","7","public:a","phx_reply",{"status":"ok","response":{}}]'
    assert_error(s.push_error(push, errors.UNAVAILABLE), "7", errors.UNAVAILABLE, join_ref="3", topic="public:a")


def test_push_allowed_with_publish_claim():
    tok = token(listen=["private:a"], publish=["private:a"])
    s = joined_session("private:a", auth(tok), ref="1")
    push = only(s.receive(frame(V2, "1", "2", "private:a", "msg", {"x": 1}), NOW))
    assert isinstance(push, Publish) and push.join_ref == "1" and push.ref == "2"


def test_push_v1_publish_carries_the_join_ref_and_replies_v1():
    s = joined_session("public:a", serializer=V1, ref="3")
    push = only(s.receive(frame(V1, None, "7", "public:a", "msg", {"a": 1}), NOW))
    assert isinstance(push, Publish) and push.join_ref == "3" and push.ref == "7"
    assert s.push_ok(push).text == \
        '{"topic":"public:a","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"7"}'


def test_push_forbidden_without_publish_claim():
    tok = token(listen=["private:a"])
    s = joined_session("private:a", auth(tok), ref="1")
    actions = s.receive(frame(V2, "1", "2", "private:a", "msg"), NOW)
    assert_error(actions, "2", errors.FORBIDDEN, join_ref="1", topic="private:a")
    assert "private:a" in s.channels


@pytest.mark.parametrize("event", ["phx_reply", "phx_close", "phx_error", "phx_custom", "phx_",
                                   "chan_reply_7", "chan_reply_", "presence_state", "presence_diff"])
def test_reserved_events_from_the_client_are_invalid(event):
    """Names phoenix.js takes as the server's own: refused even when client_events allows any name."""
    s = joined_session("public:a", ref="1", limits=Limits(client_events=compile_event_patterns(["*"])))
    assert_error(s.receive(frame(V2, "1", "2", "public:a", event), NOW), "2", errors.INVALID_EVENT, join_ref="1")
    assert_error(s.receive(frame(V2, None, "3", "public:b", event), NOW), "3", errors.INVALID_EVENT)
    assert "public:a" in s.channels


@pytest.mark.parametrize("patterns,event,allowed", [
    (None, "msg", True), (None, "typing", False), (["chat_*"], "chat_typing", True), (["chat_*"], "msg", False),
    (["*"], "anything", True), (["msg", "typing"], "typing", True)])
def test_client_events_decide_which_names_clients_push(patterns, event, allowed):
    limits = Limits() if patterns is None else Limits(client_events=compile_event_patterns(patterns))
    s = joined_session("public:a", ref="1", limits=limits)
    actions = s.receive(frame(V2, "1", "2", "public:a", event), NOW)
    if allowed:
        assert isinstance(only(actions), Publish)
    else:
        assert_error(actions, "2", errors.EVENT_NOT_ALLOWED, join_ref="1", topic="public:a")


def test_push_on_expired_channel_closes_it():
    tok = token(listen=["private:a"], publish=["private:a"], exp=NOW + 30)
    s = joined_session("private:a", auth(tok), ref="1")
    assert isinstance(only(s.receive(frame(V2, "1", "2", "private:a", "msg"), NOW + 29)), Publish)
    actions = s.receive(frame(V2, "1", "3", "private:a", "msg"), NOW + 30)
    assert len(actions) == 3
    assert_close_frame(actions[0], "1", "private:a")
    assert isinstance(actions[1], Unsubscribe) and actions[1].topic == "private:a"
    assert_error(actions[2], "3", errors.TOKEN_EXPIRED, join_ref=None)
    assert s.channels == {}


# --- rate limiting --------------------------------------------------------------------------------

LIMITS = Limits(push_rate=10.0, push_burst=20, flood_strikes=50)


def push(s, ref, now):
    return s.receive(frame(V2, "1", str(ref), "public:a", "msg"), now)


def test_bucket_allows_a_burst_then_refuses():
    s = joined_session("public:a", limits=LIMITS)
    for i in range(20):
        assert isinstance(only(push(s, i, NOW)), Publish)
    assert_error(push(s, 20, NOW), "20", errors.RATE_LIMITED, join_ref="1")


def test_bucket_refills_at_the_push_rate():
    # offsets are binary fractions so that (NOW + dt) - NOW == dt exactly
    s = joined_session("public:a", limits=LIMITS)
    for i in range(20):
        push(s, i, NOW)
    assert_error(push(s, "a", NOW + 0.0625), "a", errors.RATE_LIMITED)   # 0.625 of a token
    assert isinstance(only(push(s, "b", NOW + 0.125)), Publish)         # 1.25 tokens
    assert_error(push(s, "c", NOW + 0.125), "c", errors.RATE_LIMITED)    # 0.25 left
    assert all(isinstance(only(push(s, "d%d" % i, NOW + 0.5)), Publish) for i in range(4))   # 0.25 + 3.75
    assert_error(push(s, "e", NOW + 0.5), "e", errors.RATE_LIMITED)


def test_bucket_never_holds_more_than_the_burst():
    s = joined_session("public:a", limits=LIMITS)
    later = NOW + 1000
    results = [only(push(s, i, later)) for i in range(21)]
    assert all(isinstance(r, Publish) for r in results[:20])
    assert_error(results[20], "20", errors.RATE_LIMITED)


def test_flood_closes_with_policy_violation():
    s = joined_session("public:a", limits=LIMITS)
    for i in range(20):
        push(s, i, NOW)
    for i in range(49):
        assert_error(push(s, "x%d" % i, NOW), "x%d" % i, errors.RATE_LIMITED)
    assert_close(push(s, "last", NOW), errors.CLOSE_POLICY)
    assert errors.CLOSE_POLICY == 1008
    assert s.closed
    assert push(s, "after", NOW + 100) == []


def test_a_successful_push_resets_the_strikes():
    s = joined_session("public:a", limits=LIMITS)
    for i in range(20):
        push(s, i, NOW)
    for i in range(49):
        push(s, "x%d" % i, NOW)
    assert isinstance(only(push(s, "ok", NOW + 0.125)), Publish)
    for i in range(49):
        assert_error(push(s, "y%d" % i, NOW + 0.125), "y%d" % i, errors.RATE_LIMITED)
    assert not s.closed


def test_refused_pushes_do_not_spend_tokens():
    s = joined_session("public:a", limits=LIMITS)
    for i in range(30):
        s.receive(frame(V2, None, str(i), "private:nope", "ev"), NOW)     # unmatched
    assert isinstance(only(push(s, "p", NOW)), Publish)


# --- bad frames --------------------------------------------------------------------------------

@pytest.mark.parametrize("serializer", [V2, V1, LEGACY], ids=["v2", "v1", "legacy"])
@pytest.mark.parametrize("text", ["not json", "", "[1,", "{\"topic\":", "\x00"])
def test_invalid_json_closes_1007(serializer, text):
    s = make_session(serializer)
    assert_close(s.receive(text, NOW), errors.CLOSE_INVALID_DATA)
    assert errors.CLOSE_INVALID_DATA == 1007
    assert s.closed
    assert s.receive(heartbeat_frame(serializer, "1"), NOW) == []
    assert s.tick(NOW + 1000) == []


@pytest.mark.parametrize("text,join_ref,ref,topic", [
    ('["1","2","room:a","ev"]', "1", "2", "room:a"),
    ('["1","2","room:a","ev",null]', "1", "2", "room:a"),
    ('["1","2","room:a",null,{}]', "1", "2", "room:a"),
    ('[null,"2","room:a","ev",[]]', None, "2", "room:a"),
])
def test_malformed_but_answerable_gets_an_error_reply(text, join_ref, ref, topic):
    s = make_session(V2)
    assert_error(s.receive(text, NOW), ref, errors.MALFORMED_MESSAGE, join_ref=join_ref, topic=topic)
    assert not s.closed


def test_malformed_but_answerable_v1():
    s = make_session(V1)
    assert_error(s.receive('{"topic":"room:a","ref":"2","payload":{}}', NOW), "2", errors.MALFORMED_MESSAGE,
                 join_ref=None, topic="room:a")


@pytest.mark.parametrize("text", ['{}', '[]', '["1"]', '[null,null,null,"ev",{}]', '[null,1.5,"t:a","ev",{}]',
                                  '"string"', "42"])
def test_malformed_unanswerable_closes_1007(text):
    s = make_session(V2)
    assert_close(s.receive(text, NOW), errors.CLOSE_INVALID_DATA)


def binary_push(join_ref=b"1", ref=b"2", topic=b"public:a", event=b"upload", payload=b"\x00\xffdata"):
    return bytes([0, len(join_ref), len(ref), len(topic), len(event)]) + join_ref + ref + topic + event + payload


def test_binary_push_gets_an_error_reply_on_v2():
    s = joined_session("public:a")
    assert_error(s.receive(binary_push(), NOW), "2", errors.UNSUPPORTED_BINARY, join_ref="1", topic="public:a")
    assert_error(s.receive(bytearray(binary_push(ref=b"3")), NOW), "3", errors.UNSUPPORTED_BINARY)
    assert not s.closed


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x02\x01\x01a", binary_push(ref=b""), binary_push()[:7]])
def test_unanswerable_binary_closes_1003(data):
    s = make_session(V2)
    assert_close(s.receive(data, NOW), errors.CLOSE_UNSUPPORTED)
    assert errors.CLOSE_UNSUPPORTED == 1003


@pytest.mark.parametrize("serializer", [V1, LEGACY], ids=["v1", "legacy"])
def test_binary_on_v1_closes_1003(serializer):
    s = make_session(serializer)
    assert_close(s.receive(binary_push(), NOW), errors.CLOSE_UNSUPPORTED)


# --- tick ----------------------------------------------------------------------------------------

def test_idle_socket_closes_going_away_never_1000():
    s = make_session(V2, Limits(heartbeat_timeout=60))
    assert s.tick(NOW + 60) == []
    assert_close(s.tick(NOW + 60.5), errors.CLOSE_GOING_AWAY)
    assert errors.CLOSE_GOING_AWAY == 1001
    assert s.closed
    assert s.tick(NOW + 120) == []


def test_any_frame_keeps_the_socket_alive():
    s = make_session(V2, Limits(heartbeat_timeout=60))
    s.receive(heartbeat_frame(V2, "1"), NOW + 50)
    assert s.tick(NOW + 100) == []
    s.receive(frame(V2, None, "2", "public:nope", "ev"), NOW + 105)      # even an unmatched push counts
    assert s.tick(NOW + 165) == []
    assert_close(s.tick(NOW + 165.5), errors.CLOSE_GOING_AWAY)


def test_tick_ends_expired_channels_but_keeps_public_ones():
    s = make_session(V2, Limits(heartbeat_timeout=10 * HOUR))
    tok = token(listen=["private:a", "private:b"], exp=NOW + 100)
    assert_joined(s.receive(join_frame(V2, "1", "private:a", auth(tok)), NOW), "1", "private:a")
    assert_joined(s.receive(join_frame(V2, "2", "public:x"), NOW), "2", "public:x")
    later = token(listen=["private:b"], exp=NOW + 500)
    assert_joined(s.receive(join_frame(V2, "3", "private:b", auth(later)), NOW), "3", "private:b")
    assert s.next_expiry() == NOW + 100
    assert s.tick(NOW + 99) == []
    actions = s.tick(NOW + 100)
    assert len(actions) == 2
    assert_close_frame(actions[0], "1", "private:a")
    assert json.loads(actions[0].text) == ["1", "1", "private:a", "phx_close", {}]
    assert isinstance(actions[1], Unsubscribe) and actions[1].topic == "private:a"
    assert set(s.channels) == {"public:x", "private:b"}
    assert s.next_expiry() == NOW + 500
    assert s.tick(NOW + 101) == []
    assert [type(a) for a in s.tick(NOW + 600)] == [Send, Unsubscribe]
    assert set(s.channels) == {"public:x"}
    assert s.next_expiry() is None
    assert not s.closed


def test_idle_close_wins_over_expiry():
    tok = token(listen=["private:a"], exp=NOW + 100)
    s = joined_session("private:a", auth(tok), limits=Limits(heartbeat_timeout=60))
    assert_close(s.tick(NOW + 200), errors.CLOSE_GOING_AWAY)


# --- V1 vs V2 sessions ------------------------------------------------------------------------

def test_v2_frame_on_v1_session_is_not_understood():
    s = make_session(V1)
    assert_close(s.receive('[null,"1","phoenix","heartbeat",{}]', NOW), errors.CLOSE_INVALID_DATA)


def test_v1_frame_on_v2_session_is_not_understood():
    s = make_session(V2)
    assert_close(s.receive('{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}', NOW),
                 errors.CLOSE_INVALID_DATA)


def test_v1_session_accepts_optional_join_ref_but_never_writes_it():
    s = make_session(V1)
    actions = s.receive('{"topic":"public:a","event":"phx_join","payload":{},"ref":"4","join_ref":"4"}', NOW)
    assert "join_ref" not in json.loads(actions[0].text)
    assert s.channels["public:a"].join_ref == "4"


# --- regressions: every frame sent is valid UTF-8, even echoing a client's lone surrogates ---

@pytest.mark.parametrize("text", [
    '[null,"\\ud800","phoenix","heartbeat",{}]',            # echoed ref
    '["1","1","public:\\ud800","phx_join",{}]',             # echoed topic (invalid_topic reply)
    '[null,"1","room:\\udc00","ev",{}]',                    # echoed topic (unmatched topic)
])
def test_every_sent_frame_is_utf8_encodable(text):
    s = make_session(V2)
    for action in s.receive(text, NOW):
        if isinstance(action, Send):
            action.text.encode("utf-8")


# --- Hypothesis ---------------------------------------------------------------------------------

ACTION_TYPES = (Send, Subscribe, Unsubscribe, Publish, Close)


def check_actions(actions):
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, ACTION_TYPES), action
        if isinstance(action, Send):
            json.loads(action.text)
        if isinstance(action, Close):
            assert action.code in (1001, 1003, 1007, 1008) and action.code != 1000


@SETTINGS
@given(st.sampled_from([V1, V2, LEGACY]), st.lists(st.one_of(st.text(max_size=80), st.binary(max_size=80)),
                                                   max_size=6))
def test_arbitrary_frames_never_raise(serializer, frames):
    s = make_session(serializer)
    for i, f in enumerate(frames):
        check_actions(s.receive(f, NOW + i))
    check_actions(s.tick(NOW + 1000))


VALID = token(listen=["private:ok", "team:*"], publish=["team:*"], exp=NOW + 1000)
NARROW = token(listen=["private:no"], exp=NOW + HOUR)        # valid, but grants one other topic
TOKENS = [VALID, NARROW, token(listen=["private:ok", "team:*"], exp=NOW - 1),
          token(listen=["private:ok", "team:*"], secret="wrong-secret-0123456789abcdef0123"),
          "x.y.z", "", 42, None]
TOPICS = ["public:a", "public:", "private:ok", "private:ok", "private:no", "private:ok:x", "team:1", "team:1", "team:",
          "team", "phoenix", "bad topic", "*", "team:*"]
EVENTS = ["phx_join", "phx_join", "phx_join", "phx_leave", "heartbeat", "msg", "msg", "phx_reply"]
CREDENTIALS = [(VALID, CSRF)] * 4 + [(VALID, "wrong"), (VALID, None), (VALID, "absent")] + \
    [(t, CSRF) for t in TOKENS[1:]] + [("absent", "absent"), ("absent", CSRF)]


def authorized(topic, payload, now):
    """The oracle, written from the token table above rather than from pusherd's own matching."""
    if payload.get("csrf_token") != CSRF:
        return False
    if payload.get("guardian_token") == VALID and now < NOW + 1000:
        return topic == "private:ok" or (topic.startswith("team:") and len(topic) > 5)
    if payload.get("guardian_token") == NARROW and now < NOW + HOUR:
        return topic == "private:no"
    return False


message = st.fixed_dictionaries({
    "join_ref": st.sampled_from([None, "1", "2", 3]),
    "ref": st.sampled_from([None, "1", "2", "3", 4]),
    "topic": st.sampled_from(TOPICS),
    "event": st.sampled_from(EVENTS),
    "credentials": st.sampled_from(CREDENTIALS),
    "topic_or_empty": st.sampled_from([None] * 20 + [""]),     # "" is unanswerable: it closes the socket
    "extra": st.dictionaries(st.sampled_from(["a", "body", "guardian"]), st.integers() | st.text(max_size=3),
                             max_size=2),
    "dt": st.floats(min_value=0, max_value=250, allow_nan=False),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([V1, V2, LEGACY]), st.lists(message, max_size=10))
def test_no_private_subscription_without_a_valid_token(serializer, messages):
    s = make_session(serializer, Limits(heartbeat_timeout=10 ** 6, max_channels=5, push_burst=3))
    now = NOW
    subscribed = set()
    for m in messages:
        now += m["dt"]
        payload = dict(m["extra"])
        tok, csrf = m["credentials"]
        if tok != "absent":
            payload["guardian_token"] = tok
        if csrf != "absent":
            payload["csrf_token"] = csrf
        topic = m["topic"] if m["topic_or_empty"] is None else m["topic_or_empty"]
        actions = s.receive(frame(serializer, m["join_ref"], m["ref"], topic, m["event"], payload), now)
        check_actions(actions)
        for action in actions:
            if isinstance(action, Subscribe):
                assert m["event"] == "phx_join" and action.topic == topic
                assert is_public(action.topic) or authorized(action.topic, payload, now), (action.topic, payload)
                subscribed.add(action.topic)
            elif isinstance(action, Unsubscribe):
                assert action.topic in subscribed
                subscribed.discard(action.topic)
            elif isinstance(action, Publish):
                assert action.topic in s.channels
                assert is_public(action.topic) or action.topic.startswith("team:")
        if not s.closed:
            assert subscribed == set(s.channels)
        tick = s.tick(now)
        check_actions(tick)
        for action in tick:
            if isinstance(action, Unsubscribe):
                subscribed.discard(action.topic)



# --- the join flow: Join, then joined() ------------------------------------------------------------

def raw_session(serializer=V2):
    return Session(serializer, Policy(Verifier([SECRET])), NOW, peer="test")


def test_join_flow_a_plain_join_is_answered_once_the_broker_is_ready():
    s = raw_session()
    join = only(s.receive('["3","3","public:lobby","phx_join",{"user":"x"}]', NOW))
    assert isinstance(join, Join) and (join.topic, join.join_ref, join.ref, join.since) == ("public:lobby", "3", "3", None)
    assert not join.recover and "public:lobby" in s.channels      # joined; the reply waits for the broker
    held = [Broadcast("public:lobby", "e", {"n": 1}), Broadcast("public:lobby", "e", {"n": 2})]
    actions = s.joined(join, None, held)
    assert actions[0].text == '["3","3","public:lobby","phx_reply",{"status":"ok","response":{}}]'
    assert [json.loads(a.text)[4] for a in actions[1:3]] == [{"n": 1}, {"n": 2}]   # held ones, in order
    assert isinstance(actions[3], Subscribe) and actions[3].params == {"user": "x"} and len(actions) == 4


def test_join_flow_since_replays_what_was_missed_then_what_was_held_without_duplicates():
    s = raw_session()
    join = only(s.receive('["1","1","public:web","phx_join",{"since":"e1:2"}]', NOW))
    assert join.recover and join.since == "e1:2"
    recovery = Recovery(True, "e1:4", (Entry(3, NOW, "v", {"n": 3}), Entry(4, NOW, "v", {"n": 4})), "e1")
    held = [Broadcast("public:web", "v", {"n": 4}, position="e1:4"), Broadcast("public:web", "v", {"n": 5}, position="e1:5")]
    actions = s.joined(join, recovery, held)
    assert_reply(actions[0], "1", "ok", {"recovered": True, "position": "e1:4"}, join_ref="1", topic="public:web")
    frames = [json.loads(a.text) for a in actions[1:-1]]
    assert [(f[1], f[4]) for f in frames] == [("e1:3", {"n": 3}), ("e1:4", {"n": 4}), ("e1:5", {"n": 5})]
    assert isinstance(actions[-1], Subscribe)


def test_join_flow_since_without_an_answer_is_not_recovered_and_replays_nothing():
    s = raw_session()
    join = only(s.receive('["1","1","public:web","phx_join",{"since":"e1:2"}]', NOW))
    actions = s.joined(join, None, [])
    assert_reply(actions[0], "1", "ok", {"recovered": False, "position": None}, join_ref="1", topic="public:web")
    assert isinstance(actions[1], Subscribe) and len(actions) == 2


@pytest.mark.parametrize("meanwhile", ["leave", "rejoin", "close"])
def test_join_flow_a_channel_left_rejoined_or_closed_meanwhile_gets_nothing(meanwhile):
    s = raw_session()
    join = only(s.receive('["1","1","public:a","phx_join",{}]', NOW))
    if meanwhile == "leave":
        s.receive('["1","2","public:a","phx_leave",{}]', NOW)
    elif meanwhile == "rejoin":
        s.receive('["5","5","public:a","phx_join",{}]', NOW)
    else:
        s.closed = True
    assert s.joined(join, None, [Broadcast("public:a", "e", {})]) == []


def test_sessions_tally_joins_by_outcome():
    import collections
    joins = collections.Counter()
    session = Session(V2, Policy(Verifier(["s"]), joins=joins), now=0.0)
    session.receive(json.dumps(["1", "1", "public:a", "phx_join", {}]), 0.0)
    session.receive(json.dumps(["2", "2", "private:a", "phx_join", {}]), 0.0)
    session.receive(json.dumps(["3", "3", "private:b", "phx_join", {"guardian_token": "nope"}]), 0.0)
    assert joins == {"ok": 1, "authentication_required": 1, "invalid_token": 1}


def test_joins_without_a_token_use_the_socket_claims_until_they_expire():
    claims = Verifier([SECRET]).verify(token(listen=["private:a"], exp=NOW + 60), CSRF, now=NOW)
    s = ReadySession(V2, Policy(Verifier([SECRET])), NOW, socket_claims=claims)
    assert_joined(s.receive(join_frame(V2, "1", "private:a"), NOW), "1", "private:a")
    assert_error(s.receive(join_frame(V2, "2", "private:b"), NOW), "2", errors.FORBIDDEN)
    # a token of the join's own is verified for that channel and wins
    assert_joined(s.receive(join_frame(V2, "3", "private:b", auth(token(listen=["private:b"]))), NOW), "3", "private:b")
    assert_error(s.receive(join_frame(V2, "4", "private:c", auth("x.y.z")), NOW), "4", errors.INVALID_TOKEN)
    # the socket's claims expire like a channel's (the rejoin closes the old channel first)
    actions = s.receive(join_frame(V2, "5", "private:a"), NOW + 61)
    assert isinstance(actions[1], Unsubscribe)
    assert_error(actions[2], "5", errors.TOKEN_EXPIRED)
    assert_joined(s.receive(join_frame(V2, "6", "public:x"), NOW + 61), "6", "public:x")

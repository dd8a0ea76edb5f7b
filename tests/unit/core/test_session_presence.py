"""pusherd.core.session on presence topics: what a join sends after its reply, which actions track
and untrack, in which order — every decision of the presence flow, without a socket."""

import json

import pytest

from pusherd.client import mint_token
from pusherd.core.broadcast import Broadcast
from pusherd.core.presence import ANONYMOUS, BAD_KEY, Member, NotTracked, PresenceRule, PresenceRules
from pusherd.core.protocol import LEGACY, V1, V2, Message
from pusherd.core.session import (Join, Limits, Policy, Send, Session, Subscribe, Track, Unsubscribe, Untrack)
from pusherd.core.tokens import Verifier

SECRET = "session-test-guardian-secret-0123456789"
CSRF = "csrf"
NOW = 1_700_000_000.0
RULES = PresenceRules([PresenceRule("private:*", "id", ["name"]), PresenceRule("public:room:*", "id")])


def session(serializer=V2):
    return Session(serializer, Policy(Verifier([SECRET]), Limits(), presence=RULES), NOW, peer="test")


def auth(sub, listen=("private:*",), ttl=3600):
    tok = mint_token(SECRET, sub=sub, listen=list(listen), ttl=ttl, csrf_token=CSRF, now=NOW)
    return {"guardian_token": tok, "csrf_token": CSRF}


def join(s, topic, payload, ref="1"):
    actions = s.receive(json.dumps([ref, ref, topic, "phx_join", payload]), NOW)
    assert isinstance(actions[-1], Join), actions
    return actions[-1]


def frames(actions):
    return [json.loads(a.text) for a in actions if isinstance(a, Send)]


def test_a_join_on_a_presence_topic_gets_its_reply_then_the_list_then_is_tracked():
    s = session()
    j = join(s, "private:ops", auth({"id": 7, "name": "Ann", "email": "ann@example.com"}))
    assert j.presence == Member("7", {"name": "Ann"})   # email is not listed
    held = [Broadcast("private:ops", "presence_diff", {"joins": {}, "leaves": {}}),
            Broadcast("private:ops", "note", {"n": 1})]
    actions = s.joined(j, held=held, presence_state='{"8":{"metas":[{"phx_ref":"r8"}]}}')
    kinds = [type(a) for a in actions]
    assert kinds == [Send, Send, Send, Subscribe, Track]
    reply, state, note = frames(actions)
    assert reply[3] == "phx_reply" and reply[4]["status"] == "ok"
    # V2: the channel's join_ref, ref null (phoenix-protocol.md §4): 1.4+ applies no diff before it
    assert state == ["1", None, "private:ops", "presence_state", {"8": {"metas": [{"phx_ref": "r8"}]}}]
    assert note[3] == "note"     # held broadcasts follow; held presence diffs are in the list already
    track = actions[-1]
    assert (track.topic, track.join_ref, track.member) == ("private:ops", "1", Member("7", {"name": "Ann"}))


@pytest.mark.parametrize("serializer", [V1, LEGACY, V2])
def test_presence_state_is_the_same_frame_as_encoding_it_whole(serializer):
    payload = {"7": {"metas": [{"phx_ref": "r", "online_at": "1", "name": "Ünï \u2028 \"q\""}]}}
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    for join_ref in ("3", 12, None):
        assert serializer.encode_push_text(join_ref, "private:é", "presence_state", text) == \
            serializer.encode(Message(join_ref, None, "private:é", "presence_state", payload))


def test_joiners_not_listed_still_get_the_list_and_are_never_tracked():
    s = session()
    anonymous = join(s, "public:room:1", {})
    assert anonymous.presence == NotTracked(ANONYMOUS)
    bad = join(s, "private:ops", auth({"id": "__proto__"}), ref="2")
    assert bad.presence == NotTracked(BAD_KEY, "id")
    for j in (anonymous, bad):
        actions = s.joined(j, presence_state="{}")
        assert [type(a) for a in actions] == [Send, Send, Subscribe]
        assert frames(actions)[1][3] == "presence_state"
    # and their end untracks nothing
    assert not any(isinstance(a, Untrack) for a in s.end())


def test_off_presence_topics_nothing_changes():
    s = session()
    j = join(s, "deploys:web", auth({"id": 1}, listen=["deploys:*"]), ref="2")
    assert j.presence is None
    assert [type(a) for a in s.joined(j, presence_state="ignored")] == [Send, Subscribe]


def _tracked(s, topic="private:ops", ref="1"):
    j = join(s, topic, auth({"id": 1, "name": "A"}), ref=ref)
    s.joined(j, presence_state="{}")
    return j


def test_leave_untracks_after_the_close():
    s = session()
    _tracked(s)
    actions = s.receive(json.dumps(["1", "9", "private:ops", "phx_leave", {}]), NOW)
    assert [type(a) for a in actions] == [Send, Send, Unsubscribe, Untrack]
    assert (actions[-1].topic, actions[-1].join_ref) == ("private:ops", "1")
    # a second leave untracks nothing
    assert not any(isinstance(a, Untrack) for a in s.receive(json.dumps(["1", "10", "private:ops", "phx_leave", {}]),
                                                              NOW))


def test_a_rejoin_untracks_the_old_channel_and_tracks_the_new_one_once_answered():
    s = session()
    _tracked(s)
    actions = s.receive(json.dumps(["5", "5", "private:ops", "phx_join", auth({"id": 1, "name": "A"})]), NOW)
    untracks = [a for a in actions if isinstance(a, Untrack)]
    assert [(u.topic, u.join_ref) for u in untracks] == [("private:ops", "1")]
    new = actions[-1]
    assert isinstance(new, Join) and new.join_ref == "5"
    assert isinstance(s.joined(new, presence_state="{}")[-1], Track)


def test_a_join_answered_after_its_channel_is_gone_tracks_nothing():
    s = session()
    j = join(s, "private:ops", auth({"id": 1}))
    s.receive(json.dumps(["1", "2", "private:ops", "phx_leave", {}]), NOW)
    assert s.joined(j, presence_state="{}") == []


def test_token_expiry_untracks():
    s = session()
    j = join(s, "private:ops", auth({"id": 1}, ttl=60))
    s.joined(j, presence_state="{}")
    s.receive(json.dumps([None, "h", "phoenix", "heartbeat", {}]), NOW + 55)
    actions = s.tick(NOW + 61)
    assert [type(a) for a in actions] == [Send, Unsubscribe, Untrack]


def test_the_end_of_a_connection_untracks_every_tracked_channel():
    s = session()
    _tracked(s, "private:a", "1")
    _tracked(s, "private:b", "2")
    plain = join(s, "public:other", {}, ref="3")
    s.joined(plain)
    actions = s.end()
    assert sorted((type(a).__name__, a.topic) for a in actions) == [
        ("Unsubscribe", "private:a"), ("Unsubscribe", "private:b"), ("Unsubscribe", "public:other"),
        ("Untrack", "private:a"), ("Untrack", "private:b")]
    assert s.closed and s.channels == {}
    assert s.end() == []


def test_clients_cannot_push_presence_events():
    s = session()
    _tracked(s)
    for event in ("presence_diff", "presence_state"):
        actions = s.receive(json.dumps(["1", "3", "private:ops", event, {"joins": {}, "leaves": {}}]), NOW)
        assert [f[4] for f in frames(actions)] == [{"status": "error", "response": {"reason": "invalid_event"}}]

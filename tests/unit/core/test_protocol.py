"""pusherd.core.protocol: golden frames for V1, V2 and the 2015 (legacy) serializers, decoding of every
wrong shape, vsn negotiation, the binary push header, and Hypothesis round trips.

Golden strings are copied from reference/phoenix-protocol.md §2-§4 (compact JSON, key order as
Phoenix writes it).
"""

import json

import pytest
from hypothesis import given, settings, strategies as st

from pusherd.core.errors import MALFORMED_MESSAGE, UNSUPPORTED_BINARY, ProtocolError
from pusherd.core.protocol import (LEGACY, V1, V2, LegacyV1Serializer, MalformedFrame, Message, UndecodableFrame,
                              V1Serializer, V2Serializer, serializer_for_vsn)

SETTINGS = settings(max_examples=100, deadline=None)
LIGHT = settings(max_examples=50, deadline=None)  # the JSON-generating ones


# --- golden frames: V2 -------------------------------------------------------------------------

def test_v2_decodes_join_with_join_ref_equal_to_ref():
    msg = V2.decode('["3","3","room:lobby","phx_join",{"user":"x"}]')
    assert msg == Message("3", "3", "room:lobby", "phx_join", {"user": "x"})


def test_v2_decodes_heartbeat_with_null_join_ref():
    assert V2.decode('[null,"5","phoenix","heartbeat",{}]') == Message(None, "5", "phoenix", "heartbeat", {})


def test_v2_heartbeat_reply_golden():
    assert V2.encode_reply(None, "5", "phoenix", "ok", {}) == \
        '[null,"5","phoenix","phx_reply",{"status":"ok","response":{}}]'


def test_v2_join_ok_reply_golden():
    assert V2.encode_reply("3", "3", "room:lobby", "ok", {}) == \
        '["3","3","room:lobby","phx_reply",{"status":"ok","response":{}}]'


def test_v2_join_error_reply_golden():
    assert V2.encode_reply("3", "3", "room:lobby", "error", {"reason": "unauthorized"}) == \
        '["3","3","room:lobby","phx_reply",{"status":"error","response":{"reason":"unauthorized"}}]'


def test_v2_push_reply_golden():
    assert V2.encode_reply("3", "7", "room:lobby", "ok", {"id": 42}) == \
        '["3","7","room:lobby","phx_reply",{"status":"ok","response":{"id":42}}]'


def test_v2_unmatched_topic_reply_has_null_join_ref():
    assert V2.encode_reply(None, "7", "room:x", "error", {"reason": "unmatched topic"}) == \
        '[null,"7","room:x","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]'


def test_v2_close_golden():
    assert V2.encode(Message("3", "3", "room:lobby", "phx_close", {})) == '["3","3","room:lobby","phx_close",{}]'


def test_v2_broadcast_has_null_refs():
    assert V2.encode_broadcast("room:lobby", "new_msg", {"body": "hi"}) == \
        '[null,null,"room:lobby","new_msg",{"body":"hi"}]'


def test_v2_decode_ignores_extra_trailing_elements():
    assert V2.decode('["1","2","t:a","ev",{},"extra",null]') == Message("1", "2", "t:a", "ev", {})


def test_v2_non_ascii_is_written_as_utf8_text_not_escaped():
    assert V2.encode_broadcast("room:é", "ev", {"s": "日本"}) == '[null,null,"room:é","ev",{"s":"日本"}]'


# --- golden frames: V1 -------------------------------------------------------------------------

def test_v1_decodes_join():
    msg = V1.decode('{"topic":"room:lobby","event":"phx_join","payload":{"user":"x"},"ref":"1"}')
    assert msg == Message(None, "1", "room:lobby", "phx_join", {"user": "x"})


def test_v1_decodes_optional_join_ref():
    msg = V1.decode('{"topic":"t:a","event":"ev","payload":{},"ref":"4","join_ref":"1"}')
    assert msg == Message("1", "4", "t:a", "ev", {})


def test_v1_heartbeat_reply_golden():
    assert V1.encode_reply(None, "5", "phoenix", "ok", {}) == \
        '{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"5"}'


def test_v1_never_emits_join_ref():
    text = V1.encode_reply("1", "1", "room:lobby", "ok", {})
    assert text == '{"topic":"room:lobby","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"1"}'
    assert "join_ref" not in json.loads(text)
    assert "join_ref" not in json.loads(V1.encode(Message("9", "9", "t:a", "phx_close", {})))


def test_v1_close_carries_join_ref_in_ref():
    assert V1.encode(Message("3", "3", "room:lobby", "phx_close", {})) == \
        '{"topic":"room:lobby","event":"phx_close","payload":{},"ref":"3"}'


def test_v1_broadcast_has_null_ref():
    assert V1.encode_broadcast("room:lobby", "new_msg", {"body": "hi"}) == \
        '{"topic":"room:lobby","event":"new_msg","payload":{"body":"hi"},"ref":null}'


# --- golden frames: the 2015 client (ref inside the payload too) ------------------------------

def test_legacy_reply_carries_ref_inside_payload_and_at_top_level():
    text = LEGACY.encode_reply(None, "1", "pings", "error", {"error": "invalid_csrf"})
    assert json.loads(text) == {"topic": "pings", "event": "phx_reply",
                                "payload": {"ref": "1", "status": "error", "response": {"error": "invalid_csrf"}},
                                "ref": "1"}


def test_legacy_heartbeat_reply():
    assert json.loads(LEGACY.encode_reply(None, "5", "phoenix", "ok", {})) == {
        "topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}, "ref": "5"}, "ref": "5"}


def test_legacy_broadcast_and_close_are_plain_v1():
    assert LEGACY.encode_broadcast("rooms:123", "new_msg", {"a": 1}) == V1.encode_broadcast("rooms:123", "new_msg",
                                                                                           {"a": 1})
    close = Message("1", "1", "rooms:123", "phx_close", {})
    assert LEGACY.encode(close) == V1.encode(close)


def test_legacy_decodes_like_v1():
    text = '{"topic":"rooms:123","event":"phx_join","payload":{"guardian_token":"t"},"ref":"1"}'
    assert LEGACY.decode(text) == V1.decode(text)


# --- refs are echoed untouched ---------------------------------------------------------------

@pytest.mark.parametrize("ref", ["1", "007", "", "ref-with-text", 0, 7, 2 ** 40, -1])
def test_v2_refs_round_trip_untouched(ref):
    msg = V2.decode(json.dumps([ref, ref, "t:a", "ev", {}]))
    assert msg.ref == ref and type(msg.ref) is type(ref)
    assert msg.join_ref == ref and type(msg.join_ref) is type(ref)
    assert json.loads(V2.encode_reply(msg.join_ref, msg.ref, msg.topic, "ok", {}))[:2] == [ref, ref]


@pytest.mark.parametrize("ref", ["1", "007", 7])
def test_v1_refs_round_trip_untouched(ref):
    msg = V1.decode(json.dumps({"topic": "t:a", "event": "ev", "payload": {}, "ref": ref}))
    out = json.loads(V1.encode_reply(None, msg.ref, msg.topic, "ok", {}))
    assert out["ref"] == ref and type(out["ref"]) is type(ref)


# --- decode: every wrong shape ---------------------------------------------------------------

@pytest.mark.parametrize("serializer", [V1, V2, LEGACY], ids=["v1", "v2", "legacy"])
@pytest.mark.parametrize("text", ["", "not json", "{", "[1,2", "{'a':1}", "[null,\"1\",\"t\",\"e\",{}]]", "\x00",
                                  b"\xff\xfe\xfa", b"[\"\xc3\"]"])
def test_undecodable_frames(serializer, text):
    with pytest.raises(UndecodableFrame):
        serializer.decode(text)


@pytest.mark.parametrize("serializer", [V1, V2], ids=["v1", "v2"])
def test_deeply_nested_frame_is_undecodable_not_recursion_error(serializer):
    with pytest.raises(UndecodableFrame):
        serializer.decode("[" * 20000 + "]" * 20000)


V1_UNANSWERABLE = [
    "[]", "null", "1", '"text"', "true",
    '{"event":"ev","payload":{},"ref":"1"}',                 # no topic
    '{"topic":"","event":"ev","payload":{},"ref":"1"}',      # empty topic
    '{"topic":5,"event":"ev","payload":{},"ref":"1"}',       # topic not a string
    '{"topic":"t:a","event":"ev","payload":{},"ref":1.5}',   # ref not a string/int
    '{"topic":"t:a","event":"ev","payload":{},"ref":true}',  # bool is no ref
    '{"topic":"t:a","event":"ev","payload":{},"ref":["1"]}',
]


@pytest.mark.parametrize("text", V1_UNANSWERABLE)
def test_v1_malformed_unanswerable(text):
    with pytest.raises(MalformedFrame) as info:
        V1.decode(text)
    assert not info.value.answerable
    assert info.value.reason == MALFORMED_MESSAGE


V1_ANSWERABLE = [
    '{"topic":"t:a","payload":{},"ref":"1"}',                   # no event
    '{"topic":"t:a","event":"","payload":{},"ref":"1"}',        # empty event
    '{"topic":"t:a","event":7,"payload":{},"ref":"1"}',         # event not a string
    '{"topic":"t:a","event":"ev","ref":"1"}',                   # no payload
    '{"topic":"t:a","event":"ev","payload":null,"ref":"1"}',
    '{"topic":"t:a","event":"ev","payload":[],"ref":"1"}',
    '{"topic":"t:a","event":"ev","payload":"x","ref":"1"}',
    '{"topic":"t:a","event":"ev","payload":{},"ref":"1","join_ref":1.5}',   # bad join_ref, good ref
]


@pytest.mark.parametrize("text", V1_ANSWERABLE)
def test_v1_malformed_but_answerable(text):
    with pytest.raises(MalformedFrame) as info:
        V1.decode(text)
    err = info.value
    assert err.answerable and err.ref == "1" and err.topic == "t:a"
    assert err.reason == MALFORMED_MESSAGE


V2_UNANSWERABLE = [
    "{}", "null", "1", '"x"', "[]", '["1"]', '["1","2"]',
    '["1","2",null,"ev",{}]',             # null topic
    '["1","2","","ev",{}]',               # empty topic
    '["1","2",3,"ev",{}]',                # topic not a string
    '["1",2.5,"t:a","ev",{}]',            # float ref
    '["1",false,"t:a","ev",{}]',          # bool ref
    '["1",{},"t:a","ev",{}]',             # object ref
]


@pytest.mark.parametrize("text", V2_UNANSWERABLE)
def test_v2_malformed_unanswerable(text):
    with pytest.raises(MalformedFrame) as info:
        V2.decode(text)
    assert not info.value.answerable


V2_ANSWERABLE = [
    ('["1","2","t:a"]', "1"),
    ('["1","2","t:a","ev"]', "1"),
    ('["1","2","t:a",null,{}]', "1"),
    ('["1","2","t:a","",{}]', "1"),
    ('["1","2","t:a",7,{}]', "1"),
    ('["1","2","t:a","ev",null]', "1"),
    ('["1","2","t:a","ev",[]]', "1"),
    ('["1","2","t:a","ev","payload"]', "1"),
    ('[1.5,"2","t:a","ev",{}]', None),     # bad join_ref is dropped, the ref still answers
    ('[null,"2","t:a","ev",7]', None),
]


@pytest.mark.parametrize("text,join_ref", V2_ANSWERABLE)
def test_v2_malformed_but_answerable(text, join_ref):
    with pytest.raises(MalformedFrame) as info:
        V2.decode(text)
    err = info.value
    assert err.answerable
    assert (err.join_ref, err.ref, err.topic) == (join_ref, "2", "t:a")


@pytest.mark.parametrize("serializer,text", [
    (V1, '{"topic":"t:a","event":"ev","payload":{}}'),
    (V1, '{"topic":"t:a","event":"ev","payload":{},"ref":null}'),
    (V2, '[null,null,"t:a","ev",{}]'),
])
def test_null_ref_is_a_valid_ref(serializer, text):
    assert serializer.decode(text) == Message(None, None, "t:a", "ev", {})


def test_vsn_with_trailing_newline_is_refused():
    assert serializer_for_vsn("2.0.0\n") is None


def test_protocol_errors_are_pusherd_protocol_errors():
    assert issubclass(MalformedFrame, ProtocolError) and issubclass(UndecodableFrame, ProtocolError)


# --- vsn negotiation --------------------------------------------------------------------------

@pytest.mark.parametrize("vsn,legacy_path,expected", [
    (None, False, V1),
    (None, True, LEGACY),
    ("1.0.0", False, V1),
    ("1.0.0", True, V1),          # a vsn on the bare path is a modern client
    ("1.0.5", False, V1),
    ("2.0.0", False, V2),
    ("2.0.0", True, V2),
    ("2.0.1-rc", False, V2),
    ("2.0.3+build.7", False, V2),
    ("2.1.0", False, None),
    ("3.0.0", False, None),
    ("1.1.0", False, None),
    ("0.9.0", False, None),
    ("2.0", False, None),
    ("2", False, None),
    ("abc", False, None),
    ("", False, None),
    (" 2.0.0", False, None),
    ("v2.0.0", False, None),
])
def test_serializer_for_vsn(vsn, legacy_path, expected):
    assert serializer_for_vsn(vsn, legacy_path=legacy_path) is expected


def test_serializer_classes_and_vsns():
    assert isinstance(V1, V1Serializer) and isinstance(V2, V2Serializer) and isinstance(LEGACY, LegacyV1Serializer)
    assert (V1.vsn, V2.vsn) == ("1.0.0", "2.0.0")


# --- binary push header (phoenix.js >= 1.5.7) -------------------------------------------------

def binary_push(join_ref: bytes, ref: bytes, topic: bytes, event: bytes, payload: bytes = b"\x00\x01data",
                kind: int = 0) -> bytes:
    return bytes([kind, len(join_ref), len(ref), len(topic), len(event)]) + join_ref + ref + topic + event + payload


def test_binary_push_header_is_read_for_an_error_reply():
    err = V2.decode_binary(binary_push(b"3", b"7", b"room:lobby", b"upload"))
    assert isinstance(err, MalformedFrame)
    assert err.answerable
    assert (err.join_ref, err.ref, err.topic, err.reason) == ("3", "7", "room:lobby", UNSUPPORTED_BINARY)


def test_binary_push_with_empty_payload_and_utf8_topic():
    err = V2.decode_binary(binary_push(b"12", b"34", "room:é".encode(), b"ev", payload=b""))
    assert (err.join_ref, err.ref, err.topic) == ("12", "34", "room:é")


def test_binary_push_without_join_ref():
    err = V2.decode_binary(binary_push(b"", b"7", b"room:a", b"ev"))
    assert err.join_ref is None and err.ref == "7" and err.answerable


@pytest.mark.parametrize("data", [
    b"",
    b"\x00",
    b"\x00\x01\x01",                                         # sizes cut short
    binary_push(b"3", b"7", b"room:a", b"ev")[:8],           # fields cut short
    binary_push(b"3", b"7", b"room:a", b"ev", kind=1),        # a reply, not a push
    binary_push(b"3", b"7", b"room:a", b"ev", kind=2),        # a broadcast, not a push
    binary_push(b"3", b"\xff", b"room:a", b"ev"),            # ref not UTF-8
    binary_push(b"3", b"", b"room:a", b"ev"),                # no ref
    binary_push(b"3", b"7", b"", b"ev"),                     # no topic
])
def test_binary_frames_that_cannot_be_answered(data):
    err = V2.decode_binary(data)
    assert isinstance(err, MalformedFrame)
    assert not err.answerable


# --- Hypothesis ---------------------------------------------------------------------------------

# JSON values that JSON itself can carry (no NaN/Infinity, no lone surrogates).
json_text = st.text(st.characters(codec="utf-8"), max_size=20)
json_scalars = st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63) | \
    st.floats(allow_nan=False, allow_infinity=False) | json_text
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(json_text, inner, max_size=4), max_leaves=6)
refs = st.none() | st.text(st.characters(codec="utf-8"), max_size=8) | st.integers(-2 ** 53, 2 ** 53)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
payloads = st.dictionaries(json_text, json_values, max_size=3)


@SETTINGS
@given(st.one_of(st.text(), st.binary(), json_values.map(json.dumps),
                 st.lists(json_values, max_size=7).map(json.dumps)))
def test_decode_raises_only_protocol_errors(frame):
    for serializer in (V1, V2, LEGACY):
        try:
            msg = serializer.decode(frame)
        except ProtocolError as exc:
            if isinstance(exc, MalformedFrame) and exc.answerable:
                assert isinstance(exc.topic, str)
            continue
        assert isinstance(msg, Message)
        assert isinstance(msg.topic, str) and msg.topic
        assert isinstance(msg.event, str) and msg.event
        assert isinstance(msg.payload, dict)


@LIGHT
@given(st.dictionaries(st.sampled_from(["topic", "event", "payload", "ref", "join_ref", "x"]), json_values))
def test_v1_decode_of_arbitrary_objects_raises_only_protocol_errors(obj):
    try:
        msg = V1.decode(json.dumps(obj))
    except ProtocolError:
        return
    assert isinstance(msg, Message) and msg.topic == obj["topic"] and msg.event == obj["event"]


@SETTINGS
@given(st.binary(max_size=300))
def test_decode_binary_never_raises(data):
    err = V2.decode_binary(data)
    assert isinstance(err, MalformedFrame)
    if err.answerable:
        assert isinstance(err.ref, str) and isinstance(err.topic, str)


@LIGHT
@given(refs, refs, names, names, payloads)
def test_v2_encode_decode_round_trip(join_ref, ref, topic, event, payload):
    msg = Message(join_ref, ref, topic, event, payload)
    text = V2.encode(msg)
    text.encode("utf-8")
    assert V2.decode(text) == msg


@LIGHT
@given(refs, refs, names, names, payloads)
def test_v1_encode_decode_round_trip_drops_join_ref(join_ref, ref, topic, event, payload):
    text = V1.encode(Message(join_ref, ref, topic, event, payload))
    assert V1.decode(text) == Message(None, ref, topic, event, payload)


@LIGHT
@given(refs, refs, names, st.sampled_from(["ok", "error"]), payloads)
def test_replies_decode_to_phx_reply(join_ref, ref, topic, status, response):
    assert V2.decode(V2.encode_reply(join_ref, ref, topic, status, response)) == \
        Message(join_ref, ref, topic, "phx_reply", {"status": status, "response": response})
    assert V1.decode(V1.encode_reply(join_ref, ref, topic, status, response)) == \
        Message(None, ref, topic, "phx_reply", {"status": status, "response": response})
    legacy = json.loads(LEGACY.encode_reply(join_ref, ref, topic, status, response))
    assert legacy["ref"] == ref and legacy["payload"]["ref"] == ref


# --- what decode accepts, encode must be able to write ---------------------------------------

@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_decode_refuses_what_encode_cannot_write_non_finite(literal):
    frame = '["1","2","public:a","ev",{"x":%s}]' % literal
    with pytest.raises(UndecodableFrame):
        V2.decode(frame)


@pytest.mark.parametrize("frame", [
    '["1","2","public:a","ev",{"x":"\\ud800"}]',
    '["1","2","public:a","ev\\udfff",{}]',
    '["1","\\ud800","public:a","ev",{}]',
])
def test_lone_surrogates_are_decoded_and_written_back_escaped(frame):
    msg = V2.decode(frame)   # valid JSON: accepted
    text = V2.encode(msg)
    text.encode("utf-8")     # never raw: escaped as it came
    assert "\\ud800" in text or "\\udfff" in text
    V2.encode_reply(msg.join_ref, msg.ref, msg.topic, "ok", {}).encode("utf-8")


def _at_depth(frames, fn):
    """Call fn() with `frames` more Python frames on the stack (the hub encodes deeper than decode ran)."""
    return _at_depth(frames - 1, fn) if frames else fn()


def test_deepest_decodable_push_can_still_be_encoded():
    def frame(depth):
        return '["1","2","public:a","ev",{"x":' + "[" * depth + "]" * depth + "}]"

    lo, hi = 1, 3000                  # find the deepest payload decode accepts
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            V2.decode(frame(mid))
            lo = mid
        except ProtocolError:
            hi = mid - 1
    msg = V2.decode(frame(lo))
    _at_depth(50, lambda: V2.encode_broadcast(msg.topic, msg.event, msg.payload))


# --- kept ok replies ----------------------------------------------------------------------------

REPLY_REFS = st.one_of(st.none(), st.sampled_from(["1", "2", "10", "\ud800", "x" * 600]), st.integers(0, 3),
                       st.sampled_from([1.0, True, False, 0.0]), st.text(max_size=4))
REPLY_TOPICS = st.one_of(st.sampled_from(["deploys:web", "phoenix", "room:\ud800", "t" * 600]), st.text(max_size=8))
REPLY_RESPONSES = st.sampled_from([{}, {"id": 1}, [], None, {"": {}}])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(REPLY_REFS, REPLY_REFS, REPLY_TOPICS), min_size=1, max_size=4),
       st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["ok", "error"]), REPLY_RESPONSES), min_size=1,
                max_size=40),
       st.sampled_from([V1Serializer, V2Serializer, LegacyV1Serializer]))
def test_a_kept_reply_is_the_text_a_fresh_encoding_gives(keys, calls, kind):
    """Each call, in any order and repeated, answers what the same reply encoded anew would be
    (refs 1, 1.0 and true are equal keys but different JSON, as are "1" and 1; the same refs
    and topic come with other statuses and responses)."""
    kept = kind()
    for which, status, response in calls + calls[::-1]:
        join_ref, ref, topic = keys[which % len(keys)]
        assert kept.encode_reply(join_ref, ref, topic, status, response) == \
            kind()._encode_reply(join_ref, ref, topic, status, response)


def test_kept_replies_stay_bounded():
    kept = V2Serializer()
    for n in range(5000):
        kept.encode_reply(None, str(n), "phoenix", "ok", {})
    kept.encode_reply("1", "1", "t" * 600, "ok", {})
    assert 0 < len(kept._ok_replies) <= 256
    assert ("1", "1", "t" * 600) not in kept._ok_replies


# --- whole_text: the scanner first, decode for the rest ------------------------------------------

def _decoded(parse, text):
    try:
        return "value", parse(text)
    except ValueError as exc:
        return "error", type(exc), str(exc)


JSON_TEXTS = st.one_of(
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=8).map(json.dumps),
    st.text(alphabet='[]{}",:0123456789.eE+-truefalsn \t\n\r\ufeffx\\', max_size=20),
)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(["", " ", "\n", "\ufeff"]), JSON_TEXTS, st.sampled_from(["", " ", "\r\n", "x", "{}", "]"]))
def test_whole_text_decodes_as_the_decoder_does(before, text, after):
    from pusherd.core.protocol import whole_text
    text = before + text + after
    for decoder in (json.JSONDecoder(), json.JSONDecoder(parse_constant=lambda name: 0)):
        assert _decoded(whole_text(decoder), text) == _decoded(decoder.decode, text)

"""pusherd.core.publish: the HTTP publish API without HTTP (authorization and body parsing)."""

import json
from urllib.parse import urlencode

import pytest
from hypothesis import given, settings, strategies as st

from pusherd.core.errors import PublishError
from pusherd.core.protocol import V1, V2
from pusherd.core.publish import MAX_BATCH, bearer_value, parse_body, secret_matches

SETTINGS = settings(max_examples=100, deadline=None)
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def parsed(broadcasts):
    return [(b.topic, b.event, b.payload) for b in broadcasts]


def refused(body, content_type=JSON, match=None, **kwargs):
    with pytest.raises(PublishError) as info:
        parse_body(body, content_type, **kwargs)
    assert info.value.status == 400
    if match is not None:
        assert match in info.value.reason, info.value.reason
    return info.value


# --- accepted bodies -----------------------------------------------------------------------------

def test_json_object():
    body = b'{"topic":"private:user:42","event":"notice","payload":{"text":"hi","n":[1,2]}}'
    assert parsed(parse_body(body, JSON)) == [("private:user:42", "notice", {"text": "hi", "n": [1, 2]})]


def test_content_type_parameters_and_case_are_ignored():
    body = b'{"topic":"a:b","event":"e"}'
    for ctype in ("application/json; charset=utf-8", "APPLICATION/JSON", "", None, "text/plain"):
        assert parsed(parse_body(body, ctype)) == [("a:b", "e", {})]


@pytest.mark.parametrize("body", [b'{"topic":"a:b","event":"e"}', b'{"topic":"a:b","event":"e","payload":null}'])
def test_payload_defaults_to_empty_object(body):
    assert parsed(parse_body(body, JSON)) == [("a:b", "e", {})]


def test_topics_list():
    body = json.dumps({"topics": ["a:1", "a:2", "b:3"], "event": "e", "payload": {"x": 1}}).encode()
    assert parsed(parse_body(body, JSON)) == [("a:1", "e", {"x": 1}), ("a:2", "e", {"x": 1}), ("b:3", "e", {"x": 1})]


def test_list_batch():
    body = json.dumps([{"topic": "a:1", "event": "e1"}, {"topics": ["b:1", "b:2"], "event": "e2",
                                                          "payload": {"k": "v"}}]).encode()
    assert parsed(parse_body(body, JSON)) == [("a:1", "e1", {}), ("b:1", "e2", {"k": "v"}), ("b:2", "e2", {"k": "v"})]


def test_batch_of_max_size_is_accepted():
    body = json.dumps([{"topic": "a:b", "event": "e"}] * MAX_BATCH).encode()
    assert len(parse_body(body, JSON)) == MAX_BATCH


def test_form_encoded_with_payload_json_text():
    body = urlencode({"topic": "private:user:42", "event": "notice", "payload": '{"text":"hi"}'}).encode()
    assert parsed(parse_body(body, FORM)) == [("private:user:42", "notice", {"text": "hi"})]


def test_form_encoded_with_charset_and_without_payload():
    body = b"topic=public%3Aa&event=ping"
    assert parsed(parse_body(body, FORM + "; charset=UTF-8")) == [("public:a", "ping", {})]


@pytest.mark.parametrize("payload", ["", "null"])
def test_form_payload_empty_or_null_is_empty_object(payload):
    body = urlencode({"topic": "a:b", "event": "e", "payload": payload}).encode()
    assert parsed(parse_body(body, FORM)) == [("a:b", "e", {})]


def test_form_last_value_wins():
    assert parsed(parse_body(b"topic=a:1&topic=a:2&event=e", FORM)) == [("a:2", "e", {})]


@pytest.mark.parametrize("body", [b'{"topic":"a:b","event":"e","payload":{"x":1}}',
                                  b'  \n{"topic":"a:b","event":"e","payload":{"x":1}}',
                                  b'[{"topic":"a:b","event":"e","payload":{"x":1}}]'])
def test_json_body_labelled_as_form(body):
    assert parsed(parse_body(body, FORM)) == [("a:b", "e", {"x": 1})]


def test_utf8_topic_and_payload():
    body = json.dumps({"topic": "room:é", "event": "e", "payload": {"s": "日本"}}, ensure_ascii=False).encode()
    assert parsed(parse_body(body, JSON)) == [("room:é", "e", {"s": "日本"})]


def test_max_topic_length_is_applied():
    body = b'{"topic":"a:bcdefghij","event":"e"}'
    refused(body, max_topic_length=5, match="invalid topic")
    assert parse_body(body, JSON, max_topic_length=11)


# --- refused bodies ------------------------------------------------------------------------------

@pytest.mark.parametrize("body,match", [
    (b"", "not valid JSON"),
    (b"not json", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b'"a string"', "JSON object"),
    (b"42", "JSON object"),
    (b"null", "JSON object"),
    (b"[]", "empty batch"),
    (b"{}", "missing topic"),
    (b'{"event":"e"}', "missing topic"),
    (b'{"topic":"a:b"}', "event"),
    (b'{"topic":"a:b","event":""}', "event"),
    (b'{"topic":"a:b","event":7}', "event"),
    (b'{"topic":"a:b","event":null}', "event"),
    (b'{"topic":"a:b","event":"' + b"e" * 256 + b'"}', "invalid event"),
    (b'{"topic":"a:b","event":"a\\nb"}', "invalid event"),
    (b'{"topic":"a:b","event":"phx_reply"}', "invalid event"),
    (b'{"topic":"a:b","event":"phx_close"}', "invalid event"),
    (b'{"topic":"a:b","event":"phx_join"}', "invalid event"),
    (b'{"topic":"","event":"e"}', "invalid topic"),
    (b'{"topic":"a b","event":"e"}', "invalid topic"),
    (b'{"topic":7,"event":"e"}', "invalid topic"),
    (b'{"topic":null,"event":"e"}', "invalid topic"),
    (b'{"topic":"a\\u0000","event":"e"}', "invalid topic"),
    (b'{"topic":"' + b"x" * 256 + b'","event":"e"}', "invalid topic"),
    (b'{"topics":[],"event":"e"}', "topics"),
    (b'{"topics":"a:b","event":"e"}', "topics"),
    (b'{"topics":["a:b",""],"event":"e"}', "invalid topic"),
    (b'{"topics":["a:b",1],"event":"e"}', "invalid topic"),
    (b'{"topic":"a:b","topics":["a:c"],"event":"e"}', "not both"),
    (b'{"topic":"a:b","event":"e","payload":[1]}', "payload must be a JSON object"),
    (b'{"topic":"a:b","event":"e","payload":"x"}', "payload must be a JSON object"),
    (b'{"topic":"a:b","event":"e","payload":1}', "payload must be a JSON object"),
    (b'{"topic":"a:b","event":"e","payload":false}', "payload must be a JSON object"),
    (b'{"topic":"a:b","event":"e","data":{}}', "unknown field"),
    (b'{"topic":"a:b","event":"e","channel":"x"}', "unknown field"),
])
def test_refused(body, match):
    refused(body, JSON, match=match)


def test_unknown_field_is_named():
    assert "'data'" in refused(b'{"topic":"a:b","event":"e","data":{}}').reason


def test_batch_is_all_or_nothing_and_names_the_item():
    items = [{"topic": "a:1", "event": "e"}, {"topic": "a:2", "event": "e"}, {"topic": "bad topic", "event": "e"},
             {"topic": "a:4", "event": "e"}]
    err = refused(json.dumps(items).encode())
    assert err.reason.startswith("item 2: ")
    err = refused(json.dumps([{"topic": "a:1", "event": "e"}, "not an object"]).encode())
    assert err.reason.startswith("item 1: ")
    err = refused(json.dumps([{"topic": "a:1", "event": "e"}, {"topic": "a:2", "event": "phx_x"}]).encode())
    assert err.reason.startswith("item 1: ")


def test_single_object_errors_name_no_item():
    assert not refused(b'{"topic":"bad topic","event":"e"}').reason.startswith("item")


def test_batch_larger_than_max():
    refused(json.dumps([{"topic": "a:b", "event": "e"}] * (MAX_BATCH + 1)).encode(), match="batch larger")


@pytest.mark.parametrize("depth", [3000, 20000])
def test_deep_nesting_is_a_400_not_a_recursion_error(depth):
    body = b'{"topic":"a:b","event":"e","payload":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    refused(body, JSON)
    refused(body, FORM)
    form = urlencode({"topic": "a:b", "event": "e", "payload": "[" * depth + "]" * depth}).encode()
    refused(form, FORM, match="payload is not valid JSON")


@pytest.mark.parametrize("body", [b'{"topic":"a:\xff","event":"e"}', b'\xff\xfe\xfd',
                                  b'{"topic":"a:\xc3","event":"e"}'])
def test_non_utf8_json(body):
    refused(body, JSON)


def test_non_utf8_form():
    refused(b"topic=a%3Ab&event=\xff\xfe", FORM, match="could not be decoded")


@pytest.mark.parametrize("body,match", [
    (urlencode({"topic": "a:b", "event": "e", "payload": "{not json"}).encode(), "payload is not valid JSON"),
    (urlencode({"topic": "a:b", "event": "e", "payload": "[1]"}).encode(), "payload must be a JSON object"),
    (urlencode({"topic": "a:b", "event": "e", "payload": "42"}).encode(), "payload must be a JSON object"),
    (b"event=e", "missing topic"),
    (b"topic=a:b", "event"),
    (b"topic=a:b&event=e&extra=1", "unknown field"),
    (b"topics=a:b&event=e", "topics"),
    (b"", "missing topic"),
    (b"&".join(b"f%d=1" % i for i in range(200)), ""),
])
def test_form_refused(body, match):
    refused(body, FORM, match=match)


# --- secret_matches ------------------------------------------------------------------------------

SECRETS = ("publish-secret-0123456789",)


@pytest.mark.parametrize("header", [
    "publish-secret-0123456789",
    "Bearer publish-secret-0123456789",
    "bearer publish-secret-0123456789",
    "BEARER publish-secret-0123456789",
    "BeArEr publish-secret-0123456789",
    "  Bearer   publish-secret-0123456789  ",
])
def test_secret_matches(header):
    assert secret_matches(header, SECRETS)


@pytest.mark.parametrize("header", [
    None, "", " ", "Bearer", "Bearer ", "publish-secret-012345678", "publish-secret-01234567890",
    "Basic publish-secret-0123456789", "Bearerpublish-secret-0123456789", "Token publish-secret-0123456789",
    "PUBLISH-SECRET-0123456789", "Bearer Bearer publish-secret-0123456789", "publish-secret-0123456789\x00",
    "Bearer \udc80",
])
def test_secret_does_not_match(header):
    assert not secret_matches(header, SECRETS)


def test_empty_configured_secrets_never_match():
    assert not secret_matches("", ("",))
    assert not secret_matches("Bearer ", ("",))
    assert not secret_matches("x", ())
    assert not secret_matches("x", ("", None))


def test_any_of_several_secrets():
    assert secret_matches("Bearer new-secret", ("old-secret", "new-secret"))
    assert secret_matches("old-secret", ("old-secret", "new-secret"))
    assert not secret_matches("other", ("old-secret", "new-secret"))


def test_non_ascii_secret():
    assert secret_matches("Bearer sécret", ("sécret",))


def test_bearer_value():
    assert bearer_value("Bearer abc") == "abc"
    assert bearer_value("bearer  abc ") == "abc"
    assert bearer_value("abc") is None
    assert bearer_value(None) is None
    assert bearer_value("") is None


# --- Hypothesis ---------------------------------------------------------------------------------

CONTENT_TYPES = st.sampled_from([JSON, FORM, FORM + "; charset=utf-8", "", "text/plain", None])


@SETTINGS
@given(st.binary(max_size=300), CONTENT_TYPES)
def test_arbitrary_bytes_raise_only_publish_error(body, content_type):
    try:
        result = parse_body(body, content_type)
    except PublishError as exc:
        assert exc.status == 400 and isinstance(exc.reason, str)
        return
    assert result and all(isinstance(b.payload, dict) for b in result)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                        max_size=3),
                           max_leaves=6)
items = st.dictionaries(st.sampled_from(["topic", "topics", "event", "payload", "x"]),
                        st.one_of(json_values, st.sampled_from(["a:b", "public:x", "e"]),
                                  st.lists(st.sampled_from(["a:b", "c:d", ""]), max_size=3)), max_size=4)


@settings(max_examples=50, deadline=None)
@given(st.one_of(items, st.lists(items, max_size=4), json_values), CONTENT_TYPES)
def test_arbitrary_json_raises_only_publish_error(doc, content_type):
    body = json.dumps(doc).encode()
    try:
        result = parse_body(body, content_type)
    except PublishError as exc:
        assert exc.status == 400
        return
    for b in result:
        assert isinstance(b.topic, str) and isinstance(b.event, str) and isinstance(b.payload, dict)
        assert not b.event.startswith("phx_")


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["topic", "event", "payload", "x"]), st.text(max_size=20), max_size=4))
def test_arbitrary_forms_raise_only_publish_error(fields):
    try:
        result = parse_body(urlencode(fields).encode(), FORM)
    except PublishError as exc:
        assert exc.status == 400
        return
    assert [(b.topic, b.event) for b in result] == [(fields["topic"], fields["event"])]


# --- what parse_body accepts, the hub must be able to encode --------------------------------

@pytest.mark.parametrize("body,ctype", [
    (b'{"topic":"public:a","event":"e","payload":{"x":NaN}}', JSON),
    (b'{"topic":"public:a","event":"e","payload":{"x":[Infinity]}}', JSON),
    (b"topic=public:a&event=e&payload=%7B%22x%22%3A-Infinity%7D", FORM),
])
def test_non_finite_numbers_are_refused(body, ctype):
    try:
        broadcasts = parse_body(body, ctype)
    except PublishError as exc:
        assert exc.status == 400
        return
    for b in broadcasts:
        V2.encode_broadcast(b.topic, b.event, b.payload)


def test_lone_surrogates_in_payload_are_accepted_and_encode_as_valid_utf8():
    """A lone surrogate escape is valid JSON: published as it came, written back escaped."""
    (b,) = parse_body(b'{"topic":"public:a","event":"e","payload":{"x":"\\ud800"}}', JSON)
    assert b.payload == {"x": "\ud800"}
    for serializer in (V1, V2):
        text = serializer.encode_broadcast(b.topic, b.event, b.payload)
        assert "\\ud800" in text
        text.encode("utf-8")  # would raise if the surrogate were written raw


def _at_depth(frames, fn):
    return _at_depth(frames - 1, fn) if frames else fn()


def test_deepest_accepted_payload_can_still_be_encoded():
    def body(depth):
        return b'{"topic":"a:b","event":"e","payload":{"x":' + b"[" * depth + b"]" * depth + b"}}"

    lo, hi = 1, 3000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            parse_body(body(mid), JSON)
            lo = mid
        except PublishError:
            hi = mid - 1
    b, = parse_body(body(lo), JSON)
    _at_depth(50, lambda: V2.encode_broadcast(b.topic, b.event, b.payload))

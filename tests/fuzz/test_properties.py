"""Property-based tests (Hypothesis) for topic patterns, frame decoding and token verification.

No sockets: these drive the pure core directly. The oracle for access is written here from the
documented rule (literal text, or a trailing ":*" meaning ":" + at least one more character),
independently of topics.TopicPattern.
"""

import json
import time

import jwt
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from pusherd.core.access import may_listen, may_publish
from pusherd.core.errors import AuthError
from pusherd.core.protocol import LEGACY, V1, V2, MalformedFrame, Message, ProtocolError, UndecodableFrame
from pusherd.core.session import Limits, Policy, Send, Session, Subscribe
from pusherd.core.tokens import Claims, Verifier, verify_publish_token
from pusherd.client import mint_token
from pusherd.core.topics import TopicPattern, compile_patterns, is_valid_topic

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEAVY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Topic-ish text: regex metacharacters, ':' and '*' in every position, unicode.
TOPIC_CHARS = st.sampled_from(list("ab:*.?+[](){}|^$\\-_ 1") + ["é", "\u202e", "\x00"])
TOPICISH = st.one_of(st.text(TOPIC_CHARS, max_size=12), st.text(max_size=12))


def oracle(pattern: str, topic: str) -> bool:
    if pattern.endswith(":*"):
        prefix = pattern[:-1]
        return topic.startswith(prefix) and len(topic) > len(prefix)
    return topic == pattern


@FAST
@given(TOPICISH, TOPICISH)
@example("private:.*", "private:admin")
@example("priv.te:*", "privXte:a")
@example("a:*", "a:")
@example("*", "anything")
@example(":*", ":x")
def test_pattern_matches_exactly_the_literal_rule(pattern, topic):
    assert TopicPattern(pattern).matches(topic) == oracle(pattern, topic)


@FAST
@given(st.lists(TOPICISH, max_size=4), TOPICISH)
def test_no_access_beyond_the_literal_patterns(patterns, topic):
    claims = Claims(sub={}, listen=compile_patterns(patterns), publish=compile_patterns(patterns), exp=0)
    granted = topic.startswith("public:") and len(topic) > 7 or any(oracle(p, topic) for p in patterns)
    assert may_listen(topic, claims) == granted
    assert may_publish(topic, claims) == granted
    if not topic.startswith("public:"):
        assert not may_listen(topic, None) and not may_publish(topic, None)


@FAST
@given(st.text(max_size=300), st.integers(1, 300))
def test_topic_validation_never_raises_and_bounds_length(topic, max_len):
    ok = is_valid_topic(topic, max_len)
    if ok:
        assert 0 < len(topic) <= max_len and topic.isprintable() and not any(c.isspace() for c in topic)


# --- frame decoding ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(), inner, max_size=4)),
    max_leaves=15)


@HEAVY
@given(st.one_of(st.text(max_size=200), JSON_VALUES.map(json.dumps),
                 st.lists(JSON_VALUES, min_size=5, max_size=6).map(json.dumps)))
def test_decode_returns_a_message_or_a_protocol_error(text):
    for serializer in (V1, V2, LEGACY):
        try:
            msg = serializer.decode(text)
        except (MalformedFrame, UndecodableFrame) as exc:
            assert isinstance(exc, ProtocolError)
            if isinstance(exc, MalformedFrame) and exc.answerable:
                # An answerable error can be encoded back to the client.
                serializer.encode_reply(exc.join_ref, exc.ref, exc.topic, "error", {"reason": exc.reason})
            continue
        assert isinstance(msg, Message) and isinstance(msg.payload, dict)
        assert isinstance(msg.topic, str) and msg.topic and isinstance(msg.event, str) and msg.event


@HEAVY
@given(st.one_of(st.none(), st.text(max_size=5), st.integers()), st.one_of(st.none(), st.text(max_size=5), st.integers()),
       st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20), st.dictionaries(st.text(max_size=5), JSON_VALUES,
                                                                                         max_size=3))
def test_v2_roundtrip(join_ref, ref, topic, event, payload):
    text = V2.encode(Message(join_ref, ref, topic, event, payload))
    assert V2.decode(text) == Message(join_ref, ref, topic, event, payload)


SECRET = "property-secret-0123456789abcdefgh"
VERIFIER = Verifier([SECRET])


@FAST
@given(st.lists(st.one_of(st.text(max_size=80), st.binary(max_size=40)), min_size=1, max_size=10))
def test_session_never_raises_and_answers_with_json(frames):
    session = Session(V2, Policy(VERIFIER, Limits(max_channels=3)), now=0.0)
    for i, frame in enumerate(frames):
        actions = session.receive(frame, float(i))
        for action in actions:
            if isinstance(action, Send):
                json.loads(action.text)
                action.text.encode("utf-8")
            if isinstance(action, Subscribe):
                assert action.topic.startswith("public:")  # no token was ever given


# --- token verification --------------------------------------------------------------------------

CLAIM_TOPICS = st.lists(st.text(st.sampled_from(list("abc:*.")), min_size=1, max_size=8), max_size=3)


@TOKENS
@given(CLAIM_TOPICS, st.sampled_from([SECRET, "another-secret-0123456789abcdefghij"]))
def test_only_the_configured_secret_verifies(listen, secret):
    token = mint_token(secret, listen=listen, csrf_token="c", ttl=3600)
    try:
        claims = VERIFIER.verify(token, "c")
    except AuthError as exc:
        assert secret != SECRET and exc.reason == "invalid_token"
        return
    assert secret == SECRET and [p.text for p in claims.listen] == listen


@TOKENS
@given(st.integers(0, 10 ** 6), st.sampled_from(list("ABCxyz019-_.=")))
def test_a_mutated_token_never_verifies_with_other_claims(position, char):
    token = mint_token(SECRET, listen=["private:a"], publish=["private:a"], csrf_token="c", ttl=3600)
    position %= len(token)
    mutated = token[:position] + char + token[position + 1:]
    assume(mutated != token)
    try:
        _, raw = VERIFIER.verify_all(mutated, "c")
    except AuthError:
        return
    # Base64 padding bits: a last-character change may decode to the very same bytes.
    assert raw == VERIFIER.verify_all(token, "c")[1]


@TOKENS
@given(st.one_of(st.text(max_size=300), st.integers(), st.none(), st.lists(st.text(max_size=5)),
                 st.binary(max_size=50)),
       st.one_of(st.none(), st.text(max_size=10), st.integers()))
def test_verify_raises_only_auth_errors(token, csrf):
    with pytest.raises(AuthError):
        VERIFIER.verify(token, csrf)


@TOKENS
@given(st.sampled_from(["HS384", "HS512", "none"]), CLAIM_TOPICS)
def test_algorithm_comes_from_configuration(alg, listen):
    key = None if alg == "none" else SECRET + "x" * 40
    token = jwt.encode({"exp": int(time.time()) + 60, "listen": listen}, key, algorithm=alg)
    with pytest.raises(AuthError):
        VERIFIER.verify(token)
    with pytest.raises(AuthError):
        verify_publish_token(token, [SECRET], time.time())


@TOKENS
@given(CLAIM_TOPICS.filter(bool), st.integers(-100, 100))
def test_publisher_token_time_and_topics(publish, ttl):
    now = time.time()
    token = jwt.encode({"exp": int(now) + ttl, "publish": publish}, SECRET, algorithm="HS256")
    try:
        patterns = verify_publish_token(token, [SECRET], now=now)
    except AuthError as exc:
        assert int(now) + ttl <= now and exc.reason == "token_expired"
        return
    assert int(now) + ttl > now and [p.text for p in patterns] == publish

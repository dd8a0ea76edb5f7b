"""pusherd.core.topics: topic validation and the patterns tokens grant (literal text + trailing ":*")."""

import pytest
from hypothesis import given, settings, strategies as st

from pusherd.core.topics import TopicPattern, any_match, compile_patterns, is_public, is_valid_topic

SETTINGS = settings(max_examples=100, deadline=None)

MATCHES = [
    # pattern, topic, expected
    ("public:*", "public:a", True),
    ("public:*", "public:a:b", True),
    ("public:*", "public::", True),
    ("public:*", "public:*", True),
    ("public:*", "public:", False),
    ("public:*", "public", False),
    ("public:*", "publicx:a", False),
    ("public:*", "xpublic:a", False),
    ("public:*", "Public:a", False),
    ("public:*", "", False),
    ("deploys:*", "deploys:42", True),
    ("deploys:*", "deploys:42:logs", True),
    ("deploys:*", "deploys", False),
    ("deploys:*", "deploys42", False),
    # literal patterns
    ("private:user:42", "private:user:42", True),
    ("private:user:42", "private:user:420", False),
    ("private:user:42", "private:user:4", False),
    ("private:user:42", "private:user:42:x", False),
    ("private:user:42", "PRIVATE:user:42", False),
    ("private:", "private:", True),
    ("private:", "private:a", False),
    # regex and glob metacharacters are just text
    ("private:.*", "private:.*", True),
    ("private:.*", "private:a", False),
    ("private:.*", "private:", False),
    ("private:.*", "private:.*x", False),
    ("priv.te:*", "priv.te:a", True),
    ("priv.te:*", "private:a", False),
    ("priv.te:*", "privXte:a", False),
    ("private:[a-z]+", "private:[a-z]+", True),
    ("private:[a-z]+", "private:abc", False),
    ("private:^a|b$", "b", False),
    ("*", "*", True),
    ("*", "a", False),
    ("*", "public:a", False),
    ("*", "", False),
    (":*", ":*", True),
    (":*", "a", False),
    (":*", "public:a", False),
    (":*", "private:x", False),
    (":*", "", False),
    (":*", ":", False),
    ("a:*:*", "a:*:*", True),
    ("a:*:*", "a:b:c", False),
    ("a:*:*", "a:b", False),
    ("a:*:*", "a:*", False),
    ("a*", "a*", True),
    ("a*", "ab", False),
    ("a:**", "a:**", True),
    ("a:**", "a:b", False),
    ("", "", True),
    ("", "a", False),
]


@pytest.mark.parametrize("pattern,topic,expected", MATCHES)
def test_pattern_matches(pattern, topic, expected):
    assert TopicPattern(pattern).matches(topic) is expected


def test_pattern_requires_a_string():
    for bad in (None, 1, b"public:*", ["public:*"]):
        with pytest.raises(TypeError):
            TopicPattern(bad)


def test_pattern_equality_and_hash():
    assert TopicPattern("a:*") == TopicPattern("a:*")
    assert TopicPattern("a:*") != TopicPattern("a:b")
    assert TopicPattern("a:*") != "a:*"
    assert len({TopicPattern("a:*"), TopicPattern("a:*"), TopicPattern("b")}) == 2
    assert "a:*" in repr(TopicPattern("a:*"))


def test_compile_and_any_match():
    patterns = compile_patterns(["private:user:42", "deploys:*"])
    assert patterns == (TopicPattern("private:user:42"), TopicPattern("deploys:*"))
    assert any_match(patterns, "deploys:7")
    assert any_match(patterns, "private:user:42")
    assert not any_match(patterns, "private:user:43")
    assert not any_match((), "anything")
    assert compile_patterns([]) == ()


# --- is_public -------------------------------------------------------------------------------

@pytest.mark.parametrize("topic,expected", [
    ("public:a", True),
    ("public:a:b", True),
    ("public:", False),
    ("public", False),
    ("publicx:a", False),
    ("Public:a", False),
    ("private:public:a", False),
    ("", False),
])
def test_is_public(topic, expected):
    assert is_public(topic) is expected


# --- is_valid_topic ------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [
    "a", "room:lobby", "public:a:b", "private:user:42", "x" * 255, "room:é", "部屋:1", "a:*", "a/b?c=d#e",
])
def test_valid_topics(topic):
    assert is_valid_topic(topic)


@pytest.mark.parametrize("topic", [
    "", "x" * 256, " room", "room ", "room lobby", "room\tlobby", "room\nlobby", "room\r", "room\x00",
    "room\x1b[31m", "room\x7f", "room\u00a0x", "room\u2028x", "room\u200bx", "room\ufeff", "room\u3000x",
])
def test_invalid_topics(topic):
    assert not is_valid_topic(topic)


@pytest.mark.parametrize("value", [None, 1, 1.5, True, b"room:lobby", ["room:lobby"], {"t": 1}, object()])
def test_non_string_topics_are_invalid(value):
    assert is_valid_topic(value) is False


def test_max_length_is_configurable():
    assert is_valid_topic("x" * 10, max_length=10)
    assert not is_valid_topic("x" * 11, max_length=10)
    assert is_valid_topic("x" * 1000, max_length=1000)


# --- Hypothesis --------------------------------------------------------------------------------

# Small alphabet so that prefixes and the ":*" suffix occur often.
texts = st.text("ab:*.[]+^$\\|?é", max_size=12)


@SETTINGS
@given(texts, texts)
def test_literal_patterns_match_only_their_text(pattern, topic):
    if pattern.endswith(":*"):
        pattern = pattern[:-1]      # "x:*" -> "x:" (still no trailing ":*")
    assert TopicPattern(pattern).matches(topic) is (topic == pattern)
    assert TopicPattern(pattern).matches(pattern)


@SETTINGS
@given(texts, texts)
def test_wildcard_patterns_match_prefix_and_more(stem, topic):
    pattern = stem + ":*"
    prefix = stem + ":"
    assert TopicPattern(pattern).matches(topic) is (topic.startswith(prefix) and len(topic) > len(prefix))
    assert TopicPattern(pattern).matches(prefix + "x")
    assert not TopicPattern(pattern).matches(prefix)


@SETTINGS
@given(texts, texts)
def test_wildcard_patterns_with_generated_suffix(stem, rest):
    # topics built from the prefix, so the "starts with" branch is exercised as often as not
    pattern = TopicPattern(stem + ":*")
    assert pattern.matches(stem + ":" + rest) is (rest != "")


@SETTINGS
@given(st.text(), st.text())
def test_matching_never_raises(pattern, topic):
    result = TopicPattern(pattern).matches(topic)
    assert isinstance(result, bool)


@SETTINGS
@given(st.one_of(st.text(), st.none(), st.integers(), st.binary(), st.lists(st.text())),
       st.integers(min_value=0, max_value=300))
def test_is_valid_topic_never_raises(value, max_length):
    result = is_valid_topic(value, max_length)
    assert isinstance(result, bool)
    if result:
        assert isinstance(value, str) and 0 < len(value) <= max_length
        assert not any(c.isspace() or not c.isprintable() for c in value)


def test_the_only_printable_whitespace_is_the_space():
    """is_valid_topic refuses whitespace as `isprintable() and " " not in topic`: exact as long as
    the space is the one character both printable and whitespace (this Python's Unicode data)."""
    assert [c for c in map(chr, range(0x110000)) if c.isspace() and c.isprintable()] == [" "]
    for c in "\t\n\x0b\x0c\r\x1c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000 ":
        assert not is_valid_topic("public:a" + c + "b")

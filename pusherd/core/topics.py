"""Topic names and the patterns that tokens grant.

A pattern is literal text, except a trailing ``:*`` which matches ``:`` followed by anything
(``public:*`` matches ``public:a`` and ``public:a:b``). No regular expression is ever built from
a claim, so ``private:.*`` or ``priv.te:*`` grant exactly their literal text and nothing more.
"""

from typing import Iterable, Tuple

WILDCARD_SUFFIX = ":*"
PUBLIC_PREFIX = "public:"


def is_valid_topic(topic, max_length: int = 255) -> bool:
    """A topic is a non-empty string of printable, non-space characters, at most max_length long."""
    if not isinstance(topic, str) or not topic or len(topic) > max_length:
        return False
    # (The one whitespace character str.isprintable lets through is the space:
    # tests/unit/core/test_topics.py checks every code point.)
    return topic.isprintable() and " " not in topic


def is_public(topic: str) -> bool:
    """``public:*`` topics may be joined (and pushed to) without a token."""
    return topic.startswith(PUBLIC_PREFIX) and len(topic) > len(PUBLIC_PREFIX)


class TopicPattern:
    """One pattern from a token's ``listen`` or ``publish`` claim."""

    __slots__ = ("text", "_prefix")

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError("a topic pattern is a string")
        self.text = text
        # "deploys:*" -> prefix "deploys:"; anything else is compared literally.
        self._prefix = text[:-1] if text.endswith(WILDCARD_SUFFIX) else None

    def matches(self, topic: str) -> bool:
        if self._prefix is None:
            return topic == self.text
        return len(topic) > len(self._prefix) and topic.startswith(self._prefix)

    def __eq__(self, other):
        return isinstance(other, TopicPattern) and other.text == self.text

    def __hash__(self):
        return hash(self.text)

    def __repr__(self):
        return "TopicPattern(%r)" % self.text


def compile_patterns(texts: Iterable[str]) -> Tuple[TopicPattern, ...]:
    return tuple(TopicPattern(t) for t in texts)


def any_match(patterns: Iterable[TopicPattern], topic: str) -> bool:
    return any(p.matches(topic) for p in patterns)

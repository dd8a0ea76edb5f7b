"""The channel rules: who may listen to and who may publish on a topic, and which events clients push.

``public:*`` topics need no token. Any other topic needs a verified token whose ``listen``
(or ``publish``) claim has a matching pattern. (The old Phoenix app had this check inverted
for publishing and built regexes from claims; both are fixed here by construction.)
"""

from typing import Iterable, Optional, Tuple

from .tokens import Claims
from .topics import any_match, is_public


def may_listen(topic: str, claims: Optional[Claims]) -> bool:
    if is_public(topic):
        return True
    return claims is not None and any_match(claims.listen, topic)


def may_publish(topic: str, claims: Optional[Claims]) -> bool:
    if is_public(topic):
        return True
    return claims is not None and any_match(claims.publish, topic)


class EventPattern:
    """One entry of ``client_events``: an exact event name, ``prefix*``, or ``*`` for any name."""

    __slots__ = ("text", "_prefix")

    def __init__(self, text: str):
        self.text = text
        self._prefix = text[:-1] if text.endswith("*") else None

    def matches(self, event: str) -> bool:
        return event == self.text if self._prefix is None else event.startswith(self._prefix)

    def __eq__(self, other):
        return isinstance(other, EventPattern) and other.text == self.text

    def __hash__(self):
        return hash(self.text)

    def __repr__(self):
        return "EventPattern(%r)" % self.text


def compile_event_patterns(texts: Iterable[str]) -> Tuple[EventPattern, ...]:
    return tuple(EventPattern(t) for t in texts)


def may_push_event(event: str, patterns: Iterable[EventPattern]) -> bool:
    """Whether clients may push `event` (reserved names are refused before this is asked)."""
    return any(p.matches(event) for p in patterns)

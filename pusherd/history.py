"""Per-topic history: offsets, epochs and recovery of missed broadcasts. Pure, no I/O.

A topic that matches a configured history rule keeps its recent broadcasts in a `Stream`.
Every broadcast gets the next offset; the stream has an epoch, a string that changes whenever
the history is lost (a new process on the memory broker, a topic whose stream expired), so a
position ``"<epoch>:<offset>"`` names one point in one incarnation of a topic's history.

Recovery never half-succeeds: either every broadcast after ``since`` is still here (and at most
``max_recovery`` of them), and they are returned in order, or the answer is ``recovered: false``
and nothing is replayed, so the page knows to reload or refetch.
"""

import collections
import re
import secrets
import time
from typing import Deque, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .topics import TopicPattern


class Entry(NamedTuple):
    offset: int
    at: float
    event: str
    payload: dict


class Recovery(NamedTuple):
    recovered: bool
    position: Optional[str]          # the stream's latest position
    missed: Tuple[Entry, ...]        # in offset order; empty unless recovered
    epoch: Optional[str] = None


def new_epoch() -> str:
    return secrets.token_hex(4)


def format_position(epoch: str, offset: int) -> str:
    return "%s:%d" % (epoch, offset)


#: An offset: ASCII digits only (``str.isdigit`` also takes "²", which int() refuses, and "٣").
_OFFSET = re.compile(r"[0-9]{1,18}")


def parse_position(text) -> Optional[Tuple[str, int]]:
    """``"<epoch>:<offset>"`` → (epoch, offset), or None when it is not a position."""
    if not isinstance(text, str) or len(text) > 200:
        return None
    epoch, sep, offset = text.rpartition(":")
    if not sep or not epoch or not _OFFSET.fullmatch(offset):
        return None
    return epoch, int(offset)


def decide(epoch: str, last: int, entries: Sequence[Entry], since, max_recovery: int) -> Recovery:
    """The recovery answer for a client at `since`, given a stream at ``epoch:last``.

    `entries` are the broadcasts still recoverable (expired and overflowed ones already
    removed), in offset order, contiguous up to `last`. Shared by the memory Stream and the
    Redis broker, so both decide alike.
    """
    position = format_position(epoch, last)
    parsed = parse_position(since)
    if parsed is None or parsed[0] != epoch:
        return Recovery(False, position, (), epoch)
    offset = parsed[1]
    if offset > last:
        return Recovery(False, position, (), epoch)  # from the future: not ours
    if offset == last:
        return Recovery(True, position, (), epoch)
    oldest = entries[0].offset if entries else last + 1
    if oldest > offset + 1 or last - offset > max_recovery:
        return Recovery(False, position, (), epoch)  # a gap: never a partial replay
    return Recovery(True, position, tuple(e for e in entries if e.offset > offset), epoch)


class Rules:
    """Which topics keep history, from config ``history: [{topics, size, ttl}, ...]`` (first match wins)."""

    def __init__(self, rules: Iterable = ()):
        self._rules = [(TopicPattern(r.topics), r) for r in rules]

    def __bool__(self):
        return bool(self._rules)

    def rule_for(self, topic: str):
        for pattern, rule in self._rules:
            if pattern.matches(topic):
                return rule
        return None


class Stream:
    """One topic's recent broadcasts: a bounded ring with a time limit."""

    __slots__ = ("epoch", "offset", "entries", "size", "ttl", "touched")

    def __init__(self, size: int, ttl: float, epoch: Optional[str] = None, offset: int = 0):
        self.epoch = epoch or new_epoch()
        self.offset = offset
        self.entries: Deque[Entry] = collections.deque(maxlen=size)
        self.size = size
        self.ttl = ttl
        self.touched = time.time()

    @property
    def position(self) -> str:
        return format_position(self.epoch, self.offset)

    def append(self, event: str, payload: dict, now: float) -> str:
        self.offset += 1
        self.entries.append(Entry(self.offset, now, event, payload))
        self.touched = now
        return self.position

    def expire(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0].at < now - self.ttl:
            entries.popleft()

    def recover(self, since, now: float, max_recovery: int) -> Recovery:
        self.expire(now)
        return decide(self.epoch, self.offset, self.entries, since, max_recovery)

    def approx_bytes(self) -> int:
        return 200 + sum(120 + len(e.event) + len(repr(e.payload)) for e in self.entries)


class Store:
    """The memory broker's streams, one per topic with a history rule; idle ones are dropped."""

    def __init__(self, rules: Rules, max_recovery: int = 300):
        self.rules = rules
        self.max_recovery = max_recovery
        self.streams = {}

    def stream(self, topic: str, create: bool = False) -> Optional[Stream]:
        stream = self.streams.get(topic)
        if stream is None and create:
            rule = self.rules.rule_for(topic)
            if rule is not None:
                stream = self.streams[topic] = Stream(rule.size, rule.ttl)
        return stream

    def append(self, topic: str, event: str, payload: dict, now: float) -> Optional[str]:
        stream = self.stream(topic, create=True)
        return None if stream is None else stream.append(event, payload, now)

    def recover(self, topic: str, since, now: float) -> Recovery:
        if self.rules.rule_for(topic) is None:
            return Recovery(False, None, ())
        stream = self.stream(topic, create=True)
        return stream.recover(since, now, self.max_recovery)

    def sweep(self, now: float) -> None:
        """Drop streams idle past their ttl (their next incarnation gets a new epoch)."""
        for topic, stream in list(self.streams.items()):
            stream.expire(now)
            if not stream.entries and now - stream.touched > stream.ttl:
                del self.streams[topic]

    def approx_bytes(self) -> int:
        return sum(s.approx_bytes() for s in self.streams.values())


def pending_after(buffered: List, last_offset: int) -> List:
    """Live broadcasts buffered during a replay, minus those the replay already covered.

    Each item has a ``position``; one at or before ``last_offset`` (same epoch) is a duplicate.
    """
    out = []
    for b in buffered:
        parsed = parse_position(b.position)
        if parsed is not None and parsed[1] <= last_offset:
            continue
        out.append(b)
    return out

"""Per-topic history: offsets, epochs and recovery of missed broadcasts. Pure, no I/O.

A topic that matches a configured history rule keeps its recent broadcasts in a `Stream`.
Every broadcast gets the next offset; the stream has an epoch, a string that changes whenever
the history is lost (a new process on the memory broker, a topic whose stream expired), so a
position ``"<epoch>:<offset>"`` names one point in one incarnation of a topic's history.

Recovery never half-succeeds: either every broadcast after ``since`` is still here (and at most
``max_recovery`` of them), and they are returned in order, or the answer is ``recovered: false``
and nothing is replayed, so the page knows to reload or refetch.

A topic with no history (nothing published within its ttl, evicted, never published) has no
epoch, and a join with ``since`` never creates one: it is answered with an *empty position*
``"n<ms>:0"``, "no history here at <ms>" (broker clock, milliseconds). A client that comes back
with it is vouched for (`decide_history`) when nothing can have been lost since: less than ``ttl``
later (a history created after <ms> and expired since would need longer), and no eviction or
loss of the whole store since <ms> (``intact_since``). It then recovers the topic's history from
offset 1 when that history was created after <ms>, and is told ``recovered: true`` with nothing
to replay when there is still none; otherwise ``recovered: false``.

Memory is bounded globally as well as per topic: `Store` keeps at most ``max_topics`` streams
and about ``max_bytes`` (`entry_size`); when a publish passes either bound, the history that
would expire first (the least recently published under one ttl) is evicted whole, and counted.
"""

import collections
from typing import Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .topics import TopicPattern


#: Approximate bytes a kept broadcast costs beyond the length of its event name and of its
#: payload's repr, and a stream beyond its entries: the objects around them (the Entry, the
#: payload's dict and strings, the deque's blocks), measured with tracemalloc on CPython 3.11
#: (docs/scaling.md, "Global bounds").
ENTRY_OVERHEAD = 300
STREAM_OVERHEAD = 1000
#: The config keys whose bound an eviction enforced (the label of the eviction counters).
LIMIT_TOPICS = "max_history_topics"
LIMIT_BYTES = "max_history_bytes"


class Entry(NamedTuple):
    offset: int
    at: float
    event: str
    payload: dict
    size: int = 0        # approximate bytes held (memory broker), see entry_size


def entry_size(event: str, payload: dict) -> int:
    return ENTRY_OVERHEAD + len(event) + len(repr(payload))


class Recovery(NamedTuple):
    recovered: bool
    position: Optional[str]          # the stream's latest position
    missed: Tuple[Entry, ...]        # in offset order; empty unless recovered
    epoch: Optional[str] = None


EPOCH_BYTES = 4


def new_epoch(random: bytes) -> str:
    """An epoch from `random` bytes (`EPOCH_BYTES` of them, e.g. ``os.urandom``): lower-case hex."""
    return random.hex()


def format_position(epoch: str, offset: int) -> str:
    return "%s:%d" % (epoch, offset)


def parse_position(text) -> Optional[Tuple[str, int]]:
    """``"<epoch>:<offset>"`` → (epoch, offset), or None when it is not a position.

    The offset is ASCII digits only (``str.isdigit`` also takes ``"²"``, which ``int`` refuses,
    and ``"١٢"``, which it reads as 12).
    """
    if not isinstance(text, str) or len(text) > 200:
        return None
    epoch, sep, offset = text.rpartition(":")
    if not sep or not epoch or not offset.isascii() or not offset.isdigit() or len(offset) > 18:
        return None
    return epoch, int(offset)


EMPTY_MARK = "n"   # not a hex digit: an empty position never has a new_epoch() epoch


def empty_position(now: float) -> str:
    """The position of a topic that has no history at `now` (seconds): ``"n<ms>:0"``."""
    return "%s%d:0" % (EMPTY_MARK, int(now * 1000))


def empty_since(since) -> Optional[float]:
    """When `since` is an empty position, the time (seconds) it was given out; else None."""
    parsed = parse_position(since)
    if parsed is None or parsed[1] != 0:
        return None
    epoch = parsed[0]
    if len(epoch) < 2 or len(epoch) > 16 or epoch[0] != EMPTY_MARK or not epoch[1:].isascii() \
            or not epoch[1:].isdigit():
        return None
    return int(epoch[1:]) / 1000.0


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


def decide_history(state: Optional[Tuple[str, int, float]], entries: Sequence[Entry], since, now: float,
                   ttl: float, max_recovery: int, intact_since: float) -> Recovery:
    """`decide`, for a topic that may have no history, and a `since` that may be an empty position.

    ``state``: the history's (epoch, last offset, creation time), None when it has none.
    ``intact_since``: since when the broker knows of every loss of history that ttl expiry does
    not explain (its store's creation, the last eviction). Shared by both brokers.
    """
    seen_empty = empty_since(since)
    vouched = (seen_empty is not None and intact_since <= seen_empty <= now and now - seen_empty < ttl)
    if state is None:
        return Recovery(vouched, empty_position(now), (), None)
    epoch, last, created = state
    if vouched and created >= seen_empty:
        since = format_position(epoch, 0)   # everything this history holds came after `since`
    return decide(epoch, last, entries, since, max_recovery)


class Rules:
    """Which topics keep history, from config ``history: [{topics, size, ttl, client_pushes}, ...]``
    (first match wins)."""

    def __init__(self, rules: Iterable = ()):
        self._rules = [(TopicPattern(r.topics), r) for r in rules]

    def __bool__(self):
        return bool(self._rules)

    def rule_for(self, topic: str):
        for pattern, rule in self._rules:
            if pattern.matches(topic):
                return rule
        return None

    def keeps(self, topic: str, client: bool = False):
        """The rule under which a publish on `topic` is kept, or None. A client push is kept
        only when its rule says ``client_pushes: true``."""
        rule = self.rule_for(topic)
        if rule is None or (client and not getattr(rule, "client_pushes", False)):
            return None
        return rule


class Stream:
    """One topic's recent broadcasts: a bounded ring with a time limit."""

    __slots__ = ("epoch", "offset", "entries", "size", "ttl", "touched", "created", "bytes")

    def __init__(self, size: int, ttl: float, epoch: str, offset: int = 0, now: float = 0.0):
        self.epoch = epoch
        self.offset = offset
        self.entries: Deque[Entry] = collections.deque(maxlen=size)
        self.size = size
        self.ttl = ttl
        self.touched = now
        self.created = now
        self.bytes = STREAM_OVERHEAD

    @property
    def position(self) -> str:
        return format_position(self.epoch, self.offset)

    def append(self, event: str, payload: dict, now: float) -> str:
        self.offset += 1
        size = entry_size(event, payload)
        entries = self.entries
        if len(entries) == self.size:
            self.bytes -= entries[0].size    # the deque drops it
        entries.append(Entry(self.offset, now, event, payload, size))
        self.bytes += size
        self.touched = now
        return self.position

    def expire(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0].at < now - self.ttl:
            self.bytes -= entries.popleft().size

    def drop_oldest(self) -> None:
        self.bytes -= self.entries.popleft().size

    def recover(self, since, now: float, max_recovery: int) -> Recovery:
        self.expire(now)
        return decide(self.epoch, self.offset, self.entries, since, max_recovery)

    def approx_bytes(self) -> int:
        return self.bytes


class Store:
    """The memory broker's streams, one per topic with a history rule that was published on.

    Bounded per topic (the rule's ``size`` and ``ttl``) and as a whole: at most ``max_topics``
    streams and about ``max_bytes``. A publish that passes a bound evicts whole streams, the one
    that would expire first first (per ttl, in order of last publish: one OrderedDict per ttl),
    never its own; a stream alone over ``max_bytes`` loses its oldest entries. Evictions are
    counted in ``evictions`` by the limit that caused them. Idle streams are dropped by `sweep`.
    """

    def __init__(self, rules: Rules, max_recovery: int = 300, max_topics: int = 10000,
                 max_bytes: int = 64 * 1024 * 1024, now: float = 0.0, *, random: Callable[[int], bytes]):
        """`random(n)`: n random bytes for a new stream's epoch (``os.urandom``: the broker's)."""
        self._random = random
        self.rules = rules
        self.max_recovery = max_recovery
        self.max_topics = max_topics
        self.max_bytes = max_bytes
        self.streams: Dict[str, Stream] = {}
        self._by_ttl: Dict[float, "collections.OrderedDict[str, Stream]"] = {}
        self.bytes = 0
        self.evictions: Dict[str, int] = {LIMIT_TOPICS: 0, LIMIT_BYTES: 0}
        # Every loss since then is an expiry (see decide_history). The start counts from its
        # millisecond, as the empty positions it gives out do.
        self.intact_since = int(now * 1000) / 1000.0

    def append(self, topic: str, event: str, payload: dict, now: float, client: bool = False) -> Optional[str]:
        """Keep a broadcast; its position, or None when the topic keeps no history (for it)."""
        stream = self.streams.get(topic)
        if stream is None:
            rule = self.rules.keeps(topic, client)
            if rule is None:
                return None
            while len(self.streams) >= self.max_topics and self._evict(None, LIMIT_TOPICS, now):
                pass
            stream = self.streams[topic] = Stream(rule.size, rule.ttl, new_epoch(self._random(EPOCH_BYTES)), now=now)
            self._by_ttl.setdefault(rule.ttl, collections.OrderedDict())[topic] = stream
            self.bytes += stream.bytes
        elif client and self.rules.keeps(topic, client) is None:
            return None
        else:
            self._by_ttl[stream.ttl].move_to_end(topic)
        before = stream.bytes
        position = stream.append(event, payload, now)
        self.bytes += stream.bytes - before
        while self.bytes > self.max_bytes and self._evict(topic, LIMIT_BYTES, now):
            pass
        while self.bytes > self.max_bytes and len(stream.entries) > 1:
            before = stream.bytes
            stream.drop_oldest()
            self.bytes += stream.bytes - before
        return position

    def _evict(self, keep: Optional[str], limit: str, now: float) -> bool:
        """Drop the stream that would expire first (other than `keep`); False when there is none."""
        victim, soonest = None, None
        for ordered in self._by_ttl.values():
            for topic, stream in ordered.items():
                if topic != keep:
                    if soonest is None or stream.touched + stream.ttl < soonest:
                        victim, soonest = topic, stream.touched + stream.ttl
                    break    # the others in this ttl were published later
        if victim is None:
            return False
        self._drop(victim)
        self.evictions[limit] += 1
        self.intact_since = now
        return True

    def _drop(self, topic: str) -> None:
        stream = self.streams.pop(topic)
        del self._by_ttl[stream.ttl][topic]
        self.bytes -= stream.bytes

    def recover(self, topic: str, since, now: float) -> Recovery:
        """Never creates a stream: a topic without one gets an empty position (decide_history)."""
        rule = self.rules.rule_for(topic)
        if rule is None:
            return Recovery(False, None, ())
        stream = self.streams.get(topic)
        if stream is None:
            return decide_history(None, (), since, now, rule.ttl, self.max_recovery, self.intact_since)
        before = stream.bytes
        stream.expire(now)
        self.bytes += stream.bytes - before
        return decide_history((stream.epoch, stream.offset, stream.created), stream.entries, since, now,
                              stream.ttl, self.max_recovery, self.intact_since)

    def sweep(self, now: float) -> None:
        """Drop streams idle past their ttl (their next incarnation gets a new epoch)."""
        for topic, stream in list(self.streams.items()):
            before = stream.bytes
            stream.expire(now)
            self.bytes += stream.bytes - before
            if not stream.entries and now - stream.touched > stream.ttl:
                self._drop(topic)

    def approx_bytes(self) -> int:
        return self.bytes


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

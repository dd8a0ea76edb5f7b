"""Presence: who is on a topic right now, in Phoenix.Presence's wire format. Pure, no I/O.

Wire format (phoenix-protocol.md §6). ``presence_state`` is ``{key: {"metas": [meta, ...]}}``;
``presence_diff`` is ``{"joins": {...}, "leaves": {...}}`` with both halves always present
(phoenix.js reads both and throws on a missing one). Every meta has a ``phx_ref`` unique in
the topic and an ``online_at`` (unix seconds as a string, as in the Phoenix guide), and
holds the listed ``sub`` fields and nothing else from the token.

Who is tracked. A rule (``presence: [{topics, key, meta, limit}]``, first match wins) names the
``sub`` field that is the member's key: a user with two tabs is one key with two metas. A
joiner whose ``sub`` lacks that field (no token, ``{}``, not an object, or null) is *not
tracked*: public topics need no token, and a per-connection key would let anonymous
connections fill the topic and make every connect and disconnect a broadcast to everyone.
Untracked joiners still join and still receive ``presence_state``.

Pieces, for one process:

* `PresenceState` — the replica of one topic's entries from every node, each entry identified
  by ``(node, phx_ref)``. It changes only through the same diffs that are delivered to this
  process's subscribers, so a client that got `PresenceState.payload` and then every diff
  returned by the state ends with exactly the state's list (tests check it against the real
  phoenix.js 1.2, 1.4, 1.5 and 1.8). Each mutator returns the *effective* diff — only what
  changed the replica: forward that, never the diff as received. A join that is already
  present is dropped from it, because phoenix.js 1.2 would list the meta twice.
* `DiffBuffer` — this node's joins and leaves during one coalescing window, taken as one
  ``presence_diff``; a ref that joins and leaves inside the window disappears from it.
* `TopicPresence` — the two together, plus this node's own entries (its truth) and the
  per-topic limit. ``track`` answers `NotTracked("topic_full")` when the topic holds ``limit``
  entries (metas, i.e. connections): the join still succeeds, the caller counts/logs it, and
  the member is not tracked later when room frees up (a rejoin tracks it).

How the pieces are meant to be driven (the caller owns time, randomness, I/O):

1. join: ``identify(rule, sub)`` → ``tp.track(member, os.urandom(REF_BYTES), time.time())``;
   keep the `Tracked` handle; push ``tp.state.payload()`` as ``presence_state`` (it is cached
   per ``tp.state.version``: encode it once per serializer per version). The joiner's own
   entry is not in it yet: it arrives, to everyone alike, in the next diff.
2. leave, close, token expiry, eviction: ``tp.untrack(handle)`` (idempotent); drain:
   ``tp.untrack_all()``.
3. window end (when ``tp.pending``): ``diff = tp.flush()``; write it to the broker's hash
   (`encode_entry` / `entry_field`) and publish it as this node's ``presence_diff`` (the node id
   travels in the broker's envelope, not in the payload clients see).
4. every ``presence_diff`` arriving from the broker (this node's own included, when it comes
   back): ``effective = tp.state.apply_diff(node, diff)``; deliver ``effective`` if not None.
   Apply each diff once, in broker order: either on the echo, or at flush and then drop
   the echo. Doing both can undo a later leave.
5. a node found dead: ``tp.state.remove_node(node)`` → deliver the leaves it returns; from then
   on drop that node's diffs (a late one would bring its entries back for good), so node ids
   must never be reused (a random id per process start).
6. after a broker outage: resubscribe, then ``snapshot = [decode_entry(f, v) ...]`` (skip the
   Nones and dead nodes), ``local, correction = tp.resync(snapshot)``; deliver
   ``local`` here, write ``correction`` to the broker and publish it as this node's diff.
   Only the real differences are sent.

Limits. Across processes ``limit`` is soft: each process counts other nodes' entries as its
replica knows them, so joins accepted elsewhere and not yet broadcast can overshoot it
(at worst ``limit`` per process). Keys are at most `MAX_KEY_CHARS` characters and never an
``Object.prototype`` name (those crash phoenix.js 1.2-1.5's presence code on every page of the
topic). A member's listed fields take at most `MAX_META_BYTES` of JSON. Otherwise the member is
refused (`NotTracked`), never truncated.
"""

import base64
import json
import math
from typing import Any, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

from .topics import TopicPattern

REF_BYTES = 12            # random bytes per phx_ref: 16 url-safe base64 characters, as phoenix_pubsub
MAX_KEY_CHARS = 256
MAX_META_BYTES = 1024     # the listed sub fields of one member, as UTF-8 JSON
MAX_META_FIELDS = 16
MAX_REF_CHARS = 64        # a phx_ref accepted from a peer's diff or from the broker
DEFAULT_LIMIT = 1000
RESERVED_META_FIELDS = frozenset({"phx_ref", "phx_ref_prev", "online_at"})
#: Names on Object.prototype (and old Firefox's). phoenix.js <= 1.5 keeps presences in plain
#: objects, so a key with one of these names throws inside syncState/syncDiff.
JS_PROTOTYPE_NAMES = frozenset({
    "__proto__", "constructor", "hasOwnProperty", "isPrototypeOf", "propertyIsEnumerable",
    "toLocaleString", "toString", "valueOf", "__defineGetter__", "__defineSetter__",
    "__lookupGetter__", "__lookupSetter__", "toSource", "watch", "unwatch",
})

# NotTracked reasons (stable: for logs and metrics labels).
ANONYMOUS = "anonymous"      # no key field in sub
BAD_KEY = "bad_key"          # the key is not a short string or integer, or a reserved name
BAD_META = "bad_meta"        # a listed field is not a JSON scalar, or the fields are too big
TOPIC_FULL = "topic_full"    # the topic holds `limit` entries

Meta = Dict[str, Any]
Presences = Dict[str, Dict[str, List[Meta]]]     # {key: {"metas": [meta, ...]}}
Diff = Dict[str, Presences]                      # {"joins": Presences, "leaves": Presences}


class PresenceRule:
    """One ``presence:`` config entry: where presence is tracked and what a member shows.

    Raises ValueError, with a message naming the problem, on a bad rule.
    """

    __slots__ = ("pattern", "key", "meta", "limit")

    def __init__(self, topics: str, key: str = "id", meta: Sequence[str] = (), limit: int = DEFAULT_LIMIT):
        if not isinstance(topics, str) or not topics:
            raise ValueError("topics must be a topic pattern (a non-empty string)")
        if not isinstance(key, str) or not key:
            raise ValueError("key must be the name of a sub field")
        if not isinstance(meta, (list, tuple)) or not all(isinstance(f, str) and f for f in meta):
            raise ValueError("meta must be a list of sub field names")
        meta = tuple(meta)
        if len(set(meta)) != len(meta):
            raise ValueError("meta lists a field twice")
        if len(meta) > MAX_META_FIELDS:
            raise ValueError("meta lists more than %d fields" % MAX_META_FIELDS)
        for field in meta:
            if field in RESERVED_META_FIELDS or field in JS_PROTOTYPE_NAMES:
                raise ValueError("meta field %r is reserved" % field)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        self.pattern = TopicPattern(topics)
        self.key = key
        self.meta = meta
        self.limit = limit

    def matches(self, topic: str) -> bool:
        return self.pattern.matches(topic)

    def __repr__(self):
        return "PresenceRule(%r, key=%r, meta=%r, limit=%r)" % (
            self.pattern.text, self.key, self.meta, self.limit)


class PresenceRules:
    """The configured rules in order; the first whose pattern matches a topic applies."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[PresenceRule] = ()):
        self._rules = tuple(rules)

    def __bool__(self):
        return bool(self._rules)

    def rule_for(self, topic: str) -> Optional[PresenceRule]:
        for rule in self._rules:
            if rule.matches(topic):
                return rule
        return None


class Member(NamedTuple):
    """Who a joiner is on a presence topic: its key and the listed sub fields (no phx_ref yet)."""
    key: str
    fields: Dict[str, Any]


class NotTracked(NamedTuple):
    """Why a joiner is not tracked. `field` is a config-chosen sub field name (safe to log)."""
    reason: str
    field: Optional[str] = None


class Tracked(NamedTuple):
    """A tracked connection's entry: the handle its session keeps to untrack it."""
    key: str
    meta: Meta

    @property
    def phx_ref(self) -> str:
        return self.meta["phx_ref"]


class Entry(NamedTuple):
    """One entry as stored in the broker and in a replica."""
    node: str
    key: str
    meta: Meta


def valid_key(key) -> bool:
    """A presence key on the wire: a printable string phoenix.js can index a plain object by."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or key in JS_PROTOTYPE_NAMES:
        return False
    if not key.isprintable():
        return False
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate, e.g. from "\ud800" in the token's JSON
        return False
    return True


def identify(rule: PresenceRule, sub: Any) -> Union[Member, NotTracked]:
    """The member a token's ``sub`` claim makes on a topic of `rule`, or why it is not tracked.

    The key is ``sub[rule.key]``: a string, or an integer (shown as its decimal string, as
    Phoenix does with ``to_string``). Floats and booleans are refused so ``1.0`` and ``1`` cannot
    be told apart. Listed fields missing from `sub` are left out of the meta. `sub` is the
    decoded claim, anything JSON; without a token pass None.
    """
    if not isinstance(sub, dict) or sub.get(rule.key) is None:
        return NotTracked(ANONYMOUS)
    raw = sub[rule.key]
    if isinstance(raw, int) and not isinstance(raw, bool) and -2 ** 64 < raw < 2 ** 64:
        key = str(raw)
    elif isinstance(raw, str) and valid_key(raw):
        key = raw
    else:
        return NotTracked(BAD_KEY, rule.key)
    fields = {}
    for name in rule.meta:
        if name not in sub:
            continue
        value = sub[name]
        if not _json_scalar(value):
            return NotTracked(BAD_META, name)
        fields[name] = value
    if fields and len(json.dumps(fields, ensure_ascii=False, allow_nan=False).encode("utf-8")) > MAX_META_BYTES:
        return NotTracked(BAD_META)
    return Member(key, fields)


def _json_scalar(value) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -2 ** 64 < value < 2 ** 64          # str() of a huge int can even raise
    if isinstance(value, float):
        return math.isfinite(value)               # NaN/Infinity are not JSON: JSON.parse fails
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    return False


def new_meta(member: Member, random: bytes, now: float) -> Meta:
    """A fresh meta for `member`: ``phx_ref`` from `random` (`REF_BYTES` bytes), ``online_at``
    from `now` (unix seconds), then the member's fields."""
    if not isinstance(random, (bytes, bytearray)) or len(random) != REF_BYTES:
        raise ValueError("phx_ref needs exactly %d random bytes" % REF_BYTES)
    meta = {"phx_ref": base64.urlsafe_b64encode(bytes(random)).decode("ascii"), "online_at": str(int(now))}
    meta.update(member.fields)
    return meta


def _group(pairs: Iterable[Tuple[str, Meta]]) -> Presences:
    grouped: Presences = {}
    for key, meta in pairs:
        presence = grouped.get(key)
        if presence is None:
            grouped[key] = {"metas": [meta]}
        else:
            presence["metas"].append(meta)
    return grouped


def make_diff(joins: Iterable[Tuple[str, Meta]], leaves: Iterable[Tuple[str, Meta]]) -> Optional[Diff]:
    """A ``presence_diff`` payload from ``(key, meta)`` pairs, or None when both are empty."""
    joins, leaves = _group(joins), _group(leaves)
    if not joins and not leaves:
        return None
    return {"joins": joins, "leaves": leaves}


def _ref_of(meta) -> Optional[str]:
    if not isinstance(meta, dict):
        return None
    ref = meta.get("phx_ref")
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF_CHARS:
        return None
    return ref


def _iter_metas(section) -> Iterator[Tuple[str, Any]]:
    """``(key, meta)`` pairs of a diff's joins or leaves; anything malformed is skipped."""
    if not isinstance(section, dict):
        return
    for key, presence in section.items():
        metas = presence.get("metas") if isinstance(presence, dict) else None
        if isinstance(metas, list):
            for meta in metas:
                yield key, meta


ENTRY_VERSION = 1


def entry_field(node: str, phx_ref: str) -> str:
    """An entry's field in the broker's hash for its topic: ``<node>|<phx_ref>``."""
    return "%s|%s" % (node, phx_ref)


def encode_entry(entry: Entry) -> Tuple[str, str]:
    """``(field, value)`` for the broker's hash; the value is versioned JSON."""
    value = json.dumps({"v": ENTRY_VERSION, "key": entry.key, "meta": entry.meta},
                       ensure_ascii=False, separators=(",", ":"))
    return entry_field(entry.node, entry.meta["phx_ref"]), value


def decode_entry(field, value) -> Optional[Entry]:
    """The entry a broker hash field holds (str or bytes), or None when it is not one. Never raises."""
    try:
        if isinstance(field, bytes):
            field = field.decode("utf-8")
        doc = json.loads(value)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(field, str) or not isinstance(doc, dict) or doc.get("v") != ENTRY_VERSION:
        return None
    node, _, ref = field.rpartition("|")
    key, meta = doc.get("key"), doc.get("meta")
    if not node or not valid_key(key) or _ref_of(meta) != ref:
        return None
    if not all(_json_scalar(v) for v in meta.values()):
        return None
    return Entry(node, key, meta)


class PresenceState:
    """One topic's entries from every node: the replica a process serves ``presence_state`` from.

    Metas keep their order: a key's metas in the order they were added, as phoenix.js orders
    them (kept metas first, joined ones appended). A phx_ref is unique in the topic, so a meta
    that is already here is never added twice. Entries come from this codebase's own nodes,
    but anything malformed (from a broker or a peer) is skipped, never raised on.
    """

    __slots__ = ("_keys", "_refs", "_nodes", "version", "_payload")

    def __init__(self, entries: Iterable[Entry] = ()):
        self._keys: Dict[str, Dict[str, Meta]] = {}   # key -> {phx_ref: meta}
        self._refs: Dict[str, Tuple[str, str]] = {}             # phx_ref -> (node, key)
        self._nodes: Dict[str, int] = {}                        # node -> number of entries
        self.version = 0          # bumped on every change: key an encoded presence_state cache on it
        self._payload = None
        for node, key, meta in entries:
            self.add(node, key, meta)

    def __len__(self) -> int:
        """Number of entries (metas), across keys and nodes."""
        return len(self._refs)

    def __contains__(self, phx_ref) -> bool:
        return phx_ref in self._refs

    def count_of(self, node: str) -> int:
        return self._nodes.get(node, 0)

    def nodes(self) -> Set[str]:
        """The nodes with at least one entry here."""
        return set(self._nodes)

    def keys(self) -> int:
        """Number of distinct keys (members)."""
        return len(self._keys)

    def entries(self) -> Iterator[Entry]:
        refs = self._refs
        for key, metas in self._keys.items():
            for ref, meta in metas.items():
                yield Entry(refs[ref][0], key, meta)

    def add(self, node: str, key: str, meta: Meta) -> bool:
        """Add one entry; False (and no change) when it is malformed or its phx_ref is here already."""
        ref = _ref_of(meta)
        if ref is None or ref in self._refs or not isinstance(node, str) or not valid_key(key):
            return False
        if not all(_json_scalar(v) for v in meta.values()):
            return False
        metas = self._keys.get(key)
        if metas is None:
            metas = self._keys[key] = {}
        metas[ref] = meta
        self._refs[ref] = (node, key)
        self._nodes[node] = self._nodes.get(node, 0) + 1
        self._changed()
        return True

    def remove(self, node: str, key: str, phx_ref: str) -> Optional[Meta]:
        """Remove the entry `phx_ref` of `node` under `key`; its meta, or None if there is none."""
        if not isinstance(phx_ref, str) or self._refs.get(phx_ref) != (node, key):
            return None
        del self._refs[phx_ref]
        metas = self._keys[key]
        meta = metas.pop(phx_ref)
        if not metas:
            del self._keys[key]
        left = self._nodes[node] - 1
        if left:
            self._nodes[node] = left
        else:
            del self._nodes[node]
        self._changed()
        return meta

    def remove_node(self, node: str) -> Optional[Diff]:
        """Remove every entry of `node` (a process that died); the leaves to deliver, or None."""
        if node not in self._nodes:
            return None
        doomed = [(ref, key) for ref, (n, key) in self._refs.items() if n == node]
        return make_diff((), [(key, self.remove(node, key, ref)) for ref, key in doomed])

    def apply_diff(self, node: str, diff: Any) -> Optional[Diff]:
        """Apply `node`'s ``presence_diff`` as phoenix.js does (joins, then leaves).

        Returns the effective diff, what to deliver to this process's subscribers, or None when
        nothing changed. Leaves carry the stored meta; a leave only removes an entry of `node`.
        """
        if not isinstance(diff, dict):
            return None
        joined = [(key, meta) for key, meta in _iter_metas(diff.get("joins")) if self.add(node, key, meta)]
        left = []
        for key, meta in _iter_metas(diff.get("leaves")):
            ref = _ref_of(meta)
            stored = None if ref is None else self.remove(node, key, ref)
            if stored is not None:
                left.append((key, stored))
        return make_diff(joined, left)

    def payload(self) -> Presences:
        """The ``presence_state`` payload, built once per version. Do not mutate it."""
        if self._payload is None:
            self._payload = {key: {"metas": list(metas.values())} for key, metas in self._keys.items()}
        return self._payload

    def diff_to(self, other: "PresenceState") -> Optional[Diff]:
        """The diff that takes a client holding this state to `other`'s (None when equal).

        Entries are compared by key and phx_ref, as phoenix.js compares them.
        """
        return make_diff(*self._joins_leaves(other))

    def replace(self, entries: Iterable[Entry]) -> Optional[Diff]:
        """Become the state of `entries` (e.g. the broker's truth after an outage); the diff to deliver.

        Entries both here and there keep their place, so clients and replica keep one order.
        """
        target = PresenceState(entries)
        joins, leaves = self._joins_leaves(target)
        if not joins and not leaves:
            return None
        for key, meta in leaves:
            ref = meta["phx_ref"]
            self.remove(self._refs[ref][0], key, ref)
        for key, meta in joins:
            self.add(target._refs[meta["phx_ref"]][0], key, meta)
        return make_diff(joins, leaves)

    def _joins_leaves(self, other: "PresenceState"):
        mine, theirs = self._refs, other._refs
        joins = [(key, meta) for key, metas in other._keys.items() for ref, meta in metas.items()
                 if ref not in mine or mine[ref][1] != key]
        leaves = [(key, meta) for key, metas in self._keys.items() for ref, meta in metas.items()
                  if ref not in theirs or theirs[ref][1] != key]
        return joins, leaves

    def _changed(self):
        self.version += 1
        self._payload = None


class DiffBuffer:
    """This node's joins and leaves on one topic during one coalescing window.

    `take` returns them as one ``presence_diff``: N joins in a window cost one broadcast, not N.
    A phx_ref joined and left inside the window cancels out: nobody needs to hear of it.
    """

    __slots__ = ("_joins", "_leaves")

    def __init__(self):
        self._joins: Dict[str, Tuple[str, Meta]] = {}    # phx_ref -> (key, meta)
        self._leaves: Dict[str, Tuple[str, Meta]] = {}

    def __len__(self) -> int:
        return len(self._joins) + len(self._leaves)

    def join(self, key: str, meta: Meta) -> None:
        ref = meta["phx_ref"]
        if ref in self._leaves:
            # One diff cannot carry a leave and a join of one ref: phoenix.js would drop both.
            raise ValueError("phx_ref joined after it left: a phx_ref joins once")
        self._joins[ref] = (key, meta)

    def leave(self, key: str, meta: Meta) -> None:
        ref = meta["phx_ref"]
        if self._joins.pop(ref, None) is None:
            self._leaves[ref] = (key, meta)

    def take(self) -> Optional[Diff]:
        """The window's diff (None when nothing happened), and a fresh window."""
        if not self:
            return None
        diff = make_diff(self._joins.values(), self._leaves.values())
        self._joins, self._leaves = {}, {}
        return diff


class TopicPresence:
    """Presence on one topic in one process: the replica, this node's entries, the window.

    Keep it while this process has subscribers on the topic or entries of its own
    (`own_count`): dropping it with entries of its own would leave them behind for good.
    """

    __slots__ = ("node", "limit", "state", "_own", "_pending")

    def __init__(self, node: str, limit: int = DEFAULT_LIMIT, entries: Iterable[Entry] = ()):
        self.node = node
        self.limit = limit
        self.state = PresenceState(entries)          # every node's entries, as broadcast
        self._own: Dict[str, Tracked] = {}           # phx_ref -> this node's live entries
        self._pending = DiffBuffer()

    @property
    def pending(self) -> bool:
        """True when `flush` has a diff to give (schedule the window's end then)."""
        return bool(self._pending)

    @property
    def own_count(self) -> int:
        return len(self._own)

    def own_entries(self) -> List[Entry]:
        """This node's live entries: its truth, e.g. to rewrite in the broker."""
        return [Entry(self.node, t.key, t.meta) for t in self._own.values()]

    def track(self, member: Member, random: bytes, now: float) -> Union[Tracked, NotTracked]:
        """Track a joiner: its `Tracked` handle, or ``NotTracked(TOPIC_FULL)``.

        The join is broadcast at the next `flush`. Raises ValueError only on bad arguments
        (wrong `random` size, a phx_ref already in use).
        """
        others = len(self.state) - self.state.count_of(self.node)
        if others + len(self._own) >= self.limit:
            return NotTracked(TOPIC_FULL)
        meta = new_meta(member, random, now)
        ref = meta["phx_ref"]
        if ref in self._own or ref in self.state:
            raise ValueError("phx_ref already in use: pass fresh random bytes")
        tracked = Tracked(member.key, meta)
        self._pending.join(tracked.key, meta)
        self._own[ref] = tracked
        return tracked

    def untrack(self, tracked: Tracked) -> bool:
        """Stop tracking (leave, close, expiry, eviction); False if it was not tracked. Idempotent."""
        if self._own.pop(tracked.phx_ref, None) is None:
            return False
        self._pending.leave(tracked.key, tracked.meta)
        return True

    def untrack_all(self) -> int:
        """Untrack every entry of this node (drain, shutdown); how many there were."""
        own, self._own = self._own, {}
        for tracked in own.values():
            self._pending.leave(tracked.key, tracked.meta)
        return len(own)

    def flush(self) -> Optional[Diff]:
        """This window's diff of this node's changes, to write to the broker and publish."""
        return self._pending.take()

    def resync(self, snapshot: Iterable[Entry]) -> Tuple[Optional[Diff], Optional[Diff]]:
        """Adopt the broker's `snapshot` (after an outage), with this node's entries its own.

        Returns ``(local, correction)``: `local` is applied to the replica already and goes to
        this process's subscribers; `correction` takes the snapshot's entries of this node to
        this node's truth: write it to the broker and publish it as this node's diff. Nothing
        stays pending: the correction covers it.
        """
        snapshot = list(snapshot)
        mine = self.own_entries()
        recorded = PresenceState(e for e in snapshot if e.node == self.node)
        correction = recorded.diff_to(PresenceState(mine))
        local = self.state.replace([e for e in snapshot if e.node != self.node] + mine)
        self._pending = DiffBuffer()
        return local, correction

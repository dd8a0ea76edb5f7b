"""RedisBroker: several pusherd processes (and hosts) share one Redis pub/sub backplane.

Delivery guarantee
------------------
* ``publish()`` returns only after Redis acknowledged the ``PUBLISH``; otherwise it raises
  `BrokerUnavailable` (Redis down, this process reconnecting, backlog full, timeout). pusherd never
  accepts an event and then drops it. A publish that fails after its bytes left (the connection
  died before the reply) may still have reached Redis: a publisher that retries on 503 can then
  cause a duplicate, never a loss.
* The publishing process delivers to its own sockets itself, once, right after Redis acknowledged
  (its own copy coming back from Redis is skipped), so its members never depend on its subscriber
  connection. Except on history topics and in batches holding one: those it delivers when Redis
  sends them back (their envelopes carry the origin ``<origin>.echo``, not skipped), so that they
  are delivered in offset order, and a batch in its order.
* A batch (`publish_batch`) is encoded whole before anything is queued and sent as one
  ``MULTI``/``EXEC``: Redis runs all of it or none of it, except what it cannot undo (a command
  failing while ``EXEC`` runs it; a connection lost after ``EXEC`` left): see `publish_batch`.
* Anything ``protocol.loads`` returns is accepted: a lone surrogate in a payload is written
  escaped (``\\ud800``), as the memory broker's frames write it.
* Every other process receives the event **at most once**: Redis pub/sub keeps nothing. A process
  whose subscriber connection is down or reconnecting (Redis restart, network loss,
  ``CLIENT KILL``) misses what is published meanwhile, and pub/sub does not replay it. On a
  history topic the process catches up once reconnected: it delivers the missed broadcasts
  from the history to its members, in order, before any live one (`_catch_up`), and a client
  that rejoins with ``since`` gets them from the history too.
* A join is answered once the process's subscription is in effect in Redis (`activate`: a
  ``PING`` barrier after the ``SUBSCRIBE``, one round trip for a topic's first local member,
  none after): an event published anywhere after the client saw its join reply reaches it.
* Order: per topic, the events of one process reach every process in the order it published them
  (publishes go out in order, pipelined, on one connection; Redis delivers in order).

History (topics matching a ``history`` rule)
--------------------------------------------
Two keys per topic that was published on: ``<prefix>:h:<topic>``, a Stream of the recent
envelopes (entry ID ``<offset>-0``, fields ``at`` (Redis clock, ms) and ``d`` (the envelope)),
trimmed to ``size``; and ``<prefix>:hm:<topic>``, a hash with the ``epoch``, the last ``offset``
and ``created`` (ms). Both expire ``ttl`` after the topic's last publish. Three keys for all of
them carry the global bounds (``max_history_topics``, ``max_history_bytes``) across processes:
``<prefix>:history:topics`` (sorted set, topic -> expiry ms), ``<prefix>:history:bytes`` (hash,
topic -> bytes) and ``<prefix>:history:info`` (``bytes``, ``created``, ``evicted``). One Lua script
per publish (`PUBLISH_SCRIPT`) creates the epoch when it is missing (never published, expired,
evicted, flushed: a new random epoch), takes the next offset, adds the entry, keeps the bounds
(evicting the histories that expire first) and PUBLISHes the envelope with its ``"pos"``,
atomically: every process sees the same positions, and pub/sub order is offset order.
`recover` makes the subscription active, reads the stream (`RECOVER_SCRIPT`, which writes nothing
for the topic: a join with ``since`` never creates history), then waits for a second barrier so
that the pub/sub copies of what it read have arrived (and are dropped from the replay's hold
buffer); decisions are `history.decide_history`, the same as the memory broker's, with ``size``
and ``ttl`` enforced exactly on read.

Design
------
One channel per topic, ``<prefix>:t:<topic>``, subscribed while the topic has local members (the
hub calls `subscribe`/`unsubscribe` on the first/last member), so a process only receives what its
sockets need; the wanted set is the source of truth for resubscribing after a reconnect (we never
rely on redis-py to resubscribe). Messages are a versioned JSON envelope, see `encode_envelope`.

The subscriber connection is owned by one supervisor task: connect, resubscribe, wait for a
``PING`` barrier (then ``healthy()`` is true), read; on any failure reconnect with capped,
jittered exponential backoff. An outage is logged once when it starts and once when it ends.
``healthy()`` gates publishes: while it is false they are refused at once (503), so a down Redis
costs the publisher no timeout.
"""

import asyncio
import hashlib
import json
import logging
import os
import random
import secrets
import time
from typing import Dict, Iterable, List, Optional, Set, Tuple

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..core.broadcast import Broadcast
from .base import Broker, Deliver, log_evictions
from ..config.values import mask_url
from ..core import protocol
from ..core.errors import BrokerUnavailable
from ..core.history import (LIMIT_BYTES, LIMIT_TOPICS, Entry, Recovery, Rules, decide_history, empty_since,
                           EPOCH_BYTES, format_position, new_epoch, parse_position)

log = logging.getLogger("pusherd.broker")

ENVELOPE_VERSION = 1
CONNECT_TIMEOUT = 2.0       # seconds for TCP connect + handshake
COMMAND_TIMEOUT = 2.0       # a PUBLISH not acknowledged within this is refused (503)
PING_INTERVAL = 5.0         # subscriber silent this long gets a PING; twice as long = dead
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
MAX_PENDING = 10000         # publishes queued for the writer before refusing (bounded memory)
SUBSCRIBE_BATCH = 500       # channels per SUBSCRIBE command when resubscribing

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode

#: Approximate Redis memory of one stream entry beyond its envelope, for the ``max_history_bytes``
#: accounting (``MEMORY USAGE`` of full streams: 109 bytes an entry with 100-byte payloads, 268
#: with 1000-byte ones; docs/scaling.md, "Global bounds").
ENTRY_OVERHEAD = 150
#: At most this many histories are evicted or forgotten by one publish (a lowered bound is
#: reached over the following publishes instead of in one long script).
EVICT_PER_PUBLISH = 100

#: One publish on a history topic, atomically: the epoch (a new one when the history is missing:
#: never published, expired, evicted, flushed), the next offset, the stream entry with the ID
#: ``<offset>-0``, the PUBLISH of the envelope carrying "pos", the keys' time to live, and the
#: global bounds. Offset order is therefore the order of the pub/sub messages.
#: The registry (a sorted set: topic -> the time its keys expire, ms) and the sizes (a hash:
#: topic -> bytes: its envelopes + ENTRY_OVERHEAD each) hold every history topic, so the bounds
#: hold across processes: histories whose keys expired are forgotten first (not counted), then,
#: while there are ``max topics`` or more for a new topic, or more than ``max bytes`` in all, the
#: one that expires first (never this one) is evicted (counted); this topic alone over ``max
#: bytes`` loses its oldest entries. The stream is trimmed exactly to ``size`` (the entries
#: trimmed are read first, for their bytes).
#: KEYS: meta hash, stream, registry, sizes, info (hash: ``bytes`` in all, ``created`` and
#: ``evicted``, ms). ARGV: channel, envelope (a JSON object without "pos"), size, ttl ms, a fresh
#: epoch, topic, max topics, max bytes, key prefix. Returns {position, evicted for max topics,
#: evicted for max bytes}.
PUBLISH_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local size, ttl, topic = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[6]
local max_topics, max_bytes, prefix = tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9]
local OVERHEAD, BUDGET = %(overhead)d, %(budget)d
local work, by_topics, by_bytes = 0, 0, 0
local function forget(name)
  local b = tonumber(redis.call('HGET', KEYS[4], name) or '0')
  redis.call('HDEL', KEYS[4], name)
  redis.call('ZREM', KEYS[3], name)
  redis.call('DEL', prefix .. ':h:' .. name, prefix .. ':hm:' .. name)
  work = work + 1
  return tonumber(redis.call('HINCRBY', KEYS[5], 'bytes', 0 - b))
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. now, 'LIMIT', 0, 16)) do
  forget(name)
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  forget(topic)
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'created', now)
  redis.call('HSETNX', KEYS[5], 'created', now)
  while work < BUDGET and redis.call('ZCARD', KEYS[3]) >= max_topics do
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    forget(oldest)
    by_topics = by_topics + 1
  end
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local at = t[1] .. string.format('%%03d', math.floor(tonumber(t[2]) / 1000))
local pos = epoch .. ':' .. offset
local data = string.sub(ARGV[2], 1, -2) .. ',"pos":"' .. pos .. '"}'
redis.call('XADD', KEYS[2], offset .. '-0', 'at', at, 'd', data)
local delta = #data + OVERHEAD
local over = redis.call('XLEN', KEYS[2]) - size
if over > 0 then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)) do
    delta = delta - #e[2][4] - OVERHEAD
  end
  redis.call('XTRIM', KEYS[2], 'MAXLEN', size)
end
redis.call('HINCRBY', KEYS[4], topic, delta)
local total = tonumber(redis.call('HINCRBY', KEYS[5], 'bytes', delta))
redis.call('ZADD', KEYS[3], now + ttl, topic)
while total > max_bytes and work < BUDGET do
  local head = redis.call('ZRANGE', KEYS[3], 0, 1)
  local victim = head[1]
  if victim == topic then victim = head[2] end
  if not victim then break end
  total = forget(victim)
  by_bytes = by_bytes + 1
end
while total > max_bytes and work < BUDGET and redis.call('XLEN', KEYS[2]) > 1 do
  local e = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  redis.call('XDEL', KEYS[2], e[1])
  local freed = #e[2][4] + OVERHEAD
  redis.call('HINCRBY', KEYS[4], topic, 0 - freed)
  total = tonumber(redis.call('HINCRBY', KEYS[5], 'bytes', 0 - freed))
  work = work + 1
end
if by_topics + by_bytes > 0 then
  redis.call('HSET', KEYS[5], 'evicted', now + 1)   -- after every empty position given out until now
end
redis.call('PUBLISH', ARGV[1], data)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {pos, by_topics, by_bytes}
""" % {"overhead": ENTRY_OVERHEAD, "budget": EVICT_PER_PUBLISH}

#: What a client at ``since`` missed, without creating anything for the topic: its epoch (empty
#: when it has no history), last offset and creation time (ms), Redis's clock, the entries after
#: ``since`` when they may be recoverable, and since when the history store is intact (the info
#: hash's creation, created here when missing, or the last eviction).
#: KEYS: meta hash, stream, info. ARGV: since epoch, since offset, limit, "1" when ``since`` is an
#: empty position (entries from offset 1 may be wanted whatever the epoch).
RECOVER_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSETNX', KEYS[3], 'created', now)
local info = redis.call('HMGET', KEYS[3], 'created', 'evicted')
local intact = math.max(tonumber(info[1]), tonumber(info[2] or '0'))
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'created')
if not meta[1] then
  return {'', 0, 0, t[1], t[2], {}, tostring(intact)}
end
local epoch, last = meta[1], tonumber(meta[2])
local since = tonumber(ARGV[2])
local entries = {}
if (epoch == ARGV[1] or ARGV[4] == '1') and since < last and last - since <= tonumber(ARGV[3]) then
  entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', last - since)
end
return {epoch, last, meta[3] or '0', t[1], t[2], entries, tostring(intact)}
"""


def encode_envelope(origin: str, broadcast: Broadcast) -> bytes:
    """``{"v":1,"o":origin,"t":topic,"e":event,"p":payload,"ts":published_at[,"pos":position]}``.

    ``v`` and ``o`` come first, always in this order, so a process can recognise its own
    messages by a byte prefix without parsing them (see `RedisBroker._own_prefix`).
    """
    doc = {"v": ENVELOPE_VERSION, "o": origin, "t": broadcast.topic, "e": broadcast.event,
           "p": broadcast.payload, "ts": broadcast.published_at}
    if broadcast.position is not None:
        doc["pos"] = broadcast.position
    text = _dumps(doc)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate, from an escaped "\ud800" in a payload: written back escaped, as
        # protocol._dumps writes frames, so Redis gets what the memory broker delivers.
        return protocol._dumps(doc).encode("utf-8")


def decode_envelope(data: bytes):
    """Return ``(origin, Broadcast)``; raise ValueError for anything that is not a v1 envelope."""
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("envelope is not a JSON object")
    if doc.get("v") != ENVELOPE_VERSION:
        raise ValueError("unsupported envelope version %r" % (doc.get("v"),))
    origin, topic, event, payload = doc.get("o"), doc.get("t"), doc.get("e"), doc.get("p")
    ts, pos = doc.get("ts"), doc.get("pos")
    if not (isinstance(origin, str) and isinstance(topic, str) and topic and isinstance(event, str) and event
            and isinstance(payload, dict)):
        raise ValueError("envelope lacks origin, topic, event or payload")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        ts = None
    return origin, Broadcast(topic, event, payload, ts, pos if isinstance(pos, str) else None)


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
                  rand=random.random) -> float:
    """Capped exponential backoff with jitter in [50%, 100%] of the step (no thundering herd)."""
    step = min(cap, base * (2 ** min(attempt, 30)))
    return step * (0.5 + 0.5 * rand())


def _batches(items: List, size: int) -> Iterable[List]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _ttl_ms(ttl: float) -> int:
    return max(1, int(ttl * 1000))


def _fail_futures(futures: Iterable[asyncio.Future], reason: str) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(BrokerUnavailable(reason))


def _is_pong(resp) -> bool:
    # In subscribed mode PING answers [b"pong", b""]; with no subscription, +PONG.
    if isinstance(resp, (bytes, str)):
        return resp in (b"PONG", "PONG", True)
    return isinstance(resp, list) and len(resp) >= 1 and resp[0] in (b"pong", "pong")


class _Pending:
    """One publish waiting for the writer. ``history``: (meta, stream, registry, sizes, info key,
    size, ttl ms, topic, max topics, max bytes, key prefix) when it is kept in history. ``echo``:
    delivered here when Redis sends it back (a history topic: in offset order) rather than at the
    acknowledgement. ``group``: the _Pendings of one batch, sent in one MULTI/EXEC."""

    __slots__ = ("channel", "data", "broadcast", "future", "history", "echo", "group")

    def __init__(self, channel: bytes, data: bytes, broadcast: Broadcast, future: asyncio.Future,
                 history: Optional[tuple] = None, echo: bool = False):
        self.channel, self.data, self.broadcast, self.future = channel, data, broadcast, future
        self.history = history
        self.echo = echo or history is not None
        self.group: Optional[List["_Pending"]] = None

    def command(self, sha: bytes) -> tuple:
        if self.history is None:
            return (b"PUBLISH", self.channel, self.data)
        meta, stream, registry, sizes, info, size, ttl_ms, topic, max_topics, max_bytes, prefix = self.history
        return (b"EVALSHA", sha, 5, meta, stream, registry, sizes, info, self.channel, self.data, size, ttl_ms,
                new_epoch(os.urandom(EPOCH_BYTES)), topic, max_topics, max_bytes, prefix)


class RedisBroker(Broker):
    """The Redis pub/sub broker. Guarantee (details in the module docstring): a publish is either
    acknowledged by Redis or refused with BrokerUnavailable; the publishing process delivers
    locally exactly once; other processes receive at most once (nothing is replayed to a process
    while it reconnects); per-topic order is kept for each publishing process; a batch is one
    MULTI/EXEC. On history topics, positions come from Redis (the same on every process), every
    process delivers in offset order, and `recover` replays from the topic's Redis Stream
    whichever process asks. The history's global bounds hold for every process on the Redis.
    """

    name = "redis"

    def __init__(self, url: str, prefix: str = "pusherd", *, connect_timeout: float = CONNECT_TIMEOUT,
                 command_timeout: float = COMMAND_TIMEOUT, ping_interval: float = PING_INTERVAL,
                 backoff_base: float = BACKOFF_BASE, backoff_cap: float = BACKOFF_CAP,
                 max_pending: int = MAX_PENDING, history_rules: Rules = Rules(), max_recovery: int = 300,
                 max_topics: int = 10000, max_bytes: int = 64 * 1024 * 1024):
        self.url = url
        self.prefix = prefix
        self.origin = secrets.token_hex(8)
        self._own_prefix = ('{"v":%d,"o":"%s"' % (ENVELOPE_VERSION, self.origin)).encode()
        self._echo_origin = self.origin + ".echo"   # not skipped when it comes back (see _Pending.echo)
        self._channel_prefix = (prefix + ":t:").encode("utf-8")
        self.history_rules = history_rules
        self.max_recovery = max_recovery
        self._history_prefix = (prefix + ":h:").encode("utf-8")      # a Stream per history topic
        self._meta_prefix = (prefix + ":hm:").encode("utf-8")        # its epoch and last offset
        # Shared by every process: the history topics by expiry, their sizes, the totals.
        self._registry_key = (prefix + ":history:topics").encode("utf-8")
        self._sizes_key = (prefix + ":history:bytes").encode("utf-8")
        self._info_key = (prefix + ":history:info").encode("utf-8")
        self.max_topics, self.max_bytes = max_topics, max_bytes
        self.evictions = {LIMIT_TOPICS: 0, LIMIT_BYTES: 0}   # caused by this process's publishes
        self._publish_sha = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest().encode()
        self._pub_script_loaded = False     # SCRIPT LOAD sent on the current publish connection
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._ping_interval = ping_interval
        self._backoff = (backoff_base, backoff_cap)
        self._max_pending = max_pending
        # redis-py parses the URL (redis://, rediss://, unix://, db, password); its own retries
        # are off: reconnecting is this class's job.
        self._pool = redis.asyncio.ConnectionPool.from_url(
            url, socket_connect_timeout=connect_timeout, socket_timeout=command_timeout,
            retry=Retry(NoBackoff(), 0), client_name="pusherd-" + self.origin,
            protocol=2)  # RESP2: messages are plain replies (RESP3 would route them to a push handler)
        self._client = redis.asyncio.Redis(connection_pool=self._pool)   # history reads
        self._recover_script = self._client.register_script(RECOVER_SCRIPT)
        # Subscriptions confirmed by Redis (a PING barrier answered after their SUBSCRIBE), and
        # the joins waiting for one: see activate().
        self._confirmed: Set[str] = set()
        self._waiting: List[Tuple[str, asyncio.Future]] = []
        self._barriers: Dict[bytes, Tuple[List[str], List[asyncio.Future]]] = {}
        self._barrier_seq = 0
        self._seen: Dict[str, Tuple[str, int]] = {}   # history topic -> last (epoch, offset) delivered here
        self._deliver: Optional[Deliver] = None
        self._wanted: Set[str] = set()
        self._active: Set[str] = set()      # subscribed on the current connection
        self._sub = None                    # the subscriber connection, while healthy
        self._healthy = False
        self._closing = False
        self._tasks: List[asyncio.Task] = []
        self._first_attempt: Optional[asyncio.Event] = None
        self._sync_wake: Optional[asyncio.Event] = None
        self._pub = None
        self._generation = 0                # +1 per subscriber (re)connect
        self._pub_generation = -1           # the generation the publish connection belongs to
        self._queue: List[_Pending] = []
        self._inflight: List[_Pending] = []
        self._pub_wake: Optional[asyncio.Event] = None
        self._down_since: Optional[float] = None
        self._attempts = 0
        self.last_error = ""
        self.stats = {"published": 0, "received": 0, "own_skipped": 0, "bad_envelopes": 0,
                      "outages": 0, "reconnects": 0, "failed_attempts": 0, "barriers": 0,
                      "caught_up": 0, "duplicates": 0}

    # -- Broker interface -----------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        """Start the supervisor and the writer; wait for the first connection attempt only.

        If Redis is unreachable, start() still returns (after at most the connect timeout):
        pusherd serves its sockets and refuses publishes until the backplane is back.
        """
        self._deliver = deliver
        self._first_attempt = asyncio.Event()
        self._sync_wake = asyncio.Event()
        self._pub_wake = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._supervise()), asyncio.ensure_future(self._sync_forever()),
                       asyncio.ensure_future(self._write_forever())]
        try:
            await asyncio.wait_for(self._first_attempt.wait(), self._connect_timeout + self._command_timeout + 1)
        except asyncio.TimeoutError:
            pass

    async def publish(self, broadcast: Broadcast, client: bool = False) -> Optional[str]:
        self._admit(1)
        item = self._pending(broadcast, client)
        self._queue.append(item)
        self._pub_wake.set()
        await item.future
        return broadcast.position

    async def publish_batch(self, broadcasts) -> List[Optional[str]]:
        """Every broadcast is encoded before any is queued, and a batch of several goes out in
        one MULTI/EXEC within the writer's pipelined write: Redis runs all of it or none of it
        (a connection lost before EXEC: none; a command refused while queued, e.g. by an ACL:
        EXECABORT, none). Raises BrokerUnavailable when not everything was published. Redis does
        not roll back, so two cases publish part of a batch and still answer 503: a command that
        fails while EXEC runs it (out of memory under ``maxmemory``, a key of another type where
        pusherd keeps history), and a connection lost after EXEC was sent but before its answer
        came back (all of it may then be published). A publisher that retries on 503 then
        publishes those broadcasts again: duplicates, never a loss.
        """
        if len(broadcasts) == 1:
            return [await self.publish(broadcasts[0])]
        self._admit(len(broadcasts))
        # With a history topic in it, every item comes back through Redis, so that the batch is
        # delivered here in its order (history publishes are delivered when Redis echoes them).
        echo = bool(self.history_rules) and any(self.history_rules.rule_for(b.topic) is not None for b in broadcasts)
        group = [self._pending(b, False, echo) for b in broadcasts]
        for item in group:
            item.group = group
        self._queue.extend(group)
        self._pub_wake.set()
        await asyncio.wait([item.future for item in group])
        failed = [item.future.exception() for item in group if item.future.exception() is not None]
        if failed:
            raise BrokerUnavailable("%d of %d events published: %s" % (len(group) - len(failed), len(group),
                                                                        failed[0]),
                                    published=len(group) - len(failed), total=len(group))
        return [b.position for b in broadcasts]

    def _admit(self, count: int) -> None:
        if not self._healthy:
            raise BrokerUnavailable(self._unavailable())
        if len(self._queue) + count > self._max_pending:
            raise BrokerUnavailable("redis publish backlog full (%d)" % self._max_pending)

    def _pending(self, broadcast: Broadcast, client: bool, echo: bool = False) -> _Pending:
        future = asyncio.get_running_loop().create_future()
        broadcast.position = None    # on a history topic Redis assigns it (PUBLISH_SCRIPT)
        rule = self.history_rules.rule_for(broadcast.topic) if self.history_rules else None
        echo = echo or rule is not None
        # An envelope this process delivers when Redis echoes it must not look like its own.
        data = encode_envelope(self._echo_origin if echo else self.origin, broadcast)
        history = None
        if rule is not None and (not client or rule.client_pushes):
            key = broadcast.topic.encode("utf-8")
            history = (self._meta_prefix + key, self._history_prefix + key, self._registry_key, self._sizes_key,
                       self._info_key, rule.size, _ttl_ms(rule.ttl), key, self.max_topics, self.max_bytes,
                       self.prefix.encode("utf-8"))
        return _Pending(self.channel(broadcast.topic), data, broadcast, future, history, echo)

    def has_history(self, topic: str) -> bool:
        return self.history_rules.rule_for(topic) is not None

    def history_evictions(self) -> Dict[str, int]:
        return dict(self.evictions)

    async def recover(self, topic: str, since) -> Recovery:
        """Make this process's subscription to `topic` active, then read the stream after `since`.

        The caller holds the topic's live broadcasts from before this call (hub.hold), so every
        broadcast after the position returned here reaches it live: none falls between the
        stream read and the subscription. Raises BrokerUnavailable within about twice the
        command timeout when Redis is down or slow (the join is answered recovered: false).
        """
        rule = self.history_rules.rule_for(topic)
        if rule is None:
            return Recovery(False, None, ())
        try:
            return await asyncio.wait_for(self._recover(topic, since, rule), 2 * self._command_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise BrokerUnavailable("%s (history lookup: %s: %s)" % (self.describe(), type(exc).__name__, exc)) \
                from None

    async def _recover(self, topic: str, since, rule) -> Recovery:
        await self.activate(topic)
        recovery = await self._read_history(topic, since, rule)
        # The pub/sub messages up to the position read may still be on their way on the
        # subscriber connection: after this barrier they have been delivered (to the caller's
        # hold buffer, where the replay drops them), so none reaches the client live after its replay.
        await self.activate(topic, fresh=True)
        return recovery

    async def _read_history(self, topic: str, since, rule) -> Recovery:
        """RECOVER_SCRIPT, then `history.decide_history` on what is still within size and ttl."""
        parsed = parse_position(since) or ("", 0)
        # Epochs are ASCII: another epoch is never ours, and a lone surrogate in it could not be
        # sent to Redis at all (redis-py encodes arguments as strict UTF-8).
        epoch_arg = parsed[0] if parsed[0].isascii() else ""
        key = topic.encode("utf-8")
        limit = min(self.max_recovery, rule.size)
        epoch, last, created, secs, usecs, raw, intact = await self._recover_script(
            keys=[self._meta_prefix + key, self._history_prefix + key, self._info_key],
            args=[epoch_arg, parsed[1], limit, "1" if empty_since(since) is not None else "0"])
        epoch, last = epoch.decode(), int(last)
        now = int(secs) + int(usecs) / 1e6
        state = (epoch, last, int(created) / 1000.0) if epoch else None
        entries = []
        for entry_id, fields in raw:
            offset = int(entry_id.split(b"-", 1)[0])
            values = dict(zip(fields[::2], fields[1::2]))
            at = int(values[b"at"]) / 1000.0
            if offset <= last - rule.size or at < now - rule.ttl:
                continue    # overflowed (MAXLEN ~ keeps a little more than size) or expired
            _origin, b = decode_envelope(values[b"d"])
            entries.append(Entry(offset, at, b.event, b.payload))
        return decide_history(state, entries, since, now, rule.ttl, self.max_recovery, int(intact) / 1000.0)

    async def _catch_up(self) -> None:
        """After a reconnect, deliver from the history what history topics with local members
        missed while the subscriber connection was down, in order, before any live message
        (the listener has not read yet; the live copies of what is delivered here are then
        dropped by `_fresh`)."""
        for topic, (epoch, offset) in list(self._seen.items()):
            rule = self.history_rules.rule_for(topic)
            if rule is None or topic not in self._wanted:
                continue
            try:
                recovery = await asyncio.wait_for(self._read_history(topic, format_position(epoch, offset), rule),
                                                  self._command_timeout)
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                log.warning("broker: cannot read the history of %.200s after reconnecting (%s)", topic, exc)
                continue
            if not recovery.recovered:
                log.warning("broker: %.200s: broadcasts published while reconnecting are no longer in its "
                            "history (at %s, history at %s); members here missed them", topic,
                            format_position(epoch, offset), recovery.position)
                continue
            for entry in recovery.missed:
                broadcast = Broadcast(topic, entry.event, entry.payload, entry.at,
                                      format_position(recovery.epoch, entry.offset))
                if self._fresh(broadcast):
                    self.stats["caught_up"] += 1
                    self._safe_deliver(broadcast)

    def _fresh(self, broadcast: Broadcast) -> bool:
        """Remember the last position delivered per history topic; False for one already delivered."""
        parsed = parse_position(broadcast.position)
        if parsed is None:
            return True
        seen = self._seen.get(broadcast.topic)
        if seen is not None and seen[0] == parsed[0] and parsed[1] <= seen[1]:
            return False
        self._seen[broadcast.topic] = parsed
        return True

    def active(self, topic: str) -> bool:
        return topic in self._confirmed and topic in self._wanted

    async def activate(self, topic: str, fresh: bool = False) -> None:
        """Return once Redis confirmed this process's subscription to `topic` (already wanted).

        A ``PING`` barrier sent after the ``SUBSCRIBE`` on the subscriber connection: when its
        answer arrives, every message published afterwards, by any process, reaches this one.
        ``fresh``: a new barrier even when confirmed: every message Redis sent before now has
        been delivered when it returns.
        """
        if self.active(topic) and not fresh:
            return
        if not self._healthy:
            raise BrokerUnavailable(self._unavailable())
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((topic, future))
        self._sync_wake.set()
        await asyncio.wait_for(future, self._command_timeout)

    def subscribe(self, topic: str) -> None:
        self._wanted.add(topic)
        if self._sync_wake is not None:
            self._sync_wake.set()

    def unsubscribe(self, topic: str) -> None:
        self._wanted.discard(topic)
        self._seen.pop(topic, None)
        if self._sync_wake is not None:
            self._sync_wake.set()

    def healthy(self) -> bool:
        return self._healthy

    def describe(self) -> str:
        return mask_url(self.url)

    def presence_backplane(self, ttl: float = 15.0):
        """Presence across processes on this Redis (brokers/redis_presence.py: its own keys, channel
        and subscriber connection, from this broker's connection pool)."""
        from .redis_presence import RedisPresence
        return RedisPresence(self._pool, self.prefix, ttl, self._command_timeout, self._backoff, self.describe())

    def _unavailable(self) -> str:
        if self._closing:
            return "%s (broker closed)" % self.describe()
        return "%s (%s)" % (self.describe(), self.last_error or "connecting")

    async def close(self) -> None:
        self._closing = True
        self._healthy = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        self._fail(self._inflight + self._queue, "broker closed")
        self._queue, self._inflight = [], []
        self._forget_confirmations("broker closed")
        for conn in (self._sub, self._pub):
            if conn is not None:
                await self._drop(conn)
        self._sub = self._pub = None
        await self._pool.disconnect()

    # -- helpers --------------------------------------------------------------------------

    def channel(self, topic: str) -> bytes:
        return self._channel_prefix + topic.encode("utf-8")

    def _wants(self, topic: str) -> bool:
        """Has this process members on `topic`? (bench/redis_scaleout.py overrides the channel layout.)"""
        return topic in self._wanted

    def _connection(self):
        return self._pool.connection_class(**self._pool.connection_kwargs)

    @staticmethod
    async def _drop(conn) -> None:
        try:
            await conn.disconnect(nowait=True)
        except (RedisError, OSError, asyncio.TimeoutError):
            pass

    @staticmethod
    def _fail(items: Iterable[_Pending], reason: str) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(BrokerUnavailable(reason))

    def _safe_deliver(self, broadcast: Broadcast) -> None:
        try:
            self._deliver(broadcast)
        except Exception:  # one failing delivery must not kill the listener or the writer
            log.exception("local delivery failed for topic %.200s", broadcast.topic)

    # -- subscriber side ------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Connect, resubscribe, listen; on failure back off and start over. Runs until close()."""
        while not self._closing:
            conn = self._connection()
            try:
                await conn.connect()
                await self._resubscribe(conn)
                self._up(conn)
                if self._seen:
                    await self._catch_up()
                await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self._down(exc)
            finally:
                self._healthy = False
                self._sub = None
                self._forget_confirmations(self._unavailable())
                await self._drop(conn)
            self._first_attempt.set()
            await asyncio.sleep(backoff_delay(self._attempts - 1, *self._backoff))

    async def _resubscribe(self, conn) -> None:
        """Subscribe every wanted topic, then wait for a PING answer: after it, all are active."""
        topics = sorted(self._wanted)
        self._active = set(topics)
        for batch in _batches(topics, SUBSCRIBE_BATCH):
            await conn.send_command("SUBSCRIBE", *[self.channel(t) for t in batch], check_health=False)
        await conn.send_command("PING", check_health=False)
        deadline = time.monotonic() + self._command_timeout + 0.001 * len(topics)
        while True:
            left = deadline - time.monotonic()
            resp = await conn.read_response(timeout=max(left, 0.001)) if left > 0 else None
            if resp is None:
                raise asyncio.TimeoutError("no PING answer after resubscribing")
            if _is_pong(resp) and not (isinstance(resp, list) and len(resp) > 1 and resp[1]):
                self._confirmed = set(topics)
                return
            self._dispatch(resp)

    def _up(self, conn) -> None:
        self._sub = conn
        self._generation += 1   # a publish connection from before an outage is not trusted
        self._healthy = True
        if self._down_since is not None:
            self.stats["reconnects"] += 1
            log.warning("broker %s: connected again after %.1fs (%d attempts); resubscribed %d topics; "
                        "publishes accepted", self.describe(), time.monotonic() - self._down_since,
                        self._attempts, len(self._active))
        else:
            log.info("broker %s: connected, %d topics subscribed", self.describe(), len(self._active))
        self._down_since = None
        self._attempts = 0
        self._first_attempt.set()
        self._sync_wake.set()   # topics joined or left while resubscribing

    def _down(self, exc: BaseException) -> None:
        self.last_error = "%s: %s" % (type(exc).__name__, exc)
        self._attempts += 1
        self.stats["failed_attempts"] += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.stats["outages"] += 1
            log.warning("broker %s unavailable (%s); serving sockets, refusing publishes with 503, "
                        "reconnecting with backoff up to %gs", self.describe(), self.last_error, self._backoff[1])
        else:
            log.debug("broker %s: reconnect attempt %d failed (%s)", self.describe(), self._attempts,
                      self.last_error)

    async def _listen(self, conn) -> None:
        """Read until the connection fails (raises). Silence gets a PING; silence after it is death."""
        pinged = False
        while True:
            resp = await conn.read_response(timeout=self._ping_interval)
            if resp is None:
                if pinged:
                    raise asyncio.TimeoutError("no answer to PING within %.0fs" % self._ping_interval)
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            self._dispatch(resp)

    def _dispatch(self, resp) -> None:
        if isinstance(resp, list) and len(resp) == 2 and resp[0] == b"pong":
            self._barrier_answered(resp[1])
            return
        if isinstance(resp, bytes) and resp.startswith(b"sync:"):
            self._barrier_answered(resp)   # PING <token> without any subscription: a plain bulk reply
            return
        if not isinstance(resp, list) or len(resp) < 3 or resp[0] != b"message":
            return  # subscribe/unsubscribe confirmations
        data = resp[2]
        if data.startswith(self._own_prefix):
            # Already delivered locally when Redis acknowledged it (what this process delivers
            # when Redis echoes it carries another origin: see _Pending.echo).
            self.stats["own_skipped"] += 1
            return
        try:
            _origin, broadcast = decode_envelope(data)
        except ValueError as exc:
            self.stats["bad_envelopes"] += 1
            if self.stats["bad_envelopes"] == 1 or self.stats["bad_envelopes"] % 1000 == 0:
                log.warning("broker: dropped %d unreadable message(s) on %.200r: %s",
                            self.stats["bad_envelopes"], resp[1], exc)
            return
        if not self._wants(broadcast.topic):
            return  # arrived between the last local leave and the UNSUBSCRIBE
        if broadcast.position is not None and not self._fresh(broadcast):
            self.stats["duplicates"] += 1   # already delivered by _catch_up
            return
        self.stats["received"] += 1
        self._safe_deliver(broadcast)

    def _barrier_answered(self, token: bytes) -> None:
        barrier = self._barriers.pop(token, None)
        if barrier is None:
            return  # a keepalive PING
        topics, futures = barrier
        self._confirmed.update(t for t in topics if t in self._active)
        for future in futures:
            if not future.done():
                future.set_result(None)

    def _forget_confirmations(self, reason: str) -> None:
        """The subscriber connection is gone: nothing is confirmed, nobody waits for a barrier."""
        self._confirmed.clear()
        pending = [f for _, f in self._waiting]
        for _topics, futures in self._barriers.values():
            pending += futures
        self._waiting, self._barriers = [], {}
        _fail_futures(pending, reason)

    async def _sync_forever(self) -> None:
        """Bring the Redis subscriptions of the live connection in line with the wanted topics.

        New subscriptions, and joins waiting in activate(), get a ``PING sync:N`` barrier after
        the commands: its answer (see `_dispatch`) confirms them.
        """
        while True:
            await self._sync_wake.wait()
            self._sync_wake.clear()
            waiting, self._waiting = self._waiting, []
            conn, active = self._sub, self._active
            if conn is None or not self._healthy or not conn.is_connected:
                # the supervisor resubscribes everything when it reconnects
                _fail_futures([f for _, f in waiting], self._unavailable())
                continue
            add = sorted(self._wanted - active)
            drop = sorted(active - self._wanted)
            self._confirmed.difference_update(drop)
            try:
                for batch in _batches(add, SUBSCRIBE_BATCH):
                    active.update(batch)
                    await conn.send_command("SUBSCRIBE", *[self.channel(t) for t in batch], check_health=False)
                for batch in _batches(drop, SUBSCRIBE_BATCH):
                    active.difference_update(batch)
                    await conn.send_command("UNSUBSCRIBE", *[self.channel(t) for t in batch], check_health=False)
                if add or waiting:
                    self._barrier_seq += 1
                    token = b"sync:%d" % self._barrier_seq
                    self._barriers[token] = (add + [t for t, _ in waiting], [f for _, f in waiting])
                    self.stats["barriers"] += 1
                    await conn.send_command("PING", token, check_health=False)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                # The supervisor's read fails too and it reconnects, resubscribes and fails the waiters.
                log.debug("broker: subscription update failed (%s)", exc)
                _fail_futures([f for _, f in waiting], "subscription update failed")

    # -- publisher side -------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._pub_wake.wait()
            self._pub_wake.clear()
            while self._queue:
                self._inflight, self._queue = self._queue, []
                await self._flush(self._inflight)
                self._inflight = []

    async def _flush(self, batch: List[_Pending]) -> None:
        """PUBLISH a batch in one pipelined write on one connection (order kept), then read replies.

        The _Pendings of one publish_batch go out together between MULTI and EXEC (with a SCRIPT
        LOAD first inside it when they hold history publishes: a NOSCRIPT while EXEC runs would
        publish the rest of the batch).
        """
        if not self._healthy:
            self._fail(batch, self._unavailable())
            return
        if self._pub is not None and self._pub_generation != self._generation:
            await self._drop(self._pub)   # may be half-dead from before the outage: do not test it on an event
            self._pub = None
        if self._pub is None:
            self._pub = self._connection()
            self._pub_generation = self._generation
            self._pub_script_loaded = False
        conn = self._pub
        done = 0
        commands, units = [], []
        for item in batch:
            group = item.group
            if group is None:
                units.append((item,))
                commands.append(item.command(self._publish_sha))
            elif item is group[0]:
                load = any(p.history is not None for p in group)
                units.append(group)
                commands.append((b"MULTI",))
                if load:
                    commands.append((b"SCRIPT", b"LOAD", PUBLISH_SCRIPT))
                commands.extend(p.command(self._publish_sha) for p in group)
                commands.append((b"EXEC",))
        load = not self._pub_script_loaded and any(p.history is not None and p.group is None for p in batch)
        if load:   # the script cache may be empty (a new or restarted Redis): load it first, same write
            commands.insert(0, (b"SCRIPT", b"LOAD", PUBLISH_SCRIPT))
        try:
            await conn.connect()
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            if load:
                await conn.read_response()
                self._pub_script_loaded = True
            for unit in units:
                if unit[0].group is None:
                    item = unit[0]
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:  # this one command refused (e.g. ACL): the rest stand
                        done += 1
                        if isinstance(exc, NoScriptError):
                            self._pub_script_loaded = False   # SCRIPT FLUSH: reload with the next batch
                        self._refused(item, exc)
                        continue
                    done += 1
                    self._published(item, reply)
                else:
                    replies = await self._read_transaction(conn, unit)
                    done += len(unit)
                    for item, reply in zip(unit, replies):
                        if isinstance(reply, ResponseError):
                            self._refused(item, reply)
                        else:
                            self._published(item, reply)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            await self._drop(conn)
            self._pub = None
            log.info("broker %s: publish failed (%s); %d event(s) refused", self.describe(), exc, len(batch) - done)
            self._fail(batch[done:], "%s (%s: %s)" % (self.describe(), type(exc).__name__, exc))

    async def _read_transaction(self, conn, group: List[_Pending]) -> list:
        """The replies of MULTI [SCRIPT LOAD] commands EXEC: one per command (a ResponseError for
        one refused), every one the EXECABORT error when Redis discarded the transaction."""
        await conn.read_response()                      # MULTI: +OK
        if any(p.history is not None for p in group):
            await conn.read_response()                  # SCRIPT LOAD: +QUEUED
        for _ in group:
            try:
                await conn.read_response()              # +QUEUED, or an error: EXEC then aborts
            except ResponseError:
                pass
        try:
            replies = await conn.read_response()
        except ResponseError as exc:                   # EXECABORT: nothing was run
            return [exc] * len(group)
        if any(p.history is not None for p in group):
            replies = replies[1:]                       # the SCRIPT LOAD's sha
            self._pub_script_loaded = True
        return replies

    def _published(self, item: _Pending, reply) -> None:
        self.stats["published"] += 1
        if item.history is not None:
            position, by_topics, by_bytes = reply
            item.broadcast.position = position.decode("ascii")
            if by_topics or by_bytes:
                self._evicted(item.broadcast.topic, int(by_topics), int(by_bytes))
        if not item.echo:
            self._safe_deliver(item.broadcast)
        # else: delivered through Redis like everywhere else, in offset order (see _dispatch).
        if not item.future.done():
            item.future.set_result(None)

    @staticmethod
    def _refused(item: _Pending, exc: Exception) -> None:
        if not item.future.done():
            item.future.set_exception(BrokerUnavailable("redis refused the publish: %s" % exc))

    def _evicted(self, topic: str, by_topics: int, by_bytes: int) -> None:
        before = self.evictions[LIMIT_TOPICS] + self.evictions[LIMIT_BYTES]
        self.evictions[LIMIT_TOPICS] += by_topics
        self.evictions[LIMIT_BYTES] += by_bytes
        log_evictions(before, self.evictions, topic)

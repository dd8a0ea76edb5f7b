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

Topologies: one Redis, Sentinel, Cluster
----------------------------------------
The connections to one node (subscriber, barriers, writer) are a `_Lane` under that supervisor;
what differs is how a lane finds its node. The guarantee above holds for all three, and the
contract suite runs on all three.

* ``redis://``, ``rediss://``, ``unix://``: one lane, the one server.
* ``redis+sentinel://[user:pw@]h1:26379,h2:26379/<master name>[/db][?sentinel_password=...]``: one
  lane whose node is asked of the sentinels on every (re)connect (the first that answers) and
  must answer ``ROLE`` ``master``. A sentinel's ``+switch-master`` drops the old master's
  connections at once. A plain publish is `GUARDED_PUBLISH_SCRIPT`, refused by a read-only
  replica (a demoted master) instead of answering 0 and reaching nobody; a ``READONLY`` answer
  (to it or to the history script) is a 503 and makes the lane find the master again. While
  there is no master, publishes are refused (503) and ``healthy()`` is false; once one is
  promoted, the lane resubscribes, waits for its barrier and catches history topics up, as
  after any reconnect.
* ``redis+cluster://[user:pw@]h1:7000,h2:7001,...``: a lane per master of the slot map (``CLUSTER
  SLOTS``), each topic on the lane owning its channel's slot, sharded pub/sub (``SSUBSCRIBE``,
  ``SPUBLISH``): an event goes to that master only. Every key and the channel of a topic carry
  one of CLUSTER_BUCKETS hash tags (`RedisBroker.tag`), so a history publish is one script on
  one slot, atomic as on one Redis; the global bounds are kept per bucket (``max / buckets``
  each), and a batch is one MULTI/EXEC per bucket. The map is fetched again every MAP_REFRESH,
  on ``MOVED`` (a publish answered ``MOVED`` was not run and is sent where it says), on an
  unasked ``SUNSUBSCRIBE`` (a slot moved), and every MAP_RETRY while a lane is down: a replica
  promoted in place of a dead master becomes a new lane, which subscribes the topics that moved
  to it and catches their histories up. ``ASK`` (a slot migrating) is refused (503). Publishes
  on a topic whose master is down are refused; the other masters' topics are served;
  ``healthy()`` is true only when every master is reachable.

Redis replicates asynchronously: a failover may lose writes the old master acknowledged last.
`_catch_up` then finds a history behind what this process delivered and follows it (the next
offsets are new broadcasts), rather than dropping them as duplicates.
"""

import asyncio
import collections
import bisect
import hashlib
import json
import logging
import os
import secrets
import time
import zlib
from typing import Dict, Iterable, List, Optional, Set, Tuple

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError

from ..core.broadcast import Broadcast
from .base import Broker, Deliver, backoff_delay, log_evictions
from ..config.values import mask_url, multi_host_url
from ..core import protocol
from ..core.errors import BrokerUnavailable, StartupError
from ..core.history import (LIMIT_BYTES, LIMIT_TOPICS, Entry, Recovery, Rules, decide_history, empty_since,
                           EPOCH_BYTES, format_position, new_epoch, parse_position)

log = logging.getLogger("pusherd.broker")

#: The events the broker counts (exported as pusherd_broker_events_total{event}).
BROKER_EVENTS = ("published", "received", "own_skipped", "bad_envelopes", "outages", "reconnects",
                 "failed_attempts", "barriers", "caught_up", "duplicates", "rolled_back", "failovers",
                 "slot_moves", "redirects")

ENVELOPE_VERSION = 1
CONNECT_TIMEOUT = 2.0       # seconds for TCP connect + handshake
COMMAND_TIMEOUT = 2.0       # a PUBLISH not acknowledged within this is refused (503)
PING_INTERVAL = 5.0         # subscriber silent this long gets a PING; twice as long = dead
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
MAX_PENDING = 10000         # publishes queued for the writer before refusing (bounded memory)
SUBSCRIBE_BATCH = 500       # channels per SUBSCRIBE command when resubscribing
CLUSTER_BUCKETS = 64        # hash tags a cluster's topics are spread over (see RedisBroker.tag)
MAP_REFRESH = 10.0          # a cluster's slot map is fetched again this often while all is well
MAP_RETRY = 0.5             # ... and this often while a shard is down (a failover under way)

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
#: epoch, topic, max topics, max bytes, the stream keys' prefix and the meta keys' prefix (a
#: topic's keys are these + the topic). Returns {position, evicted for max topics, evicted for
#: max bytes}. On a cluster every key and the channel share one slot (see `RedisBroker.tag`) and
#: the message goes out with SPUBLISH (`CLUSTER_PUBLISH_SCRIPT`).
PUBLISH_SCRIPT_TEMPLATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local size, ttl, topic = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[6]
local max_topics, max_bytes = tonumber(ARGV[7]), tonumber(ARGV[8])
local OVERHEAD, BUDGET = %(overhead)d, %(budget)d
local work, by_topics, by_bytes = 0, 0, 0
local function forget(name)
  local b = tonumber(redis.call('HGET', KEYS[4], name) or '0')
  redis.call('HDEL', KEYS[4], name)
  redis.call('ZREM', KEYS[3], name)
  redis.call('DEL', ARGV[9] .. name, ARGV[10] .. name)
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
redis.call('%(publish)s', ARGV[1], data)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {pos, by_topics, by_bytes}
"""
PUBLISH_SCRIPT = PUBLISH_SCRIPT_TEMPLATE % {"overhead": ENTRY_OVERHEAD, "budget": EVICT_PER_PUBLISH, "publish": "PUBLISH"}
CLUSTER_PUBLISH_SCRIPT = PUBLISH_SCRIPT_TEMPLATE % {"overhead": ENTRY_OVERHEAD, "budget": EVICT_PER_PUBLISH,
                                                    "publish": "SPUBLISH"}

#: A plain publish behind Sentinel: a replica refuses the DEL (READONLY) before anything is
#: published, where a plain PUBLISH would answer 0 and reach only the replica's own subscribers
#: (a node demoted by a failover that a publisher has not noticed yet). The key never exists: on
#: the master the DEL changes nothing and is not replicated. KEYS: the guard key. ARGV: channel,
#: envelope.
GUARDED_PUBLISH_SCRIPT = """
redis.call('DEL', KEYS[1])
return redis.call('PUBLISH', ARGV[1], ARGV[2])
"""

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


def _batches(items: List, size: int) -> Iterable[List]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


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
    """One publish waiting for a lane's writer. ``history``: (meta, stream, registry, sizes, info
    key, size, ttl ms, topic, max topics, max bytes, stream key prefix, meta key prefix) when it is
    kept in history. ``echo``: delivered here when Redis sends it back (a history topic: in offset
    order) rather than at the acknowledgement. ``group``: the _Pendings of one batch (on a
    cluster: of one slot) sent in one MULTI/EXEC. ``script``: the script it runs (None: a plain
    PUBLISH or SPUBLISH). ``redirects``: MOVED answers followed."""

    __slots__ = ("channel", "data", "broadcast", "future", "history", "echo", "group", "script", "redirects")

    def __init__(self, channel: bytes, data: bytes, broadcast: Broadcast, future: asyncio.Future,
                 history: Optional[tuple] = None, echo: bool = False, script: Optional[str] = None):
        self.channel, self.data, self.broadcast, self.future = channel, data, broadcast, future
        self.history = history
        self.echo = echo or history is not None
        self.group: Optional[List["_Pending"]] = None
        self.script = "history" if history is not None else script
        self.redirects = 0


Address = Tuple[str, int]


def _moved(exc: BaseException) -> Optional[Address]:
    """The node named by a ``MOVED <slot> <host>:<port>`` error, else None (redis-py 5.0 raises
    it as a plain ResponseError "MOVED ...", later ones as MovedError without the word)."""
    text = str(exc)
    if type(exc).__name__ == "MovedError":
        text = "MOVED " + text
    if not isinstance(exc, ResponseError) or not text.startswith("MOVED "):
        return None
    host, _, port = text.split(" ")[-1].rpartition(":")
    return (host, int(port)) if port.isdigit() else None


def _moved_slot(exc: BaseException) -> Optional[int]:
    if _moved(exc) is None:
        return None
    words = str(exc).split(" ")
    slot = words[1] if words[0] == "MOVED" else words[0]
    return int(slot) if slot.isdigit() else None


class _Lane:
    """The connections to one Redis node under one supervisor: the subscriber (subscriptions,
    PING barriers, the listener) and the pipelined publisher. A single Redis and a Sentinel
    setup have one lane (behind Sentinel it finds the current master on every connect); a
    cluster has one per master, each holding the topics whose slots it owns. What is common to
    every lane (envelopes, history, catch-up, positions seen) stays in the RedisBroker."""

    def __init__(self, broker: "RedisBroker", address: Optional[Address] = None):
        self.b = broker
        self.address = address              # a cluster master; None: found by broker._open
        self.connected_to: Optional[Address] = None
        self.client = None                  # history reads (redis.asyncio.Redis) at connected_to
        self.client_address: Optional[Address] = None
        self.wanted: Set[str] = set()       # topics this lane must subscribe
        self.active: Set[str] = set()       # subscribed on the current connection
        self.channels: Dict[bytes, str] = {}  # channel -> topic, for what Redis sends back
        self.confirmed: Set[str] = set()
        self.waiting: List[Tuple[str, asyncio.Future]] = []
        self.barriers: Dict[bytes, Tuple[List[str], List[Tuple[str, asyncio.Future]]]] = {}
        self.sub = None
        self.healthy = False
        self.closing = False
        self.tasks: List[asyncio.Task] = []
        self.first_attempt = asyncio.Event()
        self.sync_wake = asyncio.Event()
        self.pub_wake = asyncio.Event()
        self.retry_wake = asyncio.Event()
        self.pub = None
        self.generation = 0                 # +1 per subscriber (re)connect
        self.pub_generation = -1            # the generation the publish connection belongs to
        self.pub_loaded: Set[str] = set()   # scripts loaded on the current publish connection
        self.queue: List[_Pending] = []
        self.inflight: List[_Pending] = []
        self.down_since: Optional[float] = None
        self.attempts = 0
        self.last_error = ""

    @property
    def where(self) -> str:
        if self.address is not None:
            return " shard %s:%d" % self.address
        if self.b.kind == "sentinel" and self.connected_to is not None:
            return " (master %s:%d)" % self.connected_to
        return ""

    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self.supervise()), asyncio.ensure_future(self.sync_forever()),
                      asyncio.ensure_future(self.write_forever())]

    async def close(self, reason: str = "broker closed") -> None:
        self.closing = True
        self.healthy = False
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.tasks = []
        _fail_futures([p.future for p in self.inflight + self.queue], reason)
        self.queue, self.inflight = [], []
        self.forget_confirmations(reason)
        for conn in (self.sub, self.pub):
            if conn is not None:
                await _drop(conn)
        self.sub = self.pub = None
        if self.client is not None and self.client is not self.b._client:
            await self.client.connection_pool.disconnect()

    def unavailable(self) -> str:
        if self.closing or self.b._closing:
            return "%s (broker closed)" % self.b.describe()
        return "%s%s (%s)" % (self.b.describe(), self.where, self.last_error or "connecting")

    def want(self, topic: str) -> None:
        self.wanted.add(topic)
        self.sync_wake.set()

    def unwant(self, topic: str) -> None:
        self.wanted.discard(topic)
        self.confirmed.discard(topic)
        self.sync_wake.set()

    def force_reconnect(self, reason: str) -> None:
        """Drop the connections now (the node became a replica, the master moved): the
        supervisor finds the right node again; publishes are refused meanwhile."""
        if self.closing:
            return
        self.last_error = reason
        self.healthy = False
        for conn in (self.sub, self.pub):
            if conn is not None:
                asyncio.ensure_future(_drop(conn))   # the listener's read fails: the supervisor reconnects
        self.pub = None
        self.retry_wake.set()

    def admit(self, count: int) -> None:
        if not self.healthy:
            raise BrokerUnavailable(self.unavailable())
        if len(self.queue) + count > self.b._max_pending:
            raise BrokerUnavailable("redis publish backlog full (%d)" % self.b._max_pending)

    def enqueue(self, items: List[_Pending]) -> None:
        self.queue.extend(items)
        self.pub_wake.set()

    # -- subscriber side ------------------------------------------------------------------

    async def supervise(self) -> None:
        """Connect, resubscribe, listen; on failure back off and start over. Runs until closed."""
        while not self.closing:
            conn = None
            try:
                conn = await self.b._open(self)
                await self.resubscribe(conn)
                self.up(conn)
                if self.b._seen:
                    await self.b._catch_up(self)
                await self.listen(conn)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self.down(exc)
            finally:
                self.healthy = False
                self.sub = None
                self.forget_confirmations(self.unavailable())
                if conn is not None:
                    await _drop(conn)
            self.first_attempt.set()
            self.b._lane_failed(self)
            self.retry_wake.clear()
            try:
                await asyncio.wait_for(self.retry_wake.wait(), backoff_delay(self.attempts - 1, *self.b._backoff))
            except asyncio.TimeoutError:
                pass

    async def resubscribe(self, conn) -> None:
        """Subscribe every wanted topic, then wait for a PING answer: after it, all are active."""
        topics = sorted(self.wanted)
        self.active = set(topics)
        self.channels = {self.b.channel(t): t for t in topics}
        for batch in self.b._subscribe_batches(topics):
            await conn.send_command(self.b._sub_cmd, *[self.b.channel(t) for t in batch], check_health=False)
        await conn.send_command("PING", check_health=False)
        deadline = time.monotonic() + self.b._command_timeout + 0.001 * len(topics)
        while True:
            left = deadline - time.monotonic()
            try:
                resp = await conn.read_response(timeout=max(left, 0.001)) if left > 0 else None
            except ResponseError as exc:
                if self.moved_subscription(exc):
                    continue
                raise
            if resp is None:
                raise asyncio.TimeoutError("no PING answer after resubscribing")
            if _is_pong(resp) and not (isinstance(resp, list) and len(resp) > 1 and resp[1]):
                self.confirmed = set(topics)
                return
            self.dispatch(resp)

    def up(self, conn) -> None:
        self.sub = conn
        self.generation += 1   # a publish connection from before an outage is not trusted
        self.healthy = True
        b = self.b
        if self.down_since is not None:
            b.stats["reconnects"] += 1
            log.warning("broker %s%s: connected again after %.1fs (%d attempts); resubscribed %d topics; "
                        "publishes accepted", b.describe(), self.where, time.monotonic() - self.down_since,
                        self.attempts, len(self.active))
        else:
            log.info("broker %s%s: connected, %d topics subscribed", b.describe(), self.where, len(self.active))
        self.down_since = None
        self.attempts = 0
        self.first_attempt.set()
        self.sync_wake.set()   # topics joined or left while resubscribing

    def down(self, exc: BaseException) -> None:
        self.last_error = "%s: %s" % (type(exc).__name__, exc)
        self.attempts += 1
        b = self.b
        b.stats["failed_attempts"] += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            b.stats["outages"] += 1
            log.warning("broker %s%s unavailable (%s); serving sockets, refusing publishes with 503, "
                        "reconnecting with backoff up to %gs", b.describe(), self.where, self.last_error,
                        b._backoff[1])
        else:
            log.debug("broker %s%s: reconnect attempt %d failed (%s)", b.describe(), self.where, self.attempts,
                      self.last_error)

    async def listen(self, conn) -> None:
        """Read until the connection fails (raises). Silence gets a PING; silence after it is death."""
        pinged = False
        interval = self.b._ping_interval
        while True:
            try:
                resp = await conn.read_response(timeout=interval)
            except ResponseError as exc:
                if self.moved_subscription(exc):
                    continue
                raise
            if resp is None:
                if pinged:
                    raise asyncio.TimeoutError("no answer to PING within %.0fs" % interval)
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            self.dispatch(resp)

    def dispatch(self, resp) -> None:
        if isinstance(resp, list) and len(resp) == 2 and resp[0] == b"pong":
            self.barrier_answered(resp[1])
            return
        if isinstance(resp, bytes) and resp.startswith(b"sync:"):
            self.barrier_answered(resp)   # PING <token> without any subscription: a plain bulk reply
            return
        if not isinstance(resp, list) or len(resp) < 3:
            return
        kind = resp[0]
        if kind == b"message" or kind == b"smessage":
            self.b._on_message(resp[1], resp[2])
        elif kind == b"sunsubscribe":
            # Not asked for when the topic is still active here: the slot moved (resharding, a
            # failover). Subscribe again where the slot map now says.
            topic = self.channels.get(resp[1])
            if topic is not None and topic in self.active:
                self.active.discard(topic)
                self.confirmed.discard(topic)
                self.b.stats["slot_moves"] += 1
                self.b._refresh_map()
                self.sync_wake.set()
        # else: subscribe/unsubscribe confirmations

    def moved_subscription(self, exc: ResponseError) -> bool:
        """An SSUBSCRIBE answered MOVED (the slot moved before the map said so): forget the
        topics of that slot here and fetch the map; they are subscribed where it says. False for
        any other error."""
        slot = _moved_slot(exc)
        if slot is None:
            return False
        for topic in [t for t in self.active if key_slot(self.b.channel(t)) == slot]:
            self.active.discard(topic)
            self.confirmed.discard(topic)
        self.b.stats["slot_moves"] += 1
        self.b._refresh_map()
        self.sync_wake.set()
        return True

    def barrier_answered(self, token: bytes) -> None:
        barrier = self.barriers.pop(token, None)
        if barrier is None:
            return  # a keepalive PING
        topics, waiting = barrier
        self.confirmed.update(t for t in topics if t in self.active)
        for topic, future in waiting:
            if topic in self.b._wanted and topic not in self.active and not future.done():
                # Its SSUBSCRIBE was answered MOVED, or its slot moved to another lane: wait for
                # a barrier on the lane that holds it now (or time out), never return unsubscribed.
                lane = self.b._lane_or_none(topic) or self
                lane.waiting.append((topic, future))
                lane.sync_wake.set()
            elif not future.done():
                future.set_result(None)

    def forget_confirmations(self, reason: str) -> None:
        """The subscriber connection is gone: nothing is confirmed, nobody waits for a barrier."""
        self.confirmed.clear()
        pending = [f for _, f in self.waiting]
        for _topics, waiting in self.barriers.values():
            pending += [f for _, f in waiting]
        self.waiting, self.barriers = [], {}
        _fail_futures(pending, reason)

    async def activate(self, topic: str, fresh: bool) -> None:
        if topic in self.confirmed and topic in self.wanted and not fresh:
            return
        if not self.healthy:
            raise BrokerUnavailable(self.unavailable())
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((topic, future))
        self.sync_wake.set()
        await asyncio.wait_for(future, self.b._command_timeout)

    async def sync_forever(self) -> None:
        """Bring the Redis subscriptions of the live connection in line with the wanted topics.

        New subscriptions, and joins waiting in activate(), get a ``PING sync:N`` barrier after
        the commands: its answer (see `dispatch`) confirms them.
        """
        b = self.b
        while True:
            await self.sync_wake.wait()
            self.sync_wake.clear()
            waiting, self.waiting = self.waiting, []
            conn, active = self.sub, self.active
            if conn is None or not self.healthy or not conn.is_connected:
                # the supervisor resubscribes everything when it reconnects
                _fail_futures([f for _, f in waiting], self.unavailable())
                continue
            add = sorted(self.wanted - active)
            drop = sorted(active - self.wanted)
            self.confirmed.difference_update(drop)
            try:
                for batch in b._subscribe_batches(add):
                    active.update(batch)
                    for t in batch:
                        self.channels[b.channel(t)] = t
                    await conn.send_command(b._sub_cmd, *[b.channel(t) for t in batch], check_health=False)
                for batch in b._subscribe_batches(drop):
                    active.difference_update(batch)
                    await conn.send_command(b._unsub_cmd, *[b.channel(t) for t in batch], check_health=False)
                if add or waiting:
                    b._barrier_seq += 1
                    token = b"sync:%d" % b._barrier_seq
                    self.barriers[token] = (add + [t for t, _ in waiting], waiting)
                    b.stats["barriers"] += 1
                    await conn.send_command("PING", token, check_health=False)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                # The supervisor's read fails too and it reconnects, resubscribes and fails the waiters.
                log.debug("broker: subscription update failed (%s)", exc)
                _fail_futures([f for _, f in waiting], "subscription update failed")

    # -- publisher side -------------------------------------------------------------------

    async def write_forever(self) -> None:
        while True:
            await self.pub_wake.wait()
            self.pub_wake.clear()
            while self.queue:
                self.inflight, self.queue = self.queue, []
                await self.flush(self.inflight)
                self.inflight = []

    async def flush(self, batch: List[_Pending]) -> None:
        """Publish a batch in one pipelined write on one connection (order kept), then read replies.

        The _Pendings of one publish_batch go out together between MULTI and EXEC (with a SCRIPT
        LOAD first inside it for each script they run: a NOSCRIPT while EXEC runs would publish
        the rest of the batch).
        """
        b = self.b
        if not self.healthy:
            _fail_futures([p.future for p in batch], self.unavailable())
            return
        if self.pub is not None and self.pub_generation != self.generation:
            await _drop(self.pub)   # may be half-dead from before the outage: do not test it on an event
            self.pub = None
        if self.pub is None:
            self.pub = b._connection(self.connected_to)
            self.pub_generation = self.generation
            self.pub_loaded = set()
        conn = self.pub
        done = 0
        commands, units = [], []
        for item in batch:
            group = item.group
            if group is None:
                units.append((item,))
                commands.append(b._command(item))
            elif item is group[0]:
                units.append(group)
                commands.append((b"MULTI",))
                for name in _scripts_of(group):
                    commands.append((b"SCRIPT", b"LOAD", b._scripts[name][0]))
                commands.extend(b._command(p) for p in group)
                commands.append((b"EXEC",))
        # The script cache may be empty (a new, restarted or promoted Redis): load first, same write.
        load = [name for name in _scripts_of([p for p in batch if p.group is None]) if name not in self.pub_loaded]
        commands[0:0] = [(b"SCRIPT", b"LOAD", b._scripts[name][0]) for name in load]
        try:
            await conn.connect()
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            for name in load:
                await conn.read_response()
                self.pub_loaded.add(name)
            for unit in units:
                if unit[0].group is None:
                    item = unit[0]
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:  # this one command refused (e.g. ACL): the rest stand
                        done += 1
                        if isinstance(exc, NoScriptError):
                            self.pub_loaded.clear()   # SCRIPT FLUSH: reload with the next batch
                        self.refused(item, exc)
                        continue
                    done += 1
                    b._published(item, reply)
                else:
                    replies = await self.read_transaction(conn, unit)
                    done += len(unit)
                    for item, reply in zip(unit, replies):
                        if isinstance(reply, ResponseError):
                            self.refused(item, reply)
                        else:
                            b._published(item, reply)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            await _drop(conn)
            self.pub = None
            log.info("broker %s%s: publish failed (%s); %d event(s) refused", b.describe(), self.where, exc,
                     len(batch) - done)
            _fail_futures([p.future for p in batch[done:]], "%s%s (%s: %s)" % (b.describe(), self.where,
                                                                               type(exc).__name__, exc))

    async def read_transaction(self, conn, group: List[_Pending]) -> list:
        """The replies of MULTI [SCRIPT LOAD...] commands EXEC: one per command (a ResponseError
        for one refused), every one the EXECABORT error when Redis discarded the transaction
        (with the first refusal's text: a MOVED is followed)."""
        loads = _scripts_of(group)
        await conn.read_response()                      # MULTI: +OK
        for _ in loads:
            await conn.read_response()                  # SCRIPT LOAD: +QUEUED
        queued_error = None
        for _ in group:
            try:
                await conn.read_response()              # +QUEUED, or an error: EXEC then aborts
            except ResponseError as exc:
                queued_error = queued_error or exc
        try:
            replies = await conn.read_response()
        except ResponseError as exc:                   # EXECABORT: nothing was run
            return [queued_error if queued_error is not None and _moved(queued_error) else exc] * len(group)
        if loads:
            replies = replies[len(loads):]              # the SCRIPT LOADs' shas
            self.pub_loaded.update(loads)
        return replies

    def refused(self, item: _Pending, exc: Exception) -> None:
        if isinstance(exc, ReadOnlyError) or str(exc).startswith("READONLY"):
            # A master demoted to a replica under our feet (Sentinel failover): nothing was
            # published; find the master again.
            self.force_reconnect("%s is a read-only replica now" % (self.where.strip() or "the node"))
        elif _moved(exc) is not None and item.group is None and item.redirects < 2:
            # Nothing was run: the slot lives elsewhere now. Send it there (not for a batch: its
            # other slots may have been published already).
            item.redirects += 1
            self.b._redirect(item, _moved(exc))
            return
        elif _moved(exc) is not None:
            self.b._refresh_map()
        if not item.future.done():
            item.future.set_exception(BrokerUnavailable("redis refused the publish: %s" % exc))


def _scripts_of(items: Iterable[_Pending]) -> List[str]:
    return sorted({p.script for p in items if p.script is not None})


async def _drop(conn) -> None:
    try:
        await conn.disconnect(nowait=True)
    except (RedisError, OSError, asyncio.TimeoutError):
        pass


class RedisBroker(Broker):
    """The Redis pub/sub broker: a single Redis (redis://, rediss://, unix://), a master found
    through Sentinel (redis+sentinel://) or a Redis Cluster with sharded pub/sub
    (redis+cluster://). Guarantee (details in the module docstring), the same for all three: a
    publish is either acknowledged by the Redis that owns its channel or refused with
    BrokerUnavailable; the publishing process delivers locally exactly once; other processes
    receive at most once (nothing is replayed to a process while it reconnects, except from a
    history); per-topic order is kept for each publishing process; a batch is one MULTI/EXEC
    (on a cluster: one per slot). On history topics, positions come from Redis (the same on every
    process), every process delivers in offset order, and `recover` replays from the topic's Redis
    Stream whichever process asks. The history's global bounds hold for every process on the
    Redis (on a cluster: per slot bucket, see `tag`).
    """

    name = "redis"

    def __init__(self, url: str, prefix: str = "pusherd", *, stats=None, connect_timeout: float = CONNECT_TIMEOUT,
                 command_timeout: float = COMMAND_TIMEOUT, ping_interval: float = PING_INTERVAL,
                 backoff_base: float = BACKOFF_BASE, backoff_cap: float = BACKOFF_CAP,
                 max_pending: int = MAX_PENDING, history_rules: Rules = Rules(), max_recovery: int = 300,
                 max_topics: int = 10000, max_bytes: int = 64 * 1024 * 1024,
                 map_refresh: float = MAP_REFRESH):
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
        self._guard_key = (prefix + ":replica-guard").encode("utf-8")   # never exists (GUARDED_PUBLISH_SCRIPT)
        self.max_topics, self.max_bytes = max_topics, max_bytes
        self.evictions = {LIMIT_TOPICS: 0, LIMIT_BYTES: 0}   # caused by this process's publishes
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._ping_interval = ping_interval
        self._backoff = (backoff_base, backoff_cap)
        self._max_pending = max_pending
        self._map_refresh = map_refresh
        self.kind = "single"
        common = dict(socket_connect_timeout=connect_timeout, socket_timeout=command_timeout,
                      retry=Retry(NoBackoff(), 0), client_name="pusherd-" + self.origin,
                      protocol=2)  # RESP2: messages are plain replies (RESP3 would route them to a push handler)
        if url.lower().startswith(("redis+sentinel://", "redis+cluster://")):
            parsed = multi_host_url(url)
            self.kind = "sentinel" if parsed.scheme == "redis+sentinel" else "cluster"
            self._seeds: List[Address] = parsed.hosts
            self._service = parsed.service
            self._node_kwargs = dict(common, username=parsed.username, password=parsed.password, db=parsed.db)
            self._sentinel_kwargs = dict(common, username=parsed.query.get("sentinel_username"),
                                         password=parsed.query.get("sentinel_password"))
            # The first lane's pool is a placeholder until a node is found; redis-py parses nothing.
            self._pool = redis.asyncio.ConnectionPool(**self._node_kwargs)
        else:
            # redis-py parses the URL (redis://, rediss://, unix://, db, password); its own retries
            # are off: reconnecting is this class's job.
            self._pool = redis.asyncio.ConnectionPool.from_url(url, **common)
            self._node_kwargs = None
        if self.kind == "cluster" and ("{" in prefix or "}" in prefix):
            raise StartupError("broker_prefix: %r may not contain '{' or '}' on a Redis Cluster (they would "
                               "decide the hash slot of every key)" % prefix)
        self._client = redis.asyncio.Redis(connection_pool=self._pool)   # history reads (single Redis)
        self._recover_script = self._client.register_script(RECOVER_SCRIPT)
        publish_script = CLUSTER_PUBLISH_SCRIPT if self.kind == "cluster" else PUBLISH_SCRIPT
        self._scripts = {"history": (publish_script, _sha(publish_script)),
                         "guard": (GUARDED_PUBLISH_SCRIPT, _sha(GUARDED_PUBLISH_SCRIPT))}
        self._publish_sha = self._scripts["history"][1]
        self._pub_cmd = b"SPUBLISH" if self.kind == "cluster" else b"PUBLISH"
        self._sub_cmd = "SSUBSCRIBE" if self.kind == "cluster" else "SUBSCRIBE"
        self._unsub_cmd = "SUNSUBSCRIBE" if self.kind == "cluster" else "UNSUBSCRIBE"
        self._plain_script = "guard" if self.kind == "sentinel" else None
        # On a cluster the bounds are kept per slot bucket (the keys of one Lua script share a slot).
        buckets = CLUSTER_BUCKETS if self.kind == "cluster" else 1
        self._bucket_max_topics = max(1, -(-max_topics // buckets))
        self._bucket_max_bytes = max(1, -(-max_bytes // buckets))
        self._barrier_seq = 0
        self._seen: Dict[str, Tuple[str, int]] = {}   # history topic -> last (epoch, offset) delivered here
        self._deliver: Optional[Deliver] = None
        self._wanted: Set[str] = set()
        self._closing = False
        self._started = False
        self._tasks: List[asyncio.Task] = []
        self._lanes: Dict[Optional[Address], _Lane] = {}    # single/Sentinel: {None: lane}; cluster: by master
        self._slots: List[Tuple[int, int, Address]] = []    # cluster: (first slot, last slot, master), sorted
        self._slot_starts: List[int] = []
        self._map_wake: Optional[asyncio.Event] = None
        self._map_error = ""
        self._retired: List[asyncio.Future] = []
        # What happens to the broker, by event: the daemon's Counters.broker when given (one place
        # for every counter: metrics export them), else a Counter of its own.
        self.stats = stats if stats is not None else collections.Counter()
        for event in BROKER_EVENTS:
            self.stats[event] += 0
        if self.kind != "cluster":
            self._lanes[None] = _Lane(self)

    # -- Broker interface -----------------------------------------------------------------

    async def start(self, deliver: Deliver) -> None:
        """Start the supervisors and writers; wait for the first connection attempts only.

        If Redis is unreachable, start() still returns (after at most the connect timeout):
        pusherd serves its sockets and refuses publishes until the backplane is back.
        """
        self._deliver = deliver
        self._started = True
        bound = self._connect_timeout + self._command_timeout + 1
        if self.kind == "sentinel":
            self._tasks.append(asyncio.ensure_future(self._watch_sentinels()))
        if self.kind == "cluster":
            self._map_wake = asyncio.Event()
            try:
                self._apply_map(await asyncio.wait_for(self._fetch_map(), bound))
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self._map_error = "%s: %s" % (type(exc).__name__, exc)
                log.warning("broker %s unavailable (no slot map: %s); serving sockets, refusing publishes "
                            "with 503", self.describe(), self._map_error)
            self._tasks.append(asyncio.ensure_future(self._maintain_map()))
        for lane in self._lanes.values():
            if not lane.tasks:
                lane.start()
        try:
            await asyncio.wait_for(asyncio.gather(*[lane.first_attempt.wait() for lane in self._lanes.values()]),
                                   bound)
        except asyncio.TimeoutError:
            pass

    async def publish(self, broadcast: Broadcast, client: bool = False) -> Optional[str]:
        lane = self._lane_for(broadcast.topic)
        lane.admit(1)
        item = self._pending(broadcast, client)
        lane.enqueue([item])
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
        publishes those broadcasts again: duplicates, never a loss. On a cluster a MULTI/EXEC
        holds one slot: a batch over several slot buckets is one MULTI/EXEC per bucket, each all
        or nothing, and some of them may be published when another is refused (503, "k of n").
        """
        if len(broadcasts) == 1:
            return [await self.publish(broadcasts[0])]
        # With a history topic in it, every item comes back through Redis, so that the batch is
        # delivered here in its order (history publishes are delivered when Redis echoes them).
        echo = bool(self.history_rules) and any(self.history_rules.rule_for(b.topic) is not None for b in broadcasts)
        lanes: Dict[int, _Lane] = {}
        groups: Dict[object, List[_Pending]] = {}
        for b in broadcasts:
            lane = self._lane_for(b.topic)
            lanes[id(lane)] = lane
            key = (id(lane), self.tag(b.topic))
            groups.setdefault(key, []).append(self._pending(b, False, echo))
        for lane in lanes.values():
            lane.admit(sum(len(g) for k, g in groups.items() if k[0] == id(lane)))
        everything = []
        for key, group in groups.items():
            for item in group:
                item.group = group
            everything += group
            lanes[key[0]].enqueue(group)
        await asyncio.wait([item.future for item in everything])
        failed = [item.future.exception() for item in everything if item.future.exception() is not None]
        if failed:
            raise BrokerUnavailable("%d of %d events published: %s" % (len(everything) - len(failed),
                                                                        len(everything), failed[0]),
                                    published=len(everything) - len(failed), total=len(everything))
        return [b.position for b in broadcasts]

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
            tag = self.tag(broadcast.topic)
            history = (self._meta_prefix + tag + key, self._history_prefix + tag + key, self._registry_key + tag,
                       self._sizes_key + tag, self._info_key + tag, rule.size, _ttl_ms(rule.ttl), key,
                       self._bucket_max_topics, self._bucket_max_bytes, self._history_prefix + tag,
                       self._meta_prefix + tag)
        return _Pending(self.channel(broadcast.topic), data, broadcast, future, history, echo, self._plain_script)

    def _command(self, item: _Pending) -> tuple:
        if item.history is not None:
            meta, stream, registry, sizes, info, size, ttl_ms, topic, max_topics, max_bytes, hp, mp = item.history
            return (b"EVALSHA", self._publish_sha, 5, meta, stream, registry, sizes, info, item.channel, item.data,
                    size, ttl_ms, new_epoch(os.urandom(EPOCH_BYTES)), topic, max_topics, max_bytes, hp, mp)
        if item.script == "guard":
            return (b"EVALSHA", self._scripts["guard"][1], 1, self._guard_key, item.channel, item.data)
        return (self._pub_cmd, item.channel, item.data)

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
            if _moved(exc) is not None:
                self._refresh_map()
            raise BrokerUnavailable("%s (history lookup: %s: %s)" % (self.describe(), type(exc).__name__, exc)) \
                from None

    async def _recover(self, topic: str, since, rule) -> Recovery:
        await self.activate(topic)
        recovery = await self._read_history(self._lane_for(topic), topic, since, rule)
        # The pub/sub messages up to the position read may still be on their way on the
        # subscriber connection: after this barrier they have been delivered (to the caller's
        # hold buffer, where the replay drops them), so none reaches the client live after its replay.
        await self.activate(topic, fresh=True)
        return recovery

    async def _read_history(self, lane: _Lane, topic: str, since, rule) -> Recovery:
        """RECOVER_SCRIPT, then `history.decide_history` on what is still within size and ttl."""
        parsed = parse_position(since) or ("", 0)
        # Epochs are ASCII: another epoch is never ours, and a lone surrogate in it could not be
        # sent to Redis at all (redis-py encodes arguments as strict UTF-8).
        epoch_arg = parsed[0] if parsed[0].isascii() else ""
        key = topic.encode("utf-8")
        tag = self.tag(topic)
        limit = min(self.max_recovery, rule.size)
        if lane.client is None:
            raise BrokerUnavailable(lane.unavailable())
        epoch, last, created, secs, usecs, raw, intact = await self._recover_script(
            keys=[self._meta_prefix + tag + key, self._history_prefix + tag + key, self._info_key + tag],
            args=[epoch_arg, parsed[1], limit, "1" if empty_since(since) is not None else "0"], client=lane.client)
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

    async def _catch_up(self, lane: _Lane) -> None:
        """After a (re)connect, deliver from the history what history topics with local members
        on this lane missed while its subscriber connection was down (or while their slot moved
        to this lane), in order, before any live message (the listener has not read yet; the
        live copies of what is delivered here are then dropped by `_fresh`)."""
        for topic, (epoch, offset) in list(self._seen.items()):
            rule = self.history_rules.rule_for(topic)
            if rule is None or topic not in lane.wanted:
                continue
            try:
                recovery = await asyncio.wait_for(
                    self._read_history(lane, topic, format_position(epoch, offset), rule), self._command_timeout)
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                log.warning("broker: cannot read the history of %.200s after reconnecting (%s)", topic, exc)
                continue
            if not recovery.recovered:
                current = parse_position(recovery.position)
                if current is not None and current[0] == epoch and current[1] < offset:
                    # The history is behind what was delivered here: a failover promoted a replica
                    # that had not received the last writes (Redis replicates asynchronously). Its
                    # next offsets are new broadcasts, not the ones delivered: take them.
                    self.stats["rolled_back"] += 1
                    self._seen[topic] = current
                    log.warning("broker: %.200s: the history is at %s, behind %s delivered here: writes acknowledged "
                                "before a failover were lost by Redis", topic, recovery.position,
                                format_position(epoch, offset))
                    continue
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
        lane = self._lane_or_none(topic)
        return lane is not None and topic in lane.confirmed and topic in self._wanted

    async def activate(self, topic: str, fresh: bool = False) -> None:
        """Return once Redis confirmed this process's subscription to `topic` (already wanted).

        A ``PING`` barrier sent after the ``SUBSCRIBE`` on the subscriber connection: when its
        answer arrives, every message published afterwards, by any process, reaches this one.
        ``fresh``: a new barrier even when confirmed: every message Redis sent before now has
        been delivered when it returns.
        """
        await self._lane_for(topic).activate(topic, fresh)

    def subscribe(self, topic: str) -> None:
        self._wanted.add(topic)
        lane = self._lane_or_none(topic)
        if lane is not None:
            lane.want(topic)

    def unsubscribe(self, topic: str) -> None:
        self._wanted.discard(topic)
        self._seen.pop(topic, None)
        for lane in self._lanes.values():
            if topic in lane.wanted:
                lane.unwant(topic)

    def healthy(self) -> bool:
        return bool(self._lanes) and not self._closing and all(lane.healthy for lane in self._lanes.values())

    def describe(self) -> str:
        return mask_url(self.url)

    def presence_backplane(self, ttl: float = 15.0):
        """Presence across processes on this Redis (brokers/redis_presence.py: its own keys, channel
        and subscriber connection, on the single Redis or the master Sentinel names)."""
        from .redis_presence import RedisPresence
        if self.kind == "cluster":
            raise StartupError("presence: not available with a redis+cluster:// broker yet (use a single Redis "
                               "or Sentinel, or remove presence: from the configuration)")
        return RedisPresence(self._pool, self.prefix, ttl, self._command_timeout, self._backoff, self.describe(),
                             locate=self._ask_sentinels if self.kind == "sentinel" else None,
                             node_kwargs=self._node_kwargs)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []
        for lane in list(self._lanes.values()):
            await lane.close()
        for future in self._retired:
            try:
                await future
            except Exception:
                pass
        self._retired = []
        await self._pool.disconnect()

    # -- helpers --------------------------------------------------------------------------

    def tag(self, topic: str) -> bytes:
        """On a cluster, ``{<bucket>}``: one of CLUSTER_BUCKETS hash tags, in every key and the
        channel of the topic, so that a topic's publish script runs on one slot, with its
        bucket's bounds; empty otherwise."""
        if self.kind != "cluster":
            return b""
        return b"{%d}" % self.history_bucket(topic)

    def history_bucket(self, topic: str) -> int:
        """The slot bucket of `topic` on a cluster (its history bounds are its bucket's); else 0."""
        if self.kind != "cluster":
            return 0
        return zlib.crc32(topic.encode("utf-8")) % CLUSTER_BUCKETS

    def channel(self, topic: str) -> bytes:
        return self._channel_prefix + self.tag(topic) + topic.encode("utf-8")

    def _subscribe_batches(self, topics: List[str]) -> Iterable[List[str]]:
        if self.kind != "cluster":
            return _batches(topics, SUBSCRIBE_BATCH)
        by_tag: Dict[bytes, List[str]] = {}   # SSUBSCRIBE takes the channels of one slot
        for t in topics:
            by_tag.setdefault(self.tag(t), []).append(t)
        return [batch for group in by_tag.values() for batch in _batches(group, SUBSCRIBE_BATCH)]

    def _wants(self, topic: str) -> bool:
        """Has this process members on `topic`? (bench/redis_scaleout.py overrides the channel layout.)"""
        return topic in self._wanted

    def _connection(self, address: Optional[Address] = None):
        if address is None:
            return self._pool.connection_class(**self._pool.connection_kwargs)
        return redis.asyncio.Connection(host=address[0], port=address[1], **self._node_kwargs)

    def _on_message(self, channel: bytes, data: bytes) -> None:
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
                            self.stats["bad_envelopes"], channel, exc)
            return
        if not self._wants(broadcast.topic):
            return  # arrived between the last local leave and the UNSUBSCRIBE
        if broadcast.position is not None and not self._fresh(broadcast):
            self.stats["duplicates"] += 1   # already delivered by _catch_up
            return
        self.stats["received"] += 1
        self._safe_deliver(broadcast)

    def _published(self, item: _Pending, reply) -> None:
        self.stats["published"] += 1
        if item.history is not None:
            position, by_topics, by_bytes = reply
            item.broadcast.position = position.decode("ascii")
            if by_topics or by_bytes:
                self._evicted(item.broadcast.topic, int(by_topics), int(by_bytes))
        if not item.echo:
            self._safe_deliver(item.broadcast)
        # else: delivered through Redis like everywhere else, in offset order (see _on_message).
        if not item.future.done():
            item.future.set_result(None)

    def _evicted(self, topic: str, by_topics: int, by_bytes: int) -> None:
        before = self.evictions[LIMIT_TOPICS] + self.evictions[LIMIT_BYTES]
        self.evictions[LIMIT_TOPICS] += by_topics
        self.evictions[LIMIT_BYTES] += by_bytes
        log_evictions(before, self.evictions, topic)

    def _safe_deliver(self, broadcast: Broadcast) -> None:
        try:
            self._deliver(broadcast)
        except Exception:  # one failing delivery must not kill the listener or the writer
            log.exception("local delivery failed for topic %.200s", broadcast.topic)

    # -- finding the node: a single Redis, Sentinel, the cluster's slot map -----------------

    async def _open(self, lane: _Lane):
        """A connected subscriber connection for `lane`: to the single Redis, to the master that
        Sentinel names (and that says it is one), or to the lane's cluster master."""
        if self.kind == "single":
            conn = self._connection()
            try:
                await conn.connect()
            except BaseException:
                await _drop(conn)
                raise
            lane.connected_to = None
            lane.client = self._client
            return conn
        address = await self._ask_sentinels() if self.kind == "sentinel" else lane.address
        conn = self._connection(address)
        try:
            await conn.connect()
            await conn.send_command("ROLE", check_health=False)
            role = await conn.read_response()
            if not isinstance(role, list) or not role or role[0] != b"master":
                raise RedisConnectionError("%s:%d is a %s, not a master" % (address[0], address[1],
                                           (role[0].decode("ascii", "replace") if isinstance(role, list) and role
                                            else "node")))
        except BaseException:
            await _drop(conn)
            raise
        if lane.connected_to is not None and lane.connected_to != address:
            self.stats["failovers"] += 1
            log.warning("broker %s: the master is now %s:%d (was %s:%d)", self.describe(), address[0], address[1],
                        *lane.connected_to)
        lane.connected_to = address
        if lane.client_address != address:
            old = lane.client
            lane.client = redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(
                host=address[0], port=address[1], **self._node_kwargs))
            lane.client_address = address
            if old is not None:
                self._retired.append(asyncio.ensure_future(old.connection_pool.disconnect()))
        return conn

    async def _ask_sentinels(self) -> Address:
        """The master's address from the first sentinel that knows it (that one is asked first
        next time). Raises ConnectionError when none does."""
        errors = []
        for i, (host, port) in enumerate(list(self._seeds)):
            conn = redis.asyncio.Connection(host=host, port=port, **self._sentinel_kwargs)
            try:
                await conn.connect()
                await conn.send_command("SENTINEL", "get-master-addr-by-name", self._service, check_health=False)
                reply = await conn.read_response()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                errors.append("%s:%d: %s" % (host, port, type(exc).__name__))
                continue
            finally:
                await _drop(conn)
            if not reply:
                errors.append("%s:%d knows no master %r" % (host, port, self._service))
                continue
            if i:
                self._seeds.insert(0, self._seeds.pop(i))
            return reply[0].decode("ascii"), int(reply[1])
        raise RedisConnectionError("no sentinel named the master (%s)" % "; ".join(errors))

    async def _watch_sentinels(self) -> None:
        """Listen to one sentinel's ``+switch-master``: on a failover, drop the old master's
        connections at once instead of waiting for them to fail (a demoted master keeps them
        open as a replica's). Moves to the next sentinel when one fails."""
        attempt = 0
        while not self._closing:
            host, port = self._seeds[attempt % len(self._seeds)]
            conn = redis.asyncio.Connection(host=host, port=port, **self._sentinel_kwargs)
            try:
                await conn.connect()
                await conn.send_command("SUBSCRIBE", "+switch-master", check_health=False)
                pinged = False
                while True:
                    resp = await conn.read_response(timeout=self._ping_interval)
                    if resp is None:
                        if pinged:
                            raise asyncio.TimeoutError("sentinel silent")
                        await conn.send_command("PING", check_health=False)
                        pinged = True
                        continue
                    pinged = False
                    attempt = 0
                    if isinstance(resp, list) and len(resp) == 3 and resp[0] == b"message":
                        parts = resp[2].decode("utf-8", "replace").split()
                        if len(parts) == 5 and parts[0] == self._service and parts[4].isdigit():
                            self._master_switched((parts[3], int(parts[4])))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                log.debug("broker: sentinel %s:%d: %s", host, port, exc)
            finally:
                await _drop(conn)
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt // len(self._seeds), *self._backoff))

    def _master_switched(self, address: Address) -> None:
        lane = self._lanes.get(None)
        if lane is None:
            return
        if lane.connected_to != address or not lane.healthy:
            log.warning("broker %s: sentinel switched the master to %s:%d: reconnecting", self.describe(), *address)
            lane.force_reconnect("sentinel switched the master to %s:%d" % address)

    async def _fetch_map(self) -> List[Tuple[int, int, Address]]:
        """``CLUSTER SLOTS`` from the first node that answers (the URL's, then the known masters)."""
        # The masters that answer first (a dead one may cost a connect timeout), then the URL's.
        lanes = sorted((a for a in self._lanes if a is not None), key=lambda a: not self._lanes[a].healthy)
        candidates = list(dict.fromkeys(lanes + self._seeds))
        errors = []
        for address in candidates:
            conn = self._connection(address)
            try:
                await conn.connect()
                await conn.send_command("CLUSTER", "SLOTS", check_health=False)
                reply = await conn.read_response()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                errors.append("%s:%d: %s" % (address[0], address[1], type(exc).__name__))
                continue
            finally:
                await _drop(conn)
            slots = []
            for entry in reply:
                host = entry[2][0].decode("ascii") or address[0]   # an empty host: the node we asked
                slots.append((int(entry[0]), int(entry[1]), (host, int(entry[2][1]))))
            if slots:
                return sorted(slots)
            errors.append("%s:%d has no slots" % address)
        raise RedisConnectionError("no cluster node gave a slot map (%s)" % "; ".join(errors))

    def _apply_map(self, slots: List[Tuple[int, int, Address]]) -> None:
        """Adopt a slot map: a lane per master, every wanted topic on the lane of its slot, the
        lanes of nodes that own no slot anymore retired (their queued publishes refused)."""
        if slots == self._slots:
            return
        moved = bool(self._slots)
        self._slots = slots
        self._slot_starts = [s[0] for s in slots]
        owners = {s[2] for s in slots}
        for address in owners:
            if address not in self._lanes:
                self._lanes[address] = _Lane(self, address)
                if self._started and not self._closing:
                    self._lanes[address].start()
        for topic in self._wanted:
            lane = self._lane_or_none(topic)
            for other in self._lanes.values():
                if other is not lane and topic in other.wanted:
                    other.unwant(topic)
            if lane is not None and topic not in lane.wanted:
                lane.want(topic)
        for address in [a for a in self._lanes if a not in owners]:
            lane = self._lanes.pop(address)
            self._retired.append(asyncio.ensure_future(lane.close("%s: shard %s:%d owns no slot anymore"
                                                                  % (self.describe(), address[0], address[1]))))
        if moved:
            log.warning("broker %s: new slot map, masters %s", self.describe(),
                        ", ".join("%s:%d" % a for a in sorted(owners)))

    async def _maintain_map(self) -> None:
        """Fetch the slot map again now and then, at once when asked (MOVED, a lane down, an
        unexpected SUNSUBSCRIBE), every MAP_RETRY while some lane is down (a failover)."""
        while not self._closing:
            self._map_wake.clear()
            degraded = not self.healthy()
            try:
                await asyncio.wait_for(self._map_wake.wait(), MAP_RETRY if degraded else self._map_refresh)
            except asyncio.TimeoutError:
                pass
            try:
                self._apply_map(await asyncio.wait_for(self._fetch_map(), self._connect_timeout + self._command_timeout))
                self._map_error = ""
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self._map_error = "%s: %s" % (type(exc).__name__, exc)
                log.debug("broker %s: no slot map (%s)", self.describe(), self._map_error)

    def _refresh_map(self) -> None:
        if self._map_wake is not None:
            self._map_wake.set()

    def _lane_failed(self, lane: _Lane) -> None:
        self._refresh_map()

    def _lane_or_none(self, topic: str) -> Optional[_Lane]:
        if self.kind != "cluster":
            return self._lanes[None]
        if not self._slots:
            return None
        slot = key_slot(self.channel(topic))
        i = bisect.bisect_right(self._slot_starts, slot) - 1
        if i < 0 or slot > self._slots[i][1]:
            return None
        return self._lanes.get(self._slots[i][2])

    def _lane_for(self, topic: str) -> _Lane:
        lane = self._lane_or_none(topic)
        if lane is None:
            if self._closing:
                raise BrokerUnavailable("%s (broker closed)" % self.describe())
            raise BrokerUnavailable("%s (no slot map: %s)" % (self.describe(), self._map_error or "connecting"))
        return lane

    def _redirect(self, item: _Pending, address: Address) -> None:
        """A MOVED answer: the command was not run. Queue it on the lane the new map names."""
        self.stats["redirects"] += 1
        self._refresh_map()
        self._retired = [f for f in self._retired if not f.done()]
        self._retired.append(asyncio.ensure_future(self._follow(item, address)))

    async def _follow(self, item: _Pending, address: Address) -> None:
        try:
            if address not in self._lanes:
                self._apply_map(await asyncio.wait_for(self._fetch_map(), self._command_timeout))
            lane = self._lanes.get(address) or self._lane_for(item.broadcast.topic)   # where MOVED says
            lane.admit(1)
            lane.enqueue([item])
        except (RedisError, OSError, asyncio.TimeoutError, ValueError, BrokerUnavailable) as exc:
            if not item.future.done():
                item.future.set_exception(BrokerUnavailable("%s (following MOVED: %s)" % (self.describe(), exc)))

"""RedisPresence: the presence lists of every pusherd process on one Redis (the Redis broker's
presence backplane, driven by pusherd/presence_service.py).

Consistency model
-----------------
* **Each process is the truth of its own entries** (one per connection listed). Its diffs go to
  Redis at the end of each window (``presence_interval``), as one Lua script that writes the
  entries into the topic's hash and PUBLISHes the diff, atomically: a process that reads a hash
  and then applies the diffs published after the read ends with the same list as the writers.
* **Every process replicates every topic it has members on**: the list is read (`snapshot`)
  when the process gets its first member of the topic; from then on the diffs of the other
  processes arrive on one pub/sub channel (``<tag>:diffs``; every process hears every topic's
  diffs, as with Phoenix.Tracker) and are applied in the order Redis published them. Only what
  changed the list is delivered to the local members. Lists converge: two processes holding a
  topic list the same entries once the diffs in flight have arrived (tens of ms plus a window).
* **A process that dies leaves within a bounded time.** Every process refreshes its
  registration (a sorted set, node -> expiry) every ``ttl / 3``; a process silent for ``ttl``
  is removed by the first other process that sweeps (one Lua script: only one process does it,
  and it PUBLISHes the death once): its entries leave every hash and every list. Its members
  are gone from every page within ``ttl + ttl / 3`` (plus a round trip) of its last heartbeat:
  20 s with the default ``presence_ttl`` of 15 s. Node ids are random per process start and
  never reused; a dead process's id is tombstoned, so a late diff of it is dropped, and a
  process that finds itself given up for dead (a partition longer than ``ttl``) writes its
  entries again under a new id.
* **A Redis outage** (this process's connection, or Redis itself) changes nothing in the local
  lists beyond local joins and leaves, which still reach the local members. When Redis is back,
  every process rewrites its own entries (only the differences are published), and reads every
  list again, in that order, then registers again; entries of a process that has not registered
  again yet are kept for ``ttl`` (a Redis that lost its data has every process rewrite its
  entries within a few seconds), then dropped. A process that was registered before the
  outage and is alive after it never leaves anyone's list: no storm of leaves and joins.
  Sweeps start only once a process has been connected for ``ttl``, so nobody is given up for
  dead while the others are still reconnecting.

Keys (all in one Redis Cluster hash slot: ``{<prefix>:presence}``): ``…:t:<topic>``, a hash of
``<node>|<phx_ref>`` -> the entry (core/presence.py `encode_entry`); ``…:n:<node>``, a hash of
topic -> that node's entry count (what a sweep removes); ``…:nodes``, the registrations;
``…:dead:<node>``, tombstones (kept an hour).
"""

import asyncio
import json
import logging
import secrets
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError

from ..core.errors import BrokerUnavailable
from ..core.presence import Diff, Entry, decode_entry, encode_entry, entry_field
from .base import PresenceBackplane, backoff_delay

log = logging.getLogger("pusherd.presence")

MESSAGE_VERSION = 1
TOMBSTONE_MS = 3600 * 1000
SWEEP_BATCH = 10            # dead processes removed by one sweep script
WRITE_BATCH = 200           # diffs per pipelined write

#: A diff of this node on one topic. KEYS: the topic's hash, this node's counts, its tombstone.
#: ARGV: channel, message, topic, number of joins, the joins' (field, value) pairs, the leaves'
#: fields. Nothing is written for a node given up for dead: returns -1.
WRITE_SCRIPT = """
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local n = tonumber(ARGV[4])
local delta = 0
for i = 0, n - 1 do
  delta = delta + redis.call('HSET', KEYS[1], ARGV[5 + 2 * i], ARGV[6 + 2 * i])
end
for i = 5 + 2 * n, #ARGV do
  delta = delta - redis.call('HDEL', KEYS[1], ARGV[i])
end
if delta ~= 0 then
  if redis.call('HINCRBY', KEYS[2], ARGV[3], delta) <= 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return delta
"""

#: A topic's entries and the processes alive. KEYS: the topic's hash, the registrations.
SNAPSHOT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')}
"""

#: This node's registration. KEYS: the registrations, its tombstone. ARGV: node, ttl ms, "1" to
#: register (else only refreshed when present). Returns {status, processes alive}: status
#: "dead" (tombstoned), "missing" (not registered: Redis lost it), or "ok".
HEARTBEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[2]) == 1 then return {'dead', {}} end
if ARGV[3] ~= '1' and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {'missing', {}} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return {'ok', redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')}
"""

#: Remove nodes: their entries from every topic they hold some in, their counts and
#: registration, a tombstone, and one PUBLISH of their death each. KEYS: the registrations.
#: ARGV: key tag, channel, tombstone ms, limit, then the nodes to remove ("" : the expired ones).
FORGET_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tag, channel = ARGV[1], ARGV[2]
local nodes = {}
if ARGV[5] == '' then
  nodes = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, tonumber(ARGV[4]))
else
  for i = 5, #ARGV do nodes[#nodes + 1] = ARGV[i] end
end
for _, node in ipairs(nodes) do
  redis.call('ZREM', KEYS[1], node)
  redis.call('SET', tag .. ':dead:' .. node, '1', 'PX', tonumber(ARGV[3]))
  local counts = tag .. ':n:' .. node
  local prefix = node .. '|'
  for _, topic in ipairs(redis.call('HKEYS', counts)) do
    local hash = tag .. ':t:' .. topic
    for _, field in ipairs(redis.call('HKEYS', hash)) do
      if string.sub(field, 1, #prefix) == prefix then redis.call('HDEL', hash, field) end
    end
  end
  redis.call('DEL', counts)
  redis.call('PUBLISH', channel, '{"v":1,"dead":"' .. node .. '"}')
end
return nodes
"""

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisPresence(PresenceBackplane):
    """Presence across the processes of one Redis (consistency model: the module docstring).

    ``pool``: the Redis broker's connection pool (its URL, credentials, TLS, timeouts); the
    subscriber connection is a connection of the pool's class, as the broker's own. With
    Sentinel, ``locate()`` names the master (asked on every reconnect, which must answer ``ROLE``
    master) and ``node_kwargs`` are the connection arguments for it; a ``READONLY`` answer (a
    demoted master) makes the subscriber reconnect and find the master again, and the lists are
    resynchronised as after any outage.
    """

    local = False

    def __init__(self, pool, prefix: str = "pusherd", ttl: float = 15.0, command_timeout: float = 2.0,
                 backoff: Tuple[float, float] = (0.1, 5.0), describe: str = "redis", locate=None,
                 node_kwargs: Optional[dict] = None):
        super().__init__(secrets.token_hex(8))
        self.ttl = ttl
        self.interval = ttl / 3.0
        self._pool = pool
        self._tag = "{%s:presence}" % prefix
        self.channel = self._tag + ":diffs"
        self._nodes_key = self._tag + ":nodes"
        self._command_timeout = command_timeout
        self._backoff = backoff
        self._describe = describe
        self._locate = locate
        self._node_kwargs = node_kwargs or {}
        self._address = None          # the master the client talks to (Sentinel)
        self._sub = None              # the subscriber connection
        self._client = redis.asyncio.Redis(connection_pool=pool)
        self._write_script = self._client.register_script(WRITE_SCRIPT)
        self._snapshot_script = self._client.register_script(SNAPSHOT_SCRIPT)
        self._heartbeat_script = self._client.register_script(HEARTBEAT_SCRIPT)
        self._forget_script = self._client.register_script(FORGET_SCRIPT)
        self._owner = None
        self._healthy = False
        self._closing = False
        self._leaving = False       # saying goodbye: our own death notice comes back
        self._tasks: List[asyncio.Task] = []
        self._queue: List[Tuple[str, Diff]] = []
        self._wake: Optional[asyncio.Event] = None
        self._writing = False
        self._rejoining = False
        self._rejoin_again = False
        self._up_since: Optional[float] = None    # registered and connected since (monotonic)
        self._first: Optional[asyncio.Event] = None
        self.stats = {"writes": 0, "write_failures": 0, "received": 0, "bad_messages": 0, "sweeps": 0,
                      "swept": 0, "resyncs": 0, "renamed": 0, "outages": 0}

    # -- PresenceBackplane ----------------------------------------------------------------

    async def start(self, owner) -> None:
        self._owner = owner
        self._wake = asyncio.Event()
        self._first = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._supervise()), asyncio.ensure_future(self._heartbeats()),
                       asyncio.ensure_future(self._write_forever())]
        try:   # registered before the first join, unless Redis is down (then when it is back)
            await asyncio.wait_for(self._first.wait(), 2 * self._command_timeout + 1)
        except asyncio.TimeoutError:
            pass

    def healthy(self) -> bool:
        return self._healthy

    async def snapshot(self, topic: str) -> Tuple[List[Entry], Set[str]]:
        if not self._healthy:
            raise BrokerUnavailable("presence: %s unavailable" % self._describe)
        try:
            raw, alive = await asyncio.wait_for(
                self._snapshot_script(keys=[self._topic_key(topic), self._nodes_key], client=self._client),
                self._command_timeout)
        except (RedisError, OSError) as exc:
            self._maybe_demoted(exc)
            raise BrokerUnavailable("presence: %s (%s: %s)" % (self._describe, type(exc).__name__, exc)) from None
        entries = []
        for i in range(0, len(raw) - 1, 2):
            entry = decode_entry(raw[i], raw[i + 1])
            if entry is not None:
                entries.append(entry)
        return entries, {_text(n) for n in alive}

    def write(self, topic: str, diff: Diff) -> None:
        self._queue.append((topic, diff))
        if self._wake is not None:
            self._wake.set()

    async def close(self) -> None:
        """Write what is queued (this process's leaves), then remove this process from Redis at
        once (its registration, any entry left, a death notice): nobody waits ``ttl`` for it."""
        self._leaving = True
        if self._tasks and self._healthy:
            deadline = time.monotonic() + self._command_timeout
            while (self._queue or self._writing) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            try:
                await asyncio.wait_for(self._forget_script(
                    keys=[self._nodes_key], args=[self._tag, self.channel, TOMBSTONE_MS, SWEEP_BATCH, self.node],
                    client=self._client), self._command_timeout)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                log.warning("presence: could not say goodbye to %s (%s); this process's members leave the "
                            "other processes' lists within %.0fs", self._describe, exc, self.ttl * 4 / 3)
        self._closing = True
        self._healthy = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []

    # -- the subscriber connection --------------------------------------------------------

    async def _supervise(self) -> None:
        attempts = 0
        down_since: Optional[float] = None
        while not self._closing:
            conn = None
            try:
                conn = await self._open()
                self._sub = conn
                await conn.send_command("SUBSCRIBE", self.channel, check_health=False)
                while True:
                    resp = await conn.read_response(timeout=self._command_timeout)
                    if resp is None:
                        raise asyncio.TimeoutError("no SUBSCRIBE confirmation")
                    if isinstance(resp, list) and resp and resp[0] in (b"subscribe", "subscribe"):
                        break
                self._healthy = True
                if down_since is not None:
                    log.warning("presence: %s connected again after %.1fs; resynchronising the lists",
                                self._describe, time.monotonic() - down_since)
                attempts, down_since = 0, None
                self._spawn_rejoin()
                await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, asyncio.TimeoutError, ValueError) as exc:
                attempts += 1
                if down_since is None:
                    down_since = time.monotonic()
                    self.stats["outages"] += 1
                    log.warning("presence: %s unavailable (%s: %s); local joins and leaves still reach local "
                                "members, the lists are resynchronised when it is back", self._describe,
                                type(exc).__name__, exc)
            finally:
                self._healthy = False
                self._up_since = None
                self._sub = None
                if conn is not None:
                    try:
                        await conn.disconnect(nowait=True)
                    except (RedisError, OSError, asyncio.TimeoutError):
                        pass
            self._first.set()
            await asyncio.sleep(backoff_delay(attempts - 1, *self._backoff))

    async def _open(self):
        """A connected subscriber connection: to the one Redis, or to the master Sentinel names
        (which must say it is one); the command client follows it."""
        if self._locate is None:
            conn = self._pool.connection_class(**self._pool.connection_kwargs)
            await conn.connect()
            return conn
        address = await self._locate()
        conn = redis.asyncio.Connection(host=address[0], port=address[1], **self._node_kwargs)
        try:
            await conn.connect()
            await conn.send_command("ROLE", check_health=False)
            role = await conn.read_response()
            if not isinstance(role, list) or not role or role[0] != b"master":
                raise RedisConnectionError("%s:%d is not a master" % address)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        if address != self._address:
            self._client = redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(
                host=address[0], port=address[1], **self._node_kwargs))
            self._address = address
        return conn

    def _maybe_demoted(self, exc: BaseException) -> None:
        """A READONLY answer: the node is a replica now (Sentinel failed over): find the master."""
        if isinstance(exc, ReadOnlyError) and self._sub is not None:
            log.warning("presence: %s answered READONLY (a failover?); finding the master again", self._describe)
            sub, self._sub = self._sub, None
            asyncio.ensure_future(sub.disconnect(nowait=True))

    async def _listen(self, conn) -> None:
        pinged = False
        while True:
            resp = await conn.read_response(timeout=self.interval)
            if resp is None:
                if pinged:
                    raise asyncio.TimeoutError("no answer to PING within %.0fs" % self.interval)
                await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            if isinstance(resp, list) and len(resp) == 3 and resp[0] in (b"message", "message"):
                self._dispatch(resp[2])

    def _dispatch(self, data) -> None:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("v") != MESSAGE_VERSION:
                raise ValueError("not a v%d presence message" % MESSAGE_VERSION)
            dead = doc.get("dead")
            if isinstance(dead, str):
                if dead == self.node:
                    if not self._leaving:
                        log.warning("presence: this process (%s) was given up for dead; listing its members "
                                    "again under a new id", self.node)
                        self._spawn_rejoin()
                    return
                self._owner.node_down(dead)
                return
            node, topic, diff = doc.get("n"), doc.get("t"), doc.get("d")
            if not isinstance(node, str) or not isinstance(topic, str) or not isinstance(diff, dict):
                raise ValueError("a presence message lacks its node, topic or diff")
        except (ValueError, TypeError, RecursionError) as exc:
            self.stats["bad_messages"] += 1
            if self.stats["bad_messages"] in (1, 10, 100) or self.stats["bad_messages"] % 1000 == 0:
                log.warning("presence: dropped %d unreadable message(s): %s", self.stats["bad_messages"], exc)
            return
        self.stats["received"] += 1
        try:
            self._owner.remote_diff(node, topic, diff)
        except Exception:  # one bad diff must not stop the listener
            log.exception("presence: a diff on %.200s could not be applied", topic)

    # -- registration, resync, sweeps -----------------------------------------------------

    def _spawn_rejoin(self) -> None:
        if self._rejoining:
            self._rejoin_again = True
            return
        self._rejoining = True
        task = asyncio.ensure_future(self._rejoin())
        self._tasks.append(task)
        task.add_done_callback(lambda t: t in self._tasks and self._tasks.remove(t))

    async def _rejoin(self) -> None:
        """After (re)connecting, or when Redis lost this process's registration or gave it up for
        dead: write this process's entries again and read every list, then register."""
        try:
            while not self._closing:
                self._rejoin_again = False
                try:
                    status, _alive = await self._beat(register=False)
                    renamed = None
                    if status == "dead":
                        renamed, self.node = self.node, secrets.token_hex(8)
                        self.stats["renamed"] += 1
                    self.stats["resyncs"] += 1
                    await self._owner.resync(renamed)
                    status, alive = await self._beat(register=True)
                except (RedisError, OSError, asyncio.TimeoutError) as exc:
                    log.debug("presence: resync interrupted (%s)", exc)
                    self._maybe_demoted(exc)
                    return   # the subscriber reconnects and starts over
                if status == "dead":
                    continue     # given up for dead again meanwhile: another id
                if self._up_since is None:
                    self._up_since = time.monotonic()
                self._owner.nodes_alive(alive)
                if not self._rejoin_again:
                    return
        finally:
            self._rejoining = False
            self._first.set()

    async def _beat(self, register: bool):
        status, alive = await asyncio.wait_for(self._heartbeat_script(
            keys=[self._nodes_key, self._dead_key(self.node)],
            args=[self.node, int(self.ttl * 1000), "1" if register else "0"], client=self._client),
            self._command_timeout)
        return _text(status), {_text(n) for n in alive}

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._healthy or self._rejoining:
                continue
            try:
                status, alive = await self._beat(register=False)
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                log.debug("presence: heartbeat failed (%s)", exc)
                self._maybe_demoted(exc)
                continue
            if status != "ok":
                if status == "missing":
                    log.warning("presence: %s lost this process's registration (restarted?); writing its "
                                "entries again", self._describe)
                self._spawn_rejoin()
                continue
            self._owner.nodes_alive(alive)
            if self._up_since is not None and time.monotonic() - self._up_since >= self.ttl:
                await self._sweep()

    async def _sweep(self) -> None:
        try:
            swept = await asyncio.wait_for(self._forget_script(
                keys=[self._nodes_key], args=[self._tag, self.channel, TOMBSTONE_MS, SWEEP_BATCH, ""],
                client=self._client), self._command_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.debug("presence: sweep failed (%s)", exc)
            return
        self.stats["sweeps"] += 1
        if swept:
            self.stats["swept"] += len(swept)
            log.warning("presence: %d process(es) silent for %.0fs given up for dead, their members leave: %s",
                        len(swept), self.ttl, ", ".join(_text(n) for n in swept))

    # -- writes ---------------------------------------------------------------------------

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[:WRITE_BATCH], self._queue[WRITE_BATCH:]
                self._writing = True
                try:
                    await self._write(batch)
                finally:
                    self._writing = False

    async def _write(self, batch: List[Tuple[str, Diff]]) -> None:
        if not self._healthy:
            self._failed(batch)
            return
        pipe = self._client.pipeline(transaction=False)
        try:
            for topic, diff in batch:   # queued on the pipeline (nothing is sent before execute)
                await self._write_script(keys=[self._topic_key(topic), self._counts_key(self.node),
                                               self._dead_key(self.node)],
                                         args=self._write_args(topic, diff), client=pipe)
            results = await asyncio.wait_for(pipe.execute(raise_on_error=False), self._command_timeout)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log.debug("presence: %d diff(s) not written (%s)", len(batch), exc)
            self._maybe_demoted(exc)
            self._failed(batch)
            return
        finally:
            await pipe.reset()
        for (topic, _diff), result in zip(batch, results):
            if isinstance(result, Exception):
                if isinstance(result, ReadOnlyError):
                    self._maybe_demoted(result)
                else:
                    log.warning("presence: a diff on %.200s was refused by %s: %s", topic, self._describe, result)
                self._failed([(topic, _diff)])
            elif result == -1:
                self._failed([(topic, _diff)])
                self._spawn_rejoin()   # given up for dead: a new id, everything written again
            else:
                self.stats["writes"] += 1

    def _write_args(self, topic: str, diff: Diff) -> list:
        joins = [encode_entry(Entry(self.node, key, meta))
                 for key, presence in diff["joins"].items() for meta in presence["metas"]]
        leaves = [entry_field(self.node, meta["phx_ref"])
                  for presence in diff["leaves"].values() for meta in presence["metas"]]
        message = _dumps({"v": MESSAGE_VERSION, "n": self.node, "t": topic, "d": diff})
        args: List[Any] = [self.channel, message, topic, len(joins)]
        for field, value in joins:
            args += [field, value]
        return args + leaves

    def _failed(self, batch) -> None:
        for topic, _diff in batch:
            self.stats["write_failures"] += 1
            self._owner.write_failed(topic)

    # -- keys -----------------------------------------------------------------------------

    def _topic_key(self, topic: str) -> str:
        return self._tag + ":t:" + topic

    def _counts_key(self, node: str) -> str:
        return self._tag + ":n:" + node

    def _dead_key(self, node: str) -> str:
        return self._tag + ":dead:" + node

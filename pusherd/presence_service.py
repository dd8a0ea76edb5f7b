"""Presence in one process: who is on each presence topic, kept and told as Phoenix.Presence does.

The sessions decide (core/session.py: a join on a presence topic gets ``presence_state`` after
its reply, then a `Track`; leave, rejoin, expiry and the end of the connection give an
`Untrack`); `PresenceService` carries it out with the pure pieces of core/presence.py:

* one `TopicPresence` per topic with local members or entries of this process (a `Replica`):
  every process's entries as this process knows them, this process's own, and the window;
* joins and leaves are coalesced: the first change of a topic starts a window of
  ``presence_interval`` seconds, at its end the topic's changes become ONE ``presence_diff``,
  applied here, broadcast to the local members through the hub (encoded once per serializer,
  as every broadcast) and written to the broker's backplane for the other processes. A storm
  of N joins costs one diff per window, not N;
* ``presence_state`` is encoded once per version of the list (a version lasts at least until
  the next window ends): every joiner of a window gets the same text, framed with its own
  join_ref (`Serializer.encode_push_text`);
* the backplane (`brokers.base.PresenceBackplane`; the memory broker's is this process alone,
  the Redis broker's brokers/redis_presence.py) brings the other processes' diffs
  (`remote_diff`: applied, and only their effect delivered), word of a dead process
  (`node_down`: its members leave), and asks for a resync after an outage (`resync`).

A list is read from the backplane when a process gets its first member of a topic (the joiner
waits for it, as for the broker's subscription) and after every outage; diffs that arrive
meanwhile wait and are applied after it. Entries of a process that is not alive (not
registered) are kept for ``backplane.ttl`` seconds, so that a Redis that lost its data (a
restart) does not empty every list while the processes write theirs again; a process still
missing after that leaves the lists (see redis_presence.py for the whole model).
"""

import asyncio
import logging
import os
import time
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from .brokers.base import PresenceBackplane
from .core import protocol
from .core.broadcast import Broadcast
from .core.errors import BrokerUnavailable
from .core.presence import (DEFAULT_LIMIT, REF_BYTES, TOPIC_FULL, Diff, Entry, NotTracked, PresenceRules,
                            PresenceState, TopicPresence, Tracked)
from .core.session import PRESENCE_DIFF, Track, Untrack
from .logs import StormLog

log = logging.getLogger("pusherd.presence")

#: How long a first joiner waits for the topic's list from the backplane before it is answered
#: with what this process knows (the topic is then read again with the next heartbeat).
LOAD_TIMEOUT = 3.0
#: Lists read at once during a resync (after an outage every topic is read again).
SYNC_CONCURRENCY = 32
#: A dead process's id is remembered this long (its late diffs are dropped).
DEAD_MEMORY_SECONDS = 3600.0


class Replica:
    """One presence topic in this process: its `TopicPresence` and what is in flight for it."""

    __slots__ = ("topic", "tp", "loaded", "syncing", "again", "buffer", "dirty", "waiters", "text")

    def __init__(self, topic: str, tp: TopicPresence, loaded: bool):
        self.topic = topic
        self.tp = tp
        self.loaded = loaded          # a list was read (or given up on): joins are answered
        self.syncing = False          # a read of the backplane is in flight: remote diffs wait
        self.again = False            # another read was asked for while one was in flight
        self.buffer: List[Tuple[str, Any]] = []   # (node, diff) that arrived while syncing
        self.dirty = False            # the backplane may differ from this process: read it again
        self.waiters: List[asyncio.Future] = []
        self.text: Tuple[int, Optional[str]] = (-1, None)   # (state version, encoded presence_state)


class PresenceService:
    """The presence of one process (see the module docstring). ``hub``: the process's hub (diffs
    are delivered through it); ``counters``: counters.Counters."""

    def __init__(self, rules: PresenceRules, backplane: PresenceBackplane, hub, counters, interval: float = 0.1,
                 random=os.urandom, clock=time.time, monotonic=time.monotonic):
        self.rules = rules
        self.backplane = backplane
        self.hub = hub
        self.counters = counters
        self.interval = interval
        self._random = random
        self._clock = clock            # online_at
        self._monotonic = monotonic    # how long a process has been missing
        self.replicas: Dict[str, Replica] = {}
        self._tracked: Dict[Tuple[Any, str], Tuple[Any, Tracked]] = {}   # (conn, topic) -> (join_ref, handle)
        self._pending: Set[str] = set()       # topics whose window is open
        self._timer: Optional[asyncio.TimerHandle] = None
        self._dead: Dict[str, float] = {}     # node -> when it was found dead (monotonic)
        self._absent: Dict[str, float] = {}   # node with entries here, not alive -> since (monotonic)
        self._tasks: Set[asyncio.Future] = set()
        self._sync_slots = asyncio.Semaphore(SYNC_CONCURRENCY)
        self.full = StormLog("presence: %d join(s) not listed: topic %.200s holds its limit of %d entries")
        self.closed = False

    @property
    def node(self) -> str:
        return self.backplane.node

    async def start(self) -> None:
        await self.backplane.start(self)

    def rule_for(self, topic: str):
        return self.rules.rule_for(topic) if self.rules else None

    # -- joins ----------------------------------------------------------------------------

    def ready(self, topic: str) -> bool:
        """True when a joiner of `topic` can be answered now (its list is here)."""
        replica = self.replicas.get(topic)
        return replica is not None and replica.loaded

    async def prepare(self, topic: str) -> None:
        """Return once `topic`'s list is here: read from the backplane for a first member, or
        given up on after `LOAD_TIMEOUT` or while the backplane is down (then read again later)."""
        replica = self._replica(topic)
        if replica.loaded:
            return
        if not self.backplane.healthy():
            replica.loaded, replica.dirty = True, True
            return
        future = asyncio.get_running_loop().create_future()
        replica.waiters.append(future)
        self._sync_soon(replica)
        try:
            await asyncio.wait_for(asyncio.shield(future), LOAD_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("presence: the list of %.200s was not read within %.0fs; answering with this process's",
                        topic, LOAD_TIMEOUT)
            replica.dirty = True
            self._loaded(replica)

    def state_text(self, topic: str) -> str:
        """The topic's ``presence_state`` payload as JSON text, encoded once per version."""
        replica = self._replica(topic)
        state = replica.tp.state
        version, text = replica.text
        if version != state.version or text is None:
            text = protocol._dumps(state.payload())
            replica.text = (state.version, text)
            self.counters.presence_encodes += 1
        self.counters.presence_states += 1
        return text

    def track(self, conn, action: Track) -> None:
        replica = self._replica(action.topic)
        try:
            result = replica.tp.track(action.member, self._random(REF_BYTES), self._clock())
        except ValueError:   # a phx_ref drawn twice (96 random bits): draw again
            result = replica.tp.track(action.member, self._random(REF_BYTES), self._clock())
        if isinstance(result, NotTracked):
            self.counters.presence_untracked[result.reason] += 1
            if result.reason == TOPIC_FULL:
                self.full.note(time.monotonic(), action.topic, replica.tp.limit)
            return
        previous = self._tracked.pop((conn, action.topic), None)
        if previous is not None:  # never: a channel is untracked before its topic is joined again
            replica.tp.untrack(previous[1])
        self._tracked[(conn, action.topic)] = (action.join_ref, result)
        self._changed(action.topic)

    def untrack(self, conn, action: Untrack) -> None:
        entry = self._tracked.get((conn, action.topic))
        if entry is None or entry[0] != action.join_ref:
            return    # not tracked (topic full), or already untracked
        del self._tracked[(conn, action.topic)]
        replica = self.replicas.get(action.topic)
        if replica is not None and replica.tp.untrack(entry[1]):
            self._changed(action.topic)

    # -- windows --------------------------------------------------------------------------

    def _changed(self, topic: str) -> None:
        self._pending.add(topic)
        if self._timer is None and not self.closed:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        """End the window: each changed topic's diff, delivered here and written to the backplane."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        topics, self._pending = self._pending, set()
        for topic in topics:
            replica = self.replicas.get(topic)
            if replica is None:
                continue
            diff = replica.tp.flush()
            if diff is None:
                continue
            self._deliver(topic, replica.tp.state.apply_diff(self.node, diff))
            if not self.backplane.local:
                self.backplane.write(topic, diff)

    def _deliver(self, topic: str, diff: Optional[Diff]) -> None:
        if diff is None:
            return
        self.counters.presence_diffs += 1
        self.hub.broadcast(Broadcast(topic, PRESENCE_DIFF, diff))

    # -- what the backplane tells ---------------------------------------------------------

    def remote_diff(self, node: str, topic: str, diff: Any) -> None:
        """Another process's diff: applied to the list, its effect delivered."""
        if node == self.node or node in self._dead:
            return
        replica = self.replicas.get(topic)
        if replica is None:
            return       # no member here: read from the backplane when one comes
        if replica.syncing:
            replica.buffer.append((node, diff))
            return
        self._deliver(topic, replica.tp.state.apply_diff(node, diff))

    def node_down(self, node: str) -> None:
        """A process died (no heartbeat within the backplane's ttl): its members leave every list."""
        if node == self.node:
            return
        self._dead[node] = self._monotonic()
        self._absent.pop(node, None)
        for replica in self.replicas.values():
            replica.buffer = [(n, d) for n, d in replica.buffer if n != node]
            self._deliver(replica.topic, replica.tp.state.remove_node(node))

    def nodes_alive(self, alive: Iterable[str]) -> None:
        """After each heartbeat: entries of processes not alive for ``ttl`` leave; a process alive
        again (Redis lost its data and it wrote its entries again) has its topics read again; lists
        that could not be read or written are read again."""
        alive = set(alive)
        now = self._monotonic()
        present: Dict[str, List[Replica]] = {}
        for replica in self.replicas.values():
            for node in replica.tp.state.nodes():
                if node != self.node:
                    present.setdefault(node, []).append(replica)
        for node in present:
            if node not in alive and node not in self._dead:
                self._absent.setdefault(node, now)
        ttl = self.backplane.ttl or 0.0
        for node, since in list(self._absent.items()):
            if node not in present:
                del self._absent[node]
            elif node in alive:
                del self._absent[node]
                for replica in present[node]:
                    replica.dirty = True
            elif now - since >= ttl:
                log.warning("presence: process %s is not alive for %.0fs: its %d topic(s) of members leave here",
                            node, now - since, len(present[node]))
                self.node_down(node)
        for node, since in list(self._dead.items()):
            if now - since > DEAD_MEMORY_SECONDS:
                del self._dead[node]
        if self.backplane.healthy():
            for replica in list(self.replicas.values()):
                if replica.dirty:
                    self._sync_soon(replica)

    async def resync(self, renamed_from: Optional[str] = None) -> None:
        """Read every list again and write this process's entries as they are (after an outage).
        ``renamed_from``: the others gave this process up for dead under that id: its entries
        go on under `node` (here they leave and join again)."""
        if renamed_from is not None:
            self._dead[renamed_from] = self._monotonic()
            for replica in self.replicas.values():
                self._deliver(replica.topic, replica.tp.state.remove_node(renamed_from))
                replica.tp.node = self.node
        replicas = list(self.replicas.values())
        for replica in replicas:
            replica.dirty = True
        await asyncio.gather(*[self._sync(replica) for replica in replicas])
        # A read that was in flight already reads again (``again``): wait for it, bounded.
        deadline = time.monotonic() + LOAD_TIMEOUT
        while any(r.syncing for r in replicas) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def write_failed(self, topic: str) -> None:
        self._replica(topic).dirty = True

    # -- reading a list from the backplane ------------------------------------------------

    def _sync_soon(self, replica: Replica) -> None:
        if replica.syncing:
            replica.again = True
            return
        task = asyncio.ensure_future(self._sync(replica))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sync(self, replica: Replica) -> None:
        if replica.syncing:
            replica.again = True
            return
        replica.syncing = True
        try:
            while True:
                replica.again = False
                replica.dirty = False
                try:
                    async with self._sync_slots:
                        entries, alive = await self.backplane.snapshot(replica.topic)
                except (BrokerUnavailable, asyncio.TimeoutError, OSError) as exc:
                    log.debug("presence: list of %.200s not read (%s)", replica.topic, exc)
                    replica.dirty = True
                    break
                except Exception:
                    log.exception("presence: list of %.200s not read", replica.topic)
                    replica.dirty = True
                    break
                if self.replicas.get(replica.topic) is replica:
                    self._adopt(replica, entries, alive)
                if not replica.again:
                    break
        finally:
            replica.syncing = False
            buffered, replica.buffer = replica.buffer, []
            for node, diff in buffered:
                if node not in self._dead:
                    self._deliver(replica.topic, replica.tp.state.apply_diff(node, diff))
            self._loaded(replica)

    def _adopt(self, replica: Replica, entries: List[Entry], alive: Set[str]) -> None:
        """Take the backplane's `entries` (and the processes `alive`) as the list, this process's
        own entries as they are here; write the correction of this process's entries."""
        tp, me = replica.tp, self.node
        known = tp.state.nodes() - {me}
        chosen = []
        for entry in entries:
            if entry.node in self._dead:
                continue
            if entry.node == me or entry.node in alive or entry.node not in known:
                chosen.append(entry)
        # A process not alive whose entries are here keeps them for now (nodes_alive decides).
        # It is marked absent here, not only at the next heartbeat: if it registers before that
        # heartbeat, the heartbeat would never see it absent, the list would not be read again,
        # and its members who left meanwhile would stay on these pages for good.
        kept = [e for e in tp.state.entries() if e.node in known and e.node not in alive]
        now = self._monotonic()
        for entry in kept:
            self._absent.setdefault(entry.node, now)
        chosen += kept
        local, correction = tp.resync(chosen)
        self._pending.discard(replica.topic)   # the correction covers the window
        self._deliver(replica.topic, local)
        if correction is not None and not self.backplane.local:
            self.backplane.write(replica.topic, correction)

    def _loaded(self, replica: Replica) -> None:
        replica.loaded = True
        waiters, replica.waiters = replica.waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _replica(self, topic: str) -> Replica:
        replica = self.replicas.get(topic)
        if replica is None:
            rule = self.rule_for(topic)
            tp = TopicPresence(self.node, rule.limit if rule is not None else DEFAULT_LIMIT)
            replica = self.replicas[topic] = Replica(topic, tp, loaded=self.backplane.local)
        return replica

    # -- Rails, metrics, time, the end ----------------------------------------------------

    async def listing(self, topic: str) -> dict:
        """The current list of `topic` (``presence_state``'s shape) for GET /presence: this
        process's when it holds the topic, else the backplane's. Raises BrokerUnavailable."""
        replica = self.replicas.get(topic)
        if replica is not None and replica.loaded and not replica.dirty and (
                self.backplane.local or self.backplane.healthy()):
            return replica.tp.state.payload()
        if self.backplane.local:
            return {}
        if not self.backplane.healthy():
            raise BrokerUnavailable("presence backplane unavailable")
        entries, _alive = await self.backplane.snapshot(topic)
        return PresenceState(e for e in entries if e.node not in self._dead).payload()

    def stats(self) -> Dict[str, int]:
        """Entries tracked by this process, and entries (of every process) listed here."""
        return {"tracked": len(self._tracked), "listed": sum(len(r.tp.state) for r in self.replicas.values()),
                "topics": len(self.replicas)}

    def sweep(self, now: float) -> None:
        """Forget the lists of topics without local members, entries of this process or anything
        in flight."""
        hub = self.hub
        for topic, replica in list(self.replicas.items()):
            if (hub.members(topic) or topic in hub.holds or replica.tp.own_count or replica.tp.pending
                    or replica.syncing or replica.dirty or replica.waiters or topic in self._pending):
                continue
            del self.replicas[topic]
        self.full.flush(time.monotonic())

    async def close(self) -> None:
        """Every entry of this process leaves (drain, stop), written before the backplane closes."""
        for replica in self.replicas.values():
            if replica.tp.untrack_all():
                self._pending.add(replica.topic)
        self._tracked.clear()
        self.flush()
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await self.backplane.close()

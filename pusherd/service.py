"""The service every transport plugs its connections into: it carries out what the sessions decide.

A transport (WebSocket, long-poll) turns bytes into calls of ``session.receive`` and hands the
actions to `Service.execute`; everything after that is the same for every transport: replies,
the join flow (broker barrier or history read, held broadcasts, subscription), client pushes
through the broker, the fan-out through the hub, periodic ticks, reload and drain. So a second
transport copies none of it.

A connection, as the service sees it (`Connection`), is a hub member (``serializer``, ``wire``,
``send_frame``) that can also ``send_text`` a message of its own, ``close_with`` a code, and
``tick``; it has a ``session``.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Set, Tuple

from .brokers.base import Broker
from .core import errors
from .core.broadcast import Broadcast
from .core.errors import BrokerUnavailable
from .core.fanout import Hub
from .core.origins import OriginPolicy
from .core.presence import NotTracked
from .core.session import Close, Join, Policy, Publish, Send, Subscribe, Track, Unsubscribe, Untrack
from .logs import StormLog
from .counters import Counters

log = logging.getLogger("pusherd")

#: `Service.refusal` when ``max_new_connections_per_second`` is spent (retried after 1 s).
RATE_LIMITED = "connection rate limited"


class Connection:
    """What the service needs of a transport's connection (a protocol)."""

    session: Any
    serializer: Any
    wire: Any

    def send_frame(self, frame: Any) -> None:  # pragma: no cover - protocol
        """A broadcast frame, shared with the other members of the topic (hub)."""

    def send_text(self, text: str) -> None:  # pragma: no cover - protocol
        """A message for this connection alone (a reply, a replayed broadcast)."""

    def close_with(self, code: int, reason: str) -> None:  # pragma: no cover - protocol
        """End the connection (WebSocket close code; long-poll ends the session)."""

    def tick(self, now: float) -> None:  # pragma: no cover - protocol
        """The periodic check (the service's sweep calls it)."""


@dataclass(frozen=True)
class Config:
    """What connections and requests consult, built from the settings; a reload replaces it whole
    (`Service.reload`): nothing in it is ever mutated."""

    settings: Any               # config.Settings
    policy: Policy              # what sessions consult on joins and pushes
    origins: OriginPolicy       # which pages may open a connection
    publish_secrets: Tuple[str, ...]


class Refusals:
    """Refusals that come in storms (every client of a full or stopping process retries): one
    line per 10 s at most, with a count (logs.StormLog). The daemon's sweep flushes them."""

    def __init__(self):
        self.connections = StormLog("refused %d connection(s) with 503: max_connections (%d) reached")
        self.draining = StormLog("refused %d connection(s) with 503: shutting down", logging.INFO)
        self.http = StormLog("refused %d new HTTP connection(s) with 503: max_http_connections (%d) reached"
                             " and no connection left it for a while (every one inside a request)")
        self.http_paused = StormLog("stopped accepting %d time(s): max_http_connections (%d) reached, no"
                                    " connection to close yet (new connections wait in the listen queue)")
        self.rate = StormLog("refused %d connection(s) with 503: max_new_connections_per_second (%d) reached")
        self.http_evictions = StormLog("closed %d HTTP connection(s) waiting for a request to let new ones in:"
                                       " max_http_connections (%d) reached")

    def flush(self, now: float) -> None:
        for storm in (self.connections, self.draining, self.rate, self.http, self.http_paused, self.http_evictions):
            storm.flush(now)


class ConnectionRate:
    """``max_new_connections_per_second``: a token bucket on new connections (WebSocket upgrades,
    long-poll sessions), ``rate`` tokens a second up to a burst of ``rate``; 0 is no limit. The
    rate is passed at each take, so a reload applies to the next connection (the bucket keeps
    what it holds, up to the new burst). Time comes in as ``now`` (time.monotonic)."""

    __slots__ = ("rate", "tokens", "stamp")

    def __init__(self):
        self.rate = 0
        self.tokens = 0.0
        self.stamp = 0.0

    def take(self, rate: int, now: float) -> bool:
        if rate <= 0:
            self.rate = 0
            return True
        if self.rate <= 0:  # first use, or the limit was off: a full bucket
            self.tokens, self.stamp = float(rate), now
        self.rate = rate
        self.tokens = min(float(rate), self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Service:
    """Sessions' actions carried out against the hub and the broker, for every transport; the
    state every transport's handlers share: the current `Config`, the open connections, the
    HTTP requests in flight, the counters. Handlers get it through ``initialize()``.

    ``freezer``: the process's garbage-collector freezer (fast/gc.py), told of every connection
    that opens and closes; None to leave the collector alone (tests, PUSHERD_FAST=0).
    ``presence``: the process's `PresenceService` (None: no presence topics; one over the
    broker's backplane is made when the policy lists presence topics).
    """

    def __init__(self, broker: Broker, config: Config, counters: Optional[Counters] = None,
                 hub: Optional[Hub] = None, freezer=None, presence=None):
        self.broker = broker
        self.config = config
        self.counters = counters if counters is not None else Counters()
        self.hub = hub if hub is not None else Hub(broker.subscribe, broker.unsubscribe, counters=self.counters)
        if presence is None and config.policy.presence:
            from .presence_service import PresenceService
            presence = PresenceService(config.policy.presence, broker.presence_backplane(), self.hub, self.counters)
        self.presence = presence
        self.freezer = freezer
        self.connections: Set[Connection] = set()
        self.requests: Set[Any] = set()   # HTTP requests being answered (a drain lets them finish)
        self.refusals = Refusals()
        self.connection_rate = ConnectionRate()
        self.draining = False
        self.tasks: Set[asyncio.Future] = set()

    @property
    def policy(self) -> Policy:
        return self.config.policy

    # -- connections ------------------------------------------------------------------------

    def opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        if self.freezer is not None:
            self.freezer.on_open()

    def closed(self, conn: Connection) -> None:
        """The connection is gone: out of every topic and presence list, its session ended."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        if self.freezer is not None:
            self.freezer.on_close()
        session = conn.session
        if session is not None:
            self.execute(conn, session.end())

    def has_room(self) -> bool:
        """Whether one more connection may open, noting nothing (fast/upgrade.py asks first;
        a refusal is then `refusal`'s to note). Takes no token of the rate: `take_rate` does."""
        return not self.draining and len(self.connections) < self.config.settings.max_connections

    def take_rate(self) -> bool:
        """A token of ``max_new_connections_per_second`` for a connection about to open (True),
        or False when none is left, noting nothing (then `refusal` refuses and notes it)."""
        rate = self.config.settings.max_new_connections_per_second
        return not rate or self.connection_rate.take(rate, time.monotonic())

    def refusal(self) -> Optional[str]:
        """Why one more connection cannot open (draining, ``max_connections`` reached, or
        ``max_new_connections_per_second`` spent), noted in the storm logs; None when it can."""
        now = time.monotonic()
        if self.draining:
            self.refusals.draining.note(now)
            return "shutting down"
        settings = self.config.settings
        limit = settings.max_connections
        if len(self.connections) >= limit:
            self.refusals.connections.note(now, limit)
            return "too many connections"
        rate = settings.max_new_connections_per_second
        if rate and not self.connection_rate.take(rate, now):
            self.refusals.rate.note(now, rate)
            return RATE_LIMITED
        return None

    # -- actions ------------------------------------------------------------------------------

    def receive(self, conn: Connection, frame) -> None:
        """One frame from the client, decided by its session and carried out."""
        self.counters.frames_received += 1
        self.execute(conn, conn.session.receive(frame, time.time()))

    def execute(self, conn: Connection, actions) -> None:
        hub = self.hub
        for action in actions:
            kind = type(action)
            if kind is Send:
                conn.send_text(action.text)
            elif kind is Subscribe:
                hub.subscribe(action.topic, conn)
            elif kind is Unsubscribe:
                hub.unsubscribe(action.topic, conn)
            elif kind is Join:
                self.join(conn, action)
            elif kind is Publish:
                self.spawn(self._push(conn, action))
            elif kind is Track:
                self.presence.track(conn, action)
            elif kind is Untrack:
                self.presence.untrack(conn, action)
            elif kind is Close:
                conn.close_with(action.code, action.reason)

    def join(self, conn: Connection, join: Join) -> None:
        """Answer a join: at once when the broker already delivers the topic here (and holds its
        presence list, on a presence topic), else once it has confirmed the subscription (or
        read the history after ``since``) and the list is read."""
        presence = self.presence if join.presence is not None else None
        if isinstance(join.presence, NotTracked):
            self.counters.presence_untracked[join.presence.reason] += 1
        if not join.recover and self.broker.active(join.topic) and (presence is None or presence.ready(join.topic)):
            state = presence.state_text(join.topic) if presence is not None else None
            self.execute(conn, conn.session.joined(join, presence_state=state))
        else:
            self.spawn(self._join_when_ready(conn, join))

    async def _join_when_ready(self, conn: Connection, join: Join) -> None:
        """The broker step of a join. Broadcasts meanwhile are held and follow the reply: an
        event published anywhere after the client saw its join reply reaches it, and a replay
        has no gap and no duplicate."""
        topic, held = join.topic, []
        self.hub.hold(topic, held)
        try:
            recovery = None
            if join.recover:
                try:
                    recovery = await self.broker.recover(topic, join.since)
                except Exception as exc:  # e.g. the broker is down: the page must refetch
                    log.warning("history lookup failed for %.200s: %s", topic, exc)
                outcome = "recovered" if recovery is not None and recovery.recovered else "not_recovered"
                self.counters.recoveries[outcome] += 1
                if outcome == "recovered":
                    self.counters.replayed += len(recovery.missed)
            else:
                try:
                    await self.broker.activate(topic)
                except Exception as exc:  # broker down: joined all the same, delivery resumes with it
                    log.debug("subscription to %.200s not confirmed by the broker: %s", topic,
                              exc or type(exc).__name__)
            state = None
            if join.presence is not None and self.presence is not None:
                await self.presence.prepare(topic)
                state = self.presence.state_text(topic)
            self.execute(conn, conn.session.joined(join, recovery, held, state))
        finally:
            self.hub.release(topic, held)

    async def _push(self, conn: Connection, push: Publish) -> None:
        session = conn.session
        try:
            await self.publish(Broadcast(push.topic, push.event, push.payload), client=True)
        except BrokerUnavailable:
            reply = session.push_error(push, errors.UNAVAILABLE)
        else:
            reply = session.push_ok(push)
        conn.send_text(reply.text)

    # -- pub/sub ------------------------------------------------------------------------------

    async def publish(self, broadcast: Broadcast, client: bool = False) -> Optional[str]:
        """Hand a broadcast to the broker; raises BrokerUnavailable instead of dropping it.
        ``client``: a push from a connection (kept in history only under ``client_pushes``)."""
        if broadcast.published_at is None:
            broadcast.published_at = time.time()
        return await self.broker.publish(broadcast, client)

    async def publish_batch(self, broadcasts) -> List[Optional[str]]:
        """A POST /publish body: every broadcast or none (see the broker's publish_batch)."""
        now = time.time()
        for broadcast in broadcasts:
            if broadcast.published_at is None:
                broadcast.published_at = now
        return await self.broker.publish_batch(broadcasts)

    def deliver(self, broadcast: Broadcast) -> None:
        """The broker's callback: a broadcast for this process's members."""
        counters = self.counters
        counters.messages_received += 1
        if self.hub.broadcast(broadcast) and broadcast.published_at is not None:
            counters.latency.observe(time.time() - broadcast.published_at)

    # -- time, reload, tasks ------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Every connection's periodic check (one timer for all of them)."""
        for conn in list(self.connections):
            try:
                conn.tick(now)
            except Exception:
                log.exception("sweep failed for one connection")
        self.refusals.flush(time.monotonic())
        if self.presence is not None:
            self.presence.sweep(now)
        if self.freezer is not None:
            self.freezer.maybe_refreeze(len(self.connections))

    def reload(self, config: Config) -> None:
        """Swap the config: every open session consults the new policy from its next frame on."""
        self.config = config
        for conn in self.connections:
            if conn.session is not None:
                conn.session.policy = config.policy

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

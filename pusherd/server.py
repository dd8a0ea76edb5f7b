"""The daemon: wires settings, broker, hub and handlers; binds, serves, reloads and drains."""

import asyncio
import collections
import logging
import signal
import socket
import time
from typing import Callable, Iterable, List, Optional

import tornado.httpserver
import tornado.netutil
import tornado.web

from .broker import Broadcast, Broker, MemoryBroker
from .framing import text_frame
from .history import Rules, parse_position, pending_after
from .handlers import HealthHandler, NotFoundHandler, PublishHandler, SocketHandler, log_request
from .hub import Hub
from .origins import OriginPolicy
from .session import Limits, Policy
from .tokens import Verifier

log = logging.getLogger("pusherd")

SWEEP_SECONDS = 2.0


def build_verifier(settings) -> Verifier:
    return Verifier(settings.guardian_secrets, algorithm=getattr(settings, "guardian_algorithm", "HS256"),
                    public_key=getattr(settings, "guardian_public_key", None), issuers=settings.issuer)


def build_limits(settings) -> Limits:
    return Limits(heartbeat_timeout=settings.heartbeat_timeout, max_topic_length=settings.max_topic_length,
                  max_channels=settings.max_channels_per_socket, push_rate=settings.client_push_rate,
                  push_burst=settings.client_push_burst)


def build_broker(settings) -> Broker:
    if settings.broker == "memory":
        return MemoryBroker(Rules(settings.history), settings.max_recovery)
    raise RuntimeError("broker %r is not supported by this build" % settings.broker.split("://", 1)[0])


class Daemon:
    """Everything one pusherd process shares between its handlers. No module-level state."""

    def __init__(self, settings, broker: Optional[Broker] = None):
        self.settings = settings
        self.policy = Policy(build_verifier(settings), build_limits(settings))
        self.origins = OriginPolicy(settings.allowed_origins)
        self.publish_secrets = (settings.publish_secret,)
        self.broker = broker if broker is not None else build_broker(settings)
        self.hub = Hub(on_first=self.broker.subscribe, on_last=self.broker.unsubscribe)
        self.sockets = set()
        self.draining = False
        self.stats = collections.Counter()
        self._tasks = set()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._servers: List[tornado.httpserver.HTTPServer] = []
        self._app: Optional[tornado.web.Application] = None
        self._sweeper: Optional[asyncio.Task] = None
        self.bound: List[tuple] = []

    # -- the application ------------------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        s = self.settings
        deps = {"daemon": self}
        path = s.path.rstrip("/")
        routes = [
            (path + "/websocket", SocketHandler, deps),
            (path or "/", SocketHandler, dict(deps, legacy_path=True)),
            ("/publish", PublishHandler, deps),
            ("/healthz", HealthHandler, deps),
        ]
        return tornado.web.Application(
            routes,
            default_handler_class=NotFoundHandler, default_handler_args=deps,
            log_function=log_request,
            websocket_max_message_size=s.max_frame_bytes,
            compress_response=False,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, sockets: Optional[Iterable[socket.socket]] = None) -> None:
        """Start the broker, bind (or adopt inherited sockets) and begin serving."""
        self._loop = asyncio.get_running_loop()
        await self.broker.start(self.deliver)
        s = self.settings
        if sockets is None:
            sockets = tornado.netutil.bind_sockets(s.port, s.host, reuse_port=s.reuse_port, backlog=1024)
        sockets = list(sockets)
        self._app = self.make_app()
        server = tornado.httpserver.HTTPServer(
            self._app, idle_connection_timeout=60, body_timeout=30,
            max_body_size=s.max_publish_bytes + 1, max_header_size=16384)
        server.add_sockets(sockets)
        self._servers.append(server)
        self.bound = [sock.getsockname() for sock in sockets]
        self._sweeper = asyncio.ensure_future(self._sweep_forever())

    @property
    def port(self) -> int:
        return self.bound[0][1]

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.sweep(time.time())

    def sweep(self, now: float) -> None:
        broker_sweep = getattr(self.broker, "sweep", None)
        if broker_sweep is not None:
            broker_sweep(now)
        for handler in list(self.sockets):
            try:
                handler.tick(now)
            except Exception:
                log.exception("sweep failed for one socket")

    def call_soon(self, callback: Callable) -> None:
        self._loop.call_soon(callback)

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- pub/sub --------------------------------------------------------------------------

    def subscribe(self, topic: str, subscriber, params: dict) -> None:
        self.hub.subscribe(topic, subscriber)

    async def publish(self, broadcast: Broadcast) -> Optional[str]:
        """Hand a broadcast to the broker; raises BrokerUnavailable instead of dropping it."""
        return await self.broker.publish(broadcast)

    def deliver(self, broadcast: Broadcast) -> None:
        self.hub.broadcast(broadcast)

    async def recover_join(self, handler, action) -> None:
        """Answer a join with ``since``: reply, replay what was missed in order, then go live.

        Broadcasts that arrive while the broker looks up the history are held for this join
        and released after the replay, minus those the replay already covered.
        """
        topic, session = action.topic, handler.session
        held: list = []
        self.hub.hold(topic, held)
        try:
            try:
                recovery = await self.broker.recover(topic, action.since)
            except Exception as exc:  # e.g. the broker is down: the page must refetch
                log.warning("history lookup failed for %.200s: %s", topic, exc)
                recovery = None
            if session is None or session.closed or not session.is_current(topic, action.join_ref):
                return
            if recovery is None:
                response = {"recovered": False, "position": None}
            else:
                response = {"recovered": recovery.recovered, "position": recovery.position}
            handler.execute([session.join_reply(action, response)])
            serializer = session.serializer
            last = parse_position(recovery.position)[1] if recovery and recovery.position else 0
            if recovery is not None and recovery.recovered:
                for entry in recovery.missed:
                    ref = "%s:%d" % (recovery.epoch, entry.offset)
                    text = serializer.encode_broadcast(topic, entry.event, entry.payload, ref)
                    handler.send_frame(text_frame(text.encode("utf-8")))
            for broadcast in pending_after(held, last):
                text = serializer.encode_broadcast(topic, broadcast.event, broadcast.payload, broadcast.position)
                handler.send_frame(text_frame(text.encode("utf-8")))
            self.hub.subscribe(topic, handler)
        finally:
            self.hub.release(topic, held)

    # -- reload and drain -----------------------------------------------------------------

    def reload(self, settings) -> List[str]:
        """Apply what can change live; return the keys that need a restart to take effect."""
        policy = Policy(build_verifier(settings), build_limits(settings))
        origins = OriginPolicy(settings.allowed_origins)
        restart = []
        if hasattr(self.settings, "restart_required"):
            restart = self.settings.restart_required(settings)
        self.policy.verifier, self.policy.limits = policy.verifier, policy.limits
        self.origins = origins
        self.publish_secrets = (settings.publish_secret,)
        if self._app is not None:
            self._app.settings["websocket_max_message_size"] = settings.max_frame_bytes
        self.settings = settings
        return restart

    async def drain(self, seconds: float) -> None:
        """Stop accepting; close every socket with 1001, in batches spread over `seconds`."""
        self.draining = True
        for server in self._servers:
            server.stop()
        handlers = list(self.sockets)
        batches = max(1, min(len(handlers), int(seconds * 10)))
        per_batch = -(-len(handlers) // batches) if handlers else 0
        pause = seconds / batches if handlers else 0
        for i in range(0, len(handlers), per_batch or 1):
            for handler in handlers[i:i + per_batch]:
                handler.close_with(1001, "server shutting down")
            if i + per_batch < len(handlers):
                await asyncio.sleep(pause)
        # In-flight publishes finish; then give close frames a moment to leave.
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        deadline = time.monotonic() + 2.0
        while self.sockets and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.stop()
            await server.close_all_connections()
        self._servers = []
        await self.broker.close()


async def serve(settings, reload_settings: Optional[Callable[[], object]] = None,
                stop_event: Optional[asyncio.Event] = None) -> int:
    """Run until SIGTERM/SIGINT; reload on SIGHUP. Returns the process exit code."""
    from . import systemd

    loop = asyncio.get_running_loop()
    daemon = Daemon(settings)
    inherited = systemd.listen_fds()
    http_socks = [sock for name, sock in inherited if name in ("http", "unknown", "")] if inherited else None
    await daemon.start(http_socks or None)
    where = ", ".join("%s:%s" % addr[:2] for addr in daemon.bound)
    log.info("pusherd serving on %s (env %s, path %s%s)", where, settings.env, settings.path,
             ", inherited sockets" if http_socks else "")
    systemd.ready("serving on %s" % where)

    stop = stop_event or asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_hup():
        systemd.reloading()
        try:
            if reload_settings is None:
                raise RuntimeError("no configuration file to reload")
            new = reload_settings()
            restart = daemon.reload(new)
            log.info("configuration reloaded%s", "; restart needed for: " + ", ".join(restart) if restart else "")
        except Exception as exc:  # a bad config is refused, the old one stays in force
            log.error("reload refused, keeping the running configuration: %s", exc)
        systemd.ready(_status(daemon))

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    watchdog = systemd.watchdog_interval()
    pinger = None
    if watchdog:
        async def ping():
            while True:
                systemd.watchdog()
                await asyncio.sleep(watchdog)
        pinger = asyncio.ensure_future(ping())

    async def report():
        while True:
            await asyncio.sleep(10)
            systemd.status(_status(daemon))
    reporter = asyncio.ensure_future(report())

    await stop.wait()
    log.info("shutting down: draining %d sockets over %.1fs", len(daemon.sockets), daemon.settings.drain_seconds)
    systemd.stopping("draining %d sockets" % len(daemon.sockets))
    await daemon.drain(daemon.settings.drain_seconds)
    for task in (pinger, reporter):
        if task is not None:
            task.cancel()
    await daemon.close()
    log.info("stopped")
    return 0


def _status(daemon: Daemon) -> str:
    return "%d sockets, %d topics, broker %s%s" % (
        len(daemon.sockets), len(daemon.hub.topics), daemon.broker.describe(),
        "" if daemon.broker.healthy() else " (unavailable)")

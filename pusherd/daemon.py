"""The daemon: builds the parts from the settings, binds, serves, reloads and drains.

One `Daemon` per process (several in a test process): the broker, the hub and the service
(pusherd/service.py) that every transport's connections plug into, the Tornado application
(transports/app.py), the listener (fast/listener.py) and the metrics endpoint. `serve` runs it
under systemd's protocol: readiness, watchdog, reload on SIGHUP, drain on SIGTERM.
"""

import asyncio
import logging
import os
import resource
import signal
import socket
import time
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import tornado.netutil
import tornado.web

from . import fast
from .brokers import Broker, build_broker
from .core.access import compile_event_patterns
from .core.errors import StartupError
from .core.fanout import Hub, PlainGroup
from .core.origins import OriginPolicy
from .core.presence import PresenceRule, PresenceRules
from .core.session import Limits, Policy
from .core.tokens import Verifier
from .fast.listener import MAX_HEADER_SIZE, Server
from .logs import install_tornado_redaction
from .counters import Counters
from .service import Config, Service
from .transports.app import make_app
from .transports.http import PublishHandler, log_request
from .transports.longpoll import LongPollSessions, Relay

log = logging.getLogger("pusherd")

SWEEP_SECONDS = 2.0
#: After the 1001 closes: how long in-flight client pushes may take to finish.
TASK_GRACE_SECONDS = 5.0
#: After the 1001 closes: how long accepted HTTP requests (publishes) may take to finish before
#: the remaining connections are closed. Without it, requests accepted just before the stop
#: but not yet read fail during a restart (reference/systemd.md, section 6.1).
HTTP_GRACE_SECONDS = 2.0
#: How long close frames get to leave before the process exits.
CLOSE_WAIT_SECONDS = 2.0
#: The listen queue's length asked for: a reconnect storm's connections wait there while
#: max_http_connections is reached (fast/listener.py stops accepting then). The kernel caps it at
#: net.core.somaxconn (4096 since Linux 5.4), so this is "as deep as the host allows"; past it,
#: the kernel drops SYNs and clients retry them (1 s, then 3 s...). systemd/pusherd.socket asks
#: for Backlog=4096 for an inherited listener.
LISTEN_BACKLOG = 65535
#: Ceiling for the soft RLIMIT_NOFILE when the hard limit is "unlimited".
NOFILE_CEILING = 1 << 20
#: STATUS= goes out every STATUS_EVERY_SECONDS, and within STATUS_POLL_SECONDS of the broker
#: going down or coming back.
STATUS_POLL_SECONDS = 1.0
STATUS_EVERY_SECONDS = 10.0


def presence_rules(settings) -> PresenceRules:
    return PresenceRules(PresenceRule(r.topics, r.key, list(r.meta), r.limit) for r in settings.presence)


def build_config(settings, joins=None, presence: Optional[PresenceRules] = None) -> Config:
    """Everything connections and requests consult, from the settings (a reload builds anew).
    ``presence``: the rules the process started with (a restart key: a reload keeps them)."""
    verifier = Verifier(settings.guardian_secrets, algorithm=settings.guardian_algorithm,
                        public_key=settings.guardian_public_key, issuers=settings.issuer)
    limits = Limits(heartbeat_timeout=settings.heartbeat_timeout, max_topic_length=settings.max_topic_length,
                    max_channels=settings.max_channels_per_socket, push_rate=settings.client_push_rate,
                    push_burst=settings.client_push_burst,
                    client_events=compile_event_patterns(settings.client_events))
    presence = presence_rules(settings) if presence is None else presence
    return Config(settings=settings, policy=Policy(verifier, limits, joins, presence),
                  origins=OriginPolicy(settings.allowed_origins), publish_secrets=(settings.publish_secret,))


class Daemon:
    """One pusherd: its parts, and their lifecycle. No module-level state.

    ``fast``: the speed-ups (pusherd/fast/; default: ``PUSHERD_FAST``); ``freezer``: the
    process's garbage-collector freezer (fast.gc.GcFreezer, made once per process by `serve`).
    """

    def __init__(self, settings, broker: Optional[Broker] = None, fast_paths: Optional[bool] = None,
                 freezer=None):
        self.settings = settings
        self.fast = fast.enabled() if fast_paths is None else fast_paths
        counters = Counters()
        self.broker = broker if broker is not None else build_broker(settings, counters.broker)
        self.rounds = None
        make_group = PlainGroup
        if self.fast:
            from .fast.direct import FlushQueue, make_group as direct_group
            self.rounds = FlushQueue()
            make_group = direct_group(self.rounds, PlainGroup)
        hub = Hub(self.broker.subscribe, self.broker.unsubscribe, make_group=make_group, counters=counters)
        config = build_config(settings, counters.joins)
        presence = None
        if config.policy.presence:
            from .presence_service import PresenceService
            presence = PresenceService(config.policy.presence, self.broker.presence_backplane(settings.presence_ttl),
                                       hub, counters, interval=settings.presence_interval)
        self.service = Service(self.broker, config, counters, hub, freezer, presence)
        self.longpoll = LongPollSessions(self.service)
        self._servers: List[Server] = []
        self._app: Optional[tornado.web.Application] = None
        self._sweeper: Optional[asyncio.Task] = None
        self._boot_settings = settings
        self.metrics = None  # metrics.MetricsServer when `metrics:` is configured
        self.bound: List[tuple] = []
        self.metrics_sockets: List[socket.socket] = []
        self.generation = 1  # config generation, +1 per successful reload

    # -- the application ------------------------------------------------------------------

    def make_app(self) -> tornado.web.Application:
        if self.fast:
            from .fast.websocket import FastSocketHandler
            return make_app(self.service, FastSocketHandler, {"rounds": self.rounds}, log_function=self._log_request,
                            longpoll=self.longpoll)
        return make_app(self.service, log_function=self._log_request, longpoll=self.longpoll)

    def _log_request(self, handler: tornado.web.RequestHandler) -> None:
        if isinstance(handler, PublishHandler):
            self.service.counters.publish_requests[handler.get_status()] += 1
        log_request(handler)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, sockets: Optional[Iterable[socket.socket]] = None,
                    metrics_sockets: Iterable[socket.socket] = ()) -> None:
        """Start the broker, bind (or adopt inherited sockets) and begin serving.

        ``sockets``: listening sockets for the main HTTP/WebSocket app (None: bind the
        configured address). ``metrics_sockets``: inherited listeners named ``metrics``
        (socket activation); kept in ``self.metrics_sockets`` for the metrics endpoint to
        serve instead of binding ``metrics.listen`` itself, and closed by ``close()``.
        """
        self.metrics_sockets = list(metrics_sockets or ())
        install_tornado_redaction()
        if self.settings.metrics is not None:
            from .metrics import MetricsServer
            self.metrics = MetricsServer(self.service, self.settings.metrics)  # MetricsUnavailable without the client
        await self.broker.start(self.service.deliver)
        if self.service.presence is not None:
            await self.service.presence.start()
        if self.broker.name != "memory":  # other processes may get this one's long-poll sessions' polls
            self.longpoll.relay = Relay(self.longpoll)
            await self.longpoll.relay.start()
        s = self.settings
        if sockets is None:
            sockets = tornado.netutil.bind_sockets(s.port, s.host, reuse_port=s.reuse_port, backlog=LISTEN_BACKLOG)
        sockets = list(sockets)
        self._app = self.make_app()
        server = Server(
            self._app,
            idle_connection_timeout=s.http_header_timeout, body_timeout=s.http_body_timeout,
            max_body_size=s.max_publish_bytes + 1, max_header_size=MAX_HEADER_SIZE,
            # Also each IOStream's read size: a 64 KB default buffer per read, during a storm
            # of thousands of handshakes, fragments the heap for good.
            chunk_size=16384)
        server.service = self.service  # max_http_connections, the refusal logs
        if self.fast:  # publisher connections on the lean path (fast/front.py)
            from .fast.front import PublishConnections
            server.front = PublishConnections(self.service, server)
            from .fast.upgrade import Upgrades
            server.front.upgrades = Upgrades(self.service, self.rounds, server.front.date, server.front.loop)
        server.add_sockets(sockets)
        self._servers.append(server)
        self.bound = [sock.getsockname() for sock in sockets]
        if self.metrics is not None:
            self.metrics.start(self.metrics_sockets)
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        if self.service.freezer is not None:
            from .fast.gc import tune_gc
            tune_gc()

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
        self.service.sweep(now)

    # -- reload and drain -----------------------------------------------------------------

    def reload(self, settings) -> List[str]:
        """Apply what can change live; return the keys that need a restart to take effect."""
        restart = self._boot_settings.restart_required(settings)  # a listen change stays pending
        self.service.reload(build_config(settings, self.service.counters.joins, self.service.config.policy.presence))
        if self._app is not None:
            self._app.settings["websocket_max_message_size"] = settings.max_frame_bytes
        for server in self._servers:  # new connections get the new HTTP timeouts
            server.apply_timeouts(settings.http_header_timeout, settings.http_body_timeout)
        self.settings = settings
        self.generation += 1
        return restart

    def drain_budget(self, seconds: float) -> float:
        """Upper bound of ``drain(seconds)``, for EXTEND_TIMEOUT_USEC."""
        return seconds + TASK_GRACE_SECONDS + HTTP_GRACE_SECONDS + CLOSE_WAIT_SECONDS

    async def drain(self, seconds: float) -> None:
        """Stop accepting; close every connection with 1001, in batches spread over ``seconds``
        (so that thousands of phoenix.js clients, which retry after 10 ms without jitter,
        do not all reconnect in the same instant); let in-flight publishes finish."""
        service = self.service
        service.draining = True
        for server in self._servers:
            server.stop()  # an inherited listener stays open in systemd: new connections queue
        conns = list(service.connections)
        # up to 10 batches a second, sizes differing by at most one, the first one at once
        batches = max(1, min(len(conns), int(seconds * 10)))
        for b in range(batches):
            if b:
                await asyncio.sleep(seconds / batches)
            for conn in conns[b * len(conns) // batches:(b + 1) * len(conns) // batches]:
                if conn in service.connections:
                    conn.close_with(1001, "server shutting down")
        if service.tasks:  # client pushes on their way to the broker
            await asyncio.wait(list(service.tasks), timeout=TASK_GRACE_SECONDS)
        # Accepted HTTP requests finish; every answer now says Connection: close.
        deadline = time.monotonic() + HTTP_GRACE_SECONDS
        while (service.requests or self._open_http_connections()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + CLOSE_WAIT_SECONDS
        while service.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def _open_http_connections(self) -> int:
        return sum(server.http_connections() for server in self._servers)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.stop()
            if server.front is not None:
                server.front.close_all()
            await server.close_all_connections()
        self._servers = []
        if self.metrics is not None:
            await self.metrics.close()
        for sock in self.metrics_sockets:
            sock.close()
        self.metrics_sockets = []
        if self.service.presence is not None:  # this process's entries leave, before the broker goes
            await self.service.presence.close()
        await self.broker.close()


def raise_nofile_limit() -> Tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (systemd leaves the soft one at 1024 for
    select() users; pusherd uses epoll). Returns (old soft, new soft)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def split_inherited(inherited: Sequence[Tuple[str, socket.socket]]):
    """Socket-activated listeners -> (http sockets, metrics sockets).

    ``http`` is the main listener; without any ``http``, unnamed ones (``unknown``, or the
    socket unit's name when it sets no FileDescriptorName=) are taken for it. Anything that
    is not a listening stream socket, or has another name, is closed with a warning.
    """
    from . import systemd

    http, metrics, other = [], [], []
    for name, sock in inherited:
        if not systemd.is_stream_listener(sock):
            log.warning("socket activation: ignoring %r, not a listening stream socket", name)
            sock.close()
        elif name == "http":
            http.append(sock)
        elif name == "metrics":
            metrics.append(sock)
        else:
            other.append((name, sock))
    for name, sock in other:
        if not http and (name in ("unknown", "") or name.endswith(".socket")):
            http.append(sock)
        else:
            log.warning("socket activation: ignoring listener named %r (expected http or metrics)", name)
            sock.close()
    return http, metrics


async def serve(settings, reload_settings: Optional[Callable[[], object]] = None,
                stop_event: Optional[asyncio.Event] = None) -> int:
    """Run until SIGTERM/SIGINT; reload on SIGHUP. Returns the process exit code.

    systemd protocol: READY=1 once the listeners are served; WATCHDOG=1 from the event
    loop every WATCHDOG_USEC/2; STATUS= every 10 s; RELOADING=1 + MONOTONIC_USEC ... READY=1
    around a reload (also a refused one); STOPPING=1 and EXTEND_TIMEOUT_USEC during the drain.
    """
    from . import logs, systemd

    loop = asyncio.get_running_loop()
    old_soft, new_soft = raise_nofile_limit()
    # gc.freeze() acts on the whole process: the one freezer is made here, by the process's entry.
    freezer = None
    if fast.enabled():
        from .fast.gc import GcFreezer
        freezer = GcFreezer()
    daemon = Daemon(settings, freezer=freezer)
    http_socks, metrics_socks = split_inherited(systemd.listen_fds())
    if metrics_socks and not http_socks:
        log.warning("socket activation passed no 'http' listener: binding %s:%s", settings.host, settings.port)
    await daemon.start(http_socks or None, metrics_sockets=metrics_socks)
    where = ", ".join("%s:%s" % addr[:2] for addr in daemon.bound)
    log.info("pusherd serving on %s (env %s, path %s%s, open files limit %d)", where, settings.env,
             settings.path, ", inherited sockets" if http_socks else "", new_soft)
    if metrics_socks:
        log.info("holding %d inherited metrics socket(s) for the metrics endpoint", len(metrics_socks))
    if not daemon.broker.healthy():
        # Sockets are served all the same; publishes get 503 until the broker is back.
        log.warning("broker %s unavailable at start: serving sockets, refusing publishes until it is back",
                    daemon.broker.describe())

    stop = stop_event or asyncio.Event()

    def on_stop(name: str) -> None:
        log.info("%s received", name)
        # a second SIGTERM/SIGINT takes the default action (exit at once)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_stop, "SIGINT")

    def on_hup() -> None:
        systemd.reloading("reloading configuration")
        try:
            if reload_settings is None:
                raise RuntimeError("no configuration file to reload")
            new = reload_settings()
            logs.parse_level(new.log_level)
        except Exception as exc:  # a bad config is refused, the old one stays in force
            problems = getattr(exc, "problems", None) or [str(exc)]
            log.error("reload refused, keeping configuration gen %d: %s", daemon.generation, "; ".join(problems))
            systemd.ready(_status(daemon, "reload refused, see the log"))
            return
        old_level = logs.parse_level(daemon.settings.log_level)
        changed = daemon.settings.changed_keys(new)
        restart = daemon.reload(new)
        live = [k for k in changed if k not in restart]
        # the summary is logged at the more verbose of the old and the new level
        logs.set_level(min(old_level, logs.parse_level(new.log_level)))
        log.info("configuration reloaded (gen %d); applied: %s", daemon.generation, ", ".join(live) or "no changes")
        if restart:
            log.warning("configuration keys changed that need a restart to take effect: %s", ", ".join(restart))
        logs.set_level(new.log_level)
        systemd.ready(_status(daemon))

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    _install_debug_hooks(loop)
    # Only now: `systemctl reload` right after start must find the SIGHUP handler in place.
    systemd.ready(_status(daemon))

    background = []
    watchdog = systemd.watchdog_interval()
    if watchdog:
        async def ping():
            # From the event loop itself: a blocked loop stops the pings and systemd
            # restarts the service (WatchdogSec=).
            while True:
                systemd.watchdog()
                await asyncio.sleep(watchdog)
        background.append(asyncio.ensure_future(ping()))

    async def report():
        # STATUS= every 10 s, and within a second of the broker going down or coming back.
        last, since = daemon.broker.healthy(), time.monotonic()
        while True:
            await asyncio.sleep(STATUS_POLL_SECONDS)
            healthy = daemon.broker.healthy()
            if healthy != last or time.monotonic() - since >= STATUS_EVERY_SECONDS:
                systemd.status(_status(daemon))
                last, since = healthy, time.monotonic()
    background.append(asyncio.ensure_future(report()))

    await stop.wait()
    seconds = daemon.settings.drain_seconds
    budget = daemon.drain_budget(seconds)
    count = len(daemon.service.connections)
    log.info("shutting down: draining %d connections over %.1fs", count, seconds)
    systemd.stopping("draining %d connections over %.1fs" % (count, seconds))

    async def extend():
        # Only counts once TimeoutStopSec has passed; then each message buys the time our own
        # bounded drain may still take. A hung loop sends nothing and gets killed.
        deadline = time.monotonic() + budget
        while True:
            systemd.extend_timeout(max(0.0, deadline - time.monotonic()) + 2.0)
            await asyncio.sleep(1.0)
    background.append(asyncio.ensure_future(extend()))
    try:
        await asyncio.wait_for(daemon.drain(seconds), timeout=budget)
    except asyncio.TimeoutError:
        log.warning("drain did not finish within %.1fs; closing what is left", budget)
    for task in background:
        task.cancel()
    await daemon.close()
    log.info("stopped")
    return 0


def _install_debug_hooks(loop) -> None:
    """Test-only: with PUSHERD_DEBUG_HANG_ON_SIGUSR2=1 in the environment, SIGUSR2 blocks
    the event loop for two minutes, so a test can see WatchdogSec= restart a hung daemon.
    Never set it in production; pusherd logs a warning when it is on."""
    if os.environ.get("PUSHERD_DEBUG_HANG_ON_SIGUSR2") != "1":
        return
    log.warning("debug hook on: SIGUSR2 blocks the event loop (PUSHERD_DEBUG_HANG_ON_SIGUSR2=1)")

    def hang() -> None:
        log.warning("SIGUSR2: blocking the event loop on purpose")
        time.sleep(120)

    loop.add_signal_handler(signal.SIGUSR2, hang)


def _status(daemon: Daemon, note: Optional[str] = None) -> str:
    text = "%d connections, %d topics, broker %s%s, config gen %d" % (
        len(daemon.service.connections), len(daemon.service.hub.topics), daemon.broker.describe(),
        "" if daemon.broker.healthy() else " UNAVAILABLE (publishes refused)", daemon.generation)
    return text + ("; " + note if note else "")

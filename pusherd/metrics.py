"""Prometheus metrics: plain ints on the daemon's paths, turned into metric families at scrape time.

The hot paths never call prometheus_client: they bump ints in `Counters`, the one place every
counter of the daemon lives (the service, the hub, the transports and the outboxes write there),
and `DaemonCollector` reads them, with what the service knows anyway (its connections, the hub's
topics, the broker's health), when Prometheus scrapes. ``prometheus_client`` is imported only when ``metrics:`` is configured;
each daemon has its own ``CollectorRegistry``, so two daemons in one process never clash.
The endpoint has its own listener and wants ``Authorization: Bearer <token>`` when a token is set.
"""

import collections
import hmac
import logging
import re
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple

import tornado.httpserver
import tornado.netutil
import tornado.web

from .core import errors
from .core.errors import PusherdError
from .core.publish import bearer_value
from .counters import Counters

if TYPE_CHECKING:  # pragma: no cover
    from .service import Service

log = logging.getLogger("pusherd")

#: Join refusals exported even before they happen, so that rate() works from the first scrape.
REFUSAL_REASONS = (errors.AUTHENTICATION_REQUIRED, errors.INVALID_TOKEN, errors.TOKEN_EXPIRED,
                   errors.CSRF_MISMATCH, errors.FORBIDDEN, errors.INVALID_TOPIC, errors.TOO_MANY_CHANNELS)
JOIN_OK = "ok"

MAX_PREFIXES = 20
OTHER_PREFIX = "other"
_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")

INSTALL_HINT = "pip install 'pusherd[metrics]'"


class MetricsUnavailable(PusherdError):
    """``metrics:`` is configured but prometheus_client cannot be imported."""


def require_client():
    """Import prometheus_client or raise MetricsUnavailable with what to do about it."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise MetricsUnavailable("metrics: is configured but prometheus_client is not installed (%s): %s, "
                                 "or remove metrics: from the configuration" % (exc, INSTALL_HINT)) from None
    return prometheus_client


class PrefixLabels:
    """Bounded label values for topics: the text before the first ``:``.

    A prefix becomes a label value only if it looks like a word and is among the first
    ``limit`` distinct prefixes seen; everything else is ``"other"``. Never a label per topic.
    """

    def __init__(self, limit: int = MAX_PREFIXES):
        self.limit = limit
        self.known: Dict[str, None] = {}

    def label(self, topic: str) -> str:
        prefix = topic.split(":", 1)[0] if ":" in topic else ""
        if prefix in self.known:
            return prefix
        if not _PREFIX_RE.match(prefix) or len(self.known) >= self.limit:
            return OTHER_PREFIX
        self.known[prefix] = None
        return prefix

    def channels(self, topics: Dict[str, Iterable]) -> Dict[str, int]:
        """Joined channels (socket x topic) per label."""
        out: Dict[str, int] = collections.defaultdict(int)
        for topic, members in topics.items():
            out[self.label(topic)] += len(members)
        return out


class DaemonCollector:
    """A custom collector: reads the daemon's numbers when Prometheus scrapes."""

    def __init__(self, service: "Service"):
        self.service = service
        self.prefixes = PrefixLabels()
        require_client()
        import prometheus_client.core
        self._families = prometheus_client.core

    def collect(self):
        core, service = self._families, self.service
        counters: Counters = service.counters
        hub = service.hub

        yield core.GaugeMetricFamily("pusherd_sockets", "Open connections (WebSocket and long-poll).",
                                     value=len(service.connections))
        yield core.GaugeMetricFamily("pusherd_topics", "Topics with at least one local member.",
                                     value=len(hub.topics))
        channels = core.GaugeMetricFamily(
            "pusherd_channels", "Joined channels (socket x topic) by topic prefix (the text before the "
            "first ':'; at most %d prefixes, the rest are 'other')." % self.prefixes.limit, labels=["prefix"])
        for prefix, n in sorted(self.prefixes.channels(hub.topics).items()):
            channels.add_metric([prefix], n)
        yield channels

        joins = dict(counters.joins)
        yield core.CounterMetricFamily("pusherd_joins_accepted", "Channel joins accepted.",
                                       value=joins.pop(JOIN_OK, 0))
        refused = core.CounterMetricFamily("pusherd_joins_refused", "Channel joins refused, by reason.",
                                           labels=["reason"])
        for reason in REFUSAL_REASONS:
            refused.add_metric([reason], joins.pop(reason, 0))
        for reason, n in sorted(joins.items()):  # reasons added after this list was written
            refused.add_metric([reason], n)
        yield refused

        yield core.CounterMetricFamily("pusherd_client_frames_received", "WebSocket frames received from clients.",
                                       value=counters.frames_received)
        yield core.CounterMetricFamily("pusherd_messages_received",
                                       "Broadcasts handed to this process for local delivery.",
                                       value=counters.messages_received)
        yield core.CounterMetricFamily("pusherd_messages_delivered", "Broadcast frames handed to sockets.",
                                       value=counters.delivered)
        yield core.CounterMetricFamily("pusherd_messages_dropped",
                                       "Frames handed to a socket that were discarded unsent "
                                       "(slow consumer or socket closing).", value=counters.frames_dropped)
        yield core.CounterMetricFamily("pusherd_frames_encoded",
                                       "Broadcast frames encoded (once per protocol version per broadcast).",
                                       value=counters.encodes)
        publish = core.CounterMetricFamily("pusherd_publish_requests", "POST /publish requests by HTTP status.",
                                           labels=["status"])
        for status, n in sorted(counters.publish_requests.items()):
            publish.add_metric([str(status)], n)
        yield publish

        latency = counters.latency
        yield core.HistogramMetricFamily(
            "pusherd_delivery_latency_seconds",
            "Seconds from publish to the frames being handed to local sockets (per broadcast).",
            buckets=latency.buckets(), sum_value=latency.total)

        if counters.broker:
            events = core.CounterMetricFamily("pusherd_broker_events", "What happened to the broker, by event "
                                              "(publishes, reconnects, outages, failovers, redirects...).",
                                              labels=["event"])
            for event, n in sorted(counters.broker.items()):
                events.add_metric([event], n)
            yield events
        refused = core.CounterMetricFamily("pusherd_connections_refused",
                                           "Connections refused before they opened (upgrade or long-poll open), "
                                           "by reason.", labels=["reason"])
        for reason, n in sorted(counters.connections_refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield core.CounterMetricFamily("pusherd_slow_consumer_closes", "Sockets closed as slow consumers.",
                                       value=counters.slow_consumer_closes)
        broker = core.GaugeMetricFamily("pusherd_broker_up", "1 when the broker takes publishes, else 0.",
                                        labels=["broker"])
        broker.add_metric([service.broker.name], 1 if service.broker.healthy() else 0)
        yield broker
        yield core.CounterMetricFamily("pusherd_messages_replayed",
                                       "Missed broadcasts replayed to joins that carried `since`.",
                                       value=counters.replayed)
        recoveries = core.CounterMetricFamily("pusherd_recoveries", "Joins with `since`, by outcome.",
                                              labels=["outcome"])
        for outcome in ("recovered", "not_recovered"):
            recoveries.add_metric([outcome], counters.recoveries[outcome])
        yield recoveries
        stats = service.broker.history_stats()
        if stats is not None:
            yield core.GaugeMetricFamily("pusherd_history_streams", "Topics keeping history in this process.",
                                         value=stats["streams"])
            yield core.GaugeMetricFamily("pusherd_history_messages", "Broadcasts kept in history.",
                                         value=stats["messages"])
            yield core.GaugeMetricFamily("pusherd_history_bytes", "Approximate memory held by history.",
                                         value=stats["bytes"])
        evictions = core.CounterMetricFamily(
            "pusherd_history_evictions", "Topic histories evicted by this process's publishes to keep a global "
            "bound, by the config key of the bound.", labels=["limit"])
        for limit, count in sorted(service.broker.history_evictions().items()):
            evictions.add_metric([limit], count)
        yield evictions
        yield core.GaugeMetricFamily("pusherd_draining", "1 while the daemon drains its sockets to stop.",
                                     value=1 if service.draining else 0)
        presence = service.presence
        if presence is not None:
            stats = presence.stats()
            yield core.GaugeMetricFamily("pusherd_presence_tracked",
                                         "Presence entries (connections listed on a presence topic) of this "
                                         "process.", value=stats["tracked"])
            yield core.GaugeMetricFamily("pusherd_presence_listed",
                                         "Presence entries of every process on the presence topics this process "
                                         "holds a list of.", value=stats["listed"])
            yield core.GaugeMetricFamily("pusherd_presence_topics", "Presence topics this process holds a list of.",
                                         value=stats["topics"])
            untracked = core.CounterMetricFamily(
                "pusherd_presence_untracked", "Joins of presence topics not listed, by reason (anonymous, bad_key, "
                "bad_meta, topic_full).", labels=["reason"])
            for reason in ("anonymous", "bad_key", "bad_meta", "topic_full"):
                untracked.add_metric([reason], counters.presence_untracked[reason])
            yield untracked
            yield core.CounterMetricFamily("pusherd_presence_diffs", "presence_diff broadcasts delivered to local "
                                           "members (one per topic per window at most, per process).",
                                           value=counters.presence_diffs)
            yield core.CounterMetricFamily("pusherd_presence_states", "presence_state pushes to joiners.",
                                           value=counters.presence_states)
            yield core.CounterMetricFamily("pusherd_presence_state_encodes",
                                           "presence_state payloads encoded (once per version of a list).",
                                           value=counters.presence_encodes)


def build_registry(service: "Service"):
    """A registry of this daemon's own (no global registry), with the process collector."""
    client = require_client()
    registry = client.CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(service))
    client.ProcessCollector(registry=registry)
    return registry


def token_matches(authorization: Optional[str], token: str) -> bool:
    """``Authorization: Bearer <token>``, compared in constant time."""
    given = bearer_value(authorization)
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


class MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, registry, token: Optional[str]):
        self.registry = registry
        self.token = token

    def get(self):
        if self.token and not token_matches(self.request.headers.get("Authorization"), self.token):
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Bearer realm="pusherd metrics"')
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            return self.finish("missing or wrong metrics token\n")
        client = require_client()
        self.set_header("Content-Type", client.CONTENT_TYPE_LATEST)
        self.set_header("Cache-Control", "no-store")
        self.finish(client.generate_latest(self.registry))


class MetricsServer:
    """The metrics listener: only ``GET /metrics``, on its own address."""

    def __init__(self, service: "Service", settings):
        self.settings = settings
        self.registry = build_registry(service)
        self._server: Optional[tornado.httpserver.HTTPServer] = None
        self.bound: List[tuple] = []

    def start(self, sockets=None) -> None:
        s = self.settings
        if not sockets:
            sockets = tornado.netutil.bind_sockets(s.port, s.host)
        app = tornado.web.Application([("/metrics", MetricsHandler, {"registry": self.registry, "token": s.token})],
                                      log_function=lambda handler: None)
        self._server = tornado.httpserver.HTTPServer(app, idle_connection_timeout=60, max_body_size=1024)
        self._server.add_sockets(list(sockets))
        self.bound = [sock.getsockname() for sock in sockets]
        log.info("metrics on %s/metrics%s", ", ".join("%s:%s" % addr[:2] for addr in self.bound),
                 "" if s.token else " (no token: anyone who reaches the address may scrape)")

    async def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            await self._server.close_all_connections()
            self._server = None

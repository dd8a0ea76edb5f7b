"""Thin Tornado adapters: they translate between HTTP/WebSocket and the pure core.

No protocol logic lives here: frames go to `Session`, publish bodies to `publish.parse_body`.
Dependencies arrive through ``initialize()`` (no globals), so several daemons can run in one
test process.
"""

import json
import logging
import re
import time
import types
from typing import TYPE_CHECKING, List, Optional, Tuple

import tornado.web
import tornado.websocket

from .core import errors
from .core.broadcast import Broadcast
from .core.errors import BrokerUnavailable, PublishError
from .framing import text_frame
from .core.origins import upgrade_allowed
from .outbox import Outbox, lean_stream
from .core.protocol import serializer_for_vsn
from .core.publish import Grant, authorize, parse_body
from .core.session import Close, Publish, Recover, Send, Session, Subscribe, Unsubscribe

if TYPE_CHECKING:  # pragma: no cover
    from .server import Daemon

log = logging.getLogger("pusherd")
access_log = logging.getLogger("pusherd.access")

#: A number as it may come from the wire: ASCII digits only (``str.isdigit`` and ``\d`` also
#: take "²" or "٣"). Tornado reads Content-Length the same way.
ASCII_DIGITS = re.compile(r"[0-9]+")


class RedactTornadoLog(logging.Filter):
    """Tornado's own log lines can quote request bytes: a malformed header's value (a publish
    secret with a stray control character) or a URL's query string (join tokens travel there).
    Keep the line, cut those parts."""

    _QUERY = re.compile(r"\?[^\s'\"]*")
    _QUOTED = re.compile(r"""\s*:?\s*b?['"].*$""", re.S)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        redacted = self._QUOTED.sub(" (value withheld)", message) if "Malformed HTTP" in message else message
        redacted = self._QUERY.sub("?...", redacted)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


TORNADO_LOGGERS = ("tornado.general", "tornado.application", "tornado.access")


def install_log_redaction() -> None:
    """Idempotent: one filter per Tornado logger, however many daemons run in the process."""
    for name in TORNADO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTornadoLog) for f in logger.filters):
            logger.addFilter(RedactTornadoLog())


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without query strings (tokens may travel there)."""
    daemon = getattr(handler, "daemon", None)
    if (daemon is not None and not daemon.settings.access_log) or getattr(handler, "quiet_access_log", False):
        return
    request = handler.request
    log_access(handler.get_status(), request.method, request.path, request.remote_ip, request.request_time())


def log_access(status: int, method: str, path: str, remote_ip: Optional[str], seconds: float) -> None:
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        access_log.log(level, "%d %s %s (%s) %.1fms", status, method, path, remote_ip, 1000.0 * seconds)


class StormLog:
    """One log line per ``interval`` seconds at most for a refusal that comes in storms (a
    connection limit reached), counting the refusals since the previous line: a storm of
    thousands is a handful of lines, not one each. ``flush`` (from the daemon's sweep) reports
    the last ones of a storm that stopped. Time comes in as ``now`` (time.monotonic)."""

    __slots__ = ("message", "level", "interval", "pending", "args", "_quiet_until")

    def __init__(self, message: str, level: int = logging.WARNING, interval: float = 10.0):
        self.message = message  # %-formatted with the count, then the args of the latest note()
        self.level = level
        self.interval = interval
        self.pending = 0
        self.args: tuple = ()
        self._quiet_until = float("-inf")

    def note(self, now: float, *args) -> None:
        self.pending += 1
        self.args = args
        if now >= self._quiet_until:
            self._emit(now)

    def flush(self, now: float) -> None:
        if self.pending and now >= self._quiet_until:
            self._emit(now)

    def _emit(self, now: float) -> None:
        log.log(self.level, self.message, self.pending, *self.args)
        self.pending = 0
        self._quiet_until = now + self.interval


class JSONHandler(tornado.web.RequestHandler):
    """Every HTTP answer, errors included, is a JSON object."""

    def initialize(self, daemon: "Daemon"):
        self.daemon = daemon
        daemon.requests.add(self)  # a shutdown lets these finish (Daemon.drain)
        self.set_default_headers()  # Tornado sets the defaults before initialize()

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        daemon = getattr(self, "daemon", None)
        if daemon is not None and daemon.draining:  # shutting down: no further request here
            self.set_header("Connection", "close")

    def on_finish(self):
        self.daemon.requests.discard(self)

    def on_connection_close(self):
        self.daemon.requests.discard(self)

    def send_json(self, status: int, body: dict) -> None:
        self.set_status(status)
        self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs) -> None:
        reason = self._reason.lower() if self._reason else "error"
        self.finish(json.dumps({"error": reason}))


class NotFoundHandler(JSONHandler):
    def prepare(self):
        self.send_json(404, {"error": "not found"})


class HealthHandler(JSONHandler):
    def get(self):
        daemon = self.daemon
        broker = daemon.broker
        healthy = broker.healthy()
        # The broker's kind only: its address is for --check-config and the metrics endpoint.
        body = {"status": "ok" if healthy else "unavailable", "broker": broker.name,
                "connections": len(daemon.sockets)}
        if not healthy:
            body["error"] = "broker %s is unavailable" % broker.name
        self.send_json(200 if healthy else 503, body)


def authorize_head(daemon: "Daemon", authorizations: List[str]):
    """Decide a POST /publish credential from the request's head alone, before any body byte is
    read: (its Grant, None), or (None, the 401 answer as (status, JSON body, extra headers)).

    Shared by PublishHandler and the lean publisher connections in front.py. After a 401 the
    connection is closed: nothing of an unauthenticated body is ever buffered, and its unread
    bytes cannot be skipped safely. ``authorizations``: every Authorization header of the request.
    """
    try:
        return authorize(authorizations, daemon.publish_secrets), None
    except PublishError as exc:
        log.info("publish refused (401): %s", exc.reason)
        return None, (exc.status, {"error": exc.reason},
                      (("WWW-Authenticate", 'Bearer realm="pusherd", error="invalid_token"'),))


async def answer_publish(daemon: "Daemon", grant: Grant, body: bytes, content_type: str):
    """Validate and publish one POST /publish body, its credential already decided by
    `authorize_head`: (status, JSON body, extra headers). Shared by PublishHandler and the lean
    publisher connections in front.py, so both answer alike."""
    try:
        broadcasts = parse_body(body, content_type, daemon.settings.max_topic_length)
        grant.check(broadcasts)
    except PublishError as exc:
        return exc.status, {"error": exc.reason}, ()
    try:
        positions = await daemon.publish_batch(broadcasts)
    except BrokerUnavailable as exc:
        # The cause (masked) goes to the log; the publisher learns the kind of broker only.
        log.debug("publish refused (503): %s", exc or daemon.broker.describe())
        return 503, {"error": "broker unavailable: %s" % daemon.broker.name}, (("Retry-After", "1"),)
    answer = {"status": "ok", "published": len(broadcasts)}
    if len(broadcasts) == 1 and positions[0] is not None:
        answer["position"] = positions[0]
    elif any(p is not None for p in positions):
        answer["positions"] = positions
    return 200, answer, ()


def body_too_large(limit: int) -> str:
    """The 413 reason for a publish body over max_publish_bytes (PublishBody and front.py)."""
    return "body larger than max_publish_bytes (%d)" % limit


class PublishBody:
    """One POST /publish body, bounded by max_publish_bytes, as PublishHandler reads it."""

    __slots__ = ("limit", "chunks", "size", "refused")

    def __init__(self, limit: int):
        self.limit = limit
        self.chunks: List[bytes] = []
        self.size = 0
        self.refused = False

    @property
    def too_large(self) -> str:
        return body_too_large(self.limit)

    def start(self, connection, content_length: Optional[str]) -> Optional[Tuple[int, str]]:
        """The refusal (status, reason) when the Content-Length header already tells, else None."""
        # Room past the limit so that add() (not Tornado's bare 400) answers a chunked body
        # that grows too large with a 413; one chunk larger than this still gets a 400.
        connection.set_max_body_size(self.limit + max(self.limit, 65536))
        if content_length is None:
            return None
        # ASCII digits only (str.isdigit() also takes "²", which int() then refuses); two
        # Content-Length headers arrive joined by a comma and are refused here too.
        if not ASCII_DIGITS.fullmatch(content_length):
            self.refused = True
            return 400, "invalid Content-Length"
        if int(content_length) > self.limit:
            self.refused = True
            return 413, self.too_large
        return None

    def add(self, chunk: bytes) -> bool:
        """Keep a chunk; False (refused, nothing kept) once the body is over the limit."""
        self.size += len(chunk)
        if self.size > self.limit:
            self.chunks = []
            self.refused = True
            return False
        self.chunks.append(chunk)
        return True

    def take(self) -> bytes:
        chunks, self.chunks = self.chunks, []
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


@tornado.web.stream_request_body
class PublishHandler(JSONHandler):
    """POST /publish: the Rails app (or `pusherd publish`) hands events to every subscriber."""

    def prepare(self):
        # Called once the head is read, before any of the body (stream_request_body).
        self._body = PublishBody(self.daemon.settings.max_publish_bytes)
        self._grant = None
        if self.request.method != "POST":  # answered 405 by get() or by Tornado
            self._body.refused = True  # its body, if any, is read and dropped, never kept
            return
        self._grant, refusal = authorize_head(self.daemon, self.request.headers.get_list("Authorization"))
        if refusal is not None:
            self._body.refused = True
            status, answer, headers = refusal
            self._refuse(status, answer["error"], headers)
        else:
            refusal = self._body.start(self.request.connection, self.request.headers.get("Content-Length"))
            if refusal is not None:
                self._refuse(*refusal)

    def _refuse(self, status: int, reason: str, headers=()) -> None:
        # Answered before the body: Tornado passes no more of it here and closes the connection
        # once the answer is sent (and stops reading past set_max_body_size): none is buffered.
        self.set_header("Connection", "close")
        for name, value in headers:
            self.set_header(name, value)
        self.send_json(status, {"error": reason})

    def data_received(self, chunk: bytes) -> None:
        body = self._body
        if not body.refused and not body.add(chunk):
            self._refuse(413, body.too_large)

    async def post(self):
        if self._body.refused:
            return
        status, body, headers = await answer_publish(self.daemon, self._grant, self._body.take(),
                                                     self.request.headers.get("Content-Type", ""))
        for name, value in headers:
            self.set_header(name, value)
        self.send_json(status, body)

    def get(self):
        self.set_header("Allow", "POST")
        self.send_json(405, {"error": "use POST"})


class UpgradedRequest:
    """What a WebSocket handler keeps of its upgrade request once the socket is open."""

    __slots__ = ("method", "uri", "path", "remote_ip", "version")
    headers = types.MappingProxyType({})  # read-only and empty

    def __init__(self, request):
        self.method = request.method
        self.uri = request.path  # never the query string: tokens may travel there
        self.path = request.path
        self.remote_ip = request.remote_ip
        self.version = request.version

    def __repr__(self):
        return "UpgradedRequest(%s %s from %s)" % (self.method, self.path, self.remote_ip)


class SocketHandler(tornado.websocket.WebSocketHandler):
    """One browser socket: Tornado does the handshake and reads frames; `Session` decides."""

    def initialize(self, daemon: "Daemon", legacy_path: bool = False):
        self.daemon = daemon
        self.legacy_path = legacy_path
        self.session: Optional[Session] = None
        self.outbox: Optional[Outbox] = None
        self.serializer = None

    def get(self, *args, **kwargs):
        # Not a coroutine itself: it hands Tornado's get() coroutine back to _execute, so no frame
        # of this method stays suspended for the life of the socket (one less per socket).
        vsn = self.get_query_argument("vsn", None)  # the last one, as Plug does
        serializer = serializer_for_vsn(vsn, legacy_path=self.legacy_path)
        if serializer is None:
            self.set_status(403)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"error": "unsupported protocol version (vsn)"}))
            return None
        daemon = self.daemon
        allowed, origin = upgrade_allowed(daemon.origins, self.request.headers)
        if not allowed:
            log.info("refused WebSocket upgrade from origin %.200s", origin)
            self.set_status(403)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"error": "origin not allowed"}))
            return None
        if len(daemon.sockets) >= daemon.settings.max_connections or daemon.draining:
            # Refusals come in storms (every client of a full or stopping process retries):
            # counted in one line per 10 s at most, not an access log line each.
            if daemon.draining:
                daemon.draining_refusals.note(time.monotonic())
            else:
                daemon.upgrade_refusals.note(time.monotonic(), daemon.settings.max_connections)
            self.quiet_access_log = True
            self.set_status(503)
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.set_header("Retry-After", "5")
            reason = "shutting down" if daemon.draining else "too many connections"
            self.finish(json.dumps({"error": reason}))
            return None
        self.serializer = serializer
        return super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        """pusherd decided in get() (`origins.upgrade_allowed`), on every Tornado: Tornado 6.6
        stopped asking for requests it deems same-origin, so its check is not relied upon."""
        return True

    def select_subprotocol(self, subprotocols):
        """phoenix.js 1.8 with `authToken` offers ["phoenix", "base64url.bearer.phx.…"] and
        requires "phoenix" back; the bearer entry is never echoed (it carries a token)."""
        return "phoenix" if "phoenix" in subprotocols else None

    def get_websocket_protocol(self):
        protocol = super().get_websocket_protocol()
        if type(protocol) is tornado.websocket.WebSocketProtocol13:
            protocol.__class__ = _Protocol  # its own frames must tell the outbox (see _Protocol)
        return protocol

    def get_compression_options(self):
        return None  # frames are shared between sockets: no per-socket compression

    def open(self, *args, **kwargs):
        daemon = self.daemon
        stream = self.ws_connection.stream
        plain = getattr(type(stream), "plain_class", None)
        if plain is not None:  # the class it wore while Tornado read HTTP from it (front._ServedIOStream)
            stream.__class__ = plain
        self.session = Session(self.serializer, daemon.policy, time.time(), peer=self.request.remote_ip or "-")
        self.outbox = Outbox(stream, daemon.flush_queue.add, daemon.settings.max_outbox_bytes, self._slow_consumer,
                             on_drop=daemon.counters.dropped, direct=daemon.fast, rounds=daemon.flush_queue)
        self.set_nodelay(True)
        daemon.sockets.add(self)
        daemon.gc_freezer.on_open()
        # Nothing reads the upgrade request, its headers or the HTTP connection objects again:
        # keep only what an error log line needs, so that they are freed (~KBs per socket).
        request = self.request
        self.request = UpgradedRequest(request)
        # Tornado's get() coroutine keeps a reference to the header object for the socket's life:
        # empty it in place. Re-running its __init__ gives it fresh empty dicts (clear() would
        # pop the items one by one and leave the dicts' tables allocated, ~400 bytes).
        request.headers.__init__()
        # The instance dict holds ~33 attributes, half of them for the HTTP response that is
        # over: rebuild it with what Tornado and pusherd still read (a dict half the size), and
        # move Tornado's "not supported for WebSockets" stubs to the class (OpenSocketHandler).
        state = self.__dict__
        self.__class__ = OpenSocketHandler
        self.__dict__ = {k: v for k, v in state.items() if k not in _DROPPED_AFTER_OPEN}
        lean_stream(stream)

    def on_message(self, message):
        session = self.session
        if session is None:
            return
        self.daemon.counters.frames_received += 1
        self.execute(session.receive(message, time.time()))

    def execute(self, actions) -> None:
        daemon = self.daemon
        deferred = None
        for i, action in enumerate(actions):
            kind = type(action)
            if kind is Send:
                follower = actions[i + 1] if i + 1 < len(actions) else None
                if type(follower) is Subscribe and not daemon.broker.active(follower.topic):
                    # A join reply (the session puts it right before its Subscribe): it waits
                    # until the broker delivers the topic from every process (Daemon.confirm_join).
                    deferred = follower
                    channel = self.session.channels.get(follower.topic)
                    daemon.spawn(daemon.confirm_join(self, action, follower, channel and channel.join_ref))
                    continue
                self.send_text(action.text)
            elif kind is Subscribe:
                if action is not deferred:
                    daemon.subscribe(action.topic, self, action.params)
            elif kind is Unsubscribe:
                daemon.hub.unsubscribe(action.topic, self)
            elif kind is Publish:
                daemon.spawn(self._publish(action))
            elif kind is Recover:
                daemon.spawn(daemon.recover_join(self, action))
            elif kind is Close:
                self.close_with(action.code, action.reason)

    def send_frame(self, frame: bytes) -> None:
        outbox = self.outbox
        if outbox is not None:
            outbox.send(frame)

    def send_text(self, text: str) -> None:
        """One frame for this socket alone (replies, replays); broadcasts come framed by the hub."""
        self.send_frame(text_frame(text.encode("utf-8")))

    async def _publish(self, push: Publish) -> None:
        try:
            await self.daemon.publish(Broadcast(push.topic, push.event, push.payload), client=True)
        except BrokerUnavailable:
            reply = self.session.push_error(push, errors.UNAVAILABLE)
        else:
            reply = self.session.push_ok(push)
        self.send_text(reply.text)

    def close_with(self, code: int, reason: str) -> None:
        if self.outbox is not None:
            self.outbox.flush()
            self.outbox.detach()
        self.close(code, reason)

    def _slow_consumer(self) -> None:
        self.daemon.stats["slow_consumer_closes"] += 1
        log.info("%s: closing slow consumer (outbox over %d bytes)", self.session.peer if self.session else "-",
                 self.daemon.settings.max_outbox_bytes)
        self.close(errors.CLOSE_TRY_AGAIN, "slow consumer")

    def tick(self, now: float) -> None:
        """Called by the daemon's periodic sweep (one timer for every socket)."""
        session = self.session
        if session is None:
            return
        outbox = self.outbox
        if outbox is not None and outbox.stalled_for(time.monotonic()) > self.daemon.settings.slow_consumer_seconds:
            self.daemon.stats["slow_consumer_closes"] += 1
            log.info("%s: dropping slow consumer (writes stalled)", session.peer)
            outbox.detach()
            self.ws_connection.stream.close()  # a close frame could not get through either
            return
        actions = session.tick(now)
        if actions:
            self.execute(actions)

    def on_close(self):
        daemon = self.daemon
        daemon.sockets.discard(self)
        daemon.gc_freezer.on_close()
        session = self.session
        if session is not None:
            for topic in list(session.channels):
                daemon.hub.unsubscribe(topic, self)
            session.channels.clear()
            session.closed = True
        if self.outbox is not None:
            self.outbox.release()  # in no topic any more: out of the fan-out's register


class _Protocol(tornado.websocket.WebSocketProtocol13):
    """Tornado's protocol, telling the socket's outbox before Tornado writes a frame of its own
    (a pong, a close frame): the fan-out writes straight to clean sockets, and a socket with
    bytes in Tornado's buffer is not clean."""

    def _write_frame(self, fin, opcode, data, flags=0):
        outbox = self.handler.outbox
        if outbox is not None:
            outbox.tornado_writes()
        return super()._write_frame(fin, opcode, data, flags)


# Attributes of an open SocketHandler nothing reads again: the upgrade's arguments, the HTTP
# response state (headers, write buffer, transforms, UI namespace), what get() alone needed, and
# Tornado's per-instance stubs for the HTTP methods (OpenSocketHandler has them at class level).
_HTTP_STUBS = ("write", "redirect", "set_header", "set_cookie", "set_status", "flush", "finish")
_DROPPED_AFTER_OPEN = frozenset(("path_args", "path_kwargs", "open_args", "open_kwargs", "ui", "_headers",
                                 "_write_buffer", "_transforms", "legacy_path") + _HTTP_STUBS)


class OpenSocketHandler(SocketHandler):
    """A SocketHandler once its socket is open: the HTTP response methods raise, as Tornado's
    own per-instance stubs do after the upgrade (WebSocketHandler._detach_stream)."""


def _not_supported_for_websockets(*args, **kwargs) -> None:
    raise RuntimeError("Method not supported for Web Sockets")


for _name in _HTTP_STUBS:
    setattr(OpenSocketHandler, _name, staticmethod(_not_supported_for_websockets))
del _name

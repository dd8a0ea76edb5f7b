"""The HTTP endpoints on Tornado's public API: ``POST /publish``, ``GET /healthz``, the JSON 404.

No protocol logic lives here: publish bodies go to `core.publish`, publishing to the service.
Dependencies arrive through ``initialize(service)`` (no globals), so several daemons can run in
one test process. The publisher front (fast/front.py) answers the same requests with the same
`authorize_head` and `answer_publish`, byte for byte.
"""

import json
import logging
import re
import time
from typing import TYPE_CHECKING, List, Optional, Tuple

import tornado.web

from ..core.errors import BrokerUnavailable, PublishError
from ..core.publish import Grant, authorize, parse_body

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

log = logging.getLogger("pusherd")
access_log = logging.getLogger("pusherd.access")

#: A number as it may come from the wire: ASCII digits only (``str.isdigit`` and ``\d`` also
#: take "²" or "٣"). Tornado reads Content-Length the same way.
ASCII_DIGITS = re.compile(r"[0-9]+")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without query strings (tokens may travel there); the Application's log_function."""
    service = getattr(handler, "service", None)
    if (service is not None and not service.config.settings.access_log) or getattr(handler, "quiet_access_log", False):
        return
    request = handler.request
    log_access(handler.get_status(), request.method, request.path, request.remote_ip, request.request_time())


def log_access(status: int, method: str, path: str, remote_ip: Optional[str], seconds: float) -> None:
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        access_log.log(level, "%d %s %s (%s) %.1fms", status, method, path, remote_ip, 1000.0 * seconds)


class JSONHandler(tornado.web.RequestHandler):
    """Every HTTP answer, errors included, is a JSON object."""

    def initialize(self, service: "Service"):
        self.service = service
        service.requests.add(self)  # a shutdown lets these finish (Daemon.drain)
        self.set_default_headers()  # Tornado sets the defaults before initialize()

    def set_default_headers(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        service = getattr(self, "service", None)
        if service is not None and service.draining:  # shutting down: no further request here
            self.set_header("Connection", "close")

    def on_finish(self):
        self.service.requests.discard(self)

    def on_connection_close(self):
        self.service.requests.discard(self)

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
        service = self.service
        broker = service.broker
        healthy = broker.healthy()
        # The broker's kind only: its address is for --check-config and the metrics endpoint.
        body = {"status": "ok" if healthy else "unavailable", "broker": broker.name,
                "connections": len(service.connections)}
        if not healthy:
            body["error"] = "broker %s is unavailable" % broker.name
        self.send_json(200 if healthy else 503, body)


def authorize_head(service: "Service", authorizations: List[str]):
    """Decide a POST /publish credential from the request's head alone, before any body byte is
    read: (its Grant, None), or (None, the 401 answer as (status, JSON body, extra headers)).

    Shared by PublishHandler and the lean publisher connections in front.py. After a 401 the
    connection is closed: nothing of an unauthenticated body is ever buffered, and its unread
    bytes cannot be skipped safely. ``authorizations``: every Authorization header of the request.
    """
    try:
        return authorize(authorizations, service.config.publish_secrets, time.time()), None
    except PublishError as exc:
        log.info("publish refused (401): %s", exc.reason)
        return None, (exc.status, {"error": exc.reason},
                      (("WWW-Authenticate", 'Bearer realm="pusherd", error="invalid_token"'),))


async def answer_publish(service: "Service", grant: Grant, body: bytes, content_type: str):
    """Validate and publish one POST /publish body, its credential already decided by
    `authorize_head`: (status, JSON body, extra headers). Shared by PublishHandler and the lean
    publisher connections in front.py, so both answer alike."""
    try:
        broadcasts = parse_body(body, content_type, service.config.settings.max_topic_length)
        grant.check(broadcasts)
    except PublishError as exc:
        return exc.status, {"error": exc.reason}, ()
    try:
        positions = await service.publish_batch(broadcasts)
    except BrokerUnavailable as exc:
        # The cause (masked) goes to the log; the publisher learns the kind of broker only.
        log.debug("publish refused (503): %s", exc or service.broker.describe())
        reason = "broker unavailable: %s" % service.broker.name
        if exc.published is not None:
            reason += " (%d of %d events published)" % (exc.published, exc.total)
        return 503, {"error": reason}, (("Retry-After", "1"),)
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
        self._body = PublishBody(self.service.config.settings.max_publish_bytes)
        self._grant = None
        if self.request.method != "POST":  # answered 405 by get() or by Tornado
            self._body.refused = True  # its body, if any, is read and dropped, never kept
            return
        self._grant, refusal = authorize_head(self.service, self.request.headers.get_list("Authorization"))
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
        status, body, headers = await answer_publish(self.service, self._grant, self._body.take(),
                                                     self.request.headers.get("Content-Type", ""))
        for name, value in headers:
            self.set_header(name, value)
        self.send_json(status, body)

    def get(self):
        self.set_header("Allow", "POST")
        self.send_json(405, {"error": "use POST"})

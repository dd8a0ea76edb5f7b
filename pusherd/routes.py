"""The HTTP server's front door: POST /publish on a lean path, everything else to the Application.

A Rails app publishes at a high rate, and Tornado's RequestHandler costs more than the publish
itself (handler object, routing regexes, header normalisation, flush/finish machinery, a Task for
an async method). ``PublishRequest`` answers POST /publish straight from the HTTP/1.1 connection,
with the same logic (`handlers.answer_publish`), the same limits, statuses, bodies and headers as
`handlers.PublishHandler`, which still serves every other method on /publish and serves POST too
when ``lean_publish`` is off.
"""

import json
import logging
import time
from typing import TYPE_CHECKING, List, Optional

import tornado
from tornado import httputil

from .handlers import PublishBody, answer_publish, log_access

if TYPE_CHECKING:  # pragma: no cover
    from .server import Daemon

log = logging.getLogger("pusherd")

PUBLISH_PATH = "/publish"
_SERVER = "TornadoServer/%s" % tornado.version


class Routes(httputil.HTTPServerConnectionDelegate):
    """Hands POST /publish to `PublishRequest` and every other request to the Application."""

    def __init__(self, app, daemon: "Daemon", lean_publish: bool = True):
        self.app = app
        self.daemon = daemon
        self.lean_publish = lean_publish

    def start_request(self, server_conn, request_conn) -> httputil.HTTPMessageDelegate:
        return _Dispatch(self, server_conn, request_conn)

    def on_close(self, server_conn) -> None:
        self.app.on_close(server_conn)


class _Dispatch(httputil.HTTPMessageDelegate):
    __slots__ = ("routes", "server_conn", "request_conn", "delegate")

    def __init__(self, routes: Routes, server_conn, request_conn):
        self.routes = routes
        self.server_conn = server_conn
        self.request_conn = request_conn
        self.delegate: Optional[httputil.HTTPMessageDelegate] = None

    def headers_received(self, start_line, headers):
        routes = self.routes
        if (routes.lean_publish and start_line.method == "POST"
                and start_line.path.split("?", 1)[0] == PUBLISH_PATH):
            self.delegate = PublishRequest(routes.daemon, self.request_conn)
        else:
            self.delegate = routes.app.start_request(self.server_conn, self.request_conn)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk):
        return self.delegate.data_received(chunk)

    def finish(self):
        return self.delegate.finish()

    def on_connection_close(self):
        if self.delegate is not None:
            self.delegate.on_connection_close()


class PublishRequest(httputil.HTTPMessageDelegate):
    """One POST /publish, answered without a RequestHandler."""

    __slots__ = ("daemon", "conn", "body", "authorization", "content_type", "path", "started")

    def __init__(self, daemon: "Daemon", conn):
        self.daemon = daemon
        self.conn = conn
        self.body = PublishBody(daemon.settings.max_publish_bytes)
        self.authorization: List[str] = []
        self.content_type = ""
        self.path = PUBLISH_PATH
        self.started = time.time()
        daemon.requests.add(self)  # a shutdown lets these finish (Daemon.drain), as JSONHandler

    def headers_received(self, start_line, headers):
        self.path = start_line.path.split("?", 1)[0]
        self.authorization = headers.get_list("Authorization")
        self.content_type = headers.get("Content-Type", "")
        if not self.body.start(self.conn, headers.get("Content-Length")):
            self._refuse(413, self.body.too_large)
        return None

    def data_received(self, chunk):
        body = self.body
        if not body.refused and not body.add(chunk):
            self._refuse(413, body.too_large)
        return None

    def finish(self):
        if not self.body.refused:
            # HTTP1Connection does not await finish(); it waits for the answer to be written.
            self.daemon.spawn(self._publish())
        return None

    async def _publish(self) -> None:
        body = self.body.take()
        try:
            status, answer, headers = await answer_publish(self.daemon, self.authorization, body, self.content_type)
        except Exception:  # as RequestHandler would: a 500 with a JSON reason, and the traceback logged
            log.exception("publish failed")
            status, answer, headers = 500, {"error": "internal server error"}, ()
        self._answer(status, answer, headers)

    def _refuse(self, status: int, reason: str) -> None:
        # Tornado stops reading past set_max_body_size and closes: the rest is never buffered.
        self._answer(status, {"error": reason}, (("Connection", "close"),))

    def _answer(self, status: int, answer: dict, extra=()) -> None:
        data = json.dumps(answer).encode("utf-8")
        headers = httputil.HTTPHeaders()
        headers["Server"] = _SERVER
        headers["Content-Type"] = "application/json; charset=utf-8"
        headers["Date"] = httputil.format_timestamp(time.time())
        headers["Cache-Control"] = "no-store"
        headers["Content-Length"] = str(len(data))
        if self.daemon.draining:  # shutting down: no further request on this connection
            headers["Connection"] = "close"
        for name, value in extra:
            headers[name] = value
        conn = self.conn
        try:
            conn.write_headers(httputil.ResponseStartLine("HTTP/1.1", status, httputil.responses.get(status, "Unknown")),
                               headers, data)
            conn.finish()
        except Exception:  # the client went away: nothing left to tell it
            log.debug("publish answer not delivered", exc_info=True)
        daemon = self.daemon
        daemon.requests.discard(self)
        daemon.counters.publish_requests[status] += 1
        if daemon.settings.access_log:
            log_access(status, "POST", self.path, getattr(getattr(conn, "context", None), "remote_ip", None),
                       time.time() - self.started)

    def on_connection_close(self):
        self.body.take()
        self.daemon.requests.discard(self)

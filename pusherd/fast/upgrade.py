"""WebSocket upgrades completed on the front (Tornado internals: checked against Tornado 6.5.3
and 6.6.1).

Right after a deploy every page reconnects at once: thousands of upgrades in a few seconds.
Tornado's HTTP server spends more on one upgrade than pusherd spends on the join that follows
(an HTTP1ServerConnection and its read loop, a header parse, the routing, a Task and Futures for
the 101). With the speed-ups on, the front (front.py) recognizes a plain upgrade
(`http1.read_upgrade`) and, when pusherd would accept it, completes it itself with Tornado's own
WebSocket handler and protocol: the handler is made as Tornado's Application makes it, over an
`UpgradeConnection` (the ``HTTPConnection`` a handler writes its response through), which writes
the 101 to the stream and hands the stream over; from then on the socket is what it would have
been. Whether pusherd accepts is decided first by the same functions as SocketHandler.prepare,
without their side effects (`Upgrades.admit`); whatever it would not accept (a refusal of any
kind, a head of any other shape, bytes sent after the head) goes to Tornado's HTTP server as
before, which decides, counts and answers it as it always did.

What it relies on of Tornado's: ``RequestHandler(application, request, **kwargs)``, that
``WebSocketHandler.get`` only checks what `read_upgrade` has checked before it calls
``get_websocket_protocol()`` and ``accept_connection(handler)``, that a handler writes its
response through ``request.connection.write_headers``/``finish`` and takes the stream with
``request.connection.detach()``, ``handler._transforms``. tests/unit/fast/test_tornado_internals.py
checks each; tests/integration/test_fast_paths.py compares the 101 of both paths byte for byte.
Benchmark that justifies it: ``python bench/run.py --only storm,stormrails``.
"""

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import tornado.web
from tornado import httputil
from tornado.iostream import IOStream

from ..core.origins import upgrade_allowed
from ..core.errors import AuthError
from ..core.protocol import serializer_for_vsn
from ..core.tokens import auth_token_from_subprotocols, socket_token
from ..transports.websocket import query_params
from .http1 import UpgradeHead

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

log = logging.getLogger("pusherd")


class _Context:
    """What HTTPServerRequest reads of its connection's context (as Tornado's for a plain socket)."""

    __slots__ = ("remote_ip", "protocol", "address", "trusted_downstream")

    def __init__(self, remote_ip: str, address):
        self.remote_ip = remote_ip
        self.protocol = "http"
        self.address = address
        self.trusted_downstream = set()


class UpgradeConnection(httputil.HTTPConnection):
    """The connection a front-completed upgrade's handler writes its 101 through: the bytes
    Tornado's HTTP1Connection would write for it, then the stream is the handler's."""

    def __init__(self, stream: IOStream, context: _Context):
        self.stream: Optional[IOStream] = stream
        self.context = context

    def set_close_callback(self, callback) -> None:
        pass  # the stream is detached before anything could close it

    def write_headers(self, start_line, headers, chunk=None):
        lines = ["HTTP/1.1 %d %s" % (start_line.code, start_line.reason)]
        lines.extend("%s: %s" % pair for pair in headers.get_all())
        for line in lines:
            if "\r" in line or "\n" in line:  # as HTTP1Connection: never a header split
                raise ValueError("Illegal characters (CR or LF) in header: %r" % line)
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")
        if chunk:
            data += chunk
        return self.stream.write(data)

    def write(self, chunk, callback=None):
        return self.stream.write(chunk)

    def finish(self) -> None:
        pass

    def detach(self) -> IOStream:
        stream, self.stream = self.stream, None
        return stream


class Upgrades:
    """The socket routes of the application, and how an upgrade on them is completed."""

    def __init__(self, service: "Service", application: tornado.web.Application, handler_class: type,
                 handler_kwargs: Dict[str, Any]):
        self.service = service
        self.application = application
        self.handler_class = handler_class
        self.handler_kwargs = handler_kwargs
        self.tasks = set()  # the handlers' accept coroutines (the loop keeps only weak references)

    def paths(self) -> Tuple[str, str]:
        """The WebSocket path and the bare one the 2015 client opens (transports/app.py's routes)."""
        path = self.service.config.settings.path.rstrip("/")
        return path + "/websocket", path or "/"

    def admit(self, request: httputil.HTTPServerRequest, legacy: bool):
        """(serializer, socket claims) when SocketHandler.prepare would accept this upgrade, else
        None: the same checks, none of their side effects (a refusal is Tornado's to count).
        Where this reads a value more strictly than Tornado would, the upgrade goes to Tornado."""
        service = self.service
        headers, query = request.headers, request.query_arguments
        vsn = query.get("vsn")
        try:
            vsn = vsn[-1].decode("utf-8").strip() if vsn else None  # as get_query_argument
        except UnicodeDecodeError:
            return None
        serializer = serializer_for_vsn(vsn, legacy_path=legacy)
        if serializer is None:
            return None
        allowed, _ = upgrade_allowed(service.config.origins, headers)
        if not allowed or not service.has_room():
            return None
        params = query_params(request)
        protocols = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",")]
        token, csrf = socket_token(params, auth_token_from_subprotocols(protocols))
        claims = None
        if token is not None:
            try:
                claims = service.policy.verifier.verify(token, csrf, now=time.time())
            except AuthError:
                return None
        if not service.take_rate():  # last: only an upgrade about to open spends a token
            return None
        return serializer, claims

    def complete(self, stream: IOStream, head: UpgradeHead, remote_ip: str, address) -> bool:
        """Complete the upgrade of `stream` (its head fully read, nothing after it), or False
        when it is Tornado's to answer (nothing has been written then)."""
        legacy = head.path != self.paths()[0]
        headers = httputil.HTTPHeaders()
        for name, value in head.fields:
            headers.add(name, value)
        connection = UpgradeConnection(stream, _Context(remote_ip, address))
        request = httputil.HTTPServerRequest(headers=headers, connection=connection,
                                             start_line=httputil.RequestStartLine("GET", head.uri, "HTTP/1.1"))
        admitted = self.admit(request, legacy)
        if admitted is None:
            return False
        kwargs = dict(self.handler_kwargs, legacy_path=True) if legacy else self.handler_kwargs
        handler = self.handler_class(self.application, request, **kwargs)
        # What Application and WebSocketHandler.get set before the protocol takes over.
        handler._transforms = [t(request) for t in self.application.transforms]
        handler.path_args, handler.path_kwargs = [], {}
        handler.open_args, handler.open_kwargs = (), {}
        handler.serializer, handler.socket_claims = admitted
        handler.ws_connection = handler.get_websocket_protocol()
        task = asyncio.ensure_future(handler.ws_connection.accept_connection(handler))
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return True

    def _done(self, task: asyncio.Future) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("WebSocket connection failed", exc_info=task.exception())

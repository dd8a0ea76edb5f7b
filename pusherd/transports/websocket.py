"""The WebSocket transport on Tornado's public API: one browser socket, one `Session`.

Tornado does the handshake and reads the frames; the session decides; the service carries out
what it decides (pusherd/service.py). Before the handshake, `prepare` (Tornado's hook for it)
refuses what pusherd refuses itself: an unknown ``vsn`` (403), an origin not allowed (403,
decided here on every Tornado: `core.origins.upgrade_allowed`), no room (503), a socket token
(connect params or phoenix.js 1.8's ``authToken``) that does not verify (403 with its reason).

Broadcasts arrive as UTF-8 bytes encoded once for every socket of the topic (core/fanout.py);
``write_message`` frames them. The bytes a socket has not taken are bounded, through the Future
``write_message`` returns for flow control: past ``max_outbox_bytes`` of writes not done (judged
`BOUND_CHECK_DELAY` later), or writes without progress for ``slow_consumer_seconds``, the socket
is a slow consumer and is closed
(1013), without slowing anyone else. fast/websocket.py
is the same handler with the frames built once too and written straight to the sockets.
"""

import json
import logging
import time
from typing import TYPE_CHECKING, Dict, Optional

import tornado.ioloop
import tornado.websocket

from ..core import errors
from ..core.origins import upgrade_allowed
from ..core.session import Session
from ..core.tokens import auth_token_from_subprotocols
from .admission import Refusal, check_room, check_socket_token, check_vsn, refuse_origin

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

log = logging.getLogger("pusherd")

#: A socket whose writes Tornado has not reported done exceed max_outbox_bytes: the writes issued
#: until then are judged this long after (the reports lag the kernel by a loop iteration or two),
#: and the socket is closed if more than the bound of them is still not done. So a stalled socket
#: holds at most the bound plus what is published to it in that time.
BOUND_CHECK_DELAY = 0.05


def query_params(request) -> Dict[str, str]:
    """The request's query parameters, the last value of each (as Plug does), UTF-8 text only."""
    return text_params(request.query_arguments)


def text_params(arguments: Dict[str, list]) -> Dict[str, str]:
    """`query_params` of parsed query arguments (name -> the values as bytes, in order)."""
    params = {}
    for name, values in arguments.items():
        try:
            params[name] = values[-1].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return params


def utf8(text: str) -> bytes:
    """The wire of this transport: a message as the UTF-8 bytes of one text frame."""
    return text.encode("utf-8")


#: How long a socket pusherd closed may stay registered. Tornado waits 5 s for the client's close
#: frame, then drops the connection and says so (``on_close``); a socket still here this long
#: after its close is one whose reader ended without saying so (Tornado 6.5's raises out of
#: itself on a close frame whose reason is not UTF-8): the sweep releases it (`SocketHandler.tick`).
RELEASE_AFTER_CLOSE_SECONDS = 10.0


class SocketHandler(tornado.websocket.WebSocketHandler):
    """One browser socket: Tornado does the handshake and reads frames; `Session` decides."""

    wire = staticmethod(utf8)
    close_asked: Optional[float] = None  # monotonic time pusherd closed it (set on the instance then)

    def initialize(self, service: "Service", legacy_path: bool = False):
        self.service = service
        self.legacy_path = legacy_path
        self.session: Optional[Session] = None
        self.serializer = None
        self.socket_claims = None      # what the socket's own token granted (prepare)
        self.issued = 0                # bytes handed to write_message ...
        self.done = 0                  # ... of which Tornado reported the writes done
        self.unsent_frames = 0
        self.stalled_since: Optional[float] = None
        self.closing = False           # closed by pusherd (slow consumer, drain): nothing more is written
        self._check = None

    # -- the upgrade ----------------------------------------------------------------------------

    def prepare(self):
        """Before the handshake: pusherd's own refusals (a refused upgrade is an HTTP answer)."""
        service = self.service
        try:
            serializer = check_vsn(service, self.get_query_argument("vsn", None), self.legacy_path)  # the last one, as Plug does
            allowed, origin = upgrade_allowed(service.config.origins, self.request.headers)
            if not allowed:
                raise refuse_origin(service, "WebSocket upgrade", origin)
            check_room(service)
            # The socket's own token (connect params, or 1.8's authToken): verified here, as Phoenix's
            # connect/3 would; a bad one is refused (403), a good one grants joins without their own.
            protocols = [p.strip() for p in self.request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
            self.socket_claims = check_socket_token(service, "WebSocket upgrade", query_params(self.request),
                                                    auth_token_from_subprotocols(protocols))
        except Refusal as refusal:
            # Refusals for no room come in storms (every client of a full or stopping process
            # retries): counted in the service's storm logs, not an access log line each.
            self.quiet_access_log = refusal.quiet
            return self._refuse(refusal.status, refusal.reason, refusal.retry_after)
        self.serializer = serializer
        return None

    def _refuse(self, status: int, reason: str, retry_after: Optional[str] = None) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        if retry_after:
            self.set_header("Retry-After", retry_after)
        self.finish(json.dumps({"error": reason}))

    def check_origin(self, origin: str) -> bool:
        """pusherd decided in `prepare` (`origins.upgrade_allowed`), on every Tornado: Tornado 6.6
        stopped asking for requests it deems same-origin, so its check is not relied upon."""
        return True

    def select_subprotocol(self, subprotocols):
        """phoenix.js 1.8 with `authToken` offers ["phoenix", "base64url.bearer.phx.…"] and
        requires "phoenix" back; the bearer entry is never echoed (it carries a token)."""
        return "phoenix" if "phoenix" in subprotocols else None

    def get_compression_options(self):
        return None  # frames are shared between sockets: no per-socket compression

    def open(self, *args, **kwargs):
        service = self.service
        self.session = Session(self.serializer, service.policy, time.time(), peer=self.request.remote_ip or "-",
                               socket_claims=self.socket_claims)
        self.set_nodelay(True)
        service.opened(self)

    # -- frames in ------------------------------------------------------------------------------

    def on_message(self, message):
        if self.session is not None:
            self.service.receive(self, message)

    # -- frames out -----------------------------------------------------------------------------

    def send_frame(self, frame: bytes) -> None:
        """One message (a broadcast's bytes shared with the topic, or this socket's own)."""
        if self.closing:
            self.service.counters.frames_dropped += 1
            return
        try:
            written = self.write_message(frame)
        except tornado.websocket.WebSocketClosedError:
            self.service.counters.frames_dropped += 1
            return
        size = len(frame)
        self.issued += size
        self.unsent_frames += 1
        if self.stalled_since is None:
            self.stalled_since = time.monotonic()
        written.add_done_callback(lambda _, size=size: self._written(size))
        if self._check is None and self.issued - self.done > self.service.config.settings.max_outbox_bytes:
            self._watch_backlog()

    def _watch_backlog(self) -> None:
        # write_message's Future, Tornado's public flow control, says a write is done a loop
        # iteration or two after the kernel took it: judge the writes issued until now a moment
        # later. Writes finish in order, so what is not done of them then is what the peer left.
        mark = self.issued
        self._check = tornado.ioloop.IOLoop.current().call_later(BOUND_CHECK_DELAY, self._check_backlog, mark)

    def _check_backlog(self, mark: int) -> None:
        self._check = None
        if self.closing:
            return
        limit = self.service.config.settings.max_outbox_bytes
        if mark - self.done > limit:
            self._slow_consumer("outbox over %d bytes" % limit)
        elif self.issued - self.done > limit:
            self._watch_backlog()

    def _written(self, size: int) -> None:
        # Progress: the stall clock restarts (or stops, with nothing left to send).
        self.done += size
        self.unsent_frames -= 1
        self.stalled_since = time.monotonic() if self.issued > self.done else None

    def send_text(self, text: str) -> None:
        """A reply or a replayed broadcast, for this socket alone."""
        self.send_frame(self.wire(text))

    def close_with(self, code: int, reason: str) -> None:
        self._asked_to_close()
        self.close(code, reason)

    def _asked_to_close(self) -> None:
        if self.close_asked is None:
            self.close_asked = time.monotonic()

    def _slow_consumer(self, why: str, verb: str = "closing") -> None:
        if self.closing:
            return
        self.closing = True
        self._asked_to_close()
        counters = self.service.counters
        counters.slow_consumer_closes += 1
        counters.frames_dropped += self._frames_waiting()  # what waits in Tornado will not get through
        log.info("%s: %s slow consumer (%s)", self.session.peer if self.session else "-", verb, why)
        # A close frame queued behind what the peer does not read: Tornado drops the connection
        # if no answer comes within its close timeout (5 s).
        self.close(errors.CLOSE_TRY_AGAIN, "slow consumer")

    # -- time and the end -----------------------------------------------------------------------

    def _frames_waiting(self) -> int:
        return self.unsent_frames

    def _drop_stalled(self) -> None:
        self._slow_consumer("writes stalled", verb="dropping")

    def stalled_for(self, now: float) -> float:
        """Seconds since this socket's writes last made progress, while bytes wait (0 when none do)."""
        return 0.0 if self.stalled_since is None else now - self.stalled_since

    def tick(self, now: float) -> None:
        """Called by the service's periodic sweep (one timer for every socket)."""
        session = self.session
        if session is None:
            return
        if self.close_asked is not None and time.monotonic() - self.close_asked > RELEASE_AFTER_CLOSE_SECONDS:
            log.warning("%s: released a socket closed %.1f s ago whose connection never reported its end",
                        session.peer, time.monotonic() - self.close_asked)
            self.on_connection_close()  # Tornado's own hook for a connection gone: drops it, calls on_close
            return
        if self.stalled_for(time.monotonic()) > self.service.config.settings.slow_consumer_seconds:
            self._drop_stalled()
            return
        actions = session.tick(now)
        if actions:
            self.service.execute(self, actions)

    def on_close(self):
        self.service.closed(self)

"""What every transport checks before a connection opens: the protocol version, room, and the
socket's own token. The WebSocket upgrade (websocket.py ``prepare``) and the long-poll open
(longpoll.py) share it, so both refuse alike and count refusals under the same reasons
(``pusherd_connections_refused_total{reason}``). The origin is the transport's own business
(a WebSocket upgrade always carries one; a same-origin long-poll GET does not).
"""

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..core.errors import AuthError
from ..core.protocol import serializer_for_vsn
from ..core.tokens import socket_token
from ..service import RATE_LIMITED

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service

log = logging.getLogger("pusherd")


class Refusal(Exception):
    """A connection pusherd does not open: the HTTP status, the reason (for the JSON body), and
    ``Retry-After`` for a refusal that passes (no room, shutting down)."""

    def __init__(self, status: int, reason: str, retry_after: Optional[str] = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    @property
    def quiet(self) -> bool:
        """Refusals for no room come in storms: the service's storm logs count them, not the access log."""
        return self.status == 503


def check_vsn(service: "Service", vsn: Optional[str], legacy_path: bool = False):
    serializer = serializer_for_vsn(vsn, legacy_path=legacy_path)
    if serializer is None:
        service.counters.connections_refused["unsupported_vsn"] += 1
        raise Refusal(403, "unsupported protocol version (vsn)")
    return serializer


def refuse_origin(service: "Service", what: str, origin: Optional[str]) -> Refusal:
    service.counters.connections_refused["origin_not_allowed"] += 1
    log.info("refused %s from origin %.200s", what, origin if origin is not None else "(none sent)")
    return Refusal(403, "origin not allowed")


def check_room(service: "Service") -> None:
    """503 when no connection may open now: Retry-After 1 for the rate limit (a token is back
    within a second), 5 for a full or stopping process."""
    refusal = service.refusal()
    if refusal is not None:
        service.counters.connections_refused[refusal.replace(" ", "_")] += 1
        raise Refusal(503, refusal, retry_after="1" if refusal == RATE_LIMITED else "5")


def check_socket_token(service: "Service", what: str, params: Mapping[str, str],
                       auth_token: Optional[str]) -> Any:
    """The claims of the socket's own token (connect params, or 1.8's ``authToken``), verified
    as Phoenix's connect/3 would; None when it brings none. A bad one is refused (403)."""
    token, csrf = socket_token(params, auth_token)
    if token is None:
        return None
    try:
        return service.policy.verifier.verify(token, csrf, now=time.time())
    except AuthError as exc:
        service.counters.connections_refused[exc.reason] += 1
        log.info("refused %s: socket token %s (%s)", what, exc.reason, exc.detail)
        raise Refusal(403, exc.reason) from None

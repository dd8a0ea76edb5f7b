"""The Tornado application: the routes, and every handler's dependencies through ``initialize()``."""

from typing import TYPE_CHECKING, Optional

import tornado.web

from .demo import DemoAssetHandler, DemoPageHandler, DemoRootHandler, RecoveryHelperHandler
from .http import HealthHandler, NotFoundHandler, PresenceHandler, PublishHandler, log_request
from .longpoll import LongPollHandler, LongPollSessions
from .websocket import SocketHandler

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service


def make_app(service: "Service", socket_handler: type = SocketHandler, socket_args: Optional[dict] = None,
             log_function=None, longpoll: Optional[LongPollSessions] = None) -> tornado.web.Application:
    """The routes under ``settings.path`` (the WebSocket, also at the bare path for the 2015
    client), ``/publish``, ``/presence``, ``/healthz`` and the demo. ``socket_handler``/``socket_args``: the
    WebSocket handler (transports/websocket.py, or fast/websocket.py with its arguments);
    ``longpoll``: the process's long-poll sessions (transports/longpoll.py; None: new ones)."""
    settings = service.config.settings
    deps = {"service": service}
    sockets = dict(deps, **(socket_args or {}))
    path = settings.path.rstrip("/")
    routes = [
        (path + "/websocket", socket_handler, sockets),
        (path + "/longpoll", LongPollHandler, dict(deps, sessions=longpoll or LongPollSessions(service))),
        (path or "/", socket_handler, dict(sockets, legacy_path=True)),
        ("/publish", PublishHandler, deps),
        ("/presence", PresenceHandler, deps),
        ("/healthz", HealthHandler, deps),
        ("/", DemoRootHandler, deps),
        ("/demo", DemoPageHandler, deps),
        ("/demo/phoenix.js", DemoAssetHandler, deps),
        ("/demo/pusherd-recovery.js", RecoveryHelperHandler, deps),
    ]
    return tornado.web.Application(
        routes,
        default_handler_class=NotFoundHandler, default_handler_args=deps,
        log_function=log_function or log_request,
        websocket_max_message_size=settings.max_frame_bytes,
        compress_response=False,
    )

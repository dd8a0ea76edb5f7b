"""An open WebSocket's memory trimmed (Tornado internals: checked against Tornado 6.5.3 and 6.6.1).

Once a socket is open nothing reads its upgrade request, its headers or the HTTP response state
again; Tornado keeps them for the socket's life. `trim_open_socket` drops them (~2 KB less per
idle joined socket, bench/README.md's memory figure: ``python bench/run.py --only memory``).
What it relies on: the handler's instance dict and the attribute names listed in
`_DROPPED_AFTER_OPEN`, ``request.headers`` being an ``HTTPHeaders`` (re-initialized in place),
IOStream's ``_write_buffer._buffers`` and ``_write_futures`` being empty deques at open.
tests/unit/fast/test_tornado_internals.py checks each, and bench/README.md's figure shows the gain.
"""

import collections
import types

class _ListQueue(list):
    """A deque stand-in for IOStream's two write queues: an empty deque costs ~760 bytes (it
    allocates a 64-slot block up front), an empty list 56. The queues hold a few entries at most
    (a pong, a close frame, a partial write), so popleft's O(n) does not matter."""

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


def lean_stream(stream) -> None:
    """Swap an idle IOStream's empty write deques for `_ListQueue`s (Tornado 6 internals: left
    alone when they are not what this expects). Tornado uses append, [0], [-1], popleft, clear,
    iteration and truth on them, which a list subclass has too."""
    buffer = getattr(stream, "_write_buffer", None)
    if type(getattr(buffer, "_buffers", None)) is collections.deque and not buffer._buffers:
        buffer._buffers = _ListQueue()
    if type(getattr(stream, "_write_futures", None)) is collections.deque and not stream._write_futures:
        stream._write_futures = _ListQueue()


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


# Attributes of an open handler nothing reads again: the upgrade's arguments, the HTTP response
# state (headers, write buffer, transforms, UI namespace), what only prepare() and open() needed,
# and Tornado's per-instance stubs for the HTTP methods (the open class has them at class level:
# `open_class`).
_HTTP_STUBS = ("write", "redirect", "set_header", "set_cookie", "set_status", "flush", "finish")
_DROPPED_AFTER_OPEN = frozenset(("path_args", "path_kwargs", "open_args", "open_kwargs", "ui", "_headers",
                                 "_write_buffer", "_transforms", "legacy_path",
                                 # the plain handler's own write accounting, which the outbox replaces
                                 "rounds", "issued", "done", "unsent_frames", "stalled_since", "_check",
                                 "socket_claims") + _HTTP_STUBS)


def _not_supported_for_websockets(*args, **kwargs) -> None:
    raise RuntimeError("Method not supported for Web Sockets")


def open_class(handler_class: type) -> type:
    """The class an open handler of `handler_class` wears: the HTTP response methods raise, as
    Tornado's own per-instance stubs do after the upgrade (WebSocketHandler._detach_stream)."""
    stubs = {name: staticmethod(_not_supported_for_websockets) for name in _HTTP_STUBS}
    return type("Open" + handler_class.__name__, (handler_class,), dict(stubs, __doc__=open_class.__doc__))


def trim_open_socket(handler, open_cls: type) -> None:
    """Drop what an open socket's handler, request and stream keep of the HTTP upgrade."""
    request = handler.request
    handler.request = UpgradedRequest(request)
    # Tornado's get() coroutine keeps a reference to the header object for the socket's life:
    # empty it in place. Re-running its __init__ gives it fresh empty dicts (clear() would pop
    # the items one by one and leave the dicts' tables allocated, ~400 bytes).
    request.headers.__init__()
    # The instance dict holds ~33 attributes, half of them for the HTTP response that is over:
    # rebuild it with what Tornado and pusherd still read (a dict half the size).
    state = handler.__dict__
    handler.__class__ = open_cls
    handler.__dict__ = {k: v for k, v in state.items() if k not in _DROPPED_AFTER_OPEN}
    lean_stream(handler.ws_connection.stream)

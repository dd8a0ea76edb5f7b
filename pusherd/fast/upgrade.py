"""WebSocket upgrades completed on the front (checked against Tornado 6.5.3 and 6.6.1).

Right after a deploy every page reconnects at once: thousands of upgrades in a few seconds.
Tornado's HTTP server spends more on one upgrade than pusherd spends on the join that follows
(an HTTP1ServerConnection and its read loop, a header parse, the routing, a RequestHandler, a
Task and Futures for the 101, an IOStream and a protocol object per socket). With the speed-ups
on, the front (front.py) recognizes a plain upgrade (`http1.read_upgrade`) and, when pusherd
would accept it, completes it itself: the 101 Tornado would write, byte for byte (`handshake`),
and the socket becomes a `frontsocket.FrontSocket`. Whether pusherd accepts is decided first by
the same functions as SocketHandler.prepare, without their side effects (`Upgrades.admit`);
whatever it would not accept (a refusal of any kind, a head of any other shape) goes to
Tornado's HTTP server as before, which decides, counts and answers it as it always did.

What it relies on of Tornado's: nothing internal. The 101 is Tornado's as its WebSocketHandler
writes it (the ``Server`` and ``Date`` a RequestHandler starts with, then the subprotocol, the
``Upgrade``, ``Connection`` and ``Sec-Websocket-Accept`` headers, named as HTTPHeaders spells
them); tests/integration/test_fast_paths.py compares the conversations of both paths byte for
byte. Benchmark that justifies it: ``python bench/run.py --only storm,stormrails``.
"""

import asyncio
import binascii
import hashlib
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import tornado
from tornado import httputil

from ..core.origins import upgrade_allowed
from ..core.errors import AuthError
from ..core.protocol import serializer_for_vsn
from ..core.tokens import auth_token_from_subprotocols, socket_token
from ..transports.http import log_access
from ..transports.websocket import text_params
from .direct import FlushQueue
from .frontsocket import FrontSocket
from .http1 import UpgradeHead, UpgradeHeaders

if TYPE_CHECKING:  # pragma: no cover
    from ..service import Service


#: Query strings whose parsed arguments `Upgrades.arguments` keeps, and their longest: a
#: phoenix.js query without socket params (``vsn=2.0.0``); a token is longer.
QUERIES_KEPT = 16
QUERY_CHARS_KEPT = 24


#: RFC 6455 4.2.2: what the Sec-WebSocket-Accept of a key hashes after it.
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HANDSHAKE_START = "HTTP/1.1 101 Switching Protocols\r\nServer: TornadoServer/%s\r\nDate: " % tornado.version


def handshake(key: str, subprotocol: Optional[str], date: str) -> bytes:
    """The 101 Tornado's WebSocketHandler answers an upgrade with (its accept value computed
    here as RFC 6455 says, as WebSocketProtocol13.compute_accept_value does, without that
    method's text conversions: `read_upgrade` admits only a base64 key)."""
    accept = binascii.b2a_base64(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest(), newline=False)
    return ("%s%s\r\n%sUpgrade: websocket\r\nConnection: Upgrade\r\nSec-Websocket-Accept: %s\r\n\r\n" % (
        _HANDSHAKE_START, date, "Sec-Websocket-Protocol: %s\r\n" % subprotocol if subprotocol else "",
        accept.decode("ascii"))).encode("latin1")


class Upgrades:
    """The socket routes of the application, and how an upgrade on them is completed."""

    def __init__(self, service: "Service", rounds: FlushQueue, date: Callable[[float], str],
                 loop: asyncio.AbstractEventLoop):
        """`rounds`: the process's fan-out rounds (direct.py); `date`: the HTTP date of a time
        (the front's, cached per second); `loop`: the front's."""
        self.service = service
        self.rounds = rounds
        self.date = date
        self._queries: Dict[str, Dict[str, list]] = {}
        # `path` takes a restart (the routes of transports/app.py are made at start): made once,
        # from the settings the routes were made of.
        path = service.config.settings.path.rstrip("/")
        self._paths = (path + "/websocket", path or "/")
        self.loop = loop  # given to each socket (asyncio.get_running_loop is a system call on Python 3.11)

    def paths(self) -> Tuple[str, str]:
        """The WebSocket path and the bare one the 2015 client opens (transports/app.py's routes)."""
        return self._paths

    def admit(self, headers: UpgradeHeaders, arguments: Dict[str, list], protocols: List[str], legacy: bool):
        """(serializer, socket claims) when SocketHandler.prepare would accept this upgrade, else
        None: the same checks, none of their side effects (a refusal is Tornado's to count).
        Where this reads a value more strictly than Tornado would, the upgrade goes to Tornado."""
        service = self.service
        vsn = arguments.get("vsn")
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
        token, csrf = socket_token(text_params(arguments), auth_token_from_subprotocols(protocols))
        claims = None
        if token is not None:
            try:
                claims = service.policy.verifier.verify(token, csrf, now=time.time())
            except AuthError:
                return None
        if not service.take_rate():  # last: only an upgrade about to open spends a token
            return None
        return serializer, claims

    def arguments(self, query: str) -> Dict[str, list]:
        """The query's arguments as Tornado parses them (``parse_qs_bytes``, blank values kept).
        A storm's pages all open the same short query (``vsn=2.0.0``): those are parsed once and
        kept, at most `QUERIES_KEPT` of at most `QUERY_CHARS_KEPT` characters (shorter than any
        JWT: a socket token in the query is not kept). The parsed arguments are only read (`admit`)."""
        known = self._queries.get(query)
        if known is not None:
            return known
        arguments = httputil.parse_qs_bytes(query, keep_blank_values=True)
        if len(query) <= QUERY_CHARS_KEPT and len(self._queries) < QUERIES_KEPT:
            self._queries[query] = arguments
        return arguments

    @staticmethod
    def subprotocols(headers: UpgradeHeaders) -> List[str]:
        """The subprotocols offered, as Tornado's handshake splits them (none: an empty list)."""
        header = headers.get("Sec-WebSocket-Protocol")
        return [p.strip() for p in header.split(",")] if header else []

    def complete(self, sock, head: UpgradeHead, remote_ip: str, rest: bytes = b"") -> bool:
        """Complete the upgrade on `sock` (its head fully read; `rest`: what came after it), or
        False when it is Tornado's to answer (nothing has been written then)."""
        started = time.time()
        legacy = head.path != self.paths()[0]
        headers = head.headers
        arguments = self.arguments(head.uri.partition("?")[2])
        protocols = self.subprotocols(headers)
        admitted = self.admit(headers, arguments, protocols, legacy)
        if admitted is None:
            return False
        serializer, claims = admitted
        # SocketHandler.select_subprotocol: "phoenix" when offered (never the bearer entry).
        subprotocol = "phoenix" if "phoenix" in protocols else None
        now = time.time()
        response = handshake(headers["sec-websocket-key"], subprotocol, self.date(now))
        if self.service.config.settings.access_log:  # as Tornado logs its 101 (transports.http.log_request)
            log_access(101, "GET", head.path, remote_ip, now - started)
        FrontSocket(self.service, self.rounds, sock, remote_ip, serializer, claims, response, rest, self.loop)
        return True

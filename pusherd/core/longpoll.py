"""Long-poll, the pure part: session tokens, the POST batch, the poll answer, the bounded outbox.

phoenix.js's LongPoll transport (1.2 to 1.8; reference/phoenix-protocol.md section 5) talks to
``<path>/longpoll``: a GET without a live session opens one (``{"status":410,"token":…}``), a GET
with one waits for messages (200) or the end of the window (204), a POST carries one message or
an ndjson batch. The transport (transports/longpoll.py) does the I/O; what is decided from bytes
alone is here, with randomness coming in as a parameter.

The session token is ``<node>.<sid><secret>``: ``node`` names the process that holds the
session (16 hex digits, new at every start, so a restarted process knows none of the old
tokens), ``sid`` (16 hex digits) indexes the session in that process, ``secret`` (43 base64url
characters, 256 random bits) is compared in constant time. Two dot-separated parts: never
mistaken for a JWT (three), which a page may also send as a ``token`` connect param.
"""

import base64
import binascii
import hmac
import json
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .protocol import Serializer, V1Serializer

#: Messages in one POST at most (phoenix.js 1.7+ sends at most 100; Phoenix reads at most 100).
MAX_BATCH = 100
NDJSON = "application/x-ndjson"

NODE_HEX = 16
SID_HEX = 16
SECRET_BYTES = 32
SECRET_CHARS = 43   # base64url of 32 bytes, without padding
_TOKEN = re.compile(r"([0-9a-f]{%d})\.([0-9a-f]{%d})([A-Za-z0-9_-]{%d})" % (NODE_HEX, SID_HEX, SECRET_CHARS))

_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class LongPollError(Exception):
    """A POST that is not dispatched at all: ``status`` (HTTP, also the body's ``status``) and a reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- tokens ------------------------------------------------------------------------------------

def new_node_id(random: Callable[[int], bytes]) -> str:
    """This process's name in the session tokens it mints (random: a restart renames it)."""
    return random(NODE_HEX // 2).hex()


def mint_token(node: str, random: Callable[[int], bytes]) -> Tuple[str, str, str]:
    """A new session's ``(token, sid, secret)``; `random` is e.g. ``secrets.token_bytes``."""
    sid = random(SID_HEX // 2).hex()
    secret = base64.urlsafe_b64encode(random(SECRET_BYTES)).rstrip(b"=").decode("ascii")
    return "%s.%s%s" % (node, sid, secret), sid, secret


def parse_token(token: Optional[str]) -> Optional[Tuple[str, str, str]]:
    """``(node, sid, secret)`` of a value shaped like a session token, else None."""
    if not token or len(token) != NODE_HEX + 1 + SID_HEX + SECRET_CHARS:
        return None
    m = _TOKEN.fullmatch(token)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def secret_matches(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode("ascii"), given.encode("ascii"))


def session_token(query: Mapping[str, Sequence[str]], header: Optional[str]) -> Optional[str]:
    """The session token a poll names: the ``X-Phoenix-LongPoll-Token`` header (newer clients),
    else the last ``token`` query parameter (phoenix.js appends it after the connect params)."""
    if header:
        return header
    values = query.get("token") or ()
    return values[-1] if values else None


def connect_params(query: Mapping[str, Sequence[str]]) -> Dict[str, str]:
    """The page's connect params from an opening GET: the last value of each, except that a
    ``token`` shaped like a session token (a stale one: phoenix.js appends it last) is not the
    page's own ``token`` param, which comes before it."""
    params = {}
    for name, values in query.items():
        if name == "token":
            values = [v for v in values if parse_token(v) is None]
        if values:
            params[name] = values[-1]
    return params


def page_origin(headers: Mapping[str, str], own_origin: str) -> Tuple[Optional[str], bool]:
    """The origin of the page behind a long-poll request, for the origin policy: ``(origin,
    from_page)``, origin None for no page at all (not a browser: curl, a server).

    Unlike a WebSocket upgrade, a browser sends no ``Origin`` on a same-origin GET; it does send
    ``Sec-Fetch-Site`` (every current browser): the page's origin is then pusherd's own, as
    the request names it (`own_origin`, scheme and Host), and the policy decides on that. A page
    on another host that rebinds its name to pusherd's address is thus judged by its own name.
    """
    origin = headers.get("Origin")
    if origin is not None:
        return origin, True
    if headers.get("Sec-Fetch-Site") is not None:
        return own_origin, True
    return None, False


# --- POST bodies -------------------------------------------------------------------------------

def split_batch(body: bytes, content_type: str, max_message: int, max_batch: int = MAX_BATCH) -> List:
    """The messages of one POST, each as a WebSocket frame would carry it: text (str) or, for an
    ndjson line not starting with ``[`` (phoenix.js 1.7+ sends binary pushes base64-encoded),
    bytes. ``application/x-ndjson``: one message a line (``\\n`` or ``\\r\\n``; blank lines are
    skipped), at most `max_batch`; any other type: the body is one message. Each message is at
    most `max_message` bytes. Raises LongPollError: nothing of a refused body is dispatched."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == NDJSON:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in body.split(b"\n")]
        lines = [line for line in lines if line]
    else:
        lines = [body]
    if len(lines) > max_batch:
        raise LongPollError(413, "more than %d messages in one POST" % max_batch)
    messages = []
    for line in lines:
        if len(line) > max_message:
            raise LongPollError(413, "message larger than max_frame_bytes (%d)" % max_message)
        if media != NDJSON or line.startswith(b"["):
            try:
                messages.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                raise LongPollError(400, "message is not UTF-8") from None
        else:
            try:
                messages.append(base64.b64decode(line, validate=True))
            except (binascii.Error, ValueError):
                raise LongPollError(400, "ndjson line is neither a JSON array nor base64") from None
    return messages


# --- answers -----------------------------------------------------------------------------------

def as_objects(serializer: Serializer) -> bool:
    """V1 clients get each message as a JSON object in ``messages`` (phoenix.js 1.2 re-stringifies
    what it gets, as Phoenix 1.2 served it); V2 clients get the frame's text as a string."""
    return isinstance(serializer, V1Serializer)


def poll_body(status: int, token: Optional[str], messages: Sequence[str] = (), objects: bool = False) -> str:
    """``{"status":…,"token":…,"messages":[…]}``. `messages`: encoded texts, as a WebSocket
    frame would carry them; `objects`: put each in as the JSON value it is (V1), else as a string."""
    items = ",".join(messages) if objects else ",".join(_encode_json(m) for m in messages)
    return '{"status":%d,"token":%s,"messages":[%s]}' % (status, _encode_json(token), items)


def status_body(status: int, error: Optional[str] = None) -> str:
    body = {"status": status}
    if error is not None:
        body["error"] = error
    return _encode_json(body)


# --- the outbox --------------------------------------------------------------------------------

class Outbox:
    """What a session has for its next poll, bounded: ``add`` returns False (nothing kept) once
    the texts waiting would exceed `limit` characters (the slow-consumer rule)."""

    __slots__ = ("texts", "size", "limit")

    def __init__(self, limit: int):
        self.texts: List[str] = []
        self.size = 0
        self.limit = limit

    def add(self, text: str) -> bool:
        size = self.size + len(text)
        if size > self.limit:
            return False
        self.texts.append(text)
        self.size = size
        return True

    def take(self) -> List[str]:
        texts, self.texts, self.size = self.texts, [], 0
        return texts

    def __len__(self) -> int:
        return len(self.texts)


# --- time --------------------------------------------------------------------------------------

def reap_after(window: float, polled: bool) -> float:
    """Seconds without a poll after which a session ends: 1.5 windows (as Phoenix), or half a
    window for a session never polled since its open (phoenix.js polls again at once after the
    410, so an open without a second poll is a lost client or a flood of opens)."""
    return 1.5 * window if polled else 0.5 * window

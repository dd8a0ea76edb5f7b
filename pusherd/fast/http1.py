"""Recognizes the two HTTP/1.1 request shapes the front answers itself, with no I/O: a
publisher's ``POST /publish`` (`read_head`) and a browser's plain WebSocket upgrade
(`read_upgrade`, the same strictness; upgrade.py).

A Rails app publishes over a keep-alive connection, request after request of the same plain
shape: ``POST /publish HTTP/1.1``, a Host, a Content-Length, an Authorization, a JSON body.
`read_head` recognizes exactly that shape, strictly, and says `OTHER` for anything else
(another method or path, HTTP/1.0, a chunked body, ``Expect: 100-continue``, a duplicated
Content-Length, Content-Type or Host, bare LF line ends, folded or non-ASCII header lines, an
oversized head...). The daemon hands such a connection to Tornado's HTTP server, which applies
the full HTTP/1.1 rules. So every request served from this shape is one Tornado would read the
same way (tests/unit/test_http1.py checks this against Tornado's own parser), and nothing
unusual is ever interpreted here.
"""

import re
from typing import List, Optional, Tuple, Union

#: Largest request head (request line + headers + blank line) recognized here; a longer one
#: (a publisher JWT would have to be very large) goes to Tornado, whose own limit is 16 KB.
MAX_HEAD = 8192

#: Largest Content-Length read as a number here (a larger one goes to Tornado as is).
MAX_LENGTH_DIGITS = 15

_PREFIX = b"POST /publish"
_REQUEST_LINE = re.compile(r"POST (/publish(?:\?[\x21-\x7e]*)?) HTTP/1\.1")
# RFC 9110 field: a token name, no space before the colon; a value of visible ASCII with inner
# spaces or tabs, trimmed of outer ones (as Tornado strips them). No CR, LF, NUL or obs-text.
# The rule as one expression: `_fields` checks it over a whole head, and is tested against it.
_FIELD = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?)[ \t]*")
# Stricter than Tornado's Host rule (a subset of it): names, IPv4, bracketed IPv6, a port.
_HOST = re.compile(r"[A-Za-z0-9.\-\[\]:]+")
#: What `_fields` allows in a head's lines (visible ASCII, space, tab; CR and LF only as CRLF), and
#: what a header name is made of (RFC 9110 token): `_FIELD`'s rule, checked for the whole head.
_LINE_CHARS = bytes(range(0x20, 0x7f)) + b"\t"
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_DIGITS = re.compile(r"[0-9]{1,%d}" % MAX_LENGTH_DIGITS)
#: Headers that must appear at most once for the request to be recognized.
_SINGLE = frozenset(("host", "content-length", "content-type", "connection"))
#: Headers whose presence alone sends the request to Tornado.
_OTHER = frozenset(("transfer-encoding", "expect"))


class _Verdict:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: Not enough bytes yet to tell.
MORE = _Verdict("MORE")
#: Not the publish shape: the connection goes to Tornado, with every byte read so far.
OTHER = _Verdict("OTHER")


class PublishHead:
    """A recognized ``POST /publish`` head; its body is the next ``content_length`` bytes."""

    __slots__ = ("path", "authorizations", "content_type", "content_length", "close", "length", "lines",
                 "length_line", "length_name")

    def __init__(self, path: str, authorizations: List[str], content_type: str, content_length: int,
                 close: bool, length: int, lines: List[str], length_line: int, length_name: str):
        self.path = path  # without the query string, as the access log shows it
        self.authorizations = authorizations  # every Authorization header, in order
        self.content_type = content_type
        self.content_length = content_length
        self.close = close  # the client said Connection: close
        self.length = length  # bytes of the head, blank line included
        self.lines = lines  # the head's lines, request line first (`again`)
        self.length_line = length_line  # which of them is the Content-Length
        self.length_name = length_name  # its name as sent, with the colon

    def again(self, lines: List[str], length: int) -> Optional["PublishHead"]:
        """The next head of a keep-alive publisher, when it is this one but for the
        Content-Length value: every other line the same, byte for byte, and that line the same
        name followed by digits (inside spaces or tabs, as `_FIELD` allows). Every check
        `read_head` makes then has the same outcome, so its verdict is this head's with the new
        length; None: read it in full. A publisher repeats its head request after request
        (bench/run.py --only publish)."""
        known = self.lines
        at = self.length_line
        if len(lines) != len(known):
            return None
        line = lines[at]
        lines[at] = known[at]  # (compared as a whole, in one step)
        same = lines == known
        lines[at] = line
        if not same or not line.startswith(self.length_name):
            return None
        value = line[len(self.length_name):].strip(" \t")
        if _DIGITS.fullmatch(value) is None:
            return None
        return PublishHead(self.path, self.authorizations, self.content_type, int(value), self.close, length,
                           known, at, self.length_name)

    def __repr__(self) -> str:
        return "PublishHead(%r, %d auth, %r, %d, close=%r, length=%d)" % (
            self.path, len(self.authorizations), self.content_type, self.content_length, self.close, self.length)


def _head_lines(buf: Union[bytes, bytearray]):
    """(the head's lines, request line first; its length with the blank line), or (MORE or
    OTHER, 0): incomplete, or past MAX_HEAD, a bare LF or a byte that is not ASCII."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:  # incomplete; a bare LF already tells it is not a shape read here
        return (MORE if len(buf) < MAX_HEAD and buf.count(b"\n") == buf.count(b"\r\n") else OTHER), 0
    try:
        return bytes(buf[:end]).decode("ascii").split("\r\n"), end + 4
    except UnicodeDecodeError:
        return OTHER, 0


def _fields(buf: Union[bytes, bytearray], length: int, lines: List[str]) -> Optional[List[Tuple[str, str]]]:
    """The header lines (``lines[1:]``) as (name, value) pairs, each line by `_FIELD`'s rule, or
    None when one breaks it: only `_LINE_CHARS` in the lines, CR and LF only as CRLF, each line
    a non-empty token, a colon, a value trimmed of outer spaces and tabs. Checked with a few
    passes over the whole head instead of a regular expression per line (`read_upgrade` by
    timeit: 10.8 -> 8.8 us for a six-line head, 17.0 -> 12.7 for a Chrome head of twelve;
    bench/run.py --only stormrails)."""
    # What is left of the head without its visible ASCII, spaces and tabs must be the CRLFs
    # between its lines and nothing else: no other byte, no CR or LF alone.
    if bytes(buf[:length - 4]).translate(None, _LINE_CHARS) != b"\r\n" * (len(lines) - 1):
        return None
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name:
            return None
        fields.append((name, value.strip(" \t")))
    if "".join([name for name, _ in fields]).encode("ascii").translate(None, _TOKEN_CHARS):
        return None
    return fields


def read_head(buf: Union[bytes, bytearray], last: Optional[PublishHead] = None) -> Union[PublishHead, _Verdict]:
    """The head at the start of ``buf``: a `PublishHead`, `MORE` or `OTHER`. ``last``: the
    connection's previous head, which this one often repeats (`PublishHead.again`)."""
    n = len(buf)
    if n <= len(_PREFIX):
        return MORE if _PREFIX.startswith(bytes(buf)) else OTHER
    if not buf.startswith(_PREFIX) or buf[len(_PREFIX)] not in b" ?":
        return OTHER
    lines, length = _head_lines(buf)
    if length == 0:
        return lines  # MORE or OTHER
    if last is not None:
        head = last.again(lines, length)
        if head is not None:
            return head
    request = _REQUEST_LINE.fullmatch(lines[0])
    if request is None:
        return OTHER
    fields = _fields(buf, length, lines)
    if fields is None:
        return OTHER
    authorizations: List[str] = []
    single = {}
    length_line = 0
    for index, (name, value) in enumerate(fields, 1):
        name = name.lower()
        if name == "authorization":
            authorizations.append(value)
        elif name in _SINGLE:
            if name in single:
                return OTHER
            single[name] = value
            if name == "content-length":
                length_line = index
        elif name in _OTHER:
            return OTHER
    host = single.get("host")
    content_length = single.get("content-length")
    if (host is None or _HOST.fullmatch(host) is None or content_length is None
            or _DIGITS.fullmatch(content_length) is None):
        return OTHER
    return PublishHead(request.group(1).split("?", 1)[0], authorizations, single.get("content-type", ""),
                       int(content_length), single.get("connection", "").lower() == "close", length,
                       lines, length_line, lines[length_line].partition(":")[0] + ":")


_GET = b"GET "
_UPGRADE_LINE = re.compile(r"GET (/[\x21-\x7e]*) HTTP/1\.1")
#: Upgrade headers that must appear exactly once (``Connection`` and ``Upgrade`` are checked by
#: value; the Sec-WebSocket ones keyed as Tornado reads them).
_UPGRADE_SINGLE = frozenset(("host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                             "origin", "sec-fetch-site", "sec-websocket-protocol", "content-length"))
#: A Sec-WebSocket-Key: 16 bytes in base64 (RFC 6455 4.2.1).
_WS_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")


class UpgradeHeaders(dict):
    """An upgrade's header fields by lower-cased name, repeated ones joined with commas: what
    ``HTTPHeaders.get`` gives for a name, at the cost of a dict (made by `read_upgrade` in the
    pass that checks the names)."""

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)


class UpgradeHead:
    """A recognized WebSocket upgrade head: ``GET <path>[?query] HTTP/1.1`` on one of the
    socket paths, every header line strict, the upgrade headers once each and well formed."""

    __slots__ = ("uri", "path", "fields", "headers", "length")

    def __init__(self, uri: str, path: str, fields: List[tuple], headers: UpgradeHeaders, length: int):
        self.uri = uri
        self.path = path
        self.fields = fields  # (name as sent, value), in order
        self.headers = headers
        self.length = length  # bytes of the head, blank line included

    def __repr__(self) -> str:
        return "UpgradeHead(%r, %d fields, length=%d)" % (self.path, len(self.fields), self.length)


def read_upgrade(buf: Union[bytes, bytearray], paths) -> Union[UpgradeHead, _Verdict]:
    """The head at the start of ``buf`` when it is a plain WebSocket upgrade to one of
    ``paths``: an `UpgradeHead`, `MORE` or `OTHER` (anything else, for Tornado to read)."""
    n = len(buf)
    if n <= len(_GET):
        return MORE if _GET.startswith(bytes(buf)) else OTHER
    if not buf.startswith(_GET):
        return OTHER
    lines, length = _head_lines(buf)
    if length == 0:
        return lines  # MORE or OTHER
    request = _UPGRADE_LINE.fullmatch(lines[0])
    if request is None:
        return OTHER
    uri = request.group(1)
    path = uri.split("?", 1)[0]
    if path not in paths:
        return OTHER
    fields = _fields(buf, length, lines)
    if fields is None:
        return OTHER
    headers = UpgradeHeaders()
    known = dict.get
    for name, value in fields:
        lower = name.lower()
        before = known(headers, lower)
        if before is None:
            headers[lower] = value
        elif lower in _UPGRADE_SINGLE:
            return OTHER
        else:
            headers[lower] = before + "," + value
        if lower in _OTHER:
            return OTHER
    host = known(headers, "host")
    connection = known(headers, "connection", "").lower()
    if (host is None or _HOST.fullmatch(host) is None
            or known(headers, "upgrade", "").lower() != "websocket"
            or (connection != "upgrade" and "upgrade" not in [part.strip() for part in connection.split(",")])
            or known(headers, "sec-websocket-version") != "13"
            or _WS_KEY.fullmatch(known(headers, "sec-websocket-key", "")) is None
            or known(headers, "content-length", "0") != "0"):
        return OTHER
    # Tornado 6.6 refuses a cross-site upgrade without an Origin before pusherd's own check
    # would run: such a request is left to it.
    if known(headers, "sec-fetch-site", "same-origin") not in ("same-origin", "none") and not known(headers, "origin"):
        return OTHER
    return UpgradeHead(uri, path, fields, headers, length)

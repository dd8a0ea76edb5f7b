"""Recognizes the one HTTP/1.1 request shape a publisher sends, with no I/O.

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
from typing import List, Union

#: Largest request head (request line + headers + blank line) recognized here; a longer one
#: (a publisher JWT would have to be very large) goes to Tornado, whose own limit is 16 KB.
MAX_HEAD = 8192

#: Largest Content-Length read as a number here (a larger one goes to Tornado as is).
MAX_LENGTH_DIGITS = 15

_PREFIX = b"POST /publish"
_REQUEST_LINE = re.compile(r"POST (/publish(?:\?[\x21-\x7e]*)?) HTTP/1\.1")
# RFC 9110 field: a token name, no space before the colon; a value of visible ASCII with inner
# spaces or tabs, trimmed of outer ones (as Tornado strips them). No CR, LF, NUL or obs-text.
_FIELD = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?)[ \t]*")
# Stricter than Tornado's Host rule (a subset of it): names, IPv4, bracketed IPv6, a port.
_HOST = re.compile(r"[A-Za-z0-9.\-\[\]:]+")
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

    __slots__ = ("path", "authorizations", "content_type", "content_length", "close", "length")

    def __init__(self, path: str, authorizations: List[str], content_type: str, content_length: int,
                 close: bool, length: int):
        self.path = path  # without the query string, as the access log shows it
        self.authorizations = authorizations  # every Authorization header, in order
        self.content_type = content_type
        self.content_length = content_length
        self.close = close  # the client said Connection: close
        self.length = length  # bytes of the head, blank line included

    def __repr__(self) -> str:
        return "PublishHead(%r, %d auth, %r, %d, close=%r, length=%d)" % (
            self.path, len(self.authorizations), self.content_type, self.content_length, self.close, self.length)


def read_head(buf: Union[bytes, bytearray]) -> Union[PublishHead, _Verdict]:
    """The head at the start of ``buf``: a `PublishHead`, `MORE` or `OTHER`."""
    n = len(buf)
    if n <= len(_PREFIX):
        return MORE if _PREFIX.startswith(bytes(buf)) else OTHER
    if not buf.startswith(_PREFIX) or buf[len(_PREFIX)] not in b" ?":
        return OTHER
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:  # incomplete; a bare LF already tells it is not this shape
        return MORE if n < MAX_HEAD and buf.count(b"\n") == buf.count(b"\r\n") else OTHER
    try:
        text = bytes(buf[:end]).decode("ascii")
    except UnicodeDecodeError:
        return OTHER
    lines = text.split("\r\n")
    request = _REQUEST_LINE.fullmatch(lines[0])
    if request is None:
        return OTHER
    authorizations: List[str] = []
    single = {}
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:
            return OTHER
        name = field.group(1).lower()
        if name == "authorization":
            authorizations.append(field.group(2))
        elif name in _SINGLE:
            if name in single:
                return OTHER
            single[name] = field.group(2)
        elif name in _OTHER:
            return OTHER
    host = single.get("host")
    length = single.get("content-length")
    if host is None or _HOST.fullmatch(host) is None or length is None or _DIGITS.fullmatch(length) is None:
        return OTHER
    return PublishHead(request.group(1).split("?", 1)[0], authorizations, single.get("content-type", ""),
                       int(length), single.get("connection", "").lower() == "close", end + 4)

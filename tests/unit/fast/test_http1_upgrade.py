"""http1.read_upgrade: a plain WebSocket upgrade is recognized strictly, and read as Tornado reads it.

Whatever read_upgrade accepts, Tornado's own parser must read the same request line and the same
headers from it, and WebSocketHandler.get's own checks (Upgrade, Connection, the required
Sec-WebSocket headers, version 13, 6.6's cross-site rule) must pass: upgrade.py completes only
such upgrades and leaves every other request to Tornado (OTHER), never guessing.
"""

from hypothesis import given, settings, strategies as st
from tornado import httputil

from pusherd.fast.http1 import MAX_HEAD, MORE, OTHER, UpgradeHead, read_upgrade

PATHS = ("/events/websocket", "/events")
LINES = ["Host: 127.0.0.1:4000", "Upgrade: websocket", "Connection: Upgrade",
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", "Origin: http://localhost:3000"]


def head_of(lines, request="GET /events/websocket?vsn=2.0.0 HTTP/1.1"):
    return ("\r\n".join([request] + lines) + "\r\n\r\n").encode("latin1")


def tornado_reads(raw: bytes):
    text = raw.decode("latin1")
    eol = text.find("\n")
    start = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
    headers = httputil.HTTPHeaders.parse(text[eol:])
    request = httputil.HTTPServerRequest(headers=headers, start_line=start)
    return start, request, headers


def test_a_plain_upgrade_is_recognized():
    raw = head_of(LINES)
    head = read_upgrade(raw + b"\x81", PATHS)
    assert isinstance(head, UpgradeHead) and head.length == len(raw)
    assert head.path == "/events/websocket" and head.uri == "/events/websocket?vsn=2.0.0"
    assert head.fields == [tuple(line.split(": ", 1)) for line in LINES]
    assert isinstance(read_upgrade(head_of(LINES, "GET /events HTTP/1.1"), PATHS), UpgradeHead)


def test_every_prefix_waits_and_other_shapes_go_to_tornado():
    raw = head_of(LINES)
    for n in range(1, len(raw)):
        assert read_upgrade(raw[:n], PATHS) is MORE
    assert read_upgrade(b"POST /events/websocket", PATHS) is OTHER
    for request in ("GET /elsewhere HTTP/1.1", "GET /events/websocket HTTP/1.0", "GET /events/websocket/ HTTP/1.1",
                    "get /events HTTP/1.1", "GET  /events HTTP/1.1"):
        assert read_upgrade(head_of(LINES, request), PATHS) is OTHER, request
    variants = [
        [l for l in LINES if not l.startswith("Host")],
        [l.replace("websocket", "h2c") for l in LINES],
        [l.replace("Connection: Upgrade", "Connection: keep-alive") for l in LINES],
        [l.replace("Version: 13", "Version: 8") for l in LINES],
        [l.replace("dGhlIHNhbXBsZSBub25jZQ==", "abc") for l in LINES],
        LINES + ["Origin: http://evil.example"],          # twice
        LINES + ["Transfer-Encoding: chunked"],
        LINES + ["Content-Length: 3"],
        LINES + [" folded"],
        LINES + ["Bad Name: x"],
        [l for l in LINES if not l.startswith("Origin")] + ["Sec-Fetch-Site: cross-site"],
    ]
    for lines in variants:
        assert read_upgrade(head_of(lines), PATHS) is OTHER, lines
    assert read_upgrade(head_of(LINES).replace(b"\r\n", b"\n"), PATHS) is OTHER
    assert read_upgrade(head_of(LINES + ["X-Pad: " + "a" * MAX_HEAD]), PATHS) is OTHER


NAMES = ["Host", "host", "Upgrade", "Connection", "connection", "Sec-WebSocket-Key", "sec-websocket-version",
         "Origin", "Sec-Fetch-Site", "Sec-WebSocket-Protocol", "Cookie", "X-Forwarded-For", "Content-Length"]
VALUES = st.one_of(st.sampled_from(["websocket", "Upgrade", "keep-alive, Upgrade", "13", "8", "", " x ", "cross-site",
                                    "same-origin", "none", "http://localhost:3000", "phoenix", "0", "1"]),
                   st.text(alphabet=st.characters(min_codepoint=0x09, max_codepoint=0x7f), max_size=12))
SEPARATORS = st.sampled_from([": ", ":", " : ", ":\t", ":  "])


@st.composite
def heads(draw):
    lines = list(LINES)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["add", "add", "drop", "request"]))
        if kind == "drop" and lines:
            lines.pop(draw(st.integers(0, len(lines) - 1)))
        elif kind == "request":
            path = draw(st.sampled_from(["/events", "/events/websocket", "/events/websocket?vsn=1.0.0&x=%00",
                                         "/x", "/events?token=a+b"]))
            return head_of(lines, "GET %s HTTP/1.1" % path)
        else:
            name = draw(st.one_of(st.sampled_from(NAMES), st.text(alphabet="abcXYZ-_!~ ", max_size=6)))
            lines.insert(draw(st.integers(0, len(lines))), name + draw(SEPARATORS) + draw(VALUES))
    return head_of(lines)


@settings(max_examples=3000, deadline=None)
@given(heads())
def test_whatever_is_recognized_tornado_reads_the_same_and_would_upgrade(raw):
    head = read_upgrade(raw, PATHS)
    if not isinstance(head, UpgradeHead):
        assert head is MORE or head is OTHER
        return
    start, request, headers = tornado_reads(raw[:head.length])
    assert (start.method, start.version, request.uri, request.path) == ("GET", "HTTP/1.1", head.uri, head.path)
    ours = httputil.HTTPHeaders()
    for name, value in head.fields:
        ours.add(name, value)
    assert sorted(headers.get_all()) == sorted(ours.get_all())
    for name in set(name for name, _ in head.fields) | {"Origin", "Sec-WebSocket-Protocol", "X-Absent"}:
        assert head.headers.get(name) == headers.get(name)  # what Upgrades reads, as Tornado's HTTPHeaders
    # WebSocketHandler.get and WebSocketProtocol13's own checks pass
    assert headers.get("Upgrade", "").lower() == "websocket"
    assert "upgrade" in [s.strip().lower() for s in headers.get("Connection", "").split(",")]
    assert all(headers.get(f) for f in ("Host", "Sec-Websocket-Key", "Sec-Websocket-Version"))
    assert headers.get("Sec-WebSocket-Version") == "13"
    if headers.get("Sec-Fetch-Site") not in (None, "same-origin", "none"):
        assert headers.get("Origin")


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_get_a_verdict(raw):
    head = read_upgrade(head_of(LINES)[:40] + raw, PATHS)
    assert head is MORE or head is OTHER or isinstance(head, UpgradeHead)


# The header lines are checked by a few passes over the whole head (http1._fields), not by the
# field rule line by line: both must give the same verdict and the same (name, value) pairs.
_LINE_CHARS = st.sampled_from(list("Ab-: \t\x00\x7f\xe9\r\n:;,/\"") + [chr(c) for c in range(0x21, 0x7f)])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.text(_LINE_CHARS, max_size=12), min_size=1, max_size=5))
def test_the_whole_head_check_is_the_field_rule_line_by_line(lines):
    from pusherd.fast import http1
    raw = head_of(lines, request="GET /events HTTP/1.1")
    if b"\r\n\r\n" in raw[:-4] or any(ord(c) > 0xff for c in "".join(lines)):
        return  # another head's end inside, or not a byte: not this check's case
    parsed, length = http1._head_lines(raw)
    if length == 0:
        expected = None  # not ASCII, or a bare LF: no lines to check
        got = None
    else:
        matches = [http1._FIELD.fullmatch(line) for line in parsed[1:]]
        expected = None if None in matches else [(m.group(1), m.group(2)) for m in matches]
        got = http1._fields(raw, length, parsed)
    assert got == expected, (lines, got, expected)


def test_the_whole_head_check_refuses_what_the_field_rule_refuses():
    from pusherd.fast import http1
    for bad in ("Na me: x", " Host: x", "Host x", ": x", "Host: a\rb", "Host: a\x00", "Host: a\x7f", "H\tost: x",
                "Host : x", "Hóst: x"):
        raw = head_of(LINES + [bad])
        lines, length = http1._head_lines(raw)
        assert length == 0 or http1._fields(raw, length, lines) is None, bad
        assert read_upgrade(raw, PATHS) is OTHER, bad
    raw = head_of(LINES + ["X-Padded: \t a b \t ", "X-Empty:", "X-Empty-Spaces:   "])
    head = read_upgrade(raw, PATHS)
    assert head.fields[-3:] == [("X-Padded", "a b"), ("X-Empty", ""), ("X-Empty-Spaces", "")]

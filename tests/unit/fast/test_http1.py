"""http1.read_head: the publish shape is recognized strictly, and read as Tornado reads it.

Whatever read_head accepts, Tornado's own parser (the one every other request meets) must
accept too, with the same Authorization list, Content-Type, Content-Length and keep-alive
decision; anything unusual must be left to Tornado (OTHER), never guessed at.
"""

import pytest
from hypothesis import given, settings, strategies as st
from tornado import http1connection, httputil

from pusherd.fast.http1 import MAX_HEAD, MORE, OTHER, PublishHead, read_head

BASIC = (b"POST /publish HTTP/1.1\r\nHost: localhost:4000\r\nContent-Length: 12\r\n"
         b"Authorization: Bearer s3cret\r\nContent-Type: application/json\r\n\r\n")


def head_of(*lines, request=b"POST /publish HTTP/1.1"):
    return b"\r\n".join((request,) + lines) + b"\r\n\r\n"


def tornado_reads(raw: bytes):
    """What Tornado makes of a head: (path, authorizations, content type, length, close)."""
    text = raw.decode("latin1")
    eol = text.find("\n")
    start = httputil.parse_request_start_line(text[:eol].rstrip("\r"))
    headers = httputil.HTTPHeaders.parse(text[eol:])
    request = httputil.HTTPServerRequest(headers=headers, start_line=start)  # Tornado's Host rules
    assert "Transfer-Encoding" not in headers
    length = headers["Content-Length"]
    assert http1connection.parse_int(length) >= 0
    connection = headers.get("Connection")
    close = start.version != "HTTP/1.1" or (connection is not None and connection.lower() == "close")
    return (start.method, request.path, headers.get_list("Authorization"), headers.get("Content-Type", ""),
            int(length), close)


def fields(head: PublishHead):
    return ("POST", head.path, head.authorizations, head.content_type, head.content_length, head.close)


def test_a_plain_publish_head():
    head = read_head(BASIC + b'{"topic":"x"}')
    assert isinstance(head, PublishHead)
    assert (head.path, head.authorizations, head.content_type, head.content_length, head.close, head.length) == (
        "/publish", ["Bearer s3cret"], "application/json", 12, False, len(BASIC))
    assert fields(head) == tornado_reads(BASIC)


@pytest.mark.parametrize("raw, expected", [
    (head_of(b"Host: h", b"Content-Length: 0", request=b"POST /publish?token=x&y=%20 HTTP/1.1"),
     ("/publish", [], "", 0, False)),
    (head_of(b"host: h", b"content-length: 5", b"authorization: a", b"AUTHORIZATION: b"),
     ("/publish", ["a", "b"], "", 5, False)),
    (head_of(b"Host: h", b"Content-Length: 5", b"Connection: Close"), ("/publish", [], "", 5, True)),
    (head_of(b"Host: h", b"Content-Length: 5", b"Connection: keep-alive"), ("/publish", [], "", 5, False)),
    (head_of(b"Host: h", b"Content-Length: 5", b"Connection: close, te"), ("/publish", [], "", 5, False)),
    (head_of(b"Host:h", b"Content-Length:\t 007 \t", b"Content-Type:  a/b; x=1  "), ("/publish", [], "a/b; x=1", 7, False)),
    (head_of(b"Host: [::1]:80", b"Content-Length: 1", b"Authorization:", b"X-Empty:"), ("/publish", [""], "", 1, False)),
    (head_of(b"Host: h", b"Content-Length: 1", b"Content-Encoding: gzip", b"Upgrade: websocket"),
     ("/publish", [], "", 1, False)),
])
def test_recognized_heads(raw, expected):
    head = read_head(raw)
    assert isinstance(head, PublishHead), raw
    assert (head.path, head.authorizations, head.content_type, head.content_length, head.close) == expected
    assert head.length == len(raw)
    assert fields(head) == tornado_reads(raw)


@pytest.mark.parametrize("raw", [
    b"GET /events/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n",
    b"G",
    b"POST /publisher HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n",
    b"POST /publish/ HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n",
    b"post /publish HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n",
    b"\r\nPOST /publish HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n",  # Tornado skips it; not here
    b"POST  /publish HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\n",
    head_of(b"Host: h", b"Content-Length: 1", request=b"POST /publish HTTP/1.0"),
    head_of(b"Host: h", b"Content-Length: 1", request=b"POST /publish HTTP/1.1 "),
    head_of(b"Host: h", b"Content-Length: 1", request=b"POST /publish?\xe9 HTTP/1.1"),
    head_of(b"Host: h", b"Transfer-Encoding: chunked"),
    head_of(b"Host: h", b"Content-Length: 3", b"Transfer-Encoding: chunked"),
    head_of(b"Host: h", b"Content-Length: 3", b"Expect: 100-continue"),
    head_of(b"Host: h"),  # no Content-Length
    head_of(b"Content-Length: 3"),  # no Host
    head_of(b"Host: h", b"Host: h", b"Content-Length: 3"),
    head_of(b"Host: a,b", b"Content-Length: 3"),
    head_of(b"Host: h/x", b"Content-Length: 3"),
    head_of(b"Host:", b"Content-Length: 3"),
    head_of(b"Host: h", b"Content-Length: 3", b"Content-Length: 3"),
    head_of(b"Host: h", b"Content-Length: 3,3"),
    head_of(b"Host: h", b"Content-Length: +3"),
    head_of(b"Host: h", b"Content-Length: -3"),
    head_of(b"Host: h", b"Content-Length: 0x3"),
    head_of(b"Host: h", b"Content-Length: 3 3"),
    head_of(b"Host: h", b"Content-Length: 1234567890123456"),
    head_of(b"Host: h", b"Content-Length: 3", b"Content-Type: a", b"Content-Type: b"),
    head_of(b"Host: h", b"Content-Length: 3", b"Connection: close", b"Connection: close"),
    head_of(b"Host: h", b"Content-Length : 3"),
    head_of(b"Host: h", b"Content-Length: 3", b" folded"),
    head_of(b"Host: h", b"Content-Length: 3", b"\tfolded"),
    head_of(b"Host: h", b"Content-Length: 3", b"X-Bad\x00: v"),
    head_of(b"Host: h", b"Content-Length: 3", b"X-Bad: v\x00v"),
    head_of(b"Host: h", b"Content-Length: 3", b"X-Bad: v\x7fv"),
    head_of(b"Host: h", b"Content-Length: 3", b"X-Latin: caf\xe9"),
    head_of(b"Host: h", b"Content-Length: 3", b"no colon"),
    head_of(b"Host: h", b"Content-Length: 3", b": no name"),
    b"POST /publish HTTP/1.1\nHost: h\nContent-Length: 3\n\n",
    b"POST /publish HTTP/1.1\r\nHost: h\nContent-Length: 3\r\n\r\n",
    b"POST /publish HTTP/1.1\r\nHost: h\rX: y\r\nContent-Length: 3\r\n\r\n",
    head_of(b"Host: h", b"Content-Length: 3", b"Authorization: " + b"x" * MAX_HEAD),
])
def test_anything_else_goes_to_tornado(raw):
    assert read_head(raw) is OTHER


def test_a_head_without_its_end_waits_until_the_limit():
    assert read_head(b"POST /publish HTTP/1.1\r\nHost: h\r\nX: " + b"x" * (MAX_HEAD - 100)) is MORE
    assert read_head(b"POST /publish HTTP/1.1\r\nHost: h\r\nX: " + b"x" * MAX_HEAD) is OTHER


def test_every_prefix_of_a_head_waits_for_more():
    for k in range(len(BASIC)):
        assert read_head(BASIC[:k]) is MORE, BASIC[:k]
        assert read_head(bytearray(BASIC[:k])) is MORE
    assert isinstance(read_head(bytearray(BASIC)), PublishHead)


def test_a_prefix_that_cannot_become_a_publish_is_decided_at_once():
    for raw in (b"GE", b"POST /e", b"POSTX", b"POST /publishX", b"PUT /publish"):
        assert read_head(raw) is OTHER


# -- against Tornado's parser, on generated heads --------------------------------------------

NAMES = ["Host", "host", "Content-Length", "content-length", "Authorization", "authorization", "Content-Type",
         "Connection", "Transfer-Encoding", "Expect", "X-Forwarded-For", "Content Length", "", "X\x00"]
VALUES = st.one_of(
    st.sampled_from(["h", "localhost:4000", "[::1]", "a,b", "12", "0", "007", "+1", "1,1", "close", "Close",
                     "keep-alive", "chunked", "100-continue", "Bearer x", "application/json", "", " ", "\t"]),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=12),
)
SEPARATORS = st.sampled_from([": ", ":", " : ", ":\t", ":  "])
ENDS = st.sampled_from(["\r\n"] * 8 + ["\n", "\r"])
REQUEST_LINES = st.sampled_from(["POST /publish HTTP/1.1", "POST /publish?x=1 HTTP/1.1", "POST /publish HTTP/1.0",
                                 "POST /publish  HTTP/1.1", "GET /publish HTTP/1.1", "POST /publish?\xe9 HTTP/1.1"])


def random_case(draw, name):
    """`name` with each letter upper- or lower-cased, from one draw (a draw per letter was most
    of these tests' time)."""
    mask = draw(st.integers(0, 2 ** len(name) - 1))
    return "".join(c.upper() if mask >> i & 1 else c.lower() for i, c in enumerate(name))


SAFE_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=20).map(str.strip)
TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789!#$%&'*+-.^_`|~", min_size=1, max_size=10)
SPACE = st.sampled_from(["", " ", "\t", "  ", " \t "])


@st.composite
def publish_heads(draw):
    """Heads of the publish shape, varied everywhere the shape allows."""
    lines = [("Host", draw(st.sampled_from(["h", "localhost:4000", "[::1]:4000", "10.0.0.1", "a-b.example"]))),
             ("Content-Length", draw(st.sampled_from(["0", "1", "00", "4096", "123456789012345"])))]
    for _ in range(draw(st.integers(0, 3))):
        lines.append(("Authorization", draw(SAFE_VALUE)))
    if draw(st.booleans()):
        lines.append(("Content-Type", draw(SAFE_VALUE)))
    if draw(st.booleans()):
        lines.append(("Connection", draw(st.sampled_from(["close", "CLOSE", "keep-alive", "close, x", "upgrade"]))))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(TOKEN)
        if name.lower() not in ("host", "content-length", "authorization", "content-type", "connection",
                                "transfer-encoding", "expect"):
            lines.append((name, draw(SAFE_VALUE)))
    lines = draw(st.permutations(lines))
    target = "/publish" + draw(st.sampled_from(["", "?", "?x=1&y=%2F", "?/a?b"]))
    text = "POST %s HTTP/1.1\r\n" % target
    for name, value in lines:
        text += random_case(draw, name) + ":" + draw(SPACE) + value + draw(SPACE) + "\r\n"
    return (text + "\r\n").encode("ascii")


@settings(max_examples=1500, deadline=None)
@given(publish_heads(), st.binary(max_size=20))
def test_every_head_of_the_shape_is_recognized_as_tornado_reads_it(raw, after):
    head = read_head(raw + after)
    assert isinstance(head, PublishHead) and head.length == len(raw)
    assert fields(head) == tornado_reads(raw)


@st.composite
def heads(draw):
    """Heads near the publish shape: a valid one with hostile lines, ends or request lines mixed in."""
    lines = draw(publish_heads()).decode("ascii")[:-4].split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(lines)))
        kind = draw(st.sampled_from(["line", "line", "request", "end"]))
        if kind == "request":
            lines[0] = draw(REQUEST_LINES)
        elif kind == "end" and where < len(lines):
            lines[where] += draw(ENDS)
        else:
            name = draw(st.one_of(st.sampled_from(NAMES), st.text(alphabet="abcXYZ-_!~ ", max_size=6)))
            line = draw(st.sampled_from(["", " ", "\t"])) + name + draw(SEPARATORS) + draw(VALUES)
            lines.insert(max(1, where), line)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")


@settings(max_examples=3000, deadline=None)
@given(heads())
def test_whatever_is_recognized_tornado_reads_the_same(raw):
    head = read_head(raw)
    if isinstance(head, PublishHead):
        assert fields(head) == tornado_reads(raw[:head.length])
    else:
        assert head is MORE or head is OTHER


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_get_a_verdict(raw):
    head = read_head(BASIC[:40] + raw)
    assert head is MORE or head is OTHER or isinstance(head, PublishHead)


# -- a keep-alive publisher's next head (PublishHead.again) ------------------------------------

def verdict(head):
    if isinstance(head, PublishHead):
        return fields(head) + (head.length,)
    return head


@st.composite
def next_heads(draw):
    """A head of the publish shape, and the connection's next one: the same with another
    Content-Length value (digits, or anything), one line changed, or anything near the shape."""
    first = draw(publish_heads())
    lines = first.decode("ascii")[:-4].split("\r\n")
    at = next(i for i, line in enumerate(lines) if line.lower().startswith("content-length"))
    name = lines[at].partition(":")[0]
    kind = draw(st.sampled_from(["length", "length", "name", "line", "near"]))
    if kind == "length":
        value = draw(st.one_of(st.from_regex(r"[ \t]*[0-9]{1,17}[ \t]*", fullmatch=True), VALUES))
        lines[at] = name + ":" + value
    elif kind == "name":
        lines[at] = random_case(draw, "content-length") + draw(SEPARATORS) + "12"
    elif kind == "line":
        where = draw(st.integers(0, len(lines) - 1))
        lines[where] = draw(REQUEST_LINES) if where == 0 else (
            draw(st.one_of(st.sampled_from(NAMES), TOKEN)) + draw(SEPARATORS) + draw(VALUES))
    else:
        return first, draw(heads())
    return first, ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")


@settings(max_examples=3000, deadline=None)
@given(next_heads(), st.binary(max_size=8))
def test_a_head_read_after_the_last_one_gets_the_verdict_it_gets_alone(pair, after):
    first, raw = pair
    last = read_head(first)
    assert isinstance(last, PublishHead)
    assert verdict(read_head(raw + after, last)) == verdict(read_head(raw + after))


def test_a_repeated_head_with_a_new_length_is_read_from_the_last_one():
    last = read_head(BASIC)
    raw = BASIC.replace(b"Content-Length: 12", b"Content-Length: \t 4096")
    head = read_head(raw, last)
    assert head.lines is last.lines  # taken from `last`, not read again
    assert verdict(head) == verdict(read_head(raw)) == ("POST", "/publish", ["Bearer s3cret"], "application/json",
                                                        4096, False, len(raw))
    for other in (BASIC.replace(b"12", b"1x"), BASIC.replace(b"s3cret", b"s3creT"),
                  BASIC.replace(b"Content-Length", b"content-length")):
        assert read_head(other, last) is OTHER or read_head(other, last).lines is not last.lines

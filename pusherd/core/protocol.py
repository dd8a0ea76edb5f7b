"""The Phoenix Channels vocabulary and its two JSON serializers, chosen by the `vsn` query parameter.

V1 (vsn 1.0.x, or no vsn at all: the 2015 clients) sends JSON objects
``{"topic", "event", "payload", "ref"[, "join_ref"]}``; V2 (vsn 2.0.x) sends JSON arrays
``[join_ref, ref, topic, event, payload]``. Refs are echoed exactly as the client sent them.

Pure: no sockets, no event loop. ``decode`` never returns a half-valid message: it either
returns a `Message` or raises `ProtocolError`, carrying whatever refs it could read so the
session can still answer with an error reply.
"""

import json
import re
from typing import Any, Optional

from .errors import MALFORMED_MESSAGE, UNSUPPORTED_BINARY, ProtocolError

Ref = Optional[str]

PHX_JOIN = "phx_join"
PHX_LEAVE = "phx_leave"
PHX_REPLY = "phx_reply"
PHX_CLOSE = "phx_close"
PHX_ERROR = "phx_error"
HEARTBEAT = "heartbeat"
PHOENIX_TOPIC = "phoenix"

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = 64   # nesting of arrays/objects in a client frame or a publish body
MAX_EVENT_LENGTH = 255


def _dumps(obj) -> str:
    """Compact JSON that is always valid UTF-8 on the wire.

    A lone surrogate can only come from an escaped ``"\\ud800"`` inside a JSON string the client
    sent; it is written back in the same escaped form instead of as an unencodable character.
    """
    text = _encode(obj)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _LONE_SURROGATE.sub(lambda m: "\\u%04x" % ord(m.group()), text)
    return text


def _reject_constant(name):
    raise ValueError("%s is not JSON" % name)


def _finite_float(text: str) -> float:
    """``1e999`` parses to infinity, which no encoder (and no browser) can write back."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def whole_text(decoder: json.JSONDecoder):
    """``decoder.decode`` for a str, without its two Python layers and whitespace matches when
    the text is one JSON value from its first character to its last (what frames and tokens
    are): the decoder's own scanner, as ``decode`` calls it. Any other text (whitespace around
    the value, extra data, no value) goes to ``decode`` itself, which answers or raises as ever
    (~0.3 us per frame by timeit; bench/run.py --only storm)."""
    scan, decode = decoder.scan_once, decoder.decode

    def parse(text: str):
        try:
            value, end = scan(text, 0)
        except StopIteration:
            return decode(text)
        return value if end == len(text) else decode(text)
    return parse


_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_decode = whole_text(_decoder)


def loads(text):
    """json.loads without NaN/Infinity or overflowing floats (not JSON, and not encodable back),
    UTF-8 only, and with a depth limit. Raises ValueError (UnicodeDecodeError included) or
    RecursionError."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    value = _decode(text)
    # The walk is only needed when the text holds that many brackets (most frames do not).
    if text.count("[") + text.count("{") > MAX_DEPTH and too_deep(value, MAX_DEPTH):
        raise ValueError("nested deeper than %d levels" % MAX_DEPTH)
    return value


def too_deep(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


#: Event names phoenix.js gives a meaning of its own: ``phx_*`` (join, leave, reply, close,
#: error), ``chan_reply_<ref>`` (how 1.2 to 1.8 route the reply to a pending push with that
#: ref) and Presence's two events. Only the server sends them.
RESERVED_PREFIXES = ("phx_", "chan_reply_")
RESERVED_EVENTS = frozenset(("presence_state", "presence_diff"))


def is_reserved_event(event: str) -> bool:
    """True for a name phoenix.js would take as the server's own (a client or publisher sending
    it could forge another member's push reply or presence list)."""
    return event.startswith(RESERVED_PREFIXES) or event in RESERVED_EVENTS


def is_valid_event(event: Any) -> bool:
    """A non-empty printable string of at most MAX_EVENT_LENGTH characters."""
    return isinstance(event, str) and 0 < len(event) <= MAX_EVENT_LENGTH and event.isprintable()


class Message:
    """One Phoenix message, in either direction."""

    __slots__ = ("join_ref", "ref", "topic", "event", "payload")

    def __init__(self, join_ref: Any, ref: Any, topic: str, event: str, payload: Any):
        self.join_ref = join_ref
        self.ref = ref
        self.topic = topic
        self.event = event
        self.payload = payload

    def __eq__(self, other):
        return isinstance(other, Message) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        return "Message(%r, %r, %r, %r, %r)" % (self.join_ref, self.ref, self.topic, self.event, self.payload)


class MalformedFrame(ProtocolError):
    """A frame was JSON but not a Phoenix message; `ref`/`topic` are set when they could be read."""

    def __init__(self, detail: str, join_ref: Any = None, ref: Any = None, topic: Any = None,
                 reason: str = MALFORMED_MESSAGE):
        super().__init__(reason, detail)
        self.join_ref = join_ref if _is_ref(join_ref) else None
        self.ref = ref if _is_ref(ref) else None
        self.topic = topic if isinstance(topic, str) else None

    @property
    def answerable(self) -> bool:
        """True when an error reply can be addressed (the client gave a ref and a topic)."""
        return self.ref is not None and self.topic is not None


class UndecodableFrame(ProtocolError):
    """The frame is not JSON (or not UTF-8): the connection is closed, nothing can be answered."""


def _is_ref(value: Any) -> bool:
    # phoenix.js sends refs as strings; accept integers too and echo them untouched.
    return value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _parse_json(text) -> Any:
    try:
        return loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise UndecodableFrame("invalid JSON", str(exc)[:80]) from None


def _check(join_ref, ref, topic, event, payload) -> Message:
    if not isinstance(topic, str) or not topic:
        raise MalformedFrame("topic must be a non-empty string", join_ref, ref, None)
    if not _is_ref(ref) or not _is_ref(join_ref):
        raise MalformedFrame("refs must be strings or null", join_ref, ref, topic)
    if not isinstance(event, str) or not event:
        raise MalformedFrame("event must be a non-empty string", join_ref, ref, topic)
    if not isinstance(payload, dict):
        raise MalformedFrame("payload must be a JSON object", join_ref, ref, topic)
    return Message(join_ref, ref, topic, event, payload)


#: Plain ok replies kept by their refs and topic, per serializer: a storm's pages send the same
#: join (phoenix.js numbers a socket's pushes from "1": a page's first join is refs "1", "1"),
#: so its reply is encoded once instead of once per page (bench/run.py --only storm). At most
#: this many, emptied when full, each of a topic and refs of at most `_KEPT_REPLY_CHARS`.
_KEPT_REPLIES = 256
_KEPT_REPLY_CHARS = 512


class Serializer:
    """Encodes and decodes text frames for one protocol version."""

    vsn = ""

    def __init__(self):
        self._ok_replies = {}  # (join_ref, ref, topic) -> the text of an ok reply with {} as response

    def decode(self, text) -> Message:
        raise NotImplementedError

    def encode(self, msg: Message) -> str:
        raise NotImplementedError

    def encode_reply(self, join_ref: Any, ref: Any, topic: str, status: str, response: dict) -> str:
        # Kept only where the key says all of the text: refs that are strings or null (1, 1.0
        # and true are equal dict keys but different JSON), an empty dict as the response.
        if (status == "ok" and type(response) is dict and not response and type(topic) is str
                and (join_ref is None or type(join_ref) is str) and (ref is None or type(ref) is str)):
            key = (join_ref, ref, topic)
            text = self._ok_replies.get(key)
            if text is None:
                text = self._encode_reply(join_ref, ref, topic, status, response)
                if len(topic) + len(join_ref or "") + len(ref or "") <= _KEPT_REPLY_CHARS:
                    if len(self._ok_replies) >= _KEPT_REPLIES:
                        self._ok_replies.clear()
                    self._ok_replies[key] = text
            return text
        return self._encode_reply(join_ref, ref, topic, status, response)

    def _encode_reply(self, join_ref: Any, ref: Any, topic: str, status: str, response: dict) -> str:
        return self.encode(Message(join_ref, ref, topic, PHX_REPLY, {"status": status, "response": response}))

    def encode_broadcast(self, topic: str, event: str, payload: dict, ref: Any = None) -> str:
        return self.encode(Message(None, ref, topic, event, payload))

    def encode_push_text(self, join_ref: Any, topic: str, event: str, payload_text: str) -> str:
        """A server push to one channel (ref null) around a payload already encoded as JSON
        text: what ``encode(Message(join_ref, None, topic, event, payload))`` returns, without
        encoding the payload again (a large ``presence_state`` is encoded once for every joiner)."""
        raise NotImplementedError


class V1Serializer(Serializer):
    """vsn 1.0.x: JSON objects. The encoder never emits join_ref (phoenix.js 1.2 ignores it)."""

    vsn = "1.0.0"

    def decode(self, text) -> Message:
        data = _parse_json(text)
        if not isinstance(data, dict):
            raise MalformedFrame("expected a JSON object")
        return _check(data.get("join_ref"), data.get("ref"), data.get("topic"), data.get("event"),
                      data.get("payload", {}) if "payload" in data else None)

    def encode(self, msg: Message) -> str:
        return _dumps({"topic": msg.topic, "event": msg.event, "payload": msg.payload, "ref": msg.ref})

    def encode_push_text(self, join_ref, topic, event, payload_text):
        return '{"topic":%s,"event":%s,"payload":%s,"ref":null}' % (_dumps(topic), _dumps(event), payload_text)


class LegacyV1Serializer(V1Serializer):
    """The 2015 clients (`socket.chan`, no vsn, endpoint URL opened verbatim).

    Phoenix 0.13 read a reply's ref from inside the payload; 0.14 from the top level.
    Writing both satisfies both: each ignores the copy it does not read.
    """

    vsn = "legacy"

    def _encode_reply(self, join_ref, ref, topic, status, response):
        return _dumps({"topic": topic, "event": PHX_REPLY,
                       "payload": {"status": status, "response": response, "ref": ref}, "ref": ref})


class V2Serializer(Serializer):
    """vsn 2.0.x: JSON arrays ``[join_ref, ref, topic, event, payload]``; extra elements ignored."""

    vsn = "2.0.0"

    def decode(self, text) -> Message:
        data = _parse_json(text)
        if not isinstance(data, list) or len(data) < 5:
            ref = data[1] if isinstance(data, list) and len(data) > 1 else None
            topic = data[2] if isinstance(data, list) and len(data) > 2 else None
            join_ref = data[0] if isinstance(data, list) and data else None
            raise MalformedFrame("expected [join_ref, ref, topic, event, payload]", join_ref, ref, topic)
        return _check(data[0], data[1], data[2], data[3], data[4])

    def encode(self, msg: Message) -> str:
        return _dumps([msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload])

    def encode_push_text(self, join_ref, topic, event, payload_text):
        return "[%s,null,%s,%s,%s]" % (_dumps(join_ref), _dumps(topic), _dumps(event), payload_text)

    def decode_binary(self, data: bytes) -> MalformedFrame:
        """Read the header of a binary push (phoenix.js >= 1.5.7, ArrayBuffer payloads).

        pusherd does not relay binary payloads; this only recovers the refs so the client
        gets an error reply instead of a dropped connection.
        """
        try:
            if data[0] != 0:
                raise IndexError
            sizes = data[1:5]
            pos = 5
            fields = []
            for size in sizes:
                fields.append(data[pos:pos + size].decode("utf-8"))
                pos += size
            if len(fields) != 4 or pos > len(data):
                raise IndexError
        except (IndexError, UnicodeDecodeError):
            return MalformedFrame("undecodable binary frame")
        join_ref, ref, topic, _event = fields
        return MalformedFrame("binary payloads are not supported", join_ref or None, ref or None, topic or None,
                              reason=UNSUPPORTED_BINARY)


V1 = V1Serializer()
V2 = V2Serializer()
LEGACY = LegacyV1Serializer()

# [0-9], not \d: a vsn of "٢.0.0" (Arabic-Indic digits) is no version Phoenix reads.
_SEMVER = re.compile(r"^([0-9]+)\.([0-9]+)\.([0-9]+)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


_VSNS_SENT = {"2.0.0": V2, "1.0.0": V1}


def serializer_for_vsn(vsn: Optional[str], legacy_path: bool = False) -> Optional[Serializer]:
    """Pick the serializer as Phoenix does (``~> 1.0.0`` / ``~> 2.0.0``); None means refuse (403).

    A missing vsn is V1 (clients before 0.17 sent none); on the bare endpoint path it is the
    2015 client, whose replies also carry the ref inside the payload.
    """
    if vsn is None:
        return LEGACY if legacy_path else V1
    known = _VSNS_SENT.get(vsn)  # (phoenix.js sends one of two: the regular expression, ~1 µs, for the rest)
    if known is not None:
        return known
    m = _SEMVER.fullmatch(vsn)
    if not m:
        return None
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) == (1, 0):
        return V1
    if (major, minor) == (2, 0):
        return V2
    return None

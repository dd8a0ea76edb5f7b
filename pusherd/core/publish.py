"""The HTTP publish API, without HTTP: authorize a request and parse its body into broadcasts.

Accepted bodies (all validated as a whole before anything is delivered):
- JSON ``{"topic", "event", "payload"}``; ``payload`` defaults to ``{}`` and must be an object;
- JSON ``{"topics": [...], "event", "payload"}`` (one event to several topics);
- a JSON list of such objects (a batch);
- form-encoded ``topic=..&event=..&payload=<JSON text>`` (what the old Rails helper sent).
"""

import hmac
from typing import List, Optional, Sequence, Tuple
from urllib.parse import parse_qs

from .broadcast import Broadcast
from .errors import TOKEN_EXPIRED, AuthError, PublishError
from .protocol import is_reserved_event, is_valid_event, loads
from .tokens import looks_like_jwt, verify_publish_token
from .topics import TopicPattern, any_match, is_valid_topic

MAX_BATCH = 1000
MAX_AUTHORIZATION_LENGTH = 16384


def _credential(authorization: Optional[str]) -> str:
    """The value of ``Authorization: <value>`` or ``Authorization: Bearer <value>``, stripped."""
    value = (authorization or "").strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    return value


def secret_matches(authorization: Optional[str], secrets: Sequence[str]) -> bool:
    """``Authorization: <secret>`` or ``Authorization: Bearer <secret>``, compared in constant time."""
    if not authorization:
        return False
    given = _credential(authorization).encode("utf-8", "replace")
    ok = False
    for secret in secrets:
        if secret and hmac.compare_digest(given, secret.encode("utf-8")):
            ok = True
    return ok


def bearer_value(authorization: Optional[str]) -> Optional[str]:
    """The value after ``Bearer `` (None when the header is absent or has no Bearer scheme)."""
    if not authorization:
        return None
    value = authorization.strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


class Grant:
    """What an authorized publish request may do: every topic (the shared secret) or some patterns."""

    __slots__ = ("patterns",)

    def __init__(self, patterns: Optional[Tuple[TopicPattern, ...]] = None):
        self.patterns = patterns  # None: any topic

    def allows(self, topic: str) -> bool:
        return self.patterns is None or any_match(self.patterns, topic)

    def check(self, broadcasts: Sequence[Broadcast]) -> None:
        """Raise PublishError(403) naming the first topic the grant does not cover (all or nothing)."""
        if self.patterns is None:
            return
        for b in broadcasts:
            if not any_match(self.patterns, b.topic):
                raise PublishError(403, "token does not allow publishing to %r" % b.topic)


def authorize(authorization: Sequence[str], secrets: Sequence[str], now: Optional[float] = None) -> Grant:
    """Decide who is publishing, from every ``Authorization`` header sent; raise PublishError(401).

    Exactly one header is accepted (two could disagree; proxies join them with commas).

    The shared ``publish_secret`` grants every topic. A value shaped like a JWT (three base64url
    parts) is verified as a publisher token signed with ``publish_secret`` (HS256 pinned, ``exp``
    required) and grants the topics of its ``publish`` claim. Anything else is refused.
    """
    if isinstance(authorization, str):
        authorization = [authorization]
    if len(authorization) > 1:
        raise PublishError(401, "more than one Authorization header")
    authorization = authorization[0] if authorization else None
    if not authorization or len(authorization) > MAX_AUTHORIZATION_LENGTH:
        raise PublishError(401, "missing or wrong publish secret")
    if secret_matches(authorization, secrets):
        return Grant()
    value = _credential(authorization)
    if not looks_like_jwt(value):
        raise PublishError(401, "missing or wrong publish secret")
    try:
        return Grant(verify_publish_token(value, secrets, now))
    except AuthError as exc:
        raise PublishError(401, "publish token expired" if exc.reason == TOKEN_EXPIRED
                           else "invalid publish token") from None


def parse_body(body: bytes, content_type: str, max_topic_length: int = 255) -> List[Broadcast]:
    """Return the broadcasts a publish body asks for, or raise PublishError(400, reason)."""
    ctype = (content_type or "").split(";", 1)[0].strip().lower()
    # curl -d and some HTTP clients label a JSON body as a form: the first byte tells.
    if ctype == "application/x-www-form-urlencoded" and not body.lstrip()[:1] in (b"{", b"["):
        items = [_from_form(body)]
    else:
        try:
            doc = loads(body)
        except (ValueError, RecursionError):
            raise PublishError(400, "body is not valid JSON") from None
        if isinstance(doc, list):
            if not doc:
                raise PublishError(400, "empty batch")
            if len(doc) > MAX_BATCH:
                raise PublishError(400, "batch larger than %d events" % MAX_BATCH)
            items = doc
        elif isinstance(doc, dict):
            items = [doc]
        else:
            raise PublishError(400, "body must be a JSON object or a list of objects")
    out: List[Broadcast] = []
    for index, item in enumerate(items):
        where = "" if len(items) == 1 else "item %d: " % index
        out.extend(_validate(item, where, max_topic_length))
    return out


def _from_form(body: bytes) -> dict:
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=100,
                          errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise PublishError(400, "form body could not be decoded") from None
    item = {k: v[-1] for k, v in fields.items()}
    if "payload" in item:
        try:
            item["payload"] = loads(item["payload"]) if item["payload"] != "" else {}
        except (ValueError, RecursionError):
            raise PublishError(400, "payload is not valid JSON") from None
    return item


def _validate(item, where: str, max_topic_length: int) -> List[Broadcast]:
    if not isinstance(item, dict):
        raise PublishError(400, where + "each event must be a JSON object")
    unknown = set(item) - {"topic", "topics", "event", "payload"}
    if unknown:
        raise PublishError(400, where + "unknown field %r" % sorted(unknown)[0])
    if "topic" in item and "topics" in item:
        raise PublishError(400, where + "give topic or topics, not both")
    if "topics" in item:
        topics = item["topics"]
        if not isinstance(topics, list) or not topics:
            raise PublishError(400, where + "topics must be a non-empty list")
    elif "topic" in item:
        topics = [item["topic"]]
    else:
        raise PublishError(400, where + "missing topic")
    for topic in topics:
        if not is_valid_topic(topic, max_topic_length):
            raise PublishError(400, where + "invalid topic")
    event = item.get("event")
    if not isinstance(event, str) or not event:
        raise PublishError(400, where + "missing or invalid event")
    if not is_valid_event(event):
        raise PublishError(400, where + "invalid event")  # printable, 1-255 characters
    if is_reserved_event(event):
        raise PublishError(400, where + "invalid event: a name phoenix.js reserves (phx_*, chan_reply_*, presence_*)")
    payload = item.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise PublishError(400, where + "payload must be a JSON object")
    return [Broadcast(topic, event, payload) for topic in topics]

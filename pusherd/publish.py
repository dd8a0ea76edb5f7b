"""The HTTP publish API, without HTTP: authorize a request and parse its body into broadcasts.

Accepted bodies (all validated as a whole before anything is delivered):
- JSON ``{"topic", "event", "payload"}``; ``payload`` defaults to ``{}`` and must be an object;
- JSON ``{"topics": [...], "event", "payload"}`` (one event to several topics);
- a JSON list of such objects (a batch);
- form-encoded ``topic=..&event=..&payload=<JSON text>`` (what the old Rails helper sent).
"""

import hmac
from typing import List, Optional, Sequence
from urllib.parse import parse_qs

from .broker import Broadcast
from .errors import PublishError
from .protocol import loads
from .topics import is_valid_topic

MAX_BATCH = 1000
MAX_EVENT_LENGTH = 255


def secret_matches(authorization: Optional[str], secrets: Sequence[str]) -> bool:
    """``Authorization: <secret>`` or ``Authorization: Bearer <secret>``, compared in constant time."""
    if not authorization:
        return False
    value = authorization.strip()
    if value[:7].lower() == "bearer ":
        value = value[7:].strip()
    given = value.encode("utf-8", "replace")
    ok = False
    for secret in secrets:
        if secret and hmac.compare_digest(given, secret.encode("utf-8")):
            ok = True
    return ok


def bearer_value(authorization: Optional[str]) -> Optional[str]:
    if not authorization:
        return None
    value = authorization.strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


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
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=100)
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
    if len(event) > MAX_EVENT_LENGTH or not event.isprintable() or event.startswith("phx_"):
        raise PublishError(400, where + "invalid event")
    payload = item.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise PublishError(400, where + "payload must be a JSON object")
    return [Broadcast(topic, event, payload) for topic in topics]

"""Publish to pusherd and mint join tokens from Python (Django, workers, scripts): standard library only.

    from pusherd.client import publish, mint_token, PublishFailed

    publish("deploys:web", "new_version", {"version": "abc123"},
            url="https://push.example.com", secret=os.environ["PUSHERD_PUBLISH_SECRET"])

    token = mint_token(GUARDIAN_SECRET, sub={"id": user.id}, listen=["deploys:web"],
                       csrf_token=csrf, ttl="30d")

``publish`` is synchronous (``http.client``; proxies from the environment are not used), with a timeout per attempt, and retries with exponential
backoff when pusherd answers 503 (broker unavailable, draining) or cannot be reached. A timeout
is not retried: the event may have been delivered. Any other failure raises
``PublishFailed(status, reason)`` at once (``status`` is None when pusherd was not reached).
``url`` and ``secret`` default to ``$PUSHERD_URL`` and ``$PUSHERD_PUBLISH_SECRET``.
"""

import http.client
import json
import os
import re
import socket
import time
from typing import Any, Callable, Dict, Iterable, Optional, Union
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:4000"
RETRY_STATUSES = (503,)
MAX_RETRY_AFTER = 10.0


class PublishFailed(Exception):
    """pusherd did not take the event. ``status``: HTTP status, or None when it was not reached."""

    def __init__(self, status: Optional[int], reason: str):
        super().__init__("%s %s" % (status, reason) if status is not None else reason)
        self.status = status
        self.reason = reason


def publish_url(url: str) -> str:
    """The publish endpoint of a pusherd base URL (``http://host:4000`` -> ``.../publish``)."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    base = url.rstrip("/")
    return base if base.endswith("/publish") else base + "/publish"


def publish(topic: Union[str, Iterable[str]], event: str, payload: Optional[Dict[str, Any]] = None, *,
            url: Optional[str] = None, secret: Optional[str] = None, timeout: float = 5.0,
            retries: int = 3, backoff: float = 0.25, sleep: Callable[[float], None] = time.sleep) -> dict:
    """POST one event (to one topic, or to several when ``topic`` is a list); return pusherd's answer.

    Raises ``PublishFailed`` with pusherd's reason (400 bad event, 401 wrong secret, 413 too
    large, 503 after the retries) or with the connection error, and ``ValueError`` when no
    secret is given or the payload cannot be encoded as JSON.
    """
    url = url or os.environ.get("PUSHERD_URL") or DEFAULT_URL
    secret = secret if secret is not None else os.environ.get("PUSHERD_PUBLISH_SECRET")
    if not secret:
        raise ValueError("no publish secret: pass secret= or set PUSHERD_PUBLISH_SECRET")
    body: Dict[str, Any] = {"event": event, "payload": {} if payload is None else payload}
    if isinstance(topic, str):
        body["topic"] = topic
    else:
        body["topics"] = list(topic)
    data = json.dumps(body, allow_nan=False).encode("utf-8")
    return post(publish_url(url), data, secret, timeout=timeout, retries=retries, backoff=backoff, sleep=sleep)


def post(endpoint: str, data: bytes, secret: str, *, timeout: float = 5.0, retries: int = 3,
         backoff: float = 0.25, sleep: Callable[[float], None] = time.sleep,
         on_retry: Optional[Callable[[PublishFailed, float], None]] = None) -> dict:
    """POST a ready JSON body to ``endpoint`` with the retry policy of :func:`publish`.

    ``on_retry(failure, delay)`` is called before each retry (e.g. to log it).
    """
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + secret,
               "User-Agent": "pusherd-client"}
    attempt = 0
    while True:
        retry_after = None
        try:
            status, raw, answer_headers = _attempt(endpoint, data, headers, timeout)
        except (socket.timeout, TimeoutError):
            raise PublishFailed(None, "no answer from %s within %gs" % (endpoint, timeout)) from None
        except http.client.HTTPException as exc:
            raise PublishFailed(None, "bad answer from %s: %s" % (endpoint, type(exc).__name__)) from None
        except OSError as exc:  # refused, reset, unknown host: nothing was taken
            failure = PublishFailed(None, "cannot reach %s: %s" % (endpoint, _describe(exc)))
        else:
            if 200 <= status < 300:
                return _json_body(raw)
            failure = PublishFailed(status, _reason(raw, http.client.responses.get(status, "error")))
            if status not in RETRY_STATUSES:
                raise failure
            retry_after = _retry_after(answer_headers.get("Retry-After"))
        if attempt >= retries:
            raise failure
        delay = backoff * (2 ** attempt)
        if retry_after is not None:
            delay = max(delay, retry_after)
        attempt += 1
        if on_retry is not None:
            on_retry(failure, delay)
        sleep(delay)


def _attempt(endpoint: str, data: bytes, headers: Dict[str, str], timeout: float):
    """One POST: ``(status, body, headers)``.

    A server that refuses a body before reading all of it (413) may reset the connection while
    the body is still being sent: its answer is read all the same, as curl does.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PublishFailed(None, "not an http(s) URL: %s" % endpoint)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(parts.hostname, parts.port, timeout=timeout)
    target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    try:
        send_error = None
        try:
            conn.request("POST", target, body=data, headers=headers)
        except (BrokenPipeError, ConnectionResetError) as exc:
            send_error = exc
        try:
            response = conn.getresponse()
            return response.status, response.read(), response.headers
        except (OSError, http.client.HTTPException):
            if send_error is not None:
                raise send_error from None
            raise
    finally:
        conn.close()


def _json_body(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        return {"status": "ok"}
    return doc if isinstance(doc, dict) else {"status": "ok"}


def _reason(raw: bytes, fallback: str) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return doc["error"]
    text = raw.decode("utf-8", "replace").strip()[:200]
    return text or str(fallback)


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (ASCII digits: ``str.isdigit`` also takes "²", which float() refuses);
    None for anything else, an HTTP date included."""
    if value and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return min(float(value.strip()), MAX_RETRY_AFTER)
    return None


def _describe(reason: Any) -> str:
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def mint_token(secret: str, sub: Any = None, listen: Iterable[str] = (), publish: Iterable[str] = (),
               ttl: Union[str, float] = "30d", csrf_token: Union[str, bytes, None] = None,
               issuer: Optional[str] = None, now: Optional[float] = None, algorithm: str = "HS256",
               private_key: Optional[str] = None) -> str:
    """A join token exactly as the Rails helper mints it (no iat; ``aud: "csrf"`` and ``s_csrf``
    when ``csrf_token`` is given; ``ttl`` in seconds or ``"30d"``, ``"12h"``, ``"15m"``; HS256,
    or RS256/ES256 with ``private_key`` as a Rails app holding the private key would)."""
    import jwt  # PyJWT (and cryptography) only when tokens are minted
    from .config.values import seconds
    from .core.tokens import ASYMMETRIC, s_csrf
    now = time.time() if now is None else now
    claims = {"sub": {} if sub is None else sub, "exp": int(now + seconds(ttl)),
              "listen": list(listen), "publish": list(publish)}
    if issuer:
        claims["iss"] = issuer
    if csrf_token is not None:
        claims["aud"] = "csrf"
        claims["s_csrf"] = s_csrf(secret, csrf_token)
    key = private_key if algorithm in ASYMMETRIC else secret
    return jwt.encode(claims, key, algorithm=algorithm)


def mint_publish_token(secret: str, publish: Iterable[str], ttl: Union[str, float] = 300,
                       now: Optional[float] = None, **extra) -> str:
    """A publisher token as the Rails app would mint it for /publish (short-lived, topic-limited)."""
    import jwt
    from .config.values import seconds
    now = time.time() if now is None else now
    return jwt.encode(dict(extra, exp=int(now + seconds(ttl)), publish=list(publish)), secret, algorithm="HS256")

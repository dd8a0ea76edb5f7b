"""Value parsers for configuration keys: each takes what YAML gave and returns the value or raises
`Invalid` with a message that names no secret. One parser per kind of value (duration, size,
count, address, URL, origin...), shared by every key of that kind and by the command line
(``pusherd token --ttl 30d``).
"""

import difflib
import ipaddress
import math
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import unquote, urlsplit

from ..core.origins import OriginPolicy
from ..core.protocol import is_reserved_event, is_valid_event


class Invalid(ValueError):
    """One problem with one value. Messages never contain a secret."""


def did_you_mean(key: str, choices) -> str:
    match = difflib.get_close_matches(key.lower(), choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def show(value: Any) -> str:
    """Short description of a (non-secret) value for a problem message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return kind(value)


def kind(value: Any) -> str:
    """Type-only description, safe for secrets."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return f"a {type(value).__name__}"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(number, minimum: float, strict: bool):
    if (strict and number <= minimum) or (not strict and number < minimum):
        word = "greater than" if strict else "at least"
        shown = int(minimum) if float(minimum).is_integer() else minimum
        raise Invalid(f"must be {word} {shown}, got {show(number)}")
    return number


# ASCII digits only ([0-9], not \d, which also takes other scripts' digits).
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d|w)?\s*", re.I)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def seconds(value: Any) -> float:
    """A duration in seconds: a number, or text like ``250ms``, ``30s``, ``5m``, ``12h``, ``30d``, ``2w``."""
    result = None
    if is_number(value):
        result = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            result = float(m.group(1)) * _DURATION_UNITS[unit]
    if result is None or not math.isfinite(result):
        raise Invalid(f"expected a number of seconds, got {show(value)} "
                      "(a duration may also be written '30s', '5m', '1h' or '1d')")
    return result


def duration(allow_zero: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        return at_least(seconds(value), 0, strict=not allow_zero)
    return parse


_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([kmg]i?b|b)?\s*", re.I)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def size(value: Any) -> int:
    """Bytes: a whole number, or text like ``64KiB``, ``1MiB``, ``10MB``."""
    result = None
    if is_number(value) and float(value).is_integer():
        result = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            result = int(m.group(1)) * _SIZE_UNITS[unit]
    if result is None:
        raise Invalid(f"expected a size in bytes, got {show(value)} (e.g. 65536, '64KiB' or '1MiB')")
    return at_least(result, 0, strict=True)


def count(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        number = None
        if is_number(value) and float(value).is_integer():
            number = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            number = int(value)
        if number is None:
            raise Invalid(f"expected a whole number, got {show(value)}")
        return at_least(number, minimum, strict=False)
    return parse


def positive_number(value: Any) -> float:
    number = None
    if is_number(value):
        number = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?\s*", value):
        number = float(value)
    if number is None or not math.isfinite(number):
        raise Invalid(f"expected a number, got {show(value)}")
    return at_least(number, 0, strict=True)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise Invalid(f"expected true or false, got {show(value)}")


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a non-empty string, got {show(value)}")
    return value


def choice(choices, aliases=None, fold=str.lower) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str):
            folded = fold(value.strip())
            folded = (aliases or {}).get(folded, folded)
            if folded in choices:
                return folded
        raise Invalid(f"expected one of {', '.join(choices)}, got {show(value)}")
    return parse


def event_pattern(value: Any) -> str:
    """An entry of client_events: an event name, ``prefix*`` or ``*``; never a reserved name."""
    if not isinstance(value, str) or not is_valid_event(value) or " " in value or "*" in value[:-1]:
        raise Invalid(f"expected an event name, 'prefix*' or '*', got {show(value)}")
    if value != "*" and is_reserved_event(value.rstrip("*")):
        raise Invalid(f"{value!r} is reserved (phx_*, chan_reply_*, presence_state, presence_diff are the "
                      "server's own events)")
    return value


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


def listen(value: Any) -> Tuple[str, int]:
    """``"host:port"``, ``"[::1]:port"`` or ``":port"`` (all interfaces, 0.0.0.0)."""
    shape = 'expected "host:port" with a port from 0 to 65535'
    if not isinstance(value, str):
        raise Invalid(f"{shape}, got {show(value)}")
    text = value.strip()
    m = re.fullmatch(r"\[([^\]]*)\]:([0-9]{1,5})", text) or re.fullmatch(r"([^:\[\]]*):([0-9]{1,5})", text)
    if not m or int(m.group(2)) > 65535:
        hint = " (write IPv6 addresses in brackets, e.g. '[::1]:4000')" if text.count(":") > 1 and "[" not in text else ""
        raise Invalid(f"{shape}, got {show(value)}{hint}")
    host, port = m.group(1), int(m.group(2))
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise Invalid(f"{shape}, got {show(value)} (not an IPv6 address in the brackets)") from None
    elif host == "":
        host = "0.0.0.0"
    elif not _HOSTNAME_RE.fullmatch(host):
        raise Invalid(f"{shape}, got {show(value)} (not a valid host name or address)")
    return host, port


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def url_path(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+", value):
        raise Invalid(
            f"expected a URL path starting with '/' and without a trailing '/', "
            f"like '/events' or '/socket', got {show(value)}"
        )
    return value


def ws_base_url(value: Any) -> str:
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
        ok = parts is not None and parts.scheme in ("ws", "wss", "http", "https") and bool(parts.hostname)
        if ok:
            parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok:
        shown = show(value) if not (isinstance(value, str) and "@" in value) else "a URL with credentials"
        raise Invalid(f"expected a ws://, wss://, http:// or https:// URL, got {shown}")
    return value


class MultiHostURL:
    """A parsed ``redis+sentinel://`` or ``redis+cluster://`` URL (see `multi_host_url`)."""

    def __init__(self, scheme, username, password, hosts, service, db, query):
        self.scheme, self.username, self.password = scheme, username, password
        self.hosts: List[Tuple[str, int]] = hosts
        self.service: Optional[str] = service      # Sentinel: the monitored master's name
        self.db: int = db
        self.query: Dict[str, str] = query


_MULTI_HOST_PARAMS = {"redis+sentinel": ("sentinel_username", "sentinel_password"), "redis+cluster": ()}


def multi_host_url(value: str) -> MultiHostURL:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db][?sentinel_password=...]``
    or ``redis+cluster://[user:password@]host:port[,host:port...][/]``: the password is the data
    nodes' (Sentinel: the master's and replicas'), the sentinels' own credentials are the query's.
    Raises `Invalid` with a message that never shows the password."""
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _MULTI_HOST_PARAMS:
        raise Invalid("not a redis+sentinel:// or redis+cluster:// URL")
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        username, colon, password = userinfo.partition(":")
        username = unquote(username) or None
        password = unquote(password) if colon else None
    hosts = []
    for item in netloc.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536 \
                or not _HOSTNAME_RE.fullmatch(host.strip("[]")) and not _is_ip(host.strip("[]")):
            raise Invalid(f"{scheme}:// needs host:port[,host:port...] (got an invalid address)")
        hosts.append((host.strip("[]"), int(port)))
    parts = [unquote(p) for p in path.split("/") if p]
    service, db = None, 0
    if scheme == "redis+sentinel":
        if not parts or len(parts) > 2 or (len(parts) == 2 and not (parts[1].isascii() and parts[1].isdigit())):
            raise Invalid("redis+sentinel:// needs the master's name and an optional db: "
                          "redis+sentinel://host:26379,host:26380/mymaster/0")
        service, db = parts[0], int(parts[1]) if len(parts) == 2 else 0
    elif parts:
        raise Invalid("redis+cluster:// takes no path (a cluster has only db 0)")
    query = {}
    for item in filter(None, query_text.split("&")):
        name, _, val = item.partition("=")
        if name not in _MULTI_HOST_PARAMS[scheme]:
            raise Invalid(f"{scheme}:// has no option {show(name[:40])} (known: "
                          f"{', '.join(_MULTI_HOST_PARAMS[scheme]) or 'none'})")
        query[name] = unquote(val)
    return MultiHostURL(scheme, username, password, hosts, service, db, query)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def broker_url(value: Any) -> str:
    expected = "expected 'memory' or a redis://, rediss:// or unix:// URL (or redis+sentinel://, redis+cluster://)"
    if value == "memory":
        return value
    if not isinstance(value, str):
        raise Invalid(f"{expected}, got {show(value)}")
    if value.lower().startswith(("redis+sentinel://", "redis+cluster://")):
        try:
            multi_host_url(value)
        except Invalid as exc:
            raise Invalid(f"{expected}: {exc}") from None
        return value
    try:
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if scheme in ("redis", "rediss"):
            ok = bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        else:
            ok = scheme == "unix" and bool(parts.path)
    except ValueError:
        ok, scheme = False, ""
    if not ok:
        # The URL may carry a password: only show it when it cannot.
        if scheme in ("redis", "rediss", "unix"):
            shown = f"an invalid {scheme}:// URL (missing {'socket path' if scheme == 'unix' else 'host'} or bad port)"
        elif "://" in value:
            shown = f"scheme '{parts.scheme}'" if scheme else "an invalid URL"
        elif "@" in value:
            shown = "an invalid value"
        else:
            shown = show(value)
        raise Invalid(f"{expected}, got {shown}")
    return value


_ORIGIN_RE = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*|\[[0-9a-f:.]+\])"
    r"(:(?P<port>[0-9]{1,5}|\*))?",
    re.I,
)


def origin(value: Any) -> str:
    expected = "expected an origin like 'https://app.example.com', 'https://*.example.com' or 'http://localhost:*'"
    if not isinstance(value, str):
        raise Invalid(f"{expected}, got {show(value)}")
    text = value.strip()
    if text == "*":
        return text
    m = _ORIGIN_RE.fullmatch(text)
    ok = bool(m)
    if m and m.group("host").startswith("["):
        try:
            ipaddress.IPv6Address(m.group("host")[1:-1])
        except ValueError:
            ok = False
    if m and m.group("port") not in (None, "*") and int(m.group("port")) > 65535:
        ok = False
    if not ok:
        hint = ""
        if "://" not in text:
            hint = " (an origin starts with a scheme such as 'https://')"
        elif _ORIGIN_RE.match(text) and text[_ORIGIN_RE.match(text).end():].startswith("/"):
            hint = " (an origin has no path: drop everything from the '/' after the host)"
        raise Invalid(f"{expected}, got {show(value)}{hint}")
    try:
        OriginPolicy([text.lower()])   # the runtime matcher must agree it is a pattern
    except ValueError:
        raise Invalid(f"{expected}, got {show(value)}") from None
    return text.lower()


# --- what may be shown of a secret-bearing value ------------------------------------------------
MASK = "***"

#: Query parameters that carry a credential (redis-py reads ``password`` from the query of
#: ``redis://`` and ``unix://`` URLs; ``sentinel_password``, tokens and secrets likewise).
_SECRET_PARAM = re.compile(r"(?i)(^|[&;])([^&;=]*(?:password|passwd|pwd|secret|token|auth)[^&;=]*=)[^&;]*")


def mask_url(url: Optional[str]) -> Optional[str]:
    """`url` with every password replaced by ``***``: the userinfo's (``redis://user:pw@host``,
    ``redis://:pw@host``, each host of a multi-host URL) and any credential query parameter
    (``unix:///run/redis.sock?db=0&password=pw``). Anything that does not parse as a URL is
    masked whole: it may be a secret pasted in the wrong place."""
    if not url or "://" not in url:
        return url if url in (None, "", "memory") else MASK
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if ":" in userinfo else None
        netloc = (MASK if user is None else user + ":" + MASK) + "@" + hostport
    query = _SECRET_PARAM.sub(lambda m: m.group(1) + m.group(2) + MASK, parts.query)
    return "%s://%s%s%s%s" % (parts.scheme, netloc, parts.path, "?" + query if query else "",
                              "#" + MASK if parts.fragment else "")

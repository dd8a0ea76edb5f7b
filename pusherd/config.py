"""Configuration: a Rails-style ``pusher.yml`` turned into an immutable, validated :class:`Settings`.

The file holds one mapping per environment (``development:``, ``production:``...), like the
Rails app's ``config/pusher.yml``; YAML anchors and merge keys (``<<: *default``) are allowed.

* :func:`from_mapping` is pure: it gets the parsed document, the environment variables and a
  ``read_file`` callable, and reports *every* problem at once in one :class:`ConfigError`.
* :func:`load` is the only function that touches the file system.

Secrets (guardian/publish secrets, the metrics token, a broker URL's password) never appear
in problems, ``repr()`` or :meth:`Settings.masked`.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import yaml

from .origins import OriginPolicy

__all__ = [
    "ConfigError",
    "HistoryRule",
    "MetricsSettings",
    "Settings",
    "DEFAULT_CONFIG_YAML",
    "EMBEDDED_SOURCE",
    "DEV_ENVIRONMENTS",
    "DEV_ALLOWED_ORIGINS",
    "RESTART_KEYS",
    "from_mapping",
    "load",
    "resolve_env",
    "resolve_path",
]

EMBEDDED_SOURCE = "<embedded default>"

#: Environments where missing secrets fall back to the environment's name, as the Rails app
#: does with ``ENV['GUARDIAN_SECRET'] || Rails.env``.
DEV_ENVIRONMENTS = ("development", "test")

#: ``allowed_origins`` when a development/test section does not set it.
DEV_ALLOWED_ORIGINS = (
    "http://localhost:*",
    "http://127.0.0.1:*",
    "https://localhost:*",
    "https://127.0.0.1:*",
    "http://[::1]:*",
)

ALGORITHMS = ("HS256", "RS256", "ES256")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: Config keys whose change only takes effect after a restart (everything else reloads).
RESTART_KEYS = ("listen", "path", "broker", "broker_prefix", "reuse_port", "metrics")

MASK = "***"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason, ``str()`` one per line."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: List[str] = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class HistoryRule:
    """Keep the last ``size`` messages of topics matching ``topics`` for ``ttl`` seconds."""

    topics: str
    size: int
    ttl: float


@dataclass(frozen=True)
class MetricsSettings:
    host: str
    port: int
    token: Optional[str] = field(default=None, repr=False)

    def masked(self) -> Dict[str, Any]:
        return {"host": self.host, "port": self.port, "token": _mask(self.token)}


@dataclass(frozen=True)
class Settings:
    """Effective settings of one environment. Build it with :func:`load` or :func:`from_mapping`."""

    env: str
    source: str
    host: str
    port: int
    guardian_secrets: Tuple[str, ...] = field(repr=False)
    publish_secret: str = field(repr=False)
    path: str = "/events"
    ws_base_url: Optional[str] = None
    guardian_public_key: Optional[str] = field(default=None, repr=False)
    guardian_algorithm: str = "HS256"
    issuer: Optional[Tuple[str, ...]] = None
    allowed_origins: Tuple[str, ...] = ()
    heartbeat_timeout: float = 60.0
    max_frame_bytes: int = 65536
    max_publish_bytes: int = 1048576
    max_connections: int = 10000
    max_http_connections: int = 1000
    max_channels_per_socket: int = 100
    max_topic_length: int = 255
    client_push_rate: float = 10.0
    client_push_burst: int = 20
    max_outbox_bytes: int = 1048576
    slow_consumer_seconds: float = 30.0
    drain_seconds: float = 5.0
    http_header_timeout: float = 60.0
    http_body_timeout: float = 30.0
    broker: str = "memory"
    broker_prefix: str = "pusherd"
    reuse_port: bool = False
    metrics: Optional[MetricsSettings] = None
    demo: bool = False
    demo_assets: Optional[str] = None
    history: Tuple[HistoryRule, ...] = ()
    max_recovery: int = 300
    log_level: str = "info"
    access_log: bool = True

    def __repr__(self) -> str:
        # Hand-written so that a password inside the broker URL is masked too.
        parts = []
        for f in dataclasses.fields(self):
            if f.repr:
                value = getattr(self, f.name)
                if f.name in _URL_FIELDS:
                    value = _mask_url(value)
                parts.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(parts)})"

    def masked(self) -> Dict[str, Any]:
        """JSON-able effective settings (field names) with every secret replaced by ``"***"``
        (``None`` when unset); for ``pusherd --check-config``."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "guardian_secrets":
                out[f.name] = [MASK for _ in value]
            elif f.name in _SECRET_FIELDS:
                out[f.name] = _mask(value)
            elif f.name in _URL_FIELDS:
                out[f.name] = _mask_url(value)
            elif f.name == "metrics":
                out[f.name] = value.masked() if value is not None else None
            elif f.name == "history":
                out[f.name] = [dataclasses.asdict(rule) for rule in value]
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    def warnings(self) -> List[str]:
        """Legal but doubtful settings, to log once at start-up (never contains a secret)."""
        notes = []
        if self.env not in DEV_ENVIRONMENTS:
            if self.guardian_algorithm == "HS256" and any(len(s.encode()) < 32 for s in self.guardian_secrets):
                notes.append("guardian_secret: shorter than 32 bytes; HS256 wants at least 32 random bytes")
            if len(self.publish_secret.encode()) < 32:
                notes.append("publish_secret: shorter than 32 bytes")
            if "*" in self.allowed_origins:
                notes.append("allowed_origins: '*' lets any web page open a socket with a visitor's cookies")
            if self.demo:
                notes.append("demo: the live demo page is served at /demo (meant for development)")
        if self.metrics is not None and not self.metrics.token and not _is_loopback(self.metrics.host):
            notes.append("metrics.token: unset while metrics listen on %s: anyone who reaches it may scrape"
                         % self.metrics.host)
        return notes

    def restart_required(self, other: "Settings") -> List[str]:
        """Config keys that differ between ``self`` and ``other`` and need a restart."""
        changed = []
        if (self.host, self.port) != (other.host, other.port):
            changed.append("listen")
        changed.extend(k for k in RESTART_KEYS[1:] if getattr(self, k) != getattr(other, k))
        return changed


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


_SECRET_FIELDS = ("publish_secret", "guardian_public_key")
_URL_FIELDS = ("broker", "ws_base_url")
_FIELD_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING
}


DEFAULT_CONFIG_YAML = """\
# Embedded default configuration of pusherd, used when neither --config nor
# PUSHERD_CONFIG names a file. It only knows development and test: any other
# environment needs a real pusher.yml (see etc/pusher.yml and docs/config.md).
# Secrets are not set here, so they fall back to the environment's name
# ("development" / "test"), like the Rails app does.
default: &default
  listen: "127.0.0.1:4000"
  path: /events
  allowed_origins:
    - "http://localhost:*"
    - "http://127.0.0.1:*"
    - "https://localhost:*"
    - "https://127.0.0.1:*"
    - "http://[::1]:*"

development:
  <<: *default
  demo: true

test:
  <<: *default
  listen: "127.0.0.1:0"   # ephemeral port
  demo: false
"""


# --------------------------------------------------------------------------- entry points


def resolve_env(cli_env: Optional[str], environ: Mapping[str, str]) -> str:
    """``--env``, else ``PUSHERD_ENV``, else ``RAILS_ENV``, else ``"development"``."""
    for candidate in (cli_env, environ.get("PUSHERD_ENV"), environ.get("RAILS_ENV")):
        if candidate:
            return candidate
    return "development"


def resolve_path(cli_path: Optional[str], environ: Mapping[str, str]) -> Optional[str]:
    """``--config``, else ``PUSHERD_CONFIG``, else ``None`` (the embedded default)."""
    return cli_path or environ.get("PUSHERD_CONFIG") or None


def load_selected(cli_path: Optional[str], cli_env: Optional[str], environ: Mapping[str, str] = os.environ,
                  listen: Optional[str] = None) -> Settings:
    """The settings every command uses: file and environment chosen by :func:`resolve_path` and
    :func:`resolve_env` from ``--config``/``--env`` and the environment variables."""
    return load(resolve_path(cli_path, environ), resolve_env(cli_env, environ), environ, listen=listen)


def load(
    path: Optional[str],
    env: str,
    environ: Mapping[str, str] = os.environ,
    listen: Optional[str] = None,
) -> Settings:
    """Read ``path`` (``None``: :data:`DEFAULT_CONFIG_YAML`) and build the settings of ``env``.

    ``listen`` ("host:port") overrides the file's ``listen`` (the CLI's ``--listen``).
    """
    if path is None:
        source, text = EMBEDDED_SOURCE, DEFAULT_CONFIG_YAML
    else:
        source = path
        try:
            text = _read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: cannot read the configuration file: {_reason(exc)}"]) from None
    doc = _parse_yaml(text, source)
    return from_mapping(doc, env, source, environ, _read_text, listen=listen)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return "not valid UTF-8"
    return type(exc).__name__


class _Loader(yaml.SafeLoader):
    """SafeLoader that also records duplicate keys (plain YAML silently keeps the last one)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: List[Tuple[str, int]] = []

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                if key_node.value in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, source: str) -> Any:
    loader = _Loader(text)
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        # Built from the parts, not str(exc): the snippet of the offending line could hold a secret.
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"{source}: invalid YAML{where}: {what}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(
            [f"{source}: line {line}: duplicate key '{key}' (YAML would keep only the last one)"
             for key, line in loader.duplicates]
        )
    return doc


# --------------------------------------------------------------------------- validation


class _Invalid(Exception):
    """One problem with one value. Messages never contain a secret."""


_UNSET = object()  # key absent (or null)
_FAILED = object()  # a problem was already reported for this key

_KNOWN_KEYS = (
    "listen", "path", "ws_base_url",
    "guardian_secret", "guardian_secret_file", "publish_secret", "publish_secret_file",
    "guardian_public_key", "guardian_public_key_file", "guardian_algorithm", "issuer",
    "allowed_origins", "heartbeat_timeout", "max_frame_bytes", "max_publish_bytes",
    "max_connections", "max_http_connections", "max_channels_per_socket", "max_topic_length",
    "client_push_rate", "client_push_burst", "max_outbox_bytes", "slow_consumer_seconds", "drain_seconds",
    "http_header_timeout", "http_body_timeout",
    "broker", "broker_prefix", "reuse_port", "metrics", "demo", "demo_assets", "history", "max_recovery",
    "log_level", "access_log",
)
_METRICS_KEYS = ("listen", "token")
_HISTORY_KEYS = ("topics", "size", "ttl")


def _did_you_mean(key: str, choices) -> str:
    match = difflib.get_close_matches(key.lower(), choices, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _show(value: Any) -> str:
    """Short description of a (non-secret) value for a problem message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return _kind(value)


def _kind(value: Any) -> str:
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _at_least(number, minimum: float, strict: bool):
    if (strict and number <= minimum) or (not strict and number < minimum):
        word = "greater than" if strict else "at least"
        shown = int(minimum) if float(minimum).is_integer() else minimum
        raise _Invalid(f"must be {word} {shown}, got {_show(number)}")
    return number


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", re.I)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(allow_zero: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        seconds = None
        if _is_number(value):
            seconds = float(value)
        elif isinstance(value, str):
            m = _DURATION_RE.fullmatch(value)
            if m:
                unit = m.group(2).lower() if m.group(2) else None
                seconds = float(m.group(1)) * _DURATION_UNITS[unit]
        if seconds is None or not math.isfinite(seconds):
            raise _Invalid(
                f"expected a number of seconds, got {_show(value)} "
                "(a duration may also be written '30s', '5m', '1h' or '1d')"
            )
        return _at_least(seconds, 0, strict=not allow_zero)

    return parse


_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmg]i?b|b)?\s*", re.I)
_SIZE_UNITS = {
    None: 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def _size(value: Any) -> int:
    size = None
    if _is_number(value) and float(value).is_integer():
        size = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            unit = m.group(2).lower() if m.group(2) else None
            size = int(m.group(1)) * _SIZE_UNITS[unit]
    if size is None:
        raise _Invalid(f"expected a size in bytes, got {_show(value)} (e.g. 65536, '64KiB' or '1MiB')")
    return _at_least(size, 0, strict=True)


def _count(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        number = None
        if _is_number(value) and float(value).is_integer():
            number = int(value)
        elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            number = int(value)
        if number is None:
            raise _Invalid(f"expected a whole number, got {_show(value)}")
        return _at_least(number, minimum, strict=False)

    return parse


def _positive_number(value: Any) -> float:
    number = None
    if _is_number(value):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise _Invalid(f"expected a number, got {_show(value)}")
    return _at_least(number, 0, strict=True)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise _Invalid(f"expected true or false, got {_show(value)}")


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a non-empty string, got {_show(value)}")
    return value


def _choice(choices, aliases=None, fold=str.lower) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if isinstance(value, str):
            folded = fold(value.strip())
            folded = (aliases or {}).get(folded, folded)
            if folded in choices:
                return folded
        raise _Invalid(f"expected one of {', '.join(choices)}, got {_show(value)}")

    return parse


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


def _listen(value: Any) -> Tuple[str, int]:
    """``"host:port"``, ``"[::1]:port"`` or ``":port"`` (all interfaces, 0.0.0.0)."""
    shape = 'expected "host:port" with a port from 0 to 65535'
    if not isinstance(value, str):
        raise _Invalid(f"{shape}, got {_show(value)}")
    text = value.strip()
    m = re.fullmatch(r"\[([^\]]*)\]:(\d{1,5})", text) or re.fullmatch(r"([^:\[\]]*):(\d{1,5})", text)
    if not m or int(m.group(2)) > 65535:
        hint = " (write IPv6 addresses in brackets, e.g. '[::1]:4000')" if text.count(":") > 1 and "[" not in text else ""
        raise _Invalid(f"{shape}, got {_show(value)}{hint}")
    host, port = m.group(1), int(m.group(2))
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"{shape}, got {_show(value)} (not an IPv6 address in the brackets)") from None
    elif host == "":
        host = "0.0.0.0"
    elif not _HOSTNAME_RE.fullmatch(host):
        raise _Invalid(f"{shape}, got {_show(value)} (not a valid host name or address)")
    return host, port


def _path(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+", value):
        raise _Invalid(
            f"expected a URL path starting with '/' and without a trailing '/', "
            f"like '/events' or '/socket', got {_show(value)}"
        )
    return value


def _ws_base_url(value: Any) -> str:
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
        ok = parts is not None and parts.scheme in ("ws", "wss", "http", "https") and bool(parts.hostname)
        if ok:
            parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok:
        shown = _show(value) if not (isinstance(value, str) and "@" in value) else "a URL with credentials"
        raise _Invalid(f"expected a ws://, wss://, http:// or https:// URL, got {shown}")
    return value


def _broker(value: Any) -> str:
    expected = "expected 'memory' or a redis://, rediss:// or unix:// URL"
    if value == "memory":
        return value
    if not isinstance(value, str):
        raise _Invalid(f"{expected}, got {_show(value)}")
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
            shown = _show(value)
        raise _Invalid(f"{expected}, got {shown}")
    return value


_ORIGIN_RE = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*|\[[0-9a-f:.]+\])"
    r"(:(?P<port>\d{1,5}|\*))?",
    re.I,
)


def _origin(value: Any) -> str:
    expected = "expected an origin like 'https://app.example.com', 'https://*.example.com' or 'http://localhost:*'"
    if not isinstance(value, str):
        raise _Invalid(f"{expected}, got {_show(value)}")
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
        raise _Invalid(f"{expected}, got {_show(value)}{hint}")
    try:
        OriginPolicy([text.lower()])   # the runtime matcher must agree it is a pattern
    except ValueError:
        raise _Invalid(f"{expected}, got {_show(value)}") from None
    return text.lower()


_REF_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _expand(text: str, environ: Mapping[str, str], errors: List[str]) -> str:
    """``${VAR}``, ``${VAR:-default}`` (default when unset or empty); ``$${`` is a literal ``${``."""

    def sub(m: "re.Match[str]") -> str:
        if m.group(0) == "$${":
            return "${"
        name, default = m.group(1), m.group(2)
        if name is None:
            errors.append("malformed '${' (write ${NAME} or ${NAME:-default}, or $${ for a literal '${')")
            return ""
        value = environ.get(name)
        if default is not None:
            return value if value else default
        if value is None:
            errors.append(f"environment variable {name} is not set (write ${{{name}:-default}} for a fallback)")
            return ""
        return value

    return _REF_RE.sub(sub, text)


def _interpolate(value: Any, environ: Mapping[str, str], errors: List[str]) -> Any:
    if isinstance(value, str):
        return _expand(value, environ, errors)
    if isinstance(value, list):
        return [_interpolate(v, environ, errors) for v in value]
    if isinstance(value, Mapping):
        return {k: _interpolate(v, environ, errors) for k, v in value.items()}
    return value


def _mask(value: Any) -> Optional[str]:
    return MASK if value else None


def _mask_url(url: Optional[str]) -> Optional[str]:
    """The URL with any password (in the authority or a ``password=`` query) replaced by ***."""
    if not url or url == "memory":
        return url
    try:
        parts = urlsplit(url)
        netloc, query = parts.netloc, parts.query
        if "@" in netloc:
            userinfo, hostport = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":" + MASK
            netloc = f"{userinfo}@{hostport}"
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", lambda m: m.group(1) + m.group(2) + MASK, query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return MASK


class _Section:
    """Validates one environment's mapping, collecting problems instead of stopping at the first."""

    def __init__(self, section, env, source, environ, read_file):
        self.env, self.source = env, source
        self.environ, self.read_file = environ, read_file
        self.problems: List[str] = []
        # Relative *_file paths are relative to the config file's directory.
        self.base_dir = "" if source.startswith("<") else os.path.dirname(source)
        self.raw: Dict[str, Any] = {}
        for key, value in section.items():
            if not isinstance(key, str):
                self.add(_show(key), "keys must be strings")
            elif key.startswith(("x_", "x-")):
                continue  # extension keys for other readers of the file (e.g. the Rails app)
            elif key not in _KNOWN_KEYS:
                self.add(key, "unknown key" + _did_you_mean(key, _KNOWN_KEYS))
            else:
                errors: List[str] = []
                expanded = _interpolate(value, environ, errors)
                for error in errors:
                    self.add(key, error)
                self.raw[key] = _FAILED if errors else (_UNSET if expanded is None else expanded)

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{self.source}: {self.env}: {key}: {message}")

    def get(self, key: str, parse: Callable[[Any], Any], default: Any = _UNSET) -> Any:
        """Parsed value of ``key``; ``default`` when unset; ``_FAILED`` after a reported problem."""
        value = self.raw.get(key, _UNSET)
        if value is _FAILED:
            return _FAILED
        if value is _UNSET:
            return _FIELD_DEFAULTS.get(key, None) if default is _UNSET else default
        try:
            return parse(value)
        except _Invalid as exc:
            self.add(key, str(exc))
            return _FAILED

    def given(self, key: str) -> bool:
        value = self.raw.get(key, _UNSET)
        return value is not _UNSET and value != "" and value != []

    def resolve_path(self, path: str) -> str:
        return path if os.path.isabs(path) or not self.base_dir else os.path.join(self.base_dir, path)

    def secret(self, key: str, *, required: bool, allow_list: bool = False, systemd: bool = True) -> Any:
        """Precedence: explicit value > ``<key>_file`` > systemd credential > development fallback.

        An empty value counts as unset, so ``"${VAR:-}"`` falls through to the next source.
        ``systemd=False`` (the public key) disables both the credential and the fallback.
        """
        file_key = f"{key}_file"
        if self.raw.get(key) is _FAILED or self.raw.get(file_key) is _FAILED:
            return _FAILED
        has_value, has_file = self.given(key), self.given(file_key)
        if has_value and has_file:
            self.add(key, f"give either {key} or {file_key}, not both")
            return _FAILED
        value: Any = None
        if has_value:
            value = self.raw[key]
            if allow_list and isinstance(value, list):
                bad = [i for i, item in enumerate(value) if not isinstance(item, str) or not item]
                for i in bad:
                    self.add(f"{key}[{i}]", f"expected a non-empty string, got {_kind(value[i])}")
                return _FAILED if bad else tuple(value)
            if not isinstance(value, str):
                shape = "a string or a list of strings" if allow_list else "a string"
                self.add(key, f"expected {shape}, got {_kind(value)}")  # never the value itself
                return _FAILED
        elif has_file:
            path = self.raw[file_key]
            if not isinstance(path, str):
                self.add(file_key, f"expected a file path, got {_show(path)}")
                return _FAILED
            value = self.read_secret(file_key, self.resolve_path(path), "file")
        elif systemd and self.environ.get("CREDENTIALS_DIRECTORY"):
            path = os.path.join(self.environ["CREDENTIALS_DIRECTORY"], key)
            value = self.read_secret(key, path, "systemd credential", missing_ok=True)
        if value is None and systemd and self.env in DEV_ENVIRONMENTS:
            value = self.env
        if value is None and required:
            hint = f"set {key}, {file_key} or the systemd credential {key}" if systemd else f"set {key} or {file_key}"
            self.add(key, f"required in environment '{self.env}' ({hint})")
            return _FAILED
        if value is None or value is _FAILED or not allow_list:
            return value
        return (value,)

    def read_secret(self, key: str, path: str, what: str, missing_ok: bool = False) -> Any:
        """The file's text without trailing whitespace; None if absent and ``missing_ok``."""
        try:
            text = self.read_file(path)
        except FileNotFoundError:
            if missing_ok:
                return None
            self.add(key, f"cannot read {what} {path!r}: file not found")
            return _FAILED
        except (OSError, UnicodeDecodeError) as exc:
            self.add(key, f"cannot read {what} {path!r}: {_reason(exc)}")
            return _FAILED
        text = text.rstrip()
        if not text:
            self.add(key, f"{what} {path!r} is empty")
            return _FAILED
        return text

    def items(self, key: str, accept_string: bool) -> Any:
        """The list under ``key`` as ``[(label, item)]``; ``_UNSET`` / ``_FAILED``."""
        value = self.raw.get(key, _UNSET)
        if value is _UNSET or value is _FAILED:
            return value
        if accept_string and isinstance(value, str):
            return [(key, value)]
        if not isinstance(value, list):
            self.add(key, f"expected a list, got {_show(value)}")
            return _FAILED
        return [(f"{key}[{i}]", item) for i, item in enumerate(value)]

    def each(self, pairs, parse) -> Any:
        out, ok = [], True
        for label, item in pairs:
            try:
                out.append(parse(item))
            except _Invalid as exc:
                self.add(label, str(exc))
                ok = False
        return tuple(out) if ok else _FAILED

    def mapping(self, label: str, value: Any, known) -> Optional[Mapping]:
        if not isinstance(value, Mapping):
            self.add(label, f"expected a mapping with keys {', '.join(known)}, got {_show(value)}")
            return None
        unknown = [k for k in value if k not in known]
        for k in unknown:
            self.add(f"{label}.{k}", "unknown key" + _did_you_mean(str(k), known))
        return None if unknown else value

    def sub(self, label: str, value: Any, parse) -> Any:
        try:
            return parse(value)
        except _Invalid as exc:
            self.add(label, str(exc))
            return _FAILED


def from_mapping(
    doc: Any,
    env: str,
    source: str,
    environ: Mapping[str, str],
    read_file: Callable[[str], str],
    *,
    listen: Optional[str] = None,
) -> Settings:
    """Build the :class:`Settings` of ``env`` from a parsed pusher.yml ``doc``.

    Pure: environment variables come from ``environ``, ``*_file`` secrets and systemd
    credentials through ``read_file(path) -> str`` (raising ``OSError`` / ``FileNotFoundError``).
    ``listen`` overrides the section's ``listen`` (the CLI's ``--listen``).
    Raises :class:`ConfigError` listing every problem found.
    """
    if doc is None:
        raise ConfigError([f"{source}: the file is empty (expected a mapping of environment names to settings)"])
    if not isinstance(doc, Mapping):
        raise ConfigError([f"{source}: expected a mapping of environment names to settings, got {_kind(doc)}"])
    if env not in doc:
        found = ", ".join(str(k) for k in doc) or "none"
        raise ConfigError([f"{source}: no section for environment '{env}' (sections found: {found})"])
    section = doc[env]
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError([f"{source}: {env}: expected a mapping of settings, got {_kind(section)}"])

    s = _Section(section, env, source, environ, read_file)
    v: Dict[str, Any] = {}

    if listen is not None:
        try:
            v["host"], v["port"] = _listen(listen)
        except _Invalid as exc:
            s.problems.append(f"--listen: {exc}")
            v["host"] = v["port"] = _FAILED
    else:
        hostport = s.get("listen", _listen, default=("127.0.0.1", 4000))
        v["host"], v["port"] = (_FAILED, _FAILED) if hostport is _FAILED else hostport
    v["path"] = s.get("path", _path)
    v["ws_base_url"] = s.get("ws_base_url", _ws_base_url)

    algorithm = s.get("guardian_algorithm", _choice(ALGORITHMS, fold=str.upper))
    asymmetric = algorithm in ("RS256", "ES256")
    v["guardian_algorithm"] = algorithm
    v["guardian_secrets"] = s.secret("guardian_secret", required=not asymmetric, allow_list=True)
    if v["guardian_secrets"] is None:
        v["guardian_secrets"] = ()
    v["publish_secret"] = s.secret("publish_secret", required=True)
    public_key = s.secret("guardian_public_key", required=asymmetric, systemd=False)
    if public_key not in (None, _FAILED):
        if not asymmetric and algorithm is not _FAILED:
            s.add("guardian_public_key", "only used with guardian_algorithm RS256 or ES256")
            public_key = _FAILED
        elif "-----BEGIN " not in public_key:
            s.add("guardian_public_key", "expected a PEM public key ('-----BEGIN PUBLIC KEY-----...')")
            public_key = _FAILED
    v["guardian_public_key"] = public_key

    issuer = s.items("issuer", accept_string=True)
    if issuer == []:
        s.add("issuer", "must not be an empty list (leave issuer unset to skip the check)")
        issuer = _FAILED
    v["issuer"] = None if issuer is _UNSET else issuer if issuer is _FAILED else s.each(issuer, _string)

    origins = s.items("allowed_origins", accept_string=True)
    if origins is _UNSET:
        if env in DEV_ENVIRONMENTS:
            origins = DEV_ALLOWED_ORIGINS
        else:
            s.add("allowed_origins", f"required in environment '{env}' (list the origins of the pages "
                  "that may connect, e.g. 'https://app.example.com', or '*' for any)")
            origins = _FAILED
    elif origins == []:
        s.add("allowed_origins", "must not be empty (use '*' to allow any origin)")
        origins = _FAILED
    elif origins is not _FAILED:
        origins = s.each(origins, _origin)
        if origins is not _FAILED:
            origins = tuple(dict.fromkeys(origins))
    v["allowed_origins"] = origins

    v["heartbeat_timeout"] = s.get("heartbeat_timeout", _duration())
    for key in ("max_frame_bytes", "max_publish_bytes", "max_outbox_bytes"):
        v[key] = s.get(key, _size)
    for key in ("max_connections", "max_http_connections", "max_channels_per_socket", "max_topic_length",
                "client_push_burst"):
        v[key] = s.get(key, _count(1))
    v["client_push_rate"] = s.get("client_push_rate", _positive_number)
    v["slow_consumer_seconds"] = s.get("slow_consumer_seconds", _duration())
    v["drain_seconds"] = s.get("drain_seconds", _duration(allow_zero=True))
    v["http_header_timeout"] = s.get("http_header_timeout", _duration())
    v["http_body_timeout"] = s.get("http_body_timeout", _duration())
    v["broker"] = s.get("broker", _broker)
    v["broker_prefix"] = s.get("broker_prefix", _string)
    v["reuse_port"] = s.get("reuse_port", _bool)
    v["demo"] = s.get("demo", _bool, default=env == "development")
    demo_assets = s.get("demo_assets", _string, default=None)
    v["demo_assets"] = s.resolve_path(demo_assets) if isinstance(demo_assets, str) else demo_assets
    v["max_recovery"] = s.get("max_recovery", _count(0))
    v["log_level"] = s.get("log_level", _choice(LOG_LEVELS, aliases={"warn": "warning"}))
    v["access_log"] = s.get("access_log", _bool)
    v["metrics"] = _metrics(s, v["host"], v["port"])
    v["history"] = _history(s)

    if s.problems:
        raise ConfigError(s.problems)
    return Settings(env=env, source=source, **v)


def _metrics(s: _Section, host: Any, port: Any) -> Any:
    value = s.raw.get("metrics", _UNSET)
    if value is _UNSET or value is False:
        return None
    if value is _FAILED:
        return _FAILED
    mapping = s.mapping("metrics", value, _METRICS_KEYS)
    if mapping is None:
        return _FAILED
    if mapping.get("listen") is None:
        s.add("metrics.listen", 'required ("host:port" of the metrics endpoint)')
        return _FAILED
    hostport = s.sub("metrics.listen", mapping["listen"], _listen)
    token = mapping.get("token")
    if token is not None and not isinstance(token, str):
        s.add("metrics.token", f"expected a string, got {_kind(token)}")
        return _FAILED
    if hostport is _FAILED:
        return _FAILED
    if hostport == (host, port) and port != 0:
        s.add("metrics.listen", "must differ from listen")
        return _FAILED
    return MetricsSettings(host=hostport[0], port=hostport[1], token=token or None)


def _history(s: _Section) -> Any:
    entries = s.items("history", accept_string=False)
    if entries is _UNSET:
        return ()
    if entries is _FAILED:
        return _FAILED
    rules, ok = [], True
    for label, entry in entries:
        mapping = s.mapping(label, entry, _HISTORY_KEYS)
        if mapping is None:
            ok = False
            continue
        missing = [k for k in _HISTORY_KEYS if mapping.get(k) is None]
        for k in missing:
            s.add(f"{label}.{k}", "required")
        if missing:
            ok = False
            continue
        topics = s.sub(f"{label}.topics", mapping["topics"], _string)
        size = s.sub(f"{label}.size", mapping["size"], _count(1))
        ttl = s.sub(f"{label}.ttl", mapping["ttl"], _duration())
        if _FAILED in (topics, size, ttl):
            ok = False
        else:
            rules.append(HistoryRule(topics=topics, size=size, ttl=ttl))
    return tuple(rules) if ok else _FAILED

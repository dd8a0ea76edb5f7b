"""`Settings`: every configuration key of ``pusher.yml`` declared once, in one place.

Each field of `Settings` is one key: its default, its parser (`values`), and its flags — a
secret (never shown: masked by `Settings.masked`, left out of ``repr()``), a URL (shown with its
passwords masked), a key whose change needs a restart. Everything else is derived from these
declarations: the keys a section may hold, `RESTART_KEYS`, what ``--check-config`` shows, what a
reload reports. A key with logic of its own (a secret read from a file or a systemd credential,
``listen`` filling host and port, defaults that depend on the environment) names its `read`
function; every other key is read by its parser alone.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..core.origins import OriginPolicy
from ..core.presence import PresenceRule
from . import values as v
from .sources import DEV_ENVIRONMENTS, FAILED, UNSET, Section

ALGORITHMS = ("HS256", "RS256", "ES256")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: ``allowed_origins`` when a development/test section does not set it.
DEV_ALLOWED_ORIGINS = (
    "http://localhost:*",
    "http://127.0.0.1:*",
    "https://localhost:*",
    "https://127.0.0.1:*",
    "http://[::1]:*",
)


def key(default: Any = dataclasses.MISSING, parse: Optional[Callable[[Any], Any]] = None, *,
        name: Optional[str] = None, read: Optional[Callable] = None, fills: Tuple[str, ...] = (),
        filled_by: Optional[str] = None, restart: bool = False, secret: bool = False, url: bool = False,
        from_file: bool = False):
    """Declare one configuration key as a `Settings` field.

    ``parse``: the value parser of a plain key. ``read(section, read_so_far)``: the reader of a key
    with logic of its own (returns the value, or `FAILED` after adding its problems). ``name``: the
    key in pusher.yml when it differs from the field's name. ``fills``/``filled_by``: one key read
    into several fields (``listen``: host and port). ``from_file``: ``<name>_file`` is accepted too.
    """
    meta = {"parse": parse, "read": read, "name": name, "fills": fills, "filled_by": filled_by,
            "restart": restart, "secret": secret, "url": url, "from_file": from_file}
    return field(default=default, repr=not secret, metadata={"key": meta})


@dataclass(frozen=True)
class HistoryRule:
    """Keep the last ``size`` messages of topics matching ``topics`` for ``ttl`` seconds; client
    pushes too only with ``client_pushes``."""

    topics: str
    size: int
    ttl: float
    client_pushes: bool = False


@dataclass(frozen=True)
class PresenceSetting:
    """List who is on topics matching ``topics``: one member per ``sub[key]`` (a user with two
    tabs is one member with two metas), showing the ``sub`` fields named in ``meta`` and nothing
    else of the token; at most ``limit`` entries (connections) per topic."""

    topics: str
    key: str = "id"
    meta: Tuple[str, ...] = ()
    limit: int = 1000


@dataclass(frozen=True)
class MetricsSettings:
    host: str
    port: int
    token: Optional[str] = field(default=None, repr=False)

    def masked(self) -> Dict[str, Any]:
        return {"host": self.host, "port": self.port, "token": v.MASK if self.token else None}


# --- readers of the keys with logic of their own -----------------------------------------------

def _read_listen(s: Section, read: Dict[str, Any]) -> Any:
    if s.cli_listen is not None:  # --listen on the command line wins
        try:
            return v.listen(s.cli_listen)
        except v.Invalid as exc:
            s.problems.append(f"--listen: {exc}")
            return FAILED
    return s.get("listen", v.listen, default=("127.0.0.1", 4000))


def _asymmetric(read: Dict[str, Any]) -> bool:
    return read.get("guardian_algorithm") in ("RS256", "ES256")


def _read_guardian_secrets(s: Section, read: Dict[str, Any]) -> Any:
    secrets = s.secret("guardian_secret", required=not _asymmetric(read), allow_list=True)
    return () if secrets is None else secrets


def _read_publish_secret(s: Section, read: Dict[str, Any]) -> Any:
    return s.secret("publish_secret", required=True)


def _read_public_key(s: Section, read: Dict[str, Any]) -> Any:
    public_key = s.secret("guardian_public_key", required=_asymmetric(read), systemd=False)
    if public_key in (None, FAILED):
        return public_key
    if not _asymmetric(read) and read.get("guardian_algorithm") is not FAILED:
        s.add("guardian_public_key", "only used with guardian_algorithm RS256 or ES256")
        return FAILED
    if "-----BEGIN " not in public_key:
        s.add("guardian_public_key", "expected a PEM public key ('-----BEGIN PUBLIC KEY-----...')")
        return FAILED
    return public_key


def _read_issuer(s: Section, read: Dict[str, Any]) -> Any:
    issuer = s.strings("issuer", v.string, empty="must not be an empty list (leave issuer unset to skip the check)")
    return None if issuer is UNSET else issuer


def _read_allowed_origins(s: Section, read: Dict[str, Any]) -> Any:
    origins = s.strings("allowed_origins", v.origin, empty="must not be empty (use '*' to allow any origin)")
    if origins is not UNSET:
        return origins
    if s.env in DEV_ENVIRONMENTS:
        return DEV_ALLOWED_ORIGINS
    s.add("allowed_origins", f"required in environment '{s.env}' (list the origins of the pages "
          "that may connect, e.g. 'https://app.example.com', or '*' for any)")
    return FAILED


def _read_client_events(s: Section, read: Dict[str, Any]) -> Any:
    events = s.strings("client_events", v.event_pattern,
                       empty="must not be empty (clients that may not push anything: use a name no page sends)")
    return ("msg",) if events is UNSET else events


def _read_demo(s: Section, read: Dict[str, Any]) -> Any:
    return s.get("demo", v.boolean, default=s.env == "development")


def _read_demo_assets(s: Section, read: Dict[str, Any]) -> Any:
    assets = s.get("demo_assets", v.string, default=None)
    return s.resolve_path(assets) if isinstance(assets, str) else assets


_METRICS_KEYS = ("listen", "token")
_PRESENCE_KEYS = ("topics", "key", "meta", "limit")
_HISTORY_KEYS = ("topics", "size", "ttl", "client_pushes")
_HISTORY_REQUIRED = ("topics", "size", "ttl")


def _read_metrics(s: Section, read: Dict[str, Any]) -> Any:
    value = s.raw.get("metrics", UNSET)
    if value is UNSET or value is False:
        return None
    if value is FAILED:
        return FAILED
    mapping = s.mapping("metrics", value, _METRICS_KEYS)
    if mapping is None:
        return FAILED
    if mapping.get("listen") is None:
        s.add("metrics.listen", 'required ("host:port" of the metrics endpoint)')
        return FAILED
    hostport = s.sub("metrics.listen", mapping["listen"], v.listen)
    token = mapping.get("token")
    if token is not None and not isinstance(token, str):
        s.add("metrics.token", f"expected a string, got {v.kind(token)}")
        return FAILED
    if hostport is FAILED:
        return FAILED
    if hostport == (read.get("host"), read.get("port")) and hostport[1] != 0:
        s.add("metrics.listen", "must differ from listen")
        return FAILED
    return MetricsSettings(host=hostport[0], port=hostport[1], token=token or None)


def _read_history(s: Section, read: Dict[str, Any]) -> Any:
    entries = s.items("history", accept_string=False)
    if entries is UNSET:
        return ()
    if entries is FAILED:
        return FAILED
    rules, ok = [], True
    for label, entry in entries:
        mapping = s.mapping(label, entry, _HISTORY_KEYS)
        if mapping is None:
            ok = False
            continue
        missing = [k for k in _HISTORY_REQUIRED if mapping.get(k) is None]
        for k in missing:
            s.add(f"{label}.{k}", "required")
        if missing:
            ok = False
            continue
        topics = s.sub(f"{label}.topics", mapping["topics"], v.string)
        size = s.sub(f"{label}.size", mapping["size"], v.count(1))
        ttl = s.sub(f"{label}.ttl", mapping["ttl"], v.duration())
        client_pushes = False
        if mapping.get("client_pushes") is not None:
            client_pushes = s.sub(f"{label}.client_pushes", mapping["client_pushes"], v.boolean)
        if FAILED in (topics, size, ttl, client_pushes):
            ok = False
        else:
            rules.append(HistoryRule(topics=topics, size=size, ttl=ttl, client_pushes=client_pushes))
    return tuple(rules) if ok else FAILED


def _read_presence(s: Section, read: Dict[str, Any]) -> Any:
    entries = s.items("presence", accept_string=False)
    if entries is UNSET:
        return ()
    if entries is FAILED:
        return FAILED
    rules, ok = [], True
    for label, entry in entries:
        mapping = s.mapping(label, entry, _PRESENCE_KEYS)
        if mapping is None:
            ok = False
            continue
        if mapping.get("topics") is None:
            s.add(f"{label}.topics", "required (a topic pattern, e.g. 'private:*')")
            ok = False
            continue
        topics = s.sub(f"{label}.topics", mapping["topics"], v.string)
        key = s.sub(f"{label}.key", mapping["key"], v.string) if mapping.get("key") is not None else "id"
        meta: Any = ()
        if mapping.get("meta") is not None:
            raw = mapping["meta"]
            if not isinstance(raw, list):
                s.add(f"{label}.meta", f"expected a list of sub field names, got {v.show(raw)}")
                meta = FAILED
            else:
                meta = s.each([(f"{label}.meta[{i}]", f) for i, f in enumerate(raw)], v.string)
        limit = s.sub(f"{label}.limit", mapping["limit"], v.count(1)) if mapping.get("limit") is not None else 1000
        if FAILED in (topics, key, meta, limit):
            ok = False
            continue
        try:
            PresenceRule(topics, key, list(meta), limit)  # the rule's own checks (reserved names, sizes)
        except ValueError as exc:
            s.add(label, str(exc))
            ok = False
            continue
        rules.append(PresenceSetting(topics=topics, key=key, meta=tuple(meta), limit=limit))
    return tuple(rules) if ok else FAILED


# --- the keys ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Settings:
    """Effective settings of one environment. Build it with `config.load` or `config.from_mapping`.

    The fields are read in this order (a reader may look at the fields read before it).
    """

    env: str
    source: str
    host: str = key(name="listen", read=_read_listen, fills=("host", "port"), restart=True)
    port: int = key(name="listen", filled_by="host", restart=True)
    path: str = key("/events", v.url_path, restart=True)
    ws_base_url: Optional[str] = key(None, v.ws_base_url, url=True)
    guardian_algorithm: str = key("HS256", v.choice(ALGORITHMS, fold=str.upper))
    guardian_secrets: Tuple[str, ...] = key(name="guardian_secret", read=_read_guardian_secrets, secret=True,
                                            from_file=True)
    publish_secret: str = key(read=_read_publish_secret, secret=True, from_file=True)
    guardian_public_key: Optional[str] = key(None, read=_read_public_key, secret=True, from_file=True)
    issuer: Optional[Tuple[str, ...]] = key(None, read=_read_issuer)
    allowed_origins: Tuple[str, ...] = key((), read=_read_allowed_origins)
    heartbeat_timeout: float = key(60.0, v.duration())
    max_frame_bytes: int = key(65536, v.size)
    max_publish_bytes: int = key(1048576, v.size)
    max_connections: int = key(10000, v.count(1))
    max_http_connections: int = key(1000, v.count(1))
    max_new_connections_per_second: int = key(0, v.count(0))
    max_channels_per_socket: int = key(100, v.count(1))
    max_topic_length: int = key(255, v.count(1))
    client_push_rate: float = key(10.0, v.positive_number)
    client_push_burst: int = key(20, v.count(1))
    client_events: Tuple[str, ...] = key(("msg",), read=_read_client_events)
    max_outbox_bytes: int = key(1048576, v.size)
    slow_consumer_seconds: float = key(30.0, v.duration())
    longpoll_window: float = key(10.0, v.duration())
    drain_seconds: float = key(5.0, v.duration(allow_zero=True))
    http_header_timeout: float = key(60.0, v.duration())
    http_body_timeout: float = key(30.0, v.duration())
    broker: str = key("memory", v.broker_url, restart=True, url=True)
    broker_prefix: str = key("pusherd", v.string, restart=True)
    reuse_port: bool = key(False, v.boolean, restart=True)
    metrics: Optional[MetricsSettings] = key(None, read=_read_metrics, restart=True)
    demo: bool = key(False, read=_read_demo)
    demo_assets: Optional[str] = key(None, read=_read_demo_assets)
    history: Tuple[HistoryRule, ...] = key((), read=_read_history, restart=True)
    max_recovery: int = key(300, v.count(0), restart=True)
    max_history_topics: int = key(10000, v.count(1), restart=True)
    max_history_bytes: int = key(64 * 1024 * 1024, v.size, restart=True)
    presence: Tuple[PresenceSetting, ...] = key((), read=_read_presence, restart=True)
    presence_interval: float = key(0.1, v.duration(), restart=True)
    presence_ttl: float = key(15.0, v.duration(), restart=True)
    log_level: str = key("info", v.choice(LOG_LEVELS, aliases={"warn": "warning"}))
    access_log: bool = key(True, v.boolean)

    def __repr__(self) -> str:
        # Hand-written so that a password inside a URL is masked too.
        parts = ["%s=%r" % (f.name, _shown(f, getattr(self, f.name))) for f in dataclasses.fields(self) if f.repr]
        return "Settings(%s)" % ", ".join(parts)

    def masked(self) -> Dict[str, Any]:
        """JSON-able effective settings (field names) with every secret replaced by ``"***"``
        (``None`` when unset); for ``pusherd --check-config``."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _meta(f).get("secret"):
                value = [v.MASK for _ in value] if isinstance(value, tuple) else (v.MASK if value else None)
            elif isinstance(value, MetricsSettings):
                value = value.masked()
            elif f.name in ("history", "presence"):
                value = [dataclasses.asdict(rule) for rule in value]
            else:
                value = _shown(f, value)
            out[f.name] = list(value) if isinstance(value, tuple) else value
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
            for pattern in OriginPolicy(self.allowed_origins).over_a_top_level_domain:
                notes.append("allowed_origins: %r lets every site under a top-level domain open a socket "
                             "with a visitor's cookies" % pattern)
            if self.demo:
                notes.append("demo: the live demo page is served at /demo (meant for development)")
        for i, rule in enumerate(self.presence):
            # An entry: phx_ref, online_at and the key take ~80 bytes of JSON, a short field ~40 more.
            estimate = rule.limit * (80 + 40 * len(rule.meta))
            if estimate > self.max_outbox_bytes // 2:
                notes.append("presence[%d]: a full topic's list (limit %d) is about %d KB, more than half of "
                             "max_outbox_bytes (%d KB): its joiners may be closed as slow consumers; lower the "
                             "limit or raise max_outbox_bytes" % (i, rule.limit, estimate // 1024,
                                                                  self.max_outbox_bytes // 1024))
        if self.metrics is not None and not self.metrics.token and not v.is_loopback(self.metrics.host):
            notes.append("metrics.token: unset while metrics listen on %s: anyone who reaches it may scrape"
                         % self.metrics.host)
        return notes

    def changed_keys(self, other: "Settings") -> List[str]:
        """The pusher.yml keys whose values differ (secrets by name only, never their values)."""
        return list(dict.fromkeys(yaml_name(f) for f in _KEY_FIELDS if getattr(self, f.name) != getattr(other, f.name)))

    def restart_required(self, other: "Settings") -> List[str]:
        """Keys that differ between ``self`` and ``other`` and take effect only after a restart."""
        return [k for k in self.changed_keys(other) if k in RESTART_KEYS]


def _meta(f: dataclasses.Field) -> Dict[str, Any]:
    return f.metadata.get("key", {})


def yaml_name(f: dataclasses.Field) -> str:
    return _meta(f).get("name") or f.name


def _shown(f: dataclasses.Field, value: Any) -> Any:
    return v.mask_url(value) if _meta(f).get("url") else value


#: The fields that are configuration keys (not env and source), in reading order.
_KEY_FIELDS = tuple(f for f in dataclasses.fields(Settings) if "key" in f.metadata)
#: The keys a section may hold.
KNOWN_KEYS = tuple(dict.fromkeys(
    name for f in _KEY_FIELDS for name in ((yaml_name(f), yaml_name(f) + "_file") if _meta(f)["from_file"]
                                           else (yaml_name(f),))))
#: Keys whose change takes effect only after a restart (everything else is applied on reload).
RESTART_KEYS = tuple(dict.fromkeys(yaml_name(f) for f in _KEY_FIELDS if _meta(f)["restart"]))
DEFAULTS = {yaml_name(f): f.default for f in _KEY_FIELDS if f.default is not dataclasses.MISSING}


def read_section(s: Section) -> Dict[str, Any]:
    """Every field's value from `s`, in declaration order (`FAILED` where a problem was added)."""
    out: Dict[str, Any] = {}
    for f in _KEY_FIELDS:
        meta = _meta(f)
        if meta["filled_by"]:
            continue
        if meta["read"] is not None:
            value = meta["read"](s, out)
        else:
            value = s.get(yaml_name(f), meta["parse"])
        if meta["fills"]:
            out.update(zip(meta["fills"], (FAILED,) * len(meta["fills"]) if value is FAILED else value))
        else:
            out[f.name] = value
    return out

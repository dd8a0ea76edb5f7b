"""Which browser origins may open a WebSocket (a page elsewhere must not ride a visitor's cookies).

Patterns: ``"*"`` (anything, must be explicit), an exact origin ``https://app.example.com``,
a subdomain wildcard ``https://*.example.com`` (any subdomain, not the bare domain), and a
port wildcard ``http://localhost:*``. Comparison is on scheme, host and port, case-insensitive.
"""

from typing import Iterable, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

#: Verdicts an OriginPolicy keeps, by the origin as sent, and the longest origin kept: every
#: page of a site sends the same one (a storm's thousands of upgrades: urlsplit is most of the
#: check). Bounded, whatever origins clients make up: emptied when full.
ORIGINS_KEPT = 256
ORIGIN_CHARS_KEPT = 256


def _split(origin: str) -> Optional[Tuple[str, str, str]]:
    """(scheme, host, port-as-text) or None when `origin` is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        scheme = parts.scheme.lower()
        if not scheme or not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
            return None
        netloc = parts.netloc.lower()
        if "@" in netloc:
            return None
        if netloc.startswith("["):
            host, _, rest = netloc[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port = netloc.partition(":")
        if not host or (port and not (port.isascii() and port.isdigit())):
            return None  # "http://localhost:evil.com" has no port: it is not an origin
        if not port:
            port = str(_DEFAULT_PORTS.get(scheme, ""))
        return scheme, host, port
    except ValueError:
        return None


class OriginPolicy:
    def __init__(self, patterns: Iterable[str]):
        self.patterns = tuple(patterns)
        self.any = "*" in self.patterns
        self._rules = []
        #: The patterns whose ``*.`` stands before a single label (``https://*.com``): every site
        #: under a top-level domain (settings warn of them).
        self.over_a_top_level_domain: List[str] = []
        for text in self.patterns:
            if text == "*":
                continue
            wildcard_port = text.endswith(":*")
            split = _split(text[:-2] if wildcard_port else text)
            if split is None:
                raise ValueError("not an origin pattern: %r" % text)
            scheme, host, port = split
            bare = host[2:] if host.startswith("*.") else host
            if "*" in bare or not bare:
                raise ValueError("not an origin pattern: %r" % text)
            self._rules.append((scheme, host, None if wildcard_port else port))
            if host.startswith("*.") and "." not in bare:
                self.over_a_top_level_domain.append(text)
        self._verdicts: dict = {}  # origin -> `_decide`'s verdict (ORIGINS_KEPT)

    def allows(self, origin: Optional[str]) -> bool:
        """Whether a browser page from `origin` may connect (an empty origin is refused)."""
        if self.any:
            return True
        if not origin:
            return False
        verdict = self._verdicts.get(origin)
        if verdict is None:
            verdict = self._decide(origin)
            if len(origin) <= ORIGIN_CHARS_KEPT:
                if len(self._verdicts) >= ORIGINS_KEPT:
                    self._verdicts.clear()
                self._verdicts[origin] = verdict
        return verdict

    def _decide(self, origin: str) -> bool:
        split = _split(origin)
        if split is None:
            return False
        scheme, host, port = split
        for r_scheme, r_host, r_port in self._rules:
            if r_scheme != scheme or (r_port is not None and r_port != port):
                continue
            if r_host.startswith("*."):
                if host.endswith(r_host[1:]) and len(host) > len(r_host) - 1:
                    return True
            elif r_host == host:
                return True
        return False


def upgrade_allowed(policy: OriginPolicy, headers: Mapping[str, str]) -> Tuple[bool, Optional[str]]:
    """pusherd's own decision on a WebSocket upgrade, whatever the web framework thinks of it:
    ``(allowed, origin)``.

    A browser always sends ``Origin`` on a WebSocket upgrade (``Sec-WebSocket-Origin`` from
    pre-RFC 6455 drafts counts the same): it must be allowed by `policy`, even when it names the
    very host the request went to (a DNS-rebinding page over ``ws://``) or the request carries
    ``Sec-Fetch-Site: same-origin`` or ``none`` (Tornado 6.6 lets both through without asking).
    A request without any origin is not a browser page, unless it carries ``Sec-Fetch-Site``
    (only browsers send it): then it is refused, as a browser that hid its origin.
    """
    origin = headers.get("Origin")
    if origin is None:
        origin = headers.get("Sec-WebSocket-Origin")
    if origin is None:
        return headers.get("Sec-Fetch-Site") is None, None
    return policy.allows(origin), origin

"""What may be shown of a secret-bearing value: URLs with their passwords masked.

One function for every place a URL is shown (``--check-config``, logs, the broker's own
description, metrics), so that a password form missed in one place is missed nowhere else.
"""

import re
from typing import Optional
from urllib.parse import urlsplit

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

"""The join token's fast path: the one shape a storm brings by the thousand, HS256 as the Rails
helper (ruby-jwt) or pusherd's kit (PyJWT) signs it, decided without PyJWT's per-call costs.

It only ever *accepts*, and only what PyJWT would accept, with the same claims: a header that is
one of three exact byte strings (``alg`` HS256, ``typ`` JWT or none: nothing else to check), a
signature whose canonical base64url is the HMAC of one of the configured keys (constant-time
compare), a payload in canonical base64url that is a JSON object. Anything else answers None
and PyJWT decides and words the refusal: another header (``kid``, ``crit``, ``b64``, another
``alg``), a segment PyJWT's own rules would have to judge (padding, other characters, spare
bits), a signature no key made. The claims' times are the caller's (`tokens.Verifier`), with the
same rule: clearly inside their bounds, or PyJWT.

Why by hand: PyJWT 2.14 and later spend ~120 µs on such a token (a per-character alphabet check
of each segment in Python, the HMAC key's PEM/DER checks on every call); this path ~10 µs, a
fifth of a storm's server time with Rails tokens. The figures: ``python bench/token_verify.py``
and ``python bench/run.py --quick --only stormrails`` (bench/README.md, the fifth pass).
tests/unit/core/test_hs256.py sends the same tokens, valid and mangled, through both paths and
requires the same outcome, on the lowest and the highest PyJWT pinned.
"""

import binascii
import hashlib
import hmac
import json
from typing import Any, Optional, Sequence, Tuple

from .protocol import whole_text

#: json.loads for a str, as PyJWT reads a payload (the default decoder), on `whole_text`'s path.
_json_loads = whole_text(json.JSONDecoder())


_STANDARD_TO_URL = bytes.maketrans(b"+/", b"-_")
#: base64url to base64, and "+", "/" and "=" (no base64url character) to one strict mode refuses.
_URL_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
#: By a segment's length modulo 4: the padding it lacks (None: no length base64 makes).
_PADDING = (b"", None, b"==", b"=")
#: By a segment's length modulo 4: the last characters whose spare bits are clear (2: the low 4
#: bits of the last 6, 3: the low 2; 0: none spare). Any other last character is not canonical.
_LAST_CANONICAL = (None, None, frozenset(b"AQgw"), frozenset(b"AEIMQUYcgkosw048"))


def b64url(raw: bytes) -> bytes:
    """base64url without padding: how a JWT encodes its segments (RFC 7515 §2), and ``s_csrf``."""
    return binascii.b2a_base64(raw, newline=False).translate(_STANDARD_TO_URL).rstrip(b"=")


#: The headers taken on the fast path, as their base64url segments: ruby-jwt's and PyJWT's.
HEADERS = frozenset(b64url(text.encode("ascii")) for text in (
    '{"alg":"HS256"}', '{"alg":"HS256","typ":"JWT"}', '{"typ":"JWT","alg":"HS256"}'))


def canonical_segment(segment: bytes) -> Optional[bytes]:
    """What a base64url segment without padding decodes to, or None unless it is the one
    canonical encoding of those bytes (only the 64 characters, no padding, no spare bits set).

    Decoded once in strict mode, where any other character is an error, instead of decoded
    leniently and encoded back to compare (a fifth of a Rails token's check by callgrind:
    ``python bench/profile_storm.py --callgrind --joins-only``)."""
    rest = len(segment) & 3
    padding = _PADDING[rest]
    if padding is None or (rest and segment[-1] not in _LAST_CANONICAL[rest]):
        return None
    try:
        return binascii.a2b_base64(segment.translate(_URL_TO_STANDARD) + padding, strict_mode=True)
    except binascii.Error:
        return None


class HS256Keys:
    """The HMAC keys of one verifier, in its order (rotation: the first that verifies wins)."""

    __slots__ = ("_macs",)

    def __init__(self, keys: Sequence[bytes]):
        self._macs = tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)

    def decode(self, token: str) -> Optional[Tuple[Any, int]]:
        """``(claims, index of the key that signed)`` for a token of the fast path's shape whose
        signature verifies; None for any other token: PyJWT's to decide."""
        if not token.isascii():
            return None
        data = token.encode("ascii")
        parts = data.split(b".")
        if len(parts) != 3 or parts[0] not in HEADERS:
            return None
        signing_input = data[:len(parts[0]) + 1 + len(parts[1])]
        for index, mac in enumerate(self._macs):
            digest = mac.copy()
            digest.update(signing_input)
            if hmac.compare_digest(b64url(digest.digest()), parts[2]):
                break
        else:
            return None
        payload = canonical_segment(parts[1])
        if payload is None:
            return None
        try:  # (as text: json.loads would detect the encoding of bytes; not UTF-8, PyJWT decides)
            claims = _json_loads(payload.decode("utf-8"))
        except (ValueError, RecursionError):
            return None
        if not isinstance(claims, dict):
            return None
        return claims, index

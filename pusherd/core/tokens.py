"""Guardian-compatible join tokens: verify what the Rails helper mints, and mint the same.

The Rails side signs ``{aud: "csrf", sub: {...} | {}, iss, exp, s_csrf, listen, publish}`` with
HS256 and the shared secret; ``s_csrf`` is base64url-without-padding of
HMAC-SHA256(secret, csrf_token). The page sends the token and the raw csrf token on join, or Rails'
masked authenticity token (``<meta name="csrf-token">``, different on every render): then
``s_csrf`` is HMAC-SHA256(secret, the 32 bytes it unmasks to), see ``rails_csrf``.

Rules (Guardian 0.1-0.3 semantics, minus its bugs):
- the algorithm comes from configuration, never from the token header;
- ``exp`` is required and enforced; ``iat``/``nbf`` in the future are refused;
- ``iss`` is checked only when issuers are configured;
- ``sub`` may be any JSON value (PyJWT >= 2.10 rejects non-strings unless told not to);
- when ``aud`` is ``"csrf"``, the csrf token (as sent, or unmasked) must match ``s_csrf`` (constant-time);
- several secrets may verify (rotation); the one that verified the signature keys the csrf HMAC.
"""

import base64
import hashlib
import hmac
import math
import re
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

import jwt

from . import rails_csrf
from .hs256 import HS256Keys, b64url
from .errors import CSRF_MISMATCH, INVALID_TOKEN, TOKEN_EXPIRED, AuthError
from .topics import TopicPattern, compile_patterns

_DIGITS = re.compile(r"[0-9]+")  # a time claim given as a string (PyJWT accepts "1700000000")

# Short development secrets ("development", "test") are legitimate here; config warns about
# short production secrets once at start-up instead of PyJWT warning on every join.
try:
    warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)
except AttributeError:  # PyJWT < 2.11 has no such warning
    pass

ASYMMETRIC = {"RS256", "ES256"}


def s_csrf(secret: str, csrf_token: str) -> str:
    """base64url(HMAC-SHA256(secret, csrf_token)) without padding, as Guardian and the Rails helper compute it."""
    digest = hmac.new(_bytes(secret), _bytes(csrf_token), hashlib.sha256).digest()
    return b64url(digest).decode("ascii")


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


class Claims:
    """What a verified token grants: the claims pusherd uses, not the token's whole payload (a
    channel keeps its Claims for its life: a Rails token's whole payload was ~1 KB more per
    socket; `Verifier.verify_all` gives it, for tests and tools)."""

    __slots__ = ("sub", "listen", "publish", "exp", "iss", "aud")

    def __init__(self, sub: Any, listen: Tuple[TopicPattern, ...], publish: Tuple[TopicPattern, ...],
                 exp: float, iss: Any = None, aud: Any = None):
        self.sub = sub
        self.listen = listen
        self.publish = publish
        self.exp = exp
        self.iss = iss
        self.aud = aud

    def __repr__(self):
        return "Claims(sub=%r, listen=%r, publish=%r, exp=%r)" % (
            self.sub, [p.text for p in self.listen], [p.text for p in self.publish], self.exp)


#: One PyJWT instance: `_decode` asks it for the header and the claims of one parse (the
#: header was parsed a second time for `_refuse_crit` before, a third of a join's token cost:
#: bench/run.py --only stormrails).
_JWT = jwt.PyJWT()


def _decode(token: str, key, algorithm: str, options: dict, leeway: float = 0) -> Any:
    """The verified claims of `token` (PyJWT raises what does not verify), its header checked
    by `_refuse_crit`. The algorithm is pinned by the caller, never taken from the header."""
    decoded = _JWT.decode_complete(token, key, algorithms=[algorithm], options=options, leeway=leeway)
    _refuse_crit(decoded["header"])
    return decoded["payload"]


def _refuse_crit(header: Any) -> None:
    """Refuse what the header may demand that pusherd does not do: a ``crit`` list names
    extensions the verifier must understand (RFC 7515 4.1.11); pusherd understands none. PyJWT
    refuses them itself only from 2.10 on: decided here, the same on every supported PyJWT."""
    if isinstance(header, dict) and "crit" in header:
        raise AuthError(INVALID_TOKEN, "crit header: no extension is supported")


#: Compiled ``listen``/``publish`` claims by their text: every page of a kind brings the same
#: lists (a tenth of a join's token check: bench/token_verify.py). Bounded: cleared when full.
_PATTERNS: dict = {}
_PATTERNS_MAX = 1024


def _pattern_claim(claims: dict, name: str) -> Tuple[TopicPattern, ...]:
    value = claims.get(name, [])
    if value is None:
        return ()
    if not isinstance(value, list):
        raise AuthError(INVALID_TOKEN, "claim %r must be a list of strings" % name)
    key = tuple(value)
    try:
        patterns = _PATTERNS.get(key)
    except TypeError:  # an unhashable item (a list or an object): not a list of strings
        patterns = None
    if patterns is not None:  # compiled before: a list of strings (no other JSON value equals a string)
        return patterns
    if not all(isinstance(v, str) for v in value):
        raise AuthError(INVALID_TOKEN, "claim %r must be a list of strings" % name)
    if len(_PATTERNS) >= _PATTERNS_MAX:
        _PATTERNS.clear()
    patterns = _PATTERNS[key] = compile_patterns(value)
    return patterns


class Verifier:
    """Verifies join tokens against the configured keys. Immutable; build a new one on reload."""

    def __init__(self, secrets: Sequence[str], algorithm: str = "HS256", public_key: Optional[str] = None,
                 issuers: Optional[Iterable[str]] = None, leeway: float = 0, fast_path: bool = True):
        if algorithm in ASYMMETRIC:
            if not public_key:
                raise ValueError("%s needs a public key" % algorithm)
        elif algorithm != "HS256":
            raise ValueError("unsupported algorithm %r" % algorithm)
        self.algorithm = algorithm
        self._secrets = tuple(s for s in secrets if s)
        if not self._secrets and algorithm not in ASYMMETRIC:
            raise ValueError("at least one non-empty secret is required (it also keys the csrf HMAC)")
        # With RS256/ES256 the shared secret (if any) only keys the csrf HMAC.
        self._keys = (public_key,) if algorithm in ASYMMETRIC else self._secrets
        self._issuers = tuple(issuers) if issuers else None
        self._leeway = leeway
        self._fast = _fast_keys(self._keys) if fast_path and algorithm == "HS256" else None
        # s_csrf's HMAC keyed once per secret: copied per join, not keyed again (bench/token_verify.py)
        self._csrf_macs = {secret: hmac.new(_bytes(secret), digestmod=hashlib.sha256) for secret in self._secrets}

    def verify(self, token: Any, csrf_token: Any = None, now: Optional[float] = None) -> Claims:
        """Return the token's claims, or raise AuthError with a stable reason (never echoing the token)."""
        return self.verify_all(token, csrf_token, now)[0]

    def verify_all(self, token: Any, csrf_token: Any = None, now: Optional[float] = None) -> Tuple[Claims, dict]:
        """`verify`, and every claim of the token as decoded (the payload, a dict)."""
        if not isinstance(token, str) or not token or len(token) > 16384:
            raise AuthError(INVALID_TOKEN, "token is not a string of sane length")
        claims, key_secret = self._decode(token, now)
        exp = claims.get("exp")
        if exp is None:
            raise AuthError(INVALID_TOKEN, "exp claim is required")
        if self._issuers is not None and claims.get("iss") not in self._issuers:
            raise AuthError(INVALID_TOKEN, "issuer not accepted")
        aud = claims.get("aud")
        if aud == "csrf" or (isinstance(aud, list) and "csrf" in aud):
            self._check_csrf(claims, csrf_token, key_secret)
        try:
            exp = float(exp)
        except (TypeError, ValueError, OverflowError):
            raise AuthError(INVALID_TOKEN, "exp is not a number") from None
        if not math.isfinite(exp):
            raise AuthError(INVALID_TOKEN, "exp is not finite")
        return Claims(
            sub=claims.get("sub"),
            listen=_pattern_claim(claims, "listen"),
            publish=_pattern_claim(claims, "publish"),
            exp=exp,
            iss=claims.get("iss"),
            aud=aud,
        ), claims

    def _decode(self, token: str, now: Optional[float]):
        if self._fast is not None and now is not None:  # every join passes its clock
            found = self._fast_decode(token, now)
            if found is not None:
                return found
        options = {
            "verify_aud": False,     # Guardian semantics: aud is a token type ("csrf"), handled below
            "verify_sub": False,     # sub is a JSON object from Rails
            "verify_jti": False,
            "verify_iss": False,     # checked below against a list, when configured
            "verify_exp": now is None,
            "verify_iat": now is None,
            "verify_nbf": now is None,
            "require": ["exp"],
        }
        last_error: Optional[Exception] = None
        for key in self._keys:
            try:
                claims = _decode(token, key, self.algorithm, options, self._leeway)
            except jwt.ExpiredSignatureError:
                raise AuthError(TOKEN_EXPIRED, "token expired") from None
            except jwt.InvalidSignatureError as exc:
                last_error = exc
                continue  # maybe the next (rotated) secret
            except jwt.MissingRequiredClaimError as exc:
                raise AuthError(INVALID_TOKEN, str(exc)) from None
            except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
                raise AuthError(INVALID_TOKEN, "%s: %s" % (type(exc).__name__, exc)) from None
            if not isinstance(claims, dict):
                raise AuthError(INVALID_TOKEN, "claims are not an object")
            if now is not None:
                self._check_times(claims, now)
            csrf_key = key if self.algorithm == "HS256" else (self._secrets[0] if self._secrets else None)
            return claims, csrf_key
        raise AuthError(INVALID_TOKEN, "signature does not verify (%s)" % type(last_error).__name__)

    def _fast_decode(self, token: str, now: float):
        """`hs256`'s answer, when it is PyJWT's for certain; None: ask PyJWT. The times are
        then the slow path's with an explicit clock, `_check_times` (PyJWT checks only that
        ``exp`` is there)."""
        found = self._fast.decode(token)
        if found is None or found[0].get("exp") is None:
            return None
        claims, index = found
        self._check_times(claims, now)
        return claims, self._keys[index]

    def _check_times(self, claims: dict, now: float) -> None:
        """Explicit clock, for tests and for re-checking open channels (PyJWT's own checks use time.time())."""
        times = {}
        for name in ("exp", "iat", "nbf"):
            if name in claims:
                value = claims[name]
                try:
                    if isinstance(value, bool):
                        raise ValueError
                    if isinstance(value, str) and not _DIGITS.fullmatch(value):
                        raise ValueError  # ASCII digits only: int() would also read "٣٠٠", " 3" or "3_0"
                    times[name] = value if isinstance(value, (int, float)) else int(value)
                    if not math.isfinite(times[name]):
                        raise ValueError
                except (TypeError, ValueError, OverflowError):
                    raise AuthError(INVALID_TOKEN, "%s must be a number" % name) from None
        if "exp" in times and times["exp"] <= now - self._leeway:
            raise AuthError(TOKEN_EXPIRED, "token expired")
        for name in ("iat", "nbf"):
            if name in times and times[name] > now + self._leeway:
                raise AuthError(INVALID_TOKEN, "%s is in the future" % name)

    def _s_csrf(self, secret: str, text) -> bytes:
        """`s_csrf(secret, text)` (text, or the bytes a masked token unmasks to) as ASCII bytes,
        from the HMAC keyed for `secret` in advance."""
        mac = self._csrf_macs.get(secret)
        if mac is None:
            return s_csrf(secret, text).encode()
        mac = mac.copy()
        mac.update(_bytes(text))
        return b64url(mac.digest())

    def _check_csrf(self, claims: dict, csrf_token: Any, secret: Optional[str]) -> None:
        if not secret:
            raise AuthError(CSRF_MISMATCH, "aud csrf, but no guardian_secret is configured to key the csrf HMAC")
        expected = claims.get("s_csrf")
        if not isinstance(expected, str):
            raise AuthError(CSRF_MISMATCH, "token has aud csrf but no s_csrf claim")
        if not isinstance(csrf_token, str) or not csrf_token:
            raise AuthError(CSRF_MISMATCH, "csrf_token missing from join payload")
        try:
            sent = csrf_token.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800"): no page's csrf token
            raise AuthError(CSRF_MISMATCH, "csrf_token is not valid UTF-8 text") from None
        claimed = expected.encode("utf-8", "replace")
        matches = hmac.compare_digest(self._s_csrf(secret, sent), claimed)
        unmasked = rails_csrf.unmask(csrf_token)
        if unmasked is not None:  # also Rails' masked authenticity token: s_csrf is over what it unmasks to
            matches |= hmac.compare_digest(self._s_csrf(secret, unmasked), claimed)
        if not matches:
            raise AuthError(CSRF_MISMATCH, "csrf_token does not match s_csrf" if unmasked is None else
                            "csrf_token matches s_csrf neither as sent nor unmasked as a Rails authenticity token")


def _fast_keys(keys: Sequence[str]) -> Optional[HS256Keys]:
    """The fast path's keys, prepared by PyJWT itself (the bytes its HMAC uses); None, no fast
    path, when PyJWT refuses one of them (a PEM or SSH public key as a secret): it then says so
    on every join, as it did before."""
    try:
        hs256 = jwt.algorithms.get_default_algorithms()["HS256"]
        return HS256Keys([hs256.prepare_key(key) for key in keys])
    except Exception:  # noqa: BLE001 - whatever PyJWT refuses, its own path reports
        return None


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def verify_publish_token(token: str, secrets: Sequence[str], now: float) -> Tuple[TopicPattern, ...]:
    """Verify a publisher token (``POST /publish``); return the patterns of its ``publish`` claim.

    HS256 only, keyed by ``publish_secret``; ``exp`` required. A join token (``aud: "csrf"``) is
    refused: it is bound to one page's csrf token, which /publish cannot check. Raises AuthError.
    """
    if not isinstance(token, str) or not token or len(token) > 16384:
        raise AuthError(INVALID_TOKEN, "token is not a string of sane length")
    options = {"verify_aud": False, "verify_sub": False, "verify_jti": False, "verify_iss": False,
               "verify_exp": False, "verify_iat": False, "verify_nbf": False, "require": ["exp"]}
    bad: Optional[Exception] = None
    for secret in secrets:
        if not secret:
            continue
        try:
            claims = _decode(token, secret, "HS256", options)
        except jwt.InvalidSignatureError as exc:
            bad = exc
            continue
        except (jwt.InvalidTokenError, ValueError, TypeError) as exc:
            raise AuthError(INVALID_TOKEN, "%s: %s" % (type(exc).__name__, exc)) from None
        break
    else:
        raise AuthError(INVALID_TOKEN, "signature does not verify (%s)" % type(bad).__name__)
    if not isinstance(claims, dict):
        raise AuthError(INVALID_TOKEN, "claims are not an object")
    aud = claims.get("aud")
    if aud == "csrf" or (isinstance(aud, list) and "csrf" in aud):
        raise AuthError(INVALID_TOKEN, "a join token (aud csrf) is not a publisher token")
    for name in ("exp", "iat", "nbf"):
        if name in claims and not _is_finite_number(claims[name]):
            raise AuthError(INVALID_TOKEN, "%s must be a number" % name)
    if claims["exp"] <= now:
        raise AuthError(TOKEN_EXPIRED, "publisher token expired")
    for name in ("iat", "nbf"):
        if name in claims and claims[name] > now:
            raise AuthError(INVALID_TOKEN, "%s is in the future" % name)
    patterns = _pattern_claim(claims, "publish")
    if not patterns:
        raise AuthError(INVALID_TOKEN, "publish claim missing or empty")
    return patterns


#: phoenix.js 1.8's ``authToken`` travels as a WebSocket subprotocol: this prefix, then the token
#: in Base64 without padding (``btoa``; URL-safe accepted too). Long-poll sends it raw in the
#: ``X-Phoenix-AuthToken`` header.
AUTH_TOKEN_PREFIX = "base64url.bearer.phx."
MAX_TOKEN_CHARS = 16384


def auth_token_from_subprotocols(protocols: Sequence[str]) -> Optional[str]:
    """The token of phoenix.js 1.8's ``authToken`` among the offered subprotocols, or None (also
    for one that is not decodable text: it is then no token at all, and is refused as such)."""
    for protocol in protocols:
        if protocol.startswith(AUTH_TOKEN_PREFIX):
            encoded = protocol[len(AUTH_TOKEN_PREFIX):]
            if len(encoded) > MAX_TOKEN_CHARS * 2:
                return ""
            try:
                raw = base64.b64decode(encoded.replace("-", "+").replace("_", "/") + "=" * (-len(encoded) % 4),
                                       validate=True)
                return raw.decode("ascii")
            except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
                return ""
    return None


def socket_token(params: Mapping[str, str], auth_token: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """The socket's own token and csrf value: ``(token, csrf)``, token None when it brings none.

    From phoenix.js's connect params (``new Socket(url, {params: {...}})``: ``guardian_token`` or
    ``token``, and ``csrf_token``) or 1.8's ``authToken`` (`auth_token`, which wins).
    """
    token = auth_token if auth_token is not None else params.get("guardian_token", params.get("token"))
    return token, params.get("csrf_token")


def looks_like_jwt(value: str) -> bool:
    """Three non-empty base64url segments: a bearer value shaped like a JWT."""
    parts = value.split(".")
    if len(parts) != 3 or not all(parts):
        return False
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    return all(set(p) <= allowed for p in parts)


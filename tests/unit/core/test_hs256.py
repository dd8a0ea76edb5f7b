"""pusherd.core.hs256, the join token's fast path, against PyJWT itself: the same tokens, valid and
mangled every way a segment, a header, a signature or a claim can be, through `Verifier` with the
fast path and without it (``fast_path=False``: PyJWT alone). The outcome must be the same: the
same claims, or the same refusal word for word. .ci/run runs this on the lowest PyJWT pinned
(2.8.0, lenient about base64) and the highest (2.15.1, strict).

The tokens are built by hand (base64url + hmac) so that the test does not trust what it checks.
"""

import base64
import binascii
import functools
import hashlib
import hmac
import json
import random
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pusherd.core import tokens
from pusherd.core.errors import AuthError
from pusherd.core.hs256 import HEADERS, HS256Keys, canonical_segment
from pusherd.core.tokens import Verifier, s_csrf

SECRET = "od-web-guardian-secret-0123456789abcdef"
OLD_SECRET = "od-web-old-guardian-secret-fedcba9876543210"
STRANGER = "someone-elses-secret-0123456789abcdef"
ISSUER = "od-web-production"
CSRF = "page-csrf-token-0123456789"
NOW = 1_700_000_000
SUB = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "crews": ["web"]}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(header: str, payload: str, secret: str) -> str:
    return b64(hmac.new(secret.encode(), ("%s.%s" % (header, payload)).encode(), hashlib.sha256).digest())


def rails_token(claims: dict, secret: str = SECRET, header: str = '{"alg":"HS256"}') -> str:
    h, p = b64(header.encode()), b64(json.dumps(claims, separators=(",", ":")).encode())
    return "%s.%s.%s" % (h, p, sign(h, p, secret))


def outcome(verifier: Verifier, token, csrf=CSRF, now=NOW):
    try:
        c, raw = verifier.verify_all(token, csrf, now=now)
    except AuthError as exc:
        return ("refused", exc.reason, str(exc))
    return ("accepted", raw, c.sub, c.exp, [p.text for p in c.listen], [p.text for p in c.publish], c.iss, c.aud)


@functools.lru_cache(maxsize=None)
def both(secrets: tuple, issuers: Optional[tuple] = None, leeway=0):
    """A verifier with the fast path and one without (PyJWT alone), for the same configuration."""
    return (Verifier(secrets, issuers=issuers, leeway=leeway),
            Verifier(secrets, issuers=issuers, leeway=leeway, fast_path=False))


# --- the strategies: every part of a token, and what can go wrong with it ---------------------

HEADER_TEXTS = [
    '{"alg":"HS256"}', '{"alg":"HS256","typ":"JWT"}', '{"typ":"JWT","alg":"HS256"}',  # the fast path's
    '{"alg": "HS256"}', '{"alg":"HS256","kid":"k1"}', '{"alg":"HS256","kid":7}', '{"alg":"HS256","crit":["x"]}',
    '{"alg":"HS256","b64":false,"crit":["b64"]}', '{"alg":"HS384"}', '{"alg":"none"}', '{"alg":"RS256"}',
    '{"typ":"JWT"}', '{"alg":"HS256","typ":"JOSE"}', '["HS256"]', '"HS256"', 'not json', '',
]
TIMES = [NOW + 3600, NOW - 3600, NOW, NOW + 1, NOW - 1, NOW + 2, NOW - 2, NOW + 0.5, NOW - 0.5, float(NOW + 3600),
         str(NOW + 3600), str(NOW - 3600), "soon", "", None, True, False, [], {}, 10 ** 30, -10 ** 30, -1, 0, 1.5,
         float("nan"), float("inf"), float("-inf"), 1e308]
CLAIM_VALUES = {
    "sub": [SUB, {}, "", "ada", "\u00e9\ud83d\ude00", 7, -1, None, [1]],
    "iss": [ISSUER, "elsewhere", None, 3],
    "aud": ["csrf", ["csrf"], ["csrf", "other"], "other", None, 1],
    "listen": [["deploys:web", "public:*"], [], "deploys:web", [1], None, ["private:*"]],
    "publish": [[], ["public:*"], "x", [None]],
    "exp": TIMES, "iat": TIMES, "nbf": TIMES,
}
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# The cases are built by one `random.Random` per example, seeded by hypothesis: hypothesis's own
# draws, some thirty per token, made this test take 25 s for 3,000 tokens.


def claims(r, signer: str) -> dict:
    """A page's claims, each of them (one in six) gone or replaced by another value."""
    c = {"sub": SUB, "iss": ISSUER, "aud": "csrf", "listen": ["deploys:web", "public:*"], "publish": [],
         "exp": NOW + 3600, "s_csrf": s_csrf(signer, CSRF)}
    for name, values in CLAIM_VALUES.items():
        if r.random() < 1 / 6:
            if name in c and r.random() < 0.3:
                del c[name]
            else:
                c[name] = r.choice(values)
    if r.random() < 0.1:
        c["s_csrf"] = r.choice([s_csrf(SECRET, "other"), s_csrf(OLD_SECRET, CSRF), 5, None])
    return c


def payload_text(r, signer: str) -> str:
    kind = r.randint(0, 12)
    if kind == 0:
        return r.choice(["[1,2]", '"text"', "3", "null", "{", "", '{"exp":1e999}', "\ufeff{}",
                         '{"exp":%s}' % ("9" * 5000)])
    return json.dumps(claims(r, signer), separators=(",", ":") if kind % 2 else (", ", ": "))


def mangle(r, segment: str) -> str:
    """A segment as it came (most often), or changed the way a careless (or hostile) encoder
    would change it."""
    how = r.randint(0, 12)
    if how <= 7 or not segment:
        return segment
    if how == 8:
        return segment + "=" * r.randint(1, 2)
    if how == 9:  # spare bits: the last character's unused low bits set
        if len(segment) % 4 in (2, 3):
            i = ALPHABET.index(segment[-1]) if segment[-1] in ALPHABET else 0
            spare = 0b1111 if len(segment) % 4 == 2 else 0b11
            return segment[:-1] + ALPHABET[(i & ~spare) | r.randint(1, spare)]
        return segment
    if how == 10:
        at = r.randint(0, len(segment))
        return segment[:at] + r.choice(["+", "/", "!", " ", "é", ".", "\x00", "A"]) + segment[at:]
    if how == 11:
        return segment[:r.randint(0, len(segment) - 1)]
    return segment.replace("-", "+").replace("_", "/")


def token_case(r):
    """(token, secrets, issuers, leeway, csrf token): half the headers the fast path's, most
    tokens signed by one of the keys, half of them with a segment or the token changed."""
    secrets = r.choice([(SECRET,), (SECRET, OLD_SECRET), (OLD_SECRET, SECRET), (STRANGER, SECRET)])
    signer = r.choice(secrets) if r.random() < 0.85 else r.choice([SECRET, OLD_SECRET, STRANGER])
    header = b64(r.choice(HEADER_TEXTS[:3] if r.random() < 0.5 else HEADER_TEXTS[3:]).encode())
    payload = b64(payload_text(r, signer).encode())
    mangled = r.random() < 0.5
    if mangled:
        header, payload = mangle(r, header), mangle(r, payload)
    if r.random() < 0.9:
        signature = sign(header, payload, signer) if header.isascii() and payload.isascii() else "x"
        if mangled:
            signature = mangle(r, signature)
    else:
        signature = r.choice(["", "AAAA", b64(b"\0" * 32)])
    token = "%s.%s.%s" % (header, payload, signature)
    if mangled and r.random() < 0.1:
        token = r.choice([token + ".", token + ".e30", "." + token, token.replace(".", "", 1)])
    return token, secrets, r.choice([None, (ISSUER,)]), r.choice([0, 2, 30]), r.choice([CSRF, CSRF, "other", None])


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2 ** 64))
def test_the_fast_path_decides_as_pyjwt_alone(seed):
    token, secrets, issuers, leeway, csrf = case = token_case(random.Random(seed))
    fast, slow = both(secrets, issuers, leeway)
    assert outcome(fast, token, csrf) == outcome(slow, token, csrf), case


def test_the_cases_reach_the_fast_path():
    """The test above is only as good as the share of its tokens the fast path accepts."""
    r = random.Random(18)
    cases = [token_case(r) for _ in range(3000)]
    accepted = sum(outcome(both(s, i, lw)[0], t, c)[0] == "accepted" for t, s, i, lw, c in cases)
    refused_after_signature = sum(both(s, i, lw)[0]._fast.decode(t) is not None for t, s, i, lw, c in cases) - accepted
    assert accepted >= 200 and refused_after_signature >= 200, (accepted, refused_after_signature)


# --- the fast path is taken for the tokens a storm brings, and only for them ------------------

def rails_claims(**extra):
    return dict({"sub": SUB, "exp": NOW + 3600, "iss": ISSUER, "aud": "csrf", "s_csrf": s_csrf(SECRET, CSRF),
                 "listen": ["deploys:web", "public:*"], "publish": []}, **extra)


@pytest.fixture
def no_pyjwt(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("PyJWT was asked")
    monkeypatch.setattr(tokens._JWT, "decode_complete", refuse)


@pytest.mark.parametrize("header", ['{"alg":"HS256"}', '{"alg":"HS256","typ":"JWT"}', '{"typ":"JWT","alg":"HS256"}'])
def test_a_rails_token_is_verified_without_pyjwt(no_pyjwt, header):
    claims = Verifier([SECRET], issuers=[ISSUER]).verify(rails_token(rails_claims(), header=header), CSRF, now=NOW)
    assert claims.sub == SUB and [p.text for p in claims.listen] == ["deploys:web", "public:*"]


def test_a_token_of_the_rotated_secret_is_verified_without_pyjwt(no_pyjwt):
    token = rails_token(rails_claims(s_csrf=s_csrf(OLD_SECRET, CSRF)), secret=OLD_SECRET)
    assert Verifier([SECRET, OLD_SECRET]).verify(token, CSRF, now=NOW).sub == SUB


@pytest.mark.parametrize("token", [
    rails_token(rails_claims(), header='{"alg":"HS256","kid":"k1"}'),
    rails_token(rails_claims(), secret=STRANGER),
    rails_token({k: v for k, v in rails_claims().items() if k != "exp"}),
    rails_token(rails_claims()) + "=",
], ids=["kid header", "unknown key", "no exp", "padded signature"])
def test_every_other_token_is_left_to_pyjwt(no_pyjwt, token):
    with pytest.raises(AssertionError, match="PyJWT was asked"):
        Verifier([SECRET]).verify(token, CSRF, now=NOW)


def test_without_a_clock_pyjwt_decides_the_times(no_pyjwt):
    with pytest.raises(AssertionError, match="PyJWT was asked"):
        Verifier([SECRET]).verify(rails_token(rails_claims()), CSRF)


def test_a_secret_pyjwt_refuses_as_an_hmac_key_turns_the_fast_path_off():
    pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    assert tokens._fast_keys([pem]) is None
    assert tokens._fast_keys([SECRET]) is not None


def test_the_fast_path_headers_are_the_three_it_names():
    assert {base64.urlsafe_b64decode(h + b"=" * (-len(h) % 4)) for h in HEADERS} == {
        b'{"alg":"HS256"}', b'{"alg":"HS256","typ":"JWT"}', b'{"typ":"JWT","alg":"HS256"}'}


@pytest.mark.parametrize("segment, expected", [
    (b"", b""), (b"e30", b"{}"), (b"e31", None), (b"e30=", None), (b"e3+", None), (b"e", None), (b"_-8", b"\xff\xef"),
])
def test_canonical_segment(segment, expected):
    assert canonical_segment(segment) == expected


def lenient_then_encoded_back(segment: bytes):
    """The plain reading of canonical: decode leniently, keep it only if encoding it back gives
    the segment (what canonical_segment decided this way before it decoded in strict mode)."""
    try:
        raw = base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=") == segment else None


#: Segments near the canonical ones: base64url text, then maybe a character of the other
#: alphabet, padding, whitespace, a non-ASCII byte or a changed last character.
SEGMENT_BYTES = st.one_of(
    st.binary(max_size=40).map(lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=")),
    st.binary(max_size=40).map(lambda raw: base64.urlsafe_b64encode(raw)),
    st.text(ALPHABET + "+/= \n!\x00\xff", max_size=24).map(lambda t: t.encode("latin-1")),
)


@settings(max_examples=3000, deadline=None)
@given(SEGMENT_BYTES, st.integers(0, 63), st.booleans())
def test_canonical_segment_decides_as_decoding_and_encoding_back(segment, last, change_last):
    if change_last and segment:
        segment = segment[:-1] + ALPHABET[last].encode()
    assert canonical_segment(segment) == lenient_then_encoded_back(segment)


def test_hs256keys_names_the_key_that_signed():
    token = rails_token(rails_claims(), secret=OLD_SECRET)
    assert HS256Keys([SECRET.encode(), OLD_SECRET.encode()]).decode(token) == (rails_claims(), 1)
    assert HS256Keys([SECRET.encode()]).decode(token) is None

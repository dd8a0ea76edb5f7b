"""pusherd.core.tokens: the Rails-minted Guardian-style join token, verified with an explicit clock.

Most tokens here are built by hand (base64url + hmac), byte for byte as ruby-jwt writes them,
so the tests do not trust pusherd's own `mint_token`.
"""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from pusherd.core import rails_csrf
from pusherd.core.errors import CSRF_MISMATCH, INVALID_TOKEN, TOKEN_EXPIRED, AuthError
from pusherd.core.tokens import Claims, Verifier, looks_like_jwt, s_csrf
from pusherd.client import mint_token
from pusherd.core.topics import TopicPattern

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECRET = "od-web-guardian-secret-0123456789abcdef"
OLD_SECRET = "od-web-old-guardian-secret-fedcba9876543210"
ISSUER = "od-web-production"
CSRF = "Hx9yN7kq2m+/PlZ0aB3cD4eF5gH6iJ7kL8mN9oP0qR1="   # a Rails csrf token (base64, with + / =)
NOW = 1_700_000_000
THIRTY_DAYS = 30 * 86400
SUB = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "crews": [1, 7]}

# openssl dgst -sha256 -hmac "$SECRET" -binary <<<"$CSRF" (no newline) | base64 | tr '+/' '-_' | tr -d '='
S_CSRF_KNOWN = "6IoETKIDDG-0FXAYsXTik5pxc8vZxQHXmXP_171NtLI"


# --- building tokens the way ruby-jwt does ----------------------------------------------------

def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ruby_json(value) -> bytes:
    # Ruby's JSON.generate: compact, UTF-8
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def rails_s_csrf(secret: str, csrf: str) -> str:
    # Base64.urlsafe_encode64(OpenSSL::HMAC.digest("SHA256", secret, csrf)).delete("=")
    return b64url(hmac.new(secret.encode(), csrf.encode(), hashlib.sha256).digest())


def signed(header: dict, claims, secret, digest=hashlib.sha256, raw_claims: bytes = None) -> str:
    key = secret if isinstance(secret, bytes) else secret.encode()
    signing_input = b64url(ruby_json(header)) + "." + b64url(raw_claims if raw_claims is not None
                                                            else ruby_json(claims))
    return signing_input + "." + b64url(hmac.new(key, signing_input.encode(), digest).digest())


def rails_claims(sub=SUB, listen=("private:user:42", "deploys:*"), publish=("private:user:42",), csrf=CSRF,
                 secret=SECRET, exp=NOW + THIRTY_DAYS, issuer=ISSUER, **extra):
    claims = {"aud": "csrf", "sub": sub, "iss": issuer, "exp": exp, "s_csrf": rails_s_csrf(secret, csrf),
              "listen": list(listen), "publish": list(publish)}
    claims.update(extra)
    return claims


def rails_token(header=None, secret=SECRET, **kwargs) -> str:
    return signed(header or {"alg": "HS256"}, rails_claims(secret=secret, **kwargs), secret)


def refused(verifier, token, reason, csrf=CSRF, now=NOW):
    with pytest.raises(AuthError) as info:
        verifier.verify(token, csrf, now=now)
    assert info.value.reason == reason, info.value.detail
    if isinstance(token, str) and len(token) > 16:
        assert token not in str(info.value), "the token leaked into the error"
    return info.value


@pytest.fixture
def verifier():
    return Verifier([SECRET])


# --- s_csrf --------------------------------------------------------------------------------

def test_s_csrf_rfc4231_vector():
    # RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?")
    digest = bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert s_csrf("Jefe", "what do ya want for nothing?") == b64url(digest)
    assert s_csrf("Jefe", "what do ya want for nothing?") == "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM"


def test_s_csrf_known_answer_for_a_rails_token():
    assert s_csrf(SECRET, CSRF) == S_CSRF_KNOWN
    assert rails_s_csrf(SECRET, CSRF) == S_CSRF_KNOWN
    assert "=" not in S_CSRF_KNOWN and "+" not in S_CSRF_KNOWN and "/" not in S_CSRF_KNOWN


# --- the Rails token is accepted -----------------------------------------------------------

@pytest.mark.parametrize("header", [{"alg": "HS256"}, {"typ": "JWT", "alg": "HS256"}], ids=["jwt2", "jwt1"])
def test_rails_token_accepted(verifier, header):
    token = rails_token(header=header)
    assert "iat" not in json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    claims = verifier.verify(token, CSRF, now=NOW)
    assert isinstance(claims, Claims)
    assert claims.sub == SUB
    assert claims.listen == (TopicPattern("private:user:42"), TopicPattern("deploys:*"))
    assert claims.publish == (TopicPattern("private:user:42"),)
    assert claims.exp == NOW + THIRTY_DAYS
    assert claims.iss == ISSUER and claims.aud == "csrf"
    assert verifier.verify_all(token, CSRF, now=NOW)[1]["s_csrf"] == S_CSRF_KNOWN


def test_rails_token_with_empty_sub(verifier):
    assert verifier.verify(rails_token(sub={}), CSRF, now=NOW).sub == {}


def test_rails_token_on_the_real_clock(verifier):
    now = int(time.time())
    token = rails_token(exp=now + THIRTY_DAYS)
    assert verifier.verify(token, CSRF).exp == now + THIRTY_DAYS
    refused_now = rails_token(exp=now - 10)
    with pytest.raises(AuthError) as info:
        verifier.verify(refused_now, CSRF)
    assert info.value.reason == TOKEN_EXPIRED


@pytest.mark.parametrize("sub", [{}, SUB, "user:42", 42, None, [1, 2], True, {"nested": {"deep": [1, {}]}}])
def test_sub_may_be_any_json_value(verifier, sub):
    assert verifier.verify(rails_token(sub=sub), CSRF, now=NOW).sub == sub


def test_mint_token_agrees_with_the_hand_built_token(verifier):
    minted = mint_token(SECRET, sub=SUB, listen=["private:user:42", "deploys:*"], publish=["private:user:42"],
                        csrf_token=CSRF, issuer=ISSUER, now=NOW)
    header = json.loads(base64.urlsafe_b64decode(minted.split(".")[0] + "=="))
    payload = json.loads(base64.urlsafe_b64decode(minted.split(".")[1] + "=="))
    assert header["alg"] == "HS256"
    assert payload == rails_claims()
    assert verifier.verify(minted, CSRF, now=NOW).sub == SUB


def test_listen_and_publish_may_be_absent_or_null(verifier):
    claims = rails_claims()
    del claims["listen"]
    claims["publish"] = None
    result = verifier.verify(signed({"alg": "HS256"}, claims, SECRET), CSRF, now=NOW)
    assert result.listen == () and result.publish == ()


def test_token_without_csrf_audience_needs_no_csrf(verifier):
    claims = {"sub": {}, "exp": NOW + 60, "listen": ["a"], "aud": "token"}
    assert verifier.verify(signed({"alg": "HS256"}, claims, SECRET), None, now=NOW).listen == (TopicPattern("a"),)
    del claims["aud"]
    assert verifier.verify(signed({"alg": "HS256"}, claims, SECRET), None, now=NOW).aud is None


# --- expiry and time claims -------------------------------------------------------------------

def test_expired(verifier):
    refused(verifier, rails_token(exp=NOW - 1), TOKEN_EXPIRED)


def test_expired_exactly_at_exp(verifier):
    refused(verifier, rails_token(exp=NOW), TOKEN_EXPIRED)
    assert verifier.verify(rails_token(exp=NOW + 1), CSRF, now=NOW)


def test_leeway():
    lenient = Verifier([SECRET], leeway=30)
    assert lenient.verify(rails_token(exp=NOW - 10), CSRF, now=NOW)
    refused(lenient, rails_token(exp=NOW - 31), TOKEN_EXPIRED)


def test_missing_exp(verifier):
    claims = rails_claims()
    del claims["exp"]
    refused(verifier, signed({"alg": "HS256"}, claims, SECRET), INVALID_TOKEN)
    with pytest.raises(AuthError) as info:
        verifier.verify(signed({"alg": "HS256"}, claims, SECRET), CSRF)   # the real clock too
    assert info.value.reason == INVALID_TOKEN


@pytest.mark.parametrize("exp", ["soon", [NOW + 60], {"t": 1}, True])
def test_exp_not_a_number(verifier, exp):
    refused(verifier, rails_token(exp=exp), INVALID_TOKEN)


def test_exp_as_numeric_string_is_accepted_like_pyjwt(verifier):
    assert verifier.verify(rails_token(exp=str(NOW + 60)), CSRF, now=NOW).exp == NOW + 60


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_iat_or_nbf_in_the_future(verifier, claim):
    refused(verifier, rails_token(**{claim: NOW + 100}), INVALID_TOKEN)
    assert verifier.verify(rails_token(**{claim: NOW - 100}), CSRF, now=NOW)
    assert verifier.verify(rails_token(**{claim: NOW}), CSRF, now=NOW)


@pytest.mark.parametrize("claim", ["iat", "nbf"])
def test_iat_or_nbf_in_the_future_on_the_real_clock(verifier, claim):
    now = int(time.time())
    with pytest.raises(AuthError) as info:
        verifier.verify(rails_token(exp=now + 3600, **{claim: now + 600}), CSRF)
    assert info.value.reason == INVALID_TOKEN


# --- signature and algorithm --------------------------------------------------------------------

def test_wrong_secret(verifier):
    refused(verifier, rails_token(secret="some-other-secret-0123456789abcdef"), INVALID_TOKEN)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(verifier, alg):
    claims = b64url(ruby_json(rails_claims()))
    header = b64url(ruby_json({"alg": alg}))
    refused(verifier, header + "." + claims + ".", INVALID_TOKEN)
    refused(verifier, header + "." + claims + "." + b64url(b"x"), INVALID_TOKEN)


@pytest.mark.parametrize("alg,digest", [("HS512", hashlib.sha512), ("HS384", hashlib.sha384)])
def test_other_hmac_algorithms_with_the_right_secret(verifier, alg, digest):
    refused(verifier, signed({"alg": alg}, rails_claims(), SECRET, digest=digest), INVALID_TOKEN)


def test_rs256_header_signed_with_the_hmac_secret(verifier):
    refused(verifier, signed({"alg": "RS256"}, rails_claims(), SECRET), INVALID_TOKEN)


def test_header_without_alg(verifier):
    refused(verifier, signed({"typ": "JWT"}, rails_claims(), SECRET), INVALID_TOKEN)


def test_tampered_payload(verifier):
    token = rails_token(listen=["private:user:42"])
    header, _, sig = token.split(".")
    forged = b64url(ruby_json(rails_claims(listen=["private:user:42", "private:admin"])))
    refused(verifier, header + "." + forged + "." + sig, INVALID_TOKEN)


def test_tampered_header(verifier):
    token = rails_token()
    _, payload, sig = token.split(".")
    refused(verifier, b64url(ruby_json({"alg": "HS256", "kid": "x"})) + "." + payload + "." + sig, INVALID_TOKEN)


def test_tampered_signature(verifier):
    token = rails_token()
    header, payload, sig = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "="))
    raw[0] ^= 0x01
    refused(verifier, header + "." + payload + "." + b64url(bytes(raw)), INVALID_TOKEN)
    refused(verifier, header + "." + payload + "." + sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:],
            INVALID_TOKEN)


@pytest.mark.parametrize("cut", [1, 4, 20, 43, 44, 60])
def test_truncated(verifier, cut):
    token = rails_token()
    refused(verifier, token[:-cut], INVALID_TOKEN)


def test_two_segments(verifier):
    header, payload, _ = rails_token().split(".")
    refused(verifier, header + "." + payload, INVALID_TOKEN)
    refused(verifier, header + "." + payload + ".", INVALID_TOKEN)


def test_four_segments(verifier):
    refused(verifier, rails_token() + ".extra", INVALID_TOKEN)


def test_claims_not_an_object(verifier):
    refused(verifier, signed({"alg": "HS256"}, None, SECRET, raw_claims=b"[1,2,3]"), INVALID_TOKEN)
    refused(verifier, signed({"alg": "HS256"}, None, SECRET, raw_claims=b"not json"), INVALID_TOKEN)


@pytest.mark.parametrize("token", [None, "", 42, b"a.b.c", {"token": 1}, ["a"], "a" * 20000, "....", "a.b.c"])
def test_not_a_token(verifier, token):
    refused(verifier, token, INVALID_TOKEN)


# --- csrf ------------------------------------------------------------------------------------

def test_wrong_csrf(verifier):
    refused(verifier, rails_token(), CSRF_MISMATCH, csrf=CSRF[:-2] + "x=")


@pytest.mark.parametrize("csrf", [None, "", 123, ["x"], {"csrf": CSRF}])
def test_missing_or_non_string_csrf(verifier, csrf):
    refused(verifier, rails_token(), CSRF_MISMATCH, csrf=csrf)


def test_missing_s_csrf(verifier):
    claims = rails_claims()
    del claims["s_csrf"]
    refused(verifier, signed({"alg": "HS256"}, claims, SECRET), CSRF_MISMATCH)


@pytest.mark.parametrize("value", [None, 42, ["x"], {"s": "x"}])
def test_s_csrf_not_a_string(verifier, value):
    refused(verifier, signed({"alg": "HS256"}, rails_claims(s_csrf=value), SECRET), CSRF_MISMATCH)


def test_s_csrf_keyed_with_another_secret(verifier):
    claims = rails_claims(s_csrf=rails_s_csrf("other-secret", CSRF))
    refused(verifier, signed({"alg": "HS256"}, claims, SECRET), CSRF_MISMATCH)


def test_s_csrf_with_padding_is_not_the_rails_format(verifier):
    claims = rails_claims(s_csrf=S_CSRF_KNOWN + "=")
    refused(verifier, signed({"alg": "HS256"}, claims, SECRET), CSRF_MISMATCH)


def test_audience_list_containing_csrf_is_checked(verifier):
    claims = rails_claims(aud=["csrf", "token"])
    token = signed({"alg": "HS256"}, claims, SECRET)
    assert verifier.verify(token, CSRF, now=NOW)
    refused(verifier, token, CSRF_MISMATCH, csrf="wrong")


# --- csrf: Rails' masked authenticity token ----------------------------------------------------
# Two renders of form_authenticity_token by Rails 6.1.7 for one session, and what they unmask to
# (how they were printed: tests/unit/test_rails_csrf.py).
RAILS_GLOBAL = bytes.fromhex("93ad6614d824910483cc2d3c58ab60f6a6e1c9efea7491bb3fbc737a3054b8ab")
RAILS_MASKED = ["JLmjWp78FGC3LE04dKuAXoqmwKoXs8z1xIMq+y6Xv/i3FMVORtiFZDTgYAQsAOCoLEcJRf3HXU77P1mBHsMHUw==",
                "yiYYVUguiYv4309v8lXhNjHvHWgs-cvRXRm8is34NuJZi35BkAoYj3sTYlOq_oHAlw7Uh8aNWmpipc_w_ayOSQ"]


def rails_session_token(value=RAILS_GLOBAL, secret=SECRET) -> str:
    # docs/rails.md: Base64.urlsafe_encode64(OpenSSL::HMAC.digest("SHA256", secret, unmasked_csrf_token)).delete("=")
    return signed({"alg": "HS256"}, rails_claims(s_csrf=b64url(hmac.new(secret.encode(), value, hashlib.sha256)
                                                                .digest())), secret)


def test_rails_masked_tokens_match_s_csrf_over_what_they_unmask_to(verifier):
    token = rails_session_token()
    for masked in RAILS_MASKED + [rails_csrf.mask(RAILS_GLOBAL, bytes(range(32)))]:
        assert verifier.verify(token, masked, now=NOW).sub == SUB


def test_a_masked_token_of_another_session_is_refused(verifier):
    other = rails_csrf.mask(hashlib.sha256(b"another session").digest(), bytes(32), urlsafe=False)
    error = refused(verifier, rails_session_token(), CSRF_MISMATCH, csrf=other)
    assert "Rails" in error.detail


@pytest.mark.parametrize("index", [0, 20, 50, 80])
def test_a_tampered_masked_token_is_refused(verifier, index):
    masked = RAILS_MASKED[1]
    tampered = masked[:index] + ("A" if masked[index] != "A" else "B") + masked[index + 1:]
    refused(verifier, rails_session_token(), CSRF_MISMATCH, csrf=tampered)


def test_the_unmasked_value_itself_is_not_a_masked_token(verifier):
    # what Rails 4.1 printed (the stored token, unmasked) or the value's own Base64: neither unmasks
    for text in (base64.b64encode(RAILS_GLOBAL).decode(), b64url(RAILS_GLOBAL), RAILS_GLOBAL.hex()):
        refused(verifier, rails_session_token(), CSRF_MISMATCH, csrf=text)


def test_a_masked_token_signed_as_text_keeps_the_exact_text_rule(verifier):
    """s_csrf over a masked token's text (today's rule) binds that text, not its value."""
    token = rails_token(csrf=RAILS_MASKED[0])
    assert verifier.verify(token, RAILS_MASKED[0], now=NOW)
    refused(verifier, token, CSRF_MISMATCH, csrf=RAILS_MASKED[1])


def test_the_masked_token_hmac_is_keyed_by_the_verifying_secret():
    token = signed({"alg": "HS256"}, rails_claims(s_csrf=b64url(hmac.new(OLD_SECRET.encode(), RAILS_GLOBAL,
                                                                          hashlib.sha256).digest())), SECRET)
    refused(Verifier([SECRET, OLD_SECRET]), token, CSRF_MISMATCH, csrf=RAILS_MASKED[0])


# --- listen / publish claims ------------------------------------------------------------------

@pytest.mark.parametrize("claim", ["listen", "publish"])
@pytest.mark.parametrize("value", ["private:user:42", ["a", 1], [None], [["a"]], {"a": 1}, 42, True])
def test_pattern_claims_must_be_lists_of_strings(verifier, claim, value):
    claims = rails_claims()
    claims[claim] = value
    refused(verifier, signed({"alg": "HS256"}, claims, SECRET), INVALID_TOKEN)


# --- issuer ----------------------------------------------------------------------------------

def test_issuer_not_checked_unless_configured(verifier):
    assert verifier.verify(rails_token(issuer="anyone"), CSRF, now=NOW).iss == "anyone"
    claims = rails_claims()
    del claims["iss"]
    assert verifier.verify(signed({"alg": "HS256"}, claims, SECRET), CSRF, now=NOW).iss is None


def test_issuer_list_when_configured():
    checked = Verifier([SECRET], issuers=["od-web-production", "od-web-staging"])
    assert checked.verify(rails_token(issuer="od-web-production"), CSRF, now=NOW)
    assert checked.verify(rails_token(issuer="od-web-staging"), CSRF, now=NOW)
    refused(checked, rails_token(issuer="od-web-evil"), INVALID_TOKEN)
    refused(checked, rails_token(issuer="od-web-productio"), INVALID_TOKEN)
    refused(checked, rails_token(issuer=["od-web-production"]), INVALID_TOKEN)
    refused(checked, rails_token(issuer={"iss": 1}), INVALID_TOKEN)
    claims = rails_claims()
    del claims["iss"]
    refused(checked, signed({"alg": "HS256"}, claims, SECRET), INVALID_TOKEN)


# --- secret rotation ---------------------------------------------------------------------------

def test_second_secret_verifies_and_keys_the_csrf_hmac():
    rotating = Verifier([SECRET, OLD_SECRET])
    assert rotating.verify(rails_token(secret=SECRET), CSRF, now=NOW)
    assert rotating.verify(rails_token(secret=OLD_SECRET), CSRF, now=NOW)
    # signed with the old secret but csrf keyed with the new one: the verifying secret keys the csrf
    mixed = signed({"alg": "HS256"}, rails_claims(secret=SECRET), OLD_SECRET)
    refused(rotating, mixed, CSRF_MISMATCH)
    refused(rotating, rails_token(secret="third-secret-0123456789abcdef0123"), INVALID_TOKEN)


def test_rotation_still_reports_expiry():
    rotating = Verifier([SECRET, OLD_SECRET])
    refused(rotating, rails_token(secret=OLD_SECRET, exp=NOW - 5), TOKEN_EXPIRED)


def test_empty_secrets_are_ignored_and_at_least_one_is_required():
    assert Verifier(["", SECRET]).verify(rails_token(), CSRF, now=NOW)
    with pytest.raises(ValueError):
        Verifier([])
    with pytest.raises(ValueError):
        Verifier(["", None])


@pytest.mark.parametrize("algorithm", ["HS512", "HS384", "none", "RS512", "hs256"])
def test_unsupported_configured_algorithms(algorithm):
    with pytest.raises(ValueError):
        Verifier([SECRET], algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_asymmetric_needs_a_public_key(algorithm):
    with pytest.raises(ValueError):
        Verifier([SECRET], algorithm=algorithm)


# --- RS256 / ES256 ----------------------------------------------------------------------------

def _pem_pair(private_key):
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode()
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private_pem, public_pem


@pytest.fixture(scope="module")
def rsa_keys():
    return _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys():
    return _pem_pair(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture(params=["RS256", "ES256"])
def asymmetric(request, rsa_keys, ec_keys):
    private_pem, public_pem = rsa_keys if request.param == "RS256" else ec_keys
    return request.param, private_pem, public_pem


def test_asymmetric_token_accepted(asymmetric):
    alg, private_pem, public_pem = asymmetric
    verifier = Verifier([SECRET], algorithm=alg, public_key=public_pem)
    token = jwt.encode(rails_claims(), private_pem, algorithm=alg)
    claims = verifier.verify(token, CSRF, now=NOW)
    assert claims.sub == SUB
    # the csrf HMAC is still keyed by the shared secret
    refused(verifier, token, CSRF_MISMATCH, csrf="wrong")
    refused(verifier, jwt.encode(rails_claims(exp=NOW - 1), private_pem, algorithm=alg), TOKEN_EXPIRED)


def test_asymmetric_token_from_another_key(asymmetric, rsa_keys, ec_keys):
    alg, _, public_pem = asymmetric
    other_private = _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))[0] \
        if alg == "RS256" else _pem_pair(ec.generate_private_key(ec.SECP256R1()))[0]
    verifier = Verifier([SECRET], algorithm=alg, public_key=public_pem)
    refused(verifier, jwt.encode(rails_claims(), other_private, algorithm=alg), INVALID_TOKEN)


def test_key_confusion_hs256_signed_with_the_public_pem_is_refused(asymmetric):
    alg, _, public_pem = asymmetric
    verifier = Verifier([SECRET], algorithm=alg, public_key=public_pem)
    for key in (public_pem.encode(), public_pem.strip().encode()):
        forged = signed({"typ": "JWT", "alg": "HS256"}, rails_claims(), key)
        refused(verifier, forged, INVALID_TOKEN)


def test_asymmetric_deployment_refuses_hs256_signed_with_the_csrf_secret(asymmetric):
    alg, _, public_pem = asymmetric
    verifier = Verifier([SECRET], algorithm=alg, public_key=public_pem)
    refused(verifier, rails_token(), INVALID_TOKEN)


def test_hs256_deployment_refuses_asymmetric_tokens(verifier, rsa_keys):
    refused(verifier, jwt.encode(rails_claims(), rsa_keys[0], algorithm="RS256"), INVALID_TOKEN)


# --- small helpers ------------------------------------------------------------------------------

def test_looks_like_jwt():
    assert looks_like_jwt(rails_token())
    for value in ("", "a.b", "a..c", "a.b.c.d", "a.b.c=", "a b.c.d", "secret"):
        assert not looks_like_jwt(value)


# --- regressions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("now", [NOW, None], ids=["explicit-clock", "real-clock"])
def test_huge_integer_exp_is_refused_not_a_token_that_never_expires(verifier, now):
    refused(verifier, rails_token(exp=10 ** 400), INVALID_TOKEN, now=now)


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_non_finite_exp_is_refused(verifier, literal):
    raw = ruby_json(rails_claims(exp=0)).replace(b'"exp":0', b'"exp":' + literal.encode())
    token = signed({"alg": "HS256"}, None, SECRET, raw_claims=raw)
    refused(verifier, token, INVALID_TOKEN)


# --- Hypothesis ---------------------------------------------------------------------------------

@SETTINGS
@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=60)))
def test_arbitrary_strings_raise_only_auth_error(token, csrf):
    verifier = Verifier([SECRET, OLD_SECRET])
    with pytest.raises(AuthError):
        verifier.verify(token, csrf, now=NOW)


JWT_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ !"
VALID = rails_token()


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["replace", "insert", "delete"]),
                          st.integers(min_value=0, max_value=len(VALID)),
                          st.sampled_from(JWT_CHARS)), min_size=1, max_size=4))
def test_mutated_tokens_raise_only_auth_error(edits):
    token = VALID
    for op, pos, char in edits:
        pos = min(pos, len(token))
        if op == "replace" and pos < len(token):
            token = token[:pos] + char + token[pos + 1:]
        elif op == "insert":
            token = token[:pos] + char + token[pos:]
        elif op == "delete" and pos < len(token):
            token = token[:pos] + token[pos + 1:]
    assume(token != VALID)
    verifier = Verifier([SECRET])
    try:
        _, raw = verifier.verify_all(token, CSRF, now=NOW)
    except AuthError as exc:
        assert exc.reason in (INVALID_TOKEN, CSRF_MISMATCH, TOKEN_EXPIRED)
        return
    # Only an edit the base64 decoder cannot see (padding bits, junk in the signature) may verify;
    # the signed text itself must be untouched, and so must the claims.
    assert token.rsplit(".", 1)[0] == VALID.rsplit(".", 1)[0]
    assert raw == rails_claims()


json_scalar = st.none() | st.booleans() | st.integers(-2 ** 62, 2 ** 62) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)
claim_names = st.sampled_from(["exp", "iat", "nbf", "iss", "aud", "sub", "s_csrf", "listen", "publish", "jti"])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(claim_names, json_value, max_size=6), st.one_of(st.none(), st.just(CSRF), st.text(max_size=5)),
       st.sampled_from([NOW, None]))
def test_signed_tokens_with_arbitrary_claims_raise_only_auth_error(claims, csrf, now):
    """Even a correctly signed token with odd claim values yields Claims or AuthError."""
    token = signed({"alg": "HS256"}, claims, SECRET)
    verifier = Verifier([SECRET], issuers=None)
    try:
        result = verifier.verify(token, csrf, now=now)
    except AuthError:
        return
    assert "exp" in claims
    assert all(isinstance(p, TopicPattern) for p in result.listen + result.publish)


@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["x" * 3000]])
def test_crit_header_is_refused_on_every_pyjwt(verifier, crit):
    """RFC 7515: a verifier must understand every extension `crit` names; pusherd knows none.
    PyJWT refuses some only from 2.10 on; pusherd refuses all, on 2.8 as on the newest."""
    token = jwt.encode({"exp": NOW + 3600, "listen": ["private:a"]}, SECRET, algorithm="HS256",
                       headers={"crit": crit})
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=NOW)
    assert info.value.reason == INVALID_TOKEN and len(info.value.detail) <= 203
    from pusherd.core.tokens import verify_publish_token
    publisher = jwt.encode({"exp": NOW + 60, "publish": ["a:*"]}, SECRET, algorithm="HS256", headers={"crit": crit})
    with pytest.raises(AuthError):
        verify_publish_token(publisher, [SECRET], now=NOW)


# --- socket-level tokens -------------------------------------------------------------------------

def test_socket_token_from_connect_params_or_the_auth_token():
    from pusherd.core.tokens import socket_token
    assert socket_token({}) == (None, None)
    assert socket_token({"guardian_token": "g", "csrf_token": "c"}) == ("g", "c")
    assert socket_token({"token": "t"}) == ("t", None)
    assert socket_token({"guardian_token": "g", "token": "t"}) == ("g", None)   # Guardian's name first
    assert socket_token({"guardian_token": "g", "csrf_token": "c"}, auth_token="a") == ("a", "c")


@pytest.mark.parametrize("protocols,token", [
    (["phoenix"], None),
    ([], None),
    (["phoenix", "base64url.bearer.phx." + base64.b64encode(b"a.b.c").decode().rstrip("=")], "a.b.c"),
    (["phoenix", "base64url.bearer.phx." + base64.urlsafe_b64encode(b"x?y>z").decode().rstrip("=")], "x?y>z"),
    (["phoenix", "base64url.bearer.phx.%%%"], ""),                 # not Base64: no usable token
    (["phoenix", "base64url.bearer.phx." + base64.b64encode("é".encode()).decode()], ""),   # not ASCII
    (["phoenix", "base64url.bearer.phx." + "A" * 40000], ""),     # absurdly long
])
def test_auth_token_from_subprotocols(protocols, token):
    from pusherd.core.tokens import auth_token_from_subprotocols
    assert auth_token_from_subprotocols(protocols) == token


@pytest.mark.parametrize("claim", ["listen", "publish"])
@pytest.mark.parametrize("value", [["deploys:*", 1], [["deploys:*"]], [{"p": "deploys:*"}], [True], [None],
                                   "deploys:*", {"deploys:*": 1}, 7])
def test_a_pattern_claim_not_a_list_of_strings_is_refused_after_a_good_one_was_compiled(verifier, claim, value):
    """The compiled lists are kept by their text (tokens._PATTERNS): a list found there is one of
    strings; anything else is checked and refused, whatever was compiled before."""
    good = verifier.verify(rails_token(**{claim: ("deploys:*",)}), CSRF, now=NOW)
    assert [p.text for p in getattr(good, claim)] == ["deploys:*"]
    claims = rails_claims()
    claims[claim] = value
    error = refused(verifier, signed({"alg": "HS256"}, claims, SECRET), INVALID_TOKEN)
    assert "must be a list of strings" in error.detail

"""Join tokens against a real pusherd: mutations, expiry on open sockets, key rotation, RS256/ES256.

Rows of docs/security.md, table "Tokens".
"""

import base64
import hashlib
import json
import time

import jwt
import pytest

from pusherd.core.rails_csrf import mask
from pusherd.core.tokens import s_csrf
from pusherd.client import mint_token
from sec_helpers import GUARDIAN_SECRET, rails_token

pytestmark = pytest.mark.integration

CSRF = "csrf-token-from-the-page"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**over):
    c = {"aud": "csrf", "sub": {}, "exp": int(time.time()) + 3600, "s_csrf": s_csrf(GUARDIAN_SECRET, CSRF),
         "listen": ["private:room"], "publish": []}
    c.update(over)
    return {k: v for k, v in c.items() if v is not DROP}


DROP = object()


def hs(c, secret=GUARDIAN_SECRET, alg="HS256", headers=None):
    return jwt.encode(c, secret, algorithm=alg, headers=headers)


def unsigned(c, alg="none"):
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return header + "." + b64(json.dumps(c).encode()) + "."


def tamper_payload(token, **over):
    h, p, s = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    data.update(over)
    return h + "." + b64(json.dumps(data).encode()) + "." + s


def flip_signature(token):
    h, p, s = token.split(".")
    s = ("A" if s[0] != "A" else "B") + s[1:]
    return h + "." + p + "." + s


def raw_json_token(payload_text: str, secret=GUARDIAN_SECRET):
    """Sign an arbitrary JSON text (PyJWT would refuse to produce NaN or odd shapes)."""
    import hashlib
    import hmac
    h = b64(b'{"alg":"HS256","typ":"JWT"}')
    p = b64(payload_text.encode())
    sig = hmac.new(secret.encode(), (h + "." + p).encode(), hashlib.sha256).digest()
    return h + "." + p + "." + b64(sig)


GOOD = hs(claims())

MUTATIONS = [
    ("alg-none", lambda: unsigned(claims()), "invalid_token"),
    ("alg-None-case", lambda: unsigned(claims(), alg="None"), "invalid_token"),
    ("alg-HS512", lambda: hs(claims(), alg="HS512"), "invalid_token"),
    ("alg-HS384", lambda: hs(claims(), alg="HS384"), "invalid_token"),
    ("other-secret", lambda: hs(claims(), secret="x" * 40), "invalid_token"),
    ("empty-secret-sig", lambda: GOOD.rsplit(".", 1)[0] + ".", "invalid_token"),
    ("signature-flipped", lambda: flip_signature(GOOD), "invalid_token"),
    ("payload-tampered-listen", lambda: tamper_payload(GOOD, listen=["private:*"]), "invalid_token"),
    ("payload-tampered-exp", lambda: tamper_payload(hs(claims(exp=1)), exp=2 ** 40), "invalid_token"),
    ("header-kid-injection", lambda: hs(claims(), secret="attacker", headers={"kid": "../../dev/null"}),
     "invalid_token"),
    ("header-jwk-embedded", lambda: hs(claims(), secret="attacker", headers={"jwk": {"kty": "oct", "k": "YQ"}}),
     "invalid_token"),
    ("exp-missing", lambda: hs(claims(exp=DROP)), "invalid_token"),
    ("exp-non-numeric-string", lambda: hs(claims(exp="soon")), "invalid_token"),
    ("exp-bool", lambda: raw_json_token(json.dumps(claims(exp=True))), "invalid_token"),
    ("exp-nan", lambda: raw_json_token(json.dumps(claims(exp=float("nan")))), "invalid_token"),
    ("exp-infinity", lambda: raw_json_token(json.dumps(claims(exp=float("inf")))), "invalid_token"),
    ("exp-past", lambda: hs(claims(exp=int(time.time()) - 5)), "token_expired"),
    ("nbf-future", lambda: hs(claims(nbf=int(time.time()) + 3600)), "invalid_token"),
    ("iat-future", lambda: hs(claims(iat=int(time.time()) + 3600)), "invalid_token"),
    ("listen-not-list", lambda: hs(claims(listen="private:room")), "invalid_token"),
    ("listen-non-strings", lambda: hs(claims(listen=[1, None])), "invalid_token"),
    ("listen-regex", lambda: hs(claims(listen=["private:.*", "priv.+"])), "forbidden"),
    ("listen-other-topic", lambda: hs(claims(listen=["private:room2"])), "forbidden"),
    ("listen-prefix-without-colon", lambda: hs(claims(listen=["private*", "private:roo*"])), "forbidden"),
    ("aud-csrf-no-s_csrf", lambda: hs(claims(s_csrf=DROP)), "csrf_mismatch"),
    ("s_csrf-from-other-csrf", lambda: hs(claims(s_csrf=s_csrf(GUARDIAN_SECRET, "other"))), "csrf_mismatch"),
    ("s_csrf-not-string", lambda: hs(claims(s_csrf=5)), "csrf_mismatch"),
    ("claims-array", lambda: raw_json_token("[1,2,3]"), "invalid_token"),
    ("claims-not-json", lambda: raw_json_token("{nope"), "invalid_token"),
    ("two-parts", lambda: ".".join(GOOD.split(".")[:2]), "invalid_token"),
    ("four-parts", lambda: GOOD + ".x", "invalid_token"),
    ("whitespace-around", lambda: " " + GOOD + " ", "invalid_token"),
    ("bad-base64", lambda: "!!!." + GOOD.split(".", 1)[1], "invalid_token"),
    ("token-too-long", lambda: hs(claims(pad="x" * 20000)), "invalid_token"),
    ("token-int", lambda: 12345, "invalid_token"),
    ("token-list", lambda: [GOOD], "invalid_token"),
    ("token-object", lambda: {"token": GOOD}, "invalid_token"),
    ("token-empty", lambda: "", "invalid_token"),
    ("token-null", lambda: None, "authentication_required"),
]


@pytest.mark.parametrize("make,reason", [pytest.param(m, r, id=i) for i, m, r in MUTATIONS])
def test_token_mutations_are_refused(pusherd_server, phx_connect, make, reason):
    c = phx_connect(pusherd_server.ws_url)
    payload = {"guardian_token": make(), "csrf_token": CSRF}
    assert c.join("private:room", payload)[:2] == ("error", {"reason": reason})
    # The same socket with the genuine token: the refusal was about the token, nothing else.
    assert c.join("private:room", {"guardian_token": GOOD, "csrf_token": CSRF})[:2] == ("ok", {})


def test_csrf_token_wrong_type(pusherd_server, phx_connect):
    c = phx_connect(pusherd_server.ws_url)
    for csrf in (5, None, ["x"], {"a": 1}, ""):
        assert c.join("private:room", {"guardian_token": GOOD, "csrf_token": csrf})[:2] == \
            ("error", {"reason": "csrf_mismatch"})


RAILS_VALUE = hashlib.sha256(b"this session's global csrf token").digest()   # what its masked tokens unmask to
RAILS_MASKED = mask(RAILS_VALUE, bytes(range(32)))                           # URL-safe, 86 characters
assert RAILS_MASKED.endswith("A") and RAILS_MASKED.count("-") == 2


def one_char_changed(text, index):
    return text[:index] + ("B" if text[index] == "A" else "A") + text[index + 1:]


HOSTILE_MASKED = [
    ("another-session", mask(hashlib.sha256(b"another session").digest(), bytes(range(32)))),
    ("changed-in-pad", one_char_changed(RAILS_MASKED, 5)),
    ("changed-in-masked-bytes", one_char_changed(RAILS_MASKED, 70)),
    ("spare-bits-set", RAILS_MASKED[:85] + "B"),      # it ends in "A": the 4 bits Base64 ignores, set
    ("mixed-alphabets", RAILS_MASKED.replace("-", "+", 1)),     # it has two "-"
    ("truncated", RAILS_MASKED[:85]),
    ("padded-wrong", RAILS_MASKED + "A="),
    ("the-value-unmasked", base64.b64encode(RAILS_VALUE).decode()),
    ("non-ascii", RAILS_MASKED[:85] + "\u00e9"),
]


def test_rails_masked_csrf_tokens(pusherd_server, phx_connect):
    """Rails' masked authenticity token: any mask of the session's value joins (both Base64 forms);
    another session's, a changed or a malformed one is an ordinary ``csrf_mismatch``."""
    token = hs(claims(s_csrf=s_csrf(GUARDIAN_SECRET, RAILS_VALUE)))
    assert len({masked for _, masked in HOSTILE_MASKED} | {RAILS_MASKED}) == len(HOSTILE_MASKED) + 1
    c = phx_connect(pusherd_server.ws_url)
    for name, masked in HOSTILE_MASKED:
        assert c.join("private:room", {"guardian_token": token, "csrf_token": masked})[:2] == \
            ("error", {"reason": "csrf_mismatch"}), name
    assert c.join("private:room", {"guardian_token": token, "csrf_token": RAILS_MASKED})[:2] == ("ok", {})
    for pad in (bytes(range(32)), bytes(32), b"\xff" * 32):
        for urlsafe in (True, False):
            genuine = phx_connect(pusherd_server.ws_url)
            assert genuine.join("private:room", {"guardian_token": token,
                                                 "csrf_token": mask(RAILS_VALUE, pad, urlsafe=urlsafe)})[:2] == \
                ("ok", {})
    assert "Traceback" not in pusherd_server.log()


def test_lone_surrogate_csrf_token_is_an_ordinary_refusal(pusherd_server, phx_connect):
    """``"csrf_token": "\\ud800"`` is valid JSON that no UTF-8 text holds: refused as a mismatch,
    on a socket that stays open, without a traceback in the log."""
    c = phx_connect(pusherd_server.ws_url)
    c.send_raw('["1","1","private:room","phx_join",{"guardian_token":"%s","csrf_token":"\\ud800"}]' % GOOD)
    reply = c.expect(topic="private:room", event="phx_reply", ref="1")
    assert reply["payload"] == {"status": "error", "response": {"reason": "csrf_mismatch"}}
    assert c.join("private:room", {"guardian_token": GOOD, "csrf_token": CSRF})[:2] == ("ok", {})
    assert "Traceback" not in pusherd_server.log() and "UnicodeEncodeError" not in pusherd_server.log()


def test_expired_token_ends_the_channel_on_an_open_socket(pusherd_server, phx_connect):
    token, csrf = rails_token(listen=["private:expiring"], ttl=2)
    c = phx_connect(pusherd_server.ws_url)
    status, _, join_ref = c.join("private:expiring", {"guardian_token": token, "csrf_token": csrf})
    assert status == "ok"
    # The same token also joins a public topic: that channel has no reason to end.
    assert c.join("public:expiring", {"guardian_token": token, "csrf_token": csrf})[0] == "ok"
    pusherd_server.publish("private:expiring", "before", {})
    c.expect(event="before")
    closed = c.expect(event="phx_close", topic="private:expiring", timeout=8)  # ttl 2 s + sweep every 2 s
    assert closed["join_ref"] == join_ref
    pusherd_server.wait_log("topic=private:expiring reason=token_expired")
    pusherd_server.publish("private:expiring", "after", {})
    pusherd_server.publish("public:expiring", "public-after", {})
    assert c.expect(event="public-after")["topic"] == "public:expiring"
    c.assert_silent(0.3)  # nothing from the private topic
    # ... and the expired token cannot join again.
    assert c.join("private:expiring", {"guardian_token": token, "csrf_token": csrf})[:2] == \
        ("error", {"reason": "token_expired"})


def test_push_after_expiry_is_refused(pusherd_server, phx_connect):
    token, csrf = rails_token(listen=["private:pushexp"], publish=["private:pushexp"], ttl=2)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    c = phx_connect(pusherd_server.ws_url)
    observer = phx_connect(pusherd_server.ws_url)
    _, _, join_ref = c.join("private:pushexp", {"guardian_token": token, "csrf_token": csrf})
    observer.join("private:pushexp", {"guardian_token": token, "csrf_token": csrf})
    assert c.push("private:pushexp", "msg", {"n": 1}, join_ref) == ("ok", {})
    assert observer.expect(event="msg")["payload"] == {"n": 1}
    time.sleep(max(0.0, exp + 0.05 - time.time()))  # just past exp
    c.send(join_ref, "77", "private:pushexp", "msg", {"n": 2})
    reply = c.expect(event="phx_reply", ref="77")
    # Before the sweep the push finds the expired channel; after it, no channel at all.
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["response"]["reason"] in ("token_expired", "unmatched topic")
    assert c.expect(event="phx_close", topic="private:pushexp", timeout=5)["join_ref"] == join_ref
    observer.expect(event="phx_close", topic="private:pushexp", timeout=5)
    observer.assert_silent(0.3)  # the second push went nowhere


# --- keys: rotation, RS256/ES256, key confusion ------------------------------------------------

def test_secret_rotation(pusherd_factory, phx_connect):
    new, old = "new-guardian-secret-0123456789abcdef", GUARDIAN_SECRET
    d = pusherd_factory({"guardian_secret": [new, old]})
    c = phx_connect(d.ws_url)
    for i, secret in enumerate((new, old)):
        token = mint_token(secret, listen=["private:rot"], csrf_token=CSRF)
        assert c.join("private:rot", {"guardian_token": token, "csrf_token": CSRF})[0] == "ok", secret
    stale = mint_token("retired-secret-0123456789abcdefghij", listen=["private:rot"], csrf_token=CSRF)
    assert c.join("private:rot", {"guardian_token": stale, "csrf_token": CSRF})[:2] == \
        ("error", {"reason": "invalid_token"})
    # s_csrf keyed by one secret, signature by another: refused.
    mixed = jwt.encode(dict(claims(listen=["private:rot"]), s_csrf=s_csrf(old, CSRF)), new, algorithm="HS256")
    assert c.join("private:rot", {"guardian_token": mixed, "csrf_token": CSRF})[:2] == \
        ("error", {"reason": "csrf_mismatch"})


def _keypair(kind):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    key = rsa.generate_private_key(65537, 2048) if kind == "RS256" else ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_asymmetric_keys_end_to_end(pusherd_factory, phx_connect, alg, tmp_path):
    private, public = _keypair(alg)
    other_private, _ = _keypair(alg)
    key_file = tmp_path / "public.pem"
    key_file.write_text(public)
    # production: no development fallback secret, so there is really no guardian_secret at all
    d = pusherd_factory({"guardian_algorithm": alg, "guardian_public_key_file": str(key_file),
                         "guardian_secret": None}, env="production")
    c = phx_connect(d.ws_url)

    def join(token, csrf=None):
        return c.join("private:asym", {"guardian_token": token, "csrf_token": csrf})[:2]

    good = mint_token("", listen=["private:asym"], algorithm=alg, private_key=private)
    assert join(good) == ("ok", {})
    d.publish("private:asym", "hello", {"alg": alg})
    assert c.expect(event="hello")["payload"] == {"alg": alg}
    # Signed by another key pair.
    assert join(mint_token("", listen=["private:asym"], algorithm=alg, private_key=other_private)) == \
        ("error", {"reason": "invalid_token"})
    # Key confusion: an HS256 token whose HMAC key is the public PEM (anyone has it).
    confused = raw_json_token(json.dumps(claims(aud=DROP, s_csrf=DROP, listen=["private:asym"])), secret=public)
    assert join(confused) == ("error", {"reason": "invalid_token"})
    # alg none, and the shared-secret HS256 token of the test config: both refused.
    assert join(unsigned(claims(aud=DROP, s_csrf=DROP, listen=["private:asym"]))) == \
        ("error", {"reason": "invalid_token"})
    assert join(hs(claims(listen=["private:asym"])), CSRF) == ("error", {"reason": "invalid_token"})
    # aud csrf without any guardian_secret to key the HMAC: refused rather than unchecked.
    with_csrf = jwt.encode(dict(claims(listen=["private:asym"])), private, algorithm=alg)
    assert join(with_csrf, CSRF) == ("error", {"reason": "csrf_mismatch"})


def test_asymmetric_with_csrf_secret(pusherd_factory, phx_connect):
    private, public = _keypair("ES256")
    d = pusherd_factory({"guardian_algorithm": "ES256", "guardian_public_key": public,
                         "guardian_secret": "csrf-hmac-secret-0123456789abcdefgh"})
    c = phx_connect(d.ws_url)
    token = mint_token("csrf-hmac-secret-0123456789abcdefgh", listen=["private:es"], csrf_token=CSRF,
                       algorithm="ES256", private_key=private)
    assert c.join("private:es", {"guardian_token": token, "csrf_token": CSRF})[:2] == ("ok", {})
    assert c.join("private:es", {"guardian_token": token, "csrf_token": "forged"})[:2] == \
        ("error", {"reason": "csrf_mismatch"})

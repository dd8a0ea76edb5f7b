"""pusherd.core.rails_csrf: unmasking Rails' masked authenticity tokens, and nothing else.

The vectors come from Rails itself (Debian's actionpack 6.1.7.10), printed by:

    ruby -raction_controller -e '
      c = ActionController::Base.new
      s = { _csrf_token: Base64.strict_encode64((0...32).map { |i| i * 7 % 256 }.pack("C*")) }
      puts c.send(:global_csrf_token, s).unpack1("H*")
      ActionController::Base.urlsafe_csrf_tokens = false; puts c.send(:masked_authenticity_token, s)
      ActionController::Base.urlsafe_csrf_tokens = true;  puts c.send(:masked_authenticity_token, s)'

tests/integration/test_rails_guide.py checks the same against Rails' form_authenticity_token live.
"""

import base64
import hashlib
import hmac

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pusherd.core.rails_csrf import mask, unmask

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STORED = bytes(i * 7 % 256 for i in range(32))          # what session[:_csrf_token] decodes to
GLOBAL = bytes.fromhex("93ad6614d824910483cc2d3c58ab60f6a6e1c9efea7491bb3fbc737a3054b8ab")
STRICT = "JLmjWp78FGC3LE04dKuAXoqmwKoXs8z1xIMq+y6Xv/i3FMVORtiFZDTgYAQsAOCoLEcJRf3HXU77P1mBHsMHUw=="
URLSAFE = "yiYYVUguiYv4309v8lXhNjHvHWgs-cvRXRm8is34NuJZi35BkAoYj3sTYlOq_oHAlw7Uh8aNWmpipc_w_ayOSQ"


def test_the_global_token_is_the_hmac_of_the_stored_one():
    # Rails 6.1+: csrf_token_hmac(session, "!real_csrf_token"); the vectors below unmask to it
    assert hmac.new(STORED, b"!real_csrf_token", hashlib.sha256).digest() == GLOBAL


@pytest.mark.parametrize("masked", [STRICT, URLSAFE], ids=["strict-base64", "urlsafe-no-padding"])
def test_rails_vectors_unmask_to_the_global_token(masked):
    assert unmask(masked) == GLOBAL


def test_both_alphabets_padded_or_not_are_read_as_rails_reads_them():
    raw = base64.b64decode(STRICT)
    forms = {
        base64.b64encode(raw).decode(),                       # strict (Rails < 7.1 by default)
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),   # urlsafe_csrf_tokens (always from 7.1)
    }
    assert len(forms) == 4  # the vector has + and /: the alphabets really differ
    assert {unmask(form) for form in forms} == {GLOBAL}


def test_each_mask_differs_but_unmasks_to_the_same_value():
    pads = [bytes([n]) * 32 for n in (1, 2, 3)]
    masked = [mask(GLOBAL, pad, urlsafe=urlsafe) for pad in pads for urlsafe in (True, False)]
    assert len(set(masked)) == len(masked)
    assert {unmask(m) for m in masked} == {GLOBAL}


def test_a_token_of_another_session_unmasks_to_another_value():
    other = mask(bytes(32), bytes(range(32)))
    assert unmask(other) == bytes(32) != GLOBAL


def flip(text: str, index: int) -> str:
    """Change one Base64 character to another of the same alphabet."""
    char = text[index]
    return text[:index] + ("B" if char == "A" else "A") + text[index + 1:]


@pytest.mark.parametrize("index", [0, 31, 43, 44, 60, 84])
def test_a_changed_character_changes_the_value_or_is_refused(index):
    assert unmask(flip(URLSAFE, index)) != GLOBAL
    assert unmask(flip(STRICT, index)) != GLOBAL


MALFORMED = {
    "empty": "",
    "rails-4.1-unmasked-token": base64.b64encode(STORED).decode(),          # 44 characters, 32 bytes
    "one-character-short": URLSAFE[:85],
    "one-character-long": URLSAFE + "A",
    "89-characters": STRICT + "A",
    "88-without-padding": URLSAFE + "AA",
    "padding-inside": STRICT[:40] + "==" + STRICT[42:86],
    "one-equals-sign": STRICT[:86] + "A=",
    "bad-character": URLSAFE[:10] + "!" + URLSAFE[11:],
    "space": URLSAFE[:10] + " " + URLSAFE[11:],
    "newline": URLSAFE[:85] + "\n",
    "nul": URLSAFE[:85] + "\x00",
    "mixed-alphabets": STRICT.replace("+", "-", 1),
    "non-canonical-spare-bits": URLSAFE[:85] + "R",      # the last character's 4 spare bits set
    "non-ascii-letter": URLSAFE[:85] + "é",
    "fullwidth-digit": URLSAFE[:85] + "\uff11",
    "lone-surrogate": URLSAFE[:85] + "\ud800",
    "astral-character": URLSAFE[:85] + "\U0001f600",
    "a-jwt-shaped-string": "a" * 40 + "." + "b" * 45,
    "long": "A" * 100000,
}


@pytest.mark.parametrize("text", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_tokens_are_none(text):
    assert unmask(text) is None


def test_the_spare_bits_case_really_is_only_non_canonical():
    # "R" differs from the canonical last character only in bits Base64 ignores
    assert base64.urlsafe_b64decode(MALFORMED["non-canonical-spare-bits"] + "==") == \
        base64.urlsafe_b64decode(URLSAFE + "==")


@pytest.mark.parametrize("value", [None, 1, 1.5, True, b"x" * 88, STRICT.encode(), [STRICT], {"t": STRICT}])
def test_non_strings_are_none(value):
    assert unmask(value) is None


@SETTINGS
@given(st.text(max_size=120))
def test_arbitrary_text_never_raises(text):
    result = unmask(text)
    assert result is None or len(result) == 32


@SETTINGS
@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=", min_size=84,
               max_size=90))
def test_arbitrary_base64ish_text_never_raises(text):
    result = unmask(text)
    assert result is None or len(result) == 32


@SETTINGS
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32), st.booleans())
def test_mask_then_unmask_round_trips(value, pad, urlsafe):
    masked = mask(value, pad, urlsafe=urlsafe)
    assert len(masked) == (86 if urlsafe else 88)
    assert unmask(masked) == value


@pytest.mark.parametrize("value, pad", [(bytes(31), bytes(32)), (bytes(32), bytes(33)), (b"", b"")])
def test_mask_refuses_other_sizes(value, pad):
    with pytest.raises(ValueError):
        mask(value, pad)

"""Rails' masked authenticity tokens (``form_authenticity_token``, ``<meta name="csrf-token">``).

Rails 4.2 and later print ``Base64(pad + (pad XOR value))``, with a fresh random 32-byte pad on
every call (against BREACH), so the text differs on every render while ``value`` stays the same
for the session (actionpack's ``ActionController::RequestForgeryProtection``, ``mask_token``):

- Rails 6.1+: ``value`` is the "global" token ``HMAC-SHA256(stored, "!real_csrf_token")``, where
  ``stored`` is the session's token (decoded from ``session[:_csrf_token]``); 4.2-6.0: ``stored``
  itself. Either way it is what Rails' own ``unmask_token`` returns for this session.
- The Base64 is strict, with padding (88 characters: Rails before 7.1 without
  ``urlsafe_csrf_tokens``) or URL-safe without padding (86: ``urlsafe_csrf_tokens``, the default
  of 6.1's new-app defaults and always from 7.1). Rails decodes either alphabet, padded or not.

Rails 4.0/4.1 print the stored token unmasked (44 characters); that is not a masked token here.
Pure: no I/O, nothing secret is compared (the caller compares the HMAC of what this returns).
"""

import base64
import binascii
from typing import Optional

TOKEN_BYTES = 32                              # Rails' AUTHENTICITY_TOKEN_LENGTH
MASKED_BYTES = 2 * TOKEN_BYTES
_MASKED_LENGTHS = (86, 88)                    # 64 bytes in Base64 without / with its "==" padding
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def unmask(masked: object) -> Optional[bytes]:
    """The 32 bytes a masked token stands for, or None for anything that is not one.

    Accepted: 64 bytes in canonical Base64, standard or URL-safe alphabet (not mixed), with or
    without padding, as Rails prints them. Never raises: client input that is not a string, has
    another length, non-ASCII characters or lone surrogates, bad or non-canonical Base64 gives None.
    """
    if not isinstance(masked, str) or len(masked) not in _MASKED_LENGTHS or not masked.isascii():
        return None
    unpadded = masked[:86]
    if len(masked) == 88 and masked[86:] != "==":
        return None
    try:
        raw = base64.b64decode(unpadded.translate(_URLSAFE_TO_STANDARD) + "==", validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != MASKED_BYTES:
        return None
    # Canonical only: one text per byte string (the last character's 4 spare bits must be zero,
    # and one alphabet throughout), so a changed character never decodes to the same bytes.
    if unpadded not in (base64.b64encode(raw)[:86].decode("ascii"),
                        base64.urlsafe_b64encode(raw)[:86].decode("ascii")):
        return None
    pad, encrypted = raw[:TOKEN_BYTES], raw[TOKEN_BYTES:]
    return (int.from_bytes(pad, "big") ^ int.from_bytes(encrypted, "big")).to_bytes(TOKEN_BYTES, "big")


def mask(value: bytes, pad: bytes, urlsafe: bool = True) -> str:
    """Mask `value` with `pad` as Rails' ``mask_token`` does (for tests and Python backends).

    The pad comes in as a parameter (this module has no randomness): use ``os.urandom(32)``.
    """
    if len(value) != TOKEN_BYTES or len(pad) != TOKEN_BYTES:
        raise ValueError("Rails masks 32-byte tokens with a 32-byte pad")
    encrypted = (int.from_bytes(pad, "big") ^ int.from_bytes(value, "big")).to_bytes(TOKEN_BYTES, "big")
    if urlsafe:
        return base64.urlsafe_b64encode(pad + encrypted).rstrip(b"=").decode("ascii")
    return base64.b64encode(pad + encrypted).decode("ascii")

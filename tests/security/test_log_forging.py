"""Logs cannot be forged: client-controlled text in a log line is escaped and bounded
(docs/security.md, "Logs"). The daemon's stderr is what journald or a file would store."""

import time

import jwt
import pytest

from pusherd_testing import GUARDIAN_SECRET
from sec_helpers import still_serving

pytestmark = pytest.mark.integration

FAKE = "2030-01-01 00:00:00.000 ERROR pusherd: FORGED"


def test_refused_join_cannot_inject_a_log_line(pusherd_server, phx_connect):
    """A topic carrying a newline and a fake log line, or ANSI escapes, is refused and logged escaped."""
    c = phx_connect(pusherd_server.ws_url)
    for topic in ("private:x\n" + FAKE, "private:\x1b[2J\x1b[31mred", "private:\u202eevil", "private:nul\x00"):
        assert c.join(topic)[:2] == ("error", {"reason": "invalid_topic"})
    pusherd_server.wait_log("private:x\\n" + FAKE)            # the line is there, escaped
    for line in pusherd_server.lines:
        assert not line.startswith(FAKE) and "FORGED" not in line.split("\\n")[0]
        assert "\x1b" not in line and "\u202e" not in line and "\x00" not in line
    assert still_serving(pusherd_server)


def test_library_error_text_is_bounded(pusherd_server, phx_connect):
    """A token's 3 KB header reaches the log line of its refusal bounded (PyJWT >= 2.10 quotes a
    ``crit`` list whole in its error; pusherd refuses ``crit`` on every PyJWT)."""
    claims = {"exp": int(time.time()) + 60, "listen": ["private:room"]}
    token = jwt.encode(claims, GUARDIAN_SECRET, algorithm="HS256", headers={"crit": ["x" * 3000]})
    c = phx_connect(pusherd_server.ws_url)
    assert c.join("private:room", {"guardian_token": token})[:2] == ("error", {"reason": "invalid_token"})
    line = pusherd_server.wait_log("join refused topic=private:room reason=invalid_token")
    assert len(line) < 600 and "x" * 300 not in line

"""Hostile input on presence topics against a real pusherd (docs/security.md, "Presence"): keys and
metas pusherd will not list (prototype names that crash phoenix.js 1.2-1.5, oversized, not
scalar, lone surrogates), a topic at its limit, and a member that tries to forge the list."""

import json

import jwt
import pytest

from presence_testing import Page
from pusherd_testing import GUARDIAN_SECRET, ISSUER, PhxClient

pytestmark = pytest.mark.integration

PRESENCE = [{"topics": "private:*", "key": "id", "meta": ["name"], "limit": 4}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon for the module: each test has topics of its own."""
    from pusherd_testing import Pusherd
    d = Pusherd(tmp_path_factory.mktemp("presence"), {"presence": PRESENCE, "client_events": ["*"],
                                                      "drain_seconds": 0.2}).start()
    yield d
    d.stop()


def raw_token(sub, csrf="c"):
    """A token whose sub is written verbatim (lone surrogates, huge numbers), as Rails could sign it."""
    from pusherd.core.tokens import s_csrf
    import time
    claims = {"sub": sub, "exp": int(time.time()) + 3600, "listen": ["private:*"], "publish": [], "iss": ISSUER,
              "aud": "csrf", "s_csrf": s_csrf(GUARDIAN_SECRET, csrf)}
    return jwt.encode(claims, GUARDIAN_SECRET, algorithm="HS256"), csrf


HOSTILE_SUBS = {
    "proto-key": {"id": "__proto__"},
    "constructor-key": {"id": "constructor"},
    "tostring-key": {"id": "toString"},
    "long-key": {"id": "k" * 300},
    "control-key": {"id": "a\u0000b"},
    "lone-surrogate-key": {"id": "\ud800"},
    "float-key": {"id": 1.5},
    "bool-key": {"id": True},
    "object-key": {"id": {"id": 1}},
    "huge-int-key": {"id": 2 ** 70},
    "object-meta": {"id": 50, "name": {"html": "<b>"}},
    "list-meta": {"id": 51, "name": ["a"]},
    "big-meta": {"id": 52, "name": "x" * 2000},
    "lone-surrogate-meta": {"id": 53, "name": "\udfff"},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_SUBS))
def test_keys_and_metas_that_pusherd_will_not_list(daemon, case):
    topic = "private:hostile-" + case
    honest = Page(daemon, topic, {"id": 1, "name": "Honest"})
    honest.wait({"1": 1})
    token, csrf = raw_token(HOSTILE_SUBS[case])
    hostile = PhxClient(daemon.ws_url)
    status, response, _ = hostile.join(topic, {"guardian_token": token, "csrf_token": csrf})
    assert status == "ok", response                      # joined, and sent the list ...
    assert list(hostile.expect(event="presence_state")["payload"]) == ["1"]
    honest.pump(timeout=0.3)
    assert honest.counts() == {"1": 1}                   # ... but never on it
    later = Page(daemon, topic, {"id": 2, "name": "Later"})
    later.wait({"1": 1, "2": 1})
    reason = "bad_meta" if case.endswith("-meta") else "bad_key"
    daemon.wait_log("not listed on %s: %s" % (topic, reason))
    for client in (honest.client, hostile, later.client):
        client.close()


def test_a_topic_at_its_limit_lists_no_one_more_until_someone_leaves(daemon):
    pages = [Page(daemon, "private:ops", {"id": i, "name": "n%d" % i}) for i in range(4)]
    pages[0].wait({str(i): 1 for i in range(4)})
    extra = [Page(daemon, "private:ops", {"id": 10 + i, "name": "x"}) for i in range(3)]
    for page in extra:
        page.wait({str(i): 1 for i in range(4)})         # they see the list, they are not on it
    pages[0].wait({str(i): 1 for i in range(4)})
    line = daemon.wait_log("join(s) not listed: topic private:ops holds its limit of 4 entries")
    assert sum("holds its limit" in l for l in daemon.lines) == 1, line      # one line, not one per join
    pages[3].close()
    pages[0].wait({str(i): 1 for i in range(3)})
    newcomer = Page(daemon, "private:ops", {"id": 20, "name": "new"})
    newcomer.wait({"0": 1, "1": 1, "2": 1, "20": 1})


def test_a_member_cannot_forge_the_list(daemon):
    honest = Page(daemon, "private:forge", {"id": 1, "name": "Honest"})
    mallory = Page(daemon, "private:forge", {"id": 2, "name": "Mallory"})
    honest.wait({"1": 1, "2": 1})
    forged = {"joins": {"666": {"metas": [{"phx_ref": "f"}]}}, "leaves": {"1": {"metas": [{"phx_ref": "x"}]}}}
    for event in ("presence_diff", "presence_state"):
        assert mallory.client.push("private:forge", event, forged, join_ref=mallory.join_ref) == \
            ("error", {"reason": "invalid_event"})
    status, body = daemon.publish("private:forge", "presence_diff", forged)
    assert status == 400 and "reserve" in body["error"]
    honest.pump(timeout=0.3)
    assert honest.counts() == {"1": 1, "2": 1}
    assert not any(json.dumps(f).count("666") for f in honest.frames)

"""Presence against a real pusherd (one process, memory broker): presence_state after the join
reply, coalesced diffs, every way a member leaves (leave, close, token expiry, slow-consumer
eviction), what anonymous joiners and malformed tokens get, GET /presence for Rails, the CLI, the
Python client and the metrics."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from pusherd import client as pusherd_client
from pusherd.client import mint_publish_token
from presence_testing import Page
from pusherd_testing import PUBLISH_SECRET, ROOT, RawWS, free_port, rails_token

pytestmark = pytest.mark.integration

PRESENCE = [{"topics": "private:*", "key": "id", "meta": ["name"]}, {"topics": "public:room:*", "key": "id"}]
AUTH = {"Authorization": "Bearer " + PUBLISH_SECRET}


def test_the_list_follows_the_reply_and_every_change_reaches_every_page(pusherd_factory):
    daemon = pusherd_factory({"presence": PRESENCE})
    ann = Page(daemon, "private:ops", {"id": 1, "name": "Ann", "email": "ann@example.com"})
    ann.pump()
    assert ann.frames[0]["event"] == "presence_state" and ann.frames[0]["payload"] == {}
    assert ann.frames[0]["join_ref"] == ann.join_ref and ann.frames[0]["ref"] is None
    ann.wait({"1": 1})
    meta = next(iter(ann.state["1"].values()))
    assert set(meta) == {"phx_ref", "online_at", "name"} and meta["name"] == "Ann"   # no email
    bob_v1 = Page(daemon, "private:ops", {"id": 2, "name": "Bob"}, vsn="1.0.0")
    bob_v1.wait({"1": 1, "2": 1})
    assert bob_v1.frames[0]["event"] == "presence_state" and list(bob_v1.frames[0]["payload"]) == ["1"]
    bob_tab2 = Page(daemon, "private:ops", {"id": 2, "name": "Bob"})
    for page in (ann, bob_v1, bob_tab2):
        page.wait({"1": 1, "2": 2})
    bob_tab2.close()
    for page in (ann, bob_v1):
        page.wait({"1": 1, "2": 1})
    bob_v1.client.push("private:ops", "phx_leave", {})
    ann.wait({"1": 1})
    # Rails sees it: the very list the pages hold.
    status, body, _ = daemon.request("GET", "/presence?topic=private:ops", headers=AUTH)
    assert status == 200 and {k: len(v["metas"]) for k, v in body.items()} == {"1": 1}
    assert body["1"]["metas"][0] == meta


def test_anonymous_joiners_and_bad_keys_see_the_list_but_are_not_on_it(pusherd_factory):
    daemon = pusherd_factory({"presence": PRESENCE})
    member = Page(daemon, "public:room:1", {"id": 5}, listen=["public:*"])
    member.wait({"5": 1})
    anonymous = Page(daemon, "public:room:1")
    anonymous.wait({"5": 1})
    proto = Page(daemon, "public:room:1", {"id": "__proto__"}, listen=["public:*"])
    nested = Page(daemon, "public:room:1", {"id": {"nested": 1}}, listen=["public:*"])
    for page in (member, anonymous, proto, nested):
        page.wait({"5": 1})
    assert member.counts() == {"5": 1}
    daemon.wait_log("not listed on public:room:1: bad_key (sub field id)")


def test_token_expiry_and_slow_consumer_eviction_are_leaves(pusherd_factory):
    daemon = pusherd_factory({"presence": PRESENCE, "max_outbox_bytes": 65536, "slow_consumer_seconds": 2})
    watcher = Page(daemon, "private:ops", {"id": 1, "name": "W"})
    expiring = Page(daemon, "private:ops", {"id": 2, "name": "E"}, ttl=2)
    token, csrf = rails_token(listen=["private:*"], sub={"id": 3, "name": "Slow"})
    slow = RawWS(daemon.port, rcvbuf=4096)
    slow.send_text(json.dumps(["1", "1", "private:ops", "phx_join", {"guardian_token": token, "csrf_token": csrf}]))
    watcher.wait({"1": 1, "2": 1, "3": 1})
    # The expired channel is closed by the sweep and its member leaves.
    watcher.wait({"1": 1, "3": 1}, timeout=8)
    assert expiring.client.expect(event="phx_close", topic="private:ops", timeout=2)["join_ref"] == expiring.join_ref
    # A socket that stops reading is evicted: its member leaves too.
    blob = "x" * 30000
    deadline = time.monotonic() + 20
    while "3" in watcher.counts():
        assert time.monotonic() < deadline, "the slow consumer was never evicted"
        assert daemon.publish("private:ops", "blob", {"b": blob})[0] == 200
        watcher.pump(timeout=0.02)
    assert watcher.counts() == {"1": 1}
    slow.close()


def test_get_presence_for_rails_the_cli_and_the_python_client(pusherd_factory):
    daemon = pusherd_factory({"presence": PRESENCE})
    page = Page(daemon, "private:ops", {"id": 7, "name": "Seven"})
    page.wait({"7": 1})
    url = daemon.http_url
    # Credentials as for /publish: none, wrong, a token for another topic, a token for this one.
    assert daemon.request("GET", "/presence?topic=private:ops")[0] == 401
    assert daemon.request("GET", "/presence?topic=private:ops", headers={"Authorization": "Bearer nope"})[0] == 401
    other = mint_publish_token(PUBLISH_SECRET, ["private:other"])
    status, body, _ = daemon.request("GET", "/presence?topic=private:ops", headers={"Authorization": "Bearer " + other})
    assert (status, body) == (403, {"error": "token does not allow 'private:ops'"})
    mine = mint_publish_token(PUBLISH_SECRET, ["private:*"])
    status, body, _ = daemon.request("GET", "/presence?topic=private:ops", headers={"Authorization": "Bearer " + mine})
    assert status == 200 and list(body) == ["7"] and body["7"]["metas"][0]["name"] == "Seven"
    # Not a presence topic, not a topic, no topic.
    assert daemon.request("GET", "/presence?topic=deploys:web", headers=AUTH)[0] == 404
    for query in ("", "?topic=", "?topic=a%20b", "?topic=" + "x" * 300):
        status, body, _ = daemon.request("GET", "/presence" + query, headers=AUTH)
        assert status == 400 and "topic" in body["error"], (query, body)
    # A topic nobody is on: an empty list.
    assert daemon.request("GET", "/presence?topic=private:empty", headers=AUTH)[:2] == (200, {})
    # The Python client and the CLI.
    listed = pusherd_client.presence("private:ops", url=url, secret=PUBLISH_SECRET)
    assert list(listed) == ["7"]
    with pytest.raises(pusherd_client.PublishFailed) as failed:
        pusherd_client.presence("deploys:web", url=url, secret=PUBLISH_SECRET)
    assert failed.value.status == 404
    env = dict(os.environ, PYTHONPATH=str(ROOT), PUSHERD_URL=url, PUSHERD_PUBLISH_SECRET=PUBLISH_SECRET)
    done = subprocess.run([sys.executable, "-m", "pusherd", "presence", "private:ops"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == listed
    done = subprocess.run([sys.executable, "-m", "pusherd", "presence", "deploys:web"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "404" in done.stderr and "no presence" in done.stderr


def test_metrics_count_tracked_members(pusherd_factory):
    prometheus_parser = pytest.importorskip("prometheus_client.parser")
    daemon = pusherd_factory({"presence": PRESENCE, "metrics": {"listen": "127.0.0.1:%d" % free_port()}})
    pages = [Page(daemon, "private:ops", {"id": i % 2, "name": "n"}) for i in range(3)]
    anonymous = Page(daemon, "public:room:2")
    for p in pages:
        p.wait({"0": 2, "1": 1})
    with urllib.request.urlopen("http://%s/metrics" % daemon.settings["metrics"]["listen"], timeout=5) as resp:
        text = resp.read().decode()
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("pusherd_presence_tracked", ())] == 3
    assert samples[("pusherd_presence_untracked_total", (("reason", "anonymous"),))] == 1
    assert samples[("pusherd_presence_states_total", ())] == 4
    assert samples[("pusherd_presence_diffs_total", ())] >= 1
    anonymous.close()

"""Interop: presence with the real, unmodified phoenix.js — 1.8's ``new Presence(channel)``
(onSync, onJoin, onLeave, list) and 1.2's static syncState/syncDiff wired by the page — on one
process, and on several processes sharing a real Redis (a process killed, Redis restarted).

Pages join ``private:ops`` with Rails-minted tokens; the members are their ``sub.id``, the metas
show ``sub.name`` (``email`` is in the tokens too, and must never show).
"""

from __future__ import annotations

import signal
import time

import pytest

from pusherd_testing import PUBLISH_SECRET, rails_token

pytestmark = pytest.mark.interop

ORIGIN = "http://localhost:3000"
TOPIC = "private:ops"
PRESENCE = [{"topics": "private:*", "key": "id", "meta": ["name"]}]
FAST = dict(heartbeatIntervalMs=1000, reconnectAfterMs=60000, rejoinAfterMs=60000, timeout=3000)
USERS = {"alice": 101, "bob": 102, "carol": 103, "dave": 104}


def page(phx, daemon, version, user, name=None):
    """A page of `user` on `daemon`, joined to TOPIC with presence (class on 1.4+, static on 1.2)."""
    token, csrf = rails_token(listen=["private:*"], sub={"id": USERS[user], "name": user.title(),
                                                         "email": user + "@example.com"})
    client = phx(version, name=name or "%s-%s" % (user, version))
    client.connect(daemon.ws_url, origin=ORIGIN, **FAST)
    client.expect(type="open")
    client.join("c1", TOPIC, {"guardian_token": token, "csrf_token": csrf},
                presence="static" if version == "1.2" else "class")
    assert client.expect(type="join", id="c1")["status"] == "ok"
    return client


def listed(client):
    """{user name: number of metas} as the page's phoenix.js lists them (checks every meta's shape)."""
    out = {}
    for item in client.presence_list("c1"):
        names = {m.get("name") for m in item["metas"]}
        assert len(names) == 1, item
        for meta in item["metas"]:
            assert set(meta) == {"phx_ref", "online_at", "name"}, meta   # email is never shown
            assert meta["online_at"].isdigit()
        refs = [m["phx_ref"] for m in item["metas"]]
        assert len(set(refs)) == len(refs), item
        assert item["key"] == str(USERS[names.pop().lower()]), item
        out[item["metas"][0]["name"].lower()] = len(item["metas"])
    return out


def wait_lists(clients, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        seen = [listed(c) for c in clients]
        if all(s == expected for s in seen):
            return
        if time.monotonic() > deadline:
            raise AssertionError("lists %r, expected %r on every page\n%s" % (
                seen, expected, "\n".join(c.transcript(40) for c in clients)))
        time.sleep(0.05)


def presence_diffs(client):
    return [l for l in client.lines if l.get("type") == "event" and l.get("event") == "presence_diff"]


def test_phoenix_presence_lists_every_user_once_with_a_meta_per_tab(pusherd_factory, phx):
    daemon = pusherd_factory({"presence": PRESENCE})
    alice_tab1 = page(phx, daemon, "1.8", "alice", "alice-tab1")
    alice_tab2 = page(phx, daemon, "1.2", "alice", "alice-tab2")
    bob = page(phx, daemon, "1.8", "bob")
    carol = page(phx, daemon, "1.2", "carol")
    pages = [alice_tab1, alice_tab2, bob, carol]
    wait_lists(pages, {"alice": 2, "bob": 1, "carol": 1})
    # 1.8's callbacks fired as a page expects: carol joined bob's list once.
    assert [l["key"] for l in bob.lines if l.get("type") == "presence_join" and l["key"] == "103"] == ["103"]
    # Rails sees the same list.
    status, body, _ = daemon.request("GET", "/presence?topic=" + TOPIC,
                                     headers={"Authorization": "Bearer " + PUBLISH_SECRET})
    assert status == 200 and {k: len(v["metas"]) for k, v in body.items()} == {"101": 2, "102": 1, "103": 1}

    # A forged presence_diff (or presence_state) from a page is refused and reaches nobody.
    forged = {"joins": {"666": {"metas": [{"phx_ref": "forged", "name": "Mallory"}]}}, "leaves": {}}
    before = {c: len(presence_diffs(c)) for c in pages}
    for event in ("presence_diff", "presence_state"):
        bob.push("c1", event, forged, tag=event)
        reply = bob.expect(type="push_reply", tag=event)
        assert (reply["status"], reply["response"]) == ("error", {"reason": "invalid_event"})
    time.sleep(0.3)
    for c in pages:
        assert len(presence_diffs(c)) == before[c]
        assert listed(c) == {"alice": 2, "bob": 1, "carol": 1}

    # A tab closes: one of alice's metas leaves; her last tab: alice leaves.
    alice_tab2.close()
    wait_lists([alice_tab1, bob, carol], {"alice": 1, "bob": 1, "carol": 1})
    assert [l["key"] for l in bob.lines if l.get("type") == "presence_leave"] == ["101"]
    alice_tab1.disconnect()
    wait_lists([bob, carol], {"bob": 1, "carol": 1})
    # Every change was one diff a page: no page got a diff per socket and per member.
    assert len(presence_diffs(carol)) <= 4, presence_diffs(carol)


def test_a_rejoin_gets_presence_state_again_and_phoenix_18_applies_diffs_after_it(pusherd_factory, phx):
    daemon = pusherd_factory({"presence": PRESENCE})
    bob = page(phx, daemon, "1.8", "bob")
    carol = page(phx, daemon, "1.8", "carol")
    wait_lists([bob, carol], {"bob": 1, "carol": 1})
    # The server restarts the channel (leave and join again on the same socket): the page's
    # Presence waits for the new join's presence_state, which comes, and lists everyone again.
    carol.leave("c1")
    carol.expect(type="leave", id="c1")
    wait_lists([bob], {"bob": 1})
    token, csrf = rails_token(listen=["private:*"], sub={"id": USERS["carol"], "name": "Carol"})
    carol.join("c2", TOPIC, {"guardian_token": token, "csrf_token": csrf}, presence="class")
    rejoined = carol.expect(type="join", id="c2")
    assert rejoined["status"] == "ok"
    state = carol.expect(type="event", id="c2", event="presence_state")   # for the new join_ref
    assert state["join_ref"] == rejoined["join_ref"] and list(state["payload"]) == ["102"]
    deadline = time.monotonic() + 5
    while {i["key"] for i in carol.presence_list("c2")} != {"102", "103"}:
        assert time.monotonic() < deadline, carol.transcript()
        time.sleep(0.05)


def test_presence_across_processes_on_redis_a_killed_process_and_a_redis_restart(
        redis_server, pusherd_factory, phx):
    """Pages on three processes list each other; a process SIGKILLed leaves every list within the
    documented bound (``presence_ttl`` 3 s: at most ttl + ttl/3 after its last heartbeat, plus a
    round trip); Redis restarted (its data lost): the lists end right, and no member that
    stayed ever left a list meanwhile (no storm of leaves and joins)."""
    ttl = 3.0
    cfg = {"broker": redis_server.url, "presence": PRESENCE, "presence_ttl": "3s"}
    a, b, c = pusherd_factory(cfg), pusherd_factory(cfg), pusherd_factory(cfg)
    alice = page(phx, a, "1.8", "alice")
    bob = page(phx, b, "1.2", "bob")
    carol = page(phx, c, "1.8", "carol")
    dave = page(phx, b, "1.8", "dave")
    wait_lists([alice, bob, carol, dave], {"alice": 1, "bob": 1, "carol": 1, "dave": 1})

    killed = time.monotonic()
    c.stop(signal.SIGKILL)
    wait_lists([alice, bob, dave], {"alice": 1, "bob": 1, "dave": 1}, timeout=ttl * 4 / 3 + 3.0)
    print("carol left every list %.1fs after her process was killed" % (time.monotonic() - killed))

    # Redis restarts with nothing in it; meanwhile dave's tab closes on B.
    marks = {p: len(p.lines) for p in (alice, bob)}
    redis_server.kill()
    dave.disconnect()
    wait_lists([bob], {"alice": 1, "bob": 1}, timeout=5)   # B's members hear it at once...
    redis_server.start()
    # ... A's once Redis is back: once A's subscriber has reconnected (its next attempt may be up
    # to the backoff's cap away: brokers/base.backoff_delay), resynchronised, and dropped B's old
    # entries, kept for ttl until B registers again (a sweep every ttl / 3), plus a margin.
    from pusherd.brokers.redis import BACKOFF_CAP
    wait_lists([alice, bob], {"alice": 1, "bob": 1}, timeout=BACKOFF_CAP + ttl * 4 / 3 + 2.0)
    time.sleep(ttl)   # a heartbeat or two after everyone registered again: still right, nothing else moved
    wait_lists([alice, bob], {"alice": 1, "bob": 1}, timeout=1)
    for p, mark in marks.items():
        lists = [l["list"] for l in p.lines[mark:] if l.get("type") == "presence_sync"]
        for synced in lists:
            keys = {item["key"] for item in synced}
            assert {"101", "102"} <= keys, ("a member that stayed left a list during the outage", p.transcript())
    status, body, _ = a.request("GET", "/presence?topic=" + TOPIC, headers={"Authorization": "Bearer " + PUBLISH_SECRET})
    assert status == 200 and sorted(body) == ["101", "102"]


@pytest.mark.parametrize("version", ["1.2", "1.8"])
def test_presence_over_long_poll_lists_and_is_listed(pusherd_factory, phx, version):
    """A page on the long-poll transport lists the WebSocket pages and is on their lists; its
    leave reaches them."""
    daemon = pusherd_factory({"presence": PRESENCE, "drain_seconds": 0.2})
    bob = page(phx, daemon, "1.8", "bob")
    token, csrf = rails_token(listen=["private:*"], sub={"id": USERS["carol"], "name": "Carol"})
    carol = phx(version, env={"PHX_XHR": "1"}, name="carol-longpoll-%s" % version)
    carol.connect(daemon.ws_url, transport="longpoll", origin=ORIGIN, **FAST)
    carol.expect(type="open")
    carol.join("c1", TOPIC, {"guardian_token": token, "csrf_token": csrf},
               presence="static" if version == "1.2" else "class")
    assert carol.expect(type="join", id="c1")["status"] == "ok"
    wait_lists([bob, carol], {"bob": 1, "carol": 1})
    carol.leave("c1")
    wait_lists([bob], {"bob": 1})

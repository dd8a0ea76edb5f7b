"""presence.py: rules, members, the replica, the coalescing window, the limit, and what
phoenix.js (the port in tests/presence_sync.py, checked against the real one in
tests/interop/test_presence_sync.py) ends with after our presence_state and diffs."""

import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from presence_sync import Cluster, canonical, ops_strategy, port_replay, sync_diff, sync_state, wire
from pusherd.core.presence import (
    ANONYMOUS, BAD_KEY, BAD_META, MAX_KEY_CHARS, MAX_META_BYTES, REF_BYTES, TOPIC_FULL,
    DiffBuffer, Entry, Member, NotTracked, PresenceRule, PresenceRules, PresenceState,
    TopicPresence, Tracked, decode_entry, encode_entry, identify, make_diff, new_meta,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000.5


def rand(n: int) -> bytes:
    return n.to_bytes(REF_BYTES, "big")


def meta(ref: str, **fields):
    return dict({"phx_ref": ref, "online_at": "1700000000"}, **fields)


def assert_client_matches(state: PresenceState, steps, dedup_versions=("1.2", "1.8")):
    for version in dedup_versions:
        assert port_replay(version, steps) == wire(state.payload()), version


# --- rules ----------------------------------------------------------------------------------------

def test_first_matching_rule_wins_with_topic_pattern_semantics():
    rules = PresenceRules([PresenceRule("private:room:*", key="id", meta=["name"]),
                           PresenceRule("private:*", key="uid"),
                           PresenceRule("lobby")])
    assert rules.rule_for("private:room:1").key == "id"
    assert rules.rule_for("private:doc:1").key == "uid"
    assert rules.rule_for("lobby").key == "id"
    assert rules.rule_for("lobby:x") is None          # literal text, no wildcard
    assert rules.rule_for("private:") is None         # ":*" needs something after the colon
    assert not PresenceRules() and rules


@pytest.mark.parametrize("kwargs,words", [
    (dict(topics=""), "topics"),
    (dict(topics=None), "topics"),
    (dict(topics="a:*", key=""), "key"),
    (dict(topics="a:*", key=3), "key"),
    (dict(topics="a:*", meta="name"), "meta"),
    (dict(topics="a:*", meta=None), "meta"),
    (dict(topics="a:*", meta=["name", 1]), "meta"),
    (dict(topics="a:*", meta=["name", "name"]), "twice"),
    (dict(topics="a:*", meta=["phx_ref"]), "reserved"),
    (dict(topics="a:*", meta=["online_at"]), "reserved"),
    (dict(topics="a:*", meta=["__proto__"]), "reserved"),
    (dict(topics="a:*", meta=["f%d" % i for i in range(17)]), "more than"),
    (dict(topics="a:*", limit=0), "limit"),
    (dict(topics="a:*", limit=True), "limit"),
])
def test_bad_rule_is_a_value_error_naming_the_problem(kwargs, words):
    with pytest.raises(ValueError, match=words):
        PresenceRule(**kwargs)


# --- members --------------------------------------------------------------------------------------

RULE = PresenceRule("private:*", key="id", meta=["name", "avatar"])


def test_member_key_and_only_the_listed_fields():
    sub = {"id": 42, "name": "Ann", "email": "ann@example.com", "admin": True}
    assert identify(RULE, sub) == Member("42", {"name": "Ann"})   # avatar missing: left out
    assert identify(RULE, {"id": "u-7", "name": None, "avatar": "a.png"}) == \
        Member("u-7", {"name": None, "avatar": "a.png"})


def test_two_tabs_of_one_user_are_one_key_with_two_metas():
    tp = TopicPresence("n1")
    member = identify(RULE, {"id": 5, "name": "Bo"})
    a, b = tp.track(member, rand(1), NOW), tp.track(member, rand(2), NOW)
    tp.state.apply_diff("n1", tp.flush())
    payload = tp.state.payload()
    assert list(payload) == ["5"]
    assert [m["phx_ref"] for m in payload["5"]["metas"]] == [a.phx_ref, b.phx_ref]


@pytest.mark.parametrize("sub", [None, {}, "user:1", 7, [1], {"name": "x"}, {"id": None}])
def test_no_key_field_means_not_tracked_as_anonymous(sub):
    assert identify(RULE, sub) == NotTracked(ANONYMOUS)


@pytest.mark.parametrize("key", [1.0, True, False, {"a": 1}, [1], "", "x" * (MAX_KEY_CHARS + 1),
                                 "__proto__", "constructor", "toString", "hasOwnProperty",
                                 "a\nb", "a\x00b", "\ud800", 2 ** 64])
def test_bad_key_is_refused_naming_the_key_field(key):
    assert identify(RULE, {"id": key}) == NotTracked(BAD_KEY, "id")


def test_longest_key_and_big_integer_ids_are_kept_exactly():
    assert identify(RULE, {"id": "k" * MAX_KEY_CHARS}).key == "k" * MAX_KEY_CHARS
    assert identify(RULE, {"id": 2 ** 63 - 1}).key == "9223372036854775807"
    assert identify(RULE, {"id": "Zoë ✓"}).key == "Zoë ✓"


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], float("nan"), float("inf"), "\udc80", 2 ** 64])
def test_non_scalar_or_unencodable_meta_value_is_refused_naming_the_field(value):
    assert identify(RULE, {"id": 1, "avatar": value}) == NotTracked(BAD_META, "avatar")


def test_meta_fields_over_the_byte_bound_are_refused_not_truncated():
    assert isinstance(identify(RULE, {"id": 1, "name": "n" * (MAX_META_BYTES - 20)}), Member)
    assert identify(RULE, {"id": 1, "name": "n" * MAX_META_BYTES}) == NotTracked(BAD_META)
    # the bound is on UTF-8 bytes, not characters
    assert identify(RULE, {"id": 1, "name": "é" * (MAX_META_BYTES // 2)}) == NotTracked(BAD_META)


def test_new_meta_takes_ref_from_the_random_bytes_and_online_at_from_the_clock():
    m = new_meta(Member("1", {"name": "Ann"}), bytes(range(12)), NOW)
    assert m == {"phx_ref": "AAECAwQFBgcICQoL", "online_at": "1700000000", "name": "Ann"}
    assert new_meta(Member("1", {}), rand(1), NOW)["phx_ref"] != new_meta(Member("1", {}), rand(2), NOW)["phx_ref"]
    for bad in (b"", b"x" * 11, b"x" * 13, "x" * 12):
        with pytest.raises(ValueError):
            new_meta(Member("1", {}), bad, NOW)


# --- the replica ----------------------------------------------------------------------------------

def test_state_payload_has_phoenix_shape_and_removing_the_last_meta_drops_the_key():
    s = PresenceState()
    assert s.add("n1", "a", meta("r1")) and s.add("n2", "a", meta("r2")) and s.add("n1", "b", meta("r3"))
    assert s.payload() == {"a": {"metas": [meta("r1"), meta("r2")]}, "b": {"metas": [meta("r3")]}}
    assert len(s) == 3 and s.keys() == 2 and s.count_of("n1") == 2
    assert s.remove("n1", "b", "r3") == meta("r3")
    assert s.payload() == {"a": {"metas": [meta("r1"), meta("r2")]}}


def test_an_entry_is_removed_only_by_its_node_and_under_its_key():
    s = PresenceState([Entry("n1", "a", meta("r1"))])
    assert s.remove("n2", "a", "r1") is None
    assert s.remove("n1", "b", "r1") is None
    assert s.remove("n1", "a", "nope") is None
    assert len(s) == 1


def test_a_phx_ref_is_never_listed_twice():
    s = PresenceState()
    assert s.add("n1", "a", meta("r1"))
    assert not s.add("n1", "a", meta("r1", name="again"))
    assert not s.add("n2", "b", meta("r1"))      # unique in the topic, across keys and nodes
    assert s.payload() == {"a": {"metas": [meta("r1")]}}


def test_payload_is_built_once_per_version():
    s = PresenceState([Entry("n1", "a", meta("r1"))])
    first, version = s.payload(), s.version
    assert s.payload() is first
    assert not s.add("n1", "a", meta("r1")) and s.payload() is first and s.version == version
    s.add("n1", "a", meta("r2"))
    assert s.version == version + 1 and s.payload() is not first


def test_apply_diff_returns_only_what_changed_so_12_clients_never_list_a_meta_twice():
    # A process seeded from the broker already holds r2 when the diff that joined it arrives.
    s = PresenceState([Entry("n1", "a", meta("r1")), Entry("n2", "a", meta("r2"))])
    steps = [["state", wire(s.payload())]]
    received = {"joins": {"a": {"metas": [meta("r2"), meta("r3")]}}, "leaves": {}}
    effective = s.apply_diff("n2", received)
    assert effective == {"joins": {"a": {"metas": [meta("r3")]}}, "leaves": {}}
    steps.append(["diff", wire(effective)])
    assert_client_matches(s, steps)
    # forwarding the diff as received is what 1.2 gets wrong (it prepends old metas undeduplicated)
    raw = port_replay("1.2", steps[:1] + [["diff", wire(received)]])
    assert [m["phx_ref"] for m in raw["a"]["metas"]] == ["r1", "r2", "r2", "r3"]


def test_apply_diff_leaves_carry_the_stored_meta_and_unknown_leaves_are_dropped():
    s = PresenceState([Entry("n1", "a", meta("r1", name="Ann"))])
    effective = s.apply_diff("n1", {"joins": {}, "leaves": {"a": {"metas": [{"phx_ref": "r1"}]},
                                                          "zz": {"metas": [{"phx_ref": "r9"}]}}})
    assert effective == {"joins": {}, "leaves": {"a": {"metas": [meta("r1", name="Ann")]}}}
    assert s.apply_diff("n1", {"joins": {}, "leaves": {"a": {"metas": [{"phx_ref": "r1"}]}}}) is None


@pytest.mark.parametrize("diff", [
    None, [], "x", {}, {"joins": []}, {"joins": {"a": []}}, {"joins": {"a": {"metas": {}}}},
    {"joins": {"a": {"metas": [None, 1, "r", {}, {"phx_ref": 5}, {"phx_ref": ""}, {"phx_ref": ["r"]},
                                {"phx_ref": "x" * 65}]}}},
    {"joins": {"constructor": {"metas": [{"phx_ref": "r5"}]}}},
    {"leaves": {"a": {"metas": [{"phx_ref": {"r": 1}}]}}},
])
def test_malformed_diffs_change_nothing_and_never_raise(diff):
    s = PresenceState([Entry("n1", "a", meta("r1"))])
    assert s.apply_diff("n1", diff) is None
    assert s.payload() == {"a": {"metas": [meta("r1")]}}


def test_remove_node_leaves_only_that_nodes_entries_with_their_metas():
    s = PresenceState([Entry("n1", "a", meta("r1")), Entry("n2", "a", meta("r2")), Entry("n2", "b", meta("r3"))])
    steps = [["state", wire(s.payload())]]
    diff = s.remove_node("n2")
    assert diff == {"joins": {}, "leaves": {"a": {"metas": [meta("r2")]}, "b": {"metas": [meta("r3")]}}}
    steps.append(["diff", wire(diff)])
    assert s.payload() == {"a": {"metas": [meta("r1")]}} and s.count_of("n2") == 0
    assert_client_matches(s, steps)
    assert s.remove_node("n2") is None and s.remove_node("never") is None


def test_replace_sends_only_the_difference_and_keeps_the_order_clients_have():
    s = PresenceState([Entry("n1", "a", meta("r1")), Entry("n1", "a", meta("r2")), Entry("n2", "b", meta("r3"))])
    steps = [["state", wire(s.payload())]]
    truth = [Entry("n2", "c", meta("r5")), Entry("n1", "a", meta("r4")), Entry("n1", "a", meta("r2")),
             Entry("n2", "b", meta("r3"))]
    diff = s.replace(truth)
    assert diff == {"joins": {"c": {"metas": [meta("r5")]}, "a": {"metas": [meta("r4")]}},
                    "leaves": {"a": {"metas": [meta("r1")]}}}
    steps.append(["diff", wire(diff)])
    assert [m["phx_ref"] for m in s.payload()["a"]["metas"]] == ["r2", "r4"]
    assert_client_matches(s, steps)
    assert s.replace(truth) is None       # already there: nothing to send
    assert s.diff_to(PresenceState(truth)) is None


def test_broker_entries_round_trip_and_garbage_is_skipped():
    entry = Entry("node|a1", "Zoë", meta("r1", name="Zoë"))
    field, value = encode_entry(entry)
    assert field == "node|a1|r1"
    assert decode_entry(field, value) == entry
    assert decode_entry(field.encode(), value.encode()) == entry
    for bad_field, bad_value in [
        (field, "not json"), (field, "[" * 100000), (field, None), (b"\xff", value), (None, value),
        ("|r1", value), ("n|r2", value), ("r1", value),
        (field, json.dumps({"v": 2, "key": "Zoë", "meta": meta("r1")})),
        (field, json.dumps({"v": 1, "key": "constructor", "meta": meta("r1")})),
        (field, json.dumps({"v": 1, "key": "a", "meta": meta("r1", avatar={"x": 1})})),
        (field, '{"v": 1, "key": "a", "meta": {"phx_ref": "r1", "name": "\\ud800"}}'),
    ]:
        assert decode_entry(bad_field, bad_value) is None, (bad_field, bad_value)


def test_a_meta_that_is_not_flat_json_scalars_is_not_added():
    s = PresenceState()
    assert not s.add("n1", "a", meta("r1", avatar={"x": 1}))
    assert not s.add("n1", "a", meta("r2", score=float("nan")))
    assert len(s) == 0


# --- the coalescing window ------------------------------------------------------------------------

def test_join_and_leave_inside_one_window_cancel_out():
    buf = DiffBuffer()
    buf.join("a", meta("r1"))
    buf.leave("a", meta("r1"))
    assert len(buf) == 0 and buf.take() is None


def test_a_window_diff_always_has_joins_and_leaves():
    buf = DiffBuffer()
    buf.leave("a", meta("r0"))                        # joined in an earlier window
    assert buf.take() == {"joins": {}, "leaves": {"a": {"metas": [meta("r0")]}}}
    buf.join("b", meta("r1"))
    assert buf.take() == {"joins": {"b": {"metas": [meta("r1")]}}, "leaves": {}}
    assert buf.take() is None


def test_a_ref_cannot_join_after_it_left():
    buf = DiffBuffer()
    buf.leave("a", meta("r1"))
    with pytest.raises(ValueError):
        buf.join("a", meta("r1"))


def test_a_storm_of_2000_joins_in_one_window_is_one_diff_and_one_state_version():
    tp = TopicPresence("n1", limit=5000)
    subscribers = []                                   # each joiner gets presence_state
    for i in range(2000):
        t = tp.track(Member("user%d" % (i % 700), {}), rand(i + 1), NOW)
        assert isinstance(t, Tracked)
        subscribers.append(tp.state.payload())
    assert len({id(p) for p in subscribers}) == 1      # one payload for the window: one encode per serializer
    diffs = [d for d in (tp.flush(), tp.flush()) if d is not None]
    assert len(diffs) == 1
    assert sum(len(p["metas"]) for p in diffs[0]["joins"].values()) == 2000
    effective = tp.state.apply_diff("n1", diffs[0])
    assert tp.state.version == 2000 and len(tp.state.payload()) == 700
    # 2,000 subscribers get this one diff: 2,000 frames for the storm, not 2,000 x 2,000
    assert_client_matches(tp.state, [["state", {}], ["diff", wire(effective)]])


# --- one topic in one process ---------------------------------------------------------------------

def test_track_is_broadcast_at_flush_and_the_replica_changes_only_by_the_diff():
    tp = TopicPresence("n1")
    t = tp.track(Member("7", {"name": "Ann"}), rand(1), NOW)
    assert tp.pending and tp.state.payload() == {} and tp.own_entries() == [Entry("n1", "7", t.meta)]
    diff = tp.flush()
    assert diff == {"joins": {"7": {"metas": [t.meta]}}, "leaves": {}} and not tp.pending
    assert tp.state.apply_diff("n1", diff) == diff
    assert tp.state.apply_diff("n1", diff) is None    # the same diff again changes nothing
    assert tp.untrack(t) and not tp.untrack(t)        # idempotent: a close after a leave
    assert tp.flush() == {"joins": {}, "leaves": {"7": {"metas": [t.meta]}}}
    assert tp.flush() is None


def test_a_full_topic_does_not_track_and_counts_every_nodes_entries():
    tp = TopicPresence("n1", limit=3, entries=[Entry("n2", "x", meta("r-x"))])
    a = tp.track(Member("a", {}), rand(1), NOW)
    b = tp.track(Member("a", {}), rand(2), NOW)         # a second tab is a second entry
    assert isinstance(a, Tracked) and isinstance(b, Tracked)
    assert tp.track(Member("c", {}), rand(3), NOW) == NotTracked(TOPIC_FULL)
    tp.state.apply_diff("n1", tp.flush())               # own entries echoed: not counted twice
    assert tp.track(Member("c", {}), rand(4), NOW) == NotTracked(TOPIC_FULL)
    tp.untrack(a)
    assert isinstance(tp.track(Member("c", {}), rand(5), NOW), Tracked)
    tp.state.remove_node("n2")
    assert isinstance(tp.track(Member("d", {}), rand(6), NOW), Tracked)


def test_untrack_all_is_one_diff_of_every_own_entry():
    tp = TopicPresence("n1")
    handles = [tp.track(Member(str(i % 3), {}), rand(i + 1), NOW) for i in range(5)]
    tp.state.apply_diff("n1", tp.flush())
    tp.untrack(handles[0])
    assert tp.untrack_all() == 4 and tp.own_count == 0
    diff = tp.flush()
    assert sorted(m["phx_ref"] for p in diff["leaves"].values() for m in p["metas"]) == \
        sorted(h.phx_ref for h in handles)
    assert not any(tp.untrack(h) for h in handles)


def test_track_refuses_a_reused_ref():
    tp = TopicPresence("n1", entries=[Entry("n2", "x", new_meta(Member("x", {}), rand(1), NOW))])
    with pytest.raises(ValueError):
        tp.track(Member("a", {}), rand(1), NOW)


def test_resync_after_an_outage_sends_only_differences_and_corrects_the_broker():
    tp = TopicPresence("n1", entries=[Entry("n2", "b", meta("rb")), Entry("n3", "c", meta("rc"))])
    kept = tp.track(Member("a", {}), rand(1), NOW)
    tp.state.apply_diff("n1", tp.flush())
    steps = [["state", wire(tp.state.payload())]]
    # during the outage: a local join and a local leave whose flushes were lost, and n3's member left
    gone = tp.track(Member("a", {}), rand(2), NOW)
    tp.state.apply_diff("n1", tp.flush())
    steps.append(["diff", {"joins": {"a": {"metas": [wire(gone.meta)]}}, "leaves": {}}])
    tp.untrack(gone)
    new = tp.track(Member("z", {}), rand(3), NOW)
    snapshot = [Entry("n2", "b", meta("rb")), Entry("n2", "d", meta("rd")),
                Entry("n1", "a", kept.meta), Entry("n1", "a", gone.meta)]
    local, correction = tp.resync(snapshot)
    assert local == {"joins": {"d": {"metas": [meta("rd")]}, "z": {"metas": [new.meta]}},
                     "leaves": {"c": {"metas": [meta("rc")]}, "a": {"metas": [gone.meta]}}}
    assert correction == {"joins": {"z": {"metas": [new.meta]}}, "leaves": {"a": {"metas": [gone.meta]}}}
    assert not tp.pending
    steps.append(["diff", wire(local)])
    assert_client_matches(tp.state, steps)
    assert tp.state.apply_diff("n1", correction) is None    # its echo changes nothing here
    assert tp.resync(list(tp.state.entries())) == (None, None)


# --- random runs: every client ends with its process's list, every replica with the truth ------

@given(ops_strategy(st, versions=("1.2", "1.8")))
@SETTINGS
def test_random_runs_end_with_every_client_listing_the_truth(ops):
    cluster = Cluster().run(ops)
    truth = cluster.truth()
    for node in cluster.nodes:
        assert {(e.node, e.key, e.meta["phx_ref"]) for e in node.tp.state.entries()} == truth
    assert {(e.node, e.key, e.meta["phx_ref"]) for e in cluster.hash.values()} == truth
    for client in cluster.clients:
        assert canonical(port_replay(client.version, client.steps), not client.rejoined) == \
            cluster.expected(client), client.version


def test_the_port_differs_between_12_and_18_where_phoenix_does():
    state = {"a": {"metas": [meta("r1")]}}
    again = {"joins": {"a": {"metas": [meta("r1")]}}, "leaves": {}}
    assert len(sync_diff(state, again, dedup=False)["a"]["metas"]) == 2
    assert len(sync_diff(state, again, dedup=True)["a"]["metas"]) == 1
    assert sync_state(state, {}) == {}
    assert json.dumps(make_diff([], [])) == "null"


def test_the_module_is_pure_no_clock_randomness_or_io_imported():
    import ast
    import pusherd.core.presence as module
    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
    assert imported <= {"base64", "json", "math", "typing"}, imported
    assert relative <= {"topics"}, relative

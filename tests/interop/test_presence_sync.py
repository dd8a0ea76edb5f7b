"""The real phoenix.js presence code (1.2, 1.4, 1.5, 1.8, unmodified, under Node) fed with
pusherd/core/presence.py's presence_state and diffs ends with the server's list; and the Python
port the unit tests rely on (tests/presence_sync.py) does exactly what the real one does."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from presence_sync import VERSIONS, Cluster, NodeReplayer, canonical, ops_strategy, port_replay
from pusherd.core.presence import JS_PROTOTYPE_NAMES, PresenceRule, identify

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def replayer(node_modules_ready):
    r = NodeReplayer()
    yield r
    r.close()


@given(ops=ops_strategy(st, versions=VERSIONS))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_real_phoenix_js_ends_with_the_server_list_and_the_port_agrees(replayer, ops):
    cluster = Cluster().run(ops)
    runs = cluster.runs()
    for client, real in zip(cluster.clients, replayer.replay(runs)):
        assert real == port_replay(client.version, client.steps), client.version   # order included
        assert canonical(real, not client.rejoined) == cluster.expected(client), client.version


def test_a_storm_diff_and_a_resync_diff_through_every_version(replayer):
    ops = [("join_client", 1, v) for v in VERSIONS] + [("track", i % 3, i) for i in range(300)]
    ops += [("flush", 0), ("flush", 1), ("flush", 2), ("consume", 1, 10), ("outage", 1)]
    ops += [("untrack", 0, i) for i in range(40)] + [("track", 1, i) for i in range(20)]
    ops += [("flush", 0), ("flush", 1), ("consume", 0, 10), ("recover", 1, 0.5), ("consume", 1, 10)]
    cluster = Cluster().run(ops)
    clients = [c for c in cluster.clients if c.node.name == "n1"]
    assert len(clients) == 4 and all(len(c.steps) >= 4 for c in clients)
    for client, real in zip(clients, replayer.replay([(c.version, c.steps) for c in clients])):
        assert real == cluster.expected(client), client.version
        assert sum(len(p["metas"]) for p in real.values()) == len(cluster.truth())


@pytest.mark.parametrize("key", sorted(JS_PROTOTYPE_NAMES & {"__proto__", "constructor", "toString", "valueOf"}))
def test_why_prototype_names_are_refused_as_keys(replayer, key):
    """Such a key throws inside phoenix.js <= 1.5's presence code (every page on the topic)."""
    assert identify(PresenceRule("t"), {"id": key}).reason == "bad_key"
    state = {key: {"metas": [{"phx_ref": "r1"}]}}
    for version in VERSIONS:
        try:
            replayer.replay([(version, [["state", state]])])
            survived = True
        except AssertionError:
            survived = False
        assert survived == (version == "1.8"), version


def test_why_a_diff_always_has_both_halves(replayer):
    with pytest.raises(AssertionError, match="TypeError"):
        replayer.replay([("1.8", [["state", {}], ["diff", {"joins": {"a": {"metas": [{"phx_ref": "r"}]}}}]])])

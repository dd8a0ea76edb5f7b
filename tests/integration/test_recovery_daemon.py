"""History and recovery against a real pusherd (memory broker), with the Python Phoenix client."""

import json

import pytest

from pusherd_testing import rails_token

pytestmark = pytest.mark.integration

HISTORY = {"history": [{"topics": "deploys:*", "size": 5, "ttl": 3600}], "max_recovery": 4}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from pusherd_testing import Pusherd
    d = Pusherd(tmp_path_factory.mktemp("history"), HISTORY).start()
    yield d
    d.stop()


def auth(topic="deploys:*"):
    token, csrf = rails_token(listen=[topic])
    return {"guardian_token": token, "csrf_token": csrf}


def test_publish_answers_the_position_and_frames_carry_it(daemon, phx_connect):
    c = phx_connect(daemon.ws_url)
    c.join("deploys:pos", auth())
    status, body = daemon.publish("deploys:pos", "new_version", {"v": 1})
    assert status == 200
    epoch, offset = body["position"].rsplit(":", 1)
    assert offset == "1"
    msg = c.expect(event="new_version")
    assert msg["ref"] == body["position"] and msg["payload"] == {"v": 1}
    # Topics without history keep null refs and no position.
    status, body = daemon.publish("public:nohistory", "e", {})
    assert status == 200 and "position" not in body


@pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])
def test_rejoin_with_since_replays_exactly_the_missed_events_then_live(daemon, phx_connect, vsn):
    topic = "deploys:replay-" + vsn
    _, body = daemon.publish(topic, "new_version", {"n": 0})
    since = body["position"]
    for n in (1, 2, 3):
        daemon.publish(topic, "new_version", {"n": n})
    c = phx_connect(daemon.ws_url, vsn=vsn)
    status, response, _ = c.join(topic, dict(auth(), since=since))
    assert status == "ok" and response["recovered"] is True
    assert response["position"].endswith(":4")
    got = [c.recv() for _ in range(3)]
    assert [m["payload"]["n"] for m in got] == [1, 2, 3]
    assert [m["ref"].rsplit(":", 1)[1] for m in got] == ["2", "3", "4"]
    daemon.publish(topic, "new_version", {"n": 4})
    assert c.recv()["payload"]["n"] == 4
    c.assert_silent(0.3)


def test_up_to_date_since_replays_nothing(daemon, phx_connect):
    _, body = daemon.publish("deploys:fresh", "e", {})
    c = phx_connect(daemon.ws_url)
    status, response, _ = c.join("deploys:fresh", dict(auth(), since=body["position"]))
    assert response == {"recovered": True, "position": body["position"]}
    c.assert_silent(0.3)


@pytest.mark.parametrize("case", ["overflow", "max_recovery", "wrong_epoch", "garbage"])
def test_unrecoverable_gaps_say_so_and_replay_nothing(daemon, phx_connect, case):
    topic = "deploys:gap-" + case
    _, body = daemon.publish(topic, "e", {"n": 0})
    since = body["position"]
    count = {"overflow": 7, "max_recovery": 5, "wrong_epoch": 1, "garbage": 1}[case]
    for n in range(count):
        _, last = daemon.publish(topic, "e", {"n": n + 1})
    if case == "wrong_epoch":
        since = "00000000:1"
    if case == "garbage":
        since = "not a position"
    c = phx_connect(daemon.ws_url)
    status, response, _ = c.join(topic, dict(auth(), since=since))
    assert status == "ok"
    assert response == {"recovered": False, "position": last["position"]}
    c.assert_silent(0.3)


def test_restart_of_memory_broker_changes_the_epoch(pusherd_factory, phx_connect):
    d = pusherd_factory(HISTORY)
    _, body = d.publish("deploys:web", "new_version", {"v": 1})
    d.restart()
    c = phx_connect(d.ws_url)
    status, response, _ = c.join("deploys:web", dict(auth(), since=body["position"]))
    assert status == "ok" and response["recovered"] is False


def test_join_without_since_behaves_as_before(daemon, phx_connect):
    daemon.publish("deploys:plain", "e", {})
    c = phx_connect(daemon.ws_url)
    assert c.join("deploys:plain", auth())[:2] == ("ok", {})
    c.assert_silent(0.3)


def test_since_on_a_topic_without_history(daemon, phx_connect):
    c = phx_connect(daemon.ws_url)
    status, response, _ = c.join("public:nohist", {"since": "abc:1"})
    assert status == "ok" and response == {"recovered": False, "position": None}


def test_since_does_not_bypass_authorization(daemon, phx_connect):
    _, body = daemon.publish("deploys:secret", "e", {"classified": True})
    c = phx_connect(daemon.ws_url)
    status, response, _ = c.join("deploys:secret", {"since": body["position"]})
    assert (status, response) == ("error", {"reason": "authentication_required"})
    c.assert_silent(0.3)

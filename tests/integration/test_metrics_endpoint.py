"""/metrics on its own listener, parsed with prometheus_client's own parser, against a real pusherd."""

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from pusherd_testing import PUBLISH_SECRET, ROOT, Pusherd, RawWS, free_port, rails_token

prometheus_parser = pytest.importorskip("prometheus_client.parser")  # a test extra: always there in CI

pytestmark = pytest.mark.integration

TOKEN = "scrape-token-0123456789"


def with_metrics(tmp):
    d = Pusherd(tmp, {"metrics": {"listen": "127.0.0.1:%d" % free_port(), "token": TOKEN},
                      "max_outbox_bytes": 65536})
    d.metrics_url = "http://%s/metrics" % d.settings["metrics"]["listen"]
    return d.start()


@pytest.fixture
def daemon(tmp_path):
    """A fresh daemon: counters start at zero."""
    d = with_metrics(tmp_path)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    d = with_metrics(tmp_path_factory.mktemp("metrics"))
    yield d
    d.stop()


def fetch(url, auth="Bearer " + TOKEN):
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def scrape(daemon):
    """{(sample name, frozenset(labels)): value} of one scrape."""
    status, headers, text = fetch(daemon.metrics_url)
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(daemon, predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(daemon)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError("metrics never matched; last scrape: %r" % sorted(samples.items()))
        time.sleep(0.05)


@pytest.mark.parametrize("auth", [None, "", "Bearer ", "Bearer wrong", TOKEN, "Basic " + TOKEN, "Bearer " + TOKEN + "x"])
def test_metrics_need_the_bearer_token(shared, auth):
    status, headers, body = fetch(shared.metrics_url, auth)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert "pusherd_" not in body


def test_metrics_are_not_on_the_public_listener(shared):
    status, _, _ = shared.request("GET", "/metrics", headers={"Authorization": "Bearer " + TOKEN})
    assert status == 404
    assert fetch(shared.metrics_url)[0] == 200


def test_counters_move_as_events_flow(daemon, phx_connect):
    before = scrape(daemon)
    assert value(before, "pusherd_sockets") == 0
    assert value(before, "pusherd_broker_up", broker="memory") == 1
    assert value(before, "pusherd_joins_refused_total", reason="forbidden") == 0  # exported before it happens

    v1 = phx_connect(daemon.ws_url, vsn="1.0.0")
    v2 = phx_connect(daemon.ws_url)
    token, csrf = rails_token(listen=["deploys:web"])
    for c in (v1, v2):
        assert c.join("public:lobby")[0] == "ok"
        assert c.join("deploys:web", {"guardian_token": token, "csrf_token": csrf})[0] == "ok"
    assert v2.join("private:nope", {"guardian_token": token, "csrf_token": csrf})[1] == {"reason": "forbidden"}
    assert v2.join("private:nope")[1] == {"reason": "authentication_required"}
    for n in range(3):
        assert daemon.publish("deploys:web", "new_version", {"n": n})[0] == 200
    assert daemon.publish("deploys:web", "x", secret="wrong")[0] == 401
    assert daemon.request("POST", "/publish", b"{", {"Authorization": "Bearer " + PUBLISH_SECRET})[0] == 400
    for c in (v1, v2):
        for n in range(3):
            assert c.expect(event="new_version")["payload"] == {"n": n}
    assert v2.push("public:lobby", "msg", {"body": "hi"})[0] == "ok"
    v1.expect(event="msg")

    s = wait_for(daemon, lambda s: value(s, "pusherd_messages_delivered_total") >= 8)
    assert value(s, "pusherd_sockets") == 2
    assert value(s, "pusherd_topics") == 2
    assert value(s, "pusherd_channels", prefix="public") == 2
    assert value(s, "pusherd_channels", prefix="deploys") == 2
    assert value(s, "pusherd_joins_accepted_total") == 4
    assert value(s, "pusherd_joins_refused_total", reason="forbidden") == 1
    assert value(s, "pusherd_joins_refused_total", reason="authentication_required") == 1
    assert value(s, "pusherd_messages_received_total") == 4      # 3 published + 1 client push
    assert value(s, "pusherd_messages_delivered_total") == 8     # each to 2 sockets
    assert value(s, "pusherd_frames_encoded_total") == 8         # one V1 and one V2 frame each
    assert value(s, "pusherd_messages_dropped_total") == 0
    assert value(s, "pusherd_publish_requests_total", status="200") == 3
    assert value(s, "pusherd_publish_requests_total", status="401") == 1
    assert value(s, "pusherd_publish_requests_total", status="400") == 1
    assert value(s, "pusherd_client_frames_received_total") >= 7  # joins and the push
    assert value(s, "pusherd_delivery_latency_seconds_count") == 4
    assert value(s, "pusherd_delivery_latency_seconds_bucket", le="+Inf") == 4
    assert 0 <= value(s, "pusherd_delivery_latency_seconds_sum") < 4 * 1.0
    assert value(s, "process_open_fds") > 0

    v1.close()
    v2.close()
    s = wait_for(daemon, lambda s: value(s, "pusherd_sockets") == 0)
    assert value(s, "pusherd_channels", prefix="public") == 0 and value(s, "pusherd_topics") == 0


def test_topic_prefixes_are_bounded(daemon, phx_connect):
    c = phx_connect(daemon.ws_url)
    token, csrf = rails_token(listen=["p%d:*" % i for i in range(30)] + ["nocolon", "9bad:*"])
    params = {"guardian_token": token, "csrf_token": csrf}
    topics = ["p%d:t" % i for i in range(30)] + ["nocolon", "9bad:x"]
    for topic in topics:
        assert c.join(topic, params)[0] == "ok", topic
    s = scrape(daemon)
    channels = {dict(labels)["prefix"]: v for (name, labels), v in s.items() if name == "pusherd_channels"}
    assert sum(channels.values()) == len(topics)
    assert len(channels) <= 21 and channels["other"] >= 12
    assert not any(":" in prefix for prefix in channels)


def test_slow_consumer_close_and_dropped_frames_are_counted(daemon):
    # A raw socket that reads nothing after its join, with a 4 KiB receive window: the kernel
    # buffers fill, then the 64 KiB outbox overflows. (PhxClient's websockets client reads in
    # the background into a queue of its own: with it the kernel and that queue absorbed up to
    # 40 of these publishes on some runs, and nothing overflowed.)
    stalled = RawWS(daemon.port, rcvbuf=4096)
    try:
        assert stalled.join("public:flood")[4]["status"] == "ok"
        payload = {"blob": "x" * 400000}
        for _ in range(40):
            if daemon.publish("public:flood", "big", payload)[0] != 200:
                break
            s = scrape(daemon)
            if value(s, "pusherd_slow_consumer_closes_total") >= 1:
                break
        s = wait_for(daemon, lambda s: value(s, "pusherd_slow_consumer_closes_total") == 1)
        assert value(s, "pusherd_messages_dropped_total") >= 1
        assert value(s, "pusherd_messages_delivered_total") >= value(s, "pusherd_messages_dropped_total")
    finally:
        stalled.close()  # else the server waits 5 s for its close frame to be answered
    wait_for(daemon, lambda s: value(s, "pusherd_sockets") == 0)


def test_without_prometheus_client_start_up_fails_clearly(tmp_path):
    config = tmp_path / "pusher.yml"
    config.write_text('test:\n  metrics: {listen: "127.0.0.1:%d"}\n' % free_port())
    code = ("import sys; sys.modules['prometheus_client'] = None; "
            "from pusherd.__main__ import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "--config", str(config), "--env", "test"],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    assert result.returncode == 2
    assert "prometheus_client is not installed" in result.stderr
    assert "pip install 'pusherd[metrics]'" in result.stderr


def test_two_daemons_in_one_process_have_their_own_registries(tmp_path):
    """No global registry: each daemon's /metrics reports its own numbers."""
    from pusherd import config
    from pusherd.daemon import Daemon

    def settings():
        doc = {"test": {"metrics": {"listen": "127.0.0.1:0"}, "listen": "127.0.0.1:0"}}
        return config.from_mapping(doc, "test", "<test>", {}, lambda p: "")

    async def main():
        a, b = Daemon(settings()), Daemon(settings())
        await a.start()
        # b gets its metrics socket from outside, as systemd passes one named "metrics"
        inherited = socket.socket()
        inherited.bind(("127.0.0.1", 0))
        inherited.listen(16)
        inherited.setblocking(False)
        await b.start(metrics_sockets=[inherited])
        assert b.metrics.bound == [inherited.getsockname()]
        try:
            for _ in range(3):
                from pusherd.core.broadcast import Broadcast
                await a.service.publish(Broadcast("public:x", "e", {}))
            loop = asyncio.get_running_loop()
            texts = []
            for d in (a, b):
                url = "http://127.0.0.1:%d/metrics" % d.metrics.bound[0][1]
                texts.append(await loop.run_in_executor(None, lambda u=url: fetch(u, None)[2]))
            return texts
        finally:
            await a.close()
            await b.close()

    text_a, text_b = asyncio.run(main())
    received = []
    for text in (text_a, text_b):
        for family in prometheus_parser.text_string_to_metric_families(text):
            if family.name == "pusherd_messages_received":
                received.append(family.samples[0].value)
    assert received == [3.0, 0.0]


def test_history_and_recovery_are_counted(tmp_path, phx_connect):
    d = Pusherd(tmp_path, {"metrics": {"listen": "127.0.0.1:%d" % free_port(), "token": TOKEN},
                           "history": [{"topics": "public:*", "size": 10, "ttl": 3600}]}).start()
    d.metrics_url = "http://%s/metrics" % d.settings["metrics"]["listen"]
    try:
        before = scrape(d)
        assert value(before, "pusherd_history_streams") == 0
        _, first = d.publish("public:hist", "e", {"n": 1})
        d.publish("public:hist", "e", {"n": 2})
        d.publish("public:hist", "e", {"n": 3})
        c = phx_connect(d.ws_url)
        status, response, _ = c.join("public:hist", {"since": first["position"]})
        assert response["recovered"] is True
        c2 = phx_connect(d.ws_url)
        assert c2.join("public:hist", {"since": "nope:1"})[1]["recovered"] is False
        samples = wait_for(d, lambda s: value(s, "pusherd_messages_replayed_total") == 2)
        assert value(samples, "pusherd_history_streams") == 1
        assert value(samples, "pusherd_history_messages") == 3
        assert value(samples, "pusherd_history_bytes") > 0
        assert value(samples, "pusherd_recoveries_total", outcome="recovered") == 1
        assert value(samples, "pusherd_recoveries_total", outcome="not_recovered") == 1
    finally:
        d.stop()

"""Pure pieces of the operator's kit: metric counters, bounded labels, outbox drop counts, join tallies,
CLI address resolution and demo asset discovery. No sockets."""

import collections
import io
import json

import pytest

from pusherd import cli, client, demo
from pusherd.config import from_mapping
from pusherd.metrics import OTHER_PREFIX, Histogram, PrefixLabels
from pusherd.outbox import Outbox
from pusherd.core.protocol import V2
from pusherd.core.session import Policy, Session
from pusherd.core.tokens import Verifier


# -- metrics -----------------------------------------------------------------------------------

def test_histogram_buckets_are_cumulative_with_le_semantics():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, -0.01):
        h.observe(v)
    assert h.buckets() == [("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.total == pytest.approx(2.65)


def test_prefix_labels_are_bounded_and_never_a_topic():
    labels = PrefixLabels(limit=2)
    assert labels.label("public:lobby") == "public"
    assert labels.label("deploys:web") == "deploys"
    assert labels.label("users:1") == OTHER_PREFIX          # over the limit
    assert labels.label("public:other") == "public"          # known prefixes stay
    assert labels.label("nocolon") == OTHER_PREFIX
    assert labels.label("bad prefix!:x") == OTHER_PREFIX
    assert labels.channels({"public:a": {1, 2}, "public:b": {3}, "x:y": {4}}) == {"public": 3, OTHER_PREFIX: 1}


class FakeStream:
    def __init__(self, fail=None, stalled=False):
        self.max_write_buffer_size = None
        self.written = []
        self.fail = fail
        self.stalled = stalled  # a peer that never reads: Tornado's bound is reached, nothing drains

    def write(self, data):
        if self.fail:
            raise self.fail
        if self.stalled and self.max_write_buffer_size is not None and \
                sum(map(len, self.written)) + len(data) > self.max_write_buffer_size:
            from tornado.iostream import StreamBufferFullError
            raise StreamBufferFullError("Reached maximum write buffer size")
        self.written.append(bytes(data))

    def writing(self):
        return False


def test_outbox_counts_frames_it_discards():
    dropped, overflows, soon = [], [], []
    outbox = Outbox(FakeStream(stalled=True), soon.append, 10, lambda: overflows.append(1), on_drop=dropped.append)
    outbox.send(b"aaaa")
    outbox.send(b"bbbb")
    outbox.send(b"cccc")          # 12 bytes > 10 unsent to a stalled peer: the three frames are dropped
    assert sum(dropped) == 3 and overflows == [1]
    outbox.send(b"late")          # after the overflow the socket is gone
    assert sum(dropped) == 4

    dropped.clear()
    outbox = Outbox(FakeStream(), soon.append, 100, lambda: None, on_drop=dropped.append)
    outbox.send(b"x")
    outbox.send(b"y")
    outbox.detach()               # closing with frames still queued
    assert dropped == [2]


def test_outbox_delivering_normally_drops_nothing():
    dropped, soon = [], []
    stream = FakeStream()
    outbox = Outbox(stream, soon.append, 100, lambda: None, on_drop=dropped.append)
    outbox.send(b"x")
    outbox.send(b"y")
    soon[0]()
    assert stream.written == [b"xy"] and dropped == []


def test_sessions_tally_joins_by_outcome():
    joins = collections.Counter()
    session = Session(V2, Policy(Verifier(["s"]), joins=joins), now=0.0)
    session.receive(json.dumps(["1", "1", "public:a", "phx_join", {}]), 0.0)
    session.receive(json.dumps(["2", "2", "private:a", "phx_join", {}]), 0.0)
    session.receive(json.dumps(["3", "3", "private:b", "phx_join", {"guardian_token": "nope"}]), 0.0)
    assert joins == {"ok": 1, "authentication_required": 1, "invalid_token": 1}


# -- CLI and client -------------------------------------------------------------------------------

@pytest.mark.parametrize("listen, url", [
    ("127.0.0.1:4000", "http://127.0.0.1:4000"),
    ("0.0.0.0:4001", "http://127.0.0.1:4001"),
    (":4002", "http://127.0.0.1:4002"),
    ("[::]:4003", "http://127.0.0.1:4003"),
    ("[::1]:4004", "http://[::1]:4004"),
    ("push.internal:4005", "http://push.internal:4005"),
])
def test_base_url_from_the_configs_listen(listen, url):
    settings = from_mapping({"test": {"listen": listen}}, "test", "<t>", {}, lambda p: "")
    assert cli.base_url(settings) == url


@pytest.mark.parametrize("given, endpoint", [
    ("http://h:4000", "http://h:4000/publish"),
    ("http://h:4000/", "http://h:4000/publish"),
    ("https://h/push/", "https://h/push/publish"),
    ("http://h:4000/publish", "http://h:4000/publish"),
    ("h:4000", "http://h:4000/publish"),
])
def test_publish_url(given, endpoint):
    assert client.publish_url(given) == endpoint


def test_payload_is_read_from_stdin_only_for_a_dash():
    assert cli._payload(None, None) == {}
    assert cli._payload('{"a": 1}', None) == {"a": 1}
    assert cli._payload("-", io.StringIO('{"b": 2}')) == {"b": 2}
    assert cli._payload("-", io.StringIO("")) == {}
    with pytest.raises(cli.UsageError):
        cli._payload("{", None)
    with pytest.raises(cli.UsageError):
        cli._payload("-", None)


def test_token_command_mints_what_the_verifier_accepts():
    out = io.StringIO()
    assert cli.main(["token", "--secret", "k" * 32, "--sub", '{"id": 3}', "--listen", "deploys:*",
                     "--publish", "deploys:web", "--csrf", "c"], environ={}, stdout=out) == 0
    token, csrf = out.getvalue().splitlines()
    claims = Verifier(["k" * 32]).verify(token, csrf)
    assert claims.sub == {"id": 3} and [p.text for p in claims.listen] == ["deploys:*"]
    assert [p.text for p in claims.publish] == ["deploys:web"] and claims.aud == "csrf"


# -- demo assets ----------------------------------------------------------------------------------

def test_demo_finds_phoenix_in_node_modules_next_to_the_config(tmp_path):
    app = tmp_path / "rails-app"
    static = app / "node_modules" / "phoenix" / "priv" / "static"
    static.mkdir(parents=True)
    (static / "phoenix.min.js").write_text("var Phoenix = {};")
    (app / "config").mkdir()
    found, _ = demo.find_client(None, str(app / "config" / "pusher.yml"), str(tmp_path))
    assert found == static / "phoenix.min.js"
    found, places = demo.find_client(None, "<embedded default>", str(tmp_path))
    assert found is None and places == [tmp_path / "node_modules" / "phoenix" / "priv" / "static"]


@pytest.mark.parametrize("given", ["file", "static", "package", "project"])
def test_demo_assets_may_name_the_file_or_a_directory_above_it(tmp_path, given):
    static = tmp_path / "node_modules" / "phoenix" / "priv" / "static"
    static.mkdir(parents=True)
    (static / "phoenix.js").write_text("var Phoenix = {};")
    path = {"file": static / "phoenix.js", "static": static, "package": tmp_path / "node_modules" / "phoenix",
            "project": tmp_path}[given]
    assert demo.find_client(str(path), "<embedded default>", "/nonexistent")[0] == static / "phoenix.js"


def test_demo_assets_is_relative_to_the_config_file():
    settings = from_mapping({"test": {"demo_assets": "../node_modules/phoenix"}}, "test", "/srv/app/config/pusher.yml",
                            {}, lambda p: "")
    assert settings.demo_assets == "/srv/app/config/../node_modules/phoenix"


@pytest.mark.parametrize("metrics, warned", [
    ({"listen": "0.0.0.0:9100"}, True),
    ({"listen": "0.0.0.0:9100", "token": "t"}, False),
    ({"listen": "127.0.0.1:9100"}, False),
    ({"listen": "[::1]:9100"}, False),
])
def test_metrics_without_a_token_off_loopback_are_warned_about(metrics, warned):
    settings = from_mapping({"test": {"metrics": metrics}}, "test", "<t>", {}, lambda p: "")
    assert any(w.startswith("metrics.token") for w in settings.warnings()) == warned

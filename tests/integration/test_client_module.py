"""pusherd.client (publish / mint_token for non-Rails backends) against a real pusherd."""

import http.server
import socket
import threading

import pytest

from pusherd_testing import GUARDIAN_SECRET, ISSUER, PUBLISH_SECRET, free_port, joined
from pusherd.client import PublishFailed, mint_token, publish

pytestmark = pytest.mark.integration


def test_publish_delivers_and_returns_the_answer(pusherd_server, phx_connect):
    c = joined(phx_connect, pusherd_server, "public:client-one")
    answer = publish("public:client-one", "new_version", {"version": "v9"}, url=pusherd_server.http_url,
                     secret=PUBLISH_SECRET)
    assert answer == {"status": "ok", "published": 1}
    assert c.expect(event="new_version")["payload"] == {"version": "v9"}


def test_publish_to_several_topics_and_from_the_environment(pusherd_server, phx_connect, monkeypatch):
    a = joined(phx_connect, pusherd_server, "public:client-a")
    b = joined(phx_connect, pusherd_server, "public:client-b")
    monkeypatch.setenv("PUSHERD_URL", pusherd_server.http_url)
    monkeypatch.setenv("PUSHERD_PUBLISH_SECRET", PUBLISH_SECRET)
    assert publish(["public:client-a", "public:client-b"], "e")["published"] == 2
    assert a.expect(event="e")["payload"] == {} and b.expect(event="e")["payload"] == {}


@pytest.mark.parametrize("kwargs, status, reason", [
    ({"secret": "wrong"}, 401, "missing or wrong publish secret"),
    ({"topic": "has space"}, 400, "invalid topic"),
    ({"payload": [1]}, 400, "payload must be a JSON object"),
    ({"payload": {"big": "x" * 1100000}}, 413, "body larger than max_publish_bytes (1048576)"),
])
def test_publish_refusals_raise_publish_failed_at_once(pusherd_server, kwargs, status, reason):
    sleeps = []
    args = dict({"topic": "public:client-refused", "secret": PUBLISH_SECRET, "payload": {}}, **kwargs)
    with pytest.raises(PublishFailed) as info:
        publish(args.pop("topic"), "e", args.pop("payload"), url=pusherd_server.http_url, sleep=sleeps.append,
                **args)
    assert (info.value.status, info.value.reason) == (status, reason)
    assert sleeps == []  # not retried


def test_publish_server_down_retries_with_backoff_then_fails():
    sleeps = []
    url = "http://127.0.0.1:%d" % free_port()
    with pytest.raises(PublishFailed) as info:
        publish("public:x", "e", url=url, secret="s", retries=3, backoff=0.01, sleep=sleeps.append)
    assert info.value.status is None
    assert info.value.reason == "cannot reach %s/publish: Connection refused" % url
    assert sleeps == [0.01, 0.02, 0.04]


def test_publish_timeout_is_not_retried():
    """A server that accepts but never answers: the event may have been taken, so no retry."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        sleeps = []
        with pytest.raises(PublishFailed) as info:
            publish("public:x", "e", url=url, secret="s", timeout=0.3, sleep=sleeps.append)
    assert info.value.status is None and "no answer" in info.value.reason
    assert sleeps == []


class _Unavailable(http.server.BaseHTTPRequestHandler):
    """Answers like a pusherd whose broker is down for the first `fail` requests."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(self.headers["Authorization"])
        if len(self.server.bodies) <= self.server.fail:
            body, status = b'{"error": "broker unavailable: redis"}', 503
        else:
            body, status = b'{"status": "ok", "published": 1}', 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Retry-After", self.server.retry_after)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def unavailable():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    server.bodies, server.fail, server.retry_after = [], 2, "0"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_publish_retries_503_then_succeeds(unavailable):
    sleeps = []
    url = "http://127.0.0.1:%d" % unavailable.server_address[1]
    assert publish("public:x", "e", url=url, secret="s", backoff=0.01, sleep=sleeps.append)["published"] == 1
    assert sleeps == [0.01, 0.02] and unavailable.bodies == ["Bearer s"] * 3


@pytest.mark.parametrize("value", ["\u00b2", "\u00b9", "1\u00b3", "Wed, 21 Oct 2015 07:28:00 GMT", ""])
def test_publish_retry_after_not_in_ascii_digits_falls_back_to_the_backoff(unavailable, value):
    """Retry-After: ² passed str.isdigit() and then crashed float() with a ValueError out of publish()."""
    unavailable.retry_after = value
    sleeps = []
    url = "http://127.0.0.1:%d" % unavailable.server_address[1]
    assert publish("public:x", "e", url=url, secret="s", backoff=0.01, sleep=sleeps.append)["published"] == 1
    assert sleeps == [0.01, 0.02]


def test_publish_503_after_the_last_retry_raises_with_the_reason(unavailable):
    unavailable.fail = 10
    url = "http://127.0.0.1:%d" % unavailable.server_address[1]
    with pytest.raises(PublishFailed) as info:
        publish("public:x", "e", url=url, secret="s", retries=1, backoff=0.01, sleep=lambda s: None)
    assert (info.value.status, info.value.reason) == (503, "broker unavailable: redis")
    assert len(unavailable.bodies) == 2


def test_publish_needs_a_secret(monkeypatch):
    monkeypatch.delenv("PUSHERD_PUBLISH_SECRET", raising=False)
    with pytest.raises(ValueError):
        publish("public:x", "e", url="http://127.0.0.1:1")


def test_mint_token_joins_like_the_rails_helper(pusherd_factory, phx_connect):
    daemon = pusherd_factory({"issuer": ISSUER})
    token = mint_token(GUARDIAN_SECRET, sub={"id": 1, "crews": [2]}, listen=["private:*"], publish=[],
                       ttl="1h", csrf_token="page-csrf", issuer=ISSUER)
    c = joined(phx_connect, daemon, "private:crew-2", {"guardian_token": token, "csrf_token": "page-csrf"})
    assert c.push("private:crew-2", "msg", {})[1] == {"reason": "forbidden"}  # no publish claim
    status, response, _ = c.join("deploys:web", {"guardian_token": token, "csrf_token": "page-csrf"})
    assert (status, response) == ("error", {"reason": "forbidden"})
    expired = mint_token(GUARDIAN_SECRET, listen=["private:*"], ttl=-10, csrf_token="page-csrf", issuer=ISSUER)
    status, response, _ = c.join("private:late", {"guardian_token": expired, "csrf_token": "page-csrf"})
    assert (status, response) == ("error", {"reason": "token_expired"})

"""client: the publish endpoint of a base URL."""

import pytest

from pusherd import client


@pytest.mark.parametrize("given, endpoint", [
    ("http://h:4000", "http://h:4000/publish"),
    ("http://h:4000/", "http://h:4000/publish"),
    ("https://h/push/", "https://h/push/publish"),
    ("http://h:4000/publish", "http://h:4000/publish"),
    ("h:4000", "http://h:4000/publish"),
])
def test_publish_url(given, endpoint):
    assert client.publish_url(given) == endpoint


@pytest.mark.parametrize("given, endpoint", [
    ("http://h:4000", "http://h:4000/presence?topic=private%3Aops+1"),
    ("https://h/push/", "https://h/push/presence?topic=private%3Aops+1"),
    ("http://h:4000/publish", "http://h:4000/presence?topic=private%3Aops+1"),
    ("h:4000", "http://h:4000/presence?topic=private%3Aops+1"),
])
def test_presence_url(given, endpoint):
    assert client.presence_url(given, "private:ops 1") == endpoint


def test_presence_reads_are_retried_on_timeouts_and_503_publishes_are_not_retried_on_timeouts(monkeypatch):
    calls = []

    def attempt(endpoint, data, headers, timeout, method="POST"):
        calls.append((method, data is None, "Content-Type" in headers))
        if len(calls) == 1:
            raise TimeoutError()
        return 200, b'{"7": {"metas": []}}', {}

    monkeypatch.setattr(client, "_attempt", attempt)
    assert client.presence("t", url="http://h", secret="s", sleep=lambda s: None) == {"7": {"metas": []}}
    assert calls == [("GET", True, False), ("GET", True, False)]
    calls.clear()
    with pytest.raises(client.PublishFailed, match="no answer"):
        client.publish("t", "e", {}, url="http://h", secret="s", sleep=lambda s: None)
    assert calls == [("POST", False, True)]
    with pytest.raises(ValueError):
        monkeypatch.delenv("PUSHERD_PUBLISH_SECRET", raising=False)
        client.presence("t", url="http://h")

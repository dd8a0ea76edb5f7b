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

"""config.values.mask_url: every password form a broker URL can carry is masked; the rest is kept."""

import pytest
from hypothesis import given, strategies as st

from pusherd.config.values import MASK, mask_url


@pytest.mark.parametrize("url,shown", [
    ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://user:s3cret@h/1", "rediss://user:***@h/1"),
    ("redis://s3cret@h/0", "redis://***@h/0"),              # a lone userinfo may be a password too
    ("redis://h:6379/0?password=s3cret&db=1", "redis://h:6379/0?password=***&db=1"),
    ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
    ("redis://h/0?PASSWORD=s3cret", "redis://h/0?PASSWORD=***"),
    ("redis+sentinel://:s3cret@a:1,b:2/m/0?sentinel_password=s3cret",
     "redis+sentinel://:***@a:1,b:2/m/0?sentinel_password=***"),
    ("redis://h/0#s3cret", "redis://h/0#***"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("wss://push.example.com/events", "wss://push.example.com/events"),
    ("memory", "memory"),
    ("s3cret", MASK),                                       # not a URL: maybe a secret in the wrong key
    (None, None),
])
def test_mask_url(url, shown):
    assert mask_url(url) == shown


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="@:/?#&;="),
               max_size=30).map(lambda text: "Zq9" + text))
def test_no_password_form_leaks(password):
    for url in ("redis://u:%s@h/0" % password, "redis://:%s@h/0" % password, "redis://h/0?password=%s" % password,
                "unix:///s?db=0&password=%s" % password):
        assert password not in mask_url(url)

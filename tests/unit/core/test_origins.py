"""pusherd.core.origins: which browser origins may open a WebSocket."""

import pytest
from hypothesis import given, settings, strategies as st

from pusherd.core.origins import OriginPolicy

SETTINGS = settings(max_examples=100, deadline=None)

CASES = [
    # patterns, origin, allowed
    (["https://app.example.com"], "https://app.example.com", True),
    (["https://app.example.com"], "https://APP.Example.COM", True),
    (["https://app.example.com"], "HTTPS://app.example.com", True),
    (["https://app.example.com"], "https://app.example.com/", True),
    (["https://app.example.com"], "https://app.example.com:443", True),      # default port
    (["https://app.example.com:443"], "https://app.example.com", True),
    (["http://app.example.com"], "http://app.example.com:80", True),
    (["https://app.example.com"], "https://app.example.com:8443", False),
    (["https://app.example.com:8443"], "https://app.example.com:8443", True),
    (["https://app.example.com:8443"], "https://app.example.com", False),
    (["https://app.example.com"], "http://app.example.com", False),          # scheme mismatch
    (["http://app.example.com"], "https://app.example.com", False),
    (["https://app.example.com"], "https://app.example.com:80", False),
    (["https://app.example.com"], "https://evil.com", False),
    (["https://app.example.com"], "https://app.example.com.evil.com", False),
    (["https://app.example.com"], "https://xapp.example.com", False),
    (["https://app.example.com"], "https://sub.app.example.com", False),
    # subdomain wildcard
    (["https://*.example.com"], "https://sub.example.com", True),
    (["https://*.example.com"], "https://a.b.example.com", True),
    (["https://*.example.com"], "https://SUB.EXAMPLE.COM", True),
    (["https://*.example.com"], "https://sub.example.com:443", True),
    (["https://*.example.com"], "https://example.com", False),
    (["https://*.example.com"], "https://evilexample.com", False),
    (["https://*.example.com"], "https://example.com.evil.com", False),
    (["https://*.example.com"], "https://sub.example.com.evil.com", False),
    (["https://*.example.com"], "https://.example.com", False),
    (["https://*.example.com"], "http://sub.example.com", False),
    (["https://*.example.com"], "https://sub.example.com:8443", False),
    # port wildcard
    (["http://localhost:*"], "http://localhost:3000", True),
    (["http://localhost:*"], "http://localhost:8080", True),
    (["http://localhost:*"], "http://localhost", True),
    (["http://localhost:*"], "https://localhost:3000", False),
    (["http://localhost:*"], "http://localhost.evil.com:3000", False),
    (["http://localhost:*"], "http://127.0.0.1:3000", False),
    (["http://[::1]:*"], "http://[::1]:3000", True),
    (["http://[::1]:3000"], "http://[::1]:3000", True),
    (["http://[::1]:3000"], "http://[::1]:3001", False),
    # several patterns
    (["https://a.com", "http://localhost:*"], "https://a.com", True),
    (["https://a.com", "http://localhost:*"], "http://localhost:1", True),
    (["https://a.com", "http://localhost:*"], "https://b.com", False),
    ([], "https://a.com", False),
    # "*" must be explicit, and then allows anything (even garbage and no origin)
    (["*"], "https://anything.example", True),
    (["*"], "null", True),
    (["*"], None, True),
    (["https://a.com", "*"], "https://b.com", True),
]


@pytest.mark.parametrize("patterns,origin,allowed", CASES)
def test_origins(patterns, origin, allowed):
    assert OriginPolicy(patterns).allows(origin) is allowed


@pytest.mark.parametrize("origin", [
    None, "", "null", "file://", "file:///etc/passwd", "https://a.com/path", "https://a.com/?q=1",
    "https://a.com#frag", "https://user@a.com", "https://user:pass@a.com", "a.com", "//a.com", "https://",
    "https://:443", "http://[::1", "chrome-extension://abc", " ", "https://a.com:443@evil.com",
])
def test_garbage_origins_are_refused(origin):
    assert OriginPolicy(["https://a.com", "https://*.a.com", "http://localhost:*"]).allows(origin) is False


@pytest.mark.parametrize("pattern", [
    "", "null", "a.com", "https://", "https://a.com/path", "https://a.com/?x=1", "https://user@a.com", "file://",
    "//a.com", "http://[::1",
])
def test_invalid_pattern_raises_value_error(pattern):
    with pytest.raises(ValueError):
        OriginPolicy([pattern])


def test_patterns_are_kept():
    policy = OriginPolicy(("https://a.com", "*"))
    assert policy.patterns == ("https://a.com", "*")
    assert policy.any


labels = st.text(alphabet="abex-0", min_size=1, max_size=5)
hosts = st.lists(labels | st.sampled_from(["example", "com", "localhost", "*", ""]), min_size=1, max_size=4) \
    .map(".".join)
origins = st.builds(lambda scheme, userinfo, host, port, tail: scheme + "://" + userinfo + host + port + tail,
                    st.sampled_from(["https", "http", "HTTPS", "ws", "file", ""]),
                    st.sampled_from(["", "", "", "user@", "a:b@"]),
                    hosts | st.sampled_from(["[::1]", "[::1", "example.com"]),
                    st.sampled_from(["", "", ":443", ":80", ":3000", ":", ":abc", ":99999"]),
                    st.sampled_from(["", "", "/", "/x", "?q", "#f"]))


@SETTINGS
@given(st.one_of(st.text(max_size=40), origins))
def test_allows_never_raises(origin):
    policy = OriginPolicy(["https://app.example.com", "https://*.example.com", "http://localhost:*"])
    result = policy.allows(origin)
    assert isinstance(result, bool)
    if result:
        assert "@" not in origin
        lowered = origin.lower()
        assert lowered.startswith(("https://app.example.com", "http://localhost")) or \
            (lowered.startswith("https://") and ".example.com" in lowered)


@SETTINGS
@given(hosts, st.booleans())
def test_subdomain_wildcard_property(host, under_example):
    if under_example:
        host = host + ".example.com"
    policy = OriginPolicy(["https://*.example.com"])
    origin = "https://" + host
    expected = host.endswith(".example.com") and len(host) > len(".example.com")
    assert policy.allows(origin) is expected


@pytest.mark.parametrize("pattern", ["https://*example.com", "https://a.*.com", "https://a.com:abc", "https://*.", "https://*"])
def test_typos_in_patterns_are_errors_not_silent_refusals(pattern):
    with pytest.raises(ValueError):
        OriginPolicy([pattern])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["http://localhost:3000", "https://a.example.com", "https://example.com",
                                           "http://localhost:3001", "HTTPS://A.EXAMPLE.COM:443", "null", ""]),
                          st.text(max_size=40)), max_size=40))
def test_a_kept_verdict_is_the_verdict(origins):
    """OriginPolicy keeps its verdicts by origin: asked again, in any order, it answers as a
    policy that never saw the origin before."""
    patterns = ["http://localhost:3000", "https://*.example.com"]
    kept = OriginPolicy(patterns)
    for origin in origins + origins[::-1]:
        assert kept.allows(origin) == OriginPolicy(patterns).allows(origin), origin


def test_the_kept_verdicts_stay_bounded_whatever_origins_come():
    from pusherd.core import origins as module
    policy = OriginPolicy(["http://localhost:3000"])
    for i in range(10 * module.ORIGINS_KEPT):
        assert not policy.allows("http://evil%d.example" % i)
        assert not policy.allows("http://x" + "y" * module.ORIGIN_CHARS_KEPT + str(i))  # too long to keep
    assert len(policy._verdicts) <= module.ORIGINS_KEPT
    assert all(len(origin) <= module.ORIGIN_CHARS_KEPT for origin in policy._verdicts)
    assert policy.allows("http://localhost:3000")

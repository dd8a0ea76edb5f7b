"""cli: where ``pusherd publish`` finds the daemon, its payload, and what ``pusherd token`` mints."""

import io

import pytest

from pusherd import cli
from pusherd.config import from_mapping
from pusherd.core.tokens import Verifier


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


@pytest.mark.parametrize("command", ["publish", "presence"])
@pytest.mark.parametrize("url", ["not a url", "ftp://example.org", "http://", "http://a b:4000"])
def test_a_url_that_is_no_http_url_is_a_usage_error(command, url):
    """Exit 2 with the option named, as the README says of bad arguments (an outside trial found
    exit 1 and a failed request to 'http://not a url/publish')."""
    err = io.StringIO()
    args = [command, "--url", url, "--secret", "s", "--retries", "0", "public:x"] + (["e"] if command == "publish" else [])
    assert cli.main(args, environ={}, stdin=io.StringIO(), stdout=io.StringIO(), stderr=err) == 2
    assert err.getvalue() == "pusherd %s: --url is not an http(s) URL: %r\n" % (command, url)
    err = io.StringIO()
    assert cli.main(args[:1] + args[3:], environ={"PUSHERD_URL": url}, stdin=io.StringIO(), stdout=io.StringIO(),
                    stderr=err) == 2
    assert "PUSHERD_URL is not an http(s) URL" in err.getvalue()

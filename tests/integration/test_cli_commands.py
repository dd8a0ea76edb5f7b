"""`pusherd publish` and `pusherd token` as a deploy script runs them, against a real pusherd."""

import json
import os
import subprocess
import sys
import time

import pytest

from pusherd_testing import GUARDIAN_SECRET, ISSUER, PUBLISH_SECRET, ROOT, Pusherd, free_port, joined

pytestmark = pytest.mark.integration


def pusherd_cmd(*args, env=None, stdin=None, timeout=30):
    """Run `python -m pusherd ARGS` with a clean environment (plus `env`)."""
    environ = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("PUSHERD_URL", "PUSHERD_PUBLISH_SECRET", "PUSHERD_CONFIG", "PUSHERD_ENV", "RAILS_ENV"):
        environ.pop(name, None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pusherd", *args], env=environ, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon whose config file names a wildcard listen address, as a production pusher.yml would."""
    d = Pusherd(tmp_path_factory.mktemp("cli"), {"issuer": ISSUER}).start()
    d.settings["listen"] = "0.0.0.0:%d" % d.port
    d.write_config(d.settings)
    yield d
    d.stop()


def test_publish_finds_the_daemon_and_secret_through_the_config(daemon, phx_connect):
    c = joined(phx_connect, daemon, "public:cli-config")
    result = pusherd_cmd("publish", "public:cli-config", "new_version", '{"version": "abc123"}',
                         "--config", str(daemon.config_path), "--env", "test")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "ok", "published": 1}
    assert c.expect(event="new_version")["payload"] == {"version": "abc123"}


def test_publish_config_and_env_from_the_environment(daemon, phx_connect):
    c = joined(phx_connect, daemon, "public:cli-environ")
    result = pusherd_cmd("publish", "public:cli-environ", "e",
                         env={"PUSHERD_CONFIG": str(daemon.config_path), "RAILS_ENV": "test"})
    assert result.returncode == 0, result.stderr
    assert c.expect(event="e")["payload"] == {}


def test_publish_url_and_secret_from_flags_and_variables(daemon, phx_connect):
    c = joined(phx_connect, daemon, "public:cli-url")
    result = pusherd_cmd("publish", "public:cli-url", "a", '{"n": 1}', "--url", daemon.http_url,
                         "--secret", PUBLISH_SECRET)
    assert result.returncode == 0, result.stderr
    assert c.expect(event="a")["payload"] == {"n": 1}
    # No config file at all: the variables are enough (the embedded default is not consulted).
    result = pusherd_cmd("publish", "public:cli-url", "b", '{"n": 2}',
                         env={"PUSHERD_URL": daemon.http_url + "/publish", "PUSHERD_PUBLISH_SECRET": PUBLISH_SECRET,
                              "PUSHERD_ENV": "production"})
    assert result.returncode == 0, result.stderr
    assert c.expect(event="b")["payload"] == {"n": 2}


def test_publish_payload_from_stdin(daemon, phx_connect):
    c = joined(phx_connect, daemon, "public:cli-stdin")
    result = pusherd_cmd("publish", "public:cli-stdin", "s", "-", "--url", daemon.http_url,
                         "--secret", PUBLISH_SECRET, stdin='{"from": "stdin", "list": [1, 2]}\n')
    assert result.returncode == 0, result.stderr
    assert c.expect(event="s")["payload"] == {"from": "stdin", "list": [1, 2]}


def test_publish_wrong_secret_exits_1_with_the_servers_reason(daemon, phx_connect):
    c = joined(phx_connect, daemon, "public:cli-secret")
    result = pusherd_cmd("publish", "public:cli-secret", "e", "--url", daemon.http_url, "--secret", "wrong")
    assert result.returncode == 1
    assert result.stderr.strip() == "pusherd publish: 401 missing or wrong publish secret"
    assert "wrong" not in result.stdout
    c.assert_silent()


@pytest.mark.parametrize("args, reason", [
    (("bad topic", "e"), "400 invalid topic"),
    (("public:x", "bad\tevent"), "400 invalid event"),
    (("public:x", "phx_join"), "400 invalid event: a name phoenix.js reserves (phx_*, chan_reply_*, presence_*)"),
    (("public:x", "e", "[1, 2]"), "400 payload must be a JSON object"),
])
def test_publish_refused_by_the_server_prints_its_reason(daemon, args, reason):
    result = pusherd_cmd("publish", *args, "--config", str(daemon.config_path), "--env", "test")
    assert result.returncode == 1
    assert result.stderr.strip() == "pusherd publish: " + reason


def test_publish_bad_json_payload_is_a_usage_error_and_sends_nothing(daemon, phx_connect):
    c = joined(phx_connect, daemon, "public:cli-badjson")
    for payload in ('{"version": ', "{'single': 'quotes'}"):
        result = pusherd_cmd("publish", "public:cli-badjson", "e", payload, "--url", daemon.http_url,
                             "--secret", PUBLISH_SECRET)
        assert result.returncode == 2
        assert "PAYLOAD_JSON is not valid JSON" in result.stderr
    c.assert_silent()


def test_publish_server_down_exits_1_after_its_retries():
    port = free_port()
    result = pusherd_cmd("publish", "public:x", "e", "--url", "http://127.0.0.1:%d" % port,
                         "--secret", PUBLISH_SECRET, "--retries", "2")
    assert result.returncode == 1
    refused = "pusherd publish: cannot reach http://127.0.0.1:%d/publish: Connection refused" % port
    assert result.stderr.splitlines() == [refused + "; retrying in 0.25s", refused + "; retrying in 0.5s", refused]


def test_publish_retries_until_the_daemon_comes_up(tmp_path, phx_connect):
    """A deploy hook that runs while pusherd restarts still gets its event through."""
    d = Pusherd(tmp_path)
    environ = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "pusherd", "publish", "public:late", "e", '{"n": 1}',
                             "--url", d.http_url, "--secret", PUBLISH_SECRET, "--retries", "8"],
                            env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stderr.readline()  # the first attempt was refused: the daemon is not up yet
        assert "Connection refused; retrying" in first, first
        d.start()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert json.loads(out)["published"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        d.stop()


def test_publish_bad_config_exits_2_with_the_problems(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("production:\n  listen: nowhere\n")
    result = pusherd_cmd("publish", "public:x", "e", "--config", str(bad), "--env", "production")
    assert result.returncode == 2
    assert "configuration error" in result.stderr and "listen" in result.stderr


def test_token_joins_exactly_what_it_grants(daemon, phx_connect):
    result = pusherd_cmd("token", "--config", str(daemon.config_path), "--env", "test", "--sub", '{"id": 7}',
                         "--listen", "private:team-*", "--listen", "deploys:web", "--publish", "deploys:web",
                         "--csrf")
    assert result.returncode == 0, result.stderr
    token, csrf = result.stdout.splitlines()
    c = phx_connect(daemon.ws_url)
    params = {"guardian_token": token, "csrf_token": csrf}
    assert c.join("deploys:web", params)[0] == "ok"
    assert c.push("deploys:web", "msg", {"body": "hi"})[0] == "ok"
    status, response, _ = c.join("private:other", params)
    assert (status, response) == ("error", {"reason": "forbidden"})
    status, response, _ = c.join("deploys:web", {"guardian_token": token, "csrf_token": "not-the-csrf"})
    assert (status, response) == ("error", {"reason": "csrf_mismatch"})


def test_token_carries_the_configured_issuer_and_ttl(daemon):
    import jwt
    result = pusherd_cmd("token", "--config", str(daemon.config_path), "--env", "test", "--ttl", "15m",
                         "--csrf", "given-csrf")
    assert result.returncode == 0, result.stderr
    token, csrf = result.stdout.splitlines()
    assert csrf == "given-csrf"
    claims = jwt.decode(token, GUARDIAN_SECRET, algorithms=["HS256"], options={"verify_sub": False,
                                                                               "verify_aud": False})
    assert claims["iss"] == ISSUER and claims["aud"] == "csrf" and claims["sub"] == {}
    assert 14 * 60 <= claims["exp"] - time.time() <= 15 * 60
    assert "iat" not in claims  # exactly like the Rails helper


def test_token_without_csrf_prints_one_line(daemon, phx_connect):
    result = pusherd_cmd("token", "--config", str(daemon.config_path), "--env", "test", "--listen", "private:one")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    c = phx_connect(daemon.ws_url)
    assert c.join("private:one", {"guardian_token": lines[0]})[0] == "ok"


@pytest.mark.parametrize("args, message", [
    (("--sub", "{not json"), "--sub is not valid JSON"),
    (("--ttl", "soon"), "--ttl"),
    (("--ttl", "0"), "--ttl must be positive"),
])
def test_token_usage_errors(args, message):
    result = pusherd_cmd("token", "--secret", "s", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_no_arguments_still_means_serve():
    result = pusherd_cmd("--check-config")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["env"] == "development"

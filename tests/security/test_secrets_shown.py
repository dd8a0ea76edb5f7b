"""A Redis password in the broker URL is never shown: not by /healthz, not in 503 bodies, not in
log lines, not by --check-config (docs/security.md, "Secrets"). Every password form redis-py
accepts: the URL's userinfo, and a ``password=`` query parameter on ``redis://`` and ``unix://``."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from pusherd_testing import ROOT, PUBLISH_SECRET, RedisServer, require

pytestmark = pytest.mark.integration

PASSWORD = "redis-pw-0f9e8d7c6b5a"


def broker_urls(server, sock):
    return {
        "userinfo": "redis://:%s@127.0.0.1:%d/0" % (PASSWORD, server.port),
        "query": "redis://127.0.0.1:%d/0?password=%s" % (server.port, PASSWORD),
        "unix-query": "unix://%s?db=0&password=%s" % (sock, PASSWORD),
    }


@pytest.mark.parametrize("form", ["userinfo", "query", "unix-query"])
def test_redis_password_in_the_broker_url_is_never_shown(tmp_path, pusherd_factory, form):
    require(shutil.which("redis-server") is not None, "redis-server not installed (apt-get install redis-server)")
    sock = tmp_path / "redis.sock"
    server = RedisServer(tmp_path, args=["--requirepass", PASSWORD, "--unixsocket", str(sock),
                                         "--unixsocketperm", "700"]).start()
    try:
        url = broker_urls(server, sock)[form]
        d = pusherd_factory({"broker": url})
        assert d.publish("public:pw", "e", {})[0] == 200          # the password works: Redis took it
        shown = []
        status, body, _ = d.request("GET", "/healthz")
        assert (status, body["broker"]) == (200, "redis")
        shown.append(json.dumps(body))
        check = subprocess.run([sys.executable, "-m", "pusherd", "--check-config", "--config", str(d.config_path),
                                "--env", d.env], capture_output=True, text=True, cwd=str(ROOT), timeout=30)
        assert check.returncode == 0, check.stderr
        assert "***" in json.loads(check.stdout)["broker"]
        shown.append(check.stdout + check.stderr)
        server.kill()
        deadline = time.monotonic() + 15
        while d.request("GET", "/healthz")[0] != 503:
            assert time.monotonic() < deadline, "/healthz never reported the outage"
            time.sleep(0.1)
        status, body, _ = d.request("GET", "/healthz")
        shown.append(json.dumps(body))
        status, body, _ = d.request("POST", "/publish", {"topic": "public:pw", "event": "e"},
                                    {"Authorization": "Bearer " + PUBLISH_SECRET})
        assert status == 503
        shown.append(json.dumps(body))
        d.wait_log("unavailable (")
        shown.append(d.log())
        for text in shown:
            assert PASSWORD not in text
    finally:
        server.stop()

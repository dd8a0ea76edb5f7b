"""A restart as the browsers see it: the real phoenix.js (every bundled version, default
reconnect settings) is told to go away with 1001 by a stopping pusherd and, by itself,
reconnects and rejoins to the next instance on the same listener (held by the test as PID 1
holds pusherd.socket), then receives what that instance publishes.
"""

import signal
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lifecycle_testing import ManagedPusherd, listening_socket  # noqa: E402
from pusherd_testing import http  # noqa: E402
from pusherd.client import mint_token  # noqa: E402

pytestmark = pytest.mark.interop

GUARDIAN_SECRET = "interop-guardian-secret-0123456789abcdef"
PUBLISH_SECRET = "interop-publish-secret-0123456789"
ORIGIN = "http://localhost:3000"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "pusher.yml"
    path.write_text(yaml.safe_dump({"test": {
        "guardian_secret": GUARDIAN_SECRET, "publish_secret": PUBLISH_SECRET,
        "allowed_origins": [ORIGIN], "drain_seconds": 0.2, "log_level": "info"}}))
    return path


def test_phoenix_js_reconnects_and_rejoins_the_next_instance(phx, phx_version, config):
    sock = listening_socket()
    port = sock.getsockname()[1]
    instances = []
    try:
        instances.append(ManagedPusherd(config, listeners=[sock]).start())
        client = phx(phx_version)
        client.connect("ws://127.0.0.1:%d/events" % port, origin=ORIGIN)
        client.expect(type="open")
        csrf = "csrf-token-from-the-page"
        token = mint_token(GUARDIAN_SECRET, sub={"id": 1}, listen=["deploys:web"], publish=[],
                           ttl=3600, csrf_token=csrf)
        client.join("c1", "deploys:web", {"guardian_token": token, "csrf_token": csrf})
        client.expect(type="join", id="c1", status="ok")

        old = instances[0]
        old.signal(signal.SIGTERM)
        client.expect(type="close", code=1001, timeout=10)
        assert old.wait(10) == 0

        new = ManagedPusherd(config, listeners=[sock]).start()
        instances.append(new)
        client.expect(type="open", timeout=15)  # reconnected on its own
        client.expect(type="join", id="c1", status="ok", timeout=15)  # and rejoined with its params
        status, _body, _ = http("POST", "http://127.0.0.1:%d/publish" % port,
                                {"topic": "deploys:web", "event": "new_version", "payload": {"v": 2}},
                                {"Authorization": "Bearer " + PUBLISH_SECRET, "Content-Type": "application/json"})
        assert status == 200
        event = client.expect(type="event", id="c1", event="new_version", timeout=5)
        assert event["payload"] == {"v": 2}
        assert "101 GET /events/websocket" in new.log()
    finally:
        for instance in instances:
            instance.stop()
        sock.close()

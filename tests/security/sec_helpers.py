"""Helpers for the hostile-input tests: RSS of a process, a liveness probe, and (from
pusherd_testing) the raw WebSocket client that can send what real clients won't."""

from pusherd_testing import (GUARDIAN_SECRET, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT,  # noqa: F401
                             PUBLISH_SECRET, PhxClient, Pusherd, RawWS, rails_token, require)


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc."""
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def still_serving(daemon, topic="public:sentinel"):
    """A fresh socket can join and receive a publish: the daemon is unharmed."""
    c = PhxClient(daemon.ws_url)
    try:
        assert c.join(topic)[0] == "ok"
        status, _ = daemon.publish(topic, "alive", {"ok": True})
        assert status == 200
        assert c.expect(event="alive", topic=topic)["payload"] == {"ok": True}
    finally:
        c.close()
    return True

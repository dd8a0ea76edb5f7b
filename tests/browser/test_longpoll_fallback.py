"""phoenix.js's ``longPollFallbackMs`` in real headless Chromium (Debian's chromium): a page whose
WebSockets the network blocks (a proxy that passes HTTP requests but no upgrade, as many
corporate proxies do: the upgrade fails, phoenix.js falls back) works on long-poll (joins, receives, pushes), and keeps receiving
across a pusherd restart (on whichever transport phoenix.js then picks): never stranded.

The page is pusherd's own /demo (same origin: the long-poll GETs carry no Origin, only
Sec-Fetch-Site) with phoenix.js 1.8.16 from the npm package; the script below is what an app
would write. Needs what test_demo_page.py needs.
"""

import json
import time

import pytest

from longpoll_testing import RequestProxy
from test_demo_page import browser_tools, chromium, demo_daemon  # noqa: F401  (its fixtures and daemon)

pytestmark = pytest.mark.integration

PAGE_SCRIPT = """
(() => {
  window.lp = {joined: 0, events: [], transports: [], pushed: 0};
  const socket = new Phoenix.Socket("/events", {
    longPollFallbackMs: 300, reconnectAfterMs: () => 200, rejoinAfterMs: () => 200});
  socket.onOpen(() => lp.transports.push(socket.transport === Phoenix.LongPoll ? "longpoll" : "websocket"));
  const channel = socket.channel("public:fallback", {});
  channel.on("ev", (payload) => lp.events.push(payload.n));
  channel.join().receive("ok", () => { lp.joined += 1; });
  socket.connect();
  window.lpChannel = channel;
  window.lpSocket = socket;
  return true;
})()
"""


def wait_for(chromium, expression, timeout=15.0):
    """Until `expression` is true in the page (evaluated through the DevTools protocol: the demo
    page's CSP forbids the eval that waitForFunction would use)."""
    deadline = time.monotonic() + timeout
    while not chromium.call("evaluate", expression="!!(%s)" % expression):
        assert time.monotonic() < deadline, "page never got %s: %s\n%s" % (expression, page_state(chromium),
                                                                           "\n".join(chromium.console))
        time.sleep(0.1)


def page_state(chromium):
    return chromium.call("evaluate", expression="JSON.stringify(window.lp)")


def test_a_page_whose_websocket_is_blocked_works_on_long_poll_and_across_a_restart(chromium, pusherd_factory,
                                                                                   request):
    daemon = demo_daemon(pusherd_factory, longpoll_window="2s", drain_seconds="0s")
    proxy = RequestProxy([daemon.port], mode="fixed")
    request.addfinalizer(proxy.close)
    assert chromium.call("goto", url="http://127.0.0.1:%d/demo" % proxy.port)["status"] == 200
    chromium.call("evaluate", expression=PAGE_SCRIPT)
    wait_for(chromium, "window.lp.joined >= 1")
    state = json.loads(page_state(chromium))
    assert state["transports"][-1] == "longpoll", state

    assert daemon.publish("public:fallback", "ev", {"n": 1})[0] == 200
    wait_for(chromium, "window.lp.events.includes(1)")
    chromium.call("evaluate", expression="""
        lpChannel.push("msg", {text: "from the page"}).receive("ok", () => { lp.pushed += 1; }); true""")
    wait_for(chromium, "window.lp.pushed === 1")
    assert "/events/longpoll" in daemon.log()

    daemon.restart()            # SIGTERM (the drain answers the pending poll) and start again
    wait_for(chromium, "window.lp.joined >= 2")
    assert daemon.publish("public:fallback", "ev", {"n": 2})[0] == 200
    wait_for(chromium, "window.lp.events.includes(2)")
    state = json.loads(page_state(chromium))
    assert state["events"] == [1, 2], state

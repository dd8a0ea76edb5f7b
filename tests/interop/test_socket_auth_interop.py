"""Interop: socket-level tokens with the real phoenix.js — connect params on 1.2, 1.5 and 1.8
(``new Socket(url, {params: {guardian_token, csrf_token}})``), and 1.8's ``authToken`` option;
channels joined without params get the socket's claims; a bad socket token is refused at the
upgrade and the page never opens."""

from __future__ import annotations

import pytest

from pusherd_testing import rails_token

pytestmark = pytest.mark.interop

ORIGIN = "http://localhost:3000"
NO_RETRY = dict(reconnectAfterMs=60000, rejoinAfterMs=60000, timeout=3000)


@pytest.mark.parametrize("version,style", [("1.2", "params"), ("1.5", "params"), ("1.8", "params"),
                                           ("1.8", "token-param"), ("1.8", "authToken")])
def test_a_socket_token_lets_channels_join_without_params(phx, pusherd_server, version, style):
    topic = "private:sockauth-%s-%s" % (version.replace(".", ""), style)
    token, csrf = rails_token(listen=[topic])
    c = phx(version)
    if style == "authToken":
        c.connect(pusherd_server.ws_url, {"csrf_token": csrf}, origin=ORIGIN, authToken=token, **NO_RETRY)
    else:
        name = "token" if style == "token-param" else "guardian_token"
        c.connect(pusherd_server.ws_url, {name: token, "csrf_token": csrf}, origin=ORIGIN, **NO_RETRY)
    c.expect(type="open")
    c.join("c1", topic, {})
    reply = c.expect(type="join", id="c1")
    assert (reply["status"], reply["response"]) == ("ok", {}), c.transcript()
    assert pusherd_server.publish(topic, "notification", {"n": 1})[0] == 200
    assert c.expect(type="event", id="c1", event="notification")["payload"] == {"n": 1}
    c.join("c2", "private:not-granted", {})
    refused = c.expect(type="join", id="c2")
    assert (refused["status"], refused["response"]) == ("error", {"reason": "forbidden"})
    assert token not in pusherd_server.log()


@pytest.mark.parametrize("version,style", [("1.5", "params"), ("1.8", "params"), ("1.8", "authToken")])
def test_a_bad_socket_token_never_opens_the_socket(phx, pusherd_server, version, style):
    token, csrf = rails_token(listen=["private:x"], ttl=-60)   # expired
    c = phx(version)
    if style == "authToken":
        c.connect(pusherd_server.ws_url, {"csrf_token": csrf}, origin=ORIGIN, authToken=token, **NO_RETRY)
    else:
        c.connect(pusherd_server.ws_url, {"guardian_token": token, "csrf_token": csrf}, origin=ORIGIN, **NO_RETRY)
    c.expect(type="error")
    c.expect_none(type="open", within=0.5)
    pusherd_server.wait_log("refused WebSocket upgrade: socket token token_expired")

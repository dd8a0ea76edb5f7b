"""Socket-level tokens, the most common Phoenix pattern: the join token comes in the socket's
connect params (``new Socket(url, {params: {guardian_token, csrf_token}})`` or ``{token}``) or in
phoenix.js 1.8's ``authToken`` (a ``base64url.bearer.phx.`` subprotocol); it is verified at the
upgrade (a bad or expired one: 403, as Phoenix's connect/3 returning :error), and channels
joined without a token of their own use the socket's claims."""

import base64
import time

import pytest
from websockets.exceptions import InvalidStatus

from pusherd_testing import PhxClient, RawWS, rails_token
from sec_helpers import still_serving

pytestmark = pytest.mark.integration


def auth_token_protocol(token: str) -> str:
    """What phoenix.js 1.8 offers: btoa(token) with the padding removed."""
    return "base64url.bearer.phx." + base64.b64encode(token.encode()).decode().rstrip("=")


@pytest.mark.parametrize("style", ["guardian_token", "token", "authToken"])
def test_a_socket_token_grants_joins_without_params(pusherd_server, style):
    token, csrf = rails_token(listen=["private:sock-%s" % style])
    if style == "authToken":
        c = PhxClient(pusherd_server.ws_url, params={"csrf_token": csrf},
                      subprotocols=["phoenix", auth_token_protocol(token)])
        assert c.ws.subprotocol == "phoenix"          # the bearer entry is never echoed
    else:
        c = PhxClient(pusherd_server.ws_url, params={style: token, "csrf_token": csrf})
    try:
        assert c.join("private:sock-%s" % style)[:2] == ("ok", {})
        assert c.join("private:other")[:2] == ("error", {"reason": "forbidden"})   # not in its listen claim
        assert pusherd_server.publish("private:sock-%s" % style, "e", {"n": 1})[0] == 200
        assert c.expect(event="e")["payload"] == {"n": 1}
    finally:
        c.close()
    assert token not in pusherd_server.log()         # tokens in URLs never reach a log line


@pytest.mark.parametrize("case,reason", [
    ("garbage", "invalid_token"),
    ("expired", "token_expired"),
    ("wrong-csrf", "csrf_mismatch"),
    ("no-csrf", "csrf_mismatch"),
    ("garbage-authToken", "invalid_token"),
])
def test_a_bad_socket_token_is_refused_at_the_upgrade(pusherd_server, case, reason):
    token, csrf = rails_token(listen=["private:x"], ttl=-60 if case == "expired" else 3600)
    params, protocols = {"guardian_token": token, "csrf_token": csrf}, None
    if case == "garbage":
        params["guardian_token"] = "not.a.jwt"
    elif case == "wrong-csrf":
        params["csrf_token"] = "other"
    elif case == "no-csrf":
        del params["csrf_token"]
    elif case == "garbage-authToken":
        params, protocols = {}, ["phoenix", "base64url.bearer.phx.%%%"]
    with pytest.raises(InvalidStatus) as info:
        PhxClient(pusherd_server.ws_url, params=params, subprotocols=protocols)
    assert info.value.response.status_code == 403
    assert reason.encode() in info.value.response.body
    pusherd_server.wait_log("refused WebSocket upgrade: socket token %s" % reason)
    assert token not in pusherd_server.log()
    assert still_serving(pusherd_server)


def test_a_channel_token_overrides_the_socket_token_for_its_channel(pusherd_server):
    socket_token, csrf = rails_token(listen=["private:own-a"])
    channel_token, csrf2 = rails_token(listen=["private:own-b"])
    c = PhxClient(pusherd_server.ws_url, params={"guardian_token": socket_token, "csrf_token": csrf})
    try:
        assert c.join("private:own-b")[:2] == ("error", {"reason": "forbidden"})
        assert c.join("private:own-b", {"guardian_token": channel_token, "csrf_token": csrf2})[:2] == ("ok", {})
        # the channel's own token is checked for that channel: a bad one is refused, not replaced
        assert c.join("private:own-a", {"guardian_token": "x.y.z", "csrf_token": csrf})[:2] == \
            ("error", {"reason": "invalid_token"})
        assert c.join("private:own-a")[:2] == ("ok", {})
    finally:
        c.close()


def test_a_socket_token_that_expires_on_an_open_socket_ends_its_channels(pusherd_factory):
    d = pusherd_factory({"heartbeat_timeout": 3600})
    token, csrf = rails_token(listen=["private:*"], ttl=3)
    c = PhxClient(d.ws_url, params={"guardian_token": token, "csrf_token": csrf})
    try:
        assert c.join("private:a")[:2] == ("ok", {})
        c.expect(event="phx_close", topic="private:a", timeout=10)   # the daemon's sweep ends it
        assert c.join("private:b")[:2] == ("error", {"reason": "token_expired"})
        assert c.join("public:still-fine")[:2] == ("ok", {})
    finally:
        c.close()


def test_a_socket_without_a_token_is_anonymous_as_before(pusherd_server):
    c = PhxClient(pusherd_server.ws_url)
    try:
        assert c.join("private:x")[:2] == ("error", {"reason": "authentication_required"})
        assert c.join("public:anon")[:2] == ("ok", {})
    finally:
        c.close()
    ws = RawWS(pusherd_server.port, path="/events/websocket?vsn=2.0.0&guardian_token=")  # empty: a bad token
    try:
        assert ws.status == 403
    finally:
        ws.close()

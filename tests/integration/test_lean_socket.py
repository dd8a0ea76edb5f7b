"""An open socket after SocketHandler.open() trimmed it (handlers.OpenSocketHandler, outbox.lean_stream):
Tornado still answers pings, completes close handshakes both ways and delivers broadcasts."""

import json
import urllib.request

from pusherd_testing import PUBLISH_SECRET


def publish(port, topic, event, payload):
    req = urllib.request.Request("http://127.0.0.1:%d/publish" % port, method="POST",
                                 data=json.dumps({"topic": topic, "event": event, "payload": payload}).encode(),
                                 headers={"Authorization": "Bearer " + PUBLISH_SECRET,
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def test_ping_pong_broadcast_and_client_close_on_a_trimmed_socket(pusherd_server, phx_connect):
    client = phx_connect(pusherd_server.ws_url)
    status, _, _ = client.join("public:lean")
    assert status == "ok"
    for i in range(3):  # pongs are written by Tornado through the trimmed IOStream
        assert client.ws.ping(b"p%d" % i).wait(5)
    publish(pusherd_server.port, "public:lean", "tick", {"n": 1})
    msg = client.expect(topic="public:lean", event="tick")
    assert msg["payload"] == {"n": 1}
    client.ws.close(1000, "bye")
    assert client.ws.close_code == 1000


def test_server_initiated_close_on_a_trimmed_socket(pusherd_server, phx_connect):
    client = phx_connect(pusherd_server.ws_url)
    client.join("public:lean2")
    client.send_raw(b"\xff\xfe not text")  # a binary frame pusherd does not accept: it closes
    code = client.close_code()
    assert code is not None and code != 1006

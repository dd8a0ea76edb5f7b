"""The transport contract: what every WebSocket transport does, on the wire, the same way.

pusherd has two WebSocket transports: the plain one on Tornado's public API
(transports/websocket.py, ``PUSHERD_FAST=0``) and the fast one (fast/websocket.py, the
default). Each test here runs against both, on a real daemon over real sockets, and the first
one checks that a scripted conversation gives the very same bytes on both.
"""

import json
import time

import pytest

from pusherd_testing import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Pusherd, RawWS, rails_token

pytestmark = pytest.mark.integration

TRANSPORTS = {"plain": "0", "fast": "1"}


@pytest.fixture(scope="module", params=sorted(TRANSPORTS))
def daemon(request, tmp_path_factory):
    d = Pusherd(tmp_path_factory.mktemp("transport-" + request.param),
                {"max_outbox_bytes": "256KiB", "max_frame_bytes": "16KiB", "client_events": ["msg"]},
                extra_env={"PUSHERD_FAST": TRANSPORTS[request.param]}).start()
    d.transport = request.param
    yield d
    d.stop()


def conversation(daemon, vsn):
    """A scripted page: join (with a token), a heartbeat, broadcasts, a push, a bad push, a leave.
    Returns every frame the server sent, as (opcode, bytes)."""
    token, csrf = rails_token(listen=["private:contract"], publish=["private:contract"])
    ws = RawWS(daemon.port, path="/events/websocket?vsn=%s" % vsn)
    frames = []

    def send(obj):
        if vsn.startswith("2."):
            ws.send_text(json.dumps(obj))
        else:
            join_ref, ref, topic, event, payload = obj
            ws.send_text(json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref}))

    def read(n):
        for _ in range(n):
            frames.append(ws.recv_frame())

    try:
        send(["1", "1", "private:contract", "phx_join", {"guardian_token": token, "csrf_token": csrf}])
        read(1)
        send([None, "2", "phoenix", "heartbeat", {}])
        read(1)
        for i in range(3):
            assert daemon.publish("private:contract", "e", {"i": i, "s": "é\ud800"})[0] == 200
        read(3)
        send(["1", "3", "private:contract", "msg", {"body": "hi"}])
        read(2)                                   # the broadcast and the reply, in either order
        send(["1", "4", "private:contract", "phx_reply", {}])
        read(1)
        send(["1", "5", "private:contract", "phx_leave", {}])
        read(2)
    finally:
        ws.close()
    return frames


@pytest.fixture(scope="module")
def transcripts(tmp_path_factory):
    """The conversation on both transports, each on a daemon of its own."""
    out = {}
    for name, fast in TRANSPORTS.items():
        d = Pusherd(tmp_path_factory.mktemp("transcript-" + name), {"client_events": ["msg"]},
                    extra_env={"PUSHERD_FAST": fast}).start()
        try:
            out[name] = {vsn: conversation(d, vsn) for vsn in ("2.0.0", "1.0.0")}
        finally:
            d.stop()
    return out


def normalized(frames):
    """The push's broadcast and its reply may come in either order: compare them as a set."""
    head, pair, tail = frames[:5], frames[5:7], frames[7:]
    return head, sorted(pair), tail


@pytest.mark.parametrize("vsn", ["2.0.0", "1.0.0"])
def test_both_transports_send_the_same_bytes(transcripts, vsn):
    plain, fast = transcripts["plain"][vsn], transcripts["fast"][vsn]
    assert all(op == OP_TEXT for op, _ in plain + fast)
    assert normalized(plain) == normalized(fast)
    first = json.loads(plain[0][1])
    reply = first[4] if vsn.startswith("2.") else first["payload"]
    assert reply == {"status": "ok", "response": {}}
    assert b"\\ud800" in plain[2][1]                # a lone surrogate written escaped, valid UTF-8
    plain[2][1].decode("utf-8")


def test_replies_and_broadcasts_keep_their_order(daemon):
    ws = RawWS(daemon.port)
    try:
        assert ws.join("public:order")[4]["status"] == "ok"
        for i in range(50):
            assert daemon.publish("public:order", "e", {"i": i})[0] == 200
        ws.send_text(json.dumps([None, "9", "phoenix", "heartbeat", {}]))
        seen = [json.loads(ws.recv_frame()[1]) for _ in range(51)]
        assert [m[4]["i"] for m in seen[:50]] == list(range(50))    # published before the heartbeat
        assert seen[50][3] == "phx_reply" and seen[50][1] == "9"
    finally:
        ws.close()


def test_pings_are_answered_with_pongs(daemon):
    ws = RawWS(daemon.port)
    try:
        ws.send_frame(OP_PING, b"are you there")
        assert ws.recv_frame() == (OP_PONG, b"are you there")
    finally:
        ws.close()


def test_a_frame_over_max_frame_bytes_closes_1009(daemon):
    ws = RawWS(daemon.port)
    try:
        ws.send_text(json.dumps(["1", "1", "public:big", "msg", {"x": "y" * 20000}]))
        assert ws.close_outcome() == ("close", 1009)
    finally:
        ws.close()


def test_a_reader_that_stops_is_closed_1013_and_the_others_get_everything(daemon):
    stalled = RawWS(daemon.port, rcvbuf=4096)
    reader = RawWS(daemon.port)
    try:
        assert stalled.join("public:flood")[4]["status"] == "ok"
        assert reader.join("public:flood")[4]["status"] == "ok"
        blob = "x" * 60000
        got = []
        for i in range(400):                     # up to 24 MB: more than the kernel buffers hold
            assert daemon.publish("public:flood", "e", {"i": i, "blob": blob})[0] == 200
            got.append(json.loads(reader.recv_frame()[1])[4]["i"])
            if i % 20 == 19 and "slow consumer (outbox over 262144 bytes)" in daemon.log():
                break
        assert got == list(range(len(got)))      # the reader lost nothing meanwhile
        daemon.wait_log("slow consumer (outbox over 262144 bytes)")
        stalled.close()     # its close frame waits behind what it never read: Tornado would wait 5 s
        deadline = time.monotonic() + 10
        while daemon.request("GET", "/healthz")[1]["connections"] != 1:
            assert time.monotonic() < deadline, "the stalled socket was never let go"
            time.sleep(0.05)
    finally:
        stalled.close()
        reader.close()


def test_a_drain_closes_every_socket_with_1001(tmp_path):
    for name, fast in TRANSPORTS.items():
        (tmp_path / name).mkdir()
        d = Pusherd(tmp_path / name, {"drain_seconds": 0.2}, extra_env={"PUSHERD_FAST": fast}).start()
        sockets = [RawWS(d.port) for _ in range(3)]
        try:
            for ws in sockets:
                assert ws.join("public:drain")[4]["status"] == "ok"
            d.proc.send_signal(15)
            outcomes = [ws.close_outcome() for ws in sockets]
            assert outcomes == [("close", 1001)] * 3, (name, outcomes)
        finally:
            for ws in sockets:
                ws.close()
            d.stop()

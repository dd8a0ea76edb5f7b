"""Self-test of the phoenix.js interop harness, WITHOUT pusherd.

A throwaway Phoenix-protocol server (Tornado, in a background thread) answers
V1/V2 joins, pushes, leaves and heartbeats; the real phoenix.js clients
(1.2 / 1.4 / 1.5 / 1.8) are driven through ``driver.js`` and every assertion is
made on what the client library actually reported.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket
from tornado.ioloop import IOLoop

pytestmark = pytest.mark.interop

TOPIC = "deploys:web"
JOIN_PARAMS = {"guardian_token": "gt-123", "csrf_token": "csrf-456"}


# ---------------------------------------------------------------------------
# Throwaway Phoenix-protocol server
# ---------------------------------------------------------------------------

class Conn:
    """One client connection (WebSocket or long-poll session) on the fake server."""

    def __init__(self, fake, transport, request, send, close=None):
        self.fake, self.transport, self.send_text, self.close_fn = fake, transport, send, close
        self.vsn = request.query_arguments.get("vsn", [b"1.0.0"])[-1].decode()
        self.v2 = self.vsn.startswith("2.")
        self.origin = request.headers.get("Origin")
        self.query = {k: [x.decode() for x in v] for k, v in request.query_arguments.items()}
        self.frames = []      # (raw text, decoded dict)
        self.joins = {}       # topic -> join_ref (the join's ref)

    def encode(self, join_ref, ref, topic, event, payload):
        if self.v2:
            return json.dumps([join_ref, ref, topic, event, payload])
        return json.dumps({"topic": topic, "event": event, "payload": payload, "ref": ref})

    def reply(self, msg, status, response):
        self.send_text(self.encode(msg["join_ref"], msg["ref"], msg["topic"], "phx_reply",
                                   {"status": status, "response": response}))

    def handle(self, raw):
        if self.v2:
            join_ref, ref, topic, event, payload = json.loads(raw)[:5]
        else:
            o = json.loads(raw)
            join_ref, ref, topic, event, payload = o.get("join_ref"), o["ref"], o["topic"], o["event"], o["payload"]
        msg = dict(join_ref=join_ref, ref=ref, topic=topic, event=event, payload=payload)
        with self.fake.cond:
            self.frames.append((raw, msg))
            self.fake.cond.notify_all()
        if topic == "phoenix" and event == "heartbeat":
            self.reply(msg, "ok", {})
        elif event == "phx_join":
            if topic.startswith("forbidden:"):
                self.reply(msg, "error", {"reason": "unauthorized"})
                return
            self.joins[topic] = ref
            self.reply(msg, "ok", {"topic": topic, "vsn": self.vsn})
            with self.fake.cond:
                self.fake.join_count += 1
                n = self.fake.join_count
            # a broadcast: join_ref null (V2) / ref null
            self.send_text(self.encode(None, None, topic, "new_version", {"n": n, "sha": "abc123"}))
        elif event == "phx_leave":
            self.reply(msg, "ok", {})
            jr = self.joins.pop(topic, None)
            self.send_text(self.encode(jr, jr, topic, "phx_close", {}))
        elif event == "echo":
            self.reply(msg, "ok", {"echo": payload})
        elif event == "forbidden":
            self.reply(msg, "error", {"reason": "forbidden"})
        elif event == "kick_me":
            self.reply(msg, "ok", {})
            jr = self.joins.pop(topic, None)
            self.send_text(self.encode(jr, jr, topic, "phx_close", {}))
        elif event == "crash_me":
            jr = self.joins.pop(topic, None)
            self.send_text(self.encode(jr, jr, topic, "phx_error", {}))
        elif event == "send_null":
            self.reply(msg, "ok", {})
            self.send_text(self.encode(None, None, topic, "null_payload", None))
            self.send_text(self.encode(None, None, topic, "after_null", {"ok": True}))
        # "noreply" and anything else: no reply (client times out)


class WSHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, fake):
        self.fake = fake
        self.conn = None

    def check_origin(self, origin):
        return True

    def open(self):
        self.conn = Conn(self.fake, "websocket", self.request, self.write_message, self.close)
        self.fake.add(self.conn)

    def on_message(self, message):
        self.conn.handle(message)

    def on_close(self):
        self.fake.remove(self.conn)


class LongPollHandler(tornado.web.RequestHandler):
    """Minimal long-poll (V2, ndjson POSTs) as client 1.8 speaks it."""

    def initialize(self, fake):
        self.fake = fake

    def _session(self):
        tokens = self.get_query_arguments("token")
        return self.fake.lp_sessions.get(tokens[-1]) if tokens else None

    async def get(self):
        sess = self._session()
        if sess is None:
            token = uuid.uuid4().hex
            sess = {"buf": [], "event": asyncio.Event()}
            sess["conn"] = Conn(self.fake, "longpoll", self.request, lambda text, s=sess: self._enqueue(s, text))
            self.fake.lp_sessions[token] = sess
            self.fake.add(sess["conn"])
            self.write({"status": 410, "token": token, "messages": []})
            return
        if not sess["buf"]:
            sess["event"].clear()
            try:
                await asyncio.wait_for(sess["event"].wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        msgs, sess["buf"] = sess["buf"], []
        self.write({"status": 200 if msgs else 204, "token": self.get_query_arguments("token")[-1], "messages": msgs})

    @staticmethod
    def _enqueue(sess, text):
        sess["buf"].append(text)
        sess["event"].set()

    def post(self):
        sess = self._session()
        if sess is None:
            self.write({"status": 410})
            return
        for line in self.request.body.decode().split("\n"):
            if line.strip():
                sess["conn"].handle(line)
        self.write({"status": 200})


class DeniedHandler(tornado.web.RequestHandler):
    """What Phoenix does when connect/2 refuses: HTTP 403, empty body, on the upgrade request."""

    def get(self):
        self.set_status(403)


class FakePhoenixServer:
    def __init__(self):
        self.cond = threading.Condition()
        self.conns = []          # every connection ever opened, in order
        self.open_conns = set()
        self.lp_sessions = {}
        self.join_count = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-phoenix", daemon=True)

    # called on the server thread
    def add(self, conn):
        with self.cond:
            self.conns.append(conn)
            self.open_conns.add(conn)
            self.cond.notify_all()

    def remove(self, conn):
        with self.cond:
            self.open_conns.discard(conn)
            self.cond.notify_all()

    def _run(self):
        asyncio.set_event_loop(asyncio.new_event_loop())
        self.ioloop = IOLoop.current()
        app = tornado.web.Application([
            (r"/events/websocket", WSHandler, {"fake": self}),
            (r"/events/longpoll", LongPollHandler, {"fake": self}),
            (r"/denied/websocket", DeniedHandler),
        ])
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        self.http = tornado.httpserver.HTTPServer(app)
        self.http.add_sockets(sockets)
        self._ready.set()
        self.ioloop.start()
        # Writes still pending (write_message's Tasks) end here, not in a closed loop, where
        # they would be garbage as never-awaited coroutines (a RuntimeWarning at random).
        loop = self.ioloop.asyncio_loop
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.ioloop.close(all_fds=True)

    def start(self):
        self._thread.start()
        assert self._ready.wait(5), "fake server did not start"
        self.ws_url = f"ws://127.0.0.1:{self.port}/events"
        return self

    def stop(self):
        def _stop():
            self.http.stop()
            for c in list(self.open_conns):
                if c.close_fn:
                    c.close_fn(1001, "server stopping")
            self.ioloop.stop()
        self.ioloop.add_callback(_stop)
        self._thread.join(5)

    # called from the test thread
    def close_all(self, code=1001, reason="going away"):
        def _close():
            for c in list(self.open_conns):
                if c.close_fn:
                    c.close_fn(code, reason)
        self.ioloop.add_callback(_close)

    def wait_for(self, predicate, timeout=5.0, what="condition"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"fake server: timed out waiting for {what}; conns={len(self.conns)}")
                self.cond.wait(remaining)

    def frames(self, event=None):
        with self.cond:
            return [m for c in self.conns for _, m in c.frames if event is None or m["event"] == event]


@pytest.fixture
def fake_server():
    server = FakePhoenixServer().start()
    yield server
    server.stop()


FAST = dict(reconnectAfterMs=50, rejoinAfterMs=50, timeout=2000)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_full_lifecycle(phx, phx_version, fake_server):
    """open -> join ok -> broadcast -> push ok/error -> server close 1001 -> reconnect + rejoin -> leave."""
    c = phx(phx_version)
    vsn = c.vsn
    assert vsn == ("1.0.0" if phx_version == "1.2" else "2.0.0")
    ack = c.connect(fake_server.ws_url, params={"token": "abc"}, origin="http://localhost:3000", **FAST)
    assert ack["endpoint_url"] == f"{fake_server.ws_url}/websocket?token=abc&vsn={vsn}"
    assert ack["exact_version"].startswith(phx_version + ".")

    assert c.expect(type="transport_connect")["url"] == ack["endpoint_url"]
    c.expect(type="open")
    fake_server.wait_for(lambda: fake_server.conns, what="connection")
    conn = fake_server.conns[0]
    assert conn.vsn == vsn
    assert conn.origin == "http://localhost:3000"
    assert conn.query["token"] == ["abc"]

    # join
    c.join("c1", TOPIC, JOIN_PARAMS)
    join = c.expect(type="join", id="c1")
    assert join["status"] == "ok", join
    assert join["response"] == {"topic": TOPIC, "vsn": vsn}
    (raw_join, msg_join), = [f for f in conn.frames if f[1]["event"] == "phx_join"]
    assert msg_join["payload"] == JOIN_PARAMS
    assert raw_join.startswith("[" if vsn == "2.0.0" else "{"), raw_join
    assert join["join_ref"] == msg_join["ref"]

    # the broadcast sent right after the join reply
    ev = c.expect(type="event", id="c1", event="new_version")
    assert ev["topic"] == TOPIC and ev["payload"] == {"n": 1, "sha": "abc123"} and ev["ref"] is None

    # pushes: ok with response, error with reason
    c.push("c1", "echo", {"body": "hi"}, tag="p1")
    c.push("c1", "forbidden", {}, tag="p2")
    r1 = c.expect(type="push_reply", tag="p1")
    assert (r1["status"], r1["response"]) == ("ok", {"echo": {"body": "hi"}})
    r2 = c.expect(type="push_reply", tag="p2")
    assert (r2["status"], r2["response"]) == ("error", {"reason": "forbidden"})

    # server goes away with 1001: every version reconnects and rejoins
    fake_server.close_all(1001)
    close = c.expect(type="close")
    assert close["code"] == 1001
    chan_err = c.expect(type="channel_error", id="c1")
    assert chan_err["seq"] < close["seq"]  # every version errors the channels before onClose callbacks
    c.expect(type="open")
    rejoin = c.expect(type="join", id="c1")
    assert rejoin["status"] == "ok"
    assert rejoin["join_ref"] != join["join_ref"]
    assert c.expect(type="event", id="c1", event="new_version")["payload"]["n"] == 2
    assert len(fake_server.conns) == 2
    assert [m["payload"] for m in fake_server.frames("phx_join")] == [JOIN_PARAMS, JOIN_PARAMS]

    # leave: ok reply, then the channel closes
    c.leave("c1")
    assert c.expect(type="leave", id="c1")["status"] == "ok"
    c.expect(type="channel_close", id="c1")
    assert c.state()["channels"]["c1"]["state"] == "closed"

    # client disconnect: no reconnect afterwards
    c.disconnect()
    c.expect(type="disconnected")
    c.expect_none(type="open", within=0.3)
    assert len(c.events("c1")) == 2


def test_join_error_push_timeout_and_server_close(phx, phx_version, fake_server):
    c = phx(phx_version)
    c.connect(fake_server.ws_url, **FAST)
    c.expect(type="open")

    c.join("bad", "forbidden:x", {})
    bad = c.expect(type="join", id="bad")
    assert (bad["status"], bad["response"]) == ("error", {"reason": "unauthorized"})

    c.join("c1", TOPIC, JOIN_PARAMS)
    assert c.expect(type="join", id="c1")["status"] == "ok"
    c.push("c1", "noreply", {}, timeout=200, tag="t")
    t = c.expect(type="push_reply", tag="t")
    assert (t["status"], t["response"]) == ("timeout", {})

    # server-initiated phx_close (carries the join ref) closes the channel, no rejoin
    c.push("c1", "kick_me", {})
    c.expect(type="channel_close", id="c1")
    c.expect_none(lambda l: l.get("type") == "join" and l.get("id") == "c1", within=0.3)

    # a phx_error from the server errors the channel and it rejoins
    c.join("c2", "deploys:api", {})
    assert c.expect(type="join", id="c2")["status"] == "ok"
    c.push("c2", "crash_me", {})
    c.expect(type="channel_error", id="c2")
    assert c.expect(type="join", id="c2", timeout=5)["status"] == "ok"


def test_heartbeats_are_sent_and_answered(phx, phx_version, fake_server):
    c = phx(phx_version)
    c.connect(fake_server.ws_url, heartbeatIntervalMs=50)
    c.expect(type="open")
    fake_server.wait_for(lambda: len(fake_server.frames("heartbeat")) >= 3, what="3 heartbeats")
    hb = fake_server.frames("heartbeat")[0]
    assert hb["topic"] == "phoenix" and hb["payload"] == {} and isinstance(hb["ref"], str)
    c.expect_none(type="close", within=0.2)
    assert c.state()["connection"] == "open"


def test_trace_frames_and_logger(phx, fake_server):
    c = phx("1.8")
    c.connect(fake_server.ws_url, trace_frames=True, logger=True)
    c.expect(type="open")
    c.join("c1", TOPIC, {"a": 1})
    c.expect(type="join", id="c1", status="ok")
    out = c.expect(type="frame_out")
    assert json.loads(out["data"])[2:] == [TOPIC, "phx_join", {"a": 1}]
    frame_in = c.expect(type="frame_in", data=lambda d: '"phx_reply"' in d)
    assert json.loads(frame_in["data"])[3] == "phx_reply"
    c.expect(type="log", kind="push")


def test_refused_upgrade_is_reported(phx, phx_version, fake_server):
    """An HTTP 403 on the upgrade surfaces as an error + abnormal close, then the client retries."""
    c = phx(phx_version)
    c.connect(f"ws://127.0.0.1:{fake_server.port}/denied", reconnectAfterMs=50)
    err = c.expect(type="error")
    assert "403" in (err["message"] or ""), err
    assert c.expect(type="close")["code"] == 1006
    c.expect(type="transport_connect")
    c.expect(type="transport_connect")  # a retry happened
    c.expect_none(type="open", within=0.1)


def test_longpoll_transport_1_8(phx, fake_server):
    c = phx("1.8", env={"PHX_XHR": "1"})  # XMLHttpRequest for long-poll under Node
    c.connect(fake_server.ws_url, transport="longpoll", **FAST)
    c.expect(type="open")
    c.join("c1", TOPIC, JOIN_PARAMS)
    assert c.expect(type="join", id="c1")["status"] == "ok"
    assert c.expect(type="event", id="c1", event="new_version")["payload"]["n"] == 1
    c.push("c1", "echo", {"x": 1}, tag="lp")
    assert c.expect(type="push_reply", tag="lp")["response"] == {"echo": {"x": 1}}
    assert fake_server.conns[0].transport == "longpoll"


def test_harness_failures_are_loud(phx, fake_server):
    c = phx("1.2")
    assert c.exact_version == "1.2.1"
    with pytest.raises(AssertionError) as ei:
        c.expect(type="never_happens", timeout=0.2)
    msg = str(ei.value)
    assert "timed out" in msg and '"type": "ready"' in msg
    with pytest.raises(c.CommandError, match="unknown cmd"):
        c.send({"cmd": "bogus"})
    with pytest.raises(c.CommandError, match="not connected"):
        c.join("c1", TOPIC)
    with pytest.raises(c.CommandError, match="unknown phoenix version"):
        c.connect(fake_server.ws_url, version="0.13")
    c.connect(fake_server.ws_url)
    c.expect(type="open")
    c.join("c1", TOPIC)
    with pytest.raises(c.CommandError, match="in use"):
        c.join("c1", TOPIC)
    assert c.close() == 0


def test_null_payload_quirk(phx, phx_version, fake_server):
    """Client 1.2 throws on a null payload (reads payload.status); the driver reports it like a browser console would."""
    c = phx(phx_version)
    c.connect(fake_server.ws_url, **FAST)
    c.expect(type="open")
    c.join("c1", TOPIC)
    c.expect(type="join", id="c1", status="ok")
    c.push("c1", "send_null", {})
    if phx_version == "1.2":
        exc = c.expect(type="exception", where="onmessage")
        assert "reading 'status'" in exc["message"]
    else:
        assert c.expect(type="event", event="null_payload")["payload"] is None
    # the connection survives and later frames are still delivered
    assert c.expect(type="event", event="after_null")["payload"] == {"ok": True}
    assert [e["event"] for e in c.events("c1")][-1] == "after_null"
    assert len(c.events("c1", event="null_payload")) == (0 if phx_version == "1.2" else 1)

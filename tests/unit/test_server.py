"""server.py's lifecycle helpers without a running daemon: which inherited sockets serve what,
which settings changed on a reload, the open files limit, and how the drain spreads its 1001
closes (on stand-in sockets, in an event loop, no network); and one SocketHandler in-process
over loopback, for what only a real Tornado protocol object shows."""

import asyncio
import dataclasses
import resource
import socket
import sys
import time
from pathlib import Path

import pytest

from pusherd.framing import text_frame

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pusherd import config, server  # noqa: E402
from pusherd.core.broadcast import Broadcast  # noqa: E402
from pusherd.brokers.memory import MemoryBroker  # noqa: E402
from pusherd.core.protocol import V2  # noqa: E402
from pusherd.core.session import Send, Subscribe  # noqa: E402


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


# --------------------------------------------------------------------------- inherited sockets


def test_split_inherited_by_name():
    http, metrics, stray = listener(), listener(), listener()
    got_http, got_metrics = server.split_inherited([("http", http), ("metrics", metrics), ("admin", stray)])
    assert got_http == [http] and got_metrics == [metrics]
    assert stray.fileno() == -1  # closed: nobody would accept on it
    for s in (http, metrics):
        s.close()


@pytest.mark.parametrize("name", ["unknown", "pusherd.socket"])
def test_unnamed_socket_is_the_http_listener(name):
    s = listener()
    assert server.split_inherited([(name, s)]) == ([s], [])
    s.close()


def test_unnamed_socket_is_not_taken_when_http_is_named():
    http, other = listener(), listener()
    assert server.split_inherited([("unknown", other), ("http", http)]) == ([http], [])
    assert other.fileno() == -1
    http.close()


def test_non_listening_and_datagram_sockets_are_refused(caplog):
    unbound = socket.socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    assert server.split_inherited([("http", unbound), ("http", udp)]) == ([], [])
    assert unbound.fileno() == -1 and udp.fileno() == -1
    assert "not a listening stream socket" in caplog.text


# --------------------------------------------------------------------------- reload


def settings(**overrides):
    base = config.from_mapping({"test": {"guardian_secret": "a" * 32, "publish_secret": "b" * 32}},
                               "test", "<test>", {}, lambda path: "")
    return dataclasses.replace(base, **overrides)


def test_changed_keys_names_secrets_without_values():
    old = settings()
    new = settings(guardian_secrets=("c" * 32,), allowed_origins=("https://x.test",), log_level="debug")
    keys = old.changed_keys(new)
    assert keys == ["guardian_secret", "allowed_origins", "log_level"]
    assert old.changed_keys(dataclasses.replace(old, source="other.yml")) == []


def test_daemon_reload_reports_restart_keys_against_the_start():
    daemon = server.Daemon(settings())
    assert daemon.reload(settings(port=5000, history=(config.HistoryRule("a:*", 5, 60.0),))) == [
        "listen", "history"]
    # still pending on the next reload: it was never applied
    assert daemon.reload(settings(port=5000)) == ["listen"]
    assert daemon.generation == 3


# --------------------------------------------------------------------------- limits


def test_raise_nofile_limit(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 20000))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    assert server.raise_nofile_limit() == (1024, 20000)
    assert calls == [(20000, 20000)]


def test_raise_nofile_limit_caps_unlimited(monkeypatch):
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    server.raise_nofile_limit()
    assert calls == [(server.NOFILE_CEILING, resource.RLIM_INFINITY)]


def test_raise_nofile_limit_failure_is_logged_not_raised(monkeypatch, caplog):
    def refuse(which, limits):
        raise ValueError("not allowed")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert server.raise_nofile_limit() == (1024, 1024)
    assert "cannot raise the open files limit" in caplog.text


# --------------------------------------------------------------------------- drain


class FakeSocket:
    """Stands in for a SocketHandler: records when and how it was closed."""

    def __init__(self, daemon, closed):
        self.daemon, self.closed = daemon, closed

    def close_with(self, code, reason):
        self.closed.append((time.monotonic(), code))
        self.daemon.sockets.discard(self)


@pytest.mark.parametrize("count,seconds", [(2000, 0.5), (7, 0.5), (3, 0.0)])
def test_drain_spreads_1001_closes_in_batches(count, seconds):
    async def run():
        daemon = server.Daemon(settings())
        closed = []
        daemon.sockets.update(FakeSocket(daemon, closed) for _ in range(count))
        began = time.monotonic()
        await daemon.drain(seconds)
        return began, time.monotonic(), closed, daemon

    began, ended, closed, daemon = asyncio.run(run())
    assert daemon.draining and not daemon.sockets
    assert [code for _, code in closed] == [1001] * count
    instants = sorted({round(at - began, 2) for at, _ in closed})
    batches = max(1, min(count, int(seconds * 10)))
    assert len(instants) >= batches * 0.8, instants  # one instant per batch (timer jitter aside)
    if batches > 1:
        assert instants[-1] >= seconds * (batches - 1) / batches * 0.9, instants
    assert ended - began < seconds + 1.0


# --------------------------------------------------------------------------- join confirmation


class GatedBroker(MemoryBroker):
    """A memory broker whose subscriptions take effect only when the test opens the gate."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.confirmed = set()

    def active(self, topic):
        return topic in self.confirmed

    async def activate(self, topic):
        await self.gate.wait()
        self.confirmed.add(topic)


class JoiningSocket:
    def __init__(self):
        self.serializer = V2
        self.frames = []
        self.session = self
        self.closed = False
        self.current = True

    def is_current(self, topic, join_ref):
        return self.current

    def send_frame(self, frame):
        self.frames.append(frame)

    def send_text(self, text):  # as SocketHandler.send_text
        self.send_frame(text_frame(text.encode("utf-8")))


@pytest.mark.parametrize("left_meanwhile", [False, True])
def test_a_join_reply_waits_for_the_broker_and_held_broadcasts_follow_it(left_meanwhile):
    async def run():
        broker = GatedBroker()
        daemon = server.Daemon(settings(), broker=broker)
        await broker.start(daemon.deliver)
        sock = JoiningSocket()
        task = asyncio.ensure_future(daemon.confirm_join(sock, Send("REPLY"), Subscribe("public:x"), "1"))
        for _ in range(3):
            await asyncio.sleep(0)
        await broker.publish(Broadcast("public:x", "early", {}))
        assert sock.frames == [], "nothing before the broker confirmed"
        sock.current = not left_meanwhile
        broker.gate.set()
        await task
        await broker.publish(Broadcast("public:x", "live", {}))
        return sock.frames, daemon.hub

    frames, hub = asyncio.run(run())
    if left_meanwhile:
        assert frames == [] and "public:x" not in hub.topics
    else:
        assert [(b"REPLY" in f, b"early" in f, b"live" in f) for f in frames] == \
            [(True, False, False), (False, True, False), (False, False, True)]
        assert hub.members("public:x") == 1


# --------------------------------------------------------------------------- the fan-out's register


async def eventually(predicate, seconds=1.0):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return predicate()


def test_a_pong_tornado_writes_for_a_socket_handler_marks_the_socket_dirty():
    """SocketHandler's protocol tells the outbox before Tornado writes a frame of its own, so the
    fan-out never writes into the middle of a pong or a close frame Tornado has not finished."""
    import tornado.httpserver
    import tornado.websocket

    async def run():
        daemon = server.Daemon(settings())
        sock = listener()
        sock.setblocking(False)
        http = tornado.httpserver.HTTPServer(daemon.make_app())
        http.add_sockets([sock])
        url = "ws://127.0.0.1:%d%s/websocket?vsn=2.0.0" % (sock.getsockname()[1], daemon.settings.path.rstrip("/"))
        client = await tornado.websocket.websocket_connect(url)
        (handler,) = daemon.sockets
        register = daemon.flush_queue
        fast = handler.outbox.fast_sock
        assert fast is not None and fast in register.owners
        assert fast not in register.dirty
        daemon.hub.subscribe("public:a", handler)
        client.ping(b"hi")
        assert await eventually(lambda: fast in register.dirty)  # Tornado wrote the pong
        daemon.deliver(Broadcast("public:a", "e", {"n": 1}))  # through the outbox, which finds the pong written
        assert fast not in register.dirty
        message = await asyncio.wait_for(client.read_message(), 5)
        assert message == V2.encode_broadcast("public:a", "e", {"n": 1}, None)
        client.close()
        assert await eventually(lambda: not daemon.sockets)
        assert fast not in register.owners and fast not in register.dirty  # released at close
        http.stop()
    asyncio.run(run())

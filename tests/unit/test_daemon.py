"""daemon.py's lifecycle without a running daemon: which inherited sockets serve what, which
settings changed on a reload, the open files limit, and how the drain spreads its 1001 closes
(on stand-in connections, in an event loop, no network)."""

import asyncio
import dataclasses
import resource
import socket
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pusherd import config  # noqa: E402
from pusherd import daemon as server  # noqa: E402


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


class FakeConnection:
    """Stands in for a connection: records when and how it was closed."""

    session = None

    def __init__(self, service, closed):
        self.service, self.closed = service, closed

    def close_with(self, code, reason):
        self.closed.append((time.monotonic(), code))
        self.service.closed(self)


@pytest.mark.parametrize("count,seconds", [(2000, 0.5), (7, 0.5), (3, 0.0)])
def test_drain_spreads_1001_closes_in_batches(count, seconds):
    async def run():
        daemon = server.Daemon(settings())
        closed = []
        daemon.service.connections.update(FakeConnection(daemon.service, closed) for _ in range(count))
        began = time.monotonic()
        await daemon.drain(seconds)
        return began, time.monotonic(), closed, daemon

    began, ended, closed, daemon = asyncio.run(run())
    assert daemon.service.draining and not daemon.service.connections
    assert [code for _, code in closed] == [1001] * count
    instants = sorted({round(at - began, 2) for at, _ in closed})
    batches = max(1, min(count, int(seconds * 10)))
    assert len(instants) >= batches * 0.8, instants  # one instant per batch (timer jitter aside)
    if batches > 1:
        assert instants[-1] >= seconds * (batches - 1) / batches * 0.9, instants
    assert ended - began < seconds + 1.0

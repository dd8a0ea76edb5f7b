"""Shared fixtures; the helpers behind them live in pusherd_testing.py."""

import pytest

from pusherd_testing import *  # noqa: F401,F403  (re-exported: older tests import them from conftest)
import shutil

from pusherd_testing import Pusherd, PhxClient, RedisServer, require


@pytest.fixture
def pusherd_factory(tmp_path):
    """Start daemons with custom config; every one is stopped at teardown."""
    started = []

    def start(overrides=None, **kwargs):
        daemon = Pusherd(tmp_path, overrides, **kwargs).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="module")
def pusherd_server(tmp_path_factory):
    """One daemon with the default test config, shared by a module (tests use distinct topics)."""
    daemon = Pusherd(tmp_path_factory.mktemp("pusherd")).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def phx_connect():
    clients = []

    def connect(url, **kwargs):
        client = PhxClient(url, **kwargs)
        clients.append(client)
        return client

    yield connect
    for c in clients:
        c.close()


@pytest.fixture
def raw_ws():
    """``raw_ws(port, path=..., headers=...)``: a RawWS (a bare RFC 6455 client), closed at teardown."""
    from pusherd_testing import RawWS
    opened = []

    def connect(*args, **kwargs):
        ws = RawWS(*args, **kwargs)
        opened.append(ws)
        return ws

    yield connect
    for ws in opened:
        ws.close()


@pytest.fixture
def redis_server(tmp_path_factory):
    """A fresh redis-server for one test (start, kill and restart it at will); stopped at teardown."""
    require(shutil.which("redis-server") is not None, "redis-server not installed (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        require(False, "redis-py not installed (pip install 'pusherd[redis]')")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()

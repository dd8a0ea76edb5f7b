"""serve() under a (fake) systemd with Redis down at start: READY=1 all the same, STATUS says so."""

import asyncio
import shutil
import socket
import urllib.error
import urllib.request

import pytest
import yaml

from pusherd_testing import BASE_CONFIG, RedisServer, free_port, require

pytestmark = pytest.mark.integration


def _fields(datagram: bytes) -> dict:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines() if "=" in line)


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=3) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_ready_with_redis_down_and_status_follows_the_broker(tmp_path, monkeypatch):
    require(shutil.which("redis-server") is not None, "redis-server not installed (apt-get install redis-server)")
    require(_has_redis_py(), "redis-py not installed (pip install 'pusherd[redis]')")
    from pusherd import config
    from pusherd.daemon import serve

    redis = RedisServer(tmp_path, port=free_port())
    port = free_port()
    path = tmp_path / "pusher.yml"
    path.write_text(yaml.safe_dump({"test": dict(BASE_CONFIG, broker=redis.url, drain_seconds=0.1)}))
    settings = config.load(str(path), "test", {}, listen="127.0.0.1:%d" % port)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))

    async def scenario():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        task = asyncio.ensure_future(serve(settings, stop_event=stop))
        try:
            ready = _fields(await loop.run_in_executor(None, notify.recv, 4096))
            assert ready["READY"] == "1"
            assert "UNAVAILABLE" in ready["STATUS"] and redis.url in ready["STATUS"]
            assert await loop.run_in_executor(None, _healthz, port) == 503
            await loop.run_in_executor(None, redis.start)
            while True:   # STATUS follows within about a second of the broker coming back
                fields = _fields(await loop.run_in_executor(None, notify.recv, 4096))
                if "STATUS" in fields and "UNAVAILABLE" not in fields["STATUS"]:
                    break
            assert redis.url in fields["STATUS"]
            assert await loop.run_in_executor(None, _healthz, port) == 200
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 10) == 0

    try:
        asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        redis.stop()
        notify.close()


def _has_redis_py() -> bool:
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return True

"""Real Redis topologies on loopback for the tests: Sentinel (a master, a replica, three
sentinels) and Cluster (masters with or without a replica each), started from Debian's
`redis-server`, `redis-sentinel` and `redis-cli`, on free ports, stopped at teardown.

Import the fixtures into a test module (``from redis_topologies import redis_sentinel``): pytest
uses fixtures a module imports. The session-scoped ones are shared and flushed before each test
that asks for them through the function-scoped ``*_clean`` fixtures; the others are fresh per
test (a test may kill their processes).
"""

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from pusherd_testing import _PORT_HIGH, _PORT_LOW, RedisServer, free_port, require

SERVICE = "mymaster"
#: Sentinel's and the cluster's failure detection in the tests (production defaults: 30 s and 15 s).
DOWN_AFTER_MS = 1000
NODE_TIMEOUT_MS = 1000


def _need(*programs: str) -> None:
    for program in programs:
        require(shutil.which(program) is not None,
                "%s not installed (apt-get install redis-server redis-sentinel)" % program)
    try:
        import redis  # noqa: F401
    except ImportError:
        require(False, "redis-py not installed (pip install 'pusherd[redis]')")


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        # Both below the ephemeral range (pusherd_testing.free_port: why).
        port = free_port(_PORT_LOW, _PORT_HIGH - 10000)
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def _client(port: int):
    import redis
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # a node still starting
            last = exc
        time.sleep(0.05)
    raise AssertionError("timed out waiting for %s (%s)" % (what, last))


class SentinelSetup:
    """A master, one replica and three sentinels (quorum 2). `url` is pusherd's broker URL."""

    def __init__(self, tmp: Path, down_after_ms: int = DOWN_AFTER_MS):
        self.tmp = tmp
        self.down_after_ms = down_after_ms
        self.servers: List[RedisServer] = []
        self.sentinels: List[Tuple[int, subprocess.Popen]] = []

    @property
    def url(self) -> str:
        return "redis+sentinel://%s/%s/0" % (",".join("127.0.0.1:%d" % p for p, _ in self.sentinels), SERVICE)

    def start(self) -> "SentinelSetup":
        _need("redis-server", "redis-sentinel")
        master = RedisServer(self._dir("master"), args=["--repl-diskless-sync-delay", "0"]).start()
        replica = RedisServer(self._dir("replica"), args=["--replicaof", "127.0.0.1", str(master.port),
                                                          "--repl-diskless-sync-delay", "0"]).start()
        self.servers = [master, replica]
        for i in range(3):
            port = free_port()
            conf = self._dir("sentinel%d" % i) / "sentinel.conf"
            conf.write_text("port %d\nbind 127.0.0.1\nprotected-mode no\ndir %s\n"
                            "sentinel monitor %s 127.0.0.1 %d 2\n"
                            "sentinel down-after-milliseconds %s %d\n"
                            "sentinel failover-timeout %s 10000\n"
                            "sentinel parallel-syncs %s 1\n"
                            % (port, conf.parent, SERVICE, master.port, SERVICE, self.down_after_ms, SERVICE, SERVICE))
            proc = subprocess.Popen([shutil.which("redis-sentinel"), str(conf)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.sentinels.append((port, proc))
        _wait(lambda: _client(replica.port).info("replication").get("master_link_status") == "up", 10,
              "the replica in sync")
        # A failover needs every sentinel to know the replica and the other sentinels (hello
        # messages every 2 s).
        for port, _ in self.sentinels:
            _wait(lambda: (len(_client(port).sentinel_slaves(SERVICE)) == 1
                           and len(_client(port).sentinel_sentinels(SERVICE)) == 2), 15,
                  "sentinel %d to know the replica and its peers" % port)
        return self

    def _dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def master_port(self, sentinel: int = 0) -> int:
        host, port = _client(self.sentinels[sentinel][0]).sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def master(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def replica(self) -> RedisServer:
        port = self.master_port()
        return next(s for s in self.servers if s.port != port)

    def wait_promoted(self, old_port: int, timeout: float = 30.0) -> int:
        """Until every sentinel names another master than `old_port`, and it says it is one."""
        def promoted():
            ports = {self.master_port(i) for i in range(len(self.sentinels))}
            if len(ports) != 1 or old_port in ports:
                return False
            return _client(ports.pop()).execute_command("ROLE")[0] == b"master"
        _wait(promoted, timeout, "a promotion")
        return self.master_port()

    def flush(self) -> None:
        _client(self.master().port).flushall()
        _client(self.master().port).script_flush()

    def stop(self) -> None:
        for _port, proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
        for _port, proc in self.sentinels:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        _stop_all(self.servers)


class ClusterSetup:
    """`masters` masters owning the 16384 slots evenly, each with `replicas` replicas."""

    def __init__(self, tmp: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = NODE_TIMEOUT_MS):
        self.tmp = tmp
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.servers: List[RedisServer] = []

    @property
    def url(self) -> str:
        return "redis+cluster://%s" % ",".join("127.0.0.1:%d" % s.port for s in self.servers[:self.masters])

    def start(self) -> "ClusterSetup":
        _need("redis-server", "redis-cli")
        for i in range(self.masters * (1 + self.replicas)):
            path = self.tmp / ("node%d" % i)
            path.mkdir(parents=True, exist_ok=True)
            self.servers.append(RedisServer(path, port=cluster_port(), args=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(path / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms), "--repl-diskless-sync-delay", "0"]).start())
        if self.masters < 3:   # redis-cli --cluster create wants three: assign the slots by hand
            assert self.replicas == 0, "replicas need 3 masters here"
            step = 16384 // self.masters
            for i, server in enumerate(self.servers):
                last = 16383 if i == self.masters - 1 else (i + 1) * step - 1
                _client(server.port).execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
                if i:
                    _client(server.port).execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
            self.wait_ok()
            return self
        out = subprocess.run([shutil.which("redis-cli"), "--cluster", "create"]
                             + ["127.0.0.1:%d" % s.port for s in self.servers]
                             + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        self.wait_ok()
        # A replica that never finished its first sync does not take over (no data age).
        for server in self.servers:
            _wait(lambda: _client(server.port).info("replication").get("master_link_status", "up") == "up", 15,
                  "replica %d in sync" % server.port)
        return self

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> None:
        """Until `old_port` owns no slot in the live nodes' view and the cluster is ok again."""
        _wait(lambda: old_port not in self.master_ports(), timeout, "a replica promoted in place of %d" % old_port)
        self.wait_ok(timeout)

    def wait_replicated(self, port: int, timeout: float = 10.0) -> None:
        """Until every replica of the master on `port` has taken all it wrote (replication is
        asynchronous: a master killed before its replica caught up takes its last writes along)."""
        master = _client(port)

        def caught_up():
            info = master.info("replication")
            offset = info["master_repl_offset"]
            replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            return replicas and all(r.get("offset", -1) >= offset for r in replicas)
        _wait(caught_up, timeout, "the replicas of %d caught up" % port)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and agrees on who owns the slots."""
        def ok():
            live = [s for s in self.servers if s.proc.poll() is None]
            views = set()
            for s in live:
                if b"cluster_state:ok" not in _client(s.port).execute_command("CLUSTER", "INFO"):
                    return False
                views.add(tuple(sorted((a, b, n[1]) for a, b, n, *_ in
                                       _client(s.port).execute_command("CLUSTER", "SLOTS"))))
            return len(views) == 1
        _wait(ok, timeout, "cluster_state:ok on every node")

    def master_ports(self) -> List[int]:
        live = next(s for s in self.servers if s.proc.poll() is None)
        return sorted({int(node[1]) for _a, _b, node, *_ in _client(live.port).execute_command("CLUSTER", "SLOTS")})

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def owner_port(self, key: bytes) -> int:
        live = next(s for s in self.servers if s.proc.poll() is None)
        from redis.crc import key_slot
        slot = key_slot(key)
        for start, end, node, *_ in _client(live.port).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(node[1])
        raise AssertionError("no owner for slot %d" % slot)

    def clients(self):
        """A client per live master."""
        return [_client(p) for p in self.master_ports()]

    def flush(self) -> None:
        for c in self.clients():
            c.flushall()
            c.script_flush()

    def stop(self) -> None:
        _stop_all(self.servers)


def _stop_all(servers: List[RedisServer]) -> None:
    """SIGTERM every server, then SIGKILL any that has not exited within 10 s."""
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.terminate()
    for server in servers:
        if server.proc is None:
            continue
        try:
            server.proc.wait(10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


def _started(setup, request):
    try:
        setup.start()
    except BaseException:
        setup.stop()
        raise
    request.addfinalizer(setup.stop)
    return setup


@pytest.fixture
def redis_sentinel(tmp_path_factory, request):
    """A fresh master + replica + 3 sentinels for one test (it may kill the master)."""
    return _started(SentinelSetup(tmp_path_factory.mktemp("sentinel")), request)


@pytest.fixture
def redis_cluster(tmp_path_factory, request):
    """A fresh 3-master cluster, a replica each, for one test (it may kill a master)."""
    return _started(ClusterSetup(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1), request)


@pytest.fixture(scope="session")
def _shared_sentinel(tmp_path_factory, request):
    return _started(SentinelSetup(tmp_path_factory.mktemp("sentinel-shared")), request)


@pytest.fixture(scope="session")
def _shared_cluster(tmp_path_factory, request):
    return _started(ClusterSetup(tmp_path_factory.mktemp("cluster-shared"), masters=3, replicas=0), request)


@pytest.fixture
def redis_sentinel_clean(_shared_sentinel):
    """The session's Sentinel setup, flushed: for tests that do not kill anything."""
    _shared_sentinel.flush()
    return _shared_sentinel


@pytest.fixture
def redis_cluster_clean(_shared_cluster):
    """The session's 3-master cluster (no replicas), flushed: for tests that do not kill anything."""
    _shared_cluster.flush()
    return _shared_cluster


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def kill(server: RedisServer, sig: int = signal.SIGKILL) -> Optional[int]:
    """SIGKILL one node; its port."""
    server.kill(sig)
    return server.port

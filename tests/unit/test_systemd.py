"""pusherd.systemd against real sockets: we play the service manager.

notify: a datagram socket with SO_PASSCRED stands in for PID 1 (path and
abstract addresses). listen_fds: a child process inherits real sockets at fd 3+
through an exec shim that sets LISTEN_PID to its own pid and then execs Python
(exec keeps the pid), exactly what systemd does.
"""

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the package is not necessarily installed
    sys.path.insert(0, str(REPO))

from pusherd import systemd  # noqa: E402


# --------------------------------------------------------------------------- helpers


class NotifyListener:
    """A stand-in for the manager's notify socket."""

    def __init__(self, tmp_path: Path, abstract: bool):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if abstract:
            name = f"pusherd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = tmp_path / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(5)

    @property
    def environ(self):
        return {"NOTIFY_SOCKET": self.address}

    def recv(self):
        """-> (list of raw lines, sender pid)"""
        data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return data.decode("utf-8").split("\n"), pid

    def recv_fields(self):
        lines, _pid = self.recv()
        return dict(line.split("=", 1) for line in lines)

    def assert_empty(self):
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(65536)
        finally:
            self.sock.settimeout(5)

    def close(self):
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    lst = NotifyListener(tmp_path, abstract=request.param == "abstract")
    yield lst
    lst.close()


# --------------------------------------------------------------------------- notify


def test_notify_sends_one_datagram_with_newline_joined_fields(listener):
    assert systemd.notify("READY=1", "STATUS=Serving", environ=listener.environ) is True
    lines, pid = listener.recv()
    assert lines == ["READY=1", "STATUS=Serving"]
    assert pid == os.getpid()
    listener.assert_empty()


def test_notify_uses_os_environ_by_default(listener, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    assert systemd.watchdog() is True
    assert listener.recv_fields() == {"WATCHDOG": "1"}


def test_ready_stopping_status_watchdog(listener):
    env = listener.environ
    assert systemd.ready(environ=env)
    assert listener.recv_fields() == {"READY": "1"}
    assert systemd.ready("Serving, config gen 1", environ=env)
    assert listener.recv_fields() == {"READY": "1", "STATUS": "Serving, config gen 1"}
    assert systemd.stopping("Draining 3 websocket(s)", environ=env)
    assert listener.recv_fields() == {"STOPPING": "1", "STATUS": "Draining 3 websocket(s)"}
    assert systemd.status("Waiting for redis", environ=env)
    assert listener.recv_fields() == {"STATUS": "Waiting for redis"}
    assert systemd.watchdog(environ=env)
    assert listener.recv_fields() == {"WATCHDOG": "1"}
    listener.assert_empty()


def test_status_is_kept_on_one_line(listener):
    systemd.status("line one\nREADY=1", environ=listener.environ)
    lines, _pid = listener.recv()
    assert lines == ["STATUS=line one READY=1"]


def test_status_utf8(listener):
    systemd.status("Verbindungen: 3 — ok ✓", environ=listener.environ)
    assert listener.recv_fields() == {"STATUS": "Verbindungen: 3 — ok ✓"}


def test_reloading_carries_monotonic_usec_in_the_same_datagram(listener):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading("Reloading configuration", environ=listener.environ)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines, pid = listener.recv()
    listener.assert_empty()  # everything came in ONE datagram
    fields = dict(line.split("=", 1) for line in lines)
    assert lines[0] == "RELOADING=1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    assert fields["STATUS"] == "Reloading configuration"
    assert pid == os.getpid()


def test_reloading_without_status(listener):
    systemd.reloading(environ=listener.environ)
    assert set(listener.recv_fields()) == {"RELOADING", "MONOTONIC_USEC"}


def test_extend_timeout_is_in_microseconds(listener):
    systemd.extend_timeout(2.5, environ=listener.environ)
    assert listener.recv_fields() == {"EXTEND_TIMEOUT_USEC": "2500000"}
    systemd.extend_timeout(-1, environ=listener.environ)
    assert listener.recv_fields() == {"EXTEND_TIMEOUT_USEC": "0"}


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_noop_outside_systemd(environ):
    assert systemd.notify("READY=1", environ=environ) is False
    assert systemd.ready(environ=environ) is False
    assert systemd.reloading(environ=environ) is False
    assert systemd.stopping(environ=environ) is False
    assert systemd.status("x", environ=environ) is False
    assert systemd.watchdog(environ=environ) is False
    assert systemd.extend_timeout(1, environ=environ) is False


def test_noop_outside_systemd_with_real_environment(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_no_fields_sends_nothing(listener):
    assert systemd.notify(environ=listener.environ) is False
    listener.assert_empty()


@pytest.mark.parametrize("address", [
    "/nonexistent/pusherd/notify.sock",
    "@pusherd-test-nobody-listens-" + uuid.uuid4().hex,
    "/" + "x" * 200,                 # longer than sun_path
    "/tmp/nul\0inside",
    "vsock:2:1234",                  # not supported: ignored
    "relative/path",
], ids=["missing-path", "missing-abstract", "too-long", "nul", "vsock", "relative"])
def test_send_errors_never_raise(address, caplog):
    caplog.set_level(logging.DEBUG, logger="pusherd.systemd")
    assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": address}) is False
    assert any(r.name == "pusherd.systemd" and r.levelno == logging.DEBUG for r in caplog.records)


def test_send_to_a_stream_socket_does_not_raise(tmp_path):
    path = tmp_path / "stream.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(str(path))
        srv.listen(1)
        assert systemd.notify("READY=1", environ={"NOTIFY_SOCKET": str(path)}) is False


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "200000"}, 0.1),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_PID": "1"}, None),                       # PID without USEC
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, 15.0),
])
def test_watchdog_interval(environ, expected):
    assert systemd.watchdog_interval(environ=environ) == expected


def test_watchdog_interval_for_our_pid():
    env = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(environ=env) == 15.0


def test_watchdog_interval_from_os_environ(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None


# --------------------------------------------------------------------------- listen_fds (in process)


def test_listen_fds_without_variables():
    assert systemd.listen_fds(environ={}) == []


def test_listen_fds_for_another_pid_is_empty_and_unsets():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http", "OTHER": "x"}
    assert systemd.listen_fds(environ=env) == []
    assert env == {"OTHER": "x"}


def test_listen_fds_unset_false_keeps_variables():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert systemd.listen_fds(environ=env, unset=False) == []
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


@pytest.mark.parametrize("env", [
    {"LISTEN_FDS": "1"},                                  # no LISTEN_PID
    {"LISTEN_PID": "self", "LISTEN_FDS": "x"},
    {"LISTEN_PID": "self", "LISTEN_FDS": "0"},
    {"LISTEN_PID": "self"},
    {"LISTEN_PID": "nope", "LISTEN_FDS": "1"},
])
def test_listen_fds_malformed_is_empty(env):
    env = {k: (str(os.getpid()) if v == "self" else v) for k, v in env.items()}
    assert systemd.listen_fds(environ=env) == []
    assert not any(k.startswith("LISTEN_") for k in env)


# --------------------------------------------------------------------------- listen_fds (real inheritance)

# Moves the fds named in argv[1] to 3, 4, ... (via high temporaries, so that a
# source that already sits at 3 or 4 is not clobbered), sets LISTEN_PID to its
# own pid and execs Python: exec keeps the pid, as under systemd.
SHIM = r"""
import fcntl, os, sys
srcs = [int(x) for x in sys.argv[1].split(",")]
tmp = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in srcs]
for fd in srcs:
    os.close(fd)
for i, fd in enumerate(tmp):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""

# Runs in the activated child: reports what listen_fds() returned.
CHILD = r"""
import json, os, socket, sys
from pusherd import systemd
blocking_before = [os.get_blocking(3 + i) for i in range(int(os.environ["LISTEN_FDS"]))]
socks = systemd.listen_fds()
out = {"pid": os.getpid(), "blocking_before": blocking_before, "sockets": [],
       "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_"))}
for name, s in socks:
    info = {"name": name, "fd": s.fileno(), "family": s.family.name, "type": s.type.name,
            "blocking": s.getblocking(), "inheritable": os.get_inheritable(s.fileno()),
            "listener": systemd.is_stream_listener(s)}
    if os.environ.get("CHILD_ACCEPT") == name:
        conn, _ = s.accept()          # the parent connected before we existed
        conn.sendall(b"hello from %d" % os.getpid())
        conn.close()
        info["accepted"] = True
    out["sockets"].append(info)
print(json.dumps(out))
"""


def spawn_activated(fds, env_extra, timeout=30):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.update(PYTHONPATH=str(REPO), LISTEN_FDS=str(len(fds)), **env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", SHIM, ",".join(map(str, fds)), "-c", CHILD],
        env=env, pass_fds=tuple(fds), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_listen_fds_in_a_socket_activated_child(tmp_path):
    tcp = socket.create_server(("127.0.0.1", 0))
    unix_path = tmp_path / "admin.sock"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(unix_path))
    unix.listen(8)
    client = socket.create_connection(tcp.getsockname(), timeout=10)
    try:
        # The connection waits in the accept queue, as with systemd before the service runs.
        out, _err = spawn_activated([tcp.fileno(), unix.fileno()],
                                    {"LISTEN_FDNAMES": "http:admin", "CHILD_ACCEPT": "http"})
        assert client.recv(100) == b"hello from %d" % out["pid"]
    finally:
        client.close()
        tcp.close()
        unix.close()

    assert out["blocking_before"] == [True, True]  # handed over blocking, like systemd
    assert out["env_left"] == []
    http, admin = out["sockets"]
    assert http == {"name": "http", "fd": 3, "family": "AF_INET", "type": "SOCK_STREAM",
                    "blocking": False, "inheritable": False, "listener": True,
                    "accepted": True}
    assert admin == {"name": "admin", "fd": 4, "family": "AF_UNIX", "type": "SOCK_STREAM",
                     "blocking": False, "inheritable": False, "listener": True}


@pytest.mark.parametrize("names", [None, "", "http"], ids=["unset", "empty", "too-few"])
def test_listen_fds_names_default_to_unknown(names):
    a = socket.create_server(("127.0.0.1", 0))
    b = socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        env = {} if names is None else {"LISTEN_FDNAMES": names}
        out, _err = spawn_activated([a.fileno(), b.fileno()], env)
    finally:
        a.close()
        b.close()
    got = [(s["name"], s["type"], s["listener"]) for s in out["sockets"]]
    expected_first = "http" if names == "http" else "unknown"
    assert got == [(expected_first, "SOCK_STREAM", True), ("unknown", "SOCK_DGRAM", False)]


def test_listen_fds_skips_a_non_socket_fd():
    read_end, write_end = os.pipe()
    sock = socket.create_server(("127.0.0.1", 0))
    try:
        out, err = spawn_activated([read_end, sock.fileno()], {"LISTEN_FDNAMES": "fifo:http"})
    finally:
        os.close(read_end)
        os.close(write_end)
        sock.close()
    assert [(s["name"], s["fd"]) for s in out["sockets"]] == [("http", 4)]
    assert "fd 3 (fifo) is not usable as a socket" in err

"""Start a real pusherd the way a service manager does, without systemd.

* ``NotifyListener`` plays PID 1's notify socket: a datagram socket with SO_PASSCRED that
  records every message with the sender's pid and the time it arrived.
* ``ManagedPusherd`` starts ``python -m pusherd`` with ``NOTIFY_SOCKET``/``WATCHDOG_USEC`` and,
  optionally, listening sockets that the *test* holds (as PID 1 holds a .socket unit's): they are
  passed at fd 3, 4, ... by an exec shim that sets ``LISTEN_PID`` to its own pid and then execs
  Python, so the pid systemd would check is the daemon's (reference/systemd.md, section 5.5).

Used by tests/integration/test_lifecycle.py and tests/interop/test_lifecycle_interop.py
(a module of its own, like pusherd_testing: `conftest` is ambiguous across folders).
"""

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from pusherd_testing import stop_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# dup the given fds to 3, 4, ... (via fds >= 100 so that none is overwritten), set
# LISTEN_PID to our pid, exec: the daemon keeps this pid.
SHIM = """\
import fcntl, os, sys
src = [int(x) for x in sys.argv[1].split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in src]
for fd in src:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def listening_socket(port: int = 0, host: str = "127.0.0.1", backlog: int = 128) -> socket.socket:
    """A listener like systemd's: bound, listening, left in blocking mode."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


class NotifyListener:
    """A stand-in for the manager's notify socket; collects messages in a thread."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.address = str(path)
        self.messages: List[Dict] = []  # {"fields": {...}, "lines": [...], "pid": n, "at": monotonic}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except OSError:
                return
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            lines = data.decode("utf-8").split("\n")
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            with self._cond:
                self.messages.append({"fields": fields, "lines": lines, "pid": pid, "at": time.monotonic()})
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Dict[str, str]], bool], timeout: float = 10.0,
                 after: int = 0) -> Dict:
        """The first message (index >= after) whose fields satisfy predicate."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages[after:]:
                    if predicate(msg["fields"]):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no matching notify message; got %r"
                                         % [m["lines"] for m in self.messages])
                self._cond.wait(left)

    def count(self) -> int:
        with self._cond:
            return len(self.messages)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(2)


class ManagedPusherd:
    """One ``python -m pusherd`` process started like a service manager would start it."""

    def __init__(self, config_path: Path, env_name: str = "test", *, listeners: Sequence[socket.socket] = (),
                 fd_names: Optional[Sequence[str]] = None, listen: Optional[str] = None,
                 notify: Optional[NotifyListener] = None, extra_env: Optional[Dict[str, str]] = None,
                 argv_prefix: Sequence[str] = (), preexec_fn=None):
        self.config_path = config_path
        self.env_name = env_name
        self.listeners = list(listeners)
        self.fd_names = list(fd_names) if fd_names is not None else ["http"] * len(self.listeners)
        self.listen = listen
        self.notify = notify
        self.extra_env = dict(extra_env or {})
        self.argv_prefix = list(argv_prefix)
        self.preexec_fn = preexec_fn
        self.proc: Optional[subprocess.Popen] = None
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._reader: Optional[threading.Thread] = None

    def argv(self) -> List[str]:
        args = ["-m", "pusherd", "--config", str(self.config_path), "--env", self.env_name]
        if self.listen:
            args += ["--listen", self.listen]
        if self.listeners:
            fds = ",".join(str(s.fileno()) for s in self.listeners)
            return [*self.argv_prefix, sys.executable, "-c", SHIM, fds, *args]
        return [*self.argv_prefix, sys.executable, *args]

    def environ(self) -> Dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                    "LISTEN_FDNAMES", "JOURNAL_STREAM", "CREDENTIALS_DIRECTORY"):
            env.pop(key, None)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.address
        if self.listeners:
            env["LISTEN_FDS"] = str(len(self.listeners))
            env["LISTEN_FDNAMES"] = ":".join(self.fd_names)
        env.update(self.extra_env)
        return env

    def start(self, wait_log: Optional[str] = "serving on", timeout: float = 15.0) -> "ManagedPusherd":
        self.lines = []
        self.proc = subprocess.Popen(
            self.argv(), env=self.environ(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, pass_fds=[s.fileno() for s in self.listeners], preexec_fn=self.preexec_fn)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        if wait_log:
            self.wait_log(wait_log, timeout)
        return self

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_log(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        """The first log line (index >= after) containing text."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError("log line %r not seen (rc %r):\n%s"
                                         % (text, self.proc.poll(), "\n".join(self.lines)))
                self._cond.wait(min(left, 0.2))

    def mark(self) -> int:
        """Index for wait_log(after=...): only lines logged from now on."""
        with self._cond:
            return len(self.lines)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(2)
        return rc

    def stop(self, timeout: float = 20.0) -> int:
        return stop_process(self.proc, self._reader, signal.SIGTERM, timeout)

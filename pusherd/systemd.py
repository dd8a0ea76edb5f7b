"""systemd integration with the standard library only.

* ``notify()`` and its helpers speak the sd_notify(3) datagram protocol to
  ``$NOTIFY_SOCKET``. Outside systemd (variable unset) every call is a no-op that
  returns False, and a failed send is logged at debug level and never raised:
  supervision must not be able to crash the service.
* ``watchdog_interval()`` follows sd_watchdog_enabled(3): the watchdog is ours
  when ``WATCHDOG_USEC`` is set and ``WATCHDOG_PID`` is unset or names us.
* ``listen_fds()`` is sd_listen_fds_with_names(3): sockets inherited through
  socket activation, returned as non-blocking ``socket.socket`` objects.

Every function takes the environment as a parameter (default ``os.environ``) so
tests can pass a plain dict.

Protocol notes that matter (see docs reference/systemd.md):

* one call = one datagram; fields that belong together must travel together,
  in particular ``RELOADING=1`` and ``MONOTONIC_USEC=`` (``reloading()``);
* systemd hands over *blocking* listeners; Tornado's accept loop would then
  block the IOLoop, hence ``setblocking(False)`` here;
* ``LISTEN_PID`` must equal our pid, otherwise the fds were meant for a parent.
"""

import logging
import os
import socket
import time
from typing import List, MutableMapping, Optional, Tuple

__all__ = [
    "SD_LISTEN_FDS_START",
    "notify",
    "ready",
    "reloading",
    "stopping",
    "status",
    "watchdog",
    "extend_timeout",
    "monotonic_usec",
    "watchdog_interval",
    "listen_fds",
    "is_stream_listener",
]

log = logging.getLogger("pusherd.systemd")

SD_LISTEN_FDS_START = 3

# A send only blocks when the manager's queue is full; never wait forever for it.
SEND_TIMEOUT_SECONDS = 2.0

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

Environ = MutableMapping[str, str]


# --------------------------------------------------------------------------- notify


def _notify_address(environ: Environ) -> Optional[str]:
    """The address in ``$NOTIFY_SOCKET`` in the form ``socket`` expects, or None."""
    addr = environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":  # Linux abstract namespace: leading NUL byte
        return "\0" + addr[1:]
    if addr[0] == "/":  # file system path
        return addr
    # vsock:CID:PORT and friends are for VM guests; not supported here.
    log.debug("sd_notify: unsupported NOTIFY_SOCKET address %r", addr)
    return None


def notify(*fields: str, environ: Environ = os.environ) -> bool:
    """Send ``fields`` (``"KEY=VALUE"`` strings) as one datagram to the manager.

    Returns True when the datagram was sent, False when not running under a
    service manager or when sending failed. Never raises for send errors.
    """
    addr = _notify_address(environ)
    if addr is None or not fields:
        return False
    payload = "\n".join(fields).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(SEND_TIMEOUT_SECONDS)
            sock.connect(addr)
            sock.sendall(payload)
    except (OSError, ValueError) as exc:  # ValueError: NUL inside a path
        log.debug("sd_notify to %r failed: %s", environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def _one_line(text: object) -> str:
    """STATUS= is a single line; a newline would start a new (bogus) field."""
    return " ".join(str(text).splitlines())


def _with_status(fields: List[str], text: Optional[str]) -> List[str]:
    if text is not None:
        fields.append("STATUS=" + _one_line(text))
    return fields


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock ``MONOTONIC_USEC=`` refers to."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def ready(status: Optional[str] = None, environ: Environ = os.environ) -> bool:
    """Startup or reload finished (``READY=1``)."""
    return notify(*_with_status(["READY=1"], status), environ=environ)


def reloading(status: Optional[str] = None, environ: Environ = os.environ) -> bool:
    """A reload has begun. ``RELOADING=1`` and ``MONOTONIC_USEC=`` go in ONE
    datagram: systemd >= 253 (``Type=notify-reload``) matches the reload request
    by that timestamp and otherwise waits until the reload times out.
    A ``ready()`` must follow when the reload is done (also when it failed)."""
    fields = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
    return notify(*_with_status(fields, status), environ=environ)


def stopping(status: Optional[str] = None, environ: Environ = os.environ) -> bool:
    """Shutdown has begun (``STOPPING=1``)."""
    return notify(*_with_status(["STOPPING=1"], status), environ=environ)


def status(text: str, environ: Environ = os.environ) -> bool:
    """Free-form one-line status shown by ``systemctl status``."""
    return notify("STATUS=" + _one_line(text), environ=environ)


def watchdog(environ: Environ = os.environ) -> bool:
    """Keep-alive ping (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1", environ=environ)


def extend_timeout(seconds: float, environ: Environ = os.environ) -> bool:
    """Ask for ``seconds`` more before the current start/stop timeout fires.

    Only has an effect once the original timeout has passed; repeat it within
    the granted window while the work goes on."""
    usec = max(0, int(seconds * 1_000_000))
    return notify(f"EXTEND_TIMEOUT_USEC={usec}", environ=environ)


# --------------------------------------------------------------------------- watchdog


def watchdog_interval(environ: Environ = os.environ) -> Optional[float]:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None
    when no watchdog is expected from *this* process."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.debug("ignoring malformed WATCHDOG_USEC=%r", raw)
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process in the tree
        except ValueError:
            log.debug("ignoring watchdog: malformed WATCHDOG_PID=%r", pid)
            return None
    return usec / 2 / 1_000_000


# --------------------------------------------------------------------------- sockets


def _unset_listen_vars(environ: Environ) -> None:
    for key in _LISTEN_VARS:
        environ.pop(key, None)


def listen_fds(environ: Environ = os.environ, unset: bool = True) -> List[Tuple[str, socket.socket]]:
    """Sockets passed by socket activation, as ``[(name, socket), ...]``.

    The fds start at 3 and follow the order of the socket unit's ``Listen*=``
    lines. Names come from ``LISTEN_FDNAMES`` (``FileDescriptorName=``) and
    default to ``"unknown"``. Each socket is close-on-exec and non-blocking;
    family and type are read from the fd. Empty when ``LISTEN_PID`` is not our
    pid. With ``unset`` the three variables are removed afterwards (also when
    they were not for us), so child processes do not inherit them.

    An fd that is not a socket (e.g. ``ListenFIFO=``) is skipped with a warning.
    """
    try:
        return _listen_fds(environ)
    finally:
        if unset:
            _unset_listen_vars(environ)


def _listen_fds(environ: Environ) -> List[Tuple[str, socket.socket]]:
    raw_pid = environ.get("LISTEN_PID")
    if not raw_pid:
        return []
    try:
        if int(raw_pid) != os.getpid():
            return []
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        log.warning("ignoring socket activation: malformed LISTEN_PID/LISTEN_FDS")
        return []
    if count <= 0:
        return []

    raw_names = environ.get("LISTEN_FDNAMES")
    names = raw_names.split(":") if raw_names else []
    if names and len(names) != count:
        log.warning("LISTEN_FDNAMES has %d names for %d fds; missing ones are 'unknown'",
                    len(names), count)

    result = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)  # family/type/proto detected from the fd
        except OSError as exc:
            log.warning("socket activation: fd %d (%s) is not usable as a socket: %s",
                        fd, name, exc)
            continue
        sock.setblocking(False)  # systemd passes listeners in blocking mode
        result.append((name, sock))
    return result


def is_stream_listener(sock: socket.socket) -> bool:
    """True for a SOCK_STREAM socket in the listening state (what an HTTP server
    can ``accept()`` on). Use it to refuse a misconfigured socket unit clearly."""
    try:
        return (sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1)
    except OSError:
        return False

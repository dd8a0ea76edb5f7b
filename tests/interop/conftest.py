"""pytest harness that drives the REAL phoenix.js client (several published npm
versions, loaded unmodified) under Node.js.

Fixtures
--------
``node_modules_ready`` (session)
    Makes sure ``node`` and ``tests/interop/node_modules`` are usable (runs
    ``npm ci`` once if npm is available and node_modules is missing) and returns
    the driver's self-check (library versions).  Skips the test when the
    toolchain is unavailable, or fails it when ``PUSHERD_NO_SKIP=1``.

``phx`` (function)
    Factory: ``phx(version="1.8") -> PhoenixClient``.  Each call starts one
    ``node driver.js`` process (one phoenix ``Socket``).  Every process is
    killed at teardown, and its transcript + stderr are printed (pytest shows
    them when the test fails).

``phx_version`` (function, parametrized over every bundled version)
    ``"1.2"``, ``"1.4"``, ``"1.5"``, ``"1.8"``.

The driver protocol is documented in ``tests/interop/README.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import pytest

INTEROP_DIR = Path(__file__).resolve().parent
DRIVER_JS = INTEROP_DIR / "driver.js"
NODE_MODULES = INTEROP_DIR / "node_modules"

#: phoenix.js versions bundled in package.json (npm aliases phoenix12 ... phoenix18)
PHOENIX_VERSIONS = ("1.2", "1.4", "1.5", "1.8")
#: vsn each client puts on the URL / the envelope it speaks
PHOENIX_VSN = {"1.2": "1.0.0", "1.4": "2.0.0", "1.5": "2.0.0", "1.8": "2.0.0"}
REQUIRED_PACKAGES = ("ws", "phoenix12", "phoenix14", "phoenix15", "phoenix18")

DEFAULT_TIMEOUT = 5.0
Spec = Union[None, Dict[str, Any], Callable[[Dict[str, Any]], bool]]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "interop: drives the real phoenix.js client under Node.js (needs node + npm ci in tests/interop)"
    )


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------

def _value_matches(actual: Any, expected: Any) -> bool:
    if callable(expected) and not isinstance(expected, type):
        try:
            return bool(expected(actual))
        except Exception:
            return False
    if isinstance(expected, dict) and isinstance(actual, dict):
        return all(k in actual and _value_matches(actual[k], v) for k, v in expected.items())
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    return actual == expected


def _merge(spec: Spec, fields: Dict[str, Any]) -> Spec:
    if not fields:
        return spec
    if spec is None:
        return dict(fields)
    if isinstance(spec, dict):
        return {**spec, **fields}
    pred, subset = spec, dict(fields)
    return lambda l: pred(l) and line_matches(l, subset)


def line_matches(line: Dict[str, Any], spec: Spec) -> bool:
    """``spec`` is None (anything), a predicate, or a dict subset.

    Dict values are compared with ``==``, except nested dicts (matched as
    subsets, recursively) and callables (used as predicates on the value).
    Booleans never equal numbers (``True != 1`` here).
    """
    if spec is None:
        return True
    if callable(spec):
        try:
            return bool(spec(line))
        except Exception:
            return False
    return _value_matches(line, spec)


def _describe(spec: Spec) -> str:
    if spec is None:
        return "<any line>"
    if callable(spec):
        return getattr(spec, "__name__", repr(spec))
    try:
        return json.dumps(spec, default=lambda o: getattr(o, "__name__", repr(o)), sort_keys=True)
    except Exception:
        return repr(spec)


class DriverCommandError(AssertionError):
    """The driver rejected a command (``cmd_error``), e.g. push before join."""

    def __init__(self, message: str, line: Dict[str, Any]):
        super().__init__(message)
        self.line = line


# ---------------------------------------------------------------------------
# PhoenixClient
# ---------------------------------------------------------------------------

class PhoenixClient:
    """One ``node driver.js`` process = one phoenix.js ``Socket``.

    Observations are JSON dicts (see README).  ``expect`` consumes the
    *earliest* buffered line that matches and leaves the others buffered, so
    several expectations can be checked in any order; ``next_line`` reads the
    buffer strictly in order.  ``lines`` is the full transcript.
    """

    def __init__(self, version: str = "1.8", *, node: Optional[str] = None, name: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, startup_timeout: float = 15.0):
        self.version = version
        self.name = name or f"phx{version}"
        node = node or shutil.which("node") or "node"
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._cond = threading.Condition()
        self._pending: List[Dict[str, Any]] = []
        self._lines: List[Dict[str, Any]] = []
        self._stderr: List[str] = []
        self._eof = False
        self._cid = 0
        self._closed = False
        self.proc = subprocess.Popen(
            [node, str(DRIVER_JS), "--version", str(version)],
            cwd=str(INTEROP_DIR),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            bufsize=0,
        )
        self._out_thread = threading.Thread(target=self._read_stdout, name=f"{self.name}-stdout", daemon=True)
        self._err_thread = threading.Thread(target=self._read_stderr, name=f"{self.name}-stderr", daemon=True)
        self._out_thread.start()
        self._err_thread.start()
        try:
            self.ready = self.expect({"type": "ready"}, timeout=startup_timeout)
        except BaseException:
            self.close()
            raise
        #: exact npm version actually loaded, e.g. "1.8.16"
        self.exact_version = self.ready.get("exact_version")
        #: protocol vsn this client puts on the URL ("1.0.0" = V1 objects, "2.0.0" = V2 arrays)
        self.vsn = PHOENIX_VSN.get(self.ready.get("version"), None)

    #: raised by send() when the driver answers cmd_error (so tests need not import conftest)
    CommandError = DriverCommandError

    # -- reader threads ---------------------------------------------------
    def _read_stdout(self):
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip("\n")
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                if not isinstance(line, dict):
                    line = {"type": "raw", "line": text}
            except ValueError:
                line = {"type": "raw", "line": text}
            with self._cond:
                self._lines.append(line)
                self._pending.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _read_stderr(self):
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._cond:
                self._stderr.append(raw.decode("utf-8", "replace").rstrip("\n"))

    # -- inspection -------------------------------------------------------
    @property
    def lines(self) -> List[Dict[str, Any]]:
        """Every line received so far (consumed or not), in order."""
        with self._cond:
            return list(self._lines)

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self._stderr)

    def pending(self) -> List[Dict[str, Any]]:
        """Lines received but not consumed by expect/next_line yet."""
        with self._cond:
            return list(self._pending)

    def drain(self) -> List[Dict[str, Any]]:
        """Return and forget every pending line."""
        with self._cond:
            out, self._pending = self._pending, []
            return out

    def events(self, id: Optional[str] = None, event: Optional[str] = None) -> List[Dict[str, Any]]:
        """All application events (``type == "event"``) seen so far, consumed or not."""
        return [
            l for l in self.lines
            if l.get("type") == "event" and (id is None or l.get("id") == id)
            and (event is None or l.get("event") == event)
        ]

    def transcript(self, limit: int = 200) -> str:
        lines = self.lines
        head = ""
        if len(lines) > limit:
            head = f"  ... {len(lines) - limit} earlier lines omitted ...\n"
            lines = lines[-limit:]
        body = "\n".join("  " + json.dumps(l, sort_keys=True) for l in lines)
        err = self.stderr
        rc = self.proc.poll()
        return (
            f"--- {self.name} (phoenix {self.exact_version or self.version}, pid {self.proc.pid}, rc {rc}) "
            f"{len(self._lines)} lines ---\n{head}{body}\n--- stderr ---\n{err or '  <empty>'}"
        )

    # -- waiting ----------------------------------------------------------
    def _take(self, spec: Spec, timeout: float, what: str) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, line in enumerate(self._pending):
                    if line_matches(line, spec):
                        return self._pending.pop(i)
                if self._eof:
                    raise AssertionError(
                        f"{self.name}: driver exited (rc={self.proc.poll()}) while waiting for {what}\n"
                        + self._transcript_locked()
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name}: timed out after {timeout:.1f}s waiting for {what}\n"
                        f"pending (unconsumed) lines: {len(self._pending)}\n" + self._transcript_locked()
                    )
                self._cond.wait(remaining)

    def _transcript_locked(self) -> str:
        # called with self._cond held; Condition uses an RLock so this is safe
        return self.transcript()

    def expect(self, spec: Spec = None, timeout: float = DEFAULT_TIMEOUT, **fields) -> Dict[str, Any]:
        """Wait for (and consume) the earliest line matching ``spec`` and ``fields``.

        ``c.expect(type="join", id="c1")`` == ``c.expect({"type": "join", "id": "c1"})``.
        Raises AssertionError with the whole transcript and stderr on timeout
        or if the driver dies.
        """
        spec = _merge(spec, fields)
        return self._take(spec, timeout, _describe(spec))

    def expect_none(self, spec: Spec = None, within: float = 0.3, **fields) -> None:
        """Assert that no line matching arrives within ``within`` seconds (lines stay buffered)."""
        spec = _merge(spec, fields)
        deadline = time.monotonic() + within
        with self._cond:
            while True:
                for line in self._pending:
                    if line_matches(line, spec):
                        raise AssertionError(
                            f"{self.name}: unexpected line {json.dumps(line)} matching {_describe(spec)}\n"
                            + self._transcript_locked()
                        )
                if self._eof:
                    raise AssertionError(
                        f"{self.name}: driver exited (rc={self.proc.poll()}) during a negative check for "
                        f"{_describe(spec)}\n" + self._transcript_locked()
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def next_line(self, timeout: float = DEFAULT_TIMEOUT) -> Dict[str, Any]:
        """Consume the oldest pending line, whatever it is."""
        return self._take(None, timeout, "<next line>")

    # -- commands ---------------------------------------------------------
    def send(self, cmd: Dict[str, Any], timeout: float = DEFAULT_TIMEOUT, check: bool = True) -> Dict[str, Any]:
        """Send one command and wait for its ``ack`` (returned) or ``cmd_error``.

        With ``check`` (default) a ``cmd_error`` raises DriverCommandError;
        otherwise the cmd_error line is returned.
        """
        if self._closed:
            raise AssertionError(f"{self.name}: client already closed")
        with self._cond:
            self._cid += 1
            cid = self._cid
        cmd = dict(cmd, cid=cid)
        data = (json.dumps(cmd) + "\n").encode()
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise AssertionError(f"{self.name}: cannot write to driver ({e})\n" + self.transcript()) from None
        reply = self._take(
            lambda l: l.get("cid") == cid and l.get("type") in ("ack", "cmd_error"),
            timeout, f"ack of {cmd.get('cmd')!r} (cid {cid})",
        )
        if reply["type"] == "cmd_error" and check:
            raise DriverCommandError(f"{self.name}: driver rejected {json.dumps(cmd)}: {reply.get('message')}", reply)
        return reply

    def connect(self, url: str, params: Optional[Dict[str, Any]] = None, *, version: Optional[str] = None,
                origin: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                transport: Optional[str] = None, trace_frames: bool = False, logger: bool = False,
                opts: Optional[Dict[str, Any]] = None, **more_opts) -> Dict[str, Any]:
        """``new Socket(url, {params, transport, ...opts}).connect()``.

        ``url`` is the mount point (phoenix.js appends ``/websocket``).  Socket
        options go in ``opts`` or as keyword arguments, e.g.
        ``heartbeatIntervalMs=100, reconnectAfterMs=50, rejoinAfterMs=[50, 100], timeout=2000``
        (backoffs: a number = constant, a list = per try, last repeats).
        Returns the ack, whose ``endpoint_url`` is the URL the client opens.
        """
        cmd: Dict[str, Any] = {"cmd": "connect", "url": url, "version": version or self.version,
                               "opts": {**(opts or {}), **more_opts}}
        if params is not None:
            cmd["params"] = params
        if origin is not None:
            cmd["origin"] = origin
        if headers:
            cmd["headers"] = headers
        if transport:
            cmd["transport"] = transport
        if trace_frames:
            cmd["trace_frames"] = True
        if logger:
            cmd["logger"] = True
        return self.send(cmd)

    def reconnect(self) -> Dict[str, Any]:
        return self.send({"cmd": "reconnect"})

    def join(self, id: str, topic: str, params: Optional[Dict[str, Any]] = None,
             timeout: Optional[int] = None, presence: Optional[str] = None) -> Dict[str, Any]:
        """``presence``: "class" (1.4+'s ``new Presence(channel)``) or "static" (1.2's
        syncState/syncDiff wired by the page): every sync is a ``presence_sync`` line."""
        cmd: Dict[str, Any] = {"cmd": "join", "id": id, "topic": topic, "params": params or {}}
        if timeout is not None:
            cmd["timeout"] = timeout
        if presence is not None:
            cmd["presence"] = presence
        return self.send(cmd)

    def presence_list(self, id: str) -> List[Dict[str, Any]]:
        """The channel's presence list now: ``[{"key", "metas"}]`` (phoenix.js's ``list``)."""
        return self.send({"cmd": "presence_list", "id": id})["list"]

    def push(self, id: str, event: str, payload: Any = None, *, tag: Any = None,
             timeout: Optional[int] = None, statuses: Optional[List[str]] = None) -> Dict[str, Any]:
        cmd: Dict[str, Any] = {"cmd": "push", "id": id, "event": event, "payload": {} if payload is None else payload}
        if tag is not None:
            cmd["tag"] = tag
        if timeout is not None:
            cmd["timeout"] = timeout
        if statuses:
            cmd["statuses"] = list(statuses)
        return self.send(cmd)

    def leave(self, id: str, timeout: Optional[int] = None) -> Dict[str, Any]:
        cmd: Dict[str, Any] = {"cmd": "leave", "id": id}
        if timeout is not None:
            cmd["timeout"] = timeout
        return self.send(cmd)

    def disconnect(self, code: Optional[int] = None, reason: Optional[str] = None) -> Dict[str, Any]:
        cmd: Dict[str, Any] = {"cmd": "disconnect"}
        if code is not None:
            cmd["code"] = code
        if reason is not None:
            cmd["reason"] = reason
        return self.send(cmd)

    def state(self) -> Dict[str, Any]:
        """``{"connection": "open"|"connecting"|"closing"|"closed"|None, "channels": {id: {topic, state, join_ref}}}``"""
        return self.send({"cmd": "state"})

    # -- teardown ---------------------------------------------------------
    def close(self, timeout: float = 2.0) -> Optional[int]:
        """Stop the driver (``exit`` command, then kill).  Idempotent; returns the exit code."""
        if not self._closed:
            self._closed = True
            if self.proc.poll() is None:
                try:
                    assert self.proc.stdin is not None
                    self.proc.stdin.write(b'{"cmd":"exit"}\n')
                    self.proc.stdin.flush()
                    self.proc.stdin.close()
                except (BrokenPipeError, OSError, ValueError):
                    pass
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            for t in (self._out_thread, self._err_thread):
                t.join(timeout=2)
            for f in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass
        return self.proc.poll()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<PhoenixClient {self.name} phoenix {self.exact_version or self.version} pid={self.proc.pid}>"


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

def _unavailable(reason: str):
    if os.environ.get("PUSHERD_NO_SKIP") == "1":
        pytest.fail(f"interop harness unavailable (PUSHERD_NO_SKIP=1): {reason}", pytrace=False)
    pytest.skip(reason)


def _node_modules_complete() -> bool:
    return all((NODE_MODULES / p / "package.json").is_file() for p in REQUIRED_PACKAGES)


def _npm_ci() -> Optional[str]:
    """Run ``npm ci`` in tests/interop (serialised across processes). Returns an error or None."""
    npm = shutil.which("npm")
    if not npm:
        return "npm not installed"
    if os.environ.get("PUSHERD_INTEROP_NPM_CI", "1") == "0":
        return "automatic npm ci disabled (PUSHERD_INTEROP_NPM_CI=0)"
    lock_path = Path(tempfile.gettempdir()) / "pusherd-interop-npm-ci.lock"
    with open(lock_path, "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        if _node_modules_complete():
            return None
        try:
            res = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=str(INTEROP_DIR), capture_output=True, text=True, timeout=300,
            )
        except subprocess.TimeoutExpired:
            return "npm ci timed out after 300s"
        if res.returncode != 0:
            return f"npm ci failed (rc {res.returncode}): {(res.stdout + res.stderr)[-2000:]}"
    return None if _node_modules_complete() else "npm ci finished but node_modules is incomplete"


_READY_CACHE: Dict[str, Any] = {}


@pytest.fixture(scope="session")
def node_modules_ready() -> Dict[str, Any]:
    """Node + tests/interop/node_modules usable; returns the driver self-check.

    ``{"node": "v20...", "ws": "8.x", "libraries": {"1.8": {"ok": true, "version": "1.8.16", ...}, ...}}``
    """
    if "result" in _READY_CACHE:
        return _READY_CACHE["result"]
    if "error" in _READY_CACHE:
        _unavailable(_READY_CACHE["error"])
    hint = "run `npm ci` in tests/interop"
    node = shutil.which("node")
    if not node:
        _READY_CACHE["error"] = f"node not installed; install Node.js >= 16 and {hint}"
        _unavailable(_READY_CACHE["error"])
    if not _node_modules_complete():
        err = _npm_ci()
        if err:
            _READY_CACHE["error"] = f"tests/interop/node_modules missing ({err}); {hint}"
            _unavailable(_READY_CACHE["error"])
    try:
        res = subprocess.run([node, str(DRIVER_JS), "--self-check"], cwd=str(INTEROP_DIR),
                             capture_output=True, text=True, timeout=60)
        check = json.loads(res.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        _READY_CACHE["error"] = f"driver self-check failed: {e!r}"
        _unavailable(_READY_CACHE["error"])
    broken = {v: info.get("error") for v, info in check["libraries"].items() if not info.get("ok")}
    if broken:
        _READY_CACHE["error"] = f"phoenix.js libraries fail to load under node: {broken}; {hint}"
        _unavailable(_READY_CACHE["error"])
    _READY_CACHE["result"] = check
    return check


@pytest.fixture
def phx(node_modules_ready):
    """Factory ``phx(version="1.8", *, name=None, env=None) -> PhoenixClient``.

    Every client is closed (process killed) at teardown; transcripts are
    printed so that a failing test shows what each client saw.
    """
    clients: List[PhoenixClient] = []

    def factory(version: str = "1.8", *, name: Optional[str] = None, env: Optional[Dict[str, str]] = None):
        c = PhoenixClient(version, name=name or f"phx{version}#{len(clients) + 1}", env=env)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        try:
            c.close()
        finally:
            print(c.transcript(), file=sys.stdout)


@pytest.fixture(params=PHOENIX_VERSIONS, ids=lambda v: f"phx{v}")
def phx_version(request) -> str:
    """Parametrizes a test over every bundled phoenix.js version."""
    return request.param

"""Test support: a real pusherd process on a free port, Rails-style tokens, a small V1/V2 client.

Imported by tests/conftest.py (fixtures) and by tests anywhere as `from pusherd_testing import ...`
(a module name of its own: `conftest` is ambiguous once subfolders have their own conftest.py).

Tests talk to the daemon over real sockets. `PUSHERD_NO_SKIP=1` (set by .ci/run) turns every
"outside program missing" skip into a failure.
"""

import base64
import collections
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pusherd.client import mint_token  # noqa: E402

GUARDIAN_SECRET = "test-guardian-secret-0123456789abcdef"
PUBLISH_SECRET = "test-publish-secret-0123456789"
ISSUER = "od-web-test"

BASE_CONFIG = {
    "guardian_secret": GUARDIAN_SECRET,
    "publish_secret": PUBLISH_SECRET,
    "allowed_origins": ["http://localhost:3000", "https://*.example.com"],
    "log_level": "debug",
}


def no_skip() -> bool:
    return os.environ.get("PUSHERD_NO_SKIP") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip with a clear reason on a laptop; fail in CI, where nothing may be skipped."""
    if condition:
        return
    if no_skip():
        pytest.fail("PUSHERD_NO_SKIP=1 but: " + reason)
    pytest.skip(reason)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


#: The ports `free_port` hands out lie below the kernel's ephemeral range. A port the kernel
#: gave out (bind to 0) and took back can at once be the local port of an outgoing connection:
#: a daemon's own connection to Redis, made before it binds its listener, took the port the
#: test had picked for it ("Address already in use", seen once in CI).
_PORT_LOW = max(1024, _ephemeral_low() - 12000)
_PORT_HIGH = max(_PORT_LOW + 2000, _ephemeral_low())
_GIVEN = collections.deque(maxlen=2000)  # not handed out twice in a row (two picked before either is bound)


def free_port(low: int = _PORT_LOW, high: int = _PORT_HIGH) -> int:
    """A port nothing listens on now, in [low, high): below the ephemeral range by default."""
    for _ in range(1000):
        port = random.randrange(low, high)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.append(port)
        return port
    raise AssertionError("no free port in [%d, %d)" % (low, high))


def rails_token(listen=(), publish=(), sub=None, csrf="csrf-token-from-the-page", ttl=30 * 86400,
                secret=GUARDIAN_SECRET, issuer=ISSUER, now=None):
    """A token exactly as the Rails helper mints it: sub an object, no iat, aud csrf, exp 30 days."""
    token = mint_token(secret, sub={} if sub is None else sub, listen=list(listen), publish=list(publish),
                       ttl=ttl, csrf_token=csrf, issuer=issuer, now=now)
    return token, csrf


def stop_process(proc, reader, sig=signal.SIGTERM, timeout=15.0):
    """Signal a daemon, kill it if it outlives `timeout`, let its log reader finish; its exit status."""
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if reader is not None:
        reader.join(2)
    return proc.returncode


def http(method: str, url: str, body=None, headers=None, timeout: float = 10.0):
    """One HTTP request: (status, parsed JSON body or raw text, headers). A body that is not
    bytes is sent as JSON."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, hdrs = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        status, raw, hdrs = err.code, err.read(), err.headers
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, raw.decode("utf-8", "replace"), hdrs


def joined(phx_connect, daemon, topic, params=None):
    """A Python Phoenix client joined to `topic` on `daemon` (the join must succeed)."""
    client = phx_connect(daemon.ws_url)
    status, response, _ = client.join(topic, params)
    assert status == "ok", response
    return client


class Pusherd:
    """One real pusherd process, started with a YAML file written for the test."""

    def __init__(self, tmp: Path, overrides=None, env="test", extra_env=None, port=None):
        self.tmp = tmp
        self.env = env
        self.settings = dict(BASE_CONFIG, **(overrides or {}))
        self.config_path = tmp / ("pusher-%d.yml" % id(self))
        self.write_config(self.settings)
        self.port = port or free_port()
        self.extra_env = extra_env or {}
        self.proc = None
        self.lines = []
        self._reader = None

    def write_config(self, settings) -> None:
        self.config_path.write_text(yaml.safe_dump({self.env: settings}))

    @property
    def http_url(self) -> str:
        return "http://127.0.0.1:%d" % self.port

    @property
    def ws_url(self) -> str:
        return "ws://127.0.0.1:%d%s" % (self.port, self.settings.get("path", "/events"))

    def start(self, timeout=10.0):
        env = dict(os.environ, PYTHONPATH=str(ROOT), **self.extra_env)
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pusherd", "--config", str(self.config_path), "--env", self.env,
             "--listen", "127.0.0.1:%d" % self.port],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=str(self.tmp))
        self.lines = []
        ready = threading.Event()
        serving = []

        def read(proc=self.proc, lines=self.lines):
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if "serving on" in line:
                    serving.append(True)
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        # EOF also sets `ready`, possibly before the exiting process can be polled: ask for the line.
        if not ready.wait(timeout) or not serving or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("pusherd did not start:\n" + self.log())
        return self

    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_log(self, text: str, timeout=5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            time.sleep(0.02)
        raise AssertionError("log line %r not seen:\n%s" % (text, self.log()))

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        return stop_process(self.proc, self._reader, sig, timeout)

    def restart(self):
        self.stop()
        return self.start()

    # -- HTTP ---------------------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=10.0):
        """Returns (status, parsed JSON body or raw text, headers)."""
        return http(method, self.http_url + path, body, headers, timeout)

    def publish(self, topic, event, payload=None, secret=PUBLISH_SECRET, bearer=True):
        body = {"topic": topic, "event": event}
        if payload is not None:
            body["payload"] = payload
        auth = ("Bearer " + secret) if bearer else secret
        status, parsed, _ = self.request("POST", "/publish", body,
                                         {"Authorization": auth, "Content-Type": "application/json"})
        return status, parsed


OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class RawWS:
    """A bare RFC 6455 client over a plain socket (masked frames, no validation of its own), that
can send what real clients won't (invalid UTF-8, partial frames, odd opcodes) and reads only
when asked: unlike PhxClient's background reader, it lets the server's writes back up."""

    def __init__(self, port, path="/events/websocket?vsn=2.0.0", headers=None, rcvbuf=None, timeout=5.0):
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        fields = {"Host": "127.0.0.1:%d" % port, "Upgrade": "websocket", "Connection": "Upgrade",
                  "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}
        fields.update(headers or {})  # a test may replace Host, too
        lines = ["GET %s HTTP/1.1" % path] + ["%s: %s" % kv for kv in fields.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake: %r" % self.buf)
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    def send_frame(self, opcode, data: bytes, fin=True, masked=True):
        """One frame; ``masked=False`` sends it as no client may (RFC 6455 5.1)."""
        mask = os.urandom(4)
        n = len(data)
        first = (0x80 if fin else 0) | opcode
        bit = 0x80 if masked else 0
        if n < 126:
            header = struct.pack("!BB", first, bit | n)
        elif n < 65536:
            header = struct.pack("!BBH", first, bit | 126, n)
        else:
            header = struct.pack("!BBQ", first, bit | 127, n)
        if not masked:
            self.sock.sendall(header + data)
            return
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def send_text(self, data):
        self.send_frame(OP_TEXT, data if isinstance(data, bytes) else data.encode())

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self):
        """(opcode, payload bytes); raises EOFError when the peer closed the TCP connection."""
        b1, b2 = self._read(2)
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b1 & 0x0F, self._read(n)

    def recv_json(self):
        op, data = self.recv_frame()
        assert op == OP_TEXT, (op, data)
        return json.loads(data)

    def join(self, topic):
        """A V2 phx_join (no params); returns the reply frame as a list."""
        self.send_text(json.dumps(["1", "1", topic, "phx_join", {}]))
        return self.recv_json()

    def close_outcome(self, timeout=5.0):
        """Read until the server ends the connection: ("close", code) or ("dropped", None)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        try:
            while time.monotonic() < deadline:
                op, data = self.recv_frame()
                if op == OP_CLOSE:
                    return "close", struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
        except (EOFError, ConnectionResetError):
            return "dropped", None
        except socket.timeout:
            pass
        raise AssertionError("server did not end the connection within %.1fs" % timeout)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class PhxClient:
    """A minimal Phoenix client over a real WebSocket, for protocol tests (V1 objects or V2 arrays)."""

    def __init__(self, url, vsn="2.0.0", origin=None, path_suffix="/websocket", timeout=5.0, params=None,
                 subprotocols=None):
        """``params``: socket connect params (on the URL, as phoenix.js puts them); ``subprotocols``:
        offered in Sec-WebSocket-Protocol (phoenix.js 1.8's authToken)."""
        import urllib.parse
        from websockets.sync.client import connect
        query = dict(params or {})
        if vsn is not None:
            query["vsn"] = vsn
        self.vsn = vsn
        self.v2 = vsn is not None and vsn.startswith("2.")
        headers = {"Origin": origin} if origin else None
        target = url + path_suffix + ("?" + urllib.parse.urlencode(query) if query else "")
        self.ws = connect(target, additional_headers=headers, open_timeout=timeout, subprotocols=subprotocols,
                          max_size=None, compression=None).__enter__()
        self.timeout = timeout
        self._ref = 0
        self.inbox = []

    def next_ref(self) -> str:
        self._ref += 1
        return str(self._ref)

    def send(self, join_ref, ref, topic, event, payload):
        if self.v2:
            self.ws.send(json.dumps([join_ref, ref, topic, event, payload]))
        else:
            msg = {"topic": topic, "event": event, "payload": payload, "ref": ref}
            self.ws.send(json.dumps(msg))

    def send_raw(self, data):
        self.ws.send(data)

    def recv(self, timeout=None):
        """Next frame as a dict {join_ref, ref, topic, event, payload}."""
        raw = self.ws.recv(timeout=timeout or self.timeout)
        data = json.loads(raw)
        if isinstance(data, list):
            join_ref, ref, topic, event, payload = data
            return {"join_ref": join_ref, "ref": ref, "topic": topic, "event": event, "payload": payload}
        data.setdefault("join_ref", None)
        return data

    def expect(self, timeout=None, **fields):
        """Read frames until one matches `fields` (earlier non-matching frames are kept in inbox)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        for i, msg in enumerate(self.inbox):
            if all(msg.get(k) == v for k, v in fields.items()):
                return self.inbox.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no frame matching %r; unmatched: %r" % (fields, self.inbox))
            try:
                msg = self.recv(timeout=left)
            except TimeoutError:
                raise AssertionError("no frame matching %r; unmatched: %r" % (fields, self.inbox)) from None
            if all(msg.get(k) == v for k, v in fields.items()):
                return msg
            self.inbox.append(msg)

    def assert_silent(self, seconds=0.3):
        try:
            raw = self.ws.recv(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError("expected no frame, got %r" % raw)

    def join(self, topic, payload=None):
        ref = self.next_ref()
        self.send(ref, ref, topic, "phx_join", payload or {})
        reply = self.expect(topic=topic, event="phx_reply", ref=ref)
        return reply["payload"]["status"], reply["payload"]["response"], ref

    def push(self, topic, event, payload, join_ref=None):
        ref = self.next_ref()
        self.send(join_ref, ref, topic, event, payload)
        reply = self.expect(topic=topic, event="phx_reply", ref=ref)
        return reply["payload"]["status"], reply["payload"]["response"]

    def close_code(self, timeout=5.0):
        """Wait for the server to close; return its close code."""
        from websockets.exceptions import ConnectionClosed
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        except TimeoutError:
            pass
        raise AssertionError("server did not close the socket")

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass


class TcpProxy:
    """A loopback TCP proxy in front of a daemon, to simulate network drops for one client.

    `cut()` drops every open connection (as a dead network would, without a WebSocket close)
    and, while `blocked`, new connections are accepted and dropped at once. `target_port` may be
    changed at any time (new connections go there). `delay` (seconds) holds every chunk that
    long before forwarding it, in both directions: a slow network.
    """

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.blocked = False
        self._conns = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self._closed = True
        self.cut()
        self.listener.close()


class RedisServer:
    """A private redis-server on a free loopback port, no persistence; stop/start keep the port."""

    def __init__(self, tmp: Path, port=None, args=()):
        self.tmp = tmp
        self.port = port or free_port()
        self.args = list(args)  # extra redis-server options, e.g. ["--requirepass", "pw"]
        self.proc = None

    @property
    def url(self) -> str:
        return "redis://127.0.0.1:%d/0" % self.port

    def start(self, timeout=10.0):
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.tmp), "--protected-mode", "no"] + self.args,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("redis-server exited with %s" % self.proc.returncode)
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        raise AssertionError("redis-server did not answer on port %d" % self.port)

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def kill(self, sig=signal.SIGKILL) -> None:
        """Stop it abruptly (connections reset); start() again brings it back on the same port."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def parse_frame(frame: bytes):
    """RFC 6455 §5.2: return (fin, opcode, masked, payload) and check the length encoding is minimal."""
    assert len(frame) >= 2
    fin, opcode = frame[0] >> 7, frame[0] & 0x0F
    assert frame[0] & 0x70 == 0, "RSV bits must be clear (no extension negotiated)"
    masked, length = frame[1] >> 7, frame[1] & 0x7F
    pos = 2
    if length == 126:
        (length,) = struct.unpack("!H", frame[2:4])
        assert length >= 126, "16-bit length used for a short payload"
        pos = 4
    elif length == 127:
        (length,) = struct.unpack("!Q", frame[2:10])
        assert length >= 65536, "64-bit length used for a payload that fits 16 bits"
        assert length >> 63 == 0
        pos = 10
    payload = frame[pos:]
    assert len(payload) == length
    return fin, opcode, masked, payload

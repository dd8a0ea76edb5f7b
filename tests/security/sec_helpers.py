"""Helpers for the hostile-input tests: a raw WebSocket client that can send what real clients
won't (invalid UTF-8, partial frames, odd opcodes), RSS of a process, a liveness probe."""

import base64
import json
import os
import socket
import struct
import time

from pusherd_testing import (GUARDIAN_SECRET, PUBLISH_SECRET, PhxClient, Pusherd, rails_token,  # noqa: F401,E402
                              require)

OP_TEXT, OP_BINARY, OP_CLOSE = 0x1, 0x2, 0x8


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc."""
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


class RawWS:
    """A bare RFC 6455 client over a plain socket (masked frames, no validation of its own)."""

    def __init__(self, port, path="/events/websocket?vsn=2.0.0", headers=None, rcvbuf=None, timeout=5.0):
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET %s HTTP/1.1" % path, "Host: 127.0.0.1:%d" % port, "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: " + key, "Sec-WebSocket-Version: 13"]
        lines += ["%s: %s" % kv for kv in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake: %r" % self.buf)
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        self.status = int(head.split(b" ", 2)[1])

    def send_frame(self, opcode, data: bytes, fin=True):
        mask = os.urandom(4)
        n = len(data)
        first = (0x80 if fin else 0) | opcode
        if n < 126:
            header = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", first, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        self.sock.sendall(header + mask + masked)

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


def still_serving(daemon, topic="public:sentinel"):
    """A fresh socket can join and receive a publish: the daemon is unharmed."""
    c = PhxClient(daemon.ws_url)
    try:
        assert c.join(topic)[0] == "ok"
        status, _ = daemon.publish(topic, "alive", {"ok": True})
        assert status == 200
        assert c.expect(event="alive", topic=topic)["payload"] == {"ok": True}
    finally:
        c.close()
    return True

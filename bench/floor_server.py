"""The Python floor: bare asyncio, one pre-built frame written to each socket's transport.

No framework at all: a minimal HTTP/1.1 parser for the upgrade and for POST /publish, a minimal
WebSocket reader for joins and heartbeats, and for every broadcast one frame built once and
``transport.write(frame)`` per socket. It is what no Python server can undercut while writing
one message per socket. Run: ``python bench/floor_server.py PORT GSECRET PSECRET LOOP [ISSUER]``.

Joins follow pusherd's rules at their barest: ``public:*`` needs no token; a token, when sent (and
on any other topic always), is verified with PyJWT (HS256, ``exp`` required), ``iss`` compared when
an issuer is given, ``s_csrf`` checked against HMAC-SHA256(secret, csrf_token) when ``aud`` is
``"csrf"``, and the topic matched against the ``listen`` claim (exact or ``prefix*``).
"""

import asyncio
import base64
import hashlib
import hmac
import json
import sys

import jwt

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(data: bytes) -> bytes:
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + data
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + data


def unmask(mask: bytes, data: bytes) -> bytes:
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


class State:
    def __init__(self, gsecret, psecret, issuer=None):
        self.gsecret, self.psecret, self.issuer = gsecret, psecret, issuer
        self.topics = {}

    def may_join(self, topic, payload):
        """None when the join is allowed, else the reason."""
        public = topic.startswith("public:")
        token = payload.get("guardian_token")
        if token is None:
            return None if public else "authentication_required"
        try:
            claims = jwt.decode(token, self.gsecret, algorithms=["HS256"],
                                options={"require": ["exp"], "verify_aud": False, "verify_sub": False})
        except jwt.InvalidTokenError:
            return None if public else "invalid_token"
        if self.issuer is not None and claims.get("iss") != self.issuer:
            return None if public else "invalid_token"
        if claims.get("aud") == "csrf":
            digest = hmac.new(self.gsecret.encode(), str(payload.get("csrf_token")).encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
                                       str(claims.get("s_csrf"))):
                return None if public else "csrf_mismatch"
        if public:
            return None
        for pattern in claims.get("listen") or ():
            if pattern == topic or (pattern.endswith("*") and topic.startswith(pattern[:-1])):
                return None
        return "forbidden"


class Conn(asyncio.Protocol):
    def __init__(self, state):
        self.state = state
        self.buf = b""
        self.ws = False
        self.transport = None
        self.topics = []

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buf = self.buf + data
        while True:
            if self.ws:
                used = self.ws_frame(buf)
            else:
                used = self.http(buf)
            if not used:
                break
            buf = buf[used:]
        self.buf = buf

    def http(self, buf):
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return 0
        lines = buf[:end].split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if b"sec-websocket-key" in headers:
            accept = base64.b64encode(hashlib.sha1(headers[b"sec-websocket-key"] + GUID).digest())
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
            self.ws = True
            return end + 4
        length = int(headers.get(b"content-length", b"0"))
        if len(buf) < end + 4 + length:
            return 0
        body = buf[end + 4:end + 4 + length]
        status, answer = self.publish(headers.get(b"authorization", b""), body)
        self.transport.write(b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % (status, len(answer)) + answer)
        return end + 4 + length

    def publish(self, auth, body):
        if auth.startswith(b"Bearer "):
            auth = auth[7:]
        if not hmac.compare_digest(auth, self.state.psecret.encode()):
            return 401, b'{"error":"unauthorized"}'
        try:
            doc = json.loads(body)
        except ValueError:
            return 400, b'{"error":"bad json"}'
        items = doc if isinstance(doc, list) else [doc]
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
                return 400, b'{"error":"bad event"}'
        for item in items:
            members = self.state.topics.get(item["topic"])
            if members:
                data = frame(json.dumps([None, None, item["topic"], item["event"], item.get("payload", {})],
                                        separators=(",", ":")).encode())
                for transport in members:
                    transport.write(data)
        return 200, b'{"status":"ok"}'

    def ws_frame(self, buf):
        if len(buf) < 2:
            return 0
        ln = buf[1] & 0x7F
        pos = 2
        if ln == 126:
            if len(buf) < 4:
                return 0
            ln, pos = int.from_bytes(buf[2:4], "big"), 4
        elif ln == 127:
            if len(buf) < 10:
                return 0
            ln, pos = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < pos + 4 + ln:
            return 0
        op = buf[0] & 0x0F
        data = unmask(buf[pos:pos + 4], buf[pos + 4:pos + 4 + ln])
        if op == 1:
            self.message(json.loads(data))
        elif op == 8:
            self.transport.close()
        return pos + 4 + ln

    def message(self, msg):
        join_ref, ref, topic, event, payload = msg
        status, response = "ok", {}
        if event == "phx_join":
            reason = self.state.may_join(topic, payload)
            if reason is not None:
                status, response = "error", {"reason": reason}
            if status == "ok":
                self.state.topics.setdefault(topic, set()).add(self.transport)
                self.topics.append(topic)
        self.transport.write(frame(json.dumps([join_ref, ref, topic, "phx_reply",
                                               {"status": status, "response": response}]).encode()))

    def connection_lost(self, exc):
        for topic in self.topics:
            self.state.topics.get(topic, set()).discard(self.transport)


async def main(port, gsecret, psecret, issuer=None):
    state = State(gsecret, psecret, issuer)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Conn(state), "127.0.0.1", port, backlog=65535)
    print("serving on 127.0.0.1:%d" % port, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    port, gsecret, psecret, loop_kind = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    if loop_kind == "uvloop":
        import uvloop
        uvloop.install()
    asyncio.run(main(port, gsecret, psecret, sys.argv[5] if len(sys.argv) > 5 else None))

"""The load generator: worker processes holding thousands of Phoenix V2 sockets, and a publisher.

Kept cheap on purpose so that it is never the bottleneck: raw asyncio protocols (uvloop when
installed), one pre-built masked join frame per socket, incoming frames counted by walking their
headers without decoding JSON (only every ``sample_every``-th socket parses the publish time out of
the payload for latency). Workers are driven by the coordinator (run.py) over a pipe.
"""

import asyncio
import base64
import gc
import json
import os
import resource
import socket
import time
from typing import List, Optional

CLIENT_KEY = base64.b64encode(b"pusherd-bench-k!").decode()  # any 16 bytes will do
MASK = b"\x01\x02\x03\x04"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux >= 4.2


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def masked_frame(text: str, opcode: int = 1) -> bytes:
    """A client-to-server frame (clients must mask)."""
    data = text.encode("utf-8")
    n = len(data)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    if not n:
        return head + MASK
    masked = (int.from_bytes(data, "big") ^ int.from_bytes((MASK * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    return head + MASK + masked


def join_frame(topic: str, token: Optional[str], csrf: Optional[str], ref: str = "1") -> bytes:
    payload = {} if token is None else {"guardian_token": token, "csrf_token": csrf}
    return masked_frame(json.dumps([ref, ref, topic, "phx_join", payload], separators=(",", ":")))


class Conn(asyncio.Protocol):
    """One Phoenix V2 socket: upgrade, join, then count frames."""

    __slots__ = ("w", "transport", "state", "buf", "sample", "join", "close_code", "waiter")

    def __init__(self, worker: "Worker", join: bytes, sample: bool):
        self.w = worker
        self.transport = None
        self.state = 0          # 0 upgrading, 1 joining, 2 joined, 3 failed
        self.buf = b""
        self.sample = sample
        self.join = join
        self.close_code = None
        self.waiter = None      # a future set once the join is answered (or failed), when gated

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.w.upgrade)

    def data_received(self, data: bytes):
        if self.state == 0:
            data = self.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            if not data.startswith(b"HTTP/1.1 101"):
                self.state = 3
                self.buf = b""
                self.w.failed(self, "upgrade: " + data[:40].decode("latin-1"))
                return
            self.state = 1
            self.transport.write(self.join)
            data = data[end + 4:]
            self.buf = b""
        elif self.buf:
            data = self.buf + data
        n = len(data)
        pos = 0
        count = 0
        while pos + 2 <= n:
            b1 = data[pos + 1]
            if b1 < 126:
                h = 2
                ln = b1
            elif b1 == 126:
                if pos + 4 > n:
                    break
                h = 4
                ln = (data[pos + 2] << 8) | data[pos + 3]
            else:
                if pos + 10 > n:
                    break
                h = 10
                ln = int.from_bytes(data[pos + 2:pos + 10], "big")
            end = pos + h + ln
            if end > n:
                break
            op = data[pos] & 0x0F
            if op == 1:
                if self.state == 2:
                    count += 1
                    if self.sample:
                        self.w.latency(data, pos + h, end)
                elif self.state == 1:
                    body = data[pos + h:end]
                    if b'"phx_reply"' in body and b'"ok"' in body:
                        self.state = 2
                        self.w.joined(self)
                    else:
                        self.state = 3
                        self.w.failed(self, "join: " + body[:120].decode("utf-8", "replace"))
            elif op == 8:
                self.close_code = int.from_bytes(data[pos + h:pos + h + 2], "big") if ln >= 2 else 1005
            pos = end
        self.buf = data[pos:] if pos < n else b""
        if count:
            self.w.received += count

    def connection_lost(self, exc):
        self.w.lost(self)


class Worker:
    def __init__(self, loop, pipe):
        self.loop = loop
        self.pipe = pipe
        self.conns: List[Conn] = []
        self.upgrade = b""
        self.received = 0
        self.lat: List[float] = []
        self.n_joined = 0
        self.n_failed = 0
        self.n_lost = 0
        self.errors: List[str] = []
        self._all_joined: Optional[asyncio.Future] = None
        self._target = 0

    # -- callbacks from connections -----------------------------------------------------------

    def joined(self, conn):
        self.n_joined += 1
        self._release(conn)
        self._check_done()

    @staticmethod
    def _release(conn):
        if conn.waiter is not None and not conn.waiter.done():
            conn.waiter.set_result(None)

    def failed(self, conn, why):
        self.n_failed += 1
        self._release(conn)
        if len(self.errors) < 5:
            self.errors.append(why)
        self._check_done()

    def lost(self, conn):
        self.n_lost += 1
        self._release(conn)
        if conn.state < 2:
            if conn.state != 3:
                self.n_failed += 1
                conn.state = 3
                if len(self.errors) < 5:
                    self.errors.append("connection lost before join")
            self._check_done()

    def _check_done(self):
        f = self._all_joined
        if f is not None and not f.done() and self.n_joined + self.n_failed >= self._target:
            f.set_result(None)

    def latency(self, data, start, end):
        i = data.find(b'"t":', start, end)
        if i < 0:
            return
        j = i + 4
        k = j
        while k < end and data[k] not in b",}":
            k += 1
        self.lat.append(time.time() - float(data[j:k]))

    # -- commands -----------------------------------------------------------------------------

    async def connect(self, host, port, path, n, topic, tokens, csrf, sample_every, concurrency, timeout, rcvbuf=0,
                      gate_joins=False, spread=0):
        """n sockets; at most `concurrency` connecting at a time (with gate_joins: connecting,
        upgrading or waiting for their join reply).

        spread > 0 (loopback only): each socket bound to one of 250 source addresses
        127.<spread>.<0..>.x, the port left to connect() (IP_BIND_ADDRESS_NO_PORT). From one
        source address, tens of thousands of sockets (and the TIME_WAITs of earlier runs) make
        the kernel's ephemeral port search (__inet_hash_connect) cost the load generator ~0.5 ms
        per connect at 17k sockets: the storm would measure the load generator.
        """
        self.upgrade = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                        "Origin: http://localhost:3000\r\n\r\n" % (path, host, port, CLIENT_KEY)).encode()
        self.n_joined = self.n_failed = self.n_lost = 0
        self.errors = []
        self._target = n
        self._all_joined = self.loop.create_future()
        self._check_done()  # n == 0
        sem = asyncio.Semaphore(concurrency)
        # Join frames are built before the clock starts (a storm's tokens were minted before it too).
        if tokens:
            joins = [join_frame(topic, t, csrf) for t in tokens]
        else:
            joins = [join_frame(topic, None, csrf)]
        # Thousands of new objects per storm: the cyclic GC's passes over them were ~15 % of the
        # load generator's CPU under perf. Nothing here makes cycles that must go at once.
        gc.disable()
        t0 = time.monotonic()

        async def one(i):
            conn = Conn(self, joins[i % len(joins)], sample_every > 0 and i % sample_every == 0)
            if gate_joins:
                conn.waiter = self.loop.create_future()
            async with sem:
                try:
                    if rcvbuf or spread:
                        sock = socket.socket()
                        if rcvbuf:  # a reader with a small window: its backlog shows up in the server
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                        if spread:
                            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                            sock.bind(("127.%d.%d.%d" % (spread, i // 250 % 250, 1 + i % 250), 0))
                        sock.setblocking(False)
                        await asyncio.wait_for(self.loop.sock_connect(sock, (host, port)), timeout)
                        await self.loop.create_connection(lambda: conn, sock=sock)
                    else:
                        await asyncio.wait_for(self.loop.create_connection(lambda: conn, host, port), timeout)
                except (OSError, asyncio.TimeoutError) as exc:
                    self.failed(conn, "connect: %r" % exc)
                    conn.state = 3
                    return
                self.conns.append(conn)
                if gate_joins:
                    try:
                        await asyncio.wait_for(asyncio.shield(conn.waiter), timeout)
                    except asyncio.TimeoutError:
                        pass

        try:
            await asyncio.gather(*(one(i) for i in range(n)))
            try:
                await asyncio.wait_for(asyncio.shield(self._all_joined), timeout)
            except asyncio.TimeoutError:
                self.errors.append("timed out waiting for joins")
        finally:
            gc.enable()
        return {"joined": self.n_joined, "failed": self.n_failed, "seconds": time.monotonic() - t0,
                "errors": self.errors}

    def handle(self, cmd, args):
        if cmd == "connect":
            return self.connect(*args)
        if cmd == "received":
            return {"received": self.received, "lost": self.n_lost}
        if cmd == "reset":
            self.received = 0
            self.lat = []
            return {}
        if cmd == "latencies":
            lat, self.lat = self.lat, []
            return {"latencies": lat}
        if cmd == "pause":
            joined = [c for c in self.conns if c.state == 2]
            for c in joined[:args[0]]:
                c.transport.pause_reading()
            return {"paused": sum(1 for c in joined[:args[0]] if not c.transport.is_reading())}
        if cmd == "resume":
            for c in self.conns:
                if c.transport is not None and not c.transport.is_closing() and not c.transport.is_reading():
                    c.transport.resume_reading()
            return {}
        if cmd == "closes":
            codes = {}
            for c in self.conns:
                if c.close_code is not None:
                    codes[c.close_code] = codes.get(c.close_code, 0) + 1
            return {"codes": codes, "lost": self.n_lost}
        if cmd == "close_all":
            for c in self.conns:
                if c.transport is not None:
                    c.transport.abort()
            self.conns = []
            self.received = 0
            self.lat = []
            return {}
        if cmd == "cpu":
            t = os.times()
            return {"cpu": t.user + t.system}
        raise ValueError(cmd)

    def on_pipe(self):
        try:
            cmd, args = self.pipe.recv()
        except EOFError:
            self.loop.stop()
            return
        if cmd == "exit":
            self.loop.stop()
            return
        result = self.handle(cmd, args)
        if asyncio.iscoroutine(result):
            task = self.loop.create_task(result)
            task.add_done_callback(lambda t: self.pipe.send(t.result()))
        else:
            self.pipe.send(result)


def worker_main(pipe, cpus, loop_kind):
    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_nofile()
    loop = new_loop(loop_kind)
    asyncio.set_event_loop(loop)
    worker = Worker(loop, pipe)
    loop.add_reader(pipe.fileno(), worker.on_pipe)
    os.set_blocking(pipe.fileno(), True)  # a command may span several reads; recv() must block
    loop.run_forever()


class Publisher:
    """HTTP/1.1 keep-alive POST /publish over raw asyncio streams."""

    def __init__(self, host: str, port: int, secret: str):
        self.host, self.port, self.secret = host, port, secret
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    def request_bytes(self, body: bytes) -> bytes:
        return (b"POST /publish HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (self.host.encode(), self.port, self.secret.encode(), len(body))) + body

    async def post(self, body: bytes) -> int:
        self.writer.write(self.request_bytes(body))
        return await self.response()

    async def response(self) -> int:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self):
        if self.writer is not None:
            self.writer.close()

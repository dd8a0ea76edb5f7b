"""pusherd's two frame readers against Tornado's own, on the same bytes arriving in the same pieces.

`_Protocol._receive_frame_loop` cuts frames out of what has arrived where Tornado's
``WebSocketProtocol13`` awaits a read per part of a frame. Both run here over a stream that hands
out a byte sequence in given pieces (and may end early), with a handler that records what it is
told: the messages, pings, pongs and the close each delivers, the bytes each writes (pongs,
close frames), whether it aborted, must be the same, for any frames hypothesis makes (fragments,
control frames between them, reserved bits and opcodes, over-long lengths, lengths in 16 or 64
bits, invalid UTF-8, a stream cut mid-frame). Where they differ on purpose: a close reason that is
not UTF-8 (Tornado's reader raises), and a frame the client did not mask (RFC 6455 5.1: ours close
with 1002; Tornado reads it as masked).

The second reader is `frontsocket.FrontSocket`'s, the sockets the front completes: it is run on a
real socket pair (`run_front_socket`), the bytes sent in the same pieces, and must deliver the
same messages and write the same bytes as Tornado's protocol.
"""

import asyncio
import socket
import struct
import types

from hypothesis import HealthCheck, given, settings, strategies as st
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketProtocol13, _WebSocketParams

from pusherd.core.session import Limits, Policy
from pusherd.fast.direct import FlushQueue
from pusherd.fast.framing import client_frame_head
from pusherd.fast.frontsocket import FrontSocket
from pusherd.fast.websocket import _Protocol


class PiecesStream:
    """What the protocols read of an IOStream: `data` arrives in `pieces`, then the peer closes."""

    def __init__(self, data: bytes, cuts, io_loop):
        bounds = [0] + sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]
        self.pieces = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        self.buf = bytearray()
        self.writes = []
        self.reads = 0
        self._closed = False
        self.io_loop = io_loop

    def _arrive(self) -> bool:
        if not self.pieces:
            return False
        self.buf += self.pieces.pop(0)
        return True

    async def read_bytes(self, n: int, partial: bool = False) -> bytes:
        self.reads += 1
        await asyncio.sleep(0)
        if self._closed:
            raise StreamClosedError()
        if n == 0 and not partial:  # as IOStream: nothing asked, nothing waited for
            return b""
        if not self.buf and not self._arrive():
            raise StreamClosedError()
        while not partial and len(self.buf) < n:
            if not self._arrive():
                raise StreamClosedError()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def write(self, data: bytes):
        self.writes.append(bytes(data))
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def close(self) -> None:
        self._closed = True

    def closed(self) -> bool:
        return self._closed


class Recorder:
    def __init__(self):
        self.events = []

    def on_message(self, message):
        self.events.append(("message", message))

    def on_ping(self, data):
        self.events.append(("ping", data))

    def on_pong(self, data):
        self.events.append(("pong", data))

    def on_ws_connection_close(self, code, reason):
        self.events.append(("closed", code, reason))

    def log_exception(self, *exc_info):
        self.events.append(("exception", exc_info[0].__name__))


def run_reader(cls, data: bytes, cuts, max_message_size: int):
    async def go():
        from tornado.ioloop import IOLoop
        handler = Recorder()
        protocol = cls(handler, False, _WebSocketParams(max_message_size=max_message_size))
        stream = PiecesStream(data, cuts, IOLoop.current())
        protocol.stream = stream
        raised = None
        try:
            await asyncio.wait_for(protocol._receive_frame_loop(), 10)
        except UnicodeDecodeError as exc:  # Tornado's reader, on a close reason that is not UTF-8
            raised = type(exc).__name__
        return {"raised": raised, "events": handler.events, "writes": stream.writes, "closed": stream.closed(),
                "client_terminated": protocol.client_terminated, "server_terminated": protocol.server_terminated,
                "close_code": protocol.close_code}, stream.reads
    return asyncio.run(go())


class FrontService:
    """What a FrontSocket asks of the service (service.py), recording the messages it is given."""

    def __init__(self, max_message_size: int):
        settings = types.SimpleNamespace(max_frame_bytes=max_message_size, max_outbox_bytes=1 << 20,
                                         slow_consumer_seconds=30.0)
        self.config = types.SimpleNamespace(settings=settings)
        self.counters = types.SimpleNamespace(dropped=lambda n: None, slow_consumer_closes=0)
        self.policy = Policy(verifier=None, limits=Limits())
        self.events = []
        self.open = set()

    def opened(self, conn):
        self.open.add(conn)

    def closed(self, conn):
        self.open.discard(conn)
        self.events.append(("closed",))

    def receive(self, conn, message):
        self.events.append(("message", message))


def run_front_socket(data: bytes, cuts, max_message_size: int):
    """A FrontSocket on one end of a socket pair; `data` sent in `pieces` from the other, which
    then closes its side. What it delivered, what it wrote (all of it, in order), and that it ended."""
    async def go():
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        peer.setblocking(False)
        service = FrontService(max_message_size)
        conn = FrontSocket(service, FlushQueue(), ours, "203.0.113.9", None, None, b"")
        received = bytearray()

        async def read_all():
            while True:
                try:
                    got = await loop.sock_recv(peer, 65536)
                except OSError:
                    return
                if not got:
                    return
                received.extend(got)

        reading = asyncio.ensure_future(read_all())
        for piece in PiecesStream(data, cuts, None).pieces:
            try:
                await loop.sock_sendall(peer, piece)
            except OSError:
                break
            await asyncio.sleep(0)
        try:
            peer.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        await asyncio.wait_for(reading, 10)
        for _ in range(100):
            if not service.open:
                break
            await asyncio.sleep(0.01)
        peer.close()
        return {"events": service.events, "writes": bytes(received), "ended": not service.open and conn.sock.fileno() == -1}
    return asyncio.run(go())


def messages(events):
    return [e for e in events if e[0] == "message"]


def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True, mask=b"\x01\x02\x03\x04",
          width=None) -> bytes:
    n = len(payload)
    head = bytes((0x80 * fin | rsv | opcode,))
    bit = 0x80 if masked else 0
    if width == 64 or (width is None and n > 65535):
        head += bytes((bit | 127,)) + struct.pack("!Q", n)
    elif width == 16 or (width is None and n > 125):
        head += bytes((bit | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((bit | n,))
    if not masked:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


payloads = st.one_of(st.text(max_size=30).map(lambda t: t.encode("utf-8")), st.binary(max_size=40),
                     st.binary(min_size=120, max_size=300))
frames = st.builds(
    frame,
    opcode=st.sampled_from([0x1, 0x1, 0x0, 0x0, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB]),
    payload=payloads,
    fin=st.booleans(),
    rsv=st.sampled_from([0, 0, 0, 0, 0, 0, 0x40, 0x20, 0x10]),
    masked=st.just(True),  # (an unmasked frame: test_an_unmasked_frame_is_closed_1002_after_what_came_before)
    mask=st.binary(min_size=4, max_size=4),
    width=st.sampled_from([None, None, None, 16, 64]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 3000), max_size=12), st.sampled_from([50, 200, 4096]),
       st.one_of(st.none(), st.integers(0, 3000)))
def test_the_reader_does_what_tornados_does_with_the_same_bytes_in_the_same_pieces(stream_frames, cuts, max_size, cut_at):
    data = b"".join(stream_frames)
    if cut_at is not None:
        data = data[:cut_at]  # the peer goes away mid-stream
    ours, _ = run_reader(_Protocol, data, cuts, max_size)
    tornados, _ = run_reader(WebSocketProtocol13, data, cuts, max_size)
    front = run_front_socket(data, cuts, max_size)
    assert front["ended"] and front["events"][-1] == ("closed",)
    assert ours["raised"] is None
    if tornados["raised"]:  # the one place they differ on purpose: ours abort instead
        assert ours["closed"] and ours["client_terminated"] and ours["server_terminated"]
        assert ours["events"][-1] == ("closed", None, None)
        assert ours["events"][:-1] == tornados["events"][:len(ours["events"]) - 1]
        assert messages(front["events"]) == messages(ours["events"])
        assert front["writes"] == b"".join(ours["writes"])
        return
    assert ours == tornados
    assert messages(front["events"]) == messages(tornados["events"])
    assert front["writes"] == b"".join(tornados["writes"])


def test_a_close_frame_whose_reason_is_not_utf8_aborts_where_tornados_reader_raises():
    data = frame(0x1, b"[]") + frame(0x8, struct.pack("!H", 1000) + b"\xff\xfe")
    ours, _ = run_reader(_Protocol, data, [], 4096)
    assert ours["raised"] is None and ours["closed"] and ours["writes"] == []
    assert ours["events"] == [("message", "[]"), ("closed", None, None)]
    tornados, _ = run_reader(WebSocketProtocol13, data, [], 4096)
    assert tornados["raised"] == "UnicodeDecodeError" and not tornados["closed"]


def test_a_fragmented_message_with_a_ping_between_its_fragments_arriving_a_byte_at_a_time():
    data = (frame(0x1, "[null,".encode(), fin=False) + frame(0x9, b"hb") +
            frame(0x0, '"1","phoenix","heartbeat",{}]'.encode()) + frame(0x8, struct.pack("!H", 1000)))
    ours, reads = run_reader(_Protocol, data, range(len(data)), 1 << 16)
    assert ours["events"] == [("ping", b"hb"), ("message", '[null,"1","phoenix","heartbeat",{}]'), ("closed", 1000, None)]
    assert ours["writes"] == [b"\x8a\x02hb", b"\x88\x02\x03\xe8"]  # the pong, the close echoed
    assert ours == run_reader(WebSocketProtocol13, data, range(len(data)), 1 << 16)[0]
    front = run_front_socket(data, range(len(data)), 1 << 16)
    assert front["events"] == [("message", '[null,"1","phoenix","heartbeat",{}]'), ("closed",)]
    assert front["writes"] == b"\x8a\x02hb\x88\x02\x03\xe8" and front["ended"]


def test_frames_that_arrived_together_are_read_with_one_read():
    """The point of the reader: a join and the frames after it, arrived in one piece, cost one read."""
    data = b"".join(frame(0x1, ('[null,"%d","public:a","phx_join",{}]' % i).encode()) for i in range(5))
    ours, reads = run_reader(_Protocol, data, [], 1 << 16)
    tornados, tornado_reads = run_reader(WebSocketProtocol13, data, [], 1 << 16)
    assert ours == tornados and len([e for e in ours["events"] if e[0] == "message"]) == 5
    assert reads == 2  # the five frames, then the end of the stream
    assert tornado_reads == 5 * 3 + 1  # the head, the mask and the payload of each


def test_a_frame_over_the_limit_is_closed_1009_before_its_payload_arrives():
    data = frame(0x1, b"x" * 5000)[:20]  # its head, its mask and a few bytes; the rest never comes
    ours, _ = run_reader(_Protocol, data, [], 4096)
    assert ours["writes"] == [b"\x88\x11\x03\xf1message too big"] and ours["closed"]
    assert ours == run_reader(WebSocketProtocol13, data, [], 4096)[0]
    front = run_front_socket(data, [], 4096)
    assert front["writes"] == b"\x88\x11\x03\xf1message too big" and front["events"] == [("closed",)]


CLOSE_1002 = b"\x88\x12\x03\xeaframe not masked"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=30), max_size=4), st.sampled_from([0x1, 0x2, 0x8, 0x9, 0xA, 0x0]), st.booleans(),
       st.lists(st.integers(0, 400), max_size=6))
def test_an_unmasked_frame_is_closed_1002_after_what_came_before(before, opcode, more, cuts):
    """RFC 6455 5.1: a server MUST close the connection on a client frame that is not masked
    (Phoenix's Cowboy closes with 1002). The messages before it are delivered as Tornado
    delivers them; nothing of it or after it is."""
    masked = b"".join(frame(0x1, text.encode()) for text in before)
    data = masked + frame(opcode, b"x", masked=False) + (frame(0x1, b"after") if more else b"")
    ours, _ = run_reader(_Protocol, data, cuts, 4096)
    tornados, _ = run_reader(WebSocketProtocol13, masked, cuts, 4096)
    delivered = [("message", text) for text in before]
    assert messages(ours["events"]) == messages(tornados["events"]) == delivered
    assert ours["writes"] == [CLOSE_1002] and ours["closed"]
    front = run_front_socket(data, cuts, 4096)
    assert messages(front["events"]) == delivered and front["events"][-1] == ("closed",)
    assert front["writes"] == CLOSE_1002 and front["ended"]


def test_a_long_control_frame_is_refused_on_its_first_two_bytes():
    ours, _ = run_reader(_Protocol, b"\x89\xfe", [], 4096)  # a ping saying its length takes 16 bits
    assert ours["closed"] and ours["events"] == [("closed", None, None)] and ours["writes"] == []


def test_client_frame_head_needs_only_the_length_bytes():
    assert client_frame_head(b"\x81", 0) is None
    assert client_frame_head(b"\x81\xfe\x01", 0) is None  # 16-bit length, one byte of it
    head = client_frame_head(b"\x81\xfe\x01\x00", 0)  # the mask key has not arrived
    assert (head.fin, head.opcode, head.masked, head.length, head.size) == (True, 1, True, 256, 8)
    head = client_frame_head(b"xx\x02\x7f" + struct.pack("!Q", 70000), 2)
    assert (head.fin, head.opcode, head.masked, head.length, head.size) == (False, 2, False, 70000, 10)

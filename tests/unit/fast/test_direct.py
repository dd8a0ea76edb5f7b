"""The per-socket outbox over a real socket pair: coalescing, the direct write, order, the bound."""

import asyncio
import collections
import socket

import pytest
from tornado.iostream import IOStream, StreamClosedError

from pusherd.fast.framing import text_frame
from pusherd.fast.direct import FlushQueue, Outbox
from pusherd.fast.lean import lean_stream


def test_flush_queue_runs_each_callback_once_per_iteration_in_order_despite_a_failure():
    scheduled = []
    queue = FlushQueue(call_soon=scheduled.append)
    ran = []

    def boom():
        raise RuntimeError("one socket failed")

    queue.add(lambda: ran.append(1))
    queue.add(boom)
    queue.add(lambda: ran.append(3))
    assert scheduled == [queue.run]  # one loop callback for the whole batch
    scheduled.pop()()
    assert ran == [1, 3]
    queue.add(lambda: ran.append(4))
    assert len(scheduled) == 1


def _pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(True)
    b.settimeout(5)
    return a, b


def _read(sock, n):
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


@pytest.mark.parametrize("direct", [True, False])
def test_frames_queued_in_one_iteration_leave_in_one_write_in_order(direct):
    async def main():
        a, b = _pair()
        stream = IOStream(a)
        writes = []
        overflowed = []
        outbox = Outbox(stream, FlushQueue().add, 1 << 20, lambda: overflowed.append(True), direct=direct)
        frames = [text_frame(b"%d" % i) for i in range(50)]
        # Count what reaches the kernel: one send for all 50 frames.
        if direct:
            outbox._sock = _CountingSocket(a, writes)
        for f in frames:
            outbox.send(f)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        expected = b"".join(frames)
        assert _read(b, len(expected)) == expected
        if direct:
            assert writes == [len(expected)]
        assert not overflowed
        stream.close()
        b.close()
    asyncio.run(main())


class _CountingSocket:
    """Wraps a socket, recording the size of every send (what the direct path calls)."""

    def __init__(self, sock, writes):
        self._sock = sock
        self._writes = writes

    def send(self, data):
        n = self._sock.send(data)
        self._writes.append(n)
        return n

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_direct_write_queues_behind_bytes_tornado_still_holds():
    """A pong or a remainder in Tornado's buffer goes first; the outbox never overtakes it."""
    async def main():
        a, b = _pair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = IOStream(a)
        outbox = Outbox(stream, FlushQueue().add, 1 << 22, lambda: None, direct=True)
        big = b"A" * (1 << 20)
        stream.write(big)  # more than the kernel takes: the rest waits in Tornado's buffer
        assert stream.writing()
        outbox.send(text_frame(b"after"))
        await asyncio.sleep(0)
        got = b""
        want = len(big) + len(text_frame(b"after"))
        loop = asyncio.get_running_loop()
        while len(got) < want:
            got += await loop.run_in_executor(None, b.recv, 65536)
        assert got == big + text_frame(b"after")
        stream.close()
        b.close()
    asyncio.run(main())


@pytest.mark.parametrize("direct", [True, False])
def test_a_reader_that_stops_is_cut_at_the_bound_and_nothing_more_is_queued(direct):
    async def main():
        a, b = _pair()
        stream = IOStream(a)
        overflowed = []
        outbox = Outbox(stream, FlushQueue().add, 64 * 1024, lambda: overflowed.append(True), direct=direct)
        frame = text_frame(b"x" * 1000)
        for _ in range(5000):  # 5 MB to a peer that never reads
            outbox.send(frame)
            if overflowed:
                break
            await asyncio.sleep(0)
        assert overflowed == [True]
        outbox.send(frame)  # detached: a no-op
        assert not outbox._chunks
        stream.close()
        b.close()
    asyncio.run(main())


def test_lean_stream_keeps_tornado_writes_whole_in_order_and_fails_pending_writes_on_close():
    """After lean_stream, IOStream's own queueing (partial writes, write futures, close) works."""
    async def main():
        a, b = _pair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = IOStream(a)
        lean_stream(stream)
        assert type(stream._write_futures) is not collections.deque
        assert type(stream._write_buffer._buffers) is not collections.deque
        pieces = [bytes([65 + i]) * (300_000 + i) for i in range(4)]  # large: queued in pieces
        futures = [stream.write(p) for p in pieces]
        want = sum(len(p) for p in pieces)
        got = b""
        loop = asyncio.get_running_loop()
        while len(got) < want:
            got += await loop.run_in_executor(None, b.recv, 65536)
        assert got == b"".join(pieces)
        await asyncio.wait_for(asyncio.gather(*futures), 5)
        assert not stream.writing() and not stream._write_futures

        pending = stream.write(b"x" * (1 << 20))  # more than the kernel takes, then close
        stream.close()
        with pytest.raises(StreamClosedError):
            await asyncio.wait_for(pending, 5)
        b.close()
    asyncio.run(main())


# -- broadcast rounds: the first frame of a round is written at once, the rest coalesced ----------

def _in_rounds(max_bytes=1 << 20, small_buffer=False, on_overflow=lambda: None):
    """(peer socket, stream, the rounds' clock, outbox) over a socket pair."""
    a, b = _pair()
    if small_buffer:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = IOStream(a)
    queue = FlushQueue()
    return b, stream, queue, Outbox(stream, queue.add, max_bytes, on_overflow, direct=True, rounds=queue)


async def _receive(peer, n):
    got = b""
    loop = asyncio.get_running_loop()
    while len(got) < n:
        got += await loop.run_in_executor(None, peer.recv, 65536)
    return got


def test_the_first_frame_of_a_round_leaves_at_once_the_rest_of_the_round_in_one_write():
    async def main():
        b, stream, queue, outbox = _in_rounds()
        a = stream.socket
        writes = []
        outbox._sock = _CountingSocket(a, writes)  # the round's write and the flush
        frames = [text_frame(b"%d" % i) for i in range(10)]
        queue.broadcast_begins()
        outbox.send(frames[0])
        assert writes == [len(frames[0])]  # already in the kernel, before the loop turns
        for f in frames[1:]:
            outbox.send(f)
        assert len(writes) == 1
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        rest = b"".join(frames[1:])
        assert writes == [len(frames[0]), len(rest)]
        queue.broadcast_begins()  # a new round: at once again
        outbox.send(frames[0])
        assert writes[-1] == len(frames[0])
        outbox.send(frames[1])  # a reply outside any round: queued, coalesced
        assert len(writes) == 3
        expected = frames[0] + rest + frames[0] + frames[1]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert _read(b, len(expected)) == expected
        stream.close()
        b.close()
    asyncio.run(main())


def test_a_round_never_overtakes_bytes_tornado_or_the_queue_still_hold():
    async def main():
        b, stream, queue, outbox = _in_rounds(1 << 22, small_buffer=True)
        big = b"A" * (1 << 20)
        stream.write(big)  # a remainder waits in Tornado's buffer
        outbox.send(text_frame(b"queued"))  # outside a round: queued
        queue.broadcast_begins()
        outbox.send(text_frame(b"round"))  # the queue is not empty: behind it
        want = big + text_frame(b"queued") + text_frame(b"round")
        assert await _receive(b, len(want)) == want
        stream.close()
        b.close()
    asyncio.run(main())


def test_a_round_queues_behind_a_pong_in_tornados_buffer():
    async def main():
        b, stream, queue, outbox = _in_rounds()
        pong = b"\x8a\x00"
        stream._write_buffer.append(pong)  # as if Tornado had a pong waiting to go
        queue.broadcast_begins()
        outbox.send(text_frame(b"round"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        want = pong + text_frame(b"round")
        assert _read(b, len(want)) == want
        stream.close()
        b.close()
    asyncio.run(main())


def test_a_round_queues_behind_a_reply_queued_earlier_in_the_iteration():
    async def main():
        b, stream, queue, outbox = _in_rounds()
        outbox.send(text_frame(b"reply"))  # a join reply: queued until the end of the iteration
        queue.broadcast_begins()
        outbox.send(text_frame(b"broadcast"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        want = text_frame(b"reply") + text_frame(b"broadcast")
        assert _read(b, len(want)) == want
        stream.close()
        b.close()
    asyncio.run(main())


def test_a_partial_write_at_the_start_of_a_round_keeps_the_rest_in_order():
    async def main():
        b, stream, queue, outbox = _in_rounds(1 << 22, small_buffer=True)
        frames = [text_frame(bytes([65 + i]) * 300000) for i in range(3)]  # far more than the buffer
        for f in frames:
            queue.broadcast_begins()
            outbox.send(f)
            await asyncio.sleep(0)
        want = b"".join(frames)
        assert await _receive(b, len(want)) == want
        stream.close()
        b.close()
    asyncio.run(main())


def test_a_reader_that_stops_is_cut_at_the_bound_with_rounds_too():
    async def main():
        overflowed = []
        b, stream, queue, outbox = _in_rounds(64 * 1024, on_overflow=lambda: overflowed.append(True))
        frame = text_frame(b"x" * 1000)
        for _ in range(5000):
            queue.broadcast_begins()
            outbox.send(frame)
            if overflowed:
                break
            await asyncio.sleep(0)
        assert overflowed == [True]
        stream.close()
        b.close()
    asyncio.run(main())


# -- the rounds' fan-out: straight to clean sockets, through the outbox for the others ----------

class _Member:
    """A hub subscriber over a real socket pair, as SocketHandler is one: a serializer and an outbox."""

    def __init__(self, rounds, max_bytes=1 << 22, small_buffer=False):
        from pusherd.core.protocol import V2
        a, self.peer = _pair()
        if small_buffer:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.stream = IOStream(a)
        self.serializer = V2
        self.wire = _ws_frame
        self.overflowed = []
        self.dropped = []
        self.outbox = Outbox(self.stream, rounds.add, max_bytes, lambda: self.overflowed.append(True),
                             on_drop=self.dropped.append, direct=True, rounds=rounds)

    def send_frame(self, frame):
        self.outbox.send(frame)

    def waiting(self) -> bytes:
        """What the kernel already holds for the peer (without waiting)."""
        self.peer.setblocking(False)
        try:
            return self.peer.recv(1 << 20)
        except BlockingIOError:
            return b""
        finally:
            self.peer.setblocking(True)

    def close(self):
        self.stream.close()
        self.peer.close()


def _ws_frame(text):
    return text_frame(text.encode("utf-8"))


def _hub_over(members_count, **kw):
    from pusherd.core.fanout import Hub, PlainGroup
    from pusherd.fast.direct import make_group
    rounds = FlushQueue()
    hub = Hub(make_group=make_group(rounds, PlainGroup))
    members = [_Member(rounds, **kw) for _ in range(members_count)]
    for m in members:
        hub.subscribe("public:a", m)
    return rounds, hub, members


def _event(n):
    from pusherd.core.broadcast import Broadcast
    return Broadcast("public:a", "e", {"n": n})


def _frame_of(member, n):
    return text_frame(member.serializer.encode_broadcast("public:a", "e", {"n": n}, None).encode("utf-8"))


def test_fan_out_writes_each_clean_socket_at_once_and_coalesces_the_rest_of_the_round():
    async def main():
        rounds, hub, members = _hub_over(3)
        assert not rounds.dirty and len(rounds.owners) == 3
        assert hub.broadcast(_event(1)) == 3
        first = _frame_of(members[0], 1)
        for m in members:
            assert m.waiting() == first  # in the kernel before the loop turns: no outbox involved
            assert not m.outbox._chunks
        assert hub.broadcast(_event(2)) == 3  # the same round: queued in every outbox
        assert hub.broadcast(_event(3)) == 3
        for m in members:
            assert m.waiting() == b""
            assert len(m.outbox._chunks) == 2
        assert set(rounds.dirty) == {m.stream.socket for m in members}
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        rest = _frame_of(members[0], 2) + _frame_of(members[0], 3)
        for m in members:
            assert _read(m.peer, len(rest)) == rest
        assert not rounds.dirty  # all written: clean again, the next round goes straight out
        hub.broadcast(_event(4))
        for m in members:
            assert m.waiting() == _frame_of(m, 4)
            m.close()
    asyncio.run(main())


def test_fan_out_goes_behind_a_reply_queued_in_one_outbox_and_straight_to_the_others():
    async def main():
        rounds, hub, (busy, idle) = _hub_over(2)
        busy.outbox.send(text_frame(b"reply"))  # a join reply, queued until the end of the iteration
        assert set(rounds.dirty) == {busy.stream.socket}
        hub.broadcast(_event(1))
        assert idle.waiting() == _frame_of(idle, 1)
        assert busy.waiting() == b""
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        want = text_frame(b"reply") + _frame_of(busy, 1)
        assert _read(busy.peer, len(want)) == want
        busy.close()
        idle.close()
    asyncio.run(main())


def test_a_short_fan_out_write_hands_the_tail_to_tornado_before_anything_else_is_written():
    """A pong written by Tornado right after a short write must not land inside the frame."""
    async def main():
        rounds, hub, (slow,) = _hub_over(1, small_buffer=True)
        big = {"x": "A" * 300000}
        from pusherd.core.broadcast import Broadcast
        hub.broadcast(Broadcast("public:a", "e", big))  # far more than the socket buffer takes
        assert slow.stream.writing()  # the tail is in Tornado's buffer already
        assert slow.stream.socket in rounds.dirty
        pong = b"\x8a\x00"
        slow.outbox.tornado_writes()
        slow.stream.write(pong)  # what Tornado's protocol does for a ping
        await asyncio.sleep(0)
        hub.broadcast(_event(2))  # a new round: dirty, so through the outbox, behind the pong
        frame = text_frame(slow.serializer.encode_broadcast("public:a", "e", big, None).encode("utf-8"))
        want = frame + pong + _frame_of(slow, 2)
        assert await _receive(slow.peer, len(want)) == want
        slow.close()
    asyncio.run(main())


def test_a_socket_tornado_writes_to_is_dirty_until_its_outbox_sees_the_buffer_empty():
    async def main():
        rounds, hub, (m,) = _hub_over(1, small_buffer=True)
        m.outbox.tornado_writes()
        m.stream.write(b"\x8a\x00" + b"P" * 1000000)  # Tornado's own bytes, more than the kernel takes
        assert m.stream.socket in rounds.dirty
        hub.broadcast(_event(1))  # must queue behind Tornado's bytes
        want = b"\x8a\x00" + b"P" * 1000000 + _frame_of(m, 1)
        assert await _receive(m.peer, len(want)) == want
        await asyncio.sleep(0)
        hub.broadcast(_event(2))  # through the outbox once more, which finds everything written
        assert m.stream.socket not in rounds.dirty
        assert m.waiting() == _frame_of(m, 2)
        m.close()
    asyncio.run(main())


def test_a_detached_outbox_gets_no_fan_out_bytes_and_counts_them_dropped_and_release_forgets_it():
    async def main():
        rounds, hub, (gone, alive) = _hub_over(2)
        gone.outbox.detach()
        assert gone.stream.socket in rounds.dirty
        hub.broadcast(_event(1))
        assert gone.waiting() == b""
        assert gone.dropped == [1]
        assert alive.waiting() == _frame_of(alive, 1)
        hub.unsubscribe("public:a", gone)
        gone.outbox.release()
        assert gone.stream.socket not in rounds.owners and gone.stream.socket not in rounds.dirty
        assert gone.outbox.fast_sock is None
        gone.close()
        alive.close()
    asyncio.run(main())


def test_fan_out_to_a_peer_that_stops_reading_cuts_it_at_the_bound_and_keeps_serving_the_others():
    async def main():
        rounds, hub, (stuck, fine) = _hub_over(2, max_bytes=64 * 1024)
        got = b""
        for n in range(3000):
            hub.broadcast(_event(n))
            got += fine.waiting()
            if stuck.overflowed:
                break
            await asyncio.sleep(0)
        assert stuck.overflowed == [True]
        hub.broadcast(_event(-1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        want = b"".join(_frame_of(fine, i) for i in range(n + 1)) + _frame_of(fine, -1)
        assert got + _read(fine.peer, len(want) - len(got)) == want
        stuck.close()
        fine.close()
    asyncio.run(main())


def test_fan_out_to_a_closed_socket_fails_nothing_else():
    async def main():
        rounds, hub, (broken, fine) = _hub_over(2)
        sock = broken.stream.socket
        broken.peer.close()
        sock.shutdown(socket.SHUT_WR)  # every write now fails (EPIPE)
        hub.broadcast(_event(1))
        assert fine.waiting() == _frame_of(fine, 1)
        assert sock in rounds.dirty  # the frame went to the outbox, whose Tornado write meets the error
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert broken.stream.closed()  # Tornado closed the stream: SocketHandler.on_close follows
        assert sock in rounds.dirty
        hub.broadcast(_event(2))
        assert fine.waiting() == _frame_of(fine, 2)
        broken.stream.close()
        fine.close()
    asyncio.run(main())


class FakeStream:
    def __init__(self, fail=None, stalled=False):
        self.max_write_buffer_size = None
        self.written = []
        self.fail = fail
        self.stalled = stalled  # a peer that never reads: Tornado's bound is reached, nothing drains

    def write(self, data):
        if self.fail:
            raise self.fail
        if self.stalled and self.max_write_buffer_size is not None and \
                sum(map(len, self.written)) + len(data) > self.max_write_buffer_size:
            from tornado.iostream import StreamBufferFullError
            raise StreamBufferFullError("Reached maximum write buffer size")
        self.written.append(bytes(data))

    def writing(self):
        return False


def test_outbox_counts_frames_it_discards():
    dropped, overflows, soon = [], [], []
    outbox = Outbox(FakeStream(stalled=True), soon.append, 10, lambda: overflows.append(1), on_drop=dropped.append)
    outbox.send(b"aaaa")
    outbox.send(b"bbbb")
    outbox.send(b"cccc")          # 12 bytes > 10 unsent to a stalled peer: the three frames are dropped
    assert sum(dropped) == 3 and overflows == [1]
    outbox.send(b"late")          # after the overflow the socket is gone
    assert sum(dropped) == 4

    dropped.clear()
    outbox = Outbox(FakeStream(), soon.append, 100, lambda: None, on_drop=dropped.append)
    outbox.send(b"x")
    outbox.send(b"y")
    outbox.detach()               # closing with frames still queued
    assert dropped == [2]


def test_outbox_delivering_normally_drops_nothing():
    dropped, soon = [], []
    stream = FakeStream()
    outbox = Outbox(stream, soon.append, 100, lambda: None, on_drop=dropped.append)
    outbox.send(b"x")
    outbox.send(b"y")
    soon[0]()
    assert stream.written == [b"xy"] and dropped == []


def test_a_released_outbox_leaves_no_cycle_for_the_collector():
    """A closed socket's handler, outbox and the rest are freed by their reference counts the
    moment the socket is released: with the heap frozen (fast/gc.py), a cycle left here would
    stay until the next whole-heap pass (2 KB per closed socket, the churn leak of issue 13)."""
    import gc
    import weakref

    class Handler:  # as FastSocketHandler: the outbox tells one of its methods of an overflow
        def overflowed(self):
            pass

    a, b = _pair()
    stream = IOStream(a)
    queue = FlushQueue()
    handler = Handler()
    handler.outbox = Outbox(stream, queue.add, 1 << 20, handler.overflowed, direct=True, rounds=queue)
    ref = weakref.ref(handler)
    handler.outbox.release()
    stream.close()
    b.close()
    gc.collect()
    gc.disable()
    try:
        del handler, stream, a
        assert ref() is None
        assert gc.collect() == 0  # and nothing else of it (the outbox's own bound flush) waits for the collector
    finally:
        gc.enable()

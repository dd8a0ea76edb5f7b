"""WebSocket frames (RFC 6455), with no I/O: the server's, built once and shared by every socket,
and the client's, cut out of the bytes that have arrived (`MessageReader`).

Server frames are never masked, and pusherd negotiates no compression, so the bytes of a
text frame depend only on the message: one frame can be written to any number of sockets.
"""

import struct

from tornado.util import _websocket_mask

from ..core.errors import CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG

_OP_TEXT = 0x81  # FIN + text opcode


def text_frame(data: bytes) -> bytes:
    """One final, unmasked text frame carrying `data` (UTF-8 bytes)."""
    n = len(data)
    if n < 126:
        return bytes((_OP_TEXT, n)) + data
    if n < 65536:
        return struct.pack("!BBH", _OP_TEXT, 126, n) + data
    return struct.pack("!BBQ", _OP_TEXT, 127, n) + data


class ClientFrameHead:
    """The head of a frame a client sent (RFC 6455 5.2), as `client_frame_head` reads it."""

    __slots__ = ("fin", "rsv", "opcode", "masked", "length", "size")

    def __init__(self, fin: bool, rsv: int, opcode: int, masked: bool, length: int, size: int):
        self.fin, self.rsv, self.opcode, self.masked = fin, rsv, opcode, masked
        self.length = length  # of the payload
        self.size = size  # of the head: 2, 4 or 10 bytes, and the 4 of the mask key when masked


def client_frame_head(data, pos: int):
    """The head of the frame starting at ``data[pos]``, or None when `data` does not hold its
    length yet (the 2, 4 or 10 bytes before the mask key). Nothing is judged here (a reserved
    bit, an unmasked frame, a length): the reader does. A control frame whose 7-bit length is
    126 or 127 is given as it is (its length 126 or 127, its head 2 bytes): it is refused before
    anything more of it is read, as Tornado does."""
    end = len(data)
    if end - pos < 2:
        return None
    b0, b1 = data[pos], data[pos + 1]
    masked = bool(b1 & 0x80)
    length = b1 & 0x7F
    size = 2
    if b0 & 0x08 and length >= 126:  # a control frame that says it is long: refused on these two bytes
        return ClientFrameHead(bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, masked, length, size)
    if length == 126:
        size = 4
        if end - pos < 4:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
    elif length == 127:
        size = 10
        if end - pos < 10:
            return None
        length = struct.unpack_from("!Q", data, pos + 2)[0]
    if masked:
        size += 4  # the mask key may not have arrived yet: the reader reads it with the payload
    return ClientFrameHead(bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, masked, length, size)


#: `MessageReader.feed`'s verdicts, besides the messages: the connection must be aborted (a
#: reserved bit, a long control frame, a fragment out of place, a close reason not UTF-8), or
#: closed with 1009 first (a message over the size limit, refused on its head), or the reader
#: has worked long enough and the loop should serve others before it goes on (`PAUSE`).
ABORT = "abort"
TOO_BIG = "too big"
UNMASKED = "unmasked"
PAUSE = "pause"
#: The verdicts that close with a code first, then abort: a message over the size limit, and a
#: frame the client did not mask (RFC 6455 5.1: the server MUST close the connection; Phoenix's
#: Cowboy closes with 1002; Tornado reads it as if masked).
CLOSE_FIRST = {TOO_BIG: (CLOSE_TOO_BIG, "message too big"), UNMASKED: (CLOSE_PROTOCOL_ERROR, "frame not masked")}
#: After this much work the reader says `PAUSE` (a client sending frames faster than they are
#: handled must not hold the loop), each frame counting as `FRAME_WORK` bytes beside its own:
#: Tornado 6.6's ``_YIELD_THRESHOLD`` and ``_FRAME_YIELD_COST``, on every release.
YIELD_AFTER = 256 * 1024
FRAME_WORK = 1024


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class MessageReader:
    """The messages and control frames in what a client has sent, by Tornado's rules, check for
    check (``WebSocketProtocol13._receive_frame``): reserved bits, long control frames and
    fragments out of place abort, a message over ``max_size`` (its fragments counted) is refused
    on its head, control frames may come between the fragments of a message. Two checks are
    added: a close frame whose reason is not UTF-8 aborts (RFC 6455 7.1.6; Tornado raises out of
    its reader there), and a frame the client did not mask is `UNMASKED` (RFC 6455 5.1). What has arrived is cut in one go, where Tornado awaits a read per part
    of a frame. It holds at most one unfinished frame (bounded by ``max_size``) between reads.
    """

    __slots__ = ("_data", "_fragments", "_opcode", "_work")

    def __init__(self):
        self._data = b""  # arrived, not cut yet: the start of a frame at most
        self._fragments = None  # the fragments of an unfinished message
        self._opcode = 0  # its opcode
        self._work = 0

    def feed(self, chunk: bytes, max_size: int):
        """Yield what `chunk` completes, in order: ``(opcode, payload)`` for each whole message
        (text 0x1, binary 0x2) and control frame (0x8, 0x9, 0xA), `PAUSE` when the loop should
        be let go before the rest (feed ``b""`` to go on), or a last `ABORT` or `TOO_BIG`. A
        consumer may stop at any item (a close): the rest is kept."""
        data = self._data + chunk if self._data else chunk
        pos = 0
        try:
            while True:
                head = client_frame_head(data, pos)
                if head is None:
                    return
                opcode = head.opcode
                if head.rsv or (opcode & 0x8 and head.length >= 126):
                    yield ABORT  # an extension nobody negotiated; a control frame must be short
                    return
                if not head.masked:
                    yield UNMASKED
                    return
                fragments = self._fragments
                if head.length + (len(fragments) if fragments is not None else 0) > max_size:
                    yield TOO_BIG
                    return
                start = pos + head.size
                end = start + head.length
                if end > len(data):  # the rest of this frame has not arrived
                    return
                payload = data[start:end]
                payload = _websocket_mask(data[start - 4:start], payload)
                pos = end
                fin = head.fin
                if opcode & 0x8:  # control frames may come between the fragments of a message
                    if not fin:
                        yield ABORT
                        return
                elif opcode == 0:  # a continuation
                    if fragments is None:
                        yield ABORT
                        return
                    fragments.extend(payload)
                    if fin:
                        opcode = self._opcode
                        payload = bytes(fragments)
                        self._fragments = None
                else:  # a new message
                    if fragments is not None:
                        yield ABORT
                        return
                    if not fin:
                        self._opcode = opcode
                        self._fragments = bytearray(payload)
                if fin:
                    if opcode == 0x8 and not _utf8(payload[2:]):
                        yield ABORT  # a close reason must be UTF-8 (RFC 6455 7.1.6)
                        return
                    yield opcode, payload
                self._work += FRAME_WORK + head.size + head.length
                if self._work >= YIELD_AFTER:
                    self._work = 0
                    yield PAUSE
        finally:
            self._data = data[pos:]  # an idle socket keeps nothing here

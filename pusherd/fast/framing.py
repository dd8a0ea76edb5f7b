"""Server-to-client WebSocket frames (RFC 6455), built once and shared by every socket.

Server frames are never masked, and pusherd negotiates no compression, so the bytes of a
text frame depend only on the message: one frame can be written to any number of sockets.
"""

import struct

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

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

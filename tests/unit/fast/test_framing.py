"""fast.framing: server-to-client text frames, built once and shared (RFC 6455 5.2)."""

import json
import struct

import pytest

from pusherd.fast.framing import text_frame
from pusherd_testing import parse_frame



@pytest.mark.parametrize("size,header", [
    (0, b"\x81\x00"),
    (1, b"\x81\x01"),
    (125, b"\x81\x7d"),
    (126, b"\x81\x7e\x00\x7e"),
    (127, b"\x81\x7e\x00\x7f"),
    (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    (70000, b"\x81\x7f" + struct.pack("!Q", 70000)),
])
def test_text_frame_length_boundaries(size, header):
    data = b"x" * size
    frame = text_frame(data)
    assert frame[:len(header)] == header
    assert frame[len(header):] == data
    fin, opcode, masked, payload = parse_frame(frame)
    assert (fin, opcode, masked) == (1, 1, 0)
    assert payload == data


def test_text_frame_keeps_utf8_bytes():
    data = '[null,null,"room:é","ev",{"s":"日本"}]'.encode("utf-8")
    assert parse_frame(text_frame(data))[3].decode("utf-8") == '[null,null,"room:é","ev",{"s":"日本"}]'

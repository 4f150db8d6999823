"""WebSocket frames the server sends (RFC 6455 section 5.2), built once and
shared by every connection that gets the same message. Server frames are
never masked, so the bytes are the same for every client."""

from __future__ import annotations

import struct

_TEXT_FIN = 0x81


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, uncompressed text frame carrying ``payload`` (UTF-8)."""
    length = len(payload)
    if length < 126:
        header = bytes((_TEXT_FIN, length))
    elif length < 0x10000:
        header = struct.pack("!BBH", _TEXT_FIN, 126, length)
    else:
        header = struct.pack("!BBQ", _TEXT_FIN, 127, length)
    return header + payload

"""The outbox's direct-send path next to Tornado's own writes, on a real
socket pair: bytes Tornado's IOStream still holds (a ping, a pong, a close
frame, cut by a full socket) must reach the wire before any frame the outbox
sends straight to the socket, or the client would read a broken frame."""

from __future__ import annotations

import asyncio
import socket

from tornado.iostream import IOStream

from notifier.frames import text_frame
from notifier.outbox import Flusher, Outbox


def _pair(buffer: int = 4096) -> tuple[IOStream, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    theirs.setblocking(False)
    return IOStream(ours), theirs


def _drain(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk


async def test_a_direct_send_waits_behind_what_tornado_still_holds():
    stream, peer = _pair()
    try:
        await _check_order(stream, peer)
    finally:
        stream.close()
        peer.close()


async def _check_order(stream: IOStream, peer: socket.socket) -> None:
    outbox = Outbox(stream, 1 << 20, Flusher(), on_overflow=lambda: None)
    # Fill the socket, then hand IOStream a frame it can only partly send, as
    # a heartbeat ping written while the client is slow would be.
    filler = b"f" * (1 << 20)
    sent = stream.socket.send(filler)
    tornado_frame = b"\x89\x7e" + (4000).to_bytes(2, "big") + b"p" * 4000
    stream.write(tornado_frame)
    assert stream.writing(), "IOStream should hold part of its frame"
    received = bytearray(_drain(peer))  # room again, IOStream not yet told
    frame = text_frame(b'{"seq":1}')
    outbox.write(frame, [b'{"seq":1}'])
    for _ in range(200):
        received += _drain(peer)
        if len(received) >= sent + len(tornado_frame) + len(frame):
            break
        await asyncio.sleep(0.005)
    assert bytes(received) == filler[:sent] + tornado_frame + frame


async def test_with_nothing_held_the_frame_goes_out_in_one_send():
    stream, peer = _pair(1 << 16)
    try:
        outbox = Outbox(stream, 1 << 20, Flusher(), on_overflow=lambda: None)
        frame = text_frame(b'{"seq":1}')
        outbox.write(frame, [b'{"seq":1}'])
        assert not stream.writing()  # nothing handed to IOStream: it went straight out
        await asyncio.sleep(0.01)
        assert _drain(peer) == frame
    finally:
        stream.close()
        peer.close()

"""Outgoing bytes of each WebSocket connection.

Frames queued for a connection during one event-loop turn leave in one write
at the end of that turn. When the socket has room, the write is one ``send``
syscall and nothing is buffered; otherwise Tornado's IOStream keeps the rest,
capped at ``limit`` bytes: past that the connection is a slow consumer.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketClosedError


class Flusher:
    """Once per loop turn, at its end: first the ``before`` hooks (the hub's
    fan-out of the turn's messages), then every outbox that got frames."""

    def __init__(self) -> None:
        self._dirty: list["Outbox"] = []
        self._scheduled = False
        self.before: list[Callable[[], None]] = []

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush_all)

    def mark(self, outbox: "Outbox") -> None:
        self._dirty.append(outbox)
        self.schedule()

    def flush_all(self) -> None:
        self._scheduled = False
        for hook in self.before:
            hook()
        dirty, self._dirty = self._dirty, []
        for outbox in dirty:
            outbox.flush()


class Outbox:
    """``write_compressed``, when given, sends one message through a
    per-connection compressor instead (permessage-deflate): such a connection
    cannot share pre-built frames, and its writes go out immediately."""

    __slots__ = ("stream", "limit", "flusher", "on_overflow", "write_compressed", "chunks",
                 "pending", "closed", "_direct", "_last_write")

    def __init__(self, stream: IOStream, limit: int, flusher: Flusher,
                 on_overflow: Callable[[], None],
                 write_compressed: Callable[[bytes], Awaitable[None]] | None = None):
        self.stream = stream
        self.limit = limit
        self.flusher = flusher
        self.on_overflow = on_overflow
        self.write_compressed = write_compressed
        # A list only while something is queued: most idle connections never
        # hold one, and at 10,000 connections the empty lists add up.
        self.chunks: list[bytes] | None = None
        self.pending = 0  # bytes queued since the last flush (or drain, if compressed)
        self.closed = False
        # Writing straight to the socket skips IOStream's Future-per-write; only
        # sound for a plain (non-TLS) stream, where socket bytes are wire bytes.
        self._direct = type(stream) is IOStream
        # IOStream enforces the cap itself and raises StreamBufferFullError.
        stream.max_write_buffer_size = limit
        self._last_write: Awaitable[None] | None = None

    def send(self, frame: bytes, payload: bytes) -> None:
        """Queue one message: ``frame`` is its uncompressed frame, ``payload``
        its JSON (what a compressing connection sends instead)."""
        if self.closed:
            return
        if self.write_compressed is not None:
            self.send_compressed(payload)
            return
        if self.chunks:
            self.chunks.append(frame)
        else:
            self.chunks = [frame]
            self.flusher.mark(self)
        self.pending += len(frame)

    def send_compressed(self, payload: bytes) -> None:
        try:
            self._last_write = self.write_compressed(payload)
        except StreamBufferFullError:
            self.overflow()
        except WebSocketClosedError:
            pass
        else:
            self.pending += len(payload)

    def push(self, frames: bytes) -> None:
        """During the flush pass: write ``frames`` now, or behind what is
        already queued so the order holds."""
        if self.closed:
            return
        if self.chunks:
            self.chunks.append(frames)
            return
        self._write(frames, (frames,))

    def flush(self) -> None:
        if self.closed or not self.chunks:
            return
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = None
        self.pending = 0
        self._write(data, chunks)

    def _write(self, data: bytes, chunks) -> None:
        """``data`` is ``chunks`` joined: whole frames, which an overflow must
        not leave half-sent."""
        stream = self.stream
        if stream.closed():
            return
        sent = 0
        if self._direct and not stream.writing():
            try:
                sent = stream.socket.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                # The peer is gone; let IOStream notice and run the close callbacks.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        try:
            self._last_write = stream.write(data)
        except StreamBufferFullError:
            self.overflow(_rest_of_cut_frame(chunks, sent))
        except StreamClosedError:
            pass

    async def drain(self) -> None:
        """Flush now and wait until the socket took everything queued so far."""
        self.flush()
        self.pending = 0
        if self.stream.writing() and self._last_write is not None:
            try:
                await self._last_write
            except (StreamClosedError, WebSocketClosedError):
                pass

    def overflow(self, unfinished: bytes = b"") -> None:
        """Give up on this connection: drop what is queued and close it (4009).
        ``unfinished`` is the tail of a frame already partly on the wire: it
        must go out whole so the close frame that follows is readable."""
        if self.closed:
            return
        self.discard()
        # Room for the close frame: it queues behind what the client has not read.
        self.stream.max_write_buffer_size = None
        if unfinished:
            try:
                self.stream.write(unfinished)
            except StreamClosedError:
                pass
        self.on_overflow()

    def discard(self) -> None:
        self.closed = True
        self.chunks = None
        self.pending = 0


def _rest_of_cut_frame(chunks: list[bytes], sent: int) -> bytes:
    """The unsent tail of the frame that the first ``sent`` bytes cut into."""
    start = 0
    for chunk in chunks:
        end = start + len(chunk)
        if start < sent < end:
            return chunk[sent - start:]
        if sent < end:
            return b""
        start = end
    return b""

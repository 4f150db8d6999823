"""Outgoing bytes of each WebSocket connection, and the pass that writes them.

A frame for a connection whose socket has room and nothing waiting leaves at
once, in one ``send`` syscall. Otherwise it waits in the connection's outbox
for the Flusher, which writes each waiting outbox once (everything it holds,
joined) in slices of at most ``SLICE`` seconds, so a fan-out to many sockets
never holds the event loop: between slices the loop reads requests, commits
publishes and answers pings, and messages that arrive meanwhile join the
writes still to come. Bytes the socket does not take wait in Tornado's
IOStream, capped at ``limit``: past that the connection is a slow consumer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import perf_counter
from typing import Awaitable, Callable, Sequence

from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketClosedError

from notifier import internals, logs

# Writing 1,000 sockets takes about 5 ms here: a slice is a fifth of that, so
# a request or a commit waits about 1 ms for the loop, not the whole fan-out.
SLICE = 0.001
# How many writes between looks at the clock.
CHECK_EVERY = 32

_log = logs.get("notifier.outbox")


class Flusher:
    """Runs at the end of a loop turn: first the ``before`` hooks (the hub's
    fan-out of the turn's messages), then the waiting outboxes, oldest first.
    A slice ends once it has run ``SLICE`` seconds *and* the loop has other
    work (a readable socket, a ready callback); the rest goes on in the next
    turn. With nothing else to do, a fan-out runs to its end in one go."""

    def __init__(self, slice_seconds: float = SLICE) -> None:
        self.slice_seconds = slice_seconds
        self._waiting: deque[Outbox] = deque()
        self._scheduled = False
        self._behind = False  # the last slice ended with outboxes still waiting
        self._deadline = 0.0
        self._loop_has_work: Callable[[], bool] | None = None
        self.before: list[Callable[[Callable[[], bool]], None]] = []

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            loop = asyncio.get_running_loop()
            if self._loop_has_work is None:
                self._loop_has_work = internals.work_probe(loop)
            loop.call_soon(self.flush_all)

    def mark(self, outbox: "Outbox") -> None:
        self._waiting.append(outbox)
        self.schedule()

    @property
    def behind(self) -> bool:
        """A fan-out is under way: outboxes wait for a later slice."""
        return self._behind or bool(self._waiting)

    def in_slice(self) -> bool:
        """May this slice write on? (Cheap enough to ask every few writes.)"""
        now = perf_counter()
        if now < self._deadline:
            return True
        if self._loop_has_work():
            return False
        # Nothing else to do: another slice, before the loop is asked again.
        self._deadline = now + self.slice_seconds
        return True

    def _never(self) -> bool:
        return False

    def flush_all(self) -> None:
        self._scheduled = False
        self._deadline = perf_counter() + self.slice_seconds
        # While the last pass's outboxes still wait, new frames queue behind
        # them: each connection is written once per round, oldest first.
        for hook in self.before:
            try:
                hook(self._never if self._behind else self.in_slice)
            except Exception as exc:  # noqa: BLE001 - the outboxes below still go out
                _log.error("flusher.hook_failed", error=repr(exc))
        waiting = self._waiting
        written = 0
        while waiting:
            outbox = waiting.popleft()
            try:
                outbox.flush()
            except Exception as exc:  # noqa: BLE001 - one connection, not the turn
                _log.error("flusher.flush_failed", error=repr(exc))
                outbox.discard()
            written += 1
            if written == CHECK_EVERY:
                written = 0
                if waiting and not self.in_slice():
                    self._behind = True
                    self.schedule()
                    return
        self._behind = False


class Outbox:
    """``write_compressed``, when given, sends one message through a
    per-connection compressor instead (permessage-deflate): such a connection
    cannot share pre-built frames, and its writes go out immediately."""

    __slots__ = ("stream", "limit", "flusher", "on_overflow", "write_compressed", "chunks",
                 "pending", "closed", "ready", "_send", "_unsent", "_last_write")

    def __init__(self, stream: IOStream, limit: int, flusher: Flusher,
                 on_overflow: Callable[[], None],
                 write_compressed: Callable[[bytes], Awaitable[None]] | None = None):
        self.stream = stream
        self.limit = limit
        self.flusher = flusher
        self.on_overflow = on_overflow
        self.write_compressed = write_compressed
        # A list only while something waits: most idle connections never
        # hold one, and at 10,000 connections the empty lists add up.
        self.chunks: list[bytes] | None = None
        self.pending = 0  # bytes waiting here (or, compressed, written since the last drain)
        self.closed = False
        # Writing straight to the socket skips IOStream's Future-per-write; only
        # sound for a plain (non-TLS) stream, where socket bytes are wire bytes.
        self._send = stream.socket.send if type(stream) is IOStream else None
        # What IOStream holds unsent: ours, or Tornado's own frames (pings,
        # pongs, close), possibly cut in the middle. A direct send must wait
        # while it holds anything.
        self._unsent = internals.unsent_bytes(stream)
        # True when nothing of ours stands in the way of a direct send: open,
        # plain, uncompressed, nothing waiting here. With ``_unsent`` empty,
        # the fan-out's check is two attribute reads.
        self.ready = self._send is not None and write_compressed is None
        # IOStream enforces the cap itself and raises StreamBufferFullError.
        stream.max_write_buffer_size = limit
        self._last_write: Awaitable[None] | None = None

    def write(self, frames: bytes, payloads: Sequence[bytes]) -> None:
        """Send ``frames`` (the uncompressed frames of ``payloads``) now if the
        socket has room, else behind what is already waiting."""
        # The send of ``_write``, inlined: this runs once per subscriber per
        # fan-out, where one more call costs about 1% of the delivery.
        if self.ready and not len(self._unsent):
            try:
                sent = self._send(frames)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the peer is gone; IOStream notices and runs the close callbacks
            if sent != len(frames):
                self._buffer(frames[sent:], (frames,), sent)
            return
        if self.closed:
            return
        if self.write_compressed is not None:
            for payload in payloads:
                self.send_compressed(payload)
        elif self.chunks is not None:
            self.queue(frames, payloads)  # behind what waits, under the same cap
        else:
            self._write(frames, (frames,))

    def queue(self, frames: bytes, payloads: Sequence[bytes]) -> None:
        """Like ``write``, but leave it to the Flusher's pass (compressed
        connections still write at once)."""
        if self.closed:
            return
        if self.write_compressed is not None:
            for payload in payloads:
                self.send_compressed(payload)
            return
        if self.chunks is None:
            self.chunks = [frames]
            self.ready = False
            self.flusher.mark(self)
        else:
            self.chunks.append(frames)
        self.pending += len(frames)
        if self.pending > self.limit:
            self.overflow()

    def send(self, frame: bytes, payload: bytes) -> None:
        """Queue one message for this turn's flush: ``frame`` is its
        uncompressed frame, ``payload`` its JSON (what a compressing
        connection sends instead)."""
        self.queue(frame, (payload,))

    def send_compressed(self, payload: bytes) -> None:
        try:
            self._last_write = self.write_compressed(payload)
        except StreamBufferFullError:
            self.overflow()
        except WebSocketClosedError:
            pass
        else:
            self.pending += len(payload)

    def flush(self) -> None:
        if self.closed or not self.chunks:
            return
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = None
        self.pending = 0
        self._write(data, chunks)

    def _write(self, data: bytes, chunks: Sequence[bytes]) -> None:
        """``data`` is ``chunks`` joined: whole frames, which an overflow must
        not leave half-sent."""
        sent = 0
        if self._send is not None and not len(self._unsent):
            try:
                sent = self._send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return  # the peer is gone (or the socket closed); IOStream notices
            if sent == len(data):
                self.ready = self.write_compressed is None
                return
            data = data[sent:]
        self._buffer(data, chunks, sent)

    def _buffer(self, rest: bytes, chunks: Sequence[bytes], sent: int) -> None:
        """Hand what the socket did not take to IOStream, which writes it when
        the socket has room; the first ``sent`` bytes of ``chunks`` went out."""
        try:
            self._last_write = self.stream.write(rest)
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
        self.ready = False
        self.chunks = None
        self.pending = 0


def _rest_of_cut_frame(chunks: Sequence[bytes], sent: int) -> bytes:
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

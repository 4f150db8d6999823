"""The fan-out benchmark's load generator: WebSocket subscribers and a publisher for TOPIC.

Subscribers are picows clients (``Sub``: sampled ones parse, check and time
what they get, all count) or, where the load generator must stay cheap,
``RawSub``: the upgrade and ``subscribe`` done by hand on a plain asyncio
connection, then only bytes counted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from typing import Any, Callable

import orjson
from picows import WSListener, WSMsgType, WSTransport, ws_connect

from bench.common.run import log
from bench.common.servers import TOPIC, Server

TEXT = WSMsgType.TEXT
CLOSE = WSMsgType.CLOSE

# Timestamps embedded in messages: perf_counter_ns relative to process start,
# offset so that they always have 16 digits (the payload size stays fixed).
_T0 = time.perf_counter_ns()
_TS_BASE = 10**15
_perf_ns = time.perf_counter_ns


def stamp() -> int:
    return _perf_ns() - _T0 + _TS_BASE


class Hub:
    """What all subscribers of one server share during a round."""

    __slots__ = ("total", "wake_at", "pump", "lat", "bad", "closes", "reads", "sframes")

    def __init__(self) -> None:
        self.total = 0
        self.wake_at = 1 << 62
        self.pump: Callable[[], None] = noop
        self.lat: list[int] = []
        self.bad: list[str] = []
        self.closes: list[str] = []
        # Sampled subscribers: frames received, and reads (socket reads that
        # brought at least one whole frame): frames per read shows whether a
        # server coalesces messages into one write.
        self.reads = 0
        self.sframes = 0


def noop() -> None:
    pass


def _subscribe_cmd(ref: int, topic: str = TOPIC) -> bytes:
    return orjson.dumps({"type": "subscribe", "topic": topic, "ref": ref})


class Sub(WSListener):
    """A subscriber. Sampled ones parse and time what they get; all count."""

    def __init__(self, hub: Hub, index: int, sampled: bool):
        self.hub = hub
        self.index = index
        self.sampled = sampled
        self.live = False
        self.n = 0
        self.last_ts = 0
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(TEXT, _subscribe_cmd(self.index))

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if self.live:
            if self.sampled:
                now = _perf_ns() - _T0 + _TS_BASE
            self.n += 1
            hub = self.hub
            hub.total += 1
            if self.sampled:
                hub.sframes += 1
                if frame.last_in_buffer:
                    hub.reads += 1
                try:
                    m = orjson.loads(frame.get_payload_as_bytes())
                    ts = m["data"]["ts"]
                    if m["type"] != "message" or m["topic"] != TOPIC:
                        raise ValueError
                except Exception:
                    hub.bad.append(f"sub {self.index}: unexpected frame {frame}")
                else:
                    hub.lat.append(now - ts)
                    # Order: by seq where there is one (stored messages); by the
                    # publisher's timestamp for ephemeral ones (one publisher,
                    # whose commands are handled in order).
                    key = m["seq"]
                    if key is None:
                        key = ts
                    if key <= self.last_ts:
                        hub.bad.append(f"sub {self.index}: out of order or duplicate "
                                       f"({'seq' if m['seq'] is not None else 'ts'} {key} after {self.last_ts})")
                    self.last_ts = key
            if hub.total >= hub.wake_at:
                hub.pump()
            return
        if frame.msg_type is CLOSE:
            return
        try:
            m = orjson.loads(frame.get_payload_as_bytes())
        except Exception:
            m = {}
        if m.get("type") == "subscribed" and m.get("topic") == TOPIC and not self.ready.done():
            self.live = True
            self.ready.set_result(None)
        elif m.get("type") == "error" and not self.ready.done():
            self.ready.set_exception(RuntimeError(f"subscribe refused: {m}"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        hs = transport.close_handshake
        code = hs.recv.code if hs is not None and hs.recv is not None else None
        code = getattr(code, "value", code)
        reason = hs.recv.reason if hs is not None and hs.recv is not None else ""
        self.hub.closes.append(f"sub {self.index}: closed, code {code} {reason!r}")
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"closed before subscribed (code {code} {reason!r})"))


class Pub(WSListener):
    """The publisher connection: counts `published` replies."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.acked = 0
        self.on_ack: Callable[[], None] = noop
        self.errors: list[Any] = []
        self.closed: str | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(TEXT, b'{"type":"ping","ref":"ready"}')

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type is CLOSE:
            return
        try:
            m = orjson.loads(frame.get_payload_as_bytes())
        except Exception:
            self.errors.append(f"publisher got a non-JSON frame: {frame}")
            return
        kind = m.get("type")
        if kind == "published":
            self.acked += 1
            self.on_ack()
        elif kind == "pong" and m.get("ref") == "ready":
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            self.errors.append(m)
            self.on_ack()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        hs = transport.close_handshake
        code = hs.recv.code if hs is not None and hs.recv is not None else None
        self.closed = f"publisher closed, code {getattr(code, 'value', code)}"
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(self.closed))


async def connect_subscribers(
    server: Server, hub: Hub, count: int, sample_every: int, *, source_ips: list[str], concurrency: int = 100,
    first_index: int = 0, what: str = "subscribers",
) -> list[Sub]:
    url = f"{server.url}?token={server.sub_token}"
    sem = asyncio.Semaphore(concurrency)
    subs: list[Sub] = []
    done = 0
    t0 = time.monotonic()

    async def one(i: int) -> None:
        nonlocal done
        sampled = sample_every > 0 and i % sample_every == 0
        ip = source_ips[i % len(source_ips)]
        async with sem:
            for attempt in range(5):
                try:
                    _, listener = await ws_connect(
                        lambda: Sub(hub, i, sampled), url, websocket_handshake_timeout=60,
                        local_addr=(ip, 0), read_buffer_init_size=4096,
                    )
                    await asyncio.wait_for(listener.ready, 60)
                    subs.append(listener)
                    done += 1
                    if done % 2000 == 0:
                        log(f"  {server.name}: {done}/{count} {what} ({time.monotonic() - t0:.1f}s)")
                    return
                except (OSError, asyncio.TimeoutError) as exc:
                    if attempt == 4:
                        raise RuntimeError(f"{server.name}: connecting {what} {i} failed: {exc!r}") from exc
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(first_index + i) for i in range(count)))
    subs.sort(key=lambda s: s.index)
    return subs


async def connect_publisher(server: Server) -> Pub:
    _, pub = await ws_connect(Pub, f"{server.url}?token={server.pub_token}", websocket_handshake_timeout=30)
    await asyncio.wait_for(pub.ready, 30)
    return pub


# The HTTP scenario's subscribers: a sample of picows ones that parse and time
# every frame, and byte counters for the rest, so that the load generator stays
# cheap (about one Python call per socket read instead of one per frame).


def frame_wire_size(payload_size: int) -> int:
    """Bytes on the wire of an unmasked (server -> client) frame."""
    return payload_size + (2 if payload_size < 126 else 4 if payload_size < 65536 else 10)


class SampledSub(Sub):
    """A picows subscriber that also adds up the wire size of what it gets once
    subscribed: the bytes a byte-counting subscriber must see for the same
    messages."""

    def __init__(self, hub: Hub, index: int):
        super().__init__(hub, index, True)
        self.wire = 0

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if self.live:
            self.wire += frame_wire_size(frame.payload_size)
        Sub.on_ws_frame(self, transport, frame)


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (client frames must be masked; a zero mask leaves the
    payload as it is). Only for short control and command frames."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


_PONG = _masked_frame(0xA, b"")


class RawSub(asyncio.BufferedProtocol):
    """A real WebSocket subscriber on a plain asyncio connection: the HTTP
    upgrade (with the token) and the `subscribe` command are done by hand and
    the replies parsed until `subscribed`; from then on it only counts bytes.
    Every message has the same wire size as for the sampled subscribers, so a
    byte total below theirs means lost deliveries.

    With `subscribe` False it sends no command and waits for the `subscribed`
    of a topic the server subscribes it to (notifier's personal topic); with
    `topic` None it is ready, and counting, as soon as the upgrade is done.
    Far cheaper for the load generator than a picows connection (a third of
    the CPU per connection), for connection-rate tests."""

    # One receive buffer for all of them: callbacks run one at a time.
    _buf = bytearray(256 * 1024)

    def __init__(self, hub: Hub, index: int, host: str, token: str, topic: str | None = TOPIC,
                 subscribe: bool = True):
        self.hub = hub
        self.index = index
        self.topic = topic
        self.subscribe = subscribe
        self.live = False
        self.nbytes = 0  # received after the `subscribed` frame
        self.reads = 0
        self.pings = 0
        self.pending = bytearray()
        self.upgraded = False
        self.key = base64.b64encode(os.urandom(16))
        self.request = (b"GET /ws?token=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        % (token.encode(), host.encode(), self.key))
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.live:
            self.nbytes += nbytes
            self.reads += 1
            # A server ping (0x89 opens its frame; never in ASCII JSON): answer it
            # so the heartbeat keeps the connection. A false positive only sends
            # an unsolicited pong, which is allowed.
            if self._buf.find(b"\x89", 0, nbytes) >= 0:
                self.pings += 1
                self.transport.write(_PONG)
            return
        self.pending += self._buf[:nbytes]
        try:
            self._handshake()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self) -> None:
        buf = self.pending
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).split(b"\r\n")
            if not head[0].startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"upgrade refused: {bytes(buf[:300])!r}")
            accept = base64.b64encode(hashlib.sha1(self.key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            if not any(line.lower().startswith(b"sec-websocket-accept:") and line.split(b":", 1)[1].strip() == accept
                       for line in head[1:]):
                raise RuntimeError(f"bad Sec-WebSocket-Accept in {head!r}")
            del buf[:end + 4]
            self.upgraded = True
            if self.topic is None:
                self._go_live(buf)
                return
            if self.subscribe:
                self.transport.write(_masked_frame(0x1, _subscribe_cmd(self.index, self.topic)))
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b1 & 0x80:
                raise RuntimeError("masked frame from the server")
            size, at = b1 & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, at = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + size:
                return
            opcode, payload = b0 & 0x0F, bytes(buf[at:at + size])
            del buf[:at + size]
            if opcode == 0x8:
                raise RuntimeError(f"closed before subscribed: {payload!r}")
            if opcode == 0x9:
                self.transport.write(_masked_frame(0xA, payload))
                continue
            if opcode != 0x1 or not b0 & 0x80:
                continue
            m = orjson.loads(payload)
            if m.get("type") == "error":
                raise RuntimeError(f"subscribe refused: {m}")
            if m.get("type") == "subscribed" and m.get("topic") == self.topic:
                self._go_live(buf)
                return

    def _go_live(self, buf: bytearray) -> None:
        self.live = True
        self.nbytes = len(buf)  # anything after the handshake is counted
        self.pending = bytearray()
        self.ready.set_result(None)

    def connection_lost(self, exc) -> None:
        if self.live:
            self.hub.closes.append(f"raw sub {self.index}: connection lost ({exc!r})")
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"connection lost before subscribed ({exc!r})"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


async def connect_mixed_subscribers(
    server: Server, hub: Hub, count: int, sample: int, *, source_ips: list[str], concurrency: int = 100,
) -> tuple[list[SampledSub], list[RawSub]]:
    """`count` subscribers, `sample` of them picows ones spread evenly through
    the connection (and so subscription) order, the rest byte counters."""
    url = f"{server.url}?token={server.sub_token}"
    host = f"127.0.0.1:{server.port}"
    sample = max(0, min(sample, count))
    sampled_at = {k * count // sample for k in range(sample)} if sample else set()
    sem = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    sampled: list[SampledSub] = []
    raw: list[RawSub] = []

    async def one(i: int) -> None:
        ip = source_ips[i % len(source_ips)]
        async with sem:
            for attempt in range(5):
                try:
                    if i in sampled_at:
                        _, listener = await ws_connect(
                            lambda: SampledSub(hub, i), url, websocket_handshake_timeout=60,
                            local_addr=(ip, 0), read_buffer_init_size=4096,
                        )
                        await asyncio.wait_for(listener.ready, 60)
                        sampled.append(listener)
                    else:
                        _, proto = await loop.create_connection(
                            lambda: RawSub(hub, i, host, server.sub_token), "127.0.0.1", server.port,
                            local_addr=(ip, 0))
                        try:
                            await asyncio.wait_for(proto.ready, 60)
                        except BaseException:
                            proto.close()
                            raise
                        raw.append(proto)
                    return
                except (OSError, asyncio.TimeoutError) as exc:
                    if attempt == 4:
                        raise RuntimeError(f"{server.name}: connecting subscriber {i} failed: {exc!r}") from exc
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(i) for i in range(count)))
    sampled.sort(key=lambda s: s.index)
    raw.sort(key=lambda s: s.index)
    return sampled, raw


def message_wire_size(payload: int, seq: int = 1000) -> int:
    """Wire size of the `message` frame notifier sends for `payload`-byte
    `data`: the shape of Message.payload() in notifier/messages.py, with a
    24-digit id, a millisecond RFC 3339 time and a 4-digit seq (a durable
    store some thousand messages in, as in the HTTP test: 236 bytes for 100)."""
    head, tail = make_data_template(payload)
    body = (b'{"type":"message","topic":"%s","seq":%d,"id":"%s","time":"2026-01-01T00:00:00.000Z",'
            b'"event":null,"data":%s%s%s}' % (TOPIC.encode(), seq, b"0" * 24, head, b"0" * 16, tail))
    return frame_wire_size(len(body))


def make_data_template(payload: int) -> tuple[bytes, bytes]:
    """`data` is {"ts":<16 digits>,"pad":"xxx"} of exactly `payload` bytes (compact JSON)."""
    fixed = len(b'{"ts":') + 16 + len(b',"pad":""}')
    pad = b"x" * max(0, payload - fixed)
    return b'{"ts":', b',"pad":"' + pad + b'"}'


async def close_all(subs: list, pub: Pub | None = None) -> None:
    for s in subs:
        if s.transport is not None and not s.transport.is_disconnected:
            s.transport.disconnect(graceful=False)
    if pub is not None and pub.transport is not None:
        pub.transport.disconnect(graceful=False)
    await asyncio.sleep(0.2)

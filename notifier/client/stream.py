"""Following topics over ``/ws``, across reconnects.

A ``Stream`` owns one subscription: a background task (``_pump``) opens a
socket, resubscribes every topic from the last position handed to the
caller, reads frames into a queue, and on any loss waits (backoff with full
jitter) and starts again. The caller's side (``messages``) takes the queue
in order, feeds ``Positions``, and hands over each message once. One
``_Socket`` holds what lives and dies with a connection: the epochs its
``subscribed`` frames announced, its keepalive pings, the token refresh,
and the acks to send.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import orjson
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

from notifier import protocol
from notifier.client.errors import APIError, Forbidden, SubscriptionRefused, Unauthorized
from notifier.client.http import RETRY_STATUSES, TIMEOUT_OR_CUT, error_from_response
from notifier.client.model import (JSON, Connected, Disconnected, Event, Message, Subscribed,
                                   TokenSource)
from notifier.client.resume import Backoff, Positions
from notifier.topics import personal_topic

# Messages read ahead of the caller. Past this the socket is not read, so a
# caller that falls behind slows the server down (and may get 4009 and a
# resume) instead of filling memory.
QUEUE_LIMIT = 1000
# Acks only move a cursor forward, so only the latest per topic matters:
# they are sent at most this often, well inside the server's command rate.
ACK_INTERVAL = 0.1
# A token is refreshed this long before it expires, or halfway there if it
# lives shorter; a refused refresh is tried again no sooner than this.
REFRESH_LEAD = 60.0
REFRESH_RETRY = 1.0
# How long a normal close waits for the server's close frame (by then the
# acks sent before it are stored).
CLOSE_WAIT = 5.0
SYNC_REF = "sync"  # the ping after a connection's subscribes: its pong ends their replays
PING_REF = "ping"
AUTH_REF = "auth"


@dataclass(frozen=True, slots=True)
class _Synced:
    pass


@dataclass(frozen=True, slots=True)
class _Fatal:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _End:
    pass


_Item = Union[Message, Connected, Subscribed, Disconnected, _Synced, _Fatal, _End]


class _Retry(Exception):
    """This connection attempt failed in a way worth trying again."""


class _Reconnect(Exception):
    """Drop this connection and open another (e.g. a subscribe that failed
    for want of the store)."""


def _discard_outcome(future: "asyncio.Future[None]") -> None:
    if not future.cancelled():
        future.exception()  # a write to a socket that closed meanwhile: the reader sees it


class Stream:
    def __init__(self, ws_url: str, token: TokenSource, headers: Mapping[str, str],
                 topics: list[str], since: int | None, backoff: Backoff,
                 connect_timeout: float, ping_interval: float, ping_timeout: float):
        self.ws_url = ws_url
        self.token = token
        self.headers = dict(headers)
        self.positions = Positions(topics, since)
        self.wanted = frozenset(self.positions.topics)
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.backpressured = False
        self._room = asyncio.Event()
        self.acks: dict[str, tuple[int, str | None]] = {}  # topic -> latest (seq, epoch) to ack
        self.acks_wanted = asyncio.Event()
        self.stopping = False
        self.socket: _Socket | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None

    # The caller's side

    def start(self) -> None:
        self._pump_task = asyncio.ensure_future(self._pump())

    async def messages(self, auto_ack: bool,
                       on_event: Callable[[Event], None] | None) -> AsyncIterator[Message]:
        positions = self.positions
        while True:
            item = await self.queue.get()
            if self.stopping or isinstance(item, _End):
                return  # close() was called: what is still queued is not handed over
            if self.queue.qsize() < QUEUE_LIMIT:
                self._room.set()
            if isinstance(item, Message):
                if positions.accept(item):
                    yield item
                    if auto_ack:  # the caller's loop body returned: the message is handled
                        await self.ack(item)
                continue
            if isinstance(item, _Synced):
                positions.synced()
                continue
            if isinstance(item, _Fatal):
                raise item.error
            if isinstance(item, Subscribed):
                positions.subscribed(item.topic, item.seq, item.epoch)
            elif isinstance(item, Disconnected):
                positions.disconnected()
            if on_event is not None:
                on_event(item)

    async def ack(self, message: Message) -> None:
        if message.seq is None or message.topic not in self.wanted:
            return
        held = self.acks.get(message.topic)
        if held is not None and held[1] == message.epoch and held[0] >= message.seq:
            return
        self.acks[message.topic] = (message.seq, message.epoch)
        self.acks_wanted.set()

    async def stop(self) -> None:
        """Send the acks still waiting, close the socket normally (the
        server stores those acks before it answers the close), end the
        caller's loop. Safe to call more than once, from any task."""
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        self.stopping = True
        self._room.set()
        pump = self._pump_task
        socket = self.socket
        if socket is not None and socket.welcomed:
            socket.send_acks()
            socket.connection.close(protocol.CLOSE_NORMAL, "client closed")
            if pump is not None:
                await asyncio.wait([pump], timeout=CLOSE_WAIT)
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.wait([pump])
        self.queue.put_nowait(_End())

    # The socket's side

    def emit(self, item: _Item) -> None:
        self.queue.put_nowait(item)

    async def put_message(self, message: Message) -> None:
        while self.queue.qsize() >= QUEUE_LIMIT and not self.stopping:
            self.backpressured = True
            self._room.clear()
            await self._room.wait()
        self.backpressured = False
        self.queue.put_nowait(message)

    async def get_token(self) -> str:
        if isinstance(self.token, str):
            return self.token
        answer = self.token()
        token = await answer if inspect.isawaitable(answer) else answer
        if not token:
            raise Unauthorized(401, "unauthorized", "the token function gave no token")
        return token

    async def _pump(self) -> None:
        attempt = 0
        try:
            while not self.stopping:
                code: int | None = None
                reason: str | None = None
                opened: float | None = None
                try:
                    connection = await self._connect()
                except _Retry as exc:
                    reason = str(exc)
                else:
                    opened = time.monotonic()
                    self.socket = _Socket(self, connection)
                    try:
                        code, reason = await self.socket.run()
                    finally:
                        self.socket.finish()
                        self.socket = None
                if self.stopping:
                    return
                if code == protocol.CLOSE_FORBIDDEN:
                    raise Forbidden(code, reason or "")
                if opened is not None and time.monotonic() - opened >= self.backoff.stable_after:
                    attempt = 0
                attempt += 1
                delay = self.backoff.delay(attempt)
                self.emit(Disconnected(code, reason, delay))
                await asyncio.sleep(delay)
        except Exception as exc:  # NotifierError, or the caller's token function failing
            self.emit(_Fatal(exc))

    async def _connect(self) -> WebSocketClientConnection:
        token = await self.get_token()
        request = HTTPRequest(self.ws_url, headers={**self.headers, "Authorization": f"Bearer {token}"},
                              connect_timeout=self.connect_timeout,
                              request_timeout=self.connect_timeout)
        try:
            return await websocket_connect(request)
        except ssl.SSLError:
            raise
        except HTTPClientError as exc:
            if exc.code == TIMEOUT_OR_CUT or exc.code in RETRY_STATUSES:
                raise _Retry(str(exc)) from None
            if exc.response is not None:
                raise error_from_response(exc.response) from None
            raise APIError(exc.code, "http_error", str(exc)) from None
        except OSError as exc:  # refused, reset, unreachable; Tornado's StreamClosedError too
            raise _Retry(str(exc) or type(exc).__name__) from None


class _Socket:
    """One connection, from the handshake to its close."""

    def __init__(self, stream: Stream, connection: WebSocketClientConnection):
        self.stream = stream
        self.connection = connection
        self.welcomed = False
        self.expires = 0
        self.last_received = time.monotonic()
        self.epochs: dict[str, str] = {}  # as announced by this connection's subscribed frames
        # Topics subscribed explicitly whose reply has not come: frames for
        # them until then belong to the automatic subscription being replaced.
        self.pending: dict[str, int] = {}
        self.refs: dict[int, str] = {}  # subscribe ref -> topic
        self.dead: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.auth_reply: asyncio.Future[int] | None = None
        self.helpers: list[asyncio.Task[None]] = []

    async def run(self) -> tuple[int | None, str | None]:
        """Read until the connection ends: its close code and reason (None,
        with a reason of ours, when it died without a close frame)."""
        self.helpers.append(asyncio.ensure_future(self._keepalive()))
        reader = asyncio.ensure_future(self._read())
        try:
            waiting: list[asyncio.Future[Any]] = [reader, self.dead]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.wait([reader])
        if not self.dead.done():
            try:
                return reader.result()
            except _Reconnect as exc:
                return None, str(exc)
        return None, "no answer to ping"

    def finish(self) -> None:
        for task in self.helpers:
            task.cancel()
        if not self.dead.done():
            self.dead.cancel()
        self.connection.close()

    def send(self, command: dict[str, JSON]) -> None:
        try:
            self.connection.write_message(orjson.dumps(command).decode()).add_done_callback(
                _discard_outcome)
        except WebSocketClosedError:
            pass  # closing: the reader is about to see it

    async def _read(self) -> tuple[int | None, str | None]:
        connection = self.connection
        while True:
            raw = await connection.read_message()
            if raw is None:
                if connection.close_code is None:
                    return None, "connection lost"
                return connection.close_code, connection.close_reason
            self.last_received = time.monotonic()
            try:
                frame = protocol.loads(raw)
            except ValueError:
                continue
            if isinstance(frame, dict):
                await self._dispatch(frame)

    async def _dispatch(self, frame: dict[str, JSON]) -> None:
        stream = self.stream
        kind = frame.get("type")
        topic = frame.get("topic")
        if kind == "message":
            if topic in stream.wanted and topic not in self.pending:
                await stream.put_message(Message(
                    topic=topic, seq=frame.get("seq"), id=frame.get("id", ""),
                    time=frame.get("time", ""), event=frame.get("event"),
                    data=frame.get("data"), epoch=self.epochs.get(topic)))
                self.last_received = time.monotonic()  # reading again after a wait
        elif kind == "subscribed":
            if topic not in stream.wanted:
                return
            if topic in self.pending:
                if frame.get("ref") != self.pending[topic]:
                    return  # the automatic personal subscription, replaced by ours
                del self.pending[topic]
            self.epochs[topic] = frame["epoch"]
            stream.emit(Subscribed(topic, frame["seq"], frame["epoch"], frame["recovered"]))
            stream.acks_wanted.set()  # acks waiting for this topic's epoch
        elif kind == "welcome" and not self.welcomed:
            self._welcome(frame)
        elif kind == "pong":
            if frame.get("ref") == SYNC_REF:
                stream.emit(_Synced())
        elif kind == "authenticated":
            if self.auth_reply is not None and not self.auth_reply.done():
                self.auth_reply.set_result(frame["expires"])
        elif kind == "error":
            self._error(frame)
        elif kind == "unsubscribed" and frame.get("ref") is None and topic in stream.wanted:
            raise SubscriptionRefused(topic, "unsubscribed",
                                      "the refreshed token no longer allows this topic")

    def _welcome(self, frame: dict[str, JSON]) -> None:
        stream = self.stream
        self.welcomed = True
        self.expires = frame["expires"]
        stream.emit(Connected(frame["connection"], frame["user"], frame["expires"]))
        personal = personal_topic(frame["user"])
        for ref, topic in enumerate(stream.positions.topics, start=1):
            if topic == personal and stream.positions.position(topic)[0] is None:
                continue  # the server subscribed it already, from the stored cursor
            self.pending[topic] = ref
            self.refs[ref] = topic
            self.send(stream.positions.subscribe_command(topic, ref))
        self.send({"type": "ping", "ref": SYNC_REF})
        self.helpers.append(asyncio.ensure_future(self._flush_acks()))
        if not isinstance(stream.token, str):
            self.helpers.append(asyncio.ensure_future(self._refresh()))

    def _error(self, frame: dict[str, JSON]) -> None:
        ref, code = frame.get("ref"), str(frame.get("code"))
        message = str(frame.get("message", ""))
        if ref == AUTH_REF:
            if self.auth_reply is not None and not self.auth_reply.done():
                self.auth_reply.set_exception(Unauthorized(401, code, message))
            return
        topic = self.refs.get(ref) if isinstance(ref, int) else None
        if topic is None:
            return  # an ack or ping refused: nothing to do about it
        self.pending.pop(topic, None)
        if code in (protocol.UNAVAILABLE, protocol.RATE_LIMITED):
            raise _Reconnect(f"subscribe {topic}: {code}")
        raise SubscriptionRefused(topic, code, message)

    def send_acks(self) -> None:
        acks = self.stream.acks
        for topic, (seq, epoch) in list(acks.items()):
            current = self.epochs.get(topic)
            if current is None:
                continue  # until this connection's subscribed says which log is current
            del acks[topic]
            if current == epoch:  # an ack from a log since reset would move the wrong cursor
                self.send({"type": "ack", "topic": topic, "seq": seq})

    async def _flush_acks(self) -> None:
        wanted = self.stream.acks_wanted
        while True:
            await wanted.wait()
            wanted.clear()
            self.send_acks()
            await asyncio.sleep(ACK_INTERVAL)

    async def _keepalive(self) -> None:
        """A ping when nothing came for ``ping_interval``; no frame at all
        within ``ping_timeout`` after it: the connection is dead. Not
        while the caller holds the reader back: frames may be waiting."""
        stream = self.stream
        while True:
            idle = time.monotonic() - self.last_received
            if idle < stream.ping_interval or stream.backpressured:
                await asyncio.sleep(max(stream.ping_interval - idle, 0.01))
                continue
            sent = time.monotonic()
            self.send({"type": "ping", "ref": PING_REF})
            await asyncio.sleep(stream.ping_timeout)
            if self.last_received < sent and not stream.backpressured:
                self.dead.set_result(None)
                return

    async def _refresh(self) -> None:
        """Replace the token with ``auth`` before it expires. A refusal or
        a failing token function leaves the current token in force, and is
        tried again later; if it expires first, the server closes with 4001
        and the reconnect asks for a token again."""
        stream = self.stream
        loop = asyncio.get_running_loop()
        while True:
            remaining = self.expires - time.time()
            await asyncio.sleep(max(remaining - min(REFRESH_LEAD, remaining / 2), 0.0))
            try:
                token = await stream.get_token()
                self.auth_reply = loop.create_future()
                self.send({"type": "auth", "token": token, "ref": AUTH_REF})
                self.expires = await asyncio.wait_for(self.auth_reply, stream.ping_timeout)
            except Exception:  # refused, no answer, or the token function failed
                await asyncio.sleep(REFRESH_RETRY)

"""The Redis broker: every node hears every other node's messages through
Redis pub/sub.

Each topic has a channel (``redis_format.channel``). The Redis store's
append script publishes every stored message on it in the same atomic step
that stores it, so the order on the bus is the order in the log. A node
subscribes to a topic's channel only while it has a subscriber for the
topic (``watch`` on the first, ``unwatch`` after the last), in batches:
everything asked for in one loop turn goes in one SUBSCRIBE.

One connection carries the subscriptions. Pub/sub is at most once: if the
connection drops, or Redis cuts a subscriber that reads too slowly, the
messages in between are gone from the bus (never from the log). So the
broker reconnects by itself, subscribes again to everything wanted, and,
as each channel is confirmed, tells its listener that the topic may have
missed messages: the node then fills every live subscription's gap from
the store. A ping every few seconds finds a connection that died quietly.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any, Awaitable, Sequence

import orjson
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from notifier import logs, redis_format
from notifier.broker.base import READY, Broker, Listener
from notifier.config import redact_url
from notifier.messages import Message

PING_EVERY = 5.0        # seconds between pings on the subscriber connection
DEAD_AFTER = 3 * PING_EVERY  # no pong for this long: the connection is dead
RECONNECT_FIRST = 0.1   # seconds before the first reconnect, doubling...
RECONNECT_MOST = 2.0    # ...up to this
CONNECT_TIMEOUT = 2.0
SUBSCRIBE_BATCH = 1000  # channels per SUBSCRIBE command
START_TIMEOUT = 5.0


class BrokerError(Exception):
    """The bus cannot be reached; one line."""


def _no_retries() -> Retry:
    # Never resend on our own: a resent PUBLISH would deliver twice.
    return Retry(NoBackoff(), 0)


class RedisBroker(Broker):
    def __init__(self, url: str):
        self.url = url
        self.log = logs.get("notifier.broker")
        self._listener: Listener | None = None
        self._wanted: set[str] = set()      # topics this node has subscribers for
        self._live: set[str] = set()        # ...confirmed on the current connection
        self._waiting: dict[str, asyncio.Future] = {}  # wanted, not confirmed yet
        self._to_subscribe: set[str] = set()
        self._to_unsubscribe: set[str] = set()
        self._sync_scheduled = False
        self._missed: list[str] = []        # confirmed again after a reconnect
        self._pool: ConnectionPool | None = None
        self._connection = None             # the subscriber connection, while up
        self._client: Redis | None = None   # PUBLISH and PING
        self._outgoing: deque[tuple[str, bytes]] = deque()
        self._outgoing_ready: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._up: asyncio.Event | None = None
        self._last_pong = 0.0
        self._closing = False

    # Life cycle

    async def start(self) -> None:
        """Connect; BrokerError (one line) if Redis does not answer in time."""
        # RESP2: pub/sub messages come back as plain replies to read in a loop
        # (RESP3 pushes would go to a push handler instead).
        self._pool = ConnectionPool.from_url(self.url, socket_connect_timeout=CONNECT_TIMEOUT,
                                             socket_timeout=CONNECT_TIMEOUT, retry=_no_retries(),
                                             protocol=2)
        self._client = Redis(connection_pool=self._pool)
        self._up = asyncio.Event()
        self._outgoing_ready = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._subscriber()),
                       asyncio.ensure_future(self._publisher())]
        try:
            await asyncio.wait_for(self._up.wait(), START_TIMEOUT)
        except asyncio.TimeoutError:
            await self.close()
            raise BrokerError(f"cannot reach Redis at {redact_url(self.url)} for pub/sub") from None

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        self._tasks = []
        if self._connection is not None:
            await self._connection.disconnect()
            self._connection = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._pool is not None:
            await self._pool.disconnect()
            self._pool = None
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()

    async def ping(self) -> None:
        if self._connection is None or self._client is None:
            raise BrokerError("not connected to Redis for pub/sub")
        try:
            await self._client.ping()
        except RedisError as exc:
            raise BrokerError(f"Redis does not answer: {exc}") from None

    # Interest

    def listen(self, listener: Listener) -> None:
        self._listener = listener

    def watch(self, topic: str) -> Awaitable[None]:
        self._wanted.add(topic)
        self._to_unsubscribe.discard(topic)
        if topic in self._live:
            return READY
        future = self._waiting.get(topic)
        if future is None:
            future = self._waiting[topic] = asyncio.get_running_loop().create_future()
        self._to_subscribe.add(topic)
        self._schedule_sync()
        return future

    def unwatch(self, topic: str) -> None:
        self._wanted.discard(topic)
        self._to_subscribe.discard(topic)
        future = self._waiting.pop(topic, None)
        if future is not None and not future.done():
            future.cancel()  # nobody is waiting for it any more
        self._to_unsubscribe.add(topic)
        self._schedule_sync()

    def _schedule_sync(self) -> None:
        if not self._sync_scheduled:
            self._sync_scheduled = True
            asyncio.get_running_loop().call_soon(self._sync)

    def _sync(self) -> None:
        """Send what interest changed in this loop turn, in one command each way."""
        self._sync_scheduled = False
        connection = self._connection
        if connection is None:
            return  # sent in full on reconnect
        leaving = [topic for topic in self._to_unsubscribe if topic not in self._wanted]
        joining = [topic for topic in self._to_subscribe
                   if topic in self._wanted and topic not in self._live]
        self._to_unsubscribe.clear()
        self._to_subscribe.clear()
        for topic in leaving:
            self._live.discard(topic)
        commands = []
        if leaving:
            commands += _batches("UNSUBSCRIBE", [redis_format.channel(t) for t in leaving])
        if joining:
            commands += _batches("SUBSCRIBE", [redis_format.channel(t) for t in joining])
        if commands:
            self._tasks.append(asyncio.ensure_future(self._send(connection, commands)))

    async def _send(self, connection, commands: list[list[str]]) -> None:
        try:
            for command in commands:
                await connection.send_command(*command, check_health=False)
        except (RedisError, OSError) as exc:
            # The reader sees the same failure and reconnects, subscribing to all.
            self.log.warning("broker.send_failed", error=str(exc))
        finally:
            self._tasks = [task for task in self._tasks if not task.done()]

    # Publishing

    def publish(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self._outgoing.append((redis_format.channel(message.topic),
                                   redis_format.encode_bus(message)))
        self._outgoing_ready.set()

    def control(self, command: dict[str, Any]) -> None:
        self._outgoing.append((redis_format.CONTROL_CHANNEL, orjson.dumps(command)))
        self._outgoing_ready.set()

    async def _publisher(self) -> None:
        """One sender, so what was published in one order is sent in it."""
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            batch = list(self._outgoing)
            self._outgoing.clear()
            if not batch:
                continue
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for channel, payload in batch:
                        pipe.publish(channel, payload)
                    await pipe.execute()
            except RedisError as exc:
                # Ephemeral messages and control commands are at most once.
                self.log.error("broker.publish_failed", messages=len(batch), error=str(exc))

    # Receiving

    async def _subscriber(self) -> None:
        delay = RECONNECT_FIRST
        first = True
        while not self._closing:
            connection = self._pool.make_connection()
            try:
                await connection.connect()
                self._connection = connection
                self._live.clear()
                self._to_subscribe.clear()
                self._to_unsubscribe.clear()
                channels = [redis_format.CONTROL_CHANNEL] + [
                    redis_format.channel(topic) for topic in self._wanted]
                for command in _batches("SUBSCRIBE", channels):
                    await connection.send_command(*command, check_health=False)
                if not first:
                    self.log.info("broker.reconnected", topics=len(self._wanted))
                first = False
                delay = RECONNECT_FIRST
                self._last_pong = time.monotonic()
                self._up.set()
                keepalive = asyncio.ensure_future(self._keepalive(connection))
                try:
                    await self._read(connection, recovering=set(self._wanted))
                finally:
                    keepalive.cancel()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                if self._closing:
                    return
                self.log.error("broker.disconnected", error=str(exc) or type(exc).__name__,
                               retry_in=delay)
            finally:
                if self._connection is connection:
                    self._connection = None
                self._live.clear()
                await connection.disconnect(nowait=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MOST)

    async def _read(self, connection, recovering: set[str]) -> None:
        control = redis_format.CONTROL_CHANNEL.encode()
        while True:
            response = await connection.read_response(timeout=math.inf)
            kind = response[0]
            if kind == b"message":
                name, payload = response[1], response[2]
                try:
                    if name == control:
                        self._listener.control(orjson.loads(payload))
                    else:
                        topic = redis_format.topic_of_channel(name)
                        self._listener.deliver((redis_format.decode_bus(topic, payload),))
                except Exception as exc:  # noqa: BLE001 - one bad message must not stop the bus
                    self.log.error("broker.message_failed", channel=name.decode(errors="replace"),
                                   error=repr(exc))
            elif kind == b"subscribe":
                name = response[1]
                if name == control:
                    continue
                topic = redis_format.topic_of_channel(name)
                if topic not in self._wanted:
                    continue  # unwatched meanwhile; its UNSUBSCRIBE follows
                self._live.add(topic)
                future = self._waiting.pop(topic, None)
                if future is not None and not future.done():
                    future.set_result(None)
                if topic in recovering:
                    recovering.discard(topic)
                    self._report_missed(topic)
            elif kind == b"pong":
                self._last_pong = time.monotonic()

    def _report_missed(self, topic: str) -> None:
        """Collect topics confirmed again after a reconnect; the listener
        hears of them once per loop turn."""
        if not self._missed:
            asyncio.get_running_loop().call_soon(self._flush_missed)
        self._missed.append(topic)

    def _flush_missed(self) -> None:
        topics, self._missed = self._missed, []
        if topics and self._listener is not None:
            self._listener.missed(topics)

    async def _keepalive(self, connection) -> None:
        while True:
            await asyncio.sleep(PING_EVERY)
            if time.monotonic() - self._last_pong > DEAD_AFTER:
                self.log.error("broker.no_pong", seconds=round(time.monotonic() - self._last_pong, 1))
                await connection.disconnect(nowait=True)
                return
            try:
                await connection.send_command("PING", check_health=False)
            except (RedisError, OSError):
                return  # the reader sees it too


def _batches(command: str, channels: list[str]) -> list[list[str]]:
    return [[command, *channels[start:start + SUBSCRIBE_BATCH]]
            for start in range(0, len(channels), SUBSCRIBE_BATCH)]


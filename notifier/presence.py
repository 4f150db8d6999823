"""Presence: who is connected, and to which topics, across every node.

With one process the hub knows everything (``LocalPresence``). With Redis
(``RedisPresence``) each node keeps a record of its own share there: per
topic, its subscribers' users and connection counts; per user, its
connections; and a line in the live-nodes set. A node writes what changed
a moment after it changes (``FLUSH_EVERY``), and renews the record every
``refresh`` seconds. A record not renewed for ``3 * refresh`` is ignored and
then expires, so a node that died without a word drops out of presence
within three refresh periods. Reads add up the live nodes' records.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from notifier import logs, redis_format
from notifier.hub import Hub

FLUSH_EVERY = 0.1  # seconds between writes of what changed
EXPIRES_AFTER = 3  # refresh periods a record outlives its last renewal

# Expiry is reckoned by Redis's clock, so nodes' clocks need not agree.
_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
RENEW = _NOW_MS + "return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])"
LIVE = _NOW_MS + ("redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) "
                  "return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')")


class PresenceError(Exception):
    """Presence cannot be read now; one line."""


class Presence(ABC):
    @abstractmethod
    async def topic(self, topic: str) -> tuple[list[str], int]:
        """The users (sorted, each once) and the number of connections
        subscribed to ``topic``."""

    @abstractmethod
    async def user_connections(self, user: str) -> int:
        """How many connections ``user`` has open."""

    @abstractmethod
    async def cluster(self) -> dict[str, int]:
        """``nodes``, ``connections`` and distinct ``users`` across every node."""

    async def start(self) -> None:
        """Begin keeping the record, if there is one to keep."""

    async def close(self) -> None:
        """Withdraw this node's record."""


class LocalPresence(Presence):
    """One process: the hub is the whole picture."""

    def __init__(self, hub: Hub):
        self.hub = hub

    async def topic(self, topic: str) -> tuple[list[str], int]:
        return self.hub.presence(topic)

    async def user_connections(self, user: str) -> int:
        return len(self.hub.by_user.get(user, ()))

    async def cluster(self) -> dict[str, int]:
        hub = self.hub
        return {"nodes": 1, "connections": len(hub.peers), "users": len(hub.by_user)}


class RedisPresence(Presence):
    def __init__(self, hub: Hub, url: str, node: str, refresh: float):
        self.hub = hub
        self.node = node
        self.refresh = refresh
        self.ttl_ms = int(refresh * EXPIRES_AFTER * 1000)
        self.client = Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0,
                                     retry=Retry(NoBackoff(), 0))
        self.log = logs.get("notifier.presence")
        self._topics_key = redis_format.node_topics_key(node)
        self._users_key = redis_format.node_users_key(node)
        self._renew = self.client.register_script(RENEW)
        self._live = self.client.register_script(LIVE)
        self._task: asyncio.Task | None = None
        self._whole = True  # write everything next time (start, or the record expired)
        hub.changed_topics = set()
        hub.changed_users = set()

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._keep())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(redis_format.NODES_KEY, self.node)
                pipe.delete(self._topics_key, self._users_key)
                await pipe.execute()
        except RedisError as exc:
            self.log.warning("presence.withdraw_failed", error=str(exc))
        await self.client.aclose()

    # This node's record

    async def _keep(self) -> None:
        renew_at = 0.0
        while True:
            now = time.monotonic()
            renew = now >= renew_at
            if renew or self._whole or self.hub.changed_topics or self.hub.changed_users:
                try:
                    await self._write()
                    if renew:
                        renew_at = now + self.refresh
                except RedisError as exc:
                    self._whole = True  # what changed meanwhile is written in full later
                    self.log.error("presence.write_failed", error=str(exc))
            await asyncio.sleep(FLUSH_EVERY)

    async def _write(self) -> None:
        hub = self.hub
        whole = self._whole
        if whole:
            topics, users = list(hub.topics), list(hub.by_user)
        else:
            topics, users = list(hub.changed_topics), list(hub.changed_users)
        hub.changed_topics.clear()
        hub.changed_users.clear()
        async with self.client.pipeline(transaction=True) as pipe:
            await self._renew(keys=[redis_format.NODES_KEY], args=[self.node, self.ttl_ms],
                              client=pipe)
            if whole:
                pipe.delete(self._topics_key, self._users_key)
            present = {topic: hub.topic_users(topic) for topic in topics}
            kept = {topic: orjson.dumps(counts) for topic, counts in present.items() if counts}
            gone = [topic for topic, counts in present.items() if not counts]
            if kept:
                pipe.hset(self._topics_key, mapping=kept)
            if gone and not whole:
                pipe.hdel(self._topics_key, *gone)
            counts = {user: len(hub.by_user.get(user, ())) for user in users}
            connected = {user: n for user, n in counts.items() if n}
            left = [user for user, n in counts.items() if not n]
            if connected:
                pipe.hset(self._users_key, mapping=connected)
            if left and not whole:
                pipe.hdel(self._users_key, *left)
            pipe.pexpire(self._topics_key, self.ttl_ms)
            pipe.pexpire(self._users_key, self.ttl_ms)
            results = await pipe.execute()
        if whole:
            self._whole = False
        elif results[0] == 1:
            # Our line in the live-nodes set was new: the record had expired
            # (Redis was away longer than it lives). Write it all again.
            self._whole = True

    # Reads: every live node's record

    async def _live_nodes(self) -> list[str]:
        try:
            nodes = await self._live(keys=[redis_format.NODES_KEY])
        except RedisError as exc:
            raise PresenceError(f"presence is unavailable: {exc}") from None
        return [node.decode() for node in nodes]

    async def _from_each(self, command: str, key_of, *args: Any) -> list[Any]:
        nodes = await self._live_nodes()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for node in nodes:
                    getattr(pipe, command)(key_of(node), *args)
                return await pipe.execute()
        except RedisError as exc:
            raise PresenceError(f"presence is unavailable: {exc}") from None

    async def topic(self, topic: str) -> tuple[list[str], int]:
        total: Counter = Counter()
        for record in await self._from_each("hget", redis_format.node_topics_key, topic):
            if record:
                total.update(orjson.loads(record))
        return sorted(total), sum(total.values())

    async def user_connections(self, user: str) -> int:
        return sum(int(n) for n in await self._from_each("hget", redis_format.node_users_key, user)
                   if n)

    async def cluster(self) -> dict[str, int]:
        records = await self._from_each("hgetall", redis_format.node_users_key)
        users: set[bytes] = set()
        connections = 0
        for record in records:
            users.update(record)
            connections += sum(int(n) for n in record.values())
        return {"nodes": len(records), "connections": connections, "users": len(users)}


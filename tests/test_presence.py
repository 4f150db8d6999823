"""Presence across nodes: each node's hub keeps a record in a real Redis
(a redis-server of the test's own); reads add up the live nodes' records,
and a node that stops renewing drops out within three refresh periods."""

from __future__ import annotations

import asyncio
import time

import pytest

from notifier.hub import Hub
from notifier.presence import LocalPresence, PresenceError, RedisPresence
from redis_server import RedisServer

REFRESH = 0.3


class Peer:
    def __init__(self, user: str):
        self.user = user
        self.id = user
        self.outbox = None


def node(url: str, name: str) -> tuple[Hub, RedisPresence]:
    hub = Hub(1 << 20, lambda: None)
    return hub, RedisPresence(hub, url, name, REFRESH)


def connect(hub: Hub, user: str, *topics: str) -> Peer:
    peer = Peer(user)
    hub.add(peer)
    for topic in topics:
        hub.subscribe(peer, topic)
    return peer


async def until(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("not in time")
        await asyncio.sleep(0.05)


@pytest.fixture
def redis(tmp_path):
    with RedisServer(tmp_path, appendonly=False) as server:
        yield server


async def test_presence_adds_up_every_live_node(redis):
    (hub_a, a), (hub_b, b) = node(redis.url, "a"), node(redis.url, "b")
    await a.start()
    await b.start()
    try:
        connect(hub_a, "alice", "room")
        connect(hub_a, "alice", "room")
        connect(hub_b, "bob", "room", "other")
        alice_elsewhere = connect(hub_b, "alice")
        expected = (["alice", "bob"], 3)
        assert await until(lambda: _equals(b.topic("room"), expected)) == expected
        assert await a.topic("other") == (["bob"], 1)
        assert await a.user_connections("alice") == 3
        assert await b.cluster() == {"nodes": 2, "connections": 4, "users": 2}
        # A change shows within a moment, not a refresh period.
        hub_b.remove(alice_elsewhere)
        assert await until(lambda: _equals(a.user_connections("alice"), 2)) == 2
    finally:
        await a.close()
        await b.close()


async def test_a_closed_node_withdraws_its_record_at_once(redis):
    (hub_a, a), (hub_b, b) = node(redis.url, "a"), node(redis.url, "b")
    await a.start()
    await b.start()
    connect(hub_a, "alice", "room")
    connect(hub_b, "bob", "room")
    await until(lambda: _equals(b.topic("room"), (["alice", "bob"], 2)))
    await a.close()
    assert await b.topic("room") == (["bob"], 1)
    await b.close()


async def test_a_node_that_stops_renewing_drops_out_within_three_periods(redis):
    (hub_a, a), (_, b) = node(redis.url, "a"), node(redis.url, "b")
    await a.start()
    await b.start()
    connect(hub_a, "alice", "room")
    await until(lambda: _equals(b.topic("room"), (["alice"], 1)))
    a._task.cancel()  # as if the process died: no more writes, no withdrawal
    stopped = time.monotonic()
    await until(lambda: _equals(b.topic("room"), ([], 0)), timeout=3 * REFRESH * 3)
    assert time.monotonic() - stopped <= 3 * REFRESH + 0.5
    assert (await b.cluster())["nodes"] == 1
    await b.close()
    await a.client.aclose()


async def test_a_record_lost_with_redis_is_written_whole_again(redis):
    hub, presence = node(redis.url, "a")
    await presence.start()
    connect(hub, "alice", "room")
    await until(lambda: _equals(presence.topic("room"), (["alice"], 1)))
    redis.command("FLUSHALL")  # a Redis without persistence, restarted
    assert await until(lambda: _equals(presence.topic("room"), (["alice"], 1)),
                       timeout=REFRESH * 5)
    await presence.close()


async def test_redis_away_is_a_presence_error_then_it_recovers(redis):
    hub, presence = node(redis.url, "a")
    await presence.start()
    connect(hub, "alice", "room")
    redis.kill()
    with pytest.raises(PresenceError):
        await presence.topic("room")
    redis.start()
    assert await until(lambda: _equals(presence.topic("room"), (["alice"], 1)))
    await presence.close()


async def test_local_presence_is_the_hub():
    hub = Hub(1 << 20, lambda: None)
    presence = LocalPresence(hub)
    connect(hub, "alice", "room")
    connect(hub, "bob", "room")
    connect(hub, "bob")
    assert await presence.topic("room") == (["alice", "bob"], 2)
    assert await presence.user_connections("bob") == 2
    assert await presence.cluster() == {"nodes": 1, "connections": 3, "users": 2}


async def _equals(awaitable, expected):
    try:
        value = await awaitable
    except PresenceError:
        return False
    return value if value == expected else False

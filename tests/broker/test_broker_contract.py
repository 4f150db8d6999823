"""The Broker contract (notifier/broker/base.py), on every broker: the
in-process one, and Redis pub/sub on a redis-server of the test's own.
Tests with more than one node run on Redis only: the local broker is one
process by definition."""

from __future__ import annotations

import asyncio
import time

import pytest

from notifier.broker.base import Broker
from notifier.broker.local import LocalBroker
from notifier.broker.redis import BrokerError, RedisBroker
from notifier.messages import Message
from procs import free_port
from redis_server import RedisServer

WAIT = 5.0


class Listener:
    """A broker listener that keeps everything it is handed."""

    def __init__(self):
        self.messages: list[Message] = []
        self.missed_topics: list[str] = []
        self.commands: list[dict] = []

    def deliver(self, messages) -> None:
        self.messages.extend(messages)

    def missed(self, topics) -> None:
        self.missed_topics.extend(topics)

    def control(self, command) -> None:
        self.commands.append(command)

    def seqs(self, topic: str) -> list:
        return [m.seq for m in self.messages if m.topic == topic]


def stored(topic: str, seq: int, epoch: str = "e1", data: bytes = b"1") -> Message:
    return Message(topic, seq, epoch, f"id-{topic}-{seq}", "2026-01-01T00:00:00.000Z", None, data)


def ephemeral(topic: str, name: str) -> Message:
    return Message(topic, None, None, f"id-{name}", "2026-01-01T00:00:00.000Z", "typing",
                   b'"' + name.encode() + b'"')


async def until(condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Bus:
    """Brokers on one bus, each with a Listener; closed at the end."""

    def __init__(self, kind: str, workdir):
        self.kind = kind
        self.workdir = workdir
        self.server: RedisServer | None = None
        self.brokers: list[Broker] = []

    async def nodes(self, count: int) -> list[tuple[Broker, Listener]]:
        made = []
        for _ in range(count):
            if self.kind == "local":
                broker: Broker = LocalBroker()
            else:
                if self.server is None:
                    self.server = RedisServer(self.workdir, appendonly=False).start()
                broker = RedisBroker(self.server.url)
            listener = Listener()
            broker.listen(listener)
            await broker.start()
            self.brokers.append(broker)
            made.append((broker, listener))
        return made

    def close(self, io_loop) -> None:
        for broker in self.brokers:
            io_loop.run_sync(broker.close)
        if self.server is not None:
            self.server.stop()


@pytest.fixture(params=["local", "redis"])
def node(request, io_loop, tmp_path):
    """One broker and its listener, for each kind of broker."""
    bus = Bus(request.param, tmp_path)
    yield io_loop.run_sync(lambda: bus.nodes(1))[0]
    bus.close(io_loop)


@pytest.fixture
def cluster(io_loop, tmp_path):
    """Redis brokers sharing one redis-server: ``await cluster.nodes(n)``."""
    bus = Bus("redis", tmp_path)
    yield bus
    bus.close(io_loop)


# Every broker


async def test_a_watched_topic_gets_what_is_published_in_order(node):
    broker, listener = node
    await broker.watch("news.a")
    sent = [stored("news.a", n) for n in range(1, 201)] + [ephemeral("news.a", "x")]
    broker.publish(sent[:100])
    broker.publish(sent[100:])
    await until(lambda: len(listener.messages) == len(sent))
    assert listener.messages == sent


async def test_control_reaches_every_node_this_one_included(node):
    broker, listener = node
    broker.control({"op": "disconnect", "user": "alice"})
    await until(lambda: listener.commands)
    assert listener.commands == [{"op": "disconnect", "user": "alice"}]


async def test_ping_answers_while_connected(node):
    broker, _ = node
    await broker.ping()


# Many nodes (Redis)


async def test_a_message_published_on_one_node_reaches_the_watchers_on_the_others(cluster):
    (a, a_heard), (b, b_heard), (c, c_heard) = await cluster.nodes(3)
    await b.watch("news.a")
    await c.watch("news.other")
    a.publish([stored("news.a", 1), stored("news.a", 2)])
    await until(lambda: len(b_heard.messages) == 2)
    assert b_heard.seqs("news.a") == [1, 2]
    await asyncio.sleep(0.1)
    assert a_heard.messages == [] and c_heard.messages == []  # interest: only watchers get traffic


async def test_once_watch_is_done_the_next_publish_arrives(cluster):
    (a, _), (b, b_heard) = await cluster.nodes(2)
    for n in range(20):
        topic = f"news.t{n}"
        await b.watch(topic)
        a.publish([stored(topic, 1)])
    await until(lambda: len(b_heard.messages) == 20)


async def test_unwatch_stops_the_traffic_and_watch_again_restores_it(cluster):
    (a, _), (b, b_heard) = await cluster.nodes(2)
    await b.watch("news.a")
    b.unwatch("news.a")
    await asyncio.sleep(0.1)
    a.publish([stored("news.a", 1)])
    await asyncio.sleep(0.2)
    assert b_heard.messages == []
    # Unwatched and watched again within one loop turn: still watched.
    b.unwatch("news.a")
    ready = b.watch("news.a")
    await ready
    a.publish([stored("news.a", 2)])
    await until(lambda: b_heard.seqs("news.a") == [2])


async def test_one_topics_messages_keep_their_order_across_nodes(cluster):
    (a, _), (b, b_heard) = await cluster.nodes(2)
    await b.watch("news.a")
    for n in range(1, 1001):
        a.publish([stored("news.a", n)])
    await until(lambda: len(b_heard.messages) == 1000)
    assert b_heard.seqs("news.a") == list(range(1, 1001))


async def test_a_killed_pubsub_connection_reconnects_and_reports_what_it_may_have_missed(cluster):
    (a, _), (b, b_heard) = await cluster.nodes(2)
    for topic in ("news.a", "news.b"):
        await b.watch(topic)
    server = cluster.server
    assert server.command("CLIENT", "KILL", "TYPE", "pubsub").strip() == b"2"  # a's and b's
    await until(lambda: sorted(b_heard.missed_topics) == ["news.a", "news.b"])
    # a was cut too, and is back as well
    a.publish([stored("news.a", 7)])
    await until(lambda: b_heard.seqs("news.a") == [7])


async def test_redis_restarted_the_broker_comes_back_by_itself(cluster):
    (a, _), (b, b_heard) = await cluster.nodes(2)
    await b.watch("news.a")
    server = cluster.server
    server.kill()
    await until(lambda: _fails(b))
    waiting = asyncio.ensure_future(asyncio.shield(b.watch("news.later")))
    await asyncio.sleep(0.3)
    assert not waiting.done()  # confirmed only once Redis is back
    server.start()
    await asyncio.wait_for(waiting, WAIT)
    await until(lambda: "news.a" in b_heard.missed_topics)
    await b.ping()
    a.publish([stored("news.later", 1), stored("news.a", 1)])
    await until(lambda: b_heard.seqs("news.later") == [1] and b_heard.seqs("news.a") == [1])


def _fails(broker) -> bool:
    return broker._connection is None


async def test_start_without_redis_is_one_clear_error(io_loop):
    broker = RedisBroker(f"redis://:secret@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    with pytest.raises(BrokerError) as raised:
        await broker.start()
    assert time.monotonic() - started < 10
    assert "cannot reach Redis" in str(raised.value) and "secret" not in str(raised.value)

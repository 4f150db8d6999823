"""notifier.client against real servers: the in-process app on a loopback
port, and ``notifier serve`` subprocesses that are SIGKILLed, stopped and
restarted on the same port and store under it. ``Positions`` and
``Backoff`` (no I/O) are checked with plain values first."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from notifier.client import (APIError, Backoff, Client, Connected, Disconnected, Forbidden,
                             Message, PublishRequest, Subscribed, SubscriptionRefused,
                             Unauthorized, Unreachable)
from notifier.client.resume import Positions
from procs import ROOT, ServerProcess, free_port, read_history
from support import API_KEY, api, connect, in_ci, token

FAST = Backoff(initial=0.05, maximum=0.5, stable_after=1.0)
WAIT = 15.0  # seconds a test waits for what should come


def message(topic: str, seq: int | None) -> Message:
    return Message(topic, seq, f"id-{seq}", "2026-01-01T00:00:00.000Z", None, seq)


# Positions and Backoff: no I/O


def test_positions_hand_each_seq_once_and_resume_after_the_last():
    positions = Positions(["a", "b"], since=None)
    assert positions.subscribe_command("a", 1) == {"type": "subscribe", "topic": "a", "ref": 1}
    positions.subscribed("a", 0, "e1")
    assert [positions.accept(message("a", seq)) for seq in (1, 2, 2, 1, 3)] == [
        True, True, False, False, True]
    assert positions.accept(message("a", None))  # ephemeral: nothing to compare
    assert not positions.accept(message("c", 1))  # not asked for
    assert positions.subscribe_command("a", 7) == {
        "type": "subscribe", "topic": "a", "since": 3, "epoch": "e1", "ref": 7}


def test_positions_drop_the_old_position_when_the_log_was_reset():
    positions = Positions(["a", "b"], since=5)
    positions.subscribed("a", 9, "e1")
    positions.subscribed("b", 9, "e1")
    assert positions.accept(message("a", 6)) and positions.accept(message("b", 6))
    positions.subscribed("a", 9, "e2")  # another epoch
    positions.subscribed("b", 2, "e1")  # a head below what was handed
    assert positions.position("a") == (0, "e2") and positions.position("b") == (0, "e1")
    assert positions.accept(message("a", 1)) and positions.accept(message("b", 1))


def test_positions_a_subscription_with_nothing_to_hand_starts_at_its_head_once_synced():
    positions = Positions(["live", "queued"], since=None)
    positions.subscribed("live", 4, "e")
    positions.subscribed("queued", 4, "e")
    assert positions.accept(message("queued", 3))  # a replay from the stored cursor
    positions.synced()
    assert positions.position("live") == (4, "e")  # what came before 4 was never owed
    assert positions.position("queued") == (3, "e")
    # A connection lost before its replays ended sets no floor.
    fresh = Positions(["live"], since=None)
    fresh.subscribed("live", 4, "e")
    fresh.disconnected()
    fresh.synced()
    assert fresh.position("live") == (None, "e")


USAGE = """
import asyncio
from typing import assert_type

from notifier.client import Client, Disconnected, Event, Message, Published, PublishRequest


async def main() -> None:
    async def fresh_token() -> str:
        return "jwt"

    def report(event: Event) -> None:
        if isinstance(event, Disconnected):
            assert_type(event.code, int | None)

    async with Client("http://127.0.0.1:8765", api_key="key", token=fresh_token) as client:
        assert_type(await client.publish("news.a", data={"n": 1}), Published)
        assert_type(await client.publish_batch([PublishRequest(1, user="alice")]), list[Published])
        async for message in client.subscribe(["news.a"], since=0, on_event=report):
            assert_type(message, Message)
            assert_type(message.seq, int | None)
            await client.ack(message)
"""


def test_the_client_is_fully_typed(tmp_path):
    """mypy --strict on notifier.client and on code that uses it: no
    error, and the types a caller sees are the precise ones."""
    if importlib.util.find_spec("mypy") is None:
        if in_ci():
            pytest.fail("mypy is missing (it is in the test extra)")
        pytest.skip("mypy is not installed")
    usage = tmp_path / "usage.py"
    usage.write_text(USAGE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
         "notifier/client", str(usage)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_backoff_is_exponential_with_full_jitter_up_to_its_maximum():
    backoff = Backoff(initial=0.5, maximum=4.0)
    ceilings = [backoff.delay(n, lambda low, high: high) for n in range(1, 7)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert {backoff.delay(3, lambda low, high: low)} == {0.0}
    assert backoff.delay(10_000, lambda low, high: high) == 4.0


# Publishing


async def test_publish_and_batch_answer_what_was_stored(port):
    async with Client(f"http://127.0.0.1:{port}", api_key=API_KEY) as client:
        first = await client.publish("news.a", data={"n": 1}, event="goal")
        assert (first.topic, first.seq) == ("news.a", 1) and len(first.id) == 24
        personal = await client.publish(user="alice", data="hi", idempotency_key="k1")
        assert (personal.topic, personal.seq) == ("user:alice", 1)
        again = await client.publish(user="alice", data="other", idempotency_key="k1")
        assert again == personal  # the key's first answer
        results = await client.publish_batch([
            PublishRequest({"n": 2}, topic="news.a"),
            PublishRequest(3, user="bob", event="e"),
        ])
        assert [(r.topic, r.seq) for r in results] == [("news.a", 2), ("user:bob", 1)]
        with pytest.raises(ValueError):
            await client.publish("news.a", data=1, user="alice")
    status, body = await api(port, "GET", "/api/topics/news.a/messages")
    assert [(m["seq"], m["event"], m["data"]) for m in body["messages"]] == [
        (1, "goal", {"n": 1}), (2, None, {"n": 2})]


async def test_publish_refusals_raise_typed_errors_without_retrying(port):
    url = f"http://127.0.0.1:{port}"
    async with Client(url, api_key=API_KEY, retry_for=10) as client:
        started = time.monotonic()
        with pytest.raises(APIError) as refused:
            await client.publish("news..a", data=1)
        assert (refused.value.status, refused.value.code) == (400, "invalid_topic")
        assert "news..a" in refused.value.message
        with pytest.raises(APIError) as refused:
            await client.publish_batch([PublishRequest(1, topic="a"), PublishRequest(2, topic="b c")])
        assert refused.value.code == "invalid_topic" and "messages[1]" in refused.value.message
        assert time.monotonic() - started < 2  # not retried for retry_for
    async with Client(url, api_key="wrong") as client:
        with pytest.raises(Unauthorized) as refused:
            await client.publish("news.a", data=1)
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")


async def test_publish_retries_503_until_the_server_takes_it(io_loop, port, services):
    services.draining = True  # every /api/ request gets 503 with Retry-After: 1
    io_loop.call_later(1.5, lambda: setattr(services, "draining", False))
    async with Client(f"http://127.0.0.1:{port}", api_key=API_KEY, backoff=FAST) as client:
        started = time.monotonic()
        published = await client.publish("news.a", data=1)
        assert time.monotonic() - started >= 1.0
    assert published.seq == 1


async def test_publish_to_nobody_gives_up_after_retry_for(io_loop):
    async with Client(f"http://127.0.0.1:{free_port()}", api_key=API_KEY, retry_for=1.0,
                      backoff=FAST) as client:
        started = time.monotonic()
        with pytest.raises(Unreachable) as failed:
            await client.publish("news.a", data=1)
        assert 0.5 <= time.monotonic() - started < 3  # it stops short of a wait past retry_for
        assert isinstance(failed.value.__cause__, ConnectionRefusedError)


class CuttingProxy:
    """A TCP proxy in front of the server that, on its first connection,
    forwards the request, waits until the server starts answering (the
    answer comes only once the message is on disk), calls ``on_cut`` and
    closes the client's side without relaying a byte of the answer.
    Later connections are relayed, or closed at once while the server is
    down. ``log`` records what happened to each."""

    def __init__(self, upstream_port: int, on_cut: Callable[[], None]):
        self.upstream_port = upstream_port
        self.on_cut = on_cut
        self.log: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cut = not self.log
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            self.log.append("refused")
            writer.close()
            return
        forward = asyncio.ensure_future(self._copy(reader, up_writer))
        try:
            first = await up_reader.read(65536)
            if cut:
                self.log.append("cut")
                self.on_cut()
                return
            self.log.append("relayed")
            writer.write(first)
            await self._copy(up_reader, writer)
        finally:
            forward.cancel()
            writer.close()
            up_writer.close()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()


async def start_server(server: ServerProcess) -> ServerProcess:
    """Start and wait for readiness without blocking the test's loop."""
    server.start()
    await asyncio.to_thread(server.wait_ready)
    return server


@pytest.mark.slow
@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
async def test_publish_cut_after_it_was_stored_is_retried_and_stored_once(io_loop, tmp_path, batch):
    """The server stores the publish, the connection is cut before the
    answer, the server is SIGKILLed and comes back a moment later: the
    client's retries (same idempotency key) get the first answer, and the
    topic's history holds the message once."""
    server = await start_server(ServerProcess(tmp_path))
    servers = [server]

    async def restart_later() -> None:
        await asyncio.sleep(0.8)  # retries meanwhile meet a server that is down
        servers.append(await start_server(
            ServerProcess(tmp_path, port=server.port, store_path=server.store_path)))

    restarts: list[asyncio.Task] = []

    def kill_and_restart_later() -> None:
        server.kill()  # before the client sees the cut, so its retries find nobody
        restarts.append(asyncio.ensure_future(restart_later()))

    proxy = CuttingProxy(server.port, kill_and_restart_later)
    proxy_port = await proxy.start()
    try:
        async with Client(f"http://127.0.0.1:{proxy_port}", api_key=API_KEY, backoff=FAST,
                          retry_for=WAIT) as client:
            if batch:
                answers = await client.publish_batch([PublishRequest({"n": 1}, topic="cut.a"),
                                                      PublishRequest({"n": 2}, user="alice")])
            else:
                answers = [await client.publish("cut.a", data={"n": 1})]
        await asyncio.gather(*restarts)
        assert proxy.log[0] == "cut" and "refused" in proxy.log and proxy.log[-1] == "relayed"
        assert len(servers) == 2
        for answer in answers:
            history = await asyncio.to_thread(read_history, servers[-1], answer.topic)
            assert [(m["seq"], m["id"]) for m in history] == [(answer.seq, answer.id)]
    finally:
        await proxy.close()
        for started in servers:
            started.kill()


# Subscribing


class Follower:
    """One ``client.subscribe`` loop in a task, recording what it hands over
    and the events it reports."""

    def __init__(self, client: Client, topics, pause: float = 0.0, **options):
        self.client = client
        self.messages: list[Message] = []
        self.events: list = []
        self.pause = pause  # a loop body that takes this long
        self.task = asyncio.ensure_future(self._follow(topics, options))

    async def _follow(self, topics, options) -> None:
        async for received in self.client.subscribe(topics, on_event=self.events.append, **options):
            self.messages.append(received)
            if self.pause:
                await asyncio.sleep(self.pause)

    def seqs(self, topic: str) -> list[int | None]:
        return [m.seq for m in self.messages if m.topic == topic]

    def count(self, kind: type) -> int:
        return sum(isinstance(event, kind) for event in self.events)

    async def until(self, condition, what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.task.done():
                self.task.result()  # raises what ended it
                raise AssertionError(f"subscription ended while waiting for {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s; messages "
                                     f"{[(m.topic, m.seq) for m in self.messages]}, events {self.events}")
            await asyncio.sleep(0.02)

    async def subscribed(self, *topics: str, count: int = 1) -> None:
        def done() -> bool:
            seen = [e.topic for e in self.events if isinstance(e, Subscribed)]
            return all(seen.count(topic) >= count for topic in topics)
        await self.until(done, f"subscribed {topics} x{count}")


async def test_subscribe_replays_then_goes_live_and_acks_store_the_cursor(port):
    url = f"http://127.0.0.1:{port}"
    async with Client(url, api_key=API_KEY) as publisher:
        for n in (1, 2, 3):
            await publisher.publish("news.a", data=n)
        async with Client(url, token=token("alice")) as client:
            follower = Follower(client, ["news.a"], since=1)
            await follower.until(lambda: len(follower.messages) == 2, "the replay")
            await publisher.publish("news.a", data=4)
            await follower.until(lambda: len(follower.messages) == 3, "the live message")
            assert follower.seqs("news.a") == [2, 3, 4]
            assert [m.data for m in follower.messages] == [2, 3, 4]
            assert follower.messages[0].epoch == follower.events[1].epoch
            await client.ack(follower.messages[0])  # seq 2, sent at once
            await asyncio.sleep(0.01)
            await client.ack(follower.messages[1])  # seq 3, waits for the next round of acks
        await follower.task  # close() ends the loop
    # close() sent the waiting ack before closing the socket: alice resumes after seq 3.
    async with Client(url, token=token("alice")) as client:
        resumed = Follower(client, ["news.a"])
        await resumed.until(lambda: resumed.messages, "the replay from the cursor")
        await asyncio.sleep(0.2)
        assert resumed.seqs("news.a") == [4]


async def test_auto_ack_acks_each_message_once_the_loop_body_returned(port):
    url = f"http://127.0.0.1:{port}"
    async with Client(url, api_key=API_KEY) as publisher:
        for n in range(1, 6):
            await publisher.publish(user="alice", data=n)
    async with Client(url, token=token("alice")) as client:
        handed = []
        async for received in client.subscribe(["user:alice"], auto_ack=True):
            handed.append(received.seq)
            if received.seq == 3:
                break  # 3's body did not return: 1 and 2 are acked, 3 is not
    assert handed == [1, 2, 3]
    async with Client(url, token=token("alice")) as client:
        resumed = Follower(client, ["user:alice"])
        await resumed.until(lambda: len(resumed.messages) == 3, "the offline queue")
        await asyncio.sleep(0.2)
        assert resumed.seqs("user:alice") == [3, 4, 5]


async def test_personal_topic_given_a_since_is_handed_from_there_once(port):
    """alice's cursor is at 4, but this subscriber asks for user:alice since
    1: the server's own subscription (from the cursor) and the client's
    (from 1) overlap, and each message is handed once, from 2."""
    url = f"http://127.0.0.1:{port}"
    async with Client(url, api_key=API_KEY) as publisher:
        for n in range(1, 7):
            await publisher.publish(user="alice", data=n)
    raw = await connect(port, token("alice"))
    await raw.send({"type": "ack", "topic": "user:alice", "seq": 4})
    await raw.send({"type": "ping", "ref": 1})
    while (await raw.recv())["type"] != "pong":  # the offline queue, 1..6, comes first
        pass
    raw.close()
    async with Client(url, token=token("alice")) as client:
        follower = Follower(client, ["user:alice"], since=1)
        await follower.until(lambda: len(follower.messages) >= 5, "the replay")
        await asyncio.sleep(0.3)
        assert follower.seqs("user:alice") == [2, 3, 4, 5, 6]


async def test_refusals_that_reconnecting_cannot_fix_end_the_loop(port):
    url = f"http://127.0.0.1:{port}"
    async with Client(url, token=token("alice", topics=["news.>"])) as client:
        with pytest.raises(SubscriptionRefused) as refused:
            async for _ in client.subscribe(["news.a", "secret.b"]):
                pass
        assert (refused.value.topic, refused.value.code) == ("secret.b", "forbidden")
    async with Client(url, token=token("alice", secret="another-secret-" + "y" * 32)) as client:
        with pytest.raises(Unauthorized):
            async for _ in client.subscribe("news.a"):
                pass
    async with Client(url, token=lambda: None) as client:
        with pytest.raises(Unauthorized):
            async for _ in client.subscribe("news.a"):
                pass
    # A browser's Origin that is not allowed: 4003, never retried.
    async with Client(url, token=token("alice"), headers={"Origin": "https://elsewhere.example"},
                      backoff=FAST) as client:
        follower = Follower(client, ["news.a"])
        with pytest.raises(Forbidden) as closed:
            await asyncio.wait_for(follower.task, WAIT)
        assert closed.value.code == 4003
        assert follower.count(Disconnected) == 0


async def test_disconnect_by_the_api_reconnects_with_a_fresh_token(port):
    """``POST /api/users/alice/disconnect`` closes with 4001: the client asks
    its token function again, reconnects and loses nothing."""
    url = f"http://127.0.0.1:{port}"
    asked: list[str] = []

    async def fresh_token() -> str:
        asked.append("token")
        return token("alice")

    async with Client(url, api_key=API_KEY) as publisher, \
            Client(url, token=fresh_token, backoff=FAST) as client:
        follower = Follower(client, ["news.a"], since=0)
        await follower.subscribed("news.a")
        await publisher.publish("news.a", data=1)
        await follower.until(lambda: follower.seqs("news.a") == [1], "seq 1")
        status, body = await api(port, "POST", "/api/users/alice/disconnect")
        assert status == 200 and body["disconnected"] == 1
        await publisher.publish("news.a", data=2)
        await follower.subscribed("news.a", count=2)
        await follower.until(lambda: follower.seqs("news.a") == [1, 2], "seq 2")
        lost = [e for e in follower.events if isinstance(e, Disconnected)]
        assert [e.code for e in lost] == [4001]
        assert len(asked) == 2


class Gate:
    """A TCP proxy that relays while open; ``shut()`` cuts every relayed
    connection and refuses new ones until ``open()``."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.is_open = True
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def shut(self) -> None:
        self.is_open = False
        for writer in self.writers:
            writer.transport.abort()

    def open(self) -> None:
        self.is_open = True

    async def close(self) -> None:
        self.shut()
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_open:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers.update((writer, up_writer))
        try:
            await asyncio.wait([asyncio.ensure_future(CuttingProxy._copy(reader, up_writer)),
                                asyncio.ensure_future(CuttingProxy._copy(up_reader, writer))],
                               return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            self.writers.difference_update((writer, up_writer))
            writer.transport.abort()
            up_writer.transport.abort()


async def test_a_cut_connection_resumes_live_topics_from_their_head(port):
    """A topic followed live (no since, no cursor) that had nothing to hand
    over still resumes from the head it was subscribed at: what was
    published while the connection was cut arrives after the reconnect."""
    gate = Gate(port)
    gate_port = await gate.start()
    try:
        async with Client(f"http://127.0.0.1:{port}", api_key=API_KEY) as publisher, \
                Client(f"http://127.0.0.1:{gate_port}", token=token("alice"), backoff=FAST) as client:
            await publisher.publish("news.quiet", data="before")
            follower = Follower(client, ["news.quiet"])
            await follower.subscribed("news.quiet")
            # Once the ping sent after the subscribes is answered, the head is the position.
            positions = client._stream.positions
            await follower.until(lambda: positions.position("news.quiet")[0] == 1, "the sync pong")
            gate.shut()
            await follower.until(lambda: follower.count(Disconnected), "the cut")
            await publisher.publish("news.quiet", data="while cut")
            gate.open()
            await follower.subscribed("news.quiet", count=2)
            await follower.until(lambda: follower.messages[-1].topic == "news.quiet", "news.quiet 2")
            await asyncio.sleep(0.2)
            assert [(m.seq, m.data) for m in follower.messages] == [(2, "while cut")]
    finally:
        await gate.close()



async def test_messages_waiting_in_the_queue_at_a_reconnect_are_not_handed_twice(port):
    """The caller is busy with seq 1 while 2..4 wait in the client's queue;
    the connection is cut and the reconnect resumes after 1 (the last
    handed over), so 2..4 come again: each is handed once."""
    gate = Gate(port)
    gate_port = await gate.start()
    release = asyncio.Event()
    handed: list[int | None] = []
    try:
        async with Client(f"http://127.0.0.1:{port}", api_key=API_KEY) as publisher, \
                Client(f"http://127.0.0.1:{gate_port}", token=token("alice"), backoff=FAST) as client:
            async def follow() -> None:
                async for received in client.subscribe(["news.a"], since=0):
                    handed.append(received.seq)
                    await release.wait()

            following = asyncio.ensure_future(follow())
            for n in range(1, 5):
                await publisher.publish("news.a", data=n)
            queue = client._stream.queue
            deadline = time.monotonic() + WAIT
            while not (handed and queue.qsize() >= 3):  # 2..4 read ahead
                assert time.monotonic() < deadline, (handed, queue.qsize())
                await asyncio.sleep(0.02)
            gate.shut()
            gate.open()
            while queue.qsize() < 3 + 3 + 3:  # the cut, the new welcome and subscribed, 2..4 again
                assert time.monotonic() < deadline, queue.qsize()
                await asyncio.sleep(0.02)
            await publisher.publish("news.a", data=5)
            release.set()
            while handed[-1:] != [5]:
                assert time.monotonic() < deadline, handed
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            assert handed == [1, 2, 3, 4, 5]
        await following
    finally:
        await gate.close()


# Against `notifier serve` subprocesses that are killed, stopped and restarted

FAST_HEARTBEAT = {"NOTIFIER_HEARTBEAT_INTERVAL": "1s", "NOTIFIER_HEARTBEAT_TIMEOUT": "1s"}


@pytest.mark.slow
async def test_every_message_arrives_once_per_subscription_across_sigkill_restarts(io_loop, tmp_path):
    """Two subscribers (one from since 0 and slow, so messages wait in its
    queue when the server dies and come again after the reconnect; one from
    the server's offline queue and live), a publisher, and a server
    SIGKILLed and restarted twice on the same port and store during the
    stream: each subscription gets seqs 1..N of each topic exactly once, in
    order."""
    per_topic = 30
    server = await start_server(ServerProcess(tmp_path))
    servers = [server]
    url = server.url
    topics = ["news.a", "user:alice"]
    async with Client(url, api_key=API_KEY, backoff=FAST, retry_for=WAIT) as publisher, \
            Client(url, token=lambda: token("alice"), backoff=FAST) as first, \
            Client(url, token=lambda: token("alice"), backoff=FAST) as second:
        from_zero = Follower(first, topics, since=0, pause=0.03)
        from_now = Follower(second, topics)
        await from_zero.subscribed(*topics)
        await from_now.subscribed(*topics)
        for n in range(1, per_topic + 1):
            await publisher.publish("news.a", data=n)
            await publisher.publish(user="alice", data=n)
            if n in (10, 20):
                servers[-1].kill()  # publishes and deliveries in flight die with it
                servers.append(ServerProcess(tmp_path, port=server.port, store_path=server.store_path).start())
            await asyncio.sleep(0.01)
        expected = list(range(1, per_topic + 1))
        for follower in (from_zero, from_now):
            await follower.until(lambda f=follower: all(len(f.seqs(t)) >= per_topic for t in topics),
                                 "every message")
        await asyncio.sleep(0.5)  # room for a duplicate to show up
        for follower in (from_zero, from_now):
            for topic in topics:
                assert follower.seqs(topic) == expected, (topic, follower.events)
                assert [m.data for m in follower.messages if m.topic == topic] == expected
            assert follower.count(Connected) >= 2  # a follower may sleep through a restart
    for topic in topics:
        history = await asyncio.to_thread(read_history, servers[-1], topic)
        assert [m["data"] for m in history] == expected
    for started in servers:
        started.kill()


def remove_store(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass


@pytest.mark.slow
async def test_a_new_epoch_drops_the_old_positions(io_loop, tmp_path):
    """The store is lost (removed) and the server restarted: the topic's
    log starts again at seq 1 under a new epoch, and the client hands those
    messages over although it had handed seqs 1..3 of the old log."""
    server = await start_server(ServerProcess(tmp_path))
    servers = [server]
    async with Client(server.url, api_key=API_KEY, backoff=FAST, retry_for=WAIT) as publisher, \
            Client(server.url, token=lambda: token("alice"), backoff=FAST) as client:
        follower = Follower(client, ["news.a"], since=0)
        for n in (1, 2, 3):
            await publisher.publish("news.a", data=f"old {n}")
        await follower.until(lambda: len(follower.messages) == 3, "the old log")
        server.kill()
        remove_store(server.store_path)
        servers.append(await start_server(
            ServerProcess(tmp_path, port=server.port, store_path=server.store_path)))
        await follower.subscribed("news.a", count=2)
        for n in (1, 2):
            await publisher.publish("news.a", data=f"new {n}")
        await follower.until(lambda: len(follower.messages) == 5, "the new log")
        assert [(m.seq, m.data) for m in follower.messages] == [
            (1, "old 1"), (2, "old 2"), (3, "old 3"), (1, "new 1"), (2, "new 2")]
        epochs = [e.epoch for e in follower.events if isinstance(e, Subscribed)]
        assert len(epochs) == 2 and epochs[0] != epochs[1]
        assert [m.epoch for m in follower.messages] == [epochs[0]] * 3 + [epochs[1]] * 2
    for started in servers:
        started.kill()


@pytest.mark.slow
async def test_a_dead_connection_is_noticed_by_ping_and_replaced(io_loop, tmp_path):
    """SIGSTOP the server: its socket stays open but nothing answers. The
    client's ping goes unanswered, it drops the connection, and once the
    server runs again (SIGCONT) it reconnects and resumes."""
    server = await start_server(ServerProcess(tmp_path))
    try:
        async with Client(server.url, api_key=API_KEY, retry_for=WAIT) as publisher, \
                Client(server.url, token=lambda: token("alice"), backoff=FAST, request_timeout=1.0,
                       ping_interval=0.3, ping_timeout=0.5) as client:
            follower = Follower(client, ["news.a"], since=0)
            await follower.subscribed("news.a")
            server.signal(signal.SIGSTOP)
            try:
                await follower.until(lambda: follower.count(Disconnected), "a dead connection noticed",
                                     timeout=5)
                assert follower.events[-1].reason == "no answer to ping"
            finally:
                server.signal(signal.SIGCONT)
            await publisher.publish("news.a", data=1)
            await follower.subscribed("news.a", count=2)
            await follower.until(lambda: follower.seqs("news.a") == [1], "seq 1")
    finally:
        server.kill()


@pytest.mark.slow
async def test_a_token_function_refreshes_before_expiry_and_keeps_the_connection(io_loop, tmp_path):
    """Tokens that live 3 s, on a server that checks expiry every 0.25 s:
    the client replaces each with ``auth`` before it runs out, so the one
    connection stays open well past the first token's expiry (no 4001)."""
    server = await start_server(ServerProcess(tmp_path, env=FAST_HEARTBEAT))
    minted: list[float] = []

    def short_token() -> str:
        minted.append(time.monotonic())
        return token("alice", ttl=3)

    try:
        async with Client(server.url, api_key=API_KEY) as publisher, \
                Client(server.url, token=short_token, backoff=FAST) as client:
            follower = Follower(client, ["news.a"], since=0)
            await follower.subscribed("news.a")
            for n in range(1, 8):
                await asyncio.sleep(1)
                await publisher.publish("news.a", data=n)
            await follower.until(lambda: len(follower.messages) == 7, "every message")
            assert follower.count(Connected) == 1 and follower.count(Disconnected) == 0, follower.events
            assert len(minted) >= 4  # the connection's token, then a refresh every ~1.5 s
    finally:
        server.kill()


@pytest.mark.slow
async def test_an_expired_token_string_ends_the_loop_with_unauthorized(io_loop, tmp_path):
    """A plain token cannot be refreshed: at expiry the server closes with
    4001, the reconnect is refused (401), and the loop raises."""
    server = await start_server(ServerProcess(tmp_path, env=FAST_HEARTBEAT))
    try:
        async with Client(server.url, token=token("alice", ttl=2), backoff=FAST) as client:
            follower = Follower(client, ["news.a"])
            with pytest.raises(Unauthorized) as refused:
                await asyncio.wait_for(follower.task, WAIT)
            assert "expired" in refused.value.message
            assert [e.code for e in follower.events if isinstance(e, Disconnected)] == [4001]
    finally:
        server.kill()

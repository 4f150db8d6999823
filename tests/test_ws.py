"""``GET /ws`` commands and delivery against SPEC, through the real server on
loopback with real WebSocket clients (and one hand-made raw client that never
answers pings)."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from contextlib import contextmanager
from urllib.parse import quote

import jwt
import pytest

from notifier.heartbeat import Heartbeat
from support import SECRET, api, connect, token


# Helpers


async def publish(port: int, topic: str, data, **extra) -> dict:
    status, body = await api(port, "POST", "/api/publish", {"topic": topic, "data": data, **extra})
    assert status == 200, body
    return body


async def publish_many(port: int, topic: str, count: int) -> list[dict]:
    return [await publish(port, topic, {"n": n}) for n in range(1, count + 1)]


async def subscribe(client, topic: str, ref=None, **fields) -> dict:
    command = {"type": "subscribe", "topic": topic, **fields}
    if ref is not None:
        command["ref"] = ref
    await client.send(command)
    reply = await client.expect("subscribed")
    assert reply["topic"] == topic
    if ref is not None:
        assert reply["ref"] == ref
    return reply


async def seqs(client, count: int, topic: str | None = None) -> list[int]:
    """Read ``count`` message frames; return their seqs."""
    found = []
    for _ in range(count):
        message = await client.expect("message")
        if topic is not None:
            assert message["topic"] == topic
        found.append(message["seq"])
    return found


async def pong(client, ref) -> None:
    await client.send({"type": "ping", "ref": ref})
    reply = await client.expect("pong")
    assert reply == {"type": "pong", "ref": ref}


async def history(port: int, topic: str) -> dict:
    status, body = await api(port, "GET", f"/api/topics/{topic}/messages")
    assert status == 200, body
    return body


@contextmanager
def running_heartbeat(services):
    """The heartbeat, wired as notifier.server wires it (the ``port`` fixture
    serves the app alone)."""
    beat = Heartbeat(lambda: services.hub.peers, services.config.heartbeat.interval,
                     services.config.heartbeat.timeout)
    beat.start()
    try:
        yield beat
    finally:
        beat.stop()


class RawClient:
    """A WebSocket client done by hand on a plain TCP stream: it upgrades, then
    only reads. It never answers pings (nor anything else)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, jwt_token: str) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((
            f"GET /ws?token={quote(jwt_token)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next (opcode, payload), or None when the server hung up."""
        try:
            first, second = await asyncio.wait_for(self.reader.readexactly(2), timeout)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
            assert not second & 0x80, "server frames are never masked"
            return first & 0x0F, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionResetError:
            pass


OP_CLOSE, OP_PING = 0x8, 0x9


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split server bytes into (opcode, payload) frames; fail on a torn frame."""
    frames = []
    at = 0
    while at < len(data):
        assert len(data) - at >= 2, f"torn frame header at byte {at}"
        first, second = data[at], data[at + 1]
        assert first & 0x80, f"fragmented or garbage frame at byte {at}: {data[at:at + 8]!r}"
        assert first & 0x0F in (0x1, 0x8, 0x9, 0xA), f"garbage at byte {at}: {data[at:at + 8]!r}"
        length, at = second & 0x7F, at + 2
        if length == 126:
            (length,), at = struct.unpack("!H", data[at:at + 2]), at + 2
        elif length == 127:
            (length,), at = struct.unpack("!Q", data[at:at + 8]), at + 8
        assert at + length <= len(data), f"frame of {length} bytes cut at {len(data) - at}"
        frames.append((first & 0x0F, data[at:at + length]))
        at += length
    return frames


# Config variants (set before ``port`` builds the app)


@pytest.fixture
def fast_heartbeat(config):
    config.heartbeat.interval = 0.2
    config.heartbeat.timeout = 0.3
    return config


@pytest.fixture
def small_messages(config):
    config.limits.max_message_bytes = 100
    return config


@pytest.fixture
def slow_commands(config):
    config.limits.commands_per_second = 5
    config.limits.commands_burst = 5
    return config


@pytest.fixture
def short_retention(config):
    config.retention.max_messages = 3
    return config


@pytest.fixture
def small_buffer(config):
    config.limits.max_buffered_bytes = 64 * 1024
    return config


# subscribe


@pytest.mark.parametrize("ref", ["s-1", 42])
async def test_subscribe_reply_fields_and_ref(port, ref):
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice"))
    await client.send({"type": "subscribe", "topic": "news.a", "ref": ref})
    reply = await client.expect("subscribed")
    assert set(reply) == {"type", "topic", "seq", "epoch", "recovered", "ref"}
    assert reply["topic"] == "news.a"
    assert reply["seq"] == 2
    assert isinstance(reply["epoch"], str)
    assert reply["recovered"] is True
    assert reply["ref"] == ref and type(reply["ref"]) is type(ref)
    await client.nothing(0.1)
    client.close()


async def test_subscribe_without_ref_has_no_ref(port):
    client = await connect(port, token("alice"))
    await client.send({"type": "subscribe", "topic": "news.a"})
    reply = await client.expect("subscribed")
    assert "ref" not in reply
    client.close()


async def test_subscribe_outside_claims_is_forbidden(port):
    client = await connect(port, token("alice", topics=["news.>"]))
    await client.send({"type": "subscribe", "topic": "sport.a", "ref": "f"})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == "f"
    assert isinstance(error["message"], str)
    await publish(port, "sport.a", 1)
    await client.nothing(0.1)
    client.close()


@pytest.mark.parametrize("claim", [">", "*", "user:bob", "user:bob.>"])
async def test_other_users_personal_topic_is_forbidden_whatever_the_claims(port, claim):
    client = await connect(port, token("alice", topics=[claim]))
    await client.send({"type": "subscribe", "topic": "user:bob", "ref": 3})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == 3
    client.close()


@pytest.mark.parametrize("topic", ["news..a", "news.a b", "news/a", ".news", "news.", "a" * 201,
                                   "news.*", "news.>", ""])
async def test_subscribe_invalid_topic(port, topic):
    client = await connect(port, token("alice", topics=[">"]))
    await client.send({"type": "subscribe", "topic": topic, "ref": 5})
    error = await client.expect("error")
    assert error["code"] == "invalid_topic" and error["ref"] == 5
    await pong(client, 6)
    client.close()


async def test_subscribe_since_replays_after_it_in_order(port):
    published = await publish_many(port, "news.a", 5)
    client = await connect(port, token("alice"))
    reply = await subscribe(client, "news.a", ref=1, since=2)
    assert reply["seq"] == 5 and reply["recovered"] is True
    messages = [await client.expect("message") for _ in range(3)]
    assert [m["seq"] for m in messages] == [3, 4, 5]
    assert [m["data"] for m in messages] == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert [m["id"] for m in messages] == [p["id"] for p in published[2:]]
    await client.nothing(0.1)
    client.close()


async def test_subscribe_since_zero_replays_all(port):
    await publish_many(port, "news.a", 3)
    client = await connect(port, token("alice"))
    reply = await subscribe(client, "news.a", since=0)
    assert reply["seq"] == 3 and reply["recovered"] is True
    assert await seqs(client, 3, "news.a") == [1, 2, 3]
    await client.nothing(0.1)
    client.close()


async def test_subscribe_since_head_replays_nothing_then_live(port):
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice"))
    reply = await subscribe(client, "news.a", since=2)
    assert reply["seq"] == 2 and reply["recovered"] is True
    await client.nothing(0.1)
    await publish(port, "news.a", "live")
    message = await client.expect("message")
    assert message["seq"] == 3 and message["data"] == "live"
    client.close()


async def test_message_frame_fields(port):
    client = await connect(port, token("alice"))
    await subscribe(client, "news.a")
    body = await publish(port, "news.a", {"k": [1, "x", None]}, event="update")
    message = await client.expect("message")
    assert set(message) == {"type", "topic", "seq", "id", "time", "event", "data"}
    assert message["topic"] == "news.a" and message["seq"] == 1
    assert message["id"] == body["id"] and message["time"] == body["time"]
    assert message["event"] == "update"
    assert message["data"] == {"k": [1, "x", None]}
    assert message["time"].endswith("Z")
    await publish(port, "news.a", 2)
    assert (await client.expect("message"))["event"] is None
    client.close()


async def test_subscribe_without_since_or_cursor_is_live_only(port):
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice"))
    reply = await subscribe(client, "news.a", ref=1)
    assert reply["seq"] == 2 and reply["recovered"] is True
    await client.nothing(0.2)
    await publish(port, "news.a", "live")
    assert await seqs(client, 1, "news.a") == [3]
    client.close()


async def test_subscribe_without_since_resumes_after_acked_cursor(port):
    await publish_many(port, "news.a", 4)
    first = await connect(port, token("alice"))
    await first.send({"type": "ack", "topic": "news.a", "seq": 2})
    await pong(first, 1)
    first.close()
    second = await connect(port, token("alice"))
    reply = await subscribe(second, "news.a", ref=2)
    assert reply["seq"] == 4 and reply["recovered"] is True
    assert await seqs(second, 2, "news.a") == [3, 4]
    await second.nothing(0.1)
    await publish(port, "news.a", 5)
    assert await seqs(second, 1, "news.a") == [5]
    second.close()


async def test_cursor_is_per_user(port):
    await publish_many(port, "news.a", 3)
    alice = await connect(port, token("alice"))
    await alice.send({"type": "ack", "topic": "news.a", "seq": 2})
    await pong(alice, 1)
    bob = await connect(port, token("bob"))
    reply = await subscribe(bob, "news.a")
    assert reply["seq"] == 3
    await bob.nothing(0.2)  # bob has no cursor: live only
    alice.close()
    bob.close()


async def test_since_beats_stored_cursor(port):
    await publish_many(port, "news.a", 3)
    client = await connect(port, token("alice"))
    await client.send({"type": "ack", "topic": "news.a", "seq": 2})
    await pong(client, 1)
    await subscribe(client, "news.a", since=0)
    assert await seqs(client, 3, "news.a") == [1, 2, 3]
    client.close()


async def test_since_above_head_recovers_false_and_replays_from_oldest(port):
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice"))
    reply = await subscribe(client, "news.a", ref=1, since=10)
    assert reply["seq"] == 2 and reply["recovered"] is False
    assert await seqs(client, 2, "news.a") == [1, 2]
    await client.nothing(0.1)
    client.close()


async def test_since_before_retained_recovers_false(short_retention, port):
    await publish_many(port, "news.a", 5)  # 1 and 2 are dropped: 3, 4, 5 remain
    client = await connect(port, token("alice"))
    reply = await subscribe(client, "news.a", since=1)
    assert reply["seq"] == 5 and reply["recovered"] is False
    assert await seqs(client, 3, "news.a") == [3, 4, 5]
    reply = await subscribe(client, "news.a", since=2)
    assert reply["recovered"] is True  # nothing after 2 was dropped
    assert await seqs(client, 3, "news.a") == [3, 4, 5]
    client.close()


@pytest.mark.parametrize("since", [-1, "3", 1.5, True, None])
async def test_subscribe_bad_since_is_bad_request(port, since):
    client = await connect(port, token("alice"))
    command = {"type": "subscribe", "topic": "news.a", "since": since, "ref": 1}
    await client.send(command)
    if since is None:
        # JSON null is "no since": allowed.
        assert (await client.expect("subscribed"))["ref"] == 1
    else:
        error = await client.expect("error")
        assert error["code"] == "bad_request" and error["ref"] == 1
    await pong(client, 2)
    client.close()


async def test_resubscribe_replaces_with_new_replay_and_no_duplicates(port):
    await publish_many(port, "news.a", 3)
    client = await connect(port, token("alice"))
    first = await subscribe(client, "news.a", ref=1, since=0)
    assert await seqs(client, 3, "news.a") == [1, 2, 3]
    second = await subscribe(client, "news.a", ref=2, since=1)
    assert await seqs(client, 2, "news.a") == [2, 3]
    assert first["epoch"] == second["epoch"]
    await publish(port, "news.a", 4)
    assert await seqs(client, 1, "news.a") == [4]
    await client.nothing(0.2)
    client.close()


async def test_epoch_is_stable_across_subscriptions_and_connections(port):
    await publish(port, "news.a", 1)
    one = await connect(port, token("alice"))
    two = await connect(port, token("bob"))
    epochs = [
        (await subscribe(one, "news.a"))["epoch"],
        (await subscribe(one, "news.a", since=0))["epoch"],
        (await subscribe(two, "news.a"))["epoch"],
    ]
    assert len(set(epochs)) == 1 and epochs[0]
    one.close()
    two.close()


# unsubscribe


async def test_unsubscribe_stops_messages(port):
    client = await connect(port, token("alice"))
    await subscribe(client, "news.a")
    await publish(port, "news.a", 1)
    assert await seqs(client, 1) == [1]
    await client.send({"type": "unsubscribe", "topic": "news.a", "ref": "u"})
    reply = await client.expect("unsubscribed")
    assert reply == {"type": "unsubscribed", "topic": "news.a", "ref": "u"}
    await publish(port, "news.a", 2)
    await client.nothing(0.2)
    await pong(client, 1)
    client.close()


async def test_unsubscribe_keeps_other_subscriptions(port):
    client = await connect(port, token("alice"))
    await subscribe(client, "news.a")
    await subscribe(client, "news.b")
    await client.send({"type": "unsubscribe", "topic": "news.a", "ref": 9})
    assert (await client.expect("unsubscribed"))["ref"] == 9
    await publish(port, "news.a", "a")
    body = await publish(port, "news.b", "b")
    message = await client.expect("message")
    assert message["topic"] == "news.b" and message["id"] == body["id"]
    await client.nothing(0.1)
    client.close()


# ack


async def test_ack_has_no_reply(port):
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice"))
    await client.send({"type": "ack", "topic": "news.a", "seq": 1, "ref": "k"})
    await client.nothing(0.2)
    await pong(client, 1)
    client.close()


async def test_ack_stored_by_normal_close(port):
    await publish_many(port, "news.a", 3)
    first = await connect(port, token("alice"))
    await first.send({"type": "ack", "topic": "news.a", "seq": 1})
    first.connection.close(1000)
    assert await first.closed() == 1000
    second = await connect(port, token("alice"))
    await subscribe(second, "news.a")
    assert await seqs(second, 2, "news.a") == [2, 3]
    second.close()


async def test_ack_older_seq_is_ignored(port):
    await publish_many(port, "news.a", 4)
    first = await connect(port, token("alice"))
    await first.send({"type": "ack", "topic": "news.a", "seq": 3})
    await first.send({"type": "ack", "topic": "news.a", "seq": 1, "ref": "old"})
    await pong(first, 1)  # no error for the older ack
    first.close()
    second = await connect(port, token("alice"))
    await subscribe(second, "news.a")
    assert await seqs(second, 1, "news.a") == [4]
    await second.nothing(0.1)
    second.close()


async def test_ack_above_head_is_bad_request(port):
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice"))
    await client.send({"type": "ack", "topic": "news.a", "seq": 3, "ref": "hi"})
    error = await client.expect("error")
    assert error["code"] == "bad_request" and error["ref"] == "hi"
    await pong(client, 1)
    client.close()
    # Not stored: a new subscription without since is still live only.
    again = await connect(port, token("alice"))
    await subscribe(again, "news.a")
    await again.nothing(0.2)
    again.close()


async def test_ack_without_subscribe_right_is_forbidden(port):
    await publish_many(port, "sport.a", 2)
    client = await connect(port, token("alice", topics=["news.>"]))
    await client.send({"type": "ack", "topic": "sport.a", "seq": 1, "ref": 4})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == 4
    await pong(client, 5)
    client.close()


async def test_ack_on_other_users_personal_topic_is_forbidden(port):
    await api(port, "POST", "/api/publish", {"user": "bob", "data": 1})
    client = await connect(port, token("alice", topics=[">"]))
    await client.send({"type": "ack", "topic": "user:bob", "seq": 1, "ref": 4})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == 4
    client.close()


# publish from the socket


async def test_publish_without_claim_is_forbidden(port):
    client = await connect(port, token("alice", topics=["news.>"], publish=[]))
    await subscribe(client, "news.a")
    await client.send({"type": "publish", "topic": "news.a", "data": 1, "ref": "p"})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == "p"
    await client.nothing(0.1)
    assert (await history(port, "news.a"))["head"] == 0
    client.close()


async def test_publish_outside_publish_claim_is_forbidden(port):
    client = await connect(port, token("alice", topics=[">"], publish=["chat.>"]))
    await client.send({"type": "publish", "topic": "news.a", "data": 1, "ref": 1})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == 1
    client.close()


async def test_publish_replies_and_reaches_subscribers(port):
    publisher = await connect(port, token("alice", topics=["chat.>"], publish=["chat.>"]))
    reader = await connect(port, token("bob", topics=["chat.>"]))
    await subscribe(reader, "chat.room")
    await publisher.send({"type": "publish", "topic": "chat.room", "data": {"text": "hi"},
                          "event": "say", "ref": 11})
    reply = await publisher.expect("published")
    assert set(reply) == {"type", "topic", "seq", "id", "ref"}
    assert reply["topic"] == "chat.room" and reply["seq"] == 1 and reply["ref"] == 11
    assert isinstance(reply["id"], str) and reply["id"]
    message = await reader.expect("message")
    assert message["id"] == reply["id"] and message["seq"] == 1
    assert message["data"] == {"text": "hi"} and message["event"] == "say"
    stored = await history(port, "chat.room")
    assert stored["head"] == 1 and [m["id"] for m in stored["messages"]] == [reply["id"]]
    publisher.close()
    reader.close()


async def test_publish_ephemeral_is_live_only(port):
    publisher = await connect(port, token("alice", topics=["chat.>"], publish=["chat.>"]))
    reader = await connect(port, token("bob", topics=["chat.>"]))
    await subscribe(reader, "chat.room")
    await publisher.send({"type": "publish", "topic": "chat.room", "data": "typing",
                          "ephemeral": True, "ref": "e"})
    reply = await publisher.expect("published")
    assert reply["topic"] == "chat.room" and reply["seq"] is None and reply["ref"] == "e"
    assert "seq" in reply
    message = await reader.expect("message")
    assert message["seq"] is None and message["id"] == reply["id"] and message["data"] == "typing"
    stored = await history(port, "chat.room")
    assert stored == {"messages": [], "head": 0}
    # A later stored message still gets seq 1, and a replay has nothing ephemeral.
    await publisher.send({"type": "publish", "topic": "chat.room", "data": "kept", "ref": "k"})
    assert (await publisher.expect("published"))["seq"] == 1
    assert (await reader.expect("message"))["seq"] == 1
    late = await connect(port, token("carol", topics=["chat.>"]))
    await subscribe(late, "chat.room", since=0)
    assert await seqs(late, 1, "chat.room") == [1]
    await late.nothing(0.1)
    publisher.close()
    reader.close()
    late.close()


@pytest.mark.parametrize("ephemeral", [1, "yes"])
async def test_publish_mistyped_ephemeral_is_bad_request(port, ephemeral):
    client = await connect(port, token("alice", publish=["news.>"]))
    await client.send({"type": "publish", "topic": "news.a", "data": 1, "ephemeral": ephemeral,
                       "ref": 1})
    error = await client.expect("error")
    assert error["code"] == "bad_request" and error["ref"] == 1
    client.close()


async def test_publish_too_large_data(small_messages, port):
    client = await connect(port, token("alice", publish=["news.>"]))
    await client.send({"type": "publish", "topic": "news.a", "data": "x" * 200, "ref": "big"})
    error = await client.expect("error")
    assert error["code"] == "too_large" and error["ref"] == "big"
    # Exactly at the limit is fine: a 98-character string is 100 bytes of JSON.
    await client.send({"type": "publish", "topic": "news.a", "data": "x" * 98, "ref": "ok"})
    reply = await client.expect("published")
    assert reply["ref"] == "ok" and reply["seq"] == 1
    await pong(client, 1)
    assert (await history(port, "news.a"))["head"] == 1
    client.close()


async def test_frame_above_limit_plus_4k_closes_with_1009(small_messages, port):
    client = await connect(port, token("alice", publish=["news.>"]))
    await client.send({"type": "publish", "topic": "news.a", "data": "x" * (100 + 4096 + 100)})
    assert await client.closed() == 1009
    client.close()
    assert (await history(port, "news.a"))["head"] == 0


def frame_of_length(length: int) -> str:
    """A publish command whose text is exactly ``length`` bytes."""
    shell = '{"type":"publish","topic":"news.a","data":"%s","ref":1}'
    return shell % ("x" * (length - len(shell % "")))


async def test_frame_of_exactly_limit_plus_4k_is_not_closed(small_messages, port):
    client = await connect(port, token("alice", publish=["news.>"]))
    text = frame_of_length(100 + 4096)
    assert len(text.encode()) == 4196
    await client.send(text)
    error = await client.expect("error")
    assert error["code"] == "too_large" and error["ref"] == 1
    await client.send(frame_of_length(100 + 4096 + 1))
    assert await client.closed() == 1009
    client.close()


async def test_frame_below_limit_plus_4k_stays_open(small_messages, port):
    client = await connect(port, token("alice", publish=["news.>"]))
    await client.send({"type": "publish", "topic": "news.a", "data": "x" * 3000, "ref": 1})
    error = await client.expect("error")
    assert error["code"] == "too_large" and error["ref"] == 1
    await pong(client, 2)
    client.close()


# ping


@pytest.mark.parametrize("ref", ["p", 0, 123456789])
async def test_ping_pong_echoes_ref(port, ref):
    client = await connect(port, token("alice"))
    await pong(client, ref)
    client.close()


async def test_ping_without_ref(port):
    client = await connect(port, token("alice"))
    await client.send({"type": "ping"})
    assert await client.expect("pong") == {"type": "pong"}
    client.close()


# Errors keep the connection open


BAD_COMMANDS = {
    "not_json": ("{nope", "bad_request", None),
    "not_an_object_list": ("[1, 2]", "bad_request", None),
    "not_an_object_string": ('"ping"', "bad_request", None),
    "not_an_object_number": ("7", "bad_request", None),
    "missing_type": ({"topic": "news.a", "ref": 1}, "bad_request", 1),
    "mistyped_type": ({"type": 5, "ref": 1}, "bad_request", 1),
    "unknown_type": ({"type": "dance", "ref": "u"}, "unknown_type", "u"),
    "subscribe_missing_topic": ({"type": "subscribe", "ref": 2}, "bad_request", 2),
    "subscribe_mistyped_topic": ({"type": "subscribe", "topic": 5, "ref": 2}, "bad_request", 2),
    "unsubscribe_missing_topic": ({"type": "unsubscribe", "ref": 2}, "bad_request", 2),
    "ack_missing_seq": ({"type": "ack", "topic": "news.a", "ref": 3}, "bad_request", 3),
    "ack_mistyped_seq": ({"type": "ack", "topic": "news.a", "seq": "1", "ref": 3},
                         "bad_request", 3),
    "ack_missing_topic": ({"type": "ack", "seq": 1, "ref": 3}, "bad_request", 3),
    "publish_missing_data": ({"type": "publish", "topic": "news.a", "ref": 4}, "bad_request", 4),
    "publish_missing_topic": ({"type": "publish", "data": 1, "ref": 4}, "bad_request", 4),
    "publish_mistyped_event": ({"type": "publish", "topic": "news.a", "data": 1, "event": 3,
                                "ref": 4}, "bad_request", 4),
    "publish_invalid_topic": ({"type": "publish", "topic": "a..b", "data": 1, "ref": 4},
                              "invalid_topic", 4),
    "auth_missing_token": ({"type": "auth", "ref": 5}, "bad_request", 5),
    "auth_mistyped_token": ({"type": "auth", "token": 5, "ref": 5}, "bad_request", 5),
}


@pytest.mark.parametrize("kind", sorted(BAD_COMMANDS))
async def test_bad_command_gets_error_and_connection_stays_open(port, kind):
    command, code, ref = BAD_COMMANDS[kind]
    client = await connect(port, token("alice", topics=["news.>"], publish=["news.>"]))
    await client.send(command)
    error = await client.expect("error")
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if ref is None:
        assert "ref" not in error
    else:
        assert error["ref"] == ref
    await pong(client, "after")
    client.close()


async def test_many_errors_in_a_row_keep_the_connection(port):
    client = await connect(port, token("alice"))
    for kind in sorted(BAD_COMMANDS):
        await client.send(BAD_COMMANDS[kind][0])
    for kind in sorted(BAD_COMMANDS):
        assert (await client.expect("error"))["code"] == BAD_COMMANDS[kind][1], kind
    await pong(client, 1)
    client.close()


# Order


async def test_commands_are_handled_in_order(port):
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice", topics=["news.>"], publish=["news.>"]))
    await client.send({"type": "subscribe", "topic": "news.a", "since": 0, "ref": 1})
    await client.send({"type": "publish", "topic": "news.b", "data": "x", "ref": 2})
    await client.send({"type": "ping", "ref": 3})
    frames = [await client.recv() for _ in range(5)]
    assert [(f["type"], f.get("ref"), f.get("seq")) for f in frames] == [
        ("subscribed", 1, 2),
        ("message", None, 1),
        ("message", None, 2),
        ("published", 2, 1),
        ("pong", 3, None),
    ]
    await client.nothing(0.1)
    client.close()


async def test_publish_then_ack_then_ping_in_order(port):
    client = await connect(port, token("alice", topics=["news.>"], publish=["news.>"]))
    await client.send({"type": "publish", "topic": "news.a", "data": 1, "ref": 1})
    # The ack names seq 1, which exists only once the publish before it ran.
    await client.send({"type": "ack", "topic": "news.a", "seq": 1, "ref": 2})
    await client.send({"type": "ping", "ref": 3})
    assert (await client.expect("published"))["ref"] == 1
    assert (await client.expect("pong"))["ref"] == 3
    client.close()


# Rate limit


async def test_rate_limited_command_gets_error_with_ref_and_is_not_run(slow_commands, port):
    client = await connect(port, token("alice", publish=["news.>"]))
    for ref in range(1, 6):
        await client.send({"type": "ping", "ref": ref})
    await client.send({"type": "publish", "topic": "news.a", "data": 1, "ref": "sixth"})
    for ref in range(1, 6):
        assert await client.expect("pong") == {"type": "pong", "ref": ref}
    error = await client.expect("error")
    assert error["code"] == "rate_limited" and error["ref"] == "sixth"
    assert (await history(port, "news.a"))["head"] == 0
    await asyncio.sleep(0.25)  # one token back at 5/s
    await pong(client, "later")
    client.close()


async def test_client_that_keeps_on_is_closed_with_4008(slow_commands, port):
    client = await connect(port, token("alice"))
    for ref in range(1, 16):
        await client.send({"type": "ping", "ref": ref})
    frames = []
    while True:
        frame = await client.recv()
        if frame is None:
            break
        frames.append(frame)
    assert client.close_code == 4008
    client.close()
    assert [f["type"] for f in frames[:5]] == ["pong"] * 5
    assert [f["ref"] for f in frames[:5]] == [1, 2, 3, 4, 5]
    assert (frames[5]["type"], frames[5]["code"], frames[5]["ref"]) == ("error", "rate_limited", 6)
    assert all(f["type"] == "error" and f["code"] == "rate_limited" for f in frames[5:])


# Close codes and heartbeat


async def test_token_expiry_closes_with_4001(fast_heartbeat, services, port):
    with running_heartbeat(services):
        exp = int(time.time()) + 2
        short = jwt.encode({"sub": "alice", "exp": exp, "topics": ["news.>"]}, SECRET,
                           algorithm="HS256")
        client = await connect(port, short)
        await pong(client, 1)
        assert await client.closed(timeout=4) == 4001
        client.close()
        # Not before the token's exp (whole seconds), and soon after it.
        assert exp - 0.05 <= time.time() < exp + 1.0


async def test_auth_extends_expiry(fast_heartbeat, services, port):
    with running_heartbeat(services):
        exp = int(time.time()) + 2
        short = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
        client = await connect(port, short)
        await client.send({"type": "auth", "token": token("alice", ttl=600), "ref": 1})
        assert (await client.expect("authenticated"))["ref"] == 1
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.3)  # several ticks past exp
        await pong(client, 2)
        client.close()


async def test_heartbeat_keeps_answering_client(fast_heartbeat, services, port):
    with running_heartbeat(services):
        client = await connect(port, token("alice"))
        await client.nothing(1.5)  # tornado's client answers the pings
        await pong(client, 1)
        client.close()


async def test_heartbeat_closes_silent_client(fast_heartbeat, services, port):
    with running_heartbeat(services):
        raw = await RawClient.open(port, token("alice"))
        opened = time.monotonic()
        opcodes = []
        while True:
            frame = await raw.frame(timeout=3)
            if frame is None:
                break
            opcodes.append(frame[0])
            if frame[0] == OP_CLOSE:
                break
        elapsed = time.monotonic() - opened
        await raw.close()
        assert opcodes[:2] == [0x1, 0x1]  # welcome, subscribed
        assert OP_PING in opcodes, opcodes
        assert frame is not None and frame[0] == OP_CLOSE, opcodes
        # SPEC close codes: 4010 heartbeat timeout (1001 is for the server going away).
        assert struct.unpack("!H", frame[1][:2])[0] == 4010
        assert frame[1][2:] == b"heartbeat timeout"
        # interval 0.2 + timeout 0.3 + ticks, with slack for a busy machine.
        assert 0.4 <= elapsed < 1.2, elapsed
        status, body = await api(port, "GET", "/api/topics/user:alice/presence")
        assert status == 200 and body == {"users": [], "connections": 0}


# Personal topics and the offline queue


async def test_personal_publish_reaches_only_its_user(port):
    alice = await connect(port, token("alice", topics=[">"]))
    bob = await connect(port, token("bob"))
    status, body = await api(port, "POST", "/api/publish", {"user": "bob", "data": {"hi": "bob"}})
    assert status == 200 and body["topic"] == "user:bob"
    message = await bob.expect("message")
    assert message["topic"] == "user:bob" and message["id"] == body["id"]
    assert message["data"] == {"hi": "bob"}
    await alice.nothing(0.2)
    await alice.send({"type": "subscribe", "topic": "user:bob", "ref": "spy"})
    error = await alice.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == "spy"
    alice.close()
    bob.close()


async def test_offline_queue_replays_then_resumes_from_cursor(port):
    for n in (1, 2, 3):
        status, _ = await api(port, "POST", "/api/publish", {"user": "bob", "data": n})
        assert status == 200
    bob = await connect(port, token("bob"), welcome=False)
    await bob.expect("welcome")
    subscribed = await bob.expect("subscribed")
    assert subscribed["topic"] == "user:bob" and subscribed["seq"] == 3
    assert subscribed["recovered"] is True and "ref" not in subscribed
    messages = [await bob.expect("message") for _ in range(3)]
    assert [(m["seq"], m["data"]) for m in messages] == [(1, 1), (2, 2), (3, 3)]
    await bob.send({"type": "ack", "topic": "user:bob", "seq": 2})
    await pong(bob, 1)
    bob.close()
    again = await connect(port, token("bob"), welcome=False)
    await again.expect("welcome")
    assert (await again.expect("subscribed"))["seq"] == 3
    assert await seqs(again, 1, "user:bob") == [3]
    await again.nothing(0.1)
    await api(port, "POST", "/api/publish", {"user": "bob", "data": 4})
    assert await seqs(again, 1, "user:bob") == [4]
    again.close()


# More edges of the protocol


@pytest.mark.parametrize("ref", [1.5, True, {"a": 1}, [1]])
async def test_mistyped_ref_is_bad_request(port, ref):
    client = await connect(port, token("alice"))
    await client.send({"type": "ping", "ref": ref})
    error = await client.expect("error")
    assert error["code"] == "bad_request"
    await pong(client, 1)
    client.close()


async def test_publish_null_data_is_allowed(port):
    client = await connect(port, token("alice", publish=["news.>"]))
    await subscribe(client, "news.a")
    await client.send({"type": "publish", "topic": "news.a", "data": None, "ref": 1})
    frames = [await client.recv(), await client.recv()]
    assert sorted(f["type"] for f in frames) == ["message", "published"]
    message = next(f for f in frames if f["type"] == "message")
    assert message["data"] is None and message["seq"] == 1
    client.close()


async def test_own_personal_topic_can_be_subscribed_without_claims(port):
    await api(port, "POST", "/api/publish", {"user": "alice", "data": "x"})
    client = await connect(port, token("alice", topics=[]), welcome=False)
    await client.expect("welcome")
    await client.expect("subscribed")
    assert await seqs(client, 1, "user:alice") == [1]
    reply = await subscribe(client, "user:alice", ref=1, since=0)
    assert reply["seq"] == 1
    assert await seqs(client, 1, "user:alice") == [1]
    await client.nothing(0.1)
    client.close()


async def test_replay_while_publishing_has_no_gap_and_no_duplicate(port):
    # More than one replay page (500), with live messages racing the replay.
    for first in (1, 601):
        batch = {"messages": [{"topic": "news.a", "data": n} for n in range(first, first + 600)]}
        status, body = await api(port, "POST", "/api/publish/batch", batch)
        assert status == 200, body
    client = await connect(port, token("alice"))
    await client.send({"type": "subscribe", "topic": "news.a", "since": 0, "ref": 1})
    live = [publish(port, "news.a", n) for n in range(1201, 1231)]
    results = await asyncio.gather(*live)
    assert sorted(r["seq"] for r in results) == list(range(1201, 1231))
    assert (await client.expect("subscribed"))["ref"] == 1
    assert await seqs(client, 1230, "news.a") == list(range(1, 1231))
    await client.nothing(0.1)
    client.close()


async def flood(port: int, target: dict) -> int:
    """Publish 800 KB batches to ``target`` until its subscriber (who reads
    nothing meanwhile) is dropped as a slow consumer; returns the head."""
    topic = target.get("topic") or f"user:{target['user']}"
    chunk = "x" * 8000
    for batches in range(1, 41):
        status, body = await api(port, "POST", "/api/publish/batch",
                                 {"messages": [{**target, "data": chunk}] * 100})
        assert status == 200, body
        status, presence = await api(port, "GET", f"/api/topics/{topic}/presence")
        if presence["connections"] == 0:
            return batches * 100
    raise AssertionError("32 MB queued and the subscriber was never dropped")


async def overwhelm(port: int, client) -> tuple[int, int]:
    """Flood ``client`` (subscribed to news.a, reading nothing) until it is
    dropped, then read what got through until the server closes. Returns the
    last seq received and the topic's head."""
    await subscribe(client, "news.a")
    total = await flood(port, {"topic": "news.a"})
    last = 0
    while (frame := await client.recv()) is not None:
        assert frame["seq"] == last + 1
        last = frame["seq"]
    return last, total


async def test_slow_consumer_is_closed_with_4009(small_buffer, port):
    client = await connect(port, token("alice"))
    last, total = await overwhelm(port, client)
    assert client.close_code == 4009
    client.close()
    assert last < total


async def test_slow_consumer_can_resume_with_since(small_buffer, port):
    client = await connect(port, token("alice"))
    last, total = await overwhelm(port, client)
    assert client.close_code == 4009
    client.close()
    # A client that now reads steadily gets the rest: nothing is lost.
    again = await connect(port, token("alice"))
    reply = await subscribe(again, "news.a", since=last)
    assert reply["seq"] == total and reply["recovered"] is True
    assert await seqs(again, total - last, "news.a") == list(range(last + 1, total + 1))
    await pong(again, 1)
    again.close()


async def test_replay_larger_than_buffer_allowance_streams_through(port, config):
    # 1200 messages of 8 KB: about 10 MB of history, well above the 1 MiB a
    # connection may have waiting. A client that reads steadily gets all of it.
    chunk = "x" * 8000
    for _ in range(12):
        batch = {"messages": [{"topic": "news.a", "data": chunk} for _ in range(100)]}
        status, body = await api(port, "POST", "/api/publish/batch", batch)
        assert status == 200, body
    assert config.limits.max_buffered_bytes == 1024 * 1024
    client = await connect(port, token("alice"))
    await subscribe(client, "news.a", since=0)
    assert await seqs(client, 1200, "news.a") == list(range(1, 1201))
    await pong(client, 1)
    client.close()


async def test_slow_consumer_close_frame_is_clean(small_buffer, port):
    """What a slow consumer finally reads is whole frames, then a 4009 close:
    never a frame cut short with the close frame's bytes inside it."""
    raw = await RawClient.open(port, token("alice"))
    await flood(port, {"user": "alice"})
    data = b""
    while True:
        try:
            more = await asyncio.wait_for(raw.reader.read(1 << 20), 0.5)
        except asyncio.TimeoutError:
            break
        if not more:
            break
        data += more
    await raw.close()
    frames = parse_frames(data)
    assert frames[-1][0] == OP_CLOSE
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 4009
    assert all(op == 0x1 for op, _ in frames[:-1])


async def test_dotted_user_owns_its_personal_topic(port):
    owner = await connect(port, token("bob.x", topics=[]), welcome=False)
    assert (await owner.expect("welcome"))["user"] == "bob.x"
    assert (await owner.expect("subscribed"))["topic"] == "user:bob.x"
    other = await connect(port, token("bob", topics=[">"]))
    await other.send({"type": "subscribe", "topic": "user:bob.x", "ref": "spy"})
    error = await other.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == "spy"
    status, body = await api(port, "POST", "/api/publish", {"user": "bob.x", "data": 1})
    assert status == 200 and body["topic"] == "user:bob.x"
    message = await owner.expect("message")
    assert message["topic"] == "user:bob.x" and message["id"] == body["id"]
    await other.nothing(0.1)
    reply = await subscribe(owner, "user:bob.x", ref=1, since=0)
    assert reply["seq"] == 1
    assert await seqs(owner, 1, "user:bob.x") == [1]
    owner.close()
    other.close()


async def test_no_since_is_recovered_even_from_an_overtaken_cursor(short_retention, port):
    # SPEC: "With no since, recovered is true", also when the stored cursor
    # points before what retention kept; the replay starts at the oldest.
    await publish_many(port, "news.a", 2)
    client = await connect(port, token("alice"))
    await client.send({"type": "ack", "topic": "news.a", "seq": 1})
    await pong(client, 1)
    await publish_many(port, "news.a", 3)  # 1 and 2 are dropped: 3, 4, 5 remain
    reply = await subscribe(client, "news.a")
    assert reply["seq"] == 5 and reply["recovered"] is True
    assert await seqs(client, 3, "news.a") == [3, 4, 5]
    client.close()


async def test_a_different_epoch_is_not_recovered_and_replays_from_the_oldest(port):
    await publish_many(port, "news.a", 3)
    client = await connect(port, token("alice"))
    current = (await subscribe(client, "news.a", since=3))["epoch"]
    await client.send({"type": "ack", "topic": "news.a", "seq": 3})
    for fields in ({"since": 2}, {}):  # with a since, and from the stored cursor
        reply = await subscribe(client, "news.a", ref=1, epoch="an-older-epoch", **fields)
        assert reply["recovered"] is False and reply["epoch"] == current
        assert await seqs(client, 3, "news.a") == [1, 2, 3]
    # The current epoch changes nothing.
    reply = await subscribe(client, "news.a", since=2, epoch=current)
    assert reply["recovered"] is True
    assert await seqs(client, 1, "news.a") == [3]
    await client.send({"type": "subscribe", "topic": "news.a", "epoch": 7, "ref": 2})
    error = await client.expect("error")
    assert error["code"] == "bad_request" and error["ref"] == 2
    await client.nothing(0.2)
    client.close()

"""The session with no socket: commands go in as text, and what it sends
comes out of a recording transport. The store (SQLite in a temporary
folder), publisher and hub are the real ones; only the connection is
replaced, which is the point of keeping the session free of I/O."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from notifier import protocol
from notifier.session import REPLAY_PAGE, Session
from support import token


class RecordingOutbox:
    """Keeps every frame, in order: replies from the session and live
    messages from the hub alike. ``drain`` empties the pending count, as a
    socket that took everything would."""

    def __init__(self, limit: int):
        self.limit = limit
        self.pending = 0
        self.closed = False
        self.frames: list[dict] = []
        self.drains = 0

    def write(self, frames: bytes, payloads) -> None:
        for payload in payloads:
            self.add(payload)

    queue = write

    def add(self, payload: bytes) -> None:
        self.frames.append(orjson.loads(payload))
        self.pending += len(payload)

    async def drain(self) -> None:
        self.drains += 1
        self.pending = 0
        await asyncio.sleep(0)


class RecordingTransport:
    def __init__(self, limit: int = 1 << 20):
        self.outbox = RecordingOutbox(limit)
        self.closes: list[tuple[int, str]] = []
        self.pings = 0
        self.overflows = 0

    def send(self, payload: bytes) -> None:
        self.outbox.add(payload)

    def close_with(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def send_ping(self) -> None:
        self.pings += 1

    def overflow(self) -> None:
        self.overflows += 1

    @property
    def frames(self) -> list[dict]:
        return self.outbox.frames

    def take(self) -> list[dict]:
        frames, self.outbox.frames = self.outbox.frames, []
        return frames


async def open_session(services, jwt: str, limit: int = 1 << 20) -> tuple[Session, RecordingTransport]:
    transport = RecordingTransport(limit)
    identity = services.verifier.verify(jwt)
    session = Session(services, identity, transport, f"conn-{identity.user}")
    await session.start()
    return session, transport


async def feed(session: Session, *commands) -> None:
    """Hand frames over the way a transport must: the next one only after
    an awaitable returned for the previous one is done."""
    for command in commands:
        text = command if isinstance(command, str) else orjson.dumps(command).decode()
        pending = session.receive(text)
        if pending is not None:
            await pending


async def settle(services) -> None:
    """Let commits resolve and the end-of-turn fan-out run."""
    for _ in range(20):
        await asyncio.sleep(0.005)
        if not services.publisher.in_flight:
            break
    await asyncio.sleep(0.01)


async def stored(services, topic: str, count: int) -> None:
    await services.publisher.publish(
        [_draft(topic, {"n": n}) for n in range(1, count + 1)])


def _draft(topic: str, data) -> "Draft":
    from notifier.messages import Draft
    return Draft(topic, orjson.dumps(data))


def kinds(frames: list[dict]) -> list[str]:
    return [frame["type"] for frame in frames]


async def test_start_says_welcome_then_replays_the_offline_queue(services):
    await stored(services, "user:alice", 3)
    session, transport = await open_session(services, token("alice"))
    frames = transport.take()
    assert kinds(frames) == ["welcome", "subscribed", "message", "message", "message"]
    assert frames[0]["user"] == "alice" and frames[0]["connection"] == "conn-alice"
    assert frames[1]["topic"] == "user:alice" and "ref" not in frames[1]
    assert [f["seq"] for f in frames[2:]] == [1, 2, 3]
    assert services.hub.peers_of("alice") == [session]


async def test_pipelined_durable_publishes_are_answered_in_order_then_the_ping(services):
    session, transport = await open_session(services, token("alice", publish=["chat.>"]))
    transport.take()
    commands = [{"type": "publish", "topic": "chat.room", "data": n, "ref": n} for n in range(20)]
    # Handed over back to back: none of them returns an awaitable...
    for command in commands:
        assert session.receive(orjson.dumps(command)) is None
    # ...and a ping after them waits for their replies.
    waiting = session.receive('{"type":"ping","ref":"last"}')
    assert waiting is not None
    await waiting
    frames = transport.take()
    assert kinds(frames) == ["published"] * 20 + ["pong"]
    assert [f["ref"] for f in frames[:20]] == list(range(20))
    assert [f["seq"] for f in frames[:20]] == list(range(1, 21))
    # They went to the store together, not one commit each.
    commits = services.metrics.commit_size.collect()[0].samples
    count = next(s.value for s in commits if s.name.endswith("_count"))
    assert count < 20


async def test_a_refused_publish_is_answered_after_the_stored_one_before_it(services):
    session, transport = await open_session(services, token("alice", publish=["chat.>"]))
    transport.take()
    await feed(session, {"type": "publish", "topic": "chat.a", "data": 1, "ref": "stored"},
               {"type": "publish", "topic": "news.a", "data": 2, "ref": "refused"},
               {"type": "ping", "ref": "after"})
    assert [(f["type"], f["ref"]) for f in transport.take()] == [
        ("published", "stored"), ("error", "refused"), ("pong", "after")]


async def test_quick_commands_are_answered_inside_receive(services):
    session, transport = await open_session(services, token("alice", topics=["news.>"]))
    transport.take()
    for command in ({"type": "ping", "ref": 1}, {"type": "unsubscribe", "topic": "news.a", "ref": 2},
                    {"type": "nope", "ref": 3}, "not json"):
        assert session.receive(command if isinstance(command, str) else orjson.dumps(command)) is None
    assert [(f["type"], f.get("ref"), f.get("code")) for f in transport.take()] == [
        ("pong", 1, None), ("unsubscribed", 2, None), ("error", 3, "unknown_type"),
        ("error", None, "bad_request")]


async def test_replay_pages_through_history_with_drains_in_order(services):
    total = REPLAY_PAGE * 2 + 37
    await stored(services, "news.long", total)
    # A small outbox allowance: the replay must wait for the transport again and again.
    session, transport = await open_session(services, token("alice"), limit=8192)
    transport.take()
    await feed(session, {"type": "subscribe", "topic": "news.long", "since": 0, "ref": "s"})
    frames = transport.take()
    assert frames[0]["type"] == "subscribed" and frames[0]["seq"] == total
    assert [f["seq"] for f in frames[1:]] == list(range(1, total + 1))
    assert transport.outbox.drains > 10


async def test_publishes_during_a_replay_arrive_once_and_in_order(services):
    await stored(services, "news.busy", 1500)
    session, transport = await open_session(services, token("alice"), limit=4096)
    transport.take()

    async def publish_more():
        for n in range(200):
            await services.publisher.publish([_draft("news.busy", {"late": n})])

    publisher = asyncio.ensure_future(publish_more())
    await feed(session, {"type": "subscribe", "topic": "news.busy", "since": 0})
    await publisher
    await settle(services)
    seqs = [f["seq"] for f in transport.take() if f["type"] == "message"]
    assert seqs == list(range(1, 1701))


async def test_ack_is_stored_before_a_later_ping_is_answered(services):
    await stored(services, "user:alice", 5)
    session, transport = await open_session(services, token("alice"))
    transport.take()
    await feed(session, {"type": "ack", "topic": "user:alice", "seq": 4}, {"type": "ping"})
    assert kinds(transport.take()) == ["pong"]
    cursor = await services.store.get_cursor("alice", "user:alice")
    assert cursor == 4
    await feed(session, {"type": "ack", "topic": "user:alice", "seq": 99, "ref": "high"})
    (error,) = transport.take()
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_request", "high")


async def test_rate_limit_refuses_with_ref_then_closes_with_4008(services):
    services.config.limits.commands_per_second = 0.001
    services.config.limits.commands_burst = 3
    session, transport = await open_session(services, token("alice"))
    transport.take()
    await feed(session, *({"type": "ping", "ref": n} for n in range(3)))
    assert kinds(transport.take()) == ["pong"] * 3
    await feed(session, *({"type": "ping", "ref": n} for n in range(3, 6)))
    refused = transport.take()
    assert [(f["code"], f["ref"]) for f in refused] == [("rate_limited", n) for n in range(3, 6)]
    assert transport.closes == []
    await feed(session, {"type": "ping"})
    assert transport.closes == [(protocol.CLOSE_RATE_LIMITED, "rate limited")]


async def test_auth_refreshes_and_ends_what_the_new_claims_do_not_allow(services):
    session, transport = await open_session(services, token("alice", topics=["news.>", "sport.>"]))
    await feed(session, {"type": "subscribe", "topic": "news.a"},
               {"type": "subscribe", "topic": "sport.b"})
    transport.take()
    fresh = token("alice", topics=["sport.>"], ttl=7200)
    await feed(session, {"type": "auth", "token": fresh, "ref": "a"})
    frames = transport.take()
    assert [(f["type"], f.get("topic")) for f in frames] == [
        ("unsubscribed", "news.a"), ("authenticated", None)]
    assert frames[1]["ref"] == "a" and frames[1]["expires"] == session.identity.expires
    assert sorted(services.hub.topics_of(session)) == ["sport.b", "user:alice"]
    # Another user's token, and an expired one, leave the identity as it was.
    before = session.identity
    await feed(session, {"type": "auth", "token": token("bob"), "ref": "b"},
               {"type": "auth", "token": token("alice", ttl=-10), "ref": "c"})
    assert [(f["code"], f["ref"]) for f in transport.take()] == [
        ("unauthorized", "b"), ("unauthorized", "c")]
    assert session.identity is before


async def test_ended_leaves_the_hub_once(services):
    session, transport = await open_session(services, token("alice", topics=["news.>"]))
    await feed(session, {"type": "subscribe", "topic": "news.a"})
    assert services.hub.presence("news.a") == (["alice"], 1)
    session.ended(1000, "bye")
    session.ended(1000, "bye")
    assert services.hub.presence("news.a") == ([], 0)
    assert services.hub.peers_of("alice") == []


@pytest.mark.parametrize("since", [None, 0])
async def test_live_messages_reach_the_recording_outbox(services, since):
    session, transport = await open_session(services, token("alice", topics=["news.>"]))
    command = {"type": "subscribe", "topic": "news.live"}
    if since is not None:
        command["since"] = since
    await feed(session, command)
    transport.take()
    await stored(services, "news.live", 3)
    await settle(services)
    assert [f["seq"] for f in transport.take()] == [1, 2, 3]

"""The session with no socket: commands go in as text, and what it sends
comes out of a recording transport. The store (SQLite in a temporary
folder), publisher and hub are the real ones; only the connection is
replaced, which is the point of keeping the session free of I/O."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from notifier import protocol
from notifier.messages import Draft
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


def _draft(topic: str, data) -> Draft:
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
    assert cursor.seq == 4
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


# Positions: (seq, epoch), gaps filled from the store


async def test_a_message_that_overtakes_the_one_before_it_is_filled_from_the_store(services):
    session, transport = await open_session(services, token("alice", topics=["news.>"]))
    await feed(session, {"type": "subscribe", "topic": "news.gap", "since": 0})
    transport.take()
    # Stored by "another process": in the log, but never handed to this hub.
    await services.store.append([_draft("news.gap", "first")])
    await services.publisher.publish([_draft("news.gap", "second")])
    await settle(services)
    frames = transport.take()
    assert [(f["seq"], f["data"]) for f in frames] == [(1, "first"), (2, "second")]
    await services.publisher.publish([_draft("news.gap", "third")])
    await settle(services)
    assert [f["seq"] for f in transport.take()] == [3]


async def test_positions_short_of_the_head_catch_up(services):
    session, transport = await open_session(services, token("alice", topics=["news.>"]))
    await feed(session, {"type": "subscribe", "topic": "news.quiet"})
    transport.take()
    # The last messages before a quiet spell never arrived (a bus lost them).
    await services.store.append([_draft("news.quiet", n) for n in range(3)])
    positions = await services.store.positions(["news.quiet", "user:alice"])
    assert services.hub.behind(positions) == 1
    await settle(services)
    assert [f["seq"] for f in transport.take()] == [1, 2, 3]
    assert services.hub.behind(await services.store.positions(["news.quiet"])) == 0


async def test_a_message_from_a_log_that_is_gone_is_dropped_after_one_read(services):
    from notifier.messages import Message

    session, transport = await open_session(services, token("alice", topics=["news.>"]))
    await feed(session, {"type": "subscribe", "topic": "news.old", "since": 0})
    transport.take()
    services.hub.deliver([Message("news.old", 1, "a-lost-epoch", "id-x", "2024-05-01T12:00:00.000Z",
                                  None, b"0")])
    await settle(services)
    assert transport.take() == []
    await services.publisher.publish([_draft("news.old", "real")])
    await settle(services)
    assert [(f["seq"], f["data"]) for f in transport.take()] == [(1, "real")]
    assert services.hub.peers[session]["news.old"].replaying is False  # live again


async def test_subscribe_with_another_epoch_replays_all_with_recovered_false(services):
    await stored(services, "news.e", 4)
    session, transport = await open_session(services, token("alice", topics=["news.>"]))
    transport.take()
    await feed(session, {"type": "subscribe", "topic": "news.e", "since": 3, "epoch": "not-this-one",
                         "ref": 1})
    frames = transport.take()
    assert (frames[0]["type"], frames[0]["recovered"], frames[0]["ref"]) == ("subscribed", False, 1)
    epoch = frames[0]["epoch"]
    assert [f["seq"] for f in frames[1:]] == [1, 2, 3, 4]
    # With the epoch it was given, the same since resumes exactly.
    await feed(session, {"type": "subscribe", "topic": "news.e", "since": 3, "epoch": epoch})
    frames = transport.take()
    assert frames[0]["recovered"] is True and [f["seq"] for f in frames[1:]] == [4]
    # An epoch with no since and no cursor: the client had a position in
    # another log, so everything in this one is new to it.
    await feed(session, {"type": "subscribe", "topic": "news.e", "epoch": "old"})
    frames = transport.take()
    assert frames[0]["recovered"] is False and [f["seq"] for f in frames[1:]] == [1, 2, 3, 4]


async def test_a_cursor_acked_in_another_epoch_resumes_from_the_oldest(services, config):
    import sqlite3

    await stored(services, "user:alice", 3)
    await services.store.set_cursor("alice", "user:alice", 2)
    # As if the topic's log had been reset since the ack: the cursor's epoch is not the log's.
    db = sqlite3.connect(config.store.path)
    db.execute("UPDATE cursors SET epoch = 'before-the-reset'")
    db.commit()
    db.close()
    session, transport = await open_session(services, token("alice"))
    frames = transport.take()
    assert frames[1]["type"] == "subscribed" and frames[1]["recovered"] is False
    assert [f["seq"] for f in frames[2:]] == [1, 2, 3]

"""The fan-out written in slices (``notifier.outbox.Flusher``), over real
sockets: a slice that ends leaves outboxes waiting for the next loop turn,
yet every reader gets every frame once and in order; frames that arrive while
outboxes wait join them (one ``send`` per connection per round); a fan-out
on an idle loop is written in one go; and end to end through the server.

The server-side end of each connection is an ``IOStream`` over one end of a
``socket.socketpair()``; the test reads the other end. Where a test counts
``send`` calls it uses SOCK_SEQPACKET pairs: each ``send`` arrives as one
record, so the records a reader gets are the writes the server made."""

from __future__ import annotations

import asyncio
import socket

import orjson
from tornado.iostream import IOStream

from notifier.frames import text_frame
from notifier.hub import Hub
from notifier.messages import Message
from notifier.outbox import Flusher, Outbox
from support import api, token

LIMIT = 1 << 20


EPOCH = "e1"


def message(topic: str, seq: int | None, name: str | None = None) -> Message:
    """A stored message, or with ``seq`` None an ephemeral one called ``name``."""
    tag = name if seq is None else seq
    return Message(topic, seq, None if seq is None else EPOCH, f"id-{tag}", "2024-05-01T12:00:00.000Z", None,
                   orjson.dumps({"n": tag}))


def frames_of(*messages: Message) -> bytes:
    return b"".join(text_frame(m.payload()) for m in messages)


class Connection:
    """A hub peer whose outbox writes to a real socket; ``reader`` is the
    client end, read without blocking."""

    def __init__(self, index: int, flusher: Flusher, kind: int):
        server, self.reader = socket.socketpair(socket.AF_UNIX, kind)
        self.reader.setblocking(False)
        self.stream = IOStream(server)
        self.id = f"c{index}"
        self.user = f"user{index}"
        self.overflowed = 0
        self.outbox = Outbox(self.stream, LIMIT, flusher, self._on_overflow)
        self.records: list[bytes] = []  # what reads returned, one entry per recv

    def _on_overflow(self) -> None:
        self.overflowed += 1

    def slow_consumer(self) -> None:
        self.outbox.overflow()

    def read(self) -> None:
        """Take everything the socket holds now (all sends here are complete:
        the frames are small, so the server's ``send`` took them whole)."""
        while True:
            try:
                data = self.reader.recv(1 << 16)
            except BlockingIOError:
                return
            assert data, "the server end closed"
            self.records.append(data)

    def received(self) -> bytes:
        return b"".join(self.records)

    def close(self) -> None:
        self.stream.close()
        self.reader.close()


class Setup:
    """A Flusher and a Hub wired as ``build_services`` wires them, and ``n``
    socket-backed connections subscribed to ``topic``."""

    def __init__(self, n: int, slice_seconds: float = 0, kind: int = socket.SOCK_STREAM,
                 topic: str = "news"):
        self.flusher = Flusher(slice_seconds)
        self.hub = Hub(LIMIT, self.flusher.schedule)
        self.flusher.before.append(self.hub.flush)
        self.connections: list[Connection] = []
        try:
            for index in range(n):
                connection = Connection(index, self.flusher, kind)
                self.connections.append(connection)
                self.hub.add(connection)
                subscription = self.hub.subscribe(connection, topic)
                subscription.epoch = EPOCH
                self.hub.go_live(subscription)
        except BaseException:
            self.close()
            raise

    def idle(self) -> bool:
        return not self.flusher._waiting and not self.flusher._scheduled

    def read_all(self) -> None:
        for connection in self.connections:
            connection.read()

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


async def turn_by_turn(setup: Setup, between=None) -> int:
    """Run ``between(turn)`` once after each flush pass (a callback queued
    behind the pass, as any other work would be) until nothing waits; return
    how many passes it took. What ``between`` raises, this raises."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    turns = 0

    def checkpoint() -> None:
        nonlocal turns
        if done.done():  # the wait timed out
            return
        turns += 1
        try:
            if between is not None:
                between(turns)
        except BaseException as exc:  # a failed check ends the wait with it
            done.set_exception(exc)
            return
        if setup.idle():
            done.set_result(turns)
        else:
            loop.call_soon(checkpoint)

    loop.call_soon(checkpoint)
    return await asyncio.wait_for(done, 5)


async def test_a_sliced_fan_out_spans_loop_turns_and_delivers_everything_once_in_order(io_loop):
    setup = Setup(200)
    try:
        flusher = setup.flusher
        flusher._loop_has_work = lambda: True  # the loop always has something else to do
        # An ephemeral message in the middle: no seq, so nothing but the
        # Flusher and the outboxes stands between it and a second copy.
        batch = [message("news", 1), message("news", None, "typing"), message("news", 2)]
        setup.hub.deliver(batch)
        progress = []  # after each pass: (outboxes waiting, readers that got their frames)

        def between(turn: int) -> None:
            setup.read_all()
            progress.append((len(flusher._waiting),
                             sum(1 for c in setup.connections if c.records)))

        turns = await turn_by_turn(setup, between)
        # The first pass wrote some outboxes and left the rest for later turns,
        # during which other callbacks (this one) ran.
        first_waiting, first_written = progress[0]
        assert first_waiting > 0 and first_written > 0, progress
        assert first_waiting + first_written == 200, progress
        assert turns >= 3, progress
        waiting = [w for w, _ in progress]
        assert waiting == sorted(waiting, reverse=True) and waiting[-1] == 0, progress
        expected = frames_of(*batch)
        for connection in setup.connections:
            connection.read()
            assert connection.received() == expected, connection.id
            assert connection.overflowed == 0
        assert setup.hub.messages_out == 3 * 200
    finally:
        setup.close()


async def test_frames_arriving_while_outboxes_wait_join_them_in_order(io_loop):
    """Replies queued before the fan-out, a second fan-out and a reply arriving
    while outboxes still wait: each connection gets them all once, in order,
    in at most one write per round, and what arrived while it waited goes out
    in the same write as what was waiting."""
    setup = Setup(100, kind=socket.SOCK_SEQPACKET)
    try:
        flusher, hub = setup.flusher, setup.hub
        flusher._loop_has_work = lambda: True

        def reply(connection: Connection, what: str) -> bytes:
            return text_frame(orjson.dumps({"type": "pong", "ref": f"{what}-{connection.id}"}))

        def send_reply(what: str) -> None:
            for connection in setup.connections:
                frame = reply(connection, what)
                connection.outbox.send(frame, frame[2:])

        m1, m2, m3 = (message("news", seq) for seq in (1, 2, 3))
        send_reply("before")
        hub.deliver([m1])
        waiting_at = {}  # turn -> connections that had not yet had a write

        def between(turn: int) -> None:
            setup.read_all()
            counts = [len(c.records) for c in setup.connections]
            # Fair rounds: nobody is written twice while another waits for its first.
            assert max(counts) - min(counts) <= 1, (turn, counts)
            if turn == 1:
                waiting_at[1] = {c.id for c in setup.connections if not c.records}
                send_reply("middle")
                hub.deliver([m2, m3])  # fanned out in the next pass, behind the waiting
            elif turn == 2:
                # m2 and m3 are queued by now: a reply sent now comes after them.
                waiting_at[2] = {c.id for c in setup.connections
                                 if frames_of(m3) not in c.received()}
                send_reply("after")

        turns = await turn_by_turn(setup, between)
        assert turns > 3
        assert 0 < len(waiting_at[1]) < 100 and 0 < len(waiting_at[2]) < 100, waiting_at
        for c in setup.connections:
            c.read()
            before, middle, after = reply(c, "before"), reply(c, "middle"), reply(c, "after")
            # Everything, once, in order.
            assert c.received() == before + frames_of(m1) + middle + frames_of(m2, m3) + after, c.id
            assert len(c.records) <= 2, (c.id, c.records)
            if c.id in waiting_at[1]:
                # Still waiting when m2 and m3 came: one write carried all of it.
                assert c.records[0].startswith(before + frames_of(m1) + middle + frames_of(m2, m3))
            else:
                assert c.records[0] == before + frames_of(m1)
            if c.id in waiting_at[2]:
                assert c.records[-1].endswith(frames_of(m3) + after)
            else:
                assert c.records[-1] == after
    finally:
        setup.close()


async def test_a_new_fan_out_queues_behind_outboxes_still_waiting(io_loop):
    """The loop is idle at the first look of each pass and busy after: a new
    fan-out must not go straight out to connections already written (leaving
    others two messages behind); it waits its turn behind the rest."""
    setup = Setup(100, kind=socket.SOCK_SEQPACKET)
    try:
        flusher, hub = setup.flusher, setup.hub
        looked = []

        def has_work() -> bool:
            looked.append(True)
            return len(looked) > 1  # idle at the first look of each pass

        flusher._loop_has_work = has_work
        m1, m2 = message("news", 1), message("news", 2)
        hub.deliver([m1])
        waiting_for_m1 = set()

        def between(turn: int) -> None:
            looked.clear()
            setup.read_all()
            counts = [len(c.records) for c in setup.connections]
            assert max(counts) - min(counts) <= 1, (turn, counts)
            if turn == 1:
                waiting_for_m1.update(c.id for c in setup.connections if not c.records)
                hub.deliver([m2])

        turns = await turn_by_turn(setup, between)
        assert turns >= 3 and 0 < len(waiting_for_m1) < 100
        for c in setup.connections:
            c.read()
            assert c.received() == frames_of(m1, m2), c.id
            if c.id in waiting_for_m1:
                assert c.records == [frames_of(m1, m2)], c.id
            else:
                assert c.records == [frames_of(m1), frames_of(m2)], c.id
    finally:
        setup.close()


async def test_on_an_idle_loop_a_fan_out_is_written_in_one_pass(io_loop):
    """The real probe, a zero slice and nothing else for the loop to do: the
    pass does not stop early, so one flush_all writes every outbox."""
    setup = Setup(200)
    try:
        flusher = setup.flusher
        passes = []
        flush_all = flusher.flush_all

        def counted_flush_all() -> None:
            flush_all()
            passes.append((len(flusher._waiting), flusher._scheduled, flusher._behind))

        flusher.flush_all = counted_flush_all  # what schedule() queues
        batch = [message("news", seq) for seq in (1, 2)]
        setup.hub.deliver(batch)  # queues the pass; the test then waits on a timer only
        assert flusher._loop_has_work.__name__ == "has_work"  # the real probe, not forced
        await asyncio.sleep(0.05)
        assert passes == [(0, False, False)]
        expected = frames_of(*batch)
        for connection in setup.connections:
            connection.read()
            assert connection.received() == expected, connection.id
    finally:
        setup.close()


async def test_sliced_fan_out_through_the_server_reaches_every_subscriber_once_in_order(
        services, port, ws):
    flusher = services.flusher
    flusher.slice_seconds = 0
    waiting_seen = []

    def busy() -> bool:
        waiting_seen.append(len(flusher._waiting))
        return True

    flusher._loop_has_work = busy

    async def subscriber(index: int):
        client = await ws(token(f"sub{index}", topics=["news.>"]))
        await client.send({"type": "subscribe", "topic": "news.sliced"})
        await client.expect("subscribed")
        return client

    subscribers = await asyncio.gather(*(subscriber(i) for i in range(100)))
    publisher = await ws(token("pub", topics=[], publish=["news.>"]))

    async def over_http(count: int):
        for round_ in range(count):
            status, body = await api(port, "POST", "/api/publish",
                                     {"topic": "news.sliced", "data": {"http": round_}})
            assert status == 200, body

    async def over_websocket(count: int):
        for n in range(count):
            await publisher.send({"type": "publish", "topic": "news.sliced",
                                  "data": {"ws": n}, "ref": n})
        for n in range(count):
            assert (await publisher.expect("published"))["ref"] == n

    await asyncio.gather(over_http(15), over_http(15), over_websocket(30))
    total = 60

    async def read(client) -> list[int]:
        seqs = []
        while len(seqs) < total:
            frame = await client.expect("message")
            assert frame["topic"] == "news.sliced"
            seqs.append(frame["seq"])
        await client.nothing(0.2)
        return seqs

    results = await asyncio.gather(*(read(client) for client in subscribers))
    for seqs in results:
        assert seqs == list(range(1, total + 1))
    # The fan-outs were sliced: passes ended with outboxes still waiting.
    assert waiting_seen and max(waiting_seen) > 0, waiting_seen


async def test_after_the_handshake_the_handler_keeps_no_token(services, ws):
    jwt = token("alice")
    in_query = await ws(jwt)
    in_header = await ws(None, headers={"Authorization": f"Bearer {jwt}"})
    handlers = [session.transport for session in services.hub.peers]
    assert len(handlers) == 2
    for handler in handlers:
        headers = handler.request.headers
        assert "Authorization" not in headers
        assert list(headers.get_all()) == []
        assert handler.request.query_arguments == {} and handler.request.arguments == {}
        assert handler.get_query_argument("token", None) is None
        assert handler.request.query == "" and "token" not in handler.request.uri
        assert handler.ui is None
        assert handler.identity is None  # the session holds it; the token string is not kept
    # The connections work as before.
    for client in (in_query, in_header):
        await client.send({"type": "ping", "ref": "p"})
        assert (await client.expect("pong"))["ref"] == "p"

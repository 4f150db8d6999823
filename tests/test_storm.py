"""Many connections at once (a reconnect storm): each still gets welcome,
then its replay, then live messages, with no gap and nothing twice; a
publish made during the burst reaches every subscriber; the turnstile lets
a few handshakes through per loop turn, in order, with other work between."""

from __future__ import annotations

import asyncio

import pytest

from notifier.admission import Turnstile
from support import api, connect, events, lines, token, until, upgrade_request

BURST = 150


async def open_raw(port: int, user: str):
    """A client that has only sent its handshake: frames are read later."""
    return await connect(port, token(user, topics=["storm.>"]), welcome=False)


async def test_welcome_replay_then_live_in_order_for_a_burst_of_connections(port):
    users = [f"u{n}" for n in range(BURST)]
    status, _ = await api(port, "POST", "/api/publish/batch", {"messages": [
        {"user": user, "data": {"queued": q}} for user in users for q in range(3)]})
    assert status == 200
    connecting = [asyncio.ensure_future(open_raw(port, user)) for user in users]
    # Live messages to the same personal topics while the burst is set up.
    live = asyncio.ensure_future(api(port, "POST", "/api/publish/batch", {"messages": [
        {"user": user, "data": {"live": True}} for user in users]}))
    clients = await asyncio.gather(*connecting)
    assert (await live)[0] == 200
    for user, client in zip(users, clients):
        welcome = await client.expect("welcome")
        assert welcome["user"] == user
        subscribed = await client.expect("subscribed")
        assert subscribed["topic"] == f"user:{user}"
        seqs = []
        while len(seqs) < 4:
            frame = await client.recv()
            assert frame["type"] == "message", frame
            seqs.append(frame["seq"])
        assert seqs == [1, 2, 3, 4]  # replayed 1..3, then the live one, once
        await client.nothing(0.01)
    for client in clients:
        client.close()


async def test_a_publish_during_a_connect_burst_reaches_every_subscriber(port):
    watchers = []
    for n in range(40):
        client = await connect(port, token(f"w{n}", topics=["storm.>"]))
        await client.send({"type": "subscribe", "topic": "storm.news"})
        await client.expect("subscribed")
        watchers.append(client)
    burst = [asyncio.ensure_future(connect(port, token(f"b{n}"))) for n in range(BURST)]
    published = []
    for n in range(20):
        status, body = await api(port, "POST", "/api/publish", {"topic": "storm.news", "data": n})
        assert status == 200
        published.append(body["seq"])
        await asyncio.sleep(0.005)
    newcomers = await asyncio.gather(*burst)
    for client in watchers:
        seqs = [(await client.expect("message"))["seq"] for _ in published]
        assert seqs == published
        await client.nothing(0.01)
    for client in watchers + newcomers:
        client.close()


# The turnstile itself


async def test_the_turnstile_lets_a_few_through_per_turn_in_order_with_other_work_between():
    turnstile = Turnstile(per_turn=2, per_idle_turn=100)  # busy() is true by default
    events: list[str] = []

    async def handshake(name: str) -> None:
        wait = turnstile.enter()
        if wait is not None:
            await wait
        events.append(name)

    async def other_work() -> None:
        for n in range(3):
            events.append(f"other{n}")
            await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(handshake(f"h{n}")) for n in range(6)]
    tasks.append(asyncio.ensure_future(other_work()))
    await asyncio.gather(*tasks)
    handshakes = [event for event in events if event.startswith("h")]
    assert handshakes == [f"h{n}" for n in range(6)]  # arrival order
    # Two go in the first turn; the rest wait, and other work runs between them.
    assert events.index("other1") < events.index("h4")
    first_turn = events[:events.index("other0")]
    assert first_turn == ["h0", "h1"]


async def test_a_client_gone_while_waiting_does_not_use_a_turn():
    turnstile = Turnstile(per_turn=1, per_idle_turn=100)
    assert turnstile.enter() is None
    gone, kept = turnstile.enter(), turnstile.enter()
    gone.cancel()
    await asyncio.wait_for(kept, 1)
    assert not turnstile._waiting


async def test_a_handshake_whose_client_left_while_it_waited_is_not_set_up(port, services, captured):
    turnstile = services.turnstile
    turnstile.per_turn = turnstile.per_idle_turn = turnstile._allowed = 0  # nothing passes for now
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(port, token("leaver")))
    await until(lambda: turnstile.waiting)
    assert turnstile.waiting == 1
    writer.close()
    # It is answered (499, nobody to read it) as soon as its client is gone,
    # without waiting for its turn...
    await until(lambda: any(line.get("path") == "/ws" for line in lines(captured)))
    access = [line for line in lines(captured) if line.get("path") == "/ws"]
    assert [line["status"] for line in access] == [499]
    # ... and its turn, when it comes, sets nothing up.
    turnstile.per_turn = turnstile.per_idle_turn = 4
    turnstile.enter()  # a handshake arriving now: it brings the next turn
    await asyncio.sleep(0.05)
    assert not turnstile._waiting
    assert events(captured, "connection.open") == []
    assert services.admission.connecting == 0
    assert [line["event"] for line in lines(captured) if line["level"] in ("warning", "error")] == ["http.request"]


async def test_with_nothing_else_under_way_the_turnstile_lets_more_through():
    busy = {"now": False}
    turnstile = Turnstile(per_turn=1, per_idle_turn=5, busy=lambda: busy["now"])
    assert turnstile.enter() is None  # the first turn allows per_turn
    waits = [turnstile.enter() for _ in range(12)]
    await asyncio.sleep(0)  # next turn: idle, five go
    assert sum(wait.done() for wait in waits) == 5
    busy["now"] = True
    await asyncio.sleep(0)  # busy: one more
    assert sum(wait.done() for wait in waits) == 6


@pytest.fixture
def config(config):
    config.limits.connections_per_user = 0
    return config

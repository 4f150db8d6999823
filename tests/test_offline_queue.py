"""SPEC "Delivery guarantees": the offline queue on ``user:<id>``, cursors on
other topics, and gap-free resume while live publishes keep arriving."""

from __future__ import annotations

import asyncio
import time

from support import api, token


async def publish(port: int, **body) -> dict:
    status, answer = await api(port, "POST", "/api/publish", body)
    assert status == 200, answer
    return answer


async def publish_many(port: int, topic: str, count: int) -> None:
    for offset in range(0, count, 1000):
        items = [{"topic": topic, "data": {"n": n}} for n in range(offset + 1, min(offset + 1000, count) + 1)]
        status, body = await api(port, "POST", "/api/publish/batch", {"messages": items})
        assert status == 200, body


async def head_of(port: int, topic: str) -> int:
    status, body = await api(port, "GET", f"/api/topics/{topic}/messages?limit=1")
    assert status == 200, body
    return body["head"]


async def messages(client, count: int) -> list[dict]:
    return [await client.expect("message") for _ in range(count)]


async def hang_up(port: int, client, user: str) -> None:
    """Close normally, wait for the close handshake, and for the server to
    have forgotten the connection."""
    client.connection.close(1000)
    assert await client.closed() == 1000  # the server echoed the close: handshake done
    deadline = time.monotonic() + 3
    while True:
        status, body = await api(port, "GET", f"/api/topics/user:{user}/presence")
        if body["connections"] == 0:
            return
        assert time.monotonic() < deadline, body
        await asyncio.sleep(0.02)


async def test_offline_queue_replays_in_order_then_resumes_after_the_ack(port, ws):
    sent = [await publish(port, user="carol", data={"note": n, "text": f"hello {n}"}, event="note")
            for n in range(1, 21)]
    assert [s["seq"] for s in sent] == list(range(1, 21))

    carol = await ws(token("carol", topics=[]), welcome=False)
    welcome = await carol.expect("welcome")
    assert welcome["user"] == "carol"
    subscribed = await carol.expect("subscribed")
    assert subscribed["topic"] == "user:carol" and subscribed["seq"] == 20
    assert subscribed["recovered"] is True and "ref" not in subscribed
    got = await messages(carol, 20)
    assert [m["seq"] for m in got] == list(range(1, 21))
    assert [m["topic"] for m in got] == ["user:carol"] * 20
    assert [m["data"] for m in got] == [{"note": n, "text": f"hello {n}"} for n in range(1, 21)]
    assert [m["id"] for m in got] == [s["id"] for s in sent]
    assert [m["time"] for m in got] == [s["time"] for s in sent]
    assert all(m["event"] == "note" for m in got)
    await carol.nothing()

    await carol.send({"type": "ack", "topic": "user:carol", "seq": 12})
    await carol.send({"type": "ack", "topic": "user:carol", "seq": 5})  # older: ignored
    # No ping: an ack is stored by the time the connection closes normally.
    await hang_up(port, carol, "carol")

    later = [await publish(port, user="carol", data={"note": n}) for n in range(21, 24)]
    assert [s["seq"] for s in later] == [21, 22, 23]

    carol = await ws(token("carol", topics=[]), welcome=False)
    await carol.expect("welcome")
    subscribed = await carol.expect("subscribed")
    assert subscribed["seq"] == 23 and subscribed["recovered"] is True
    got = await messages(carol, 11)
    assert [m["seq"] for m in got] == list(range(13, 24))
    assert [m["data"] for m in got] == [{"note": n, "text": f"hello {n}"} for n in range(13, 21)] + [
        {"note": n} for n in range(21, 24)]
    await carol.nothing(0.5)
    # Live messages follow the replay on the same subscription.
    live = await publish(port, user="carol", data="live")
    message = await carol.expect("message")
    assert (message["seq"], message["id"], message["data"]) == (24, live["id"], "live")
    await carol.nothing()


async def test_offline_queue_without_ack_replays_everything_again(port, ws):
    for n in range(1, 4):
        await publish(port, user="gina", data=n)
    gina = await ws(token("gina", topics=[]))
    assert [m["seq"] for m in await messages(gina, 3)] == [1, 2, 3]
    await hang_up(port, gina, "gina")
    gina = await ws(token("gina", topics=[]))
    assert [m["data"] for m in await messages(gina, 3)] == [1, 2, 3]
    await gina.nothing()


async def test_resume_with_since_is_gap_free_while_live_publishes_arrive(port, ws):
    prefilled = 3000
    await publish_many(port, "feed", prefilled)
    stop = asyncio.Event()
    published = []

    async def publisher():
        n = 0
        while not stop.is_set():
            n += 1
            if n % 3:
                answer = await publish(port, topic="feed", data={"live": n})
                published.append(answer["seq"])
            else:
                items = [{"topic": "feed", "data": {"live": n, "part": part}} for part in range(3)]
                status, body = await api(port, "POST", "/api/publish/batch", {"messages": items})
                assert status == 200, body
                published.extend(r["seq"] for r in body["results"])

    task = asyncio.ensure_future(publisher())
    try:
        while len(published) < 5:  # live publishes are flowing before the subscribe
            await asyncio.sleep(0.005)
        full = await ws(token("reader", topics=["feed"]))
        middle = await ws(token("reader2", topics=["feed"]))
        await full.send({"type": "subscribe", "topic": "feed", "since": 0, "ref": "a"})
        await middle.send({"type": "subscribe", "topic": "feed", "since": 1500, "ref": "b"})
        received = {full: [], middle: []}
        for client, ref in ((full, "a"), (middle, "b")):
            subscribed = await client.expect("subscribed")
            assert subscribed["ref"] == ref and subscribed["recovered"] is True
            assert subscribed["seq"] > prefilled
        # Read until each has seen a fair number of messages published after its subscribe.
        for client in (full, middle):
            seqs = received[client]
            while len([s for s in seqs if s > prefilled]) < 40:
                message = await client.expect("message")
                seqs.append(message["seq"])
    finally:
        stop.set()
        await task
    final = await head_of(port, "feed")
    assert final == max(published) > prefilled + 40
    for client, first in ((full, 1), (middle, 1501)):
        seqs = received[client]
        while seqs[-1] < final:
            message = await client.expect("message")
            seqs.append(message["seq"])
        assert seqs == list(range(first, final + 1))
        await client.nothing()


async def test_other_acked_topic_resumes_from_the_cursor_without_since(port, ws):
    await publish_many(port, "news.a", 5)
    await publish_many(port, "news.b", 3)
    dave = await ws(token("dave", topics=["news.>"]))
    await dave.send({"type": "subscribe", "topic": "news.a", "since": 0})
    await dave.expect("subscribed")
    assert [m["seq"] for m in await messages(dave, 5)] == [1, 2, 3, 4, 5]
    await dave.send({"type": "ack", "topic": "news.a", "seq": 3})
    await dave.send({"type": "ping", "ref": 1})
    assert (await dave.expect("pong"))["ref"] == 1
    await hang_up(port, dave, "dave")
    await publish(port, topic="news.a", data={"n": 6})
    await publish(port, topic="news.a", data={"n": 7})

    dave = await ws(token("dave", topics=["news.>"]))
    await dave.nothing()  # only user:dave is subscribed automatically
    await dave.send({"type": "subscribe", "topic": "news.a", "ref": "resume"})
    subscribed = await dave.expect("subscribed")
    assert subscribed["ref"] == "resume" and subscribed["seq"] == 7 and subscribed["recovered"] is True
    got = await messages(dave, 4)
    assert [(m["seq"], m["data"]) for m in got] == [(n, {"n": n}) for n in range(4, 8)]
    await dave.nothing()

    # A topic never acked, subscribed without since: live messages only.
    await dave.send({"type": "subscribe", "topic": "news.b"})
    subscribed = await dave.expect("subscribed")
    assert subscribed["seq"] == 3 and subscribed["recovered"] is True
    await dave.nothing()
    await publish(port, topic="news.b", data="fresh")
    message = await dave.expect("message")
    assert (message["topic"], message["seq"], message["data"]) == ("news.b", 4, "fresh")


async def test_cursor_is_per_user(port, ws):
    await publish_many(port, "news.a", 4)
    dave = await ws(token("dave", topics=["news.>"]))
    await dave.send({"type": "ack", "topic": "news.a", "seq": 4})
    await dave.send({"type": "ping"})
    await dave.expect("pong")
    erin = await ws(token("erin", topics=["news.>"]))
    await erin.send({"type": "subscribe", "topic": "news.a"})
    assert (await erin.expect("subscribed"))["seq"] == 4
    await erin.nothing()  # erin has no cursor: live only, dave's ack is not hers


async def test_two_connections_of_a_user_both_get_personal_messages(port, ws):
    first = await ws(token("erin", topics=[]))
    second = await ws(token("erin", topics=[]))
    other = await ws(token("frank", topics=[]))
    sent = [await publish(port, user="erin", data={"n": n}) for n in range(1, 4)]
    for client in (first, second):
        got = await messages(client, 3)
        assert [(m["seq"], m["id"], m["data"]) for m in got] == [
            (s["seq"], s["id"], {"n": n}) for n, s in enumerate(sent, 1)]
        await client.nothing()
    await other.nothing()
    # A third connection, with no cursor stored, replays the queue from the oldest.
    third = await ws(token("erin", topics=[]))
    assert [m["seq"] for m in await messages(third, 3)] == [1, 2, 3]
    await third.nothing()

"""Fan-out correctness (not speed): shared frames are valid for a client
nobody here wrote, bursts arrive complete and in order, and one stalled
reader is cut off with 4009 without holding memory or slowing the others."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import quote

import orjson
import websockets.asyncio.client

from notifier import internals

from support import api, connect, token, upgrade_request

SUBSCRIBERS = 20


async def _websockets_client(port: int, user: str, topic: str):
    """A `websockets` library client: strict RFC 6455 parsing, UTF-8 checks."""
    url = f"ws://127.0.0.1:{port}/ws?token={quote(token(user, topics=['fan.>']))}"
    client = await websockets.asyncio.client.connect(url, compression=None, max_size=None)
    assert orjson.loads(await client.recv())["type"] == "welcome"
    assert orjson.loads(await client.recv())["type"] == "subscribed"
    await client.send(orjson.dumps({"type": "subscribe", "topic": topic}).decode())
    assert orjson.loads(await client.recv())["type"] == "subscribed"
    return client


async def _read_seqs(client, count: int) -> list[tuple[int, object]]:
    received = []
    while len(received) < count:
        frame = orjson.loads(await asyncio.wait_for(client.recv(), 10))
        assert frame["type"] == "message", frame
        received.append((frame["seq"], frame["data"]))
    return received


async def test_bursts_reach_every_subscriber_once_in_order_as_valid_frames(config, port):
    clients = [await _websockets_client(port, f"u{i}", "fan.burst") for i in range(SUBSCRIBERS)]
    publisher = await connect(port, token("pub", topics=[], publish=["fan.>"]))
    # Many publishes in flight at once, from both paths, with payloads that
    # cross the 126- and 65536-byte frame-length boundaries and non-ASCII text.
    config.limits.max_message_bytes = 128 * 1024
    sizes = [1, 125, 126, 4000, 65535, 70000]
    total = 0

    async def http_batches():
        nonlocal total
        for round_ in range(5):
            batch = [{"topic": "fan.burst", "data": {"r": round_, "s": "é" * (sizes[i % 6] // 2)}}
                     for i in range(40)]
            status, body = await api(port, "POST", "/api/publish/batch", {"messages": batch})
            assert status == 200, body
            total += len(batch)

    async def ws_publishes():
        nonlocal total
        for n in range(100):
            await publisher.send({"type": "publish", "topic": "fan.burst", "data": {"n": n}, "ref": n})
        for _ in range(100):
            await publisher.expect("published")
        total += 100

    await asyncio.gather(http_batches(), ws_publishes())
    assert total == 300
    results = await asyncio.gather(*(_read_seqs(client, total) for client in clients))
    expected = [seq for seq, _ in results[0]]
    assert expected == list(range(1, total + 1))
    for received in results:
        assert received == results[0]  # same messages, same order, once each
    for client in clients:
        await client.close()
    publisher.close()


async def _stalled_socket(port: int) -> socket.socket:
    """Completes the WebSocket handshake, then never reads again. (The server
    runs on this same loop, so every socket call here goes through it.)"""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    jwt = token("stalled", topics=["fan.>"])
    await loop.sock_sendall(sock, upgrade_request(port, jwt))
    assert (await loop.sock_recv(sock, 12)) == b"HTTP/1.1 101"
    subscribe = orjson.dumps({"type": "subscribe", "topic": "fan.slow"})
    mask = b"\x00\x00\x00\x00"  # a zero mask leaves the payload as is
    await loop.sock_sendall(sock, bytes((0x81, 0x80 | len(subscribe))) + mask + subscribe)
    return sock


async def test_stalled_reader_is_cut_off_with_memory_bounded_and_others_keep_pace(port, services):
    limit = services.config.limits.max_buffered_bytes
    stalled = await _stalled_socket(port)
    reader = await connect(port, token("reader", topics=["fan.>"]))
    await reader.send({"type": "subscribe", "topic": "fan.slow"})
    await reader.expect("subscribed")
    deadline = time.monotonic() + 5
    while services.hub.presence("fan.slow")[1] < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert services.hub.presence("fan.slow")[1] == 2

    chunk = "x" * 4000
    batches, per_batch = 40, 100  # ~16 MB to each subscriber, 16x the buffer limit
    most_buffered = 0
    received = 0
    for round_ in range(batches):
        status, body = await api(port, "POST", "/api/publish/batch",
                                 {"messages": [{"topic": "fan.slow", "data": chunk}] * per_batch})
        assert status == 200, body
        # Whatever the server holds for anyone, at any moment, stays under the cap.
        for session in list(services.hub.peers):
            handler = session.transport
            stream = handler.ws_connection.stream if handler.ws_connection else None
            if stream is not None and not stream.closed():
                most_buffered = max(most_buffered, len(internals.unsent_bytes(stream)))
        # The healthy reader keeps up between batches: the stall costs it nothing.
        for _ in range(per_batch):
            frame = await reader.recv()
            assert frame["seq"] == received + 1
            received += 1
    assert received == batches * per_batch
    assert most_buffered <= limit + 64, most_buffered
    assert services.metrics.slow_consumers._value.get() == 1
    assert services.hub.presence("fan.slow") == (["reader"], 1)
    reader.close()
    stalled.close()
    # Resuming with since is how the cut-off client catches up: nothing lost.
    status, body = await api(port, "GET", "/api/topics/fan.slow/messages?since=3900&limit=1000")
    assert status == 200 and [m["seq"] for m in body["messages"]] == list(range(3901, 4001))


async def test_pipelined_socket_publishes_keep_order_and_share_commits(port, services):
    publisher = await connect(port, token("pub", topics=[], publish=["fan.>"]))
    commits_before = services.metrics.commit_size._sum.get()  # jobs committed so far
    groups_before = sum(b.get() for b in services.metrics.commit_size._buckets)
    for n in range(50):
        await publisher.send({"type": "publish", "topic": "fan.pipe", "data": n, "ref": n})
    await publisher.send({"type": "ping", "ref": "after"})
    replies = [await publisher.expect("published") for _ in range(50)]
    assert [(r["ref"], r["seq"]) for r in replies] == [(n, n + 1) for n in range(50)]
    assert (await publisher.expect("pong"))["ref"] == "after"
    jobs = services.metrics.commit_size._sum.get() - commits_before
    groups = sum(b.get() for b in services.metrics.commit_size._buckets) - groups_before
    assert jobs == 50
    assert groups < 25, f"50 pipelined publishes took {groups} commits"
    publisher.close()


async def test_compression_when_configured_is_per_connection(config, port):
    config.server.compression = True
    url = f"ws://127.0.0.1:{port}/ws?token={quote(token('zip', topics=['fan.>']))}"
    deflating = await websockets.asyncio.client.connect(url, compression="deflate")
    plain = await websockets.asyncio.client.connect(url, compression=None)
    assert [type(e).__name__ for e in deflating.protocol.extensions] == ["PerMessageDeflate"]
    assert plain.protocol.extensions == []
    for client in (deflating, plain):
        assert orjson.loads(await client.recv())["type"] == "welcome"
        assert orjson.loads(await client.recv())["type"] == "subscribed"
        await client.send(orjson.dumps({"type": "subscribe", "topic": "fan.zip"}).decode())
        assert orjson.loads(await client.recv())["type"] == "subscribed"
    batch = [{"topic": "fan.zip", "data": {"n": n, "text": "compressible " * 50}} for n in range(30)]
    status, body = await api(port, "POST", "/api/publish/batch", {"messages": batch})
    assert status == 200, body
    for client in (deflating, plain):
        received = await _read_seqs(client, 30)
        assert received == [(n + 1, {"n": n, "text": "compressible " * 50}) for n in range(30)]
        await client.close()

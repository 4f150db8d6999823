"""Per-user, per-connection and per-node limits on WebSocket connections,
each with its config key and a clear answer: 429 or 503 with Retry-After
at the handshake, ``forbidden`` for one subscription too many, a closed
socket for a handshake that takes too long. Counts are released however a
connection ends, so a limit never leaks."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import tornado.httpclient
import tornado.websocket

from procs import ServerProcess
from support import api, connect, token, until, upgrade_request


@pytest.fixture
def two_per_user(config):
    config.limits.connections_per_user = 2
    return config


@pytest.fixture
def two_in_all(config):
    config.limits.max_connections = 2
    return config


@pytest.fixture
def one_connecting(config):
    config.limits.max_connecting = 1
    config.limits.max_buffered_bytes = 64 * 1024
    return config


@pytest.fixture
def three_subscriptions(config):
    config.limits.subscriptions_per_connection = 3
    return config


async def handshake(port: int, jwt: str) -> tornado.httpclient.HTTPResponse:
    """A handshake expected to be refused: the HTTP answer."""
    request = tornado.httpclient.HTTPRequest(f"ws://127.0.0.1:{port}/ws?token={jwt}")
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await tornado.websocket.websocket_connect(request)
    return refused.value.response


def error_of(response) -> dict:
    import orjson
    return orjson.loads(response.body)["error"]


async def test_a_user_over_connections_per_user_gets_429_and_others_are_served(two_per_user, port,
                                                                              services):
    first = await connect(port, token("alice"))
    second = await connect(port, token("alice"))
    refused = await handshake(port, token("alice"))
    assert refused.code == 429 and refused.headers["Retry-After"] == "1"
    assert error_of(refused)["code"] == "rate_limited"
    assert "connections_per_user" in error_of(refused)["message"]
    bob = await connect(port, token("bob"))  # per user, not per node
    first.close()
    await until(lambda: services.admission.per_user.get("alice") == 1)
    again = await connect(port, token("alice"))
    for client in (second, bob, again):
        client.close()
    await until(lambda: services.admission.open == 0)
    assert services.admission.per_user == {} and services.admission.connecting == 0


async def test_a_node_at_max_connections_answers_503_with_retry_after(two_in_all, port, services):
    clients = [await connect(port, token(name)) for name in ("alice", "bob")]
    refused = await handshake(port, token("carol"))
    assert refused.code == 503 and refused.headers["Retry-After"] == "1"
    assert error_of(refused)["code"] == "unavailable"
    clients[0].close()
    await until(lambda: services.admission.open == 1)
    carol = await connect(port, token("carol"))
    carol.close()
    clients[1].close()


async def test_connections_still_setting_up_are_capped(one_connecting, port, services):
    # Alice's offline queue is far more than her socket takes while she does
    # not read: her setup (the replay) is still running.
    for _ in range(6):
        status, _ = await api(port, "POST", "/api/publish/batch",
                              {"messages": [{"user": "alice", "data": "x" * 900}] * 1000})
        assert status == 200
    stalled = await _stalled_handshake(port, token("alice"))
    try:
        await until(lambda: services.admission.connecting == 1)
        refused = await handshake(port, token("bob"))
        assert refused.code == 503 and refused.headers["Retry-After"] == "1"
        assert "set up" in error_of(refused)["message"]
    finally:
        stalled.close()
    await until(lambda: services.admission.connecting == 0 and services.admission.open == 0)
    bob = await connect(port, token("bob"))
    bob.close()


async def test_a_refused_origin_and_a_failed_upgrade_release_their_count(config, port, services):
    config.server.allowed_origins = ["https://app.example.com"]
    request = tornado.httpclient.HTTPRequest(
        f"ws://127.0.0.1:{port}/ws?token={token('alice')}",
        headers={"Origin": "https://evil.example.com"})
    client = await tornado.websocket.websocket_connect(request)
    assert await client.read_message() is None and client.close_code == 4003
    client.close()
    # A handshake Tornado refuses after the token was accepted (bad version).
    status, _ = await _raw_upgrade(port, token("alice"), version="5")
    assert status == 426
    await until(lambda: services.admission.open == 0)
    assert services.admission.per_user == {} and services.admission.connecting == 0


async def test_one_subscription_too_many_is_forbidden(three_subscriptions, port):
    client = await connect(port, token("alice", topics=["news.>"]))  # user:alice is one
    for topic in ("news.a", "news.b"):
        await client.send({"type": "subscribe", "topic": topic})
        await client.expect("subscribed")
    await client.send({"type": "subscribe", "topic": "news.c", "ref": "c"})
    error = await client.expect("error")
    assert (error["code"], error["ref"]) == ("forbidden", "c")
    assert "subscriptions_per_connection" in error["message"]
    # Subscribing again to one held is a replacement, not one more.
    await client.send({"type": "subscribe", "topic": "news.a", "ref": "again"})
    assert (await client.expect("subscribed"))["ref"] == "again"
    await client.send({"type": "unsubscribe", "topic": "news.b"})
    await client.expect("unsubscribed")
    await client.send({"type": "subscribe", "topic": "news.c", "ref": "now"})
    assert (await client.expect("subscribed"))["ref"] == "now"
    client.close()


@pytest.mark.slow
def test_a_handshake_slower_than_handshake_timeout_is_cut_off(tmp_path):
    with ServerProcess(tmp_path, env={"NOTIFIER_LIMITS_HANDSHAKE_TIMEOUT": "1s"}) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            slow.sendall(b"GET /ws?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            slow.settimeout(5)
            started = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server
            assert 0.5 < time.monotonic() - started < 4
        # The service goes on.
        assert server.request("GET", "/healthz")[0] == 200


async def _stalled_handshake(port: int, jwt: str) -> socket.socket:
    """A completed handshake on a socket that then reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(port, jwt, "13"))
    return sock


async def _raw_upgrade(port: int, jwt: str, version: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(port, jwt, version))
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1]), status_line

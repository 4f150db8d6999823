"""Helpers for tests: tokens, a JSON WebSocket client, and an HTTP API caller,
all talking to a real server over loopback."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from urllib.parse import quote

import orjson
import tornado.httpclient
import tornado.websocket

from notifier.auth import mint_token

SECRET = "test-secret-" + "x" * 32
API_KEY = "test-api-key"
RECEIVE_TIMEOUT = 5.0


def token(user: str = "alice", topics=("news.>",), publish=(), ttl: float = 3600,
          secret: str = SECRET, **extra) -> str:
    return mint_token(secret, "HS256", user, list(topics), list(publish), ttl, **extra)


class Client:
    """A real WebSocket client that sends and receives JSON objects."""

    def __init__(self, connection: tornado.websocket.WebSocketClientConnection):
        self.connection = connection

    async def send(self, body) -> None:
        text = body if isinstance(body, str) else orjson.dumps(body).decode()
        await self.connection.write_message(text)

    async def recv(self, timeout: float = RECEIVE_TIMEOUT) -> dict | None:
        """The next frame as a dict, or None when the server closed."""
        frame = await asyncio.wait_for(self.connection.read_message(), timeout)
        return None if frame is None else orjson.loads(frame)

    async def expect(self, kind: str, timeout: float = RECEIVE_TIMEOUT) -> dict:
        frame = await self.recv(timeout)
        assert frame is not None, f"closed ({self.close_code}) while waiting for {kind}"
        assert frame["type"] == kind, frame
        return frame

    async def nothing(self, within: float = 0.3) -> None:
        """Assert no frame arrives within ``within`` seconds."""
        try:
            frame = await asyncio.wait_for(self.connection.read_message(), within)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame!r}")

    async def closed(self, timeout: float = RECEIVE_TIMEOUT) -> int | None:
        """Read until the server closes; return the close code."""
        while True:
            frame = await asyncio.wait_for(self.connection.read_message(), timeout)
            if frame is None:
                return self.close_code

    @property
    def close_code(self) -> int | None:
        return self.connection.close_code

    def close(self) -> None:
        self.connection.close()


async def connect(port: int, jwt: str | None = None, *, welcome: bool = True,
                  headers: dict | None = None, **kwargs) -> Client:
    """Open /ws with ``jwt`` in the query; by default read the welcome and the
    personal topic's ``subscribed`` frame."""
    url = f"ws://127.0.0.1:{port}/ws"
    if jwt is not None:
        url += "?token=" + quote(jwt)
    request = tornado.httpclient.HTTPRequest(url, headers=headers or {})
    client = Client(await tornado.websocket.websocket_connect(request, **kwargs))
    if welcome:
        await client.expect("welcome")
        await client.expect("subscribed")
    return client


async def api(port: int, method: str, path: str, body=None, key: str | None = API_KEY,
              raw: bytes | None = None) -> tuple[int, dict]:
    """Call the HTTP API; returns (status, JSON body) whatever the status."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    payload = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    if method == "POST" and payload is None:
        payload = b""
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(f"http://127.0.0.1:{port}{path}", method=method,
                                  headers=headers, body=payload, raise_error=False)
    text = response.body or b""
    try:
        parsed = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        parsed = {"raw": text.decode(errors="replace")}
    return response.code, parsed


def upgrade_request(port: int, jwt: str, version: str = "13") -> bytes:
    """The bytes of a WebSocket handshake for ``/ws?token=jwt``, for tests
    that drive the socket by hand (a fixed key: nothing here checks it)."""
    return (f"GET /ws?token={quote(jwt)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: {version}\r\n\r\n").encode()


async def until(condition, timeout: float = 5.0) -> None:
    """Until ``condition()`` is true, checked every 10 ms; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("not in time")
        await asyncio.sleep(0.01)


def lines(stream) -> list[dict]:
    """Every line captured from the log (the ``captured`` fixture), each
    parsed as one JSON object."""
    parsed = []
    # Lines end at "\n" only: splitlines() would also cut at the U+2028 or
    # \x1c a logged string may hold (JSON leaves those unescaped).
    for line in stream.getvalue().split("\n")[:-1]:
        value = orjson.loads(line)  # raises if a line is not JSON
        assert isinstance(value, dict), line
        parsed.append(value)
    return parsed


def events(stream, name: str) -> list[dict]:
    """The captured log lines (``lines``) whose event is ``name``."""
    return [line for line in lines(stream) if line.get("event") == name]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def bind_notify_socket(kind: str, directory) -> tuple[socket.socket, str]:
    """A datagram socket standing in for systemd, and its NOTIFY_SOCKET value:
    a filesystem path (``kind="path"``) or an abstract name (``"abstract"``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(directory / "notify.sock")
        sock.bind(address)
    else:
        address = "@notifier-test-" + secrets.token_hex(8)
        sock.bind("\0" + address[1:])
    return sock, address

"""A real browser on ``/ws``: Debian's headless Chromium, driven by
Playwright, opens the socket from a page's JavaScript against the real
server on loopback. What only a browser shows: the Origin it sends on its
own (same-origin page, another origin refused with 4003 or allowed by
``server.allowed_origins``), the token in ``?token=`` (a page cannot set
headers), the ``ping`` command (a page never sees protocol pings), and how
little a page learns of a refused handshake.

Playwright's async API runs in the test's own event loop, next to the
server, so neither blocks the other. Each test launches its own browser
(the loop is new for every test); Playwright's own browser builds are never
used."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from urllib.parse import quote, urlsplit

import jwt
import orjson
import pytest
import tornado.httpclient
import tornado.httpserver
import tornado.testing
import tornado.web

from support import SECRET, api, in_ci, token

try:
    from playwright.async_api import async_playwright
except ImportError:  # reported by the browser fixture: fails in CI, skips elsewhere
    async_playwright = None

CHROMIUM = "/usr/bin/chromium"
EVENT_TIMEOUT = 5.0
LAUNCH_TIMEOUT = 30.0

# Runs in the page: one WebSocket, and everything its handlers see handed to
# Python in order through the exposed function reportSocketEvent.
OPEN_SOCKET = """(url) => {
    const report = (event) => window.reportSocketEvent(event);
    const socket = new WebSocket(url);
    window.socket = socket;
    socket.onopen = () => report({kind: "open"});
    socket.onmessage = (event) => report({kind: "message", frame: JSON.parse(event.data)});
    socket.onerror = () => report({kind: "error"});
    socket.onclose = (event) => report(
        {kind: "close", code: event.code, reason: event.reason, wasClean: event.wasClean});
}"""


def require_browser() -> None:
    """Fail in CI, skip elsewhere, when Chromium or Playwright is missing
    (``make test`` installs both)."""
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (Debian: apt-get install chromium)")
    if async_playwright is None:
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing:
        reason = "browser tests need " + " and ".join(missing) + "; make test installs them"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def browser(io_loop):
    require_browser()
    playwright = io_loop.run_sync(lambda: async_playwright().start(), timeout=LAUNCH_TIMEOUT)
    try:
        # Playwright passes --no-sandbox itself (chromium_sandbox defaults to
        # False), which Chromium needs when run as root, as in CI.
        chromium = io_loop.run_sync(
            lambda: playwright.chromium.launch(executable_path=CHROMIUM, headless=True),
            timeout=LAUNCH_TIMEOUT)
    except BaseException:
        io_loop.run_sync(playwright.stop, timeout=LAUNCH_TIMEOUT)
        raise
    yield chromium
    io_loop.run_sync(chromium.close, timeout=LAUNCH_TIMEOUT)
    io_loop.run_sync(playwright.stop, timeout=LAUNCH_TIMEOUT)


class PlainPage(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish("<!doctype html><title>another origin</title><p>nothing here</p>")


@pytest.fixture
def other_origin(io_loop):
    """A second web server on another loopback port: another origin."""
    sock, port = tornado.testing.bind_unused_port()
    server = tornado.httpserver.HTTPServer(tornado.web.Application([(r"/", PlainPage)]))
    server.add_socket(sock)
    yield f"http://127.0.0.1:{port}"
    server.stop()
    io_loop.run_sync(server.close_all_connections, timeout=LAUNCH_TIMEOUT)


@pytest.fixture
def other_origin_allowed(config, other_origin):
    config.server.allowed_origins = [other_origin]
    return other_origin


class Page:
    """A browser page and, in order, what its JavaScript saw of its socket."""

    def __init__(self, page):
        self.page = page
        self.seen: asyncio.Queue[dict] = asyncio.Queue()

    @classmethod
    async def load(cls, browser, url: str) -> "Page":
        page = await browser.new_page()
        page.set_default_timeout(EVENT_TIMEOUT * 1000)
        self = cls(page)
        await page.expose_function("reportSocketEvent", self.seen.put_nowait)
        response = await page.goto(url)
        assert response is not None and response.ok, f"{url}: {response and response.status}"
        assert await page.evaluate("location.origin") == url_origin(url)
        return self

    async def open_socket(self, url: str) -> None:
        await self.page.evaluate(OPEN_SOCKET, url)

    async def send(self, command: dict) -> None:
        await self.page.evaluate("(text) => window.socket.send(text)",
                                 orjson.dumps(command).decode())

    async def next(self) -> dict:
        try:
            return await asyncio.wait_for(self.seen.get(), EVENT_TIMEOUT)
        except asyncio.TimeoutError:
            raise AssertionError(f"the page saw nothing within {EVENT_TIMEOUT} s") from None

    async def frame(self, kind: str) -> dict:
        event = await self.next()
        assert event["kind"] == "message" and event["frame"]["type"] == kind, event
        return event["frame"]

    async def nothing(self, within: float = 0.3) -> None:
        try:
            event = await asyncio.wait_for(self.seen.get(), within)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"the page saw {event!r}")


def url_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def ws_url(port: int, jwt_token: str) -> str:
    return f"ws://127.0.0.1:{port}/ws?token={quote(jwt_token)}"


async def publish(port: int, body: dict) -> dict:
    status, receipt = await api(port, "POST", "/api/publish", body)
    assert status == 200, receipt
    return receipt


async def welcomed(page: Page, user: str = "alice") -> dict:
    """The start of an accepted connection: open, welcome, the personal topic."""
    assert await page.next() == {"kind": "open"}
    welcome = await page.frame("welcome")
    assert welcome["user"] == user
    personal = await page.frame("subscribed")
    assert personal["topic"] == f"user:{user}" and "ref" not in personal, personal
    return welcome


# Same origin


async def test_same_origin_page_subscribes_and_receives_published_messages(port, browser, config):
    page = await Page.load(browser, f"http://127.0.0.1:{port}/healthz")
    jwt_token = token("alice", topics=["news.>"])
    await page.open_socket(ws_url(port, jwt_token))
    welcome = await welcomed(page)
    assert welcome["heartbeat"] == config.heartbeat.interval
    assert welcome["expires"] == jwt.decode(jwt_token, options={"verify_signature": False})["exp"]

    await page.send({"type": "subscribe", "topic": "news.sport", "ref": 1})
    subscribed = await page.frame("subscribed")
    assert subscribed["topic"] == "news.sport" and subscribed["ref"] == 1
    assert subscribed["seq"] == 0 and subscribed["recovered"] is True

    first = await publish(port, {"topic": "news.sport", "event": "goal", "data": {"score": "1-0"}})
    second = await publish(port, {"topic": "news.sport", "data": [1, "two", None]})
    assert (first["seq"], second["seq"]) == (1, 2)
    message = await page.frame("message")
    assert message == {"type": "message", "topic": "news.sport", "seq": 1, "id": first["id"],
                       "time": first["time"], "event": "goal", "data": {"score": "1-0"}}
    message = await page.frame("message")
    assert (message["seq"], message["id"], message["event"], message["data"]) == (
        2, second["id"], None, [1, "two", None])
    await page.nothing()


async def test_ping_command_gets_pong_in_the_page(port, browser):
    page = await Page.load(browser, f"http://127.0.0.1:{port}/healthz")
    await page.open_socket(ws_url(port, token("alice")))
    await welcomed(page)
    await page.send({"type": "ping", "ref": "page-1"})
    assert await page.frame("pong") == {"type": "pong", "ref": "page-1"}
    await page.send({"type": "ping"})
    assert await page.frame("pong") == {"type": "pong"}


# Another origin


async def test_other_origin_is_closed_with_4003_visible_to_the_page(
        other_origin, config, port, browser):
    assert config.server.allowed_origins == []
    page = await Page.load(browser, other_origin + "/")
    await page.open_socket(ws_url(port, token("alice")))
    # Accepted, then closed at once: the page gets the code and the reason,
    # and never a welcome.
    assert await page.next() == {"kind": "open"}
    assert await page.next() == {"kind": "close", "code": 4003, "reason": "origin not allowed",
                                 "wasClean": True}
    await page.nothing()


async def test_other_origin_listed_in_allowed_origins_connects(other_origin_allowed, port, browser):
    page = await Page.load(browser, other_origin_allowed + "/")
    await page.open_socket(ws_url(port, token("alice")))
    await welcomed(page)
    await page.send({"type": "ping", "ref": 7})
    assert await page.frame("pong") == {"type": "pong", "ref": 7}


# A bad token


async def test_bad_token_page_sees_only_a_failed_connection_while_http_gets_401(port, browser):
    page = await Page.load(browser, f"http://127.0.0.1:{port}/healthz")
    forged = token("alice", secret="another-secret-" + "y" * 32)
    await page.open_socket(ws_url(port, forged))
    # No open, no status, no body: an error, then 1006 with no reason.
    assert await page.next() == {"kind": "error"}
    assert await page.next() == {"kind": "close", "code": 1006, "reason": "", "wasClean": False}
    await page.nothing()

    # The same handshake from Python shows what the browser hid: 401 and JSON.
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/ws?token={quote(forged)}", raise_error=False,
        headers={"Upgrade": "websocket", "Connection": "Upgrade",
                 "Sec-WebSocket-Version": "13",
                 "Sec-WebSocket-Key": base64.b64encode(secrets.token_bytes(16)).decode(),
                 "Origin": f"http://127.0.0.1:{port}"})
    assert response.code == 401
    assert response.headers["Content-Type"].startswith("application/json")
    assert orjson.loads(response.body) == {
        "error": {"code": "unauthorized", "message": "token signature invalid"}}

    # And the right token from the same page connects.
    await page.open_socket(ws_url(port, token("alice", secret=SECRET)))
    await welcomed(page)

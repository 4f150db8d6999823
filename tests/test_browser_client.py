"""The browser client (``/static/notifier.js``) and the demo page at ``/``,
in Debian's headless Chromium driven by Playwright, against a real notifier:
the in-process server on loopback, or ``notifier serve`` as a subprocess
where a test restarts it, stops it dead (SIGSTOP) or needs its heartbeat
timer (token expiry).

Two kinds of page: the demo page itself, read through its DOM; and a bare
same-origin page that imports notifier.js and reports, in order, every
event the client fires and every message it hands to the app (``Harness``).
Pure parts of the module (backoff, positions) are checked in the page too.

Set ``DEMO_SCREENSHOT=docs/demo.png`` to have the screenshot test write the
README's picture; otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
import tornado.httpclient

from procs import ROOT, ServerProcess, base_environment, free_port
from support import api, token, connect
from test_browser import EVENT_TIMEOUT, browser, other_origin  # noqa: F401 (fixtures)

STATIC = ROOT / "notifier" / "static"
SHIPPED = ["notifier.js", "notifier.d.ts", "demo/index.html", "demo/demo.css", "demo/demo.js"]
# Every backoff delay half its window: a reconnect that comes early was not the timer.
HALF_JITTER = "() => { Math.random = () => 0.5; }"
CLIENT_EVENTS = ["connecting", "open", "closed", "subscribed", "unsubscribed", "authenticated",
                 "error"]

# Runs in a page: imports the module, builds a client with the given options
# (getToken asks Python when `tokens` is set), reports every event and every
# message handed over, subscribes, connects.
HARNESS = """async ({module, options, tokens, subscriptions, events}) => {
    const { NotifierClient } = await import(module);
    const report = (event) => window.reportClient({...event, at: performance.now()});
    if (tokens) options.getToken = () => window.nextToken();
    const client = new NotifierClient(options);
    for (const type of events) {
        client.addEventListener(type, ({detail}) => {
            const {error, ...rest} = detail ?? {};
            report({kind: type, ...rest});
        });
    }
    window.client = client;
    window.handed = (message) => report({kind: "message", topic: message.topic, seq: message.seq,
                                         id: message.id, event: message.event, data: message.data});
    for (const [topic, opts] of subscriptions) client.subscribe(topic, window.handed, opts);
    client.connect();
}"""


async def publish(port: int, body: dict) -> dict:
    status, receipt = await api(port, "POST", "/api/publish", body)
    assert status == 200, receipt
    return receipt


async def eventually(check, timeout: float = EVENT_TIMEOUT, every: float = 0.05):
    """Poll an async ``check`` until it returns something true; return it."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: last {result!r}")
        await asyncio.sleep(every)


class Harness:
    """A same-origin page running one NotifierClient, what it reported, and
    (seen by the browser) the frames its sockets sent, one list per socket."""

    def __init__(self, page):
        self.page = page
        self.log: list[dict] = []
        self.changed = asyncio.Event()
        self.tokens_given = 0
        self.sockets: list[list[dict]] = []
        page.on("websocket", self._socket)

    def _socket(self, socket) -> None:
        sent: list[dict] = []
        self.sockets.append(sent)
        socket.on("framesent", lambda payload: sent.append(orjson.loads(payload)))

    def sent(self, kind: str, socket: int = -1) -> list[dict]:
        return [frame for frame in self.sockets[socket] if frame["type"] == kind]

    @classmethod
    async def start(cls, browser_or_context, origin: str, *, options: dict | None = None,
                    subscriptions: list | None = None, get_token=None,
                    before: str | None = None, path: str = "/healthz",
                    module: str = "/static/notifier.js") -> "Harness":
        page = await browser_or_context.new_page()
        page.set_default_timeout(EVENT_TIMEOUT * 1000)
        self = cls(page)
        await page.expose_function("reportClient", self._report)
        if get_token is not None:
            async def next_token():
                self.tokens_given += 1
                result = get_token()
                return await result if asyncio.iscoroutine(result) else result
            await page.expose_function("nextToken", next_token)
        response = await page.goto(origin + path)
        assert response is not None and response.ok
        if before is not None:
            await page.evaluate(before)
        await page.evaluate(HARNESS, {
            "module": module, "options": options or {}, "tokens": get_token is not None,
            "subscriptions": [[topic, opts] for topic, opts in (subscriptions or [])],
            "events": CLIENT_EVENTS,
        })
        return self

    def _report(self, event: dict) -> None:
        self.log.append(event)
        self.changed.set()

    def of(self, kind: str, since: int = 0) -> list[dict]:
        return [event for event in self.log[since:] if event["kind"] == kind]

    def messages(self, topic: str | None = None) -> list[dict]:
        return [m for m in self.of("message") if topic is None or m["topic"] == topic]

    async def wait(self, kind: str, since: int = 0, count: int = 1,
                   timeout: float = EVENT_TIMEOUT, **fields) -> dict:
        """The ``count``-th event of ``kind`` (with these fields) at or after
        index ``since`` of the log."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.of(kind, since)
                     if all(e.get(name) == value for name, value in fields.items())]
            if len(found) >= count:
                return found[count - 1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} {fields} (#{count}) within {timeout} s; "
                                     f"the page reported {self.log[since:]}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def call(self, script: str, arg=None):
        return await self.page.evaluate(script, arg)


def seqs(messages: list[dict]) -> list:
    return [m["seq"] for m in messages]


# Serving the files


async def fetch(port: int, path: str, method: str = "GET"):
    return await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}", method=method, raise_error=False)


async def test_client_module_and_its_types_are_served(port):
    response = await fetch(port, "/static/notifier.js")
    assert response.code == 200
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["Access-Control-Allow-Origin"] == "*"  # importable from other origins
    assert response.body == (STATIC / "notifier.js").read_bytes()
    etag = response.headers["Etag"]
    again = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/static/notifier.js", headers={"If-None-Match": etag},
        raise_error=False)
    assert again.code == 304

    types = await fetch(port, "/static/notifier.d.ts")
    assert types.code == 200 and types.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert types.body == (STATIC / "notifier.d.ts").read_bytes()

    # Only those two: the demo's files are not reachable under /static/.
    for path in ("/static/demo/demo.js", "/static/other.js", "/static/"):
        missing = await fetch(port, path)
        assert missing.code == 404, path
        assert orjson.loads(missing.body)["error"]["code"] == "not_found"


async def test_demo_page_is_served_with_a_strict_policy(port):
    page = await fetch(port, "/")
    assert page.code == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert page.body == (STATIC / "demo" / "index.html").read_bytes()
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert page.headers["Referrer-Policy"] == "no-referrer"
    for name, kind in (("demo.js", "text/javascript"), ("demo.css", "text/css")):
        response = await fetch(port, f"/demo/{name}")
        assert response.code == 200, name
        assert response.headers["Content-Type"] == f"{kind}; charset=utf-8"
        assert "Content-Security-Policy" not in response.headers
        assert "Access-Control-Allow-Origin" not in response.headers
    for path in ("/demo/nothing.js", "/demo/"):
        missing = await fetch(port, path)
        assert missing.code == 404 and orjson.loads(missing.body)["error"]["code"] == "not_found"
    refused = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/", method="POST", body=b"", raise_error=False)
    assert refused.code == 405
    assert orjson.loads(refused.body)["error"]["code"] == "method_not_allowed"


@pytest.fixture
def demo_off(config):
    config.server.demo_page = False


async def test_demo_page_off_leaves_the_usual_404_and_the_client(demo_off, port):
    for path in ("/", "/demo/demo.js", "/demo/demo.css"):
        response = await fetch(port, path)
        assert response.code == 404, path
        assert orjson.loads(response.body) == {
            "error": {"code": "not_found", "message": "no such endpoint"}}
    assert (await fetch(port, "/static/notifier.js")).code == 200


@pytest.mark.slow
def test_built_package_ships_and_serves_the_static_files(tmp_path):
    """What `pip install .` copies: setuptools' build_py, which reads
    package_data, into a folder; a server run from that copy serves them."""
    build = tmp_path / "build"
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "build_py",
         "--build-lib", str(build)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in SHIPPED:
        assert (build / "notifier" / "static" / name).read_bytes() == (STATIC / name).read_bytes()
    env = base_environment()
    env["PYTHONPATH"] = str(build)
    imported = subprocess.run([sys.executable, "-c", "import notifier; print(notifier.__file__)"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == str(build / "notifier" / "__init__.py")
    with ServerProcess(tmp_path, env={"PYTHONPATH": str(build)}) as server:
        for path, name in (("/static/notifier.js", "notifier.js"), ("/", "demo/index.html"),
                           ("/demo/demo.js", "demo/demo.js")):
            status, _ = server.request("GET", path)
            assert status == 200, path


# The module's pure parts, run in the browser


async def test_backoff_is_exponential_capped_and_fully_jittered(port, browser):
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{port}/healthz")
    result = await page.evaluate("""async () => {
        const { backoffDelay } = await import("/static/notifier.js");
        const options = {base: 500, max: 30000};
        const caps = [...Array(9).keys()].map((n) => backoffDelay(n, options, () => 1));
        const lows = [...Array(9).keys()].map((n) => backoffDelay(n, options, () => 0));
        const samples = Array.from({length: 4000}, () => backoffDelay(3, options));
        return {caps, lows, min: Math.min(...samples), max: Math.max(...samples),
                mean: samples.reduce((a, b) => a + b, 0) / samples.length,
                quarters: [0, 1, 2, 3].map((q) => samples.filter(
                    (s) => s >= q * 1000 && s < (q + 1) * 1000).length)};
    }""")
    assert result["caps"] == [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
    assert result["lows"] == [0] * 9
    # Attempt 3: uniform over [0, 4000): the whole window, not a band near the cap.
    assert 0 <= result["min"] < 100 and 3900 < result["max"] < 4000
    assert 1900 < result["mean"] < 2100
    assert all(850 < count < 1150 for count in result["quarters"]), result["quarters"]


async def test_positions_hand_each_seq_once_and_reset_with_the_log(port, browser):
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{port}/healthz")
    steps = await page.evaluate("""async () => {
        const { Positions } = await import("/static/notifier.js");
        const p = new Positions();
        const steps = [];
        const log = (what, value) => steps.push([what, value]);
        log("subscribed A head 3", p.subscribed("t", "A", 3));
        log("accept 1,2,3,2,3,4", [1, 2, 3, 2, 3, 4].map((s) => p.accept("t", s)));
        log("ephemeral twice", [null, null].map((s) => p.accept("t", s)));
        log("position", p.get("t"));
        log("subscribed A again (server restarted it)", p.subscribed("t", "A", 9));
        log("accept 4,5", [4, 5].map((s) => p.accept("t", s)));
        log("subscribed B (new epoch)", p.subscribed("t", "B", 2));
        log("position after reset", p.get("t"));
        log("accept 1,2,1", [1, 2, 1].map((s) => p.accept("t", s)));
        log("subscribed B head 1 (shorter than seen)", p.subscribed("t", "B", 1));
        log("accept 1", p.accept("t", 1));
        p.start("u", 40);
        log("u from 40, no epoch: subscribed C head 50", p.subscribed("u", "C", 50));
        log("u accept 40,41", [40, 41].map((s) => p.accept("u", s)));
        p.start("v", 0, "C");
        log("v live-only settle at 7", (p.subscribed("v", "C", 7), p.settle("v", 7), p.get("v")));
        log("v accept 7,8", [7, 8].map((s) => p.accept("v", s)));
        log("v settle again does not move it", (p.settle("v", 3), p.get("v")));
        return steps;
    }""")
    assert steps == [
        ["subscribed A head 3", False],
        ["accept 1,2,3,2,3,4", [True, True, True, False, False, True]],
        ["ephemeral twice", [True, True]],
        ["position", {"seq": 4, "epoch": "A"}],
        ["subscribed A again (server restarted it)", False],
        ["accept 4,5", [False, True]],
        ["subscribed B (new epoch)", True],
        ["position after reset", {"seq": None, "epoch": "B"}],
        ["accept 1,2,1", [True, True, False]],
        ["subscribed B head 1 (shorter than seen)", True],
        ["accept 1", True],
        ["u from 40, no epoch: subscribed C head 50", False],
        ["u accept 40,41", [False, True]],
        ["v live-only settle at 7", {"seq": 0, "epoch": "C"}],
        ["v accept 7,8", [True, True]],
        ["v settle again does not move it", {"seq": 8, "epoch": "C"}],
    ]


# The client against a real server


def origin(port: int) -> str:
    return f"http://127.0.0.1:{port}"


async def test_reconnect_delays_grow_capped_with_jitter_and_are_kept(port, browser):
    dead = free_port()  # nothing listens: every attempt fails at once
    client = await Harness.start(browser, origin(port), options={
        "url": f"ws://127.0.0.1:{dead}/ws", "token": token("alice"),
        "backoff": {"base": 100, "max": 800}})
    await client.wait("closed", count=7, timeout=15)
    closed = client.of("closed")[:7]
    assert [c["attempt"] for c in closed] == list(range(7))
    caps = [min(800, 100 * 2**n) for n in range(7)]
    assert all(c["reconnect"] is True and 0 <= c["delay"] < cap for c, cap in zip(closed, caps))
    assert any(c["delay"] < 0.9 * cap for c, cap in zip(closed, caps)), closed  # jittered
    # Each next attempt starts when its delay is up, not before.
    connecting = client.of("connecting")
    for shut, following in zip(closed, connecting[1:]):
        waited = following["at"] - shut["at"]
        assert shut["delay"] - 5 <= waited <= shut["delay"] + 1000, (shut, following)


async def test_backoff_starts_over_after_a_stable_connection(port, browser):
    client = await Harness.start(
        browser, origin(port), options={"backoff": {"base": 200, "max": 5000, "stableAfter": 800}},
        get_token=lambda: token("alice"))
    await client.wait("open")
    for count in (1, 2):  # closed before the connection was stable: the window grows
        status, _ = await api(port, "POST", "/api/users/alice/disconnect")
        assert status == 200
        shut = await client.wait("closed", count=count)
        assert (shut["code"], shut["reason"]) == (4001, "disconnected by the server")
        await client.wait("open", count=count + 1, timeout=10)
    assert [c["attempt"] for c in client.of("closed")] == [0, 1]
    await asyncio.sleep(1.2)  # stable now
    await api(port, "POST", "/api/users/alice/disconnect")
    assert (await client.wait("closed", count=3))["attempt"] == 0
    await client.wait("open", count=4, timeout=10)
    # Every 4001 asked getToken for a fresh token.
    assert client.tokens_given == 4


async def test_resume_hands_nothing_twice_when_replays_overlap(port, browser):
    """Without acks the personal topic's own replay starts from the oldest
    message on every connection, and the client's resubscribe from its
    position replays again: the app still sees each message once."""
    client = await Harness.start(
        browser, origin(port), options={"autoAck": False},
        subscriptions=[["user:alice", {}], ["news.sport", {"since": 0}]],
        get_token=lambda: token("alice"))
    await client.wait("open")
    for n in range(3):
        await publish(port, {"user": "alice", "data": n})
        await publish(port, {"topic": "news.sport", "data": n})
    await client.wait("message", count=6)
    since = len(client.log)
    await api(port, "POST", "/api/users/alice/disconnect")
    await client.wait("open", since=since, timeout=10)
    # The server replays user:alice 1-3 (no cursor) and answers both resubscribes.
    await client.wait("subscribed", since=since, count=3, timeout=10)
    await publish(port, {"user": "alice", "data": 3})
    await publish(port, {"topic": "news.sport", "data": 3})
    await client.wait("message", count=8)
    await asyncio.sleep(0.3)
    assert seqs(client.messages("user:alice")) == [1, 2, 3, 4]
    assert seqs(client.messages("news.sport")) == [1, 2, 3, 4]
    assert [m["data"] for m in client.messages()] == [0, 0, 1, 1, 2, 2, 3, 3]
    # What went out: the first socket left the personal topic to the server
    # and asked for news.sport from 0; the second resumed both from seq 3,
    # with the epoch (which today's server does not read yet).
    assert len(client.sockets) == 2
    assert [(f["topic"], f.get("since"), f.get("epoch")) for f in client.sent("subscribe", 0)] == [
        ("news.sport", 0, None)]
    epoch = client.of("subscribed")[0]["epoch"]
    assert [(f["topic"], f.get("since"), f.get("epoch")) for f in client.sent("subscribe", 1)] == [
        ("user:alice", 3, epoch), ("news.sport", 3, epoch)]
    assert client.sent("ack", 0) == [] and client.sent("ack", 1) == []  # autoAck off


async def test_live_only_topic_resumes_from_its_head_after_a_reconnect(port, browser):
    """A topic subscribed without since (no cursor) is live-only; a message
    published while the client is away still arrives once it is back."""
    release = asyncio.Event()
    issued = 0

    async def get_token():
        nonlocal issued
        issued += 1
        if issued > 1:
            await release.wait()  # the reconnect waits here until the test publishes
        return token("alice")

    await publish(port, {"topic": "news.sport", "data": "before"})
    client = await Harness.start(browser, origin(port), subscriptions=[["news.sport", {}]],
                                 get_token=get_token)
    await client.wait("subscribed", topic="news.sport")
    await asyncio.sleep(0.3)  # the settling pong
    await api(port, "POST", "/api/users/alice/disconnect")
    await client.wait("connecting", count=2, timeout=10)
    missed = await publish(port, {"topic": "news.sport", "data": "while away"})
    release.set()
    message = await client.wait("message", topic="news.sport", timeout=10)
    assert (message["seq"], message["id"], message["data"]) == (2, missed["id"], "while away")
    await asyncio.sleep(0.3)
    assert seqs(client.messages()) == [2]


async def test_personal_queue_waits_for_the_app_to_subscribe(port, browser):
    for n in range(5):
        await publish(port, {"user": "alice", "data": n})
    # holdLimit 2: two held, the other three asked for again on subscribe.
    client = await Harness.start(browser, origin(port), options={
        "token": token("alice"), "holdLimit": 2})
    await client.wait("subscribed", topic="user:alice")
    await asyncio.sleep(0.3)
    assert client.messages() == []
    await client.call("() => window.client.subscribe(window.client.personalTopic, window.handed)")
    await client.wait("message", count=5)
    await publish(port, {"user": "alice", "data": 5})
    await client.wait("message", count=6)
    await asyncio.sleep(0.3)
    assert seqs(client.messages()) == [1, 2, 3, 4, 5, 6]


async def test_socket_publish_ephemeral_and_forbidden(port, browser):
    client = await Harness.start(
        browser, origin(port), subscriptions=[["chat.room1", {}]],
        options={"token": token("alice", topics=["chat.>"], publish=["chat.room1"])})
    await client.wait("subscribed", topic="chat.room1")
    stored = await client.call("""() => window.client.publish("chat.room1", {text: "hi"},
                                                             {event: "say"})""")
    assert stored["topic"] == "chat.room1" and stored["seq"] == 1 and len(stored["id"]) == 24
    fleeting = await client.call("""() => window.client.publish("chat.room1", "typing",
                                                               {ephemeral: true})""")
    assert fleeting["seq"] is None
    refused = await client.call("""() => window.client.publish("chat.other", 1).then(
        () => "published", (error) => [error.name, error.code])""")
    assert refused == ["NotifierError", "forbidden"]
    await client.wait("message", count=2)
    first, second = client.messages()
    assert (first["seq"], first["event"], first["data"], first["id"]) == (
        1, "say", {"text": "hi"}, stored["id"])
    assert (second["seq"], second["data"]) == (None, "typing")


async def test_acks_move_the_cursor_automatically_or_by_hand(port, browser):
    for n in range(3):
        await publish(port, {"user": "alice", "data": n})
        await publish(port, {"topic": "news.sport", "data": n})
    client = await Harness.start(browser, origin(port), options={"token": token("alice")},
                                 subscriptions=[["user:alice", {}],
                                                ["news.sport", {"since": 0, "autoAck": False}]])
    await client.wait("message", count=6)
    # By hand on news.sport, up to seq 2 only.
    await client.call("() => window.client.ack('news.sport', 2)")
    await client.call("() => window.client.close()")  # acks still queued go out first
    await client.wait("closed")
    assert client.of("closed")[0]["reconnect"] is False

    async def closed_on_the_server():
        return (await api(port, "GET", "/api/stats"))[1]["connections"] == 0
    await eventually(closed_on_the_server)  # its acks are stored by then
    # Coalesced: the three replayed messages arrived together, their acks did not go one by one.
    personal = [f["seq"] for f in client.sent("ack") if f["topic"] == "user:alice"]
    assert personal[-1] == 3 and len(personal) < 3, personal
    assert [f["seq"] for f in client.sent("ack") if f["topic"] == "news.sport"] == [2]

    # A new connection of alice's: her queue starts after what was acked.
    other = await connect(port, token("alice"), welcome=False)
    await other.expect("welcome")
    await other.expect("subscribed")
    await other.nothing()
    await other.send({"type": "subscribe", "topic": "news.sport"})  # from the stored cursor
    await other.expect("subscribed")
    assert (await other.expect("message"))["seq"] == 3
    other.close()


async def test_token_refreshed_through_get_token_keeps_the_connection(tmp_path, browser):
    """Three-second tokens, a server checking expiry four times a second:
    the client refreshes with `auth` before each expires and is never
    closed. A fixed token of the same life is closed with 4001 and stops."""
    env = {"NOTIFIER_HEARTBEAT_INTERVAL": "1s", "NOTIFIER_HEARTBEAT_TIMEOUT": "1s"}
    with ServerProcess(tmp_path, env=env) as server:
        refreshing = await Harness.start(browser, server.url, subscriptions=[["user:alice", {}]],
                                         get_token=lambda: token("alice", ttl=3))
        fixed = await Harness.start(browser, server.url, options={"token": token("bob", ttl=3)})
        await refreshing.wait("open")
        await fixed.wait("open")
        shut = await fixed.wait("closed", timeout=10)
        assert (shut["code"], shut["reason"], shut["reconnect"]) == (4001, "token expired", False)
        await refreshing.wait("authenticated", count=4, timeout=15)
        assert refreshing.of("closed") == [] and refreshing.of("error") == []
        assert len(refreshing.of("open")) == 1
        assert refreshing.tokens_given in (5, 6)  # the first, then one per refresh
        # Still the same connection, still answering.
        await publish(server.port, {"user": "alice", "data": "still here"})
        assert (await refreshing.wait("message"))["data"] == "still here"
        assert len(server.find_events("connection.open", user="alice")) == 1
        assert server.find_events("connection.close", user="alice") == []


async def test_refused_origin_stops_the_client_for_good(other_origin, port, browser):  # noqa: F811
    # Imported across origins (the module allows it); its default URL is the
    # /ws of the server it came from.
    client = await Harness.start(browser, other_origin, path="/", options={"token": token("alice")},
                                 module=f"http://127.0.0.1:{port}/static/notifier.js")
    assert await client.call("() => window.client.url") == f"ws://127.0.0.1:{port}/ws"
    shut = await client.wait("closed")
    assert (shut["code"], shut["reason"], shut["reconnect"]) == (4003, "origin not allowed", False)
    await asyncio.sleep(1.0)
    assert len(client.of("connecting")) == 1 and len(client.of("closed")) == 1
    assert await client.call("() => window.client.state") == "stopped"


async def test_no_token_stops_the_client_for_good(port, browser):
    client = await Harness.start(browser, origin(port), get_token=lambda: None)
    shut = await client.wait("closed")
    assert (shut["code"], shut["reason"], shut["reconnect"]) == (4001, "no token", False)
    await asyncio.sleep(0.5)
    assert client.tokens_given == 1 and len(client.of("connecting")) == 1
    status, stats = await api(port, "GET", "/api/stats")
    assert stats["connections"] == 0


async def test_a_dead_connection_is_noticed_by_ping_and_replaced(tmp_path, browser):
    """SIGSTOP: the socket stays open and says nothing. Without a pong in
    time the client gives up on it; once the server runs again it is back."""
    with ServerProcess(tmp_path) as server:
        client = await Harness.start(browser, server.url, options={
            "token": token("alice"), "pingInterval": 300, "pongTimeout": 500,
            "connectTimeout": 1000, "backoff": {"base": 100, "max": 400}},
            subscriptions=[["user:alice", {}]])
        await client.wait("open")
        server.signal(signal.SIGSTOP)
        try:
            shut = await client.wait("closed", timeout=5)
            assert (shut["code"], shut["reason"]) == (4000, "no answer within 0.5 s")
            # Attempts meanwhile hang in the handshake and are given up too.
            stuck = await client.wait("closed", count=2, timeout=5)
            assert (stuck["code"], stuck["reason"]) == (4000, "no welcome within 1 s")
        finally:
            server.signal(signal.SIGCONT)
        await client.wait("open", count=2, timeout=10)
        await publish(server.port, {"user": "alice", "data": "back"})
        assert (await client.wait("message"))["data"] == "back"


async def test_back_online_reconnects_at_once(tmp_path, browser):
    with ServerProcess(tmp_path) as server:
        context = await browser.new_context()
        client = await Harness.start(context, server.url, options={
            "token": token("alice"), "pingInterval": 500, "pongTimeout": 500,
            "backoff": {"base": 60000, "max": 60000}}, subscriptions=[["user:alice", {}]],
            before=HALF_JITTER)
        await client.wait("open")
        await context.set_offline(True)
        shut = await client.wait("closed", timeout=5)  # the offline event's ping went unanswered
        assert (shut["code"], shut["delay"]) == (4000, 30000)
        receipts = [await publish(server.port, {"user": "alice", "data": n}) for n in range(2)]
        await asyncio.sleep(0.5)
        await context.set_offline(False)
        back = time.monotonic()
        opened = await client.wait("open", count=2, timeout=5)
        assert time.monotonic() - back < 2.0
        assert opened["at"] < shut["at"] + 5000  # not the timer's 30 s
        await client.wait("message", count=2)
        await asyncio.sleep(0.3)
        assert [m["id"] for m in client.messages()] == [r["id"] for r in receipts]
        await context.close()


async def test_visible_again_reconnects_at_once(port, browser):
    client = await Harness.start(browser, origin(port), options={
        "backoff": {"base": 60000, "max": 60000}}, get_token=lambda: token("alice"),
        before=HALF_JITTER)
    await client.wait("open")
    # Headless Chromium has no hidden tabs: the page is told it was hidden,
    # loses its connection, then is told it is visible again.
    await client.call("""() => {
        window.visibility = "hidden";
        Object.defineProperty(document, "visibilityState",
                              {configurable: true, get: () => window.visibility});
        document.dispatchEvent(new Event("visibilitychange"));
    }""")
    await api(port, "POST", "/api/users/alice/disconnect")
    shut = await client.wait("closed")
    assert shut["delay"] == 30000
    await asyncio.sleep(0.3)
    assert len(client.of("open")) == 1  # hidden: no hurry
    await client.call("""() => {
        window.visibility = "visible";
        document.dispatchEvent(new Event("visibilitychange"));
    }""")
    opened = await client.wait("open", count=2, timeout=3)
    assert opened["at"] < shut["at"] + 5000  # not the timer's 30 s


async def test_a_reset_log_starts_the_topic_over(tmp_path, browser):
    """The server comes back on a new, empty store (a new epoch): seqs start
    at 1 again and must not be taken for ones already handed over."""
    with ServerProcess(tmp_path, store_path=tmp_path / "one.db") as first:
        client = await Harness.start(browser, first.url, options={"token": token("alice")},
                                     subscriptions=[["user:alice", {}], ["news.sport", {}]])
        await client.wait("subscribed", topic="news.sport")
        for n in range(3):
            await publish(first.port, {"user": "alice", "data": f"old {n}"})
            await publish(first.port, {"topic": "news.sport", "data": f"old {n}"})
        await client.wait("message", count=6)
        old_epoch = client.of("subscribed")[-1]["epoch"]
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 10) == 0
    since = len(client.log)
    second = ServerProcess(tmp_path, port=first.port, store_path=tmp_path / "two.db")
    with second:
        await publish(second.port, {"user": "alice", "data": "new 0"})
        await publish(second.port, {"topic": "news.sport", "data": "new 0"})
        await client.wait("message", since=since, count=2, timeout=15)
        resets = {e["topic"]: e for e in client.of("subscribed", since) if e["reset"]}
        assert set(resets) == {"user:alice", "news.sport"}
        assert all(e["epoch"] != old_epoch for e in resets.values())
        await asyncio.sleep(0.3)
        assert [(m["topic"], m["seq"], m["data"]) for m in client.messages()[6:]] in (
            [("user:alice", 1, "new 0"), ("news.sport", 1, "new 0")],
            [("news.sport", 1, "new 0"), ("user:alice", 1, "new 0")])


# The demo page


def demo_url(port: int, jwt: str, *topics: str) -> str:
    query = f"?token={quote(jwt)}" + "".join(f"&topic={quote(t)}" for t in topics)
    return f"http://127.0.0.1:{port}/{query}"


async def open_demo(browser_or_context, url: str):
    page = await browser_or_context.new_page()
    page.set_default_timeout(EVENT_TIMEOUT * 1000)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.errors = errors
    page.sockets = []
    page.on("websocket", lambda socket: page.sockets.append(socket))
    response = await page.goto(url)
    assert response is not None and response.ok
    return page


async def demo_state(page) -> str:
    return await page.get_attribute("#state", "data-state")


async def wait_open(page, timeout: float = EVENT_TIMEOUT) -> None:
    await eventually(lambda: _is_open(page), timeout)


async def _is_open(page) -> bool:
    return await demo_state(page) == "open"


async def shown(page) -> list[dict]:
    """The demo's list, top (newest) first."""
    return await page.eval_on_selector_all("#feed li", """(items) => items.map((li) => ({
        id: li.dataset.id, topic: li.dataset.topic, seq: li.dataset.seq,
        text: li.innerText}))""")


async def wait_shown(page, count: int, timeout: float = EVENT_TIMEOUT) -> list[dict]:
    async def enough():
        items = await shown(page)
        return items if len(items) >= count else None
    return await eventually(enough, timeout)


async def test_demo_shows_a_notification_published_over_http(port, browser):
    page = await open_demo(browser, demo_url(port, token("alice"), "news.sport"))
    await wait_open(page)
    assert "Connected as alice" in await page.inner_text("#state")
    # The token left the address bar; the topic stayed.
    assert await page.evaluate("location.search") == "?topic=news.sport"

    goal = await publish(port, {"topic": "news.sport", "event": "goal", "data": {"score": "1-0"}})
    (item,) = await wait_shown(page, 1)
    assert (item["id"], item["topic"], item["seq"]) == (goal["id"], "news.sport", "1")
    assert "goal" in item["text"] and '{"score":"1-0"}' in item["text"]
    time_text = await page.get_attribute("#feed li time", "datetime")
    assert time_text == goal["time"]
    assert await eventually(lambda: page.inner_text("#announcer")) == \
        "New notification on news.sport: goal"
    hello = await publish(port, {"user": "alice", "data": {"text": "hello"}})
    items = await wait_shown(page, 2)
    assert [i["id"] for i in items] == [hello["id"], goal["id"]]  # newest first
    assert "hello" in items[0]["text"]
    assert await page.inner_text("#count") == "2"
    async def announced():
        text = await page.inner_text("#announcer")
        return text if text != "New notification on news.sport: goal" else None
    assert await eventually(announced) == "New notification on user:alice"
    # A burst (a replay, say) is announced once.
    status, _ = await api(port, "POST", "/api/publish/batch", {"messages": [
        {"user": "alice", "data": 1}, {"user": "alice", "data": 2}]})
    assert status == 200
    await wait_shown(page, 4)
    async def burst():
        text = await page.inner_text("#announcer")
        return text if text.endswith("new notifications") else None
    assert await eventually(burst) == "2 new notifications"
    assert page.errors == []


async def test_demo_is_labelled_and_works_from_the_keyboard(port, browser):
    page = await open_demo(browser, f"http://127.0.0.1:{port}/")
    assert await demo_state(page) == "idle"
    assert await page.get_attribute("#announcer", "aria-live") == "polite"
    assert await page.get_attribute("#state", "role") == "status"
    assert await page.get_attribute("#feed", "aria-label") == "Notifications, newest first"
    for label in ("Token", "Other topics"):
        assert await page.get_by_label(label).count() == 1
    order = []
    for _ in range(4):
        await page.keyboard.press("Tab")
        order.append(await page.evaluate("document.activeElement.id"))
    assert order == ["token", "topics", "connect", "clear"]  # Disconnect is disabled yet
    await page.focus("#token")
    await page.keyboard.type(token("alice"))
    await page.keyboard.press("Tab")
    await page.keyboard.type("news.sport")
    await page.keyboard.press("Enter")
    await wait_open(page)
    await publish(port, {"topic": "news.sport", "event": "goal", "data": 1})
    await wait_shown(page, 1)
    assert await eventually(lambda: page.inner_text("#announcer")) == \
        "New notification on news.sport: goal"
    await page.focus("#disconnect")
    await page.keyboard.press("Enter")
    await eventually(lambda: _state_is(page, "stopped"))


async def _state_is(page, name: str) -> bool:
    return await demo_state(page) == name


async def test_demo_shows_what_was_published_while_it_was_closed(port, browser):
    url = demo_url(port, token("alice"))
    page = await open_demo(browser, url)
    await wait_open(page)
    seen = await publish(port, {"user": "alice", "data": {"text": "seen"}})
    await wait_shown(page, 1)
    await asyncio.sleep(0.5)  # the page's ack
    await page.close()

    missed = [await publish(port, {"user": "alice", "data": {"text": f"missed {n}"}})
              for n in range(2)]
    page = await open_demo(browser, url)
    items = await wait_shown(page, 2)
    await asyncio.sleep(0.3)
    items = await shown(page)
    assert [i["id"] for i in items] == [missed[1]["id"], missed[0]["id"]]
    assert seen["id"] not in {i["id"] for i in items}  # acked by the first visit


async def test_demo_reconnects_by_itself_after_a_server_restart(tmp_path, browser):
    first = ServerProcess(tmp_path, port=free_port())
    with first:
        page = await open_demo(browser, demo_url(first.port, token("alice"), "news.sport"))
        await wait_open(page)
        before = await publish(first.port, {"user": "alice", "data": {"text": "before"}})
        await wait_shown(page, 1)
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 10) == 0
    await eventually(lambda: _state_is(page, "closed"))
    with ServerProcess(tmp_path, port=first.port, store_path=first.store_path) as second:
        after = [await publish(second.port, body) for body in (
            {"user": "alice", "data": {"text": "after 1"}},
            {"topic": "news.sport", "event": "goal", "data": {"score": "1-0"}},
            {"user": "alice", "data": {"text": "after 2"}})]
        await wait_shown(page, 4, timeout=20)
        await wait_open(page)
        await asyncio.sleep(0.5)
        ids = [i["id"] for i in await shown(page)]
        assert sorted(ids) == sorted([before["id"], *(r["id"] for r in after)])
        assert ids[-1] == before["id"]
        assert page.errors == [] or all("WebSocket" in e for e in page.errors), page.errors


async def test_demo_recovers_after_the_browser_was_offline(port, browser):
    context = await browser.new_context()
    page = await open_demo(context, demo_url(port, token("alice")))
    await wait_open(page)
    await context.set_offline(True)
    meanwhile = [await publish(port, {"user": "alice", "data": {"text": f"offline {n}"}})
                 for n in range(2)]
    await asyncio.sleep(1.0)
    assert await shown(page) == []
    await context.set_offline(False)
    items = await wait_shown(page, 2, timeout=15)
    await wait_open(page)
    await asyncio.sleep(0.5)
    items = await shown(page)
    assert [i["id"] for i in items] == [meanwhile[1]["id"], meanwhile[0]["id"]]
    # Back online, the socket that lived through it was replaced at once.
    assert len(page.sockets) == 2
    await context.close()


async def test_demo_screenshot(port, browser, tmp_path):
    """The picture in the README, taken from a real run."""
    jwt = token("alice", topics=["news.>", "orders.>"])
    for body in ({"user": "alice", "event": "welcome", "data": {"text": "Welcome back, Alice"}},
                 {"user": "alice", "event": "order.shipped",
                  "data": {"text": "Your order #1042 has shipped", "carrier": "DHL"}}):
        await publish(port, body)
    context = await browser.new_context(viewport={"width": 1100, "height": 630},
                                        color_scheme="light", device_scale_factor=1)
    page = await open_demo(context, demo_url(port, jwt, "news.sport"))
    await wait_shown(page, 2)
    await publish(port, {"topic": "news.sport", "event": "goal",
                         "data": {"match": "Lyon - Nantes", "score": "1-0", "minute": 17}})
    await publish(port, {"user": "alice", "event": "mention",
                         "data": {"text": "Bob mentioned you in #design"}})
    await wait_shown(page, 4)
    await asyncio.sleep(0.6)  # the arrival highlight fades
    shot = tmp_path / "demo.png"
    await page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shipped = (await shown(page))[2]["text"]
    assert "Your order #1042 has shipped" in shipped and '{"carrier":"DHL"}' in shipped
    target = os.environ.get("DEMO_SCREENSHOT")
    if target:
        shutil.copyfile(shot, Path(target) if Path(target).is_absolute() else ROOT / target)
    await context.close()

"""SIGTERM on a real `notifier serve`: clients get 1001, in-flight publishes
commit and are answered, new requests get 503 (or no answer), exit 0; no
publish answered 2xx is ever lost."""

from __future__ import annotations

import http.client
import signal
import sqlite3
import threading
import time

import pytest

from procs import DRAIN_TIMEOUT, ServerProcess, read_history, send
from support import connect, token

EXIT_SLACK = 3.0  # seconds past drain_timeout the process may take to exit


@pytest.fixture
def server(tmp_path):
    with ServerProcess(tmp_path) as running:
        yield running


def assert_unavailable(status, body):
    assert status == 503, (status, body)
    assert body["error"]["code"] == "unavailable", body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_sigterm_closes_every_websocket_with_1001_and_exits_0(io_loop, server):
    alice = await connect(server.port, token("alice", topics=["news.>"]))
    bob = await connect(server.port, token("bob", topics=["news.>"]))
    await alice.send({"type": "subscribe", "topic": "news.a", "ref": 1})
    assert (await alice.expect("subscribed"))["ref"] == 1

    started = time.monotonic()
    server.signal(signal.SIGTERM)
    assert await alice.closed() == 1001
    assert await bob.closed() == 1001
    assert alice.connection.close_reason == "server shutting down"
    alice.close()
    bob.close()
    assert server.wait(DRAIN_TIMEOUT + EXIT_SLACK) == 0
    assert time.monotonic() - started < DRAIN_TIMEOUT + EXIT_SLACK
    draining = server.wait_for_event("server.draining", timeout=0)
    assert draining["connections"] == 2
    assert server.find_events("server.stopped")
    closes = server.find_events("connection.close")
    assert sorted((e["user"], e["code"]) for e in closes) == [("alice", 1001), ("bob", 1001)]


class Publisher(threading.Thread):
    """Publishes to one topic over a kept-alive connection until the server
    stops listening, recording every attempt."""

    def __init__(self, server: ServerProcess, topic: str, worker: int):
        super().__init__(name=f"publisher-{worker}", daemon=True)
        self.server = server
        self.topic = topic
        self.worker = worker
        # (data, status or None, body or error text)
        self.attempts: list[tuple[dict, int | None, object]] = []

    def run(self) -> None:
        connection = None
        n = 0
        while True:
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
            data = {"w": self.worker, "n": n}
            n += 1
            try:
                status, body = send(connection, "POST", "/api/publish",
                                    {"topic": self.topic, "data": data})
            except ConnectionRefusedError:
                connection.close()
                return  # no longer listening: nothing more can be in flight
            except (OSError, http.client.HTTPException) as exc:
                self.attempts.append((data, None, repr(exc)))
                connection.close()
                connection = None
                if not self.server.running():
                    return
                continue
            self.attempts.append((data, status, body))


def test_publishes_in_flight_at_sigterm_are_answered_and_stored_or_refused(tmp_path):
    topic = "drain.load"
    server = ServerProcess(tmp_path)
    with server:
        workers = [Publisher(server, topic, i) for i in range(8)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 5
        while sum(a[1] == 200 for w in workers for a in list(w.attempts)) < 80:
            assert time.monotonic() < deadline, "publishers too slow before SIGTERM"
            time.sleep(0.01)
        server.signal(signal.SIGTERM)
        for worker in workers:
            worker.join(DRAIN_TIMEOUT + EXIT_SLACK)
            assert not worker.is_alive()
        assert server.wait(DRAIN_TIMEOUT + EXIT_SLACK) == 0

    attempts = [a for w in workers for a in w.attempts]
    answered = [(data, status, body) for data, status, body in attempts if status is not None]
    statuses = {status for _, status, _ in answered}
    assert statuses <= {200, 503}, sorted(statuses)
    for _, status, body in answered:
        if status == 503:
            assert_unavailable(status, body)

    with ServerProcess(tmp_path, store_path=server.store_path) as again:
        stored = read_history(again, topic)

    by_data = {(m["data"]["w"], m["data"]["n"]): m for m in stored}
    assert len(by_data) == len(stored), "a publish was stored twice"
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    sent = {(data["w"], data["n"]) for data, _, _ in attempts}
    assert set(by_data) <= sent, "stored messages nobody published"
    ok = [(data, body) for data, status, body in answered if status == 200]
    assert len(ok) >= 80
    for data, body in ok:
        message = by_data.get((data["w"], data["n"]))
        assert message is not None, f"answered 200 but lost: {body}"
        assert (message["id"], message["seq"], message["data"]) == (body["id"], body["seq"], data)
        assert body["topic"] == topic
    for data, status, _ in answered:
        if status == 503:
            assert (data["w"], data["n"]) not in by_data, f"refused with 503 but stored: {data}"


def test_drain_waits_for_a_publish_stuck_in_commit_and_refuses_new_requests(tmp_path):
    """A second SQLite connection holds the write lock, so one publish is
    in flight (waiting to commit) when SIGTERM arrives. The drain must
    answer new requests 503, wait for that publish, answer it 200 once it
    commits, then exit 0, and the message must be in the store."""
    topic = "drain.stuck"
    server = ServerProcess(tmp_path)
    with server:
        idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        assert send(idle, "GET", "/api/stats")[0] == 200  # kept alive for later

        lock = sqlite3.connect(server.store_path, isolation_level=None, timeout=5)
        lock.execute("BEGIN IMMEDIATE")
        result: list = []
        publisher = threading.Thread(target=lambda: result.append(server.request(
            "POST", "/api/publish", {"topic": topic, "data": {"p": 1}}, timeout=10)))
        try:
            publisher.start()
            time.sleep(0.3)  # the publish reaches the writer and waits for the lock
            assert not result
            server.signal(signal.SIGTERM)
            draining = server.wait_for_event("server.draining", timeout=3)
            assert draining["in_flight"] == 1

            # During the drain: a new request on an open connection is refused...
            status, body = send(idle, "POST", "/api/publish", {"topic": topic, "data": {"p": 2}})
            assert_unavailable(status, body)
            status, body = send(idle, "GET", "/readyz", key=None)
            assert (status, body) == (503, {"status": "draining"})
            # ...and a new connection is not accepted at all.
            with pytest.raises(ConnectionRefusedError):
                server.request("GET", "/healthz", timeout=1)
            assert not result and server.running()
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        publisher.join(10)
        idle.close()
        ((status, body),) = result
        assert status == 200, body
        assert body["topic"] == topic and body["seq"] == 1
        assert server.wait(DRAIN_TIMEOUT + EXIT_SLACK) == 0
        assert not server.find_events("server.drain_timeout")

    with ServerProcess(tmp_path, store_path=server.store_path) as again:
        stored = read_history(again, topic)
    assert [(m["seq"], m["id"], m["data"]) for m in stored] == [(1, body["id"], {"p": 1})]

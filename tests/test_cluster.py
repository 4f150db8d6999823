"""Several ``notifier serve`` processes on one Redis (a redis-server this
test starts on a free port, AOF with appendfsync always): messages, cursors,
idempotency, presence and control are shared; nothing acknowledged is lost
when Redis is killed; a lost pub/sub connection is filled from the log; a
dead node leaves presence; ``--workers 2`` serves one port.

Every check on delivery is exact: each subscriber gets seqs 1..N, in order,
none missing and none twice, whichever node each message was published on."""

from __future__ import annotations

import asyncio
import http.client
import signal
import threading
import time

import pytest

from notifier.broker.redis import RECONNECT_MOST
from procs import ServerProcess, read_history, send
from redis_server import RedisServer
from support import API_KEY, connect, token

HEARTBEAT = 1.0  # presence is renewed every heartbeat and expires after three


class Cluster:
    def __init__(self, workdir):
        self.workdir = workdir
        self.redis = RedisServer(workdir, appendfsync="always").start()
        self.nodes: list[ServerProcess] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFIER_STORE_BACKEND": "redis", "NOTIFIER_STORE_REDIS_URL": self.redis.url,
                "NOTIFIER_HEARTBEAT_INTERVAL": f"{HEARTBEAT}s", **extra}

    def node(self, args=(), **extra: str) -> ServerProcess:
        node = ServerProcess(self.workdir, env=self.env(**extra), args=args).start().wait_ready()
        self.nodes.append(node)
        return node

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path)
    yield made
    made.close()


def publish(node: ServerProcess, topic: str, data, **extra) -> tuple[int, dict]:
    return node.request("POST", "/api/publish", {"topic": topic, "data": data, **extra})


async def subscribe(node: ServerProcess, user: str, topic: str, **fields):
    client = await connect(node.port, token(user, topics=["news.>"]))
    await client.send({"type": "subscribe", "topic": topic, **fields})
    return client, await client.expect("subscribed")


async def seqs_of(client, count: int, timeout: float = 20.0) -> list[int]:
    """The next ``count`` message seqs, in the order they arrived."""
    seqs = []
    deadline = time.monotonic() + timeout
    while len(seqs) < count:
        frame = await client.recv(max(0.1, deadline - time.monotonic()))
        assert frame is not None, f"closed ({client.close_code}) after {len(seqs)} messages"
        assert frame["type"] == "message", frame
        seqs.append(frame["seq"])
    return seqs


class Publishers:
    """Threads publishing in a loop on keep-alive connections, each to the
    node it was given, recording every answer."""

    def __init__(self, nodes: list[ServerProcess], topic: str, each: int | None = None):
        self.topic = topic
        self.each = each
        self.answered: list[tuple[int, str]] = []   # (seq, id) of every 2xx
        self.refused: list[tuple[int, dict]] = []   # other answers
        self.cut = 0                                # requests the connection died under
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(node, index), daemon=True)
                        for index, node in enumerate(nodes)]

    def start(self) -> "Publishers":
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float = 30) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def _run(self, node: ServerProcess, index: int) -> None:
        connection = http.client.HTTPConnection(node.host, node.port, timeout=10)
        count = 0
        try:
            while not self.stop.is_set() and (self.each is None or count < self.each):
                try:
                    status, body = send(connection, "POST", "/api/publish",
                                        {"topic": self.topic, "data": {"p": index, "n": count}})
                except (OSError, http.client.HTTPException):
                    self.cut += 1
                    connection.close()
                    time.sleep(0.05)
                    continue
                if status == 200:
                    self.answered.append((body["seq"], body["id"]))
                else:
                    self.refused.append((status, body))
                    time.sleep(0.02)
                count += 1
        finally:
            connection.close()


def until(condition, timeout: float = 10.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


# Messages across nodes


@pytest.mark.slow
async def test_a_message_published_on_one_node_reaches_a_subscriber_on_another(cluster):
    a, b = cluster.node(), cluster.node()
    client, reply = await subscribe(b, "alice", "news.x")
    assert reply["seq"] == 0
    for n in range(5):
        assert publish(a, "news.x", n)[0] == 200
    assert await seqs_of(client, 5) == [1, 2, 3, 4, 5]
    client.close()


@pytest.mark.slow
async def test_four_publishers_on_two_nodes_every_subscriber_gets_1_to_n_once(cluster):
    a, b = cluster.node(), cluster.node()
    clients = [(await subscribe(node, f"user{i}", "news.race", since=0))[0]
               for i, node in enumerate((a, a, b, b))]
    each = 150
    publishers = Publishers([a, b, a, b], "news.race", each=each).start()
    total = 4 * each
    results = await asyncio.gather(*(seqs_of(client, total, timeout=60) for client in clients))
    publishers.join()
    assert not publishers.refused and not publishers.cut
    assert sorted(seq for seq, _ in publishers.answered) == list(range(1, total + 1))
    for seqs in results:
        assert seqs == list(range(1, total + 1))
    for client in clients:
        await client.nothing(0.3)  # and nothing after: no repeats
        client.close()


@pytest.mark.slow
async def test_ack_on_one_node_resumes_from_the_cursor_on_another(cluster):
    a, b = cluster.node(), cluster.node()
    for n in range(6):
        publish(a, "news.acked", n)
    client, _ = await subscribe(a, "alice", "news.acked", since=0)
    assert await seqs_of(client, 6) == [1, 2, 3, 4, 5, 6]
    await client.send({"type": "ack", "topic": "news.acked", "seq": 4})
    await client.send({"type": "ping", "ref": "stored"})
    await client.expect("pong")
    client.close()
    again, reply = await subscribe(b, "alice", "news.acked")  # no since: the cursor
    assert reply["recovered"] is True
    assert await seqs_of(again, 2) == [5, 6]
    again.close()


@pytest.mark.slow
def test_an_idempotency_key_reused_on_the_other_node_stores_once(cluster):
    a, b = cluster.node(), cluster.node()
    status, first = publish(a, "news.once", {"v": 1}, idempotency_key="order-7")
    assert status == 200
    status, again = publish(b, "news.once", {"v": 2}, idempotency_key="order-7")
    assert status == 200 and again == first
    assert [m["data"] for m in read_history(b, "news.once")] == [{"v": 1}]


@pytest.mark.slow
async def test_presence_stats_and_disconnect_are_cluster_wide(cluster):
    a, b = cluster.node(), cluster.node()
    alice_a, _ = await subscribe(a, "alice", "news.room")
    alice_b, _ = await subscribe(b, "alice", "news.room")
    bob_b, _ = await subscribe(b, "bob", "news.room")
    presence = until(lambda: _answer(a, "GET", "/api/topics/news.room/presence",
                                     lambda body: body["connections"] == 3))
    assert presence == {"users": ["alice", "bob"], "connections": 3}
    stats = until(lambda: _answer(b, "GET", "/api/stats",
                                  lambda body: body["cluster"]["connections"] == 3))
    assert stats["connections"] == 2 and stats["cluster"] == {"nodes": 2, "connections": 3,
                                                              "users": 2}
    status, body = a.request("POST", "/api/users/alice/disconnect")
    assert status == 200 and body == {"user": "alice", "disconnected": 2}
    assert await alice_a.closed() == 4001
    assert await alice_b.closed() == 4001  # on the other node too
    await bob_b.send({"type": "ping"})
    await bob_b.expect("pong")
    for client in (alice_a, alice_b, bob_b):
        client.close()


def _answer(node: ServerProcess, method: str, path: str, accept):
    status, body = node.request(method, path)
    return body if status == 200 and accept(body) else None


# Failures


@pytest.mark.slow
def test_redis_killed_during_publishes_loses_no_2xx_and_refuses_with_503(cluster):
    a, b = cluster.node(), cluster.node()
    publishers = Publishers([a, b, a, b], "news.crash").start()
    until(lambda: len(publishers.answered) >= 200, timeout=20)
    cluster.redis.kill()
    until(lambda: publishers.refused, timeout=10)
    assert until(lambda: _status(a, "/readyz") == 503)
    time.sleep(0.5)
    cluster.redis.start()
    answered_before = len(publishers.answered)
    until(lambda: len(publishers.answered) >= answered_before + 200, timeout=30)
    publishers.stop.set()
    publishers.join()
    assert all(status == 503 and body["error"]["code"] == "unavailable"
               for status, body in publishers.refused), publishers.refused[:3]
    stored = read_history(a, "news.crash")
    seqs = [message["seq"] for message in stored]
    assert seqs == list(range(1, len(stored) + 1)), "no gap, no disorder, no seq twice"
    ids = {message["seq"]: message["id"] for message in stored}
    assert len(set(ids.values())) == len(ids), "no message stored twice"
    for seq, message_id in publishers.answered:
        assert ids.get(seq) == message_id, f"acknowledged seq {seq} lost or changed"
    # Publishes come back on the store's connection; readiness also needs
    # the broker's pub/sub one, which reconnects on its own backoff (at most
    # RECONNECT_MOST apart) and may come back a moment later.
    until(lambda: _status(a, "/readyz") == 200 and _status(b, "/readyz") == 200,
          timeout=RECONNECT_MOST + 1.0)


def _status(node: ServerProcess, path: str) -> int:
    try:
        return node.request("GET", path, key=None, timeout=3)[0]
    except OSError:
        return 0


@pytest.mark.slow
async def test_subscribers_stay_open_through_a_redis_outage_and_get_what_follows(cluster):
    a, b = cluster.node(), cluster.node()
    client, _ = await subscribe(b, "alice", "news.outage", since=0)
    for n in range(3):
        publish(a, "news.outage", n)
    assert await seqs_of(client, 3) == [1, 2, 3]
    cluster.redis.kill()
    status, body = publish(a, "news.outage", "lost?")
    assert status == 503 and body["error"]["code"] == "unavailable"
    await asyncio.sleep(1.0)
    await client.send({"type": "ping", "ref": "still"})
    assert (await client.expect("pong"))["ref"] == "still"  # the socket stayed open
    cluster.redis.start()
    # Published as soon as node A can: B's bus may still be reconnecting.
    sent = 0
    deadline = time.monotonic() + 15
    while sent < 5 and time.monotonic() < deadline:
        if publish(a, "news.outage", sent)[0] == 200:
            sent += 1
        else:
            await asyncio.sleep(0.05)
    assert sent == 5
    assert await seqs_of(client, 5) == [4, 5, 6, 7, 8]
    client.close()


@pytest.mark.slow
async def test_a_killed_pubsub_connection_mid_stream_loses_no_seq(cluster):
    a, b = cluster.node(), cluster.node()
    subscribers = [(await subscribe(b, f"user{i}", "news.cut", since=0))[0] for i in range(3)]
    publishers = Publishers([a, a], "news.cut", each=300).start()
    until(lambda: len(publishers.answered) >= 100, timeout=20)
    killed = cluster.redis.command("CLIENT", "KILL", "TYPE", "pubsub").strip()
    assert killed == b"2"  # both nodes' subscriber connections
    results = await asyncio.gather(*(seqs_of(client, 600, timeout=60) for client in subscribers))
    publishers.join()
    assert not publishers.refused and not publishers.cut
    for seqs in results:
        assert seqs == list(range(1, 601))
    assert b.wait_for_event("broker.reconnected")
    for client in subscribers:
        client.close()


@pytest.mark.slow
async def test_a_killed_node_leaves_presence_within_three_heartbeats(cluster):
    a, b = cluster.node(), cluster.node()
    client, _ = await subscribe(b, "alice", "news.gone")
    until(lambda: _answer(a, "GET", "/api/topics/news.gone/presence",
                          lambda body: body["users"] == ["alice"]))
    b.signal(signal.SIGKILL)
    killed = time.monotonic()
    until(lambda: _answer(a, "GET", "/api/topics/news.gone/presence",
                          lambda body: body["users"] == []), timeout=10)
    elapsed = time.monotonic() - killed
    assert elapsed <= 3 * HEARTBEAT + 1.0, elapsed
    status, stats = a.request("GET", "/api/stats")
    assert stats["cluster"]["nodes"] == 1
    client.close()


# --workers


@pytest.mark.slow
def test_two_workers_serve_one_port_and_a_dead_one_is_restarted(cluster, tmp_path):
    server = cluster.node(args=["--workers", "2"])
    nodes = _nodes_behind(server)
    assert len(nodes) == 2
    started = server.find_events("worker.started")
    assert len(started) == 2
    victim = started[0]["pid"]
    import os
    os.kill(victim, signal.SIGKILL)
    server.wait_for_event("worker.died", timeout=10, worker=started[0]["worker"])
    until(lambda: len(server.find_events("worker.started")) == 3, timeout=15)
    until(lambda: len(_nodes_behind(server)) == 2, timeout=15)
    assert server.request("GET", "/healthz")[0] == 200
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert server.find_events("workers.stopped")[0]["codes"] == [0, 0]


def _nodes_behind(server: ServerProcess, tries: int = 60) -> set[str]:
    """Node ids answering on the port, one new connection per request."""
    seen = set()
    for _ in range(tries):
        status, body = server.request("GET", "/api/stats", key=API_KEY)
        if status == 200:
            seen.add(body["node"])
    return seen


@pytest.mark.slow
def test_workers_need_redis_and_say_so_in_one_line(tmp_path):
    server = ServerProcess(tmp_path, args=["--workers", "2"]).start()
    assert server.wait(15) == 2
    lines = server.stderr().strip().splitlines()
    assert len(lines) == 1 and "redis" in lines[0]


@pytest.mark.slow
def test_workers_under_systemd_ready_once_all_listen_and_watchdog_only_while_all_alive(
        cluster, tmp_path):
    import os

    from support import bind_notify_socket
    from test_systemd_integration import Manager, watchdogs
    from notifier.workers import ALIVE_WITHIN

    sock, address = bind_notify_socket("path", tmp_path)
    manager = Manager(sock, address)
    server = ServerProcess(tmp_path, args=["--workers", "2"], env=cluster.env(
        NOTIFY_SOCKET=address, WATCHDOG_USEC="2000000")).start()
    try:
        manager.until(lambda line: line == "READY=1", timeout=30)
        # Both workers listened (each logs server.started first) by then.
        until(lambda: len(server.find_events("server.started")) == 2, timeout=2)
        assert watchdogs(manager.collect(2.5)) >= 2  # every second, half of 2 s
        stuck = server.find_events("worker.started")[0]["pid"]
        os.kill(stuck, signal.SIGSTOP)  # its event loop reports no more
        try:
            manager.collect(ALIVE_WITHIN + 1.0)
            assert watchdogs(manager.collect(2.0)) == 0
        finally:
            os.kill(stuck, signal.SIGCONT)
        assert watchdogs(manager.collect(3.0)) >= 1
        server.signal(signal.SIGTERM)
        manager.until(lambda line: line == "STOPPING=1", timeout=5)
        assert server.wait(20) == 0
    finally:
        server.kill()
        sock.close()

"""SPEC "HTTP API (backend services)": every row and rule, through the real
server on loopback with real WebSocket clients where delivery is involved."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone

import orjson
import pytest
import tornado.httpclient
from prometheus_client.parser import text_string_to_metric_families

from notifier.handlers import api as api_handlers
from support import API_KEY, api, connect, token

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def assert_error(status: int, body, expected_status: int, code: str | None = None) -> dict:
    """``body`` is SPEC's error shape with ``expected_status``; returns the error."""
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message"}, error
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


async def head_of(port: int, topic: str) -> int:
    status, body = await api(port, "GET", f"/api/topics/{topic}/messages?limit=1")
    assert status == 200, body
    return body["head"]


async def history(port: int, topic: str, query: str = "") -> dict:
    status, body = await api(port, "GET", f"/api/topics/{topic}/messages{query}")
    assert status == 200, body
    return body


async def publish_batch(port: int, topic: str, count: int, start: int = 0) -> list[dict]:
    results = []
    for offset in range(0, count, 1000):
        items = [{"topic": topic, "data": {"n": start + i}}
                 for i in range(offset, min(offset + 1000, count))]
        status, body = await api(port, "POST", "/api/publish/batch", {"messages": items})
        assert status == 200, body
        results.extend(body["results"])
    return results


async def until(condition, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# POST /api/publish


async def test_publish_to_topic_answers_after_storage(port):
    before = datetime.now(timezone.utc)
    status, body = await api(port, "POST", "/api/publish",
                             {"topic": "news.sport", "data": {"goal": 1}, "event": "score"})
    assert status == 200, body
    assert set(body) == {"id", "topic", "seq", "time"}
    assert body["topic"] == "news.sport" and body["seq"] == 1
    assert isinstance(body["id"], str) and body["id"]
    assert RFC3339_UTC.match(body["time"]), body["time"]
    when = datetime.fromisoformat(body["time"].replace("Z", "+00:00"))
    assert when.tzinfo is not None and when.utcoffset().total_seconds() == 0
    assert abs((when - before).total_seconds()) < 5
    # Stored by the time the answer came: the very next read sees it.
    stored = await history(port, "news.sport")
    assert stored["head"] == 1
    assert stored["messages"] == [{"topic": "news.sport", "seq": 1, "id": body["id"],
                                   "time": body["time"], "event": "score", "data": {"goal": 1}}]
    status, second = await api(port, "POST", "/api/publish", {"topic": "news.sport", "data": [1, 2]})
    assert status == 200 and second["seq"] == 2 and second["id"] != body["id"]


async def test_publish_to_user_goes_to_the_personal_topic(port, ws):
    carol = await ws(token("carol", topics=[]))
    status, body = await api(port, "POST", "/api/publish", {"user": "carol", "data": "hi"})
    assert status == 200, body
    assert body["topic"] == "user:carol" and body["seq"] == 1
    message = await carol.expect("message")
    assert message["topic"] == "user:carol" and message["seq"] == 1
    assert message["id"] == body["id"] and message["data"] == "hi" and message["event"] is None
    stored = await history(port, "user:carol")
    assert [m["data"] for m in stored["messages"]] == ["hi"] and stored["head"] == 1


@pytest.mark.parametrize("body", [
    {"topic": "a", "user": "bob", "data": 1},
    {"data": 1},
])
async def test_publish_needs_exactly_one_of_topic_and_user(port, body):
    status, answer = await api(port, "POST", "/api/publish", body)
    assert_error(status, answer, 400)
    assert await head_of(port, "a") == 0 and await head_of(port, "user:bob") == 0


@pytest.mark.parametrize("topic", ["", "a..b", ".a", "a.", "a b", "ü", "a/b", "a*", "news.>",
                                   "x" * 201, 5, None, ["a"]])
async def test_publish_to_invalid_topic_is_400_invalid_topic(port, topic):
    status, body = await api(port, "POST", "/api/publish", {"topic": topic, "data": 1})
    assert_error(status, body, 400, "invalid_topic")


async def test_publish_to_invalid_user_is_400(port):
    status, body = await api(port, "POST", "/api/publish", {"user": "a b", "data": 1})
    assert_error(status, body, 400)


async def test_publish_topic_of_200_characters_is_accepted(port):
    topic = "a" * 200
    status, body = await api(port, "POST", "/api/publish", {"topic": topic, "data": 1})
    assert status == 200 and body["topic"] == topic


async def test_publish_without_data_is_400(port):
    status, body = await api(port, "POST", "/api/publish", {"topic": "a", "event": "e"})
    assert_error(status, body, 400, "bad_request")
    assert await head_of(port, "a") == 0


async def test_publish_null_data_is_accepted(port):
    status, body = await api(port, "POST", "/api/publish", {"topic": "a", "data": None})
    assert status == 200 and body["seq"] == 1
    assert (await history(port, "a"))["messages"][0]["data"] is None


@pytest.mark.parametrize("raw", [b"{", b"not json", b"{'topic': 'a'}", b'{"topic":"a","data":1,}', b""])
async def test_publish_body_not_json_is_400(port, raw):
    status, body = await api(port, "POST", "/api/publish", raw=raw)
    assert_error(status, body, 400, "bad_request")


@pytest.fixture
def small_message_limit(config):
    config.limits.max_message_bytes = 100


async def test_data_over_max_message_bytes_is_413(small_message_limit, port):
    at_limit = "x" * 98  # serialized with its quotes: exactly 100 bytes
    status, body = await api(port, "POST", "/api/publish", {"topic": "a", "data": at_limit})
    assert status == 200, body
    status, body = await api(port, "POST", "/api/publish", {"topic": "a", "data": at_limit + "x"})
    assert_error(status, body, 413, "too_large")
    status, body = await api(port, "POST", "/api/publish/batch",
                             {"messages": [{"topic": "a", "data": 1}, {"topic": "a", "data": at_limit + "x"}]})
    assert_error(status, body, 413, "too_large")
    assert "messages[1]" in body["error"]["message"]
    assert await head_of(port, "a") == 1


@pytest.fixture
def small_body_limit(config):
    config.limits.max_body_bytes = 2000


async def test_body_over_max_body_bytes_is_413(small_body_limit, port):
    status, body = await api(port, "POST", "/api/publish", {"topic": "a", "data": "x" * 1900})
    assert status == 200, body
    status, body = await api(port, "POST", "/api/publish", {"topic": "a", "data": "x" * 2000})
    assert_error(status, body, 413, "too_large")
    # A batch of small messages counts as a whole.
    items = [{"topic": "a", "data": "x" * 50} for _ in range(40)]
    status, body = await api(port, "POST", "/api/publish/batch", {"messages": items})
    assert_error(status, body, 413, "too_large")
    assert await head_of(port, "a") == 1


async def exchange(port: int, *requests: bytes, timeout: float = 10) -> list[tuple[int, dict, bytes]]:
    """Write ``requests`` on one connection while reading; every answer as
    (status, headers, body). Stops early when the server hangs up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send():
        for request in requests:
            for at in range(0, len(request), 65536):
                writer.write(request[at:at + 65536])
                await writer.drain()

    sender = asyncio.ensure_future(send())
    answers = []
    try:
        while len(answers) < len(requests):
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            except asyncio.IncompleteReadError:
                break
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {n.strip().lower(): v.strip() for n, _, v in (l.partition(":") for l in lines if l)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            answers.append((int(status_line.split()[1]), headers, body))
        return answers
    finally:
        sender.cancel()
        writer.close()


def post(path: str, body: bytes, chunked: bool = False, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n{extra}"
    if not chunked:
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[at:at + 4000]), body[at:at + 4000])
                      for at in range(0, len(body), 4000))
    return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"


def sized(size: int) -> bytes:
    body = b'{"topic":"a","data":"' + b"x" * (size - 23) + b'"}'
    assert len(body) == size
    return body


@pytest.mark.parametrize("chunked", [False, True])
async def test_the_body_limit_is_exact_and_the_connection_goes_on(small_body_limit, port, chunked):
    answers = await exchange(port, post("/api/publish", sized(2000), chunked),
                             post("/api/publish", sized(2001), chunked),
                             post("/api/publish", sized(5 * 2000), chunked),
                             post("/api/publish", sized(100), chunked))
    assert [a[0] for a in answers] == [200, 413, 413, 200]
    assert orjson.loads(answers[1][2])["error"] == {
        "code": "too_large", "message": "request body is over limits.max_body_bytes (2000)"}
    assert answers[1][1]["content-type"] == "application/json"
    assert await head_of(port, "a") == 2


@pytest.mark.parametrize("path", ["/healthz", "/ws", "/api/stats", "/nowhere", "/api/publish/batch"])
async def test_every_endpoint_answers_413_json(small_body_limit, port, path):
    for chunked in (False, True):
        ((status, headers, body),) = await exchange(port, post(path, sized(3000), chunked))
        assert status == 413 and orjson.loads(body)["error"]["code"] == "too_large"


async def test_with_expect_100_continue_the_413_comes_before_any_body(small_body_limit, port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {10**12}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)  # then the server hangs up
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in answer
    assert b"\r\nConnection: close\r\n" in answer
    assert b"100" not in answer.split(b"\r\n")[0][9:]


async def test_past_the_discard_allowance_the_connection_is_closed(small_body_limit, port, monkeypatch):
    monkeypatch.setattr(api_handlers, "DISCARD_BYTES", 100_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {10**9}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413 ")
        with pytest.raises((ConnectionError, OSError)):
            for _ in range(1000):  # 64 MB at most: the server stops reading long before
                writer.write(b"x" * 65536)
                await asyncio.wait_for(writer.drain(), 5)
    finally:
        writer.close()


# Auth


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/publish", {"topic": "a", "data": 1}),
    ("POST", "/api/publish/batch", {"messages": [{"topic": "a", "data": 1}]}),
    ("GET", "/api/topics/a/messages", None),
    ("GET", "/api/topics/a/presence", None),
    ("POST", "/api/users/alice/disconnect", None),
    ("GET", "/api/stats", None),
])
async def test_api_needs_a_valid_key(port, method, path, body):
    for key in (None, "wrong-key-123", "", "test-api-key-but-longer"):
        status, answer = await api(port, method, path, body, key=key)
        assert_error(status, answer, 401, "unauthorized")
    assert await head_of(port, "a") == 0


async def test_api_key_in_another_scheme_is_401(port):
    client = tornado.httpclient.AsyncHTTPClient()
    for header in ("Basic dGVzdC1hcGkta2V5", "test-api-key", "Token test-api-key"):
        response = await client.fetch(f"http://127.0.0.1:{port}/api/stats",
                                      headers={"Authorization": header}, raise_error=False)
        assert response.code == 401, header
        assert response.headers["Content-Type"].startswith("application/json")


# Idempotency


async def test_repeated_idempotency_key_returns_first_answer_and_stores_nothing(port):
    first = {"topic": "orders", "data": {"v": 1}, "idempotency_key": "order-17"}
    status, answer = await api(port, "POST", "/api/publish", first)
    assert status == 200 and answer["seq"] == 1
    again = {"topic": "orders", "data": {"v": 2}, "idempotency_key": "order-17"}
    status, repeat = await api(port, "POST", "/api/publish", again)
    assert status == 200 and repeat == answer
    stored = await history(port, "orders")
    assert stored["head"] == 1 and [m["data"] for m in stored["messages"]] == [{"v": 1}]
    # Same key, another topic: a different message.
    status, other = await api(port, "POST", "/api/publish",
                              {"topic": "invoices", "data": 3, "idempotency_key": "order-17"})
    assert status == 200 and other["topic"] == "invoices" and other["seq"] == 1
    # A batch repeating a key used earlier counts as a repeat too.
    status, batch = await api(port, "POST", "/api/publish/batch", {"messages": [
        {"topic": "orders", "data": {"v": 3}, "idempotency_key": "order-17"},
        {"topic": "orders", "data": {"v": 4}},
    ]})
    assert status == 200
    assert batch["results"][0] == answer and batch["results"][1]["seq"] == 2
    assert await head_of(port, "orders") == 2


async def test_repeated_idempotency_key_delivers_once(port, ws):
    client = await ws(token("alice", topics=["orders"]))
    await client.send({"type": "subscribe", "topic": "orders"})
    await client.expect("subscribed")
    for data in (1, 2):
        status, _ = await api(port, "POST", "/api/publish",
                              {"topic": "orders", "data": data, "idempotency_key": "k"})
        assert status == 200
    message = await client.expect("message")
    assert message["seq"] == 1 and message["data"] == 1
    await client.nothing()


async def test_key_repeated_inside_one_batch_counts_as_a_repeat(port):
    status, body = await api(port, "POST", "/api/publish/batch", {"messages": [
        {"topic": "t", "data": "first", "idempotency_key": "dup"},
        {"topic": "t", "data": "other"},
        {"topic": "t", "data": "second", "idempotency_key": "dup"},
    ]})
    assert status == 200, body
    first, other, second = body["results"]
    assert second == first and first["seq"] == 1 and other["seq"] == 2
    stored = await history(port, "t")
    assert stored["head"] == 2 and [m["data"] for m in stored["messages"]] == ["first", "other"]


# Batch


async def test_batch_results_in_order_with_consecutive_seqs(port):
    await api(port, "POST", "/api/publish", {"topic": "t1", "data": 0})
    items = [{"topic": "t1", "data": i} for i in range(1, 6)]
    items.insert(2, {"user": "dave", "data": "personal", "event": "ping"})
    status, body = await api(port, "POST", "/api/publish/batch", {"messages": items})
    assert status == 200, body
    results = body["results"]
    assert [(r["topic"], r["seq"]) for r in results] == [
        ("t1", 2), ("t1", 3), ("user:dave", 1), ("t1", 4), ("t1", 5), ("t1", 6)]
    assert all(set(r) == {"id", "topic", "seq", "time"} and RFC3339_UTC.match(r["time"])
               for r in results)
    assert len({r["id"] for r in results}) == 6
    stored = await history(port, "t1")
    assert [m["data"] for m in stored["messages"]] == [0, 1, 2, 3, 4, 5]
    assert [m["id"] for m in stored["messages"][1:]] == [r["id"] for r in results if r["topic"] == "t1"]
    assert (await history(port, "user:dave"))["messages"][0]["event"] == "ping"


@pytest.mark.parametrize("index,bad", [
    (2, {"topic": "a..b", "data": 1}),
    (1, {"topic": "good"}),
    (3, {"topic": "good", "user": "x", "data": 1}),
    (0, "not an object"),
    (2, {"topic": "good", "data": 1, "event": 7}),
    (1, {"topic": "good", "data": 1, "idempotency_key": ""}),
])
async def test_batch_with_one_bad_item_is_refused_whole(port, index, bad):
    items = [{"topic": "good", "data": i} for i in range(4)]
    items[index] = bad
    status, body = await api(port, "POST", "/api/publish/batch", {"messages": items})
    error = assert_error(status, body, 400)
    assert f"messages[{index}]" in error["message"], error
    assert await head_of(port, "good") == 0


async def test_batch_of_1000_is_accepted_and_1001_is_413(port):
    items = [{"topic": "bulk", "data": i} for i in range(1001)]
    status, body = await api(port, "POST", "/api/publish/batch", {"messages": items})
    assert_error(status, body, 413, "too_large")
    assert await head_of(port, "bulk") == 0
    status, body = await api(port, "POST", "/api/publish/batch", {"messages": items[:1000]})
    assert status == 200 and [r["seq"] for r in body["results"]] == list(range(1, 1001))


@pytest.mark.parametrize("body", [
    {}, {"messages": []}, {"messages": None}, {"messages": "x"}, {"messages": {"topic": "a"}},
    [], [{"topic": "a", "data": 1}], "messages", 3,
])
async def test_batch_malformed_is_400(port, body):
    status, answer = await api(port, "POST", "/api/publish/batch", body)
    assert_error(status, answer, 400)


# GET /api/topics/{topic}/messages


async def test_history_defaults_to_since_0_limit_100(port):
    await publish_batch(port, "h", 150)
    body = await history(port, "h")
    assert body["head"] == 150
    assert [m["seq"] for m in body["messages"]] == list(range(1, 101))
    assert [m["data"] for m in body["messages"]] == [{"n": i} for i in range(100)]
    assert all(set(m) == {"topic", "seq", "id", "time", "event", "data"} for m in body["messages"])
    body = await history(port, "h", "?since=140")
    assert [m["seq"] for m in body["messages"]] == list(range(141, 151))
    body = await history(port, "h", "?since=20&limit=5")
    assert [m["seq"] for m in body["messages"]] == [21, 22, 23, 24, 25]
    body = await history(port, "h", "?since=150")
    assert body == {"messages": [], "head": 150}


async def test_history_limit_up_to_1000(port):
    await publish_batch(port, "big", 1200)
    body = await history(port, "big", "?limit=1000")
    assert [m["seq"] for m in body["messages"]] == list(range(1, 1001)) and body["head"] == 1200
    status, answer = await api(port, "GET", "/api/topics/big/messages?limit=1001")
    assert_error(status, answer, 400, "bad_request")


async def test_history_of_unknown_topic_is_empty(port):
    assert await history(port, "never.used") == {"messages": [], "head": 0}


@pytest.mark.parametrize("query", [
    "since=abc", "since=1.5", "since=", "since=-1", "limit=x", "limit=2.0", "limit=-5",
    "limit=1001", "limit=" + "9" * 30, "since=0x10",
])
async def test_history_bad_query_is_400(port, query):
    status, body = await api(port, "GET", f"/api/topics/a/messages?{query}")
    assert_error(status, body, 400, "bad_request")


@pytest.mark.parametrize("since", [str(2**63), str(2**70), "9" * 40])
async def test_history_huge_since_is_not_a_500(port, since):
    await api(port, "POST", "/api/publish", {"topic": "a", "data": 1})
    status, body = await api(port, "GET", f"/api/topics/a/messages?since={since}")
    assert status < 500, (status, body)
    if status == 200:
        assert body == {"messages": [], "head": 1}
    else:
        assert_error(status, body, 400)


async def test_history_invalid_topic_is_400_invalid_topic(port):
    for topic in ("a..b", "a%20b", "%C3%BC", "a*"):
        status, body = await api(port, "GET", f"/api/topics/{topic}/messages")
        assert_error(status, body, 400, "invalid_topic")


# Presence, disconnect, stats


async def test_presence_lists_users_and_counts_connections(port, ws):
    status, body = await api(port, "GET", "/api/topics/news.x/presence")
    assert status == 200 and body == {"users": [], "connections": 0}
    alice1 = await ws(token("alice", topics=["news.>"]))
    alice2 = await ws(token("alice", topics=["news.>"]))
    bob = await ws(token("bob", topics=["news.>"]))
    for client in (alice1, alice2, bob):
        await client.send({"type": "subscribe", "topic": "news.x"})
        await client.expect("subscribed")
    status, body = await api(port, "GET", "/api/topics/news.x/presence")
    assert status == 200 and body == {"users": ["alice", "bob"], "connections": 3}
    status, body = await api(port, "GET", "/api/topics/user:alice/presence")
    assert status == 200 and body == {"users": ["alice"], "connections": 2}
    await alice1.send({"type": "unsubscribe", "topic": "news.x"})
    await alice1.expect("unsubscribed")
    status, body = await api(port, "GET", "/api/topics/news.x/presence")
    assert body == {"users": ["alice", "bob"], "connections": 2}
    bob.close()

    async def bob_gone():
        _, body = await api(port, "GET", "/api/topics/news.x/presence")
        return body == {"users": ["alice"], "connections": 1}
    await until(bob_gone)
    status, body = await api(port, "GET", "/api/topics/a..b/presence")
    assert_error(status, body, 400, "invalid_topic")


async def test_disconnect_closes_the_users_sockets_with_4001(port, ws):
    alice1 = await ws(token("alice"))
    alice2 = await ws(token("alice"))
    bob = await ws(token("bob"))
    status, body = await api(port, "POST", "/api/users/alice/disconnect")
    assert status == 200, body
    assert await alice1.closed() == 4001
    assert await alice2.closed() == 4001
    await bob.send({"type": "ping", "ref": "still"})
    assert (await bob.expect("pong"))["ref"] == "still"
    status, body = await api(port, "POST", "/api/users/nobody/disconnect")
    assert status == 200, body
    status, body = await api(port, "POST", "/api/users/a%20b/disconnect")
    assert_error(status, body, 400)


async def stats(port: int) -> dict:
    status, body = await api(port, "GET", "/api/stats")
    assert status == 200, body
    return body


async def test_stats_follow_connections_topics_and_messages(port, ws):
    before = await stats(port)
    assert {k: before[k] for k in ("connections", "topics", "messages_in", "messages_out")} == {
        "connections": 0, "topics": 0, "messages_in": 0, "messages_out": 0}
    alice = await ws(token("alice", topics=["news.>"]))
    bob = await ws(token("bob", topics=["news.>"]))
    for client in (alice, bob):
        await client.send({"type": "subscribe", "topic": "news.x"})
        await client.expect("subscribed")
    now = await stats(port)
    assert now["connections"] == 2 and now["topics"] == 3  # user:alice, user:bob, news.x
    await api(port, "POST", "/api/publish", {"topic": "news.x", "data": 1})
    await alice.expect("message")
    await bob.expect("message")
    await api(port, "POST", "/api/publish", {"topic": "nobody.listens", "data": 1})
    await api(port, "POST", "/api/publish", {"user": "alice", "data": 2})
    await alice.expect("message")
    now = await stats(port)
    assert now["messages_in"] == 3 and now["messages_out"] == 3
    bob.close()

    async def one_left():
        body = await stats(port)
        return body["connections"] == 1 and body["topics"] == 2
    await until(one_left)


# Health, readiness, metrics


async def test_healthz_and_readyz(port):
    for path in ("/healthz", "/readyz"):
        status, body = await api(port, "GET", path, key=None)
        assert status == 200, (path, body)


def samples(text: str) -> dict:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def metrics(port: int) -> tuple[str, dict]:
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(f"http://127.0.0.1:{port}/metrics", raise_error=False)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    return text, samples(text)


async def test_metrics_are_prometheus_text_prefixed_notifier(port, ws):
    text, values = await metrics(port)
    names = {name for name, _ in values}
    assert names and all(name.startswith("notifier_") for name in names), names
    assert re.findall(r"^# TYPE (\S+)", text, re.M)
    assert all(name.startswith("notifier_") for name in re.findall(r"^# TYPE (\S+)", text, re.M))
    assert values[("notifier_connections", ())] == 0
    client = await ws(token("alice", topics=["news.>"]))
    await client.send({"type": "subscribe", "topic": "news.x"})
    await client.expect("subscribed")
    for data in (1, 2):
        await api(port, "POST", "/api/publish", {"topic": "news.x", "data": data})
        await client.expect("message")
    _, values = await metrics(port)
    assert values[("notifier_connections", ())] == 1
    assert values[("notifier_messages_published_total", (("kind", "stored"), ("path", "http")))] == 2
    assert values[("notifier_messages_delivered_total", ())] == 2
    assert values[("notifier_subscriptions", ())] == 2


async def test_metrics_publish_to_delivery_latency_is_observed(port, ws):
    client = await ws(token("alice", topics=["news.>"]))
    await client.send({"type": "subscribe", "topic": "news.x"})
    await client.expect("subscribed")
    await api(port, "POST", "/api/publish", {"topic": "news.x", "data": 1})
    await client.expect("message")
    _, values = await metrics(port)
    assert values[("notifier_publish_to_delivery_seconds_count", ())] == 1


async def test_metrics_count_api_errors_by_code(port):
    await api(port, "POST", "/api/publish", {"topic": "a..b", "data": 1})
    await api(port, "GET", "/api/stats", key="wrong-key-123")
    _, values = await metrics(port)
    assert values[("notifier_errors_total", (("code", "invalid_topic"),))] == 1
    assert values[("notifier_errors_total", (("code", "unauthorized"),))] == 1


# Routing errors


# "/" is the demo page unless server.demo_page is off (tests/test_browser_client.py).
@pytest.mark.parametrize("path", ["/nope", "/api", "/api/nothing", "/api/topics/a",
                                  "/api/topics/a/messages/extra", "/ws/x", "/healthz/x"])
async def test_unknown_path_is_404_json(port, path):
    for method in ("GET", "POST"):
        status, body = await api(port, method, path, {} if method == "POST" else None)
        assert_error(status, body, 404, "not_found")


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/publish"), ("GET", "/api/publish/batch"), ("DELETE", "/api/publish"),
    ("POST", "/api/topics/a/messages"), ("DELETE", "/api/topics/a/presence"),
    ("GET", "/api/users/alice/disconnect"), ("POST", "/api/stats"),
    ("POST", "/healthz"), ("DELETE", "/readyz"), ("POST", "/metrics"),
])
async def test_wrong_method_is_405_json(port, method, path):
    status, body = await api(port, method, path, {} if method == "POST" else None)
    assert_error(status, body, 405)


# Never a 500 for bad input


MALFORMED_PUBLISH = [
    b"null", b"[]", b"[1,2]", b"1", b"-3.5", b'"topic"', b"true", b"{}",
    b"1e400", b"-1e400", b'{"topic":"a","data":1e400}', b'{"topic":"a","data":[-1e400]}',
    b'\xff\xfe\xfd', b'{"topic":"\xff","data":1}', b'{"topic":"a","data":"\xc3\x28"}',
    b'{"topic":"a","data":"\\ud800"}', b'{"topic":"a\\u0000","data":1}',
    b'{"topic":"a","data":' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"topic":"a","data":' + b'{"x":' * 2000 + b"1" + b"}" * 2000 + b"}",
    b'{"topic":{"nested":["junk",{"more":null}]},"data":1}',
    b'{"topic":["a"],"data":1}', b'{"topic":1e400,"data":1}', b'{"topic":true,"data":1}',
    b'{"user":12,"data":1}', b'{"user":null,"data":1}', b'{"user":"","data":1}',
    b'{"user":["bob"],"data":1}', b'{"user":"x y","data":1}',
    b'{"topic":"a","data":1,"event":{"x":1}}', b'{"topic":"a","data":1,"event":""}',
    b'{"topic":"a","data":1,"event":"' + b"e" * 1000 + b'"}',
    b'{"topic":"a","data":1,"idempotency_key":5}', b'{"topic":"a","data":1,"idempotency_key":[]}',
    b'{"topic":"a","data":1,"idempotency_key":"' + b"k" * 1000 + b'"}',
    b'{"topic":"a","data":1', b'{"topic":"a","data":1}}', b'{"topic":"a","data":1} x',
    b"\x00\x00\x00", b"\xef\xbb\xbf{}", b" " * 100,
]


async def test_publish_never_answers_500(port):
    for raw in MALFORMED_PUBLISH:
        for path in ("/api/publish", "/api/publish/batch"):
            body = raw if path == "/api/publish" else b'{"messages":[' + raw + b"]}"
            status, answer = await api(port, "POST", path, raw=body)
            assert 400 <= status < 500, (path, raw[:80], status, answer)
            assert_error(status, answer, status)
    # Nothing of the above was stored.
    assert await head_of(port, "a") == 0


@pytest.mark.parametrize("raw", [
    b'{"topic":"a","data":1' + b"0" * 400 + b".5}",
    b'{"topic":"a","data":' + b"9" * 30 + b"e400}",
    b'{"topic":"a","data":[-' + b"1" * 30 + b"e999]}",
    b'{"topic":"a","data":{"x":' + b"2" * 25 + b"E+500}}",
], ids=["400-digit-decimal", "30-digits-e400", "negative-e999-in-list", "E+500-in-object"])
async def test_numbers_beyond_a_double_are_refused_not_stored_as_null(port, raw):
    """Like ``1e400``: refused with 400, never rounded to infinity and stored as null."""
    for path, body in (("/api/publish", raw), ("/api/publish/batch", b'{"messages":[' + raw + b"]}")):
        status, answer = await api(port, "POST", path, raw=body)
        assert_error(status, answer, 400)
    assert await head_of(port, "a") == 0


@pytest.mark.parametrize("big", [2**70 + 1, -(2**70) - 1, 2**64 + 1, int("9" * 400)])
async def test_big_integers_are_refused_or_kept_exact(port, big):
    """``data`` is any JSON: an integer beyond 64 bits is either refused (4xx)
    or stored as sent, never silently rounded to a float."""
    raw = b'{"topic":"exact","data":' + str(big).encode() + b"}"
    status, answer = await api(port, "POST", "/api/publish", raw=raw)
    if status == 200:
        client = tornado.httpclient.AsyncHTTPClient()
        response = await client.fetch(f"http://127.0.0.1:{port}/api/topics/exact/messages",
                                      headers={"Authorization": "Bearer test-api-key"})
        assert b'"data":' + str(big).encode() + b"}" in response.body, response.body
    else:
        assert_error(status, answer, 400)


async def test_other_endpoints_never_answer_500(port):
    paths = [
        "/api/topics/%ff/messages", "/api/topics/%00/messages", "/api/topics/a/messages?since=%ff",
        "/api/topics/a/messages?limit=%00", "/api/topics/a/messages?since=1&since=2",
        "/api/topics/%ff/presence", "/api/topics/" + "a" * 5000 + "/messages",
        "/api/topics/a/messages?since=" + "9" * 5000,
    ]
    for path in paths:
        status, body = await api(port, "GET", path)
        assert 400 <= status < 500 or status == 200, (path, status, body)
        if status != 200:
            assert_error(status, body, status)
    for path in ("/api/users/%ff/disconnect", "/api/users/%00/disconnect",
                 "/api/users/" + "u" * 500 + "/disconnect"):
        status, body = await api(port, "POST", path)
        assert_error(status, body, 400)


async def test_non_ascii_authorization_is_401_not_500(port):
    client = tornado.httpclient.AsyncHTTPClient()
    response = await client.fetch(f"http://127.0.0.1:{port}/api/stats",
                                  headers={"Authorization": "Bearer cl\xe9-\xff"}, raise_error=False)
    assert response.code == 401


# Drain


async def test_during_drain_new_requests_get_503(services, port):
    services.draining = True
    for method, path, body in [
        ("POST", "/api/publish", {"topic": "a", "data": 1}),
        ("POST", "/api/publish/batch", {"messages": [{"topic": "a", "data": 1}]}),
        ("GET", "/api/topics/a/messages", None),
        ("GET", "/api/stats", None),
    ]:
        status, answer = await api(port, method, path, body)
        assert_error(status, answer, 503)
    status, _ = await api(port, "GET", "/readyz", key=None)
    assert status == 503
    status, _ = await api(port, "GET", "/healthz", key=None)
    assert status == 200
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await connect(port, token("alice"))
    assert refused.value.code == 503
    services.draining = False
    assert await head_of(port, "a") == 0

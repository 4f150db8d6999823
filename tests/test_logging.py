"""SPEC "Under systemd" and "Authentication": logs are one JSON object per
line, with fixed event names, and a token or API key never appears in them."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import orjson
import pytest
import tornado.httpclient

from notifier import logs
from support import API_KEY, api, connect, lines, token

WRONG_KEY = "wrong-key-0123456789"


async def wait_for_event(stream: io.StringIO, event: str, count: int = 1, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for line in lines(stream) if line["event"] == event) < count:
        assert time.monotonic() < deadline, f"no {event!r} logged"
        await asyncio.sleep(0.02)


async def test_logs_are_json_events_without_secrets(captured, port):
    query_jwt = token("alice", topics=["news.>"], publish=["news.>"])
    header_jwt = token("bob", topics=["news.>"])
    bad_jwt = token("mallory", secret="another-secret-" + "y" * 32)
    expired_jwt = token("eve", ttl=-60)
    secrets = [query_jwt, header_jwt, bad_jwt, expired_jwt, API_KEY, WRONG_KEY]

    alice = await connect(port, query_jwt)
    bob = await connect(port, None, headers={"Authorization": f"Bearer {header_jwt}"})
    for jwt in (bad_jwt, expired_jwt):
        with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
            await connect(port, jwt)
        assert refused.value.code == 401
    with pytest.raises(tornado.httpclient.HTTPClientError):
        await connect(port, None, headers={"Authorization": f"Bearer {bad_jwt}"})

    await alice.send({"type": "publish", "topic": "news.x", "data": 1, "ref": 1})
    await alice.expect("published")
    status, body = await api(port, "POST", "/api/publish", {"topic": "news.x", "data": {"a": 1}})
    assert status == 200, body
    status, _ = await api(port, "POST", "/api/publish", {"topic": "news.x", "data": 2}, key=WRONG_KEY)
    assert status == 401
    # A request the server fails on must not leak a token from its query either.
    await api(port, "GET", f"/api/topics/news.x/messages?since={2**70}&token={query_jwt}")
    status, _ = await api(port, "GET", f"/api/stats?token={query_jwt}")
    assert status == 200

    for client in (alice, bob):
        client.connection.close(1000)
        assert await client.closed() == 1000
    await wait_for_event(captured, "connection.close", 2)

    text = captured.getvalue()
    for secret in secrets:
        assert secret not in text, f"secret {secret[:12]}... logged"
    records = lines(captured)
    assert records
    for record in records:
        assert {"event", "level", "timestamp"} <= set(record), record
        assert record["level"] in ("debug", "info", "warning", "error", "critical"), record
        assert record["timestamp"].endswith("Z"), record
    events = {record["event"] for record in records}
    assert {"connection.open", "connection.close", "connection.refused", "publish", "http.request"} <= events

    opened = [r for r in records if r["event"] == "connection.open"]
    assert sorted(r["user"] for r in opened) == ["alice", "bob"]
    closed = [r for r in records if r["event"] == "connection.close"]
    assert sorted(r["user"] for r in closed) == ["alice", "bob"]
    assert all(isinstance(r["duration"], (int, float)) and r["duration"] >= 0 for r in closed)
    assert {r["conn"] for r in closed} == {r["conn"] for r in opened}
    published = [r for r in records if r["event"] == "publish"]
    assert sorted(r["path"] for r in published) == ["http", "ws"]
    assert all(r["topic"] == "news.x" for r in published)
    requests = [r for r in records if r["event"] == "http.request"]
    assert {(r["method"], r["path"], r["status"]) for r in requests} >= {
        ("POST", "/api/publish", 200), ("POST", "/api/publish", 401), ("GET", "/ws", 401),
        ("GET", "/api/stats", 200)}
    assert all("?" not in r["path"] for r in requests)
    assert {r["level"] for r in requests if r["status"] == 401} == {"warning"}


async def test_stdlib_and_tornado_loggers_come_out_as_redacted_json(captured):
    jwt = token("alice")
    logging.getLogger("tornado.application").error("x token=abc.def.ghi")
    logging.getLogger("tornado.general").warning("bad frame from %s", jwt)
    logging.getLogger("some.library").warning("sent Authorization: Bearer %s", API_KEY)
    try:
        raise ValueError(f"while handling /ws?token={jwt}")
    except ValueError:
        logging.getLogger("tornado.application").exception("Uncaught exception")
    text = captured.getvalue()
    for secret in ("abc.def.ghi", jwt, API_KEY):
        assert secret not in text
    first, second, third, fourth = lines(captured)
    assert first["event"] == "x token=[redacted]" and first["level"] == "error"
    assert first["logger"] == "tornado.application" and first["timestamp"]
    assert second["event"] == "bad frame from [redacted]" and second["level"] == "warning"
    assert third["event"] == "sent Authorization: Bearer [redacted]"
    assert fourth["level"] == "error" and "ValueError" in orjson.dumps(fourth).decode()


async def test_structlog_fields_named_like_secrets_are_redacted(captured):
    logs.get().info("auth.debug", token="abc", api_key=API_KEY, authorization=f"Bearer {API_KEY}")
    (record,) = lines(captured)
    assert record["event"] == "auth.debug"
    assert record["token"] == record["api_key"] == record["authorization"] == "[redacted]"
    assert API_KEY not in captured.getvalue()


async def test_log_level_filters_our_events_and_stdlib_ones(captured):
    logs.configure("warning", stream=captured)
    logs.get().info("quiet.event")
    logging.getLogger("tornado.general").info("quiet too")
    logs.get().warning("loud.event", topic="a")
    logging.getLogger("tornado.general").error("loud too")
    assert [(r["event"], r["level"]) for r in lines(captured)] == [
        ("loud.event", "warning"), ("loud too", "error")]


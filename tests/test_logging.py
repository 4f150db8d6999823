"""SPEC "Under systemd" and "Authentication": logs are one JSON object per
line, with fixed event names, and a token or API key never appears in them."""

from __future__ import annotations

import asyncio
import base64
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


class TestScrub:
    """logs.scrub, which every field of every line goes through."""

    JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"

    @pytest.mark.parametrize("text", [
        "GET /ws?token=abc.def", "GET /ws?%74oken=abc.def", "GET /ws?t%6Fk%65n=abc.def",
        "GET /ws?%2574oken=abc.def", "GET /ws?x=1&TOKEN=abc.def", "?access_token=abc.def",
        "?api_key=abc.def", "?apikey=abc.def", "?key=abc.def", "?password=abc.def",
        "?secret=abc.def", "authorization=abc.def", "Authorization: Bearer abc.def",
        "authorization: bearer abc.def", "Bearer%20abc.def",
    ])
    def test_secret_parameters_in_any_spelling(self, text):
        scrubbed = logs.scrub(text)
        assert "abc.def" not in scrubbed and "[redacted]" in scrubbed

    def test_a_header_that_starts_with_a_line_break(self):
        header = base64.urlsafe_b64encode(b'{\n"alg":"HS256"}').rstrip(b"=").decode()
        assert header.startswith("ew")
        assert logs.scrub(f"/x/{header}.e30.c2lnbmF0dXJlLXBhcnQ") == "/x/[redacted]"

    @pytest.mark.parametrize("spelling", [
        JWT, JWT.replace(".", "%2E"), JWT.replace("e", "%65"),
        "".join(f"%{ord(c):02X}" for c in JWT), JWT.replace(".", "%252E"),
    ])
    def test_anything_shaped_like_a_jwt(self, spelling):
        scrubbed = logs.scrub(f"400 GET /nowhere/{spelling} (127.0.0.1): bad")
        assert "c2lnbmF0dXJlLXBhcnQ" not in scrubbed and "[redacted]" in scrubbed

    def test_configured_secrets_whatever_their_shape(self):
        logs.hide(["plain-words-as-a-key", ""])
        for text in ("x plain-words-as-a-key y", "x plain%2Dwords%2Das%2Da%2Dkey y"):
            assert "plain-words-as-a-key" not in logs.scrub(text).replace("%2D", "-")
        assert "dev-" + "a" * 24 not in logs.scrub("key dev-" + "a" * 24)

    @pytest.mark.parametrize("text", [
        "/api/topics/a%20b/messages", "news.sport", "idempotency_key=abc", "seq=41",
        "100% of them", "eyes.on.it", "019a3c61b20c9d8e7f6a5b4c",
    ])
    def test_ordinary_text_is_left_alone(self, text):
        assert logs.scrub(text) == text

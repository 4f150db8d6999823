"""limits.publishes_per_second: a token bucket per API key, 429 with Retry-After."""

from __future__ import annotations

import orjson
import pytest
import tornado.httpclient

from support import API_KEY, api

OTHER_KEY = "another-api-key"


@pytest.fixture
def limited(config):
    config.limits.publishes_per_second = 5
    config.auth.api_keys = [API_KEY, OTHER_KEY]
    return config


async def test_publishes_over_the_rate_get_429_with_retry_after(limited, port):
    statuses = []
    for n in range(8):
        status, body = await api(port, "POST", "/api/publish", {"topic": "limited", "data": n})
        statuses.append(status)
        if status == 429:
            assert body["error"]["code"] == "rate_limited"
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]
    # Each key has its own bucket.
    status, _ = await api(port, "POST", "/api/publish", {"topic": "limited", "data": "x"}, key=OTHER_KEY)
    assert status == 200
    # Refused publishes were not stored.
    status, body = await api(port, "GET", "/api/topics/limited/messages")
    assert body["head"] == statuses.count(200) + 1


async def test_retry_after_header_and_batches_spend_one_token_per_message(limited, port):
    batch = {"messages": [{"topic": "limited", "data": n} for n in range(20)]}
    status, _ = await api(port, "POST", "/api/publish/batch", batch)
    assert status == 200  # allowed, but it spends 20 tokens: the bucket is now in debt
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}/api/publish", method="POST", raise_error=False,
        headers={"Authorization": f"Bearer {API_KEY}"},
        body=orjson.dumps({"topic": "limited", "data": "next"}))
    assert response.code == 429
    assert int(response.headers["Retry-After"]) >= 3  # ~16 tokens owed at 5/s


async def test_unlimited_by_default(config, port):
    assert config.limits.publishes_per_second == 0
    for n in range(30):
        status, _ = await api(port, "POST", "/api/publish", {"topic": "free", "data": n})
        assert status == 200

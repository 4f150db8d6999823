"""The fixed corpus of issue 11: inputs that once dropped a connection,
answered 500 or 503, leaked a token into the log, or hung a publisher. One
test per class of defect; each failed on the code before its fix.
tests/test_properties.py throws generated inputs at the same surfaces."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import jwt as pyjwt
import pytest
import tornado.httpclient

from support import API_KEY, SECRET, api, connect, lines, token

# A run of 20 digits sends a frame or body through the exact (stdlib) parser,
# where most of class 1 used to get past the checks.
LONG = "12345678901234567890"


async def expect_error(client, code: str, ref=None) -> dict:
    reply = await client.expect("error")
    assert reply["code"] == code, reply
    assert reply.get("ref") == ref, reply
    return reply


async def still_open(client) -> None:
    await client.send({"type": "ping", "ref": "alive"})
    assert await client.expect("pong") == {"type": "pong", "ref": "alive"}


async def raw_get(port: int, path: str) -> bytes:
    """The body of a GET, unparsed: orjson would turn wide integers into floats."""
    response = await tornado.httpclient.AsyncHTTPClient().fetch(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {API_KEY}"})
    return response.body


# 1. Values the parser accepted but the encoder or the store could not handle


CANNOT_ECHO_OR_STORE = [
    '{"type":"ping","ref":%d}' % 2**64,
    '{"type":"ping","ref":%d}' % (-2**63 - 1),
    '{"type":"ping","ref":"\\ud800","n":%s}' % LONG,
    '{"type":"publish","topic":"news.a","data":"\\ud800","n":%s}' % LONG,
    '{"type":"publish","topic":"news.a","data":{"\\udfff":1},"n":%s}' % LONG,
    '{"type":"publish","topic":"news.a","data":1,"event":"\\udc00","n":%s}' % LONG,
    '{"type":"publish","topic":"news.a","data":1,"event":"\\ud800","ephemeral":true,"n":%s}' % LONG,
    '{"type":"auth","token":"\\ud800","n":%s}' % LONG,
    '{"type":"subscribe","topic":"news.a","epoch":"\\ud800","n":%s}' % LONG,
]


async def test_ws_refuses_values_it_could_not_echo_or_store(port):
    client = await connect(port, token("alice", publish=["news.>"]))
    for frame in CANNOT_ECHO_OR_STORE:
        await client.send(frame)
        await expect_error(client, "bad_request")
    await still_open(client)
    status, body = await api(port, "GET", "/api/topics/news.a/messages")
    assert status == 200 and body["head"] == 0


@pytest.mark.parametrize("body", [
    '{"topic":"news.a","data":"\\ud800","n":%s}' % LONG,
    '{"topic":"news.a","data":["\\udc00\\ud800"],"n":%s}' % LONG,
    '{"topic":"news.a","data":1,"event":"\\ud800","n":%s}' % LONG,
    '{"topic":"news.a","data":1,"idempotency_key":"\\ud800","n":%s}' % LONG,
    '{"user":"\\ud800","data":1,"n":%s}' % LONG,
    '{"messages":[{"topic":"news.a","data":1},{"topic":"news.a","data":"\\udbff"}],"n":%s}' % LONG,
])
async def test_http_refuses_lone_surrogates_with_400(port, body):
    path = "/api/publish/batch" if body.startswith('{"messages"') else "/api/publish"
    status, answer = await api(port, "POST", path, raw=body.encode())
    assert status == 400 and answer["error"]["code"] == "bad_request", answer
    # Raw UTF-8-encoded surrogates are not UTF-8 at all.
    status, answer = await api(port, "POST", "/api/publish",
                               raw=b'{"topic":"news.a","data":"\xed\xa0\x80","n":' + LONG.encode() + b"}")
    assert status == 400 and answer["error"]["code"] == "bad_request", answer
    assert (await api(port, "GET", "/api/topics/news.a/messages"))[1]["head"] == 0


EXACT = [-9999999999999999999, -2**63 - 1, -2**63, 2**63 - 1, 2**64 - 1, 2**64, 10**30, -10**30]


async def test_integers_stay_exact_on_both_paths(port):
    numbers = "[" + ",".join(str(n) for n in EXACT) + "]"
    status, answer = await api(port, "POST", "/api/publish",
                               raw=('{"topic":"news.n","data":%s}' % numbers).encode())
    assert status == 200, answer
    client = await connect(port, token("alice", publish=["news.>"]))
    await client.send('{"type":"publish","topic":"news.n","data":%s,"ref":%d}' % (numbers, -2**63))
    reply = await client.expect("published")
    assert reply["ref"] == -2**63
    for n in (-9999999999999999999, -2**63 - 1):  # fewer than 20 digits, outside 64 bits
        await client.send('{"type":"publish","topic":"news.n","data":%d}' % n)
        await client.expect("published")
    history = json.loads(await raw_get(port, "/api/topics/news.n/messages"))
    assert [m["data"] for m in history["messages"]] == [EXACT, EXACT, -9999999999999999999, -2**63 - 1]


# 2. Depth


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize("data", [nested(300), nested(1000), nested(1000, LONG), nested(10000, LONG),
                                  '{"a":' * 1000 + "1" + "}" * 1000])
async def test_deep_data_is_bad_request_on_both_paths(port, data):
    client = await connect(port, token("alice", publish=["news.>"]))
    await client.send('{"type":"publish","topic":"news.d","data":%s,"ref":1}' % data)
    reply = await client.expect("error")
    assert reply["code"] == "bad_request", reply
    await still_open(client)
    status, answer = await api(port, "POST", "/api/publish",
                               raw=('{"topic":"news.d","data":%s}' % data).encode())
    assert status == 400 and answer["error"]["code"] == "bad_request", answer


# 4. Tokens


def signed(**claims) -> str:
    return pyjwt.encode({"sub": "alice", **claims}, SECRET, algorithm="HS256")


@pytest.mark.parametrize("claims", [
    {"exp": 10**30}, {"exp": 1e300}, {"exp": 2**64},
    {"exp": int(time.time()) + 3600, "iat": 10**30},
    {"exp": int(time.time()) + 3600, "nbf": 10**30},
])
async def test_extreme_claims_are_unauthorized_at_the_handshake_and_at_auth(port, claims):
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await connect(port, signed(**claims))
    assert refused.value.code == 401
    client = await connect(port, token("alice"))
    await client.send({"type": "auth", "token": signed(**claims), "ref": 9})
    await expect_error(client, "unauthorized", 9)
    await still_open(client)


@pytest.mark.parametrize("query", ["token=%FF", "token=%C3%28", "token=%ED%A0%80", "%74oken=%FF.%FE.%FD"])
async def test_a_token_that_is_not_utf8_is_401_json(port, query):
    status, body = await api(port, "GET", f"/ws?{query}", key=None)
    assert status == 401 and body["error"]["code"] == "unauthorized", body


async def test_percent_escaped_secrets_never_reach_the_log(captured, port):
    jwt = token("alice")
    signature = jwt.rsplit(".", 1)[1]
    hidden = jwt.replace(".", "%2E")  # what a client may send; Tornado decodes it to the token
    requests = [
        f"/api/topics/news.x/messages?since=%FF&%74oken={hidden}",
        f"/api/topics/news.x/messages?since=%FF&t%6Fken={quote(jwt, safe='')}",
        f"/api/topics/news.x/messages?since=%FF&%61pi_key={API_KEY}",
        f"/api/topics/news.x/messages?since=%FF&x={quote(quote(jwt, safe=''), safe='')}",
        f"/nowhere/{hidden}",
        f"/nowhere?k={quote(API_KEY, safe='').replace('-', '%2D')}",
    ]
    for path in requests:
        status, _ = await api(port, "GET", path)
        assert status in (400, 404), path
    # The token spelled with escapes still works, and does not show either.
    status, _ = await api(port, "GET", f"/ws?%74oken={hidden}", key=None)
    assert status == 400  # a valid token, but not a WebSocket request
    marker = "/marker-done"
    await api(port, "GET", marker)
    text = captured.getvalue()
    assert marker in text
    lines(captured)  # every line still JSON
    assert signature not in text and jwt not in text
    assert API_KEY not in text and quote(API_KEY, safe="").replace("-", "%2D") not in text

"""The fixed corpus of issue 11: inputs that once dropped a connection,
answered 500 or 503, leaked a token into the log, or hung a publisher. One
test per class of defect; each failed on the code before its fix.
tests/test_properties.py throws generated inputs at the same surfaces."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import quote

import jwt as pyjwt
import pytest
import tornado.httpclient

from notifier.messages import Draft
from notifier.store.sqlite import SQLiteStore
from procs import ServerProcess
from support import API_KEY, SECRET, api, connect, lines, token, upgrade_request

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


# 5. Oversized bodies


async def raw_request(port: int, head: bytes, parts, timeout: float = 30) -> tuple[int, dict, bytes]:
    """Send ``head`` then each of ``parts`` on one connection while reading
    the answer; returns (status, headers, body) and checks the server read
    everything sent (no reset while sending)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send():
        writer.write(head)
        for part in parts:
            writer.write(part)
            await writer.drain()

    sender = asyncio.ensure_future(send())
    try:
        header_block = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(
            reader.readexactly(int(headers.get("content-length", "0"))), timeout)
        await asyncio.wait_for(sender, timeout)
        return int(status_line.split()[1]), headers, body
    finally:
        sender.cancel()
        writer.close()


def publish_body(size: int) -> bytes:
    head = b'{"topic":"news.big","data":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def content_length_request(body: bytes) -> tuple[bytes, list[bytes]]:
    head = (f"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head, [body[at:at + 65536] for at in range(0, len(body), 65536)]


def chunked_request(body: bytes) -> tuple[bytes, list[bytes]]:
    head = (f"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)
             for chunk in (body[at:at + 65536] for at in range(0, len(body), 65536))]
    return head, parts + [b"0\r\n\r\n"]


MiB = 1024 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real ``notifier serve``: the body limit lives in how it builds its
    HTTP server, which the in-process ``port`` fixture does not share."""
    with ServerProcess(tmp_path_factory.mktemp("served")) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("framing", [content_length_request, chunked_request])
@pytest.mark.parametrize("size", [2 * MiB + 22, 8 * MiB])
async def test_any_body_over_the_limit_is_413_json(served, framing, size):
    head, parts = framing(publish_body(size))
    status, headers, body = await raw_request(served.port, head, parts)
    assert status == 413, (status, headers, body)
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == "too_large"
    assert served.request("GET", "/api/topics/news.big/messages")[1]["head"] == 0


# 6. Found by reading the code


async def test_a_raising_commit_callback_is_logged_and_its_group_still_resolves(captured, tmp_path):
    store = SQLiteStore(tmp_path / "notifier.db", 100, 3600)
    await store.open()
    try:
        def broken(result):
            raise RuntimeError("a bug in a commit callback")
        appends = [store.append([Draft("news.a", b"1")], on_durable=broken),
                   store.append([Draft("news.a", b"2")]),
                   store.append([Draft("news.a", b"3")], on_durable=broken)]
        results = await asyncio.wait_for(asyncio.gather(*appends), 5)
        assert sorted(r.receipts[0].seq for r in results) == [1, 2, 3]
    finally:
        await store.close()
    failures = [r for r in lines(captured) if r["event"] == "store.on_durable_failed"]
    assert len(failures) == 2 and all("a bug in a commit callback" in r["exception"] for r in failures)


async def test_a_text_frame_that_is_not_utf8_is_bad_request_and_the_socket_stays(port):
    # Tornado decodes text frames itself and, on bytes that are not UTF-8,
    # drops the connection without a close frame; notifier reads them as
    # bytes instead (internals.text_as_bytes) and answers like any bad frame.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upgrade_request(port, token('alice')))
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    await reader.readuntil(b"\r\n\r\n")

    def client_frame(payload: bytes) -> bytes:
        mask = b"\x01\x02\x03\x04"
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        return bytes((0x81, 0x80 | len(payload))) + mask + masked

    async def next_frame() -> dict:
        head = await asyncio.wait_for(reader.readexactly(2), 5)
        assert head[0] == 0x81, head  # a text frame, not a close
        length = head[1]
        if length == 126:
            length = int.from_bytes(await reader.readexactly(2), "big")
        return json.loads(await reader.readexactly(length))

    assert (await next_frame())["type"] == "welcome"
    assert (await next_frame())["type"] == "subscribed"
    writer.write(client_frame(b'{"type":"ping","ref":"\xff\xfe"}'))
    error = await next_frame()
    assert error["type"] == "error" and error["code"] == "bad_request"
    writer.write(client_frame(b'{"type":"ping","ref":1}'))
    assert await next_frame() == {"type": "pong", "ref": 1}
    writer.close()

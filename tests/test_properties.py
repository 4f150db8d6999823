"""Property-based tests (hypothesis): generated hostile input at every
WebSocket command, every HTTP endpoint and both token checks, against the
real server on loopback, while a well-behaved subscriber and publisher are
served throughout (``Witness``). Expected every time:

- a SPEC answer: an error code from SPEC's list, never a 5xx;
- no dropped connection but the documented closes (1009 for a frame above
  the limit);
- no message of another client lost: the witness sees every one of its
  messages, durable and ephemeral, in order;
- no token, API key or secret in any log line (the server's whole log is
  captured).

Examples per test come from the hypothesis profile: ``ci`` (the default,
what ``make test`` runs) or ``thorough``: ``HYPOTHESIS_PROFILE=thorough``.
No example database is kept (``database=None``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from urllib.parse import quote, unquote

import orjson
import pytest
import tornado.httpclient
import tornado.websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifier.auth import MAX_EXP
from support import API_KEY, SECRET, api, connect, lines, token

settings.register_profile(
    "ci", max_examples=200, deadline=None, database=None, print_blob=True,
    # One server, one witness and one hostile client serve all the examples
    # of a test: that is the point (a bad input must not spoil later ones).
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SPEC_ERRORS = {"bad_request", "unknown_type", "forbidden", "invalid_topic", "too_large",
               "rate_limited", "unauthorized"}
REPLIES = {"error", "pong", "subscribed", "unsubscribed", "published", "authenticated", "message"}
# SPEC's error statuses, and notifier's documented 405.
HTTP_STATUSES = {200, 400, 401, 403, 404, 405, 413, 422, 429}
WITNESS_TOPIC = "witness.feed"
WITNESS_USERS = {"witness-sub", "witness-pub"}
BODY_LIMIT = 64 * 1024
ROUND_TIMEOUT = 10.0


@pytest.fixture
def config(config):
    # Hostile clients send as fast as they can: the rate limit has its own tests.
    config.limits.commands_per_second = 1_000_000
    config.limits.commands_burst = 1_000_000
    config.limits.max_body_bytes = BODY_LIMIT
    return config


def run(io_loop, coroutine_function, timeout: float = 30):
    return io_loop.run_sync(coroutine_function, timeout=timeout)


# The witness: a well-behaved subscriber and publisher


class Witness:
    """Each round publishes over HTTP and over the socket (durable and
    ephemeral), while a hostile input is being handled, and waits for its
    subscriber to get all three."""

    def __init__(self, port: int):
        self.port = port
        self.round_number = 0
        self.last_seq = 0

    async def open(self) -> "Witness":
        jwts = [token("witness-sub", topics=["witness.>"]),
                token("witness-pub", topics=[], publish=["witness.>"])]
        self.signatures = [jwt.rsplit(".", 1)[1] for jwt in jwts]
        self.subscriber = await connect(self.port, jwts[0])
        await self.subscriber.send({"type": "subscribe", "topic": WITNESS_TOPIC, "ref": "w"})
        await self.subscriber.expect("subscribed")
        self.publisher = await connect(self.port, jwts[1])
        return self

    async def round(self) -> None:
        await asyncio.wait_for(self._round(), ROUND_TIMEOUT)

    async def _round(self) -> None:
        self.round_number += 1
        n = self.round_number
        status, body = await api(self.port, "POST", "/api/publish",
                                 {"topic": WITNESS_TOPIC, "data": {"n": n, "via": "http"}})
        assert status == 200, body
        await self.publisher.send({"type": "publish", "topic": WITNESS_TOPIC,
                                   "data": {"n": n, "via": "ws"}, "ref": n})
        await self.publisher.send({"type": "publish", "topic": WITNESS_TOPIC, "ephemeral": True,
                                   "data": {"n": n, "via": "live"}, "ref": -n})
        refs = {(await self.publisher.expect("published"))["ref"] for _ in range(2)}
        assert refs == {n, -n}
        missing = {"http", "ws", "live"}
        while missing:
            message = await self.subscriber.expect("message")
            if message["seq"] is not None:
                assert message["seq"] > self.last_seq, message  # in order, never twice
                self.last_seq = message["seq"]
            data = message["data"]
            if isinstance(data, dict) and data.get("n") == n:
                missing.discard(data["via"])

    async def close(self) -> None:
        for client in (self.subscriber, self.publisher):
            client.connection.close(1000)
            assert await client.closed() == 1000


def check_log(captured, *secrets: str) -> None:
    lines(captured)  # every line is one JSON object
    text = captured.getvalue()
    for secret in (API_KEY, SECRET, *secrets):
        found = [line for line in text.splitlines() if secret in line]
        assert not found, f"{secret[:12]}... is in the log: {found[0][:2000]}"


# Generated JSON, as text: Python values through json.dumps (lone
# surrogates become \ud800 escapes, wide integers stay exact), plus texts no
# Python value gives (deep, huge, not JSON at all).

EDGE_INTEGERS = st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1,
                                 -9999999999999999999, 10**30, -10**30, 10**400, 0, -1])
SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
STRINGS = st.one_of(
    st.text(max_size=20), SURROGATES,
    st.tuples(st.text(max_size=4), SURROGATES, st.text(max_size=4)).map("".join),
)
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), EDGE_INTEGERS,
                   st.floats(allow_nan=False, allow_infinity=False), STRINGS)
VALUES = st.recursive(LEAVES, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(STRINGS, children, max_size=4)), max_leaves=10)


def nested(depth: int, opening: str) -> str:
    if opening == "[":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


RAW_JSON = st.one_of(
    st.builds(nested, st.integers(20, 3000), st.sampled_from("[{")),
    st.builds(nested, st.sampled_from([31, 32, 33, 62, 63, 64, 65]), st.sampled_from("[{")),
    st.integers(30_000, 72_000).map(lambda n: '"' + "x" * n + '"'),  # around the 64 KiB limits
    st.integers(4200, 4400).map(lambda n: "1" + "0" * n),  # Python reads up to 4300 digits
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-0", "1.5e-400", "01", "[1,]",
                     '"\\ud800"', '"\\udfff\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"', "tru", '"']),
)
JSON_TEXT = st.one_of(VALUES.map(json.dumps), VALUES.map(json.dumps), RAW_JSON)
# For tokens, which travel in a URL or a header: Tornado reads at most 64 KiB
# of request line and headers.
SMALL_RAW_JSON = st.one_of(
    st.builds(nested, st.integers(20, 1000), st.sampled_from("[{")),
    st.sampled_from(["NaN", "1e400", '"\\ud800"', "tru", "[1,]", "1" + "0" * 4400]),
)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Tokens:
    """Forged and extreme JWTs; remembers the signature of every one signed
    with the server's secret whose header is a JSON object (what makes a
    token a token), none of which may reach the log."""

    def __init__(self):
        self.signatures: set[str] = set()

    def build(self, header: str, payload: str, signing: str) -> str:
        signed_part = f"{b64(header.encode('utf-8', 'surrogatepass'))}." \
                      f"{b64(payload.encode('utf-8', 'surrogatepass'))}"
        if signing == "secret":
            signature = b64(hmac.new(SECRET.encode(), signed_part.encode(), hashlib.sha256).digest())
            if header.startswith("{"):
                self.signatures.add(signature)
        elif signing == "other":
            signature = b64(hmac.new(b"not-the-secret" * 3, signed_part.encode(), hashlib.sha256).digest())
        else:
            signature = signing
        return f"{signed_part}.{signature}"


def claims_text(now: int):
    times = st.one_of(st.just(now + 3600), st.just(now - 10), st.integers(), EDGE_INTEGERS,
                      st.floats(allow_nan=False), STRINGS, st.just(MAX_EXP), st.just(MAX_EXP + 1))
    known = st.fixed_dictionaries({}, optional={
        "sub": st.one_of(st.just("mallory"), st.just("witness-sub"), VALUES),
        "exp": times, "iat": times, "nbf": times,
        "topics": st.one_of(st.just([">"]), st.lists(STRINGS, max_size=3), VALUES),
        "publish": st.one_of(st.just(["hostile.>"]), VALUES),
        "aud": VALUES, "iss": VALUES,
    }).map(json.dumps)
    # A valid claim set with one or two claims replaced: what gets furthest.
    valid = {"sub": "mallory", "exp": now + 3600, "topics": [">"], "publish": ["hostile.>"]}
    near_valid = st.dictionaries(st.sampled_from(["sub", "exp", "iat", "nbf", "topics", "publish"]),
                                 st.one_of(times, VALUES), min_size=1, max_size=2).map(
        lambda changed: json.dumps({**valid, **changed}))
    infinite = st.sampled_from(['{"sub":"mallory","exp":Infinity}', '{"sub":"mallory","exp":NaN}',
                                f'{{"sub":"mallory","exp":{now + 3600},"iat":-Infinity}}',
                                '{"sub":"mallory","exp":1e400}'])
    return st.one_of(near_valid, near_valid, known, infinite, SMALL_RAW_JSON)


def tokens_strategy(tokens: Tokens):
    now = int(time.time())
    header = st.one_of(
        st.just('{"alg":"HS256","typ":"JWT"}'), st.just('{"alg":"HS256"}'),
        st.fixed_dictionaries({"alg": st.one_of(st.sampled_from(
            ["HS256", "HS512", "none", "None", "RS256", "ES256", "hs256", ""]), VALUES)},
            optional={"typ": VALUES, "kid": VALUES, "crit": VALUES}).map(json.dumps),
        SMALL_RAW_JSON,
    )
    signing = st.one_of(st.just("secret"), st.just("secret"), st.just("other"),
                        st.text("ABCDEFabcdef0123456789-_", max_size=50))
    forged = st.builds(tokens.build, header, claims_text(now), signing)
    # Rightly signed, every claim fine but one at an edge.
    edges = st.sampled_from([10**30, 2**64, 2**63, 1e300, -1e300, MAX_EXP, MAX_EXP + 1, 0, -1, True])
    extreme = st.builds(tokens.build, st.just('{"alg":"HS256","typ":"JWT"}'), st.builds(
        lambda claim, value: json.dumps({"sub": "mallory", "exp": now + 3600, claim: value}),
        st.sampled_from(["exp", "iat", "nbf"]), edges), st.just("secret"))
    return st.one_of(forged, forged, forged, extreme, st.text(max_size=100),
                     st.sampled_from(["", ".", "..", "a.b.c", "eyJ.eyJ.", "Bearer x"]))


# WebSocket commands


COMMANDS = ["subscribe", "unsubscribe", "ack", "publish", "ping", "auth"]
TOPICS = st.one_of(
    st.sampled_from(["hostile.a", "hostile.b.c", WITNESS_TOPIC, "user:mallory", "user:witness-sub",
                     "news.x", "", "a..b", "x" * 201, "news.>", "*"]),
    st.from_regex(r"[A-Za-z0-9_\-:@.]{1,30}", fullmatch=True),
)


def text_of(value) -> st.SearchStrategy[str]:
    return st.one_of(st.just(value).map(json.dumps), JSON_TEXT)


def command_frames(tokens: Tokens):
    def field(strategy):
        return st.one_of(strategy.map(json.dumps), JSON_TEXT)

    fields = {
        "topic": field(TOPICS),
        "since": field(st.one_of(st.integers(-2, 50), EDGE_INTEGERS)),
        "seq": field(st.one_of(st.integers(-2, 50), EDGE_INTEGERS)),
        "data": JSON_TEXT,
        "event": field(STRINGS),
        "ephemeral": field(st.booleans()),
        "token": field(tokens_strategy(tokens)),
        "ref": field(st.one_of(st.integers(), EDGE_INTEGERS, STRINGS)),
        "epoch": field(STRINGS),
    }

    @st.composite
    def frame(draw):
        kind = draw(field(st.sampled_from(COMMANDS)))
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
        pairs = [("type", kind)] + [(name, draw(fields[name])) for name in chosen]
        return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in pairs) + "}"
    return frame()


def frames_strategy(tokens: Tokens):
    return st.one_of(
        command_frames(tokens), command_frames(tokens), command_frames(tokens),
        st.text(max_size=300),
        st.binary(max_size=300),  # sent as binary frames, not UTF-8 at all most of the time
        JSON_TEXT,
    )


class Hostile:
    """mallory's connection: every frame is followed by a ping, and what
    came back before its pong is the frame's answer."""

    def __init__(self, port: int, jwt: str):
        self.port = port
        self.jwt = jwt
        self.client = None
        self.sentinel = 0

    async def answer(self, frame: str | bytes) -> list[dict] | int:
        """The frames answering ``frame``, or the close code if it closed."""
        if self.client is None:
            self.client = await connect(self.port, self.jwt)
        self.sentinel += 1
        ref = f"sentinel-{self.sentinel}"
        connection = self.client.connection
        try:
            await connection.write_message(frame, binary=isinstance(frame, bytes))
            await connection.write_message(orjson.dumps({"type": "ping", "ref": ref}).decode())
        except tornado.websocket.WebSocketClosedError:
            pass  # the close is read below
        answer = []
        while True:
            reply = await self.client.recv(ROUND_TIMEOUT)
            if reply is None:
                code = self.client.close_code
                self.client.close()
                self.client = None
                return code
            if reply == {"type": "pong", "ref": ref}:
                return answer
            answer.append(reply)

    async def close(self) -> None:
        if self.client is not None:
            self.client.connection.close(1000)
            assert await self.client.closed() == 1000


def check_answer(frame: str | bytes, answer: list[dict] | int, max_message_bytes: int) -> None:
    size = len(frame.encode("utf-8", "surrogatepass") if isinstance(frame, str) else frame)
    if isinstance(answer, int) or answer is None:
        assert answer == 1009 and size > max_message_bytes + 4096, (answer, size, frame[:200])
        return
    for reply in answer:
        assert reply["type"] in REPLIES, reply
        if reply["type"] == "error":
            assert reply["code"] in SPEC_ERRORS, (reply, frame[:300])


def test_every_websocket_command_answers_by_the_spec(io_loop, port, config, captured):
    tokens = Tokens()
    mallory = token("mallory", topics=[">"], publish=["hostile.>"])
    witness = run(io_loop, Witness(port).open)
    hostile = Hostile(port, mallory)

    @given(frames_strategy(tokens))
    def one_frame(frame):
        async def both():
            answer, _ = await asyncio.gather(hostile.answer(frame), witness.round())
            check_answer(frame, answer, config.limits.max_message_bytes)
        run(io_loop, both)

    one_frame()
    run(io_loop, hostile.close)
    run(io_loop, witness.close)
    check_log(captured, mallory.rsplit(".", 1)[1], *witness.signatures, *tokens.signatures)


# Tokens at the handshake and at auth


def test_forged_and_extreme_tokens_at_the_handshake_and_at_auth(io_loop, port, captured):
    tokens = Tokens()
    mallory = token("mallory", topics=[">"], publish=["hostile.>"])
    witness = run(io_loop, Witness(port).open)
    hostile = Hostile(port, mallory)

    async def handshake(jwt: str, way: str) -> None:
        raw = jwt.encode("utf-8", "surrogatepass")
        url = f"ws://127.0.0.1:{port}/ws"
        headers = {}
        if way == "header" and all(32 <= ord(c) < 127 for c in jwt):
            headers["Authorization"] = f"Bearer {jwt}"
        elif way == "escaped":
            url += "?%74oken=" + "".join(f"%{b:02X}" for b in raw)
        else:
            url += "?token=" + quote(raw, safe="")
        try:
            client = await tornado.websocket.websocket_connect(
                tornado.httpclient.HTTPRequest(url, headers=headers))
        except tornado.httpclient.HTTPClientError as exc:
            assert exc.code == 401, exc
            error = orjson.loads(exc.response.body)["error"]
            assert error["code"] == "unauthorized" and error["message"], error
            return
        try:
            welcome = orjson.loads(await asyncio.wait_for(client.read_message(), ROUND_TIMEOUT))
            assert welcome["type"] == "welcome" and isinstance(welcome["expires"], int), welcome
            assert welcome["expires"] <= MAX_EXP
            subscribed = orjson.loads(await asyncio.wait_for(client.read_message(), ROUND_TIMEOUT))
            assert subscribed["type"] == "subscribed", subscribed
        finally:
            client.close()

    async def auth(jwt: str) -> None:
        frame = '{"type":"auth","token":%s,"ref":"auth"}' % json.dumps(jwt)
        answer = await hostile.answer(frame)
        assert isinstance(answer, list), answer
        (last,) = [reply for reply in answer if reply["type"] != "unsubscribed"]
        assert last["type"] in ("authenticated", "error") and last["ref"] == "auth", last
        if last["type"] == "error":
            assert last["code"] in ("unauthorized", "bad_request"), last
        else:
            assert isinstance(last["expires"], int) and last["expires"] <= MAX_EXP

    @given(tokens_strategy(tokens), st.sampled_from(["query", "escaped", "header"]))
    def one_token(jwt, way):
        async def all_three():
            await asyncio.gather(handshake(jwt, way), auth(jwt), witness.round())
        run(io_loop, all_three)

    one_token()
    run(io_loop, hostile.close)
    run(io_loop, witness.close)
    check_log(captured, mallory.rsplit(".", 1)[1], *witness.signatures, *tokens.signatures)


# HTTP endpoints


def segment(strategy) -> st.SearchStrategy[str]:
    return strategy.map(lambda text: quote(text.encode("utf-8", "surrogatepass"), safe=""))


PATHS = st.one_of(
    st.sampled_from(["/api/publish", "/api/publish/batch", "/api/stats", "/healthz", "/readyz",
                     "/metrics", "/ws", "/", "/api/", "/api/publish/", "/api/topics//messages"]),
    st.builds("/api/topics/{}/messages".format, segment(st.one_of(TOPICS, STRINGS))),
    st.builds("/api/topics/{}/presence".format, segment(st.one_of(TOPICS, STRINGS))),
    st.builds("/api/users/{}/disconnect".format, segment(st.one_of(
        st.sampled_from(["mallory", "nobody", "a.b", ""]), STRINGS))),
    st.builds("/{}".format, segment(STRINGS)),
    st.binary(max_size=20).map(lambda raw: "/api/topics/" + quote(raw, safe="") + "/messages"),
)
CONTENT_TYPES = st.sampled_from([None, "application/json", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=xyz", "multipart/form-data",
                                 "text/plain; charset=utf-16", "application/json; charset=latin-1",
                                 "garbage"])


def http_requests(tokens: Tokens):
    jwt = tokens_strategy(tokens)
    query_values = st.one_of(
        segment(STRINGS), st.binary(max_size=10).map(lambda raw: quote(raw, safe="")),
        st.sampled_from(["0", "1", "-1", "1000", "1001", "9" * 30, "0x10", "1e3", "%FF", "%ED%A0%80"]),
        jwt.map(lambda t: quote(t.encode("utf-8", "surrogatepass"), safe="")),
        jwt.map(lambda t: quote(t.encode("utf-8", "surrogatepass"), safe="").replace(".", "%2E")),
        st.just(API_KEY), st.just(quote(API_KEY, safe="").replace("-", "%2D")),
    )
    query = st.lists(st.tuples(
        st.one_of(st.sampled_from(["since", "limit", "token", "%74oken", "api_key", "key", "x"]),
                  segment(STRINGS)),
        query_values), max_size=4).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))
    authorization = st.one_of(
        st.just(f"Bearer {API_KEY}"), st.just(f"Bearer {API_KEY}"), st.none(),
        st.sampled_from(["Bearer", "Bearer ", "Basic dXNlcjpwdw==", f"bearer {API_KEY}",
                         f"Bearer {API_KEY} extra", f"Bearer  {API_KEY}"]),
        jwt.filter(lambda t: all(32 <= ord(c) < 127 for c in t)).map("Bearer {}".format),
    )
    publish_item = st.fixed_dictionaries({}, optional={
        "topic": text_of("hostile.http"), "user": text_of("mallory"), "data": JSON_TEXT,
        "event": text_of("e"), "idempotency_key": text_of("k1"),
    }).map(lambda fields: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields.items()) + "}")
    body = st.one_of(
        st.none(), publish_item, publish_item,
        st.lists(publish_item, max_size=5).map(lambda items: '{"messages":[%s]}' % ",".join(items)),
        JSON_TEXT, st.text(max_size=200), st.binary(max_size=200),
    ).map(lambda b: b.encode("utf-8", "surrogatepass") if isinstance(b, str) else b)
    return st.tuples(st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
                     PATHS, query, authorization, CONTENT_TYPES, body, st.booleans())


def raw_request(method: str, target: str, authorization: str | None, content_type: str | None,
                body: bytes | None, chunked: bool) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if authorization is not None:
        head.append(f"Authorization: {authorization}")
    if content_type is not None:
        head.append(f"Content-Type: {content_type}")
    payload = b""
    if body is not None and chunked:
        head.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[at:at + 1000]), body[at:at + 1000])
                           for at in range(0, len(body), 1000)) + b"0\r\n\r\n"
    elif body is not None:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload


async def exchange(port: int, request: bytes) -> tuple[int, dict, bytes]:
    """One request on its own connection; the server's whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for at in range(0, len(request), 65536):
            writer.write(request[at:at + 65536])
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), ROUND_TIMEOUT)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head, "the server hung up without an answer"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def check_http(method: str, status: int, headers: dict, body: bytes, request: bytes) -> None:
    assert status in HTTP_STATUSES, (status, body[:300], request[:300])
    # 200s that are not API answers: /metrics (text) and the demo page at / (HTML).
    not_json = ("text/plain", "text/html")
    if method == "HEAD" or (status == 200 and headers.get("content-type", "").startswith(not_json)):
        return
    assert headers.get("content-type", "").startswith("application/json"), (headers, request[:300])
    answer = orjson.loads(body)
    if status >= 400:
        assert set(answer) == {"error"} and set(answer["error"]) == {"code", "message"}, answer
        assert answer["error"]["code"] not in ("internal", "unavailable"), answer


def test_every_http_endpoint_answers_by_the_spec(io_loop, port, captured):
    tokens = Tokens()
    witness = run(io_loop, Witness(port).open)

    @given(http_requests(tokens))
    def one_request(parts):
        method, path, query, authorization, content_type, body, chunked = parts
        if "/disconnect" in path and unquote(path.split("/")[3], errors="replace") in WITNESS_USERS:
            return  # disconnecting the witness would be the server doing as told
        target = path + ("?" + query if query else "")
        request = raw_request(method, target, authorization, content_type, body, chunked)

        async def both():
            (status, headers, answer), _ = await asyncio.gather(exchange(port, request), witness.round())
            check_http(method, status, headers, answer, request)
        run(io_loop, both)

    one_request()
    run(io_loop, witness.close)
    check_log(captured, *witness.signatures, *tokens.signatures)


ENDPOINTS = [("POST", "/api/publish"), ("POST", "/api/publish/batch"),
             ("GET", "/api/topics/news.x/messages"), ("GET", "/api/topics/news.x/presence"),
             ("POST", "/api/users/nobody/disconnect"), ("GET", "/api/stats"), ("GET", "/healthz"),
             ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/ws"), ("POST", "/nowhere")]


def test_bodies_of_2x_and_8x_the_limit_get_413_json_everywhere(io_loop, port, captured):
    witness = run(io_loop, Witness(port).open)
    for method, path in ENDPOINTS:
        for factor in (2, 8):
            body = b'{"topic":"hostile.big","data":"' + b"x" * (factor * BODY_LIMIT) + b'"}'
            for chunked in (False, True):
                request = raw_request(method, path, f"Bearer {API_KEY}", "application/json",
                                      body, chunked)

                async def both():
                    (status, headers, answer), _ = await asyncio.gather(
                        exchange(port, request), witness.round())
                    assert status == 413, (method, path, factor, chunked, status, answer[:200])
                    assert headers["content-type"] == "application/json"
                    assert orjson.loads(answer)["error"]["code"] == "too_large"
                run(io_loop, both)
    status, answer = run(io_loop, lambda: api(port, "GET", "/api/topics/hostile.big/messages"))
    assert status == 200 and answer["head"] == 0
    run(io_loop, witness.close)
    check_log(captured, *witness.signatures)

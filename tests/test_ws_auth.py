"""``GET /ws`` authentication against SPEC: the handshake (401 with a JSON
body), the welcome, the ``auth`` command, Origin checks (4003) and the
server-side disconnect (4001). All through the real server and real clients."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import warnings
from pathlib import Path

import jwt
import orjson
import pytest
import tornado.httpclient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from support import SECRET, api, connect, token

OTHER_SECRET = "another-secret-" + "y" * 32


def exp_of(jwt_token: str) -> int:
    return jwt.decode(jwt_token, options={"verify_signature": False})["exp"]


def signed(claims: dict, key: str = SECRET, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():
        # HS512 with our 44-byte test secret: PyJWT warns the key is short.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, key, algorithm=algorithm)


def b64url(value: dict) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()


def unsigned(claims: dict) -> str:
    """An ``alg: none`` token, built by hand (no signature part)."""
    return f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims)}."


def claims(**changes) -> dict:
    body = {"sub": "alice", "exp": int(time.time()) + 3600, "topics": ["news.>"]}
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


async def refused(port: int, jwt_token: str | None, headers: dict | None = None) -> dict:
    """Open /ws expecting the handshake to be refused with 401; return the body."""
    with pytest.raises(tornado.httpclient.HTTPClientError) as caught:
        await connect(port, jwt_token, headers=headers)
    error = caught.value
    assert error.code == 401, error
    assert error.response is not None
    assert error.response.headers.get("Content-Type", "").startswith("application/json")
    body = orjson.loads(error.response.body)
    assert body["error"]["code"] == "unauthorized", body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


# Handshake


async def test_token_in_query_is_accepted(port):
    client = await connect(port, token("alice"), welcome=False)
    welcome = await client.expect("welcome")
    assert welcome["user"] == "alice"
    client.close()


async def test_token_in_bearer_header_is_accepted(port):
    jwt_token = token("alice")
    client = await connect(port, None, welcome=False,
                           headers={"Authorization": f"Bearer {jwt_token}"})
    welcome = await client.expect("welcome")
    assert welcome["user"] == "alice"
    assert welcome["expires"] == exp_of(jwt_token)
    client.close()


async def test_missing_token_is_refused_with_401(port):
    await refused(port, None)


async def test_empty_bearer_header_is_refused_with_401(port):
    await refused(port, None, headers={"Authorization": "Bearer "})


BAD_TOKENS = {
    "garbage": lambda: "not-a-jwt",
    "garbage_three_parts": lambda: "aaa.bbb.ccc",
    "expired": lambda: signed(claims(exp=int(time.time()) - 10)),
    "wrong_key": lambda: signed(claims(), key=OTHER_SECRET),
    "alg_none": lambda: unsigned(claims()),
    "hs512_when_hs256_pinned": lambda: signed(claims(), algorithm="HS512"),
    "sub_missing": lambda: signed(claims(sub=None)),
    "exp_missing": lambda: signed(claims(exp=None)),
    "sub_with_space": lambda: signed(claims(sub="al ice")),
    "sub_with_slash": lambda: signed(claims(sub="a/b")),
    "sub_empty": lambda: signed(claims(sub="")),
    "sub_too_long": lambda: signed(claims(sub="a" * 200)),
}


@pytest.mark.parametrize("kind", sorted(BAD_TOKENS))
async def test_bad_token_in_query_is_refused_with_401(port, kind):
    await refused(port, BAD_TOKENS[kind]())


@pytest.mark.parametrize("kind", ["garbage", "expired", "wrong_key", "alg_none"])
async def test_bad_token_in_header_is_refused_with_401(port, kind):
    await refused(port, None, headers={"Authorization": f"Bearer {BAD_TOKENS[kind]()}"})


async def test_refused_handshake_registers_no_connection(port):
    await refused(port, signed(claims(), key=OTHER_SECRET))
    status, body = await api(port, "GET", "/api/topics/user:alice/presence")
    assert status == 200 and body == {"users": [], "connections": 0}


# Welcome


async def test_welcome_then_personal_subscription(port, config):
    jwt_token = token("alice")
    client = await connect(port, jwt_token, welcome=False)
    welcome = await client.expect("welcome")
    assert set(welcome) == {"type", "connection", "user", "heartbeat", "expires"}
    assert isinstance(welcome["connection"], str) and welcome["connection"]
    assert welcome["user"] == "alice"
    assert welcome["heartbeat"] == config.heartbeat.interval
    assert welcome["expires"] == exp_of(jwt_token)
    subscribed = await client.expect("subscribed")
    assert "ref" not in subscribed
    assert subscribed["topic"] == "user:alice"
    assert subscribed["seq"] == 0
    assert subscribed["recovered"] is True
    assert isinstance(subscribed["epoch"], str)
    await client.nothing(0.1)
    client.close()


async def test_connection_ids_differ(port):
    first = await connect(port, token("alice"), welcome=False)
    second = await connect(port, token("alice"), welcome=False)
    one = (await first.expect("welcome"))["connection"]
    two = (await second.expect("welcome"))["connection"]
    assert one != two
    first.close()
    second.close()


# The auth command


async def test_auth_with_new_token_for_same_user(port):
    client = await connect(port, token("alice", topics=["news.>"], ttl=600))
    fresh = token("alice", topics=["news.>", "sport.>"], ttl=7200)
    await client.send({"type": "auth", "token": fresh, "ref": "a1"})
    reply = await client.expect("authenticated")
    assert reply == {"type": "authenticated", "expires": exp_of(fresh), "ref": "a1"}
    # The new claims apply from then on.
    await client.send({"type": "subscribe", "topic": "sport.tennis", "ref": 2})
    subscribed = await client.expect("subscribed")
    assert subscribed["topic"] == "sport.tennis" and subscribed["ref"] == 2
    client.close()


async def test_auth_with_token_for_another_user_is_unauthorized(port):
    client = await connect(port, token("alice", topics=["news.>"]))
    other = token("bob", topics=["news.>", "sport.>"], publish=[">"], ttl=7200)
    await client.send({"type": "auth", "token": other, "ref": 7})
    error = await client.expect("error")
    assert error["code"] == "unauthorized" and error["ref"] == 7
    # The old token stays: its claims still apply, the other token's do not.
    await client.send({"type": "subscribe", "topic": "sport.tennis", "ref": 8})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == 8
    await client.send({"type": "subscribe", "topic": "news.a", "ref": 9})
    subscribed = await client.expect("subscribed")
    assert subscribed["topic"] == "news.a" and subscribed["ref"] == 9
    await client.send({"type": "ping", "ref": 10})
    assert (await client.expect("pong"))["ref"] == 10
    client.close()


@pytest.mark.parametrize("kind", ["garbage", "expired", "wrong_key", "alg_none",
                                  "hs512_when_hs256_pinned", "sub_missing"])
async def test_auth_with_invalid_token_is_unauthorized(port, kind):
    client = await connect(port, token("alice", topics=["news.>"]))
    await client.send({"type": "auth", "token": BAD_TOKENS[kind](), "ref": "bad"})
    error = await client.expect("error")
    assert error["code"] == "unauthorized" and error["ref"] == "bad"
    await client.send({"type": "subscribe", "topic": "news.a", "ref": 1})
    assert (await client.expect("subscribed"))["ref"] == 1
    client.close()


async def test_auth_dropping_a_topic_ends_its_subscription(port):
    client = await connect(port, token("alice", topics=["news.>", "sport.>"]))
    for ref, topic in ((1, "news.a"), (2, "sport.a")):
        await client.send({"type": "subscribe", "topic": topic, "ref": ref})
        assert (await client.expect("subscribed"))["topic"] == topic
    fresh = token("alice", topics=["sport.>"], ttl=7200)
    await client.send({"type": "auth", "token": fresh, "ref": "r"})
    frames = [await client.recv(), await client.recv()]
    unsubscribed = [f for f in frames if f["type"] == "unsubscribed"]
    assert [f["topic"] for f in unsubscribed] == ["news.a"]
    authenticated = [f for f in frames if f["type"] == "authenticated"]
    assert authenticated == [{"type": "authenticated", "expires": exp_of(fresh), "ref": "r"}]
    status, _ = await api(port, "POST", "/api/publish", {"topic": "news.a", "data": 1})
    assert status == 200
    status, body = await api(port, "POST", "/api/publish", {"topic": "sport.a", "data": 2})
    assert status == 200
    message = await client.expect("message")
    assert message["topic"] == "sport.a" and message["data"] == 2 and message["id"] == body["id"]
    # The personal topic is always allowed: it stays subscribed.
    status, body = await api(port, "POST", "/api/publish", {"user": "alice", "data": 3})
    assert status == 200
    message = await client.expect("message")
    assert message["topic"] == "user:alice" and message["data"] == 3
    await client.nothing(0.1)
    client.close()


async def test_auth_new_claims_forbid_resubscribing(port):
    client = await connect(port, token("alice", topics=["news.>"]))
    await client.send({"type": "auth", "token": token("alice", topics=["sport.>"]), "ref": 1})
    await client.expect("authenticated")
    await client.send({"type": "subscribe", "topic": "news.a", "ref": 2})
    error = await client.expect("error")
    assert error["code"] == "forbidden" and error["ref"] == 2
    client.close()


# Server-side disconnect


async def test_disconnect_closes_that_users_connections_with_4001(port):
    alice_one = await connect(port, token("alice"))
    alice_two = await connect(port, token("alice"))
    bob = await connect(port, token("bob"))
    status, _ = await api(port, "POST", "/api/users/alice/disconnect")
    assert status == 200
    assert await alice_one.closed() == 4001
    alice_one.close()
    assert await alice_two.closed() == 4001
    alice_two.close()
    await bob.send({"type": "ping", "ref": 1})
    assert (await bob.expect("pong"))["ref"] == 1
    status, body = await api(port, "GET", "/api/topics/user:bob/presence")
    assert status == 200 and body == {"users": ["bob"], "connections": 1}
    bob.close()


async def test_disconnect_needs_api_key(port):
    alice = await connect(port, token("alice"))
    status, body = await api(port, "POST", "/api/users/alice/disconnect", key="wrong-key-123")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    await alice.send({"type": "ping", "ref": 1})
    assert (await alice.expect("pong"))["ref"] == 1
    alice.close()


# Origin


@pytest.fixture
def app_origin(config):
    config.server.allowed_origins = ["https://app.example"]
    return config


async def test_foreign_origin_is_closed_with_4003(port):
    client = await connect(port, token("alice"), welcome=False,
                           headers={"Origin": "https://evil.example"})
    assert await client.closed() == 4003
    client.close()


async def test_no_origin_header_is_accepted(port):
    client = await connect(port, token("alice"))
    await client.send({"type": "ping", "ref": 1})
    assert (await client.expect("pong"))["ref"] == 1
    client.close()


async def test_same_origin_is_accepted(port):
    client = await connect(port, token("alice"),
                           headers={"Origin": f"http://127.0.0.1:{port}"})
    await client.send({"type": "ping", "ref": 1})
    assert (await client.expect("pong"))["ref"] == 1
    client.close()


async def test_allowed_origin_is_accepted(app_origin, port):
    client = await connect(port, token("alice"), headers={"Origin": "https://app.example"})
    await client.send({"type": "ping", "ref": 1})
    assert (await client.expect("pong"))["ref"] == 1
    client.close()


async def test_allow_list_entry_matches_however_it_is_spelled(config, port):
    # Browsers send a lowercase host and no default port.
    config.server.allowed_origins = ["HTTPS://App.Example:443/"]
    client = await connect(port, token("alice"), headers={"Origin": "https://app.example"})
    await client.send({"type": "ping", "ref": 1})
    assert (await client.expect("pong"))["ref"] == 1
    client.close()
    other_port = await connect(port, token("alice"), welcome=False,
                               headers={"Origin": "https://app.example:8443"})
    assert await other_port.closed() == 4003
    other_port.close()


async def test_origin_outside_allow_list_is_closed_with_4003(app_origin, port):
    client = await connect(port, token("alice"), welcome=False,
                           headers={"Origin": "https://evil.example"})
    assert await client.closed() == 4003
    client.close()


async def test_origin_other_port_same_host_is_closed_with_4003(port):
    client = await connect(port, token("alice"), welcome=False,
                           headers={"Origin": "http://127.0.0.1:1"})
    assert await client.closed() == 4003
    client.close()


async def test_null_origin_is_closed_with_4003(port):
    client = await connect(port, token("alice"), welcome=False, headers={"Origin": "null"})
    assert await client.closed() == 4003
    client.close()


async def test_empty_token_query_is_refused_with_401(port):
    await refused(port, "")


# Configured audience and issuer; public-key algorithms


@pytest.fixture
def aud_iss(config):
    config.auth.audience = "notifier-test"
    config.auth.issuer = "https://issuer.example"
    return config


async def test_audience_and_issuer_accepted_when_they_match(aud_iss, port):
    good = token("alice", audience="notifier-test", issuer="https://issuer.example")
    client = await connect(port, good)
    await client.send({"type": "ping", "ref": 1})
    assert (await client.expect("pong"))["ref"] == 1
    client.close()


@pytest.mark.parametrize("audience,issuer", [
    ("", "https://issuer.example"),
    ("notifier-test", ""),
    ("someone-else", "https://issuer.example"),
    ("notifier-test", "https://evil.example"),
])
async def test_audience_or_issuer_missing_or_wrong_is_refused(aud_iss, port, audience, issuer):
    await refused(port, token("alice", audience=audience, issuer=issuer))


@pytest.fixture
def rs256(config, tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "jwt.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    config.auth.jwt_algorithms = ["RS256"]
    config.auth.jwt_public_key_file = str(public)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


async def test_rs256_token_accepted_with_public_key(rs256, port):
    good = jwt.encode(claims(), rs256, algorithm="RS256")
    client = await connect(port, good, welcome=False)
    assert (await client.expect("welcome"))["user"] == "alice"
    client.close()


async def test_rs256_pinned_refuses_hs256_even_signed_with_the_public_key(rs256, config, port):
    # Key confusion: an HS256 token whose HMAC key is the public key's PEM.
    public_pem = Path(config.auth.jwt_public_key_file).read_bytes()
    forged = f"{b64url({'alg': 'HS256', 'typ': 'JWT'})}.{b64url(claims())}"
    signature = hmac.new(public_pem, forged.encode(), hashlib.sha256).digest()
    forged += "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    await refused(port, forged)
    await refused(port, signed(claims()))

"""JWKS keys at the WebSocket handshake and through the ``auth`` command, on a
real server, against a JWKS the test serves and rotates: a token whose key
is cached is taken at once, an unknown kid waits for one fetch (counted at
the JWKS server, at most one per interval), the cache outlives the
endpoint, and a notifier started while the endpoint is down comes good."""

from __future__ import annotations

import asyncio
import signal

import pytest

from idp import IdentityProvider, SigningKey, claims
from notifier.config import Config
from procs import DRAIN_TIMEOUT, ServerProcess
from support import API_KEY, api, connect

MIN_INTERVAL = 0.5


@pytest.fixture(scope="module")
def keys():
    return {name: SigningKey(name) for name in ("key-a", "key-b", "key-c")}


@pytest.fixture
def idp():
    provider = IdentityProvider().start()
    yield provider
    provider.stop()


@pytest.fixture
def config(tmp_path, idp) -> Config:
    config = Config()
    config.auth.jwt_algorithms = ["RS256"]
    config.auth.jwks_url = idp.url
    config.auth.jwks_min_fetch_interval = MIN_INTERVAL
    config.auth.api_keys = [API_KEY]
    config.store.path = str(tmp_path / "notifier.db")
    return config


async def refused(port: int, jwt: str) -> str:
    """The handshake's 401 message for ``jwt`` (a plain GET: refusals come first)."""
    status, body = await api(port, "GET", "/ws", key=jwt)
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"
    return body["error"]["message"]


async def test_handshake_through_a_rotation_and_an_outage(port, ws, idp, keys):
    idp.publish(keys["key-a"])
    # Nothing cached yet: the first handshake waits for the first fetch.
    alice = await ws(keys["key-a"].sign(claims("alice")))
    bob = await ws(keys["key-a"].sign(claims("bob")))
    assert idp.requests == 1

    await asyncio.sleep(MIN_INTERVAL)
    idp.publish(keys["key-b"])  # A rotated out
    carol = await ws(keys["key-b"].sign(claims("carol")))
    assert idp.requests == 2
    assert "unknown" in await refused(port, keys["key-a"].sign(claims("dave")))
    # A second unknown kid within the interval: refused without a fetch.
    assert "unknown" in await refused(port, keys["key-c"].sign(claims("erin")))
    assert idp.requests == 2
    # The cached kid with an algorithm that is not pinned.
    assert "not allowed" in await refused(
        port, keys["key-b"].sign(claims("frank"), algorithm="RS512"))

    idp.stop()
    grace = await ws(keys["key-b"].sign(claims("grace")))
    await asyncio.sleep(MIN_INTERVAL)
    assert "unknown" in await refused(port, keys["key-c"].sign(claims("erin")))  # fetch fails
    heidi = await ws(keys["key-b"].sign(claims("heidi")))
    for client in (alice, bob, carol, grace, heidi):
        await client.send({"type": "ping", "ref": 1})
        assert (await client.expect("pong"))["ref"] == 1


async def test_auth_command_with_a_key_fetched_on_demand(port, ws, idp, keys):
    idp.publish(keys["key-a"])
    client = await ws(keys["key-a"].sign(claims("alice")))
    assert idp.requests == 1
    await asyncio.sleep(MIN_INTERVAL)
    idp.publish(keys["key-a"], keys["key-b"])
    later = keys["key-b"].sign(claims("alice", ttl=7200))
    # Pipelined: the ping waits for the auth, which waits for the fetch.
    await client.send({"type": "auth", "token": later, "ref": "a"})
    await client.send({"type": "ping", "ref": "p"})
    authenticated = await client.expect("authenticated")
    assert authenticated["ref"] == "a" and authenticated["expires"] >= claims(ttl=7100)["exp"]
    assert (await client.expect("pong"))["ref"] == "p"
    assert idp.requests == 2

    for token, complaint in [
        (keys["key-c"].sign(claims("alice")), "unknown"),           # no fetch: too soon
        (keys["key-b"].sign(claims("alice"), algorithm="RS512"), "not allowed"),
        (keys["key-b"].sign(claims("mallory")), "another user"),
    ]:
        await client.send({"type": "auth", "token": token, "ref": complaint})
        error = await client.expect("error")
        assert (error["code"], error["ref"]) == ("unauthorized", complaint)
        assert complaint in error["message"]
    assert idp.requests == 2
    await client.send({"type": "ping", "ref": 2})
    assert (await client.expect("pong"))["ref"] == 2


@pytest.mark.slow
async def test_serve_starts_with_the_jwks_down_and_recovers(io_loop, tmp_path, keys):
    idp = IdentityProvider().start()
    idp.publish(keys["key-a"])
    url = idp.url
    idp.stop()
    server = ServerProcess(tmp_path, env={
        "NOTIFIER_AUTH_JWT_SECRET": None, "NOTIFIER_AUTH_JWT_ALGORITHMS": "RS256",
        "NOTIFIER_AUTH_JWKS_URL": url, "NOTIFIER_AUTH_JWKS_MIN_FETCH_INTERVAL": "0.5s"})
    try:
        server.start().wait_ready()
        failed = server.wait_for_event("jwks.fetch_failed")
        assert failed["level"] == "error" and failed["url"] == url
        assert server.request("GET", "/readyz")[0] == 200
        status, body = server.request("GET", "/ws", key=None, headers={
            "Authorization": f"Bearer {keys['key-a'].sign(claims())}"})
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        # The HTTP API does not need the keys.
        assert server.request("POST", "/api/publish", {"topic": "news.a", "data": 1})[0] == 200

        idp.start()
        server.wait_for_event("jwks.fetched", kids=["key-a"])
        client = await connect(server.port, keys["key-a"].sign(claims()))
        await client.send({"type": "ping", "ref": 1})
        assert (await client.expect("pong"))["ref"] == 1
        client.close()
        server.signal(signal.SIGTERM)
        assert server.wait(DRAIN_TIMEOUT + 3) == 0
    finally:
        server.kill()
        idp.stop()

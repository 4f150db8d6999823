"""SIGHUP on a real `notifier serve --config FILE`: the log level and the API
keys change in place while a WebSocket stays connected; a bad file changes
nothing and is reported as config.reload_failed."""

from __future__ import annotations

import signal
import socket
import uuid

import pytest

from procs import DRAIN_TIMEOUT, ServerProcess
from support import connect, token

OLD_KEY = "key-one-123"
NEW_KEY = "key-two-456"
# notifier itself logs nothing at debug level; Tornado does, through the same
# JSON pipeline, when a plain GET reaches /ws without an Upgrade header.
DEBUG_EVENT = "connection.not_websocket"


def config_text(level: str, keys: list[str]) -> str:
    quoted = ", ".join(f'"{key}"' for key in keys)
    return f'[log]\nlevel = "{level}"\n\n[auth]\napi_keys = [{quoted}]\n'


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "notifier.toml"
    path.write_text(config_text("info", [OLD_KEY]))
    return path


def start(tmp_path, config_file, **env) -> ServerProcess:
    # Keys from the environment would override the file's: only the file here.
    server = ServerProcess(tmp_path, args=["--config", str(config_file)],
                           env={"NOTIFIER_AUTH_API_KEYS": None, **env})
    return server.start().wait_ready()


def publish(server: ServerProcess, key: str, topic: str, data) -> tuple[int, dict]:
    return server.request("POST", "/api/publish", {"topic": topic, "data": data}, key=key)


def provoke_debug_line(server: ServerProcess) -> None:
    """A plain GET on /ws (valid token, no Upgrade): notifier answers 400 and
    logs DEBUG_EVENT at debug level. Then wait until a later request's access
    line is in stdout, so every line before it is too."""
    status, _ = server.request("GET", "/ws", key=None,
                               headers={"Authorization": f"Bearer {token('alice')}"})
    assert status == 400
    marker = f"/barrier-{uuid.uuid4().hex}"
    assert server.request("GET", marker)[0] == 404
    server.wait_for_event("http.request", path=marker)


def debug_lines(server: ServerProcess) -> list[dict]:
    return server.find_events(DEBUG_EVENT)


async def test_sighup_changes_log_level_and_rotates_api_key_keeping_websocket(
        io_loop, tmp_path, config_file):
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify.sock"))
    manager.settimeout(3)
    server = start(tmp_path, config_file, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    try:
        client = await connect(server.port, token("alice", topics=["news.>"]))
        await client.send({"type": "subscribe", "topic": "news.reload", "ref": "s"})
        assert (await client.expect("subscribed"))["seq"] == 0

        assert publish(server, NEW_KEY, "news.reload", 0)[0] == 401
        provoke_debug_line(server)
        assert debug_lines(server) == []

        config_file.write_text(config_text("debug", [NEW_KEY]))
        while manager.recv(4096) != b"READY=1":  # the start-up notifications
            pass
        manager.settimeout(0.05)
        try:
            while True:
                manager.recv(4096)
        except TimeoutError:
            pass
        manager.settimeout(3)
        server.signal(signal.SIGHUP)
        reloaded = server.wait_for_event("config.reloaded")
        assert reloaded["log_level"] == "debug" and reloaded["api_keys"] == 1
        assert reloaded["level"] == "info"
        # systemd hears of the reload: RELOADING=1 with a timestamp, then READY=1.
        reloading = manager.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].split("=", 1)[1]) > 0
        assert manager.recv(4096) == b"READY=1"

        status, body = publish(server, OLD_KEY, "news.reload", 1)
        assert (status, body["error"]["code"]) == (401, "unauthorized")
        status, receipt = publish(server, NEW_KEY, "news.reload", {"after": "reload"})
        assert status == 200, receipt
        message = await client.expect("message")
        assert (message["seq"], message["id"], message["data"]) == (1, receipt["id"],
                                                                   {"after": "reload"})
        await client.send({"type": "ping", "ref": 7})
        assert (await client.expect("pong"))["ref"] == 7
        assert client.close_code is None

        provoke_debug_line(server)
        (line,) = debug_lines(server)
        assert line["level"] == "debug" and line["path"] == "/ws"
        # Info lines still come out at debug level.
        assert server.find_events("publish", topic="news.reload", seq=1)[0]["level"] == "info"
        assert len(server.find_events("connection.open", user="alice")) == 1
        assert server.find_events("connection.close") == []
        client.close()
        server.signal(signal.SIGTERM)
        assert server.wait(DRAIN_TIMEOUT + 3) == 0
    finally:
        server.kill()
        manager.close()


@pytest.mark.parametrize(("bad", "complaint"), [
    ('[log]\nlevel = "debug"\n[auth\napi_keys = ["key-two-456"]\n', "not valid TOML"),
    ('[log]\nlevel = "debug"\n[auth]\napi_keys = ["short"]\n', "auth.api_keys"),
], ids=["invalid-toml", "invalid-value"])
async def test_sighup_with_a_bad_config_keeps_the_old_settings(
        io_loop, tmp_path, config_file, bad, complaint):
    server = start(tmp_path, config_file)
    try:
        client = await connect(server.port, token("alice", topics=["news.>"]))
        await client.send({"type": "subscribe", "topic": "news.reload"})
        await client.expect("subscribed")

        config_file.write_text(bad)
        server.signal(signal.SIGHUP)
        failed = server.wait_for_event("config.reload_failed")
        assert failed["level"] == "error" and complaint in failed["error"], failed
        assert server.find_events("config.reloaded") == []
        assert server.running()

        status, receipt = publish(server, OLD_KEY, "news.reload", "still")
        assert status == 200, receipt
        message = await client.expect("message")
        assert (message["id"], message["data"]) == (receipt["id"], "still")
        assert publish(server, "key-two-456", "news.reload", "no")[0] == 401
        provoke_debug_line(server)
        assert debug_lines(server) == []

        # A later good reload still works.
        config_file.write_text(config_text("info", [NEW_KEY]))
        server.signal(signal.SIGHUP)
        server.wait_for_event("config.reloaded")
        assert publish(server, OLD_KEY, "news.reload", "no")[0] == 401
        assert publish(server, NEW_KEY, "news.reload", "yes")[0] == 200
        assert (await client.expect("message"))["data"] == "yes"
        client.close()
    finally:
        server.kill()


async def test_sighup_rotates_the_jwt_secret_keeping_websocket(io_loop, tmp_path, config_file):
    old_secret, new_secret = "old-secret-" + "o" * 32, "new-secret-" + "n" * 32
    config_file.write_text(config_text("info", [OLD_KEY]) + f'jwt_secret = "{old_secret}"\n')
    server = start(tmp_path, config_file, NOTIFIER_AUTH_JWT_SECRET=None)
    try:
        client = await connect(server.port, token("alice", topics=["news.>"], secret=old_secret))
        await client.send({"type": "subscribe", "topic": "news.jwt"})
        await client.expect("subscribed")

        config_file.write_text(config_text("info", [OLD_KEY]) + f'jwt_secret = "{new_secret}"\n')
        server.signal(signal.SIGHUP)
        server.wait_for_event("config.reloaded")

        status, _ = server.request("GET", "/ws", key=None, headers={
            "Authorization": f"Bearer {token('bob', secret=old_secret)}"})
        assert status == 401
        bob = await connect(server.port, token("bob", topics=["news.>"], secret=new_secret))
        await bob.send({"type": "subscribe", "topic": "news.jwt"})
        await bob.expect("subscribed")

        status, receipt = publish(server, OLD_KEY, "news.jwt", "rotated")
        assert status == 200, receipt
        for subscriber in (client, bob):
            message = await subscriber.expect("message")
            assert (message["id"], message["data"]) == (receipt["id"], "rotated")
        client.close()
        bob.close()
    finally:
        server.kill()


async def test_sighup_with_a_jwks_keeps_its_cache_or_fetches_the_new_one(
        io_loop, tmp_path, config_file):
    from idp import IdentityProvider, SigningKey, claims

    first, second = IdentityProvider().start(), IdentityProvider().start()
    key_a, key_b = SigningKey("key-a"), SigningKey("key-b")
    first.publish(key_a)
    second.publish(key_b)

    def jwks_config(url: str, audience: str = "") -> str:
        return (config_text("info", [OLD_KEY]) + f'jwt_algorithms = ["RS256"]\n'
                f'jwks_url = "{url}"\naudience = "{audience}"\n')

    config_file.write_text(jwks_config(first.url))
    server = start(tmp_path, config_file, NOTIFIER_AUTH_JWT_SECRET=None)
    try:
        assert first.requests == 1  # fetched before the port opened
        assert server.find_events("jwks.fetched")[0]["kids"] == ["key-a"]
        alice = await connect(server.port, key_a.sign(claims("alice")))

        # Same JWKS, other settings: the cache is kept, nothing is fetched.
        config_file.write_text(jwks_config(first.url, audience="notifier"))
        server.signal(signal.SIGHUP)
        server.wait_for_event("config.reloaded")
        bob = await connect(server.port, key_a.sign(claims("bob", aud="notifier")))
        status, _ = server.request("GET", "/ws", key=None, headers={
            "Authorization": f"Bearer {key_a.sign(claims('carol'))}"})
        assert status == 401  # no aud: the new audience rule applies
        assert first.requests == 1

        # Another JWKS: fetched at once; the old one is asked no more.
        config_file.write_text(jwks_config(second.url))
        server.signal(signal.SIGHUP)
        server.wait_for_event("jwks.fetched", kids=["key-b"])
        dave = await connect(server.port, key_b.sign(claims("dave")))
        assert (first.requests, second.requests) == (1, 1)
        for client in (alice, bob, dave):
            await client.send({"type": "ping", "ref": 1})
            assert (await client.expect("pong"))["ref"] == 1
            client.close()
    finally:
        server.kill()
        first.stop()
        second.stop()

"""SPEC "Command line": the console script as real subprocesses
(``python -m notifier``, so any virtualenv works): serve with no config,
token, publish, subscribe, one-line config errors, the state directory."""

from __future__ import annotations

import json
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt as pyjwt
import orjson
import pytest

from notifier.auth import mint_token
from procs import ServerProcess, base_environment, free_port, read_history
from support import API_KEY, SECRET, connect, token

QUICK = 10.0  # seconds a failing command gets to exit
# No config at all: what `notifier serve` does in an empty directory.
NO_CONFIG = {
    "NOTIFIER_STORE_PATH": None, "NOTIFIER_AUTH_JWT_SECRET": None, "NOTIFIER_AUTH_API_KEYS": None,
    "NOTIFIER_SERVER_DRAIN_TIMEOUT": None, "NOTIFIER_SERVER_HOST": None,
}


def cli_env(port: int | None = None, **extra: str) -> dict[str, str]:
    env = base_environment()  # without any NOTIFIER_* or systemd variable
    if port is not None:
        env["NOTIFIER_SERVER_PORT"] = str(port)
    env.update(extra)
    return env


def notifier(*args: str, cwd: Path, env: dict[str, str], timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "notifier", *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def dev_credentials(cwd: Path) -> dict:
    return json.loads((cwd / "var" / "dev-credentials.json").read_text())


def wait_for_text(read, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := read()):
        assert time.monotonic() < deadline, f"{needle!r} not in:\n{text}"
        time.sleep(0.02)
    return text


@pytest.fixture
def dev_server(tmp_path):
    """`notifier serve` in an empty directory, with no config and no NOTIFIER_*
    variable but the port."""
    cwd = tmp_path / "empty"
    cwd.mkdir()
    with ServerProcess(cwd, env=NO_CONFIG) as server:
        yield server


def test_serve_without_config_uses_var_and_explains_itself(dev_server):
    cwd = dev_server.workdir
    assert (cwd / "var" / "notifier.db").is_file()
    credentials_file = cwd / "var" / "dev-credentials.json"
    assert stat.S_IMODE(credentials_file.stat().st_mode) == 0o600
    credentials = dev_credentials(cwd)
    assert len(credentials["jwt_secret"]) >= 32 and len(credentials["api_key"]) >= 8
    banner = wait_for_text(dev_server.stderr, "/api/publish")
    assert "notifier token" in banner and "--user" in banner
    assert f"Bearer {credentials['api_key']}" in banner
    assert f":{dev_server.port}/api/publish" in banner
    # The embedded default listens on localhost, and the API takes the dev key.
    status, body = dev_server.request("GET", "/api/stats", key=credentials["api_key"])
    assert status == 200, body
    status, _ = dev_server.request("GET", "/api/stats", key="some-other-key")
    assert status == 401
    started = dev_server.wait_for_event("server.started")
    assert started["host"] == "127.0.0.1" and started["port"] == dev_server.port


async def test_token_from_the_cli_is_accepted_with_its_claims(io_loop, dev_server):
    cwd = dev_server.workdir
    result = notifier("token", "--user", "alice", "--topics", "news.>", "--publish", "news.*",
                      "--ttl", "10m", cwd=cwd, env=cli_env(dev_server.port))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    minted = lines[0]
    claims = pyjwt.decode(minted, dev_credentials(cwd)["jwt_secret"], algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["topics"] == ["news.>"] and claims["publish"] == ["news.*"]
    assert claims["exp"] - claims["iat"] == 600 and abs(claims["iat"] - time.time()) < 30

    client = await connect(dev_server.port, minted, welcome=False)
    try:
        welcome = await client.expect("welcome")
        assert welcome["user"] == "alice" and welcome["expires"] == claims["exp"]
        await client.expect("subscribed")
        await client.send({"type": "subscribe", "topic": "news.sport.football", "ref": 1})
        assert (await client.expect("subscribed"))["ref"] == 1
        await client.send({"type": "publish", "topic": "news.sport", "data": 1, "ref": 2})
        assert (await client.expect("published"))["seq"] == 1
        await client.send({"type": "publish", "topic": "news.sport.football", "data": 1, "ref": 3})
        error = await client.expect("error")
        assert error["code"] == "forbidden" and error["ref"] == 3
    finally:
        client.close()


def test_token_with_a_bad_ttl_fails_with_one_line(tmp_path):
    result = notifier("token", "--user", "alice", "--ttl", "soon", cwd=tmp_path, env=cli_env())
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "soon" in result.stderr and not result.stdout


async def test_cli_publish_reaches_a_subscriber(io_loop, dev_server):
    cwd = dev_server.workdir
    secret = dev_credentials(cwd)["jwt_secret"]
    client = await connect(dev_server.port, mint_token(secret, "HS256", "bob", ["news.>"], [], 600))
    try:
        await client.send({"type": "subscribe", "topic": "news.x"})
        await client.expect("subscribed")
        result = notifier("publish", "news.x", '{"goal": 1}', cwd=cwd, env=cli_env(dev_server.port))
        assert result.returncode == 0, result.stderr
        answer = orjson.loads(result.stdout)
        assert answer["topic"] == "news.x" and answer["seq"] == 1
        message = await client.expect("message")
        assert message["data"] == {"goal": 1} and message["id"] == answer["id"]
        result = notifier("publish", "news.x", "plain words", cwd=cwd, env=cli_env(dev_server.port))
        assert result.returncode == 0, result.stderr
        message = await client.expect("message")
        assert message["seq"] == 2 and message["data"] == "plain words"
        await client.nothing()
    finally:
        client.close()


def test_cli_publish_with_no_server_fails_with_one_line(tmp_path):
    result = notifier("publish", "news.x", "1", "--retry-for", "0",
                      cwd=tmp_path, env=cli_env(free_port()))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot reach the server" in result.stderr


def test_cli_publish_retries_through_a_restart(tmp_path):
    """Started while the server is down, `notifier publish` keeps trying and
    is answered once it is back; the message is stored once."""
    server = ServerProcess(tmp_path).start().wait_ready()
    server.kill()
    env = cli_env(server.port, NOTIFIER_AUTH_API_KEYS=API_KEY)
    publisher = subprocess.Popen(
        [sys.executable, "-m", "notifier", "publish", "news.x", '{"n": 1}', "--retry-for", "20s"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)  # several refused tries
        assert publisher.poll() is None, publisher.communicate()
        with ServerProcess(tmp_path, port=server.port, store_path=server.store_path) as restarted:
            stdout, stderr = publisher.communicate(timeout=20)
            assert publisher.returncode == 0, stderr
            answer = orjson.loads(stdout)
            history = read_history(restarted, "news.x")
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.communicate()
    assert [(m["seq"], m["id"], m["data"]) for m in history] == [(1, answer["id"], {"n": 1})]


class Subscriber:
    """`notifier subscribe ...` as a child: its stdout lines (one JSON
    message each) and its stderr lines (states) arrive on two queues."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "notifier", "subscribe", *args], cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.states: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.process.stdout, self.lines), daemon=True),
                        threading.Thread(target=self._read, args=(self.process.stderr, self.states), daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read(self, pipe, lines: queue.Queue) -> None:
        for line in pipe:
            if lines is self.states:
                self.stderr.append(line)
            lines.put(line)
        lines.put(None)

    def message(self, timeout: float = 5.0) -> dict:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"subscribe exited: {''.join(self.stderr)}"
        return orjson.loads(line)  # every line is one JSON message

    def nothing(self, within: float = 0.5) -> None:
        try:
            line = self.lines.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected output {line!r}")

    def state(self, needle: str, timeout: float = 10.0) -> str:
        """The next stderr line containing ``needle`` (earlier ones skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.states.get(timeout=max(0.01, deadline - time.monotonic()))
            assert line is not None, f"subscribe exited: {''.join(self.stderr)}"
            if needle in line:
                return line

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"notifier subscribe ignored signal {signum}") from None
        finally:
            for reader in self.readers:
                reader.join(5)
            self.process.stdout.close()
            self.process.stderr.close()


def test_cli_subscribe_prints_messages_as_json_lines(dev_server):
    cwd = dev_server.workdir
    key = dev_credentials(cwd)["api_key"]
    subscriber = Subscriber(cwd, cli_env(dev_server.port), "news.x", "alerts")
    try:
        subscriber.state("subscribed news.x")
        subscriber.state("subscribed alerts")
        sent = []
        for topic, data in (("news.x", {"n": 1}), ("alerts", "fire"), ("news.x", [2])):
            status, body = dev_server.request("POST", "/api/publish", {"topic": topic, "data": data}, key=key)
            assert status == 200, body
            sent.append((topic, body["seq"], body["id"], data))
        got = [subscriber.message() for _ in sent]
        assert [(m["topic"], m["seq"], m["id"], m["data"]) for m in got] == sent
        assert set(got[0]) == {"topic", "seq", "id", "time", "event", "data"}
        subscriber.nothing()
    finally:
        assert subscriber.stop() == 0


def test_cli_subscribe_since_replays_history(dev_server):
    cwd = dev_server.workdir
    key = dev_credentials(cwd)["api_key"]
    for n in range(1, 4):
        status, body = dev_server.request("POST", "/api/publish", {"topic": "log", "data": n}, key=key)
        assert status == 200, body
    subscriber = Subscriber(cwd, cli_env(dev_server.port), "log", "--since", "1")
    try:
        assert "subscribed log at seq 3" in subscriber.state("subscribed log")
        got = [subscriber.message() for _ in range(2)]
        assert [(m["seq"], m["data"]) for m in got] == [(2, 2), (3, 3)]
    finally:
        assert subscriber.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_subscribe_ack_survives_a_restart_and_exits_0(io_loop, tmp_path, signum):
    """`subscribe --ack` across a SIGKILL and restart of the server: every
    message printed once, in order, those published while it was away
    included; the signal ends it with 0; the acks moved the user's cursor,
    so bob's next connection has nothing waiting."""
    server = ServerProcess(tmp_path).start().wait_ready()
    env = cli_env(server.port, NOTIFIER_AUTH_JWT_SECRET=SECRET)
    subscriber = Subscriber(tmp_path, env, "user:bob", "news.x", "--ack")
    try:
        subscriber.state("subscribed news.x")
        for n in (1, 2):
            for topic in ("user:bob", "news.x"):
                assert server.request("POST", "/api/publish", {"topic": topic, "data": n})[0] == 200
        got = [subscriber.message() for _ in range(4)]
        # Stopped, the subscriber can only resume once the restarted server
        # already has 3 and 4: they come from the resumed subscriptions.
        subscriber.process.send_signal(signal.SIGSTOP)
        server.kill()
        server = ServerProcess(tmp_path, port=server.port, store_path=server.store_path)
        server.start().wait_ready()
        for n in (3, 4):
            for topic in ("user:bob", "news.x"):
                assert server.request("POST", "/api/publish", {"topic": topic, "data": n})[0] == 200
        subscriber.process.send_signal(signal.SIGCONT)
        subscriber.state("disconnected")
        subscriber.state("subscribed news.x")
        got += [subscriber.message() for _ in range(4)]
        subscriber.nothing()
        for topic in ("user:bob", "news.x"):
            assert [(m["seq"], m["data"]) for m in got if m["topic"] == topic] == [(n, n) for n in (1, 2, 3, 4)]
        assert subscriber.stop(signum) == 0, "".join(subscriber.stderr)
        client = await connect(server.port, token("bob", ["news.x"]), welcome=False)
        try:
            await client.expect("welcome")
            subscribed = await client.expect("subscribed")
            assert subscribed["topic"] == "user:bob" and subscribed["seq"] == 4
            await client.send({"type": "subscribe", "topic": "news.x", "ref": 1})
            assert (await client.expect("subscribed"))["ref"] == 1
            await client.nothing()  # both cursors at 4: no replay
        finally:
            client.close()
    finally:
        subscriber.stop()
        server.kill()


def assert_fails_with_one_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("toml,key", [
    ('[server]\nport = "x"\n', "server.port"),
    ("[server]\nport = 70000\n", "server.port"),
    ('[server]\ncolour = "blue"\n', "server.colour"),
    ('[retention]\nmax_age = "forever"\n', "retention.max_age"),
    ('[limits]\nmax_body_bytes = "lots"\n', "limits.max_body_bytes"),
    ('[log]\nlevel = "loud"\n', "log.level"),
    ('[nope]\nx = 1\n', "nope"),
    ("[server\nport = 1\n", "notifier.toml"),
])
def test_bad_config_file_fails_fast_with_one_line_naming_the_key(tmp_path, toml, key):
    path = tmp_path / "notifier.toml"
    path.write_text(toml)
    started = time.monotonic()
    # --port, not NOTIFIER_SERVER_PORT, which would override the file's server.port.
    result = notifier("serve", "--config", str(path), "--port", str(free_port()),
                      cwd=tmp_path, env=cli_env(), timeout=QUICK)
    assert time.monotonic() - started < QUICK
    assert_fails_with_one_line(result, key)
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("name,value,key", [
    ("NOTIFIER_RETENTION_MAX_AGE", "bogus", "retention.max_age"),
    ("NOTIFIER_SERVER_PORT", "eighty", "server.port"),
    ("NOTIFIER_HEARTBEAT_INTERVAL", "-1s", "heartbeat.interval"),
    ("NOTIFIER_SERVER_COLOUR", "blue", "server.colour"),
    ("NOTIFIER_AUTH_JWT_SECRET", "short", "auth.jwt_secret"),
    # A secret of one's own and no API key: the HTTP API would refuse everyone.
    ("NOTIFIER_AUTH_JWT_SECRET", "s" * 40, "auth.api_keys"),
])
def test_bad_environment_fails_fast_with_one_line_naming_the_key(tmp_path, name, value, key):
    env = cli_env(free_port(), **{name: value})
    result = notifier("serve", cwd=tmp_path, env=env, timeout=QUICK)
    assert_fails_with_one_line(result, key)


def test_state_directory_holds_the_sqlite_file(tmp_path):
    cwd, state, other = tmp_path / "cwd", tmp_path / "state", tmp_path / "other"
    cwd.mkdir()
    # systemd passes several directories colon-separated; the first is ours.
    with ServerProcess(cwd, env={**NO_CONFIG, "STATE_DIRECTORY": f"{state}:{other}"}) as server:
        status, body = server.request("POST", "/api/publish", {"topic": "a", "data": 1},
                                      key=json.loads((state / "dev-credentials.json").read_text())["api_key"])
        assert status == 200, body
        started = server.wait_for_event("server.started")
    assert (state / "notifier.db").is_file()
    assert started["store"] == str(state / "notifier.db")
    assert not (cwd / "var").exists() and not other.exists()


def test_workers_above_one_without_redis_fails_with_one_line(tmp_path):
    port = free_port()
    started = time.monotonic()
    result = notifier("serve", "--workers", "2", cwd=tmp_path, env=cli_env(port), timeout=QUICK)
    assert time.monotonic() - started < QUICK
    assert_fails_with_one_line(result, "redis")
    assert "workers" in result.stderr
    assert not (tmp_path / "var" / "notifier.db").exists()

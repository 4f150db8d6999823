"""Running ``notifier serve`` as a real subprocess: a free port, a clean
environment, stdout captured line by line to a file, readiness by polling
``/healthz``, signals, and an exit code.

Typical use::

    with ServerProcess(tmp_path) as server:   # started and ready
        ...
        server.signal(signal.SIGTERM)
        assert server.wait(10) == 0

The environment starts from the parent's without any ``NOTIFIER_*`` or
systemd variable, then gets a port, a store file, the test JWT secret and
API key, a short drain timeout and unbuffered output; ``env`` overrides or
(with None) removes any of them.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import signal as signals
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson

from support import API_KEY, SECRET

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 15.0
DRAIN_TIMEOUT = 3.0
# Variables a parent may carry that would change how the child talks to systemd.
_SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                      "LISTEN_PID", "STATE_DIRECTORY")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def base_environment() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("NOTIFIER_") and name not in _SYSTEMD_VARIABLES}
    # The child imports notifier from this checkout, whatever the cwd.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ServerProcess:
    """One ``notifier serve`` child process."""

    _serial = 0

    def __init__(self, workdir: Path, *, env: dict[str, str | None] | None = None,
                 args: list[str] | tuple[str, ...] = (), port: int | None = None,
                 store_path: Path | str | None = None, pipe_size: int | None = None):
        ServerProcess._serial += 1
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.store_path = Path(store_path or self.workdir / "notifier.db")
        self.args = list(args)
        self.pipe_size = pipe_size
        name = f"server-{ServerProcess._serial}"
        self.stdout_path = self.workdir / f"{name}.stdout"
        self.stderr_path = self.workdir / f"{name}.stderr"
        self.env = base_environment()
        self.env.update({
            "NOTIFIER_SERVER_HOST": self.host,
            "NOTIFIER_SERVER_PORT": str(self.port),
            "NOTIFIER_STORE_PATH": str(self.store_path),
            "NOTIFIER_AUTH_JWT_SECRET": SECRET,
            "NOTIFIER_AUTH_API_KEYS": API_KEY,
            "NOTIFIER_SERVER_DRAIN_TIMEOUT": f"{DRAIN_TIMEOUT}s",
        })
        for name, value in (env or {}).items():
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._flowing = threading.Event()
        self._flowing.set()

    # Addresses

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    # Life cycle

    def start(self) -> "ServerProcess":
        assert self.process is None, "already started"
        read_end, write_end = os.pipe()
        if self.pipe_size:
            fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, self.pipe_size)
        with open(self.stderr_path, "wb") as stderr:
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "notifier", "serve", *self.args],
                    cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                    stdout=write_end, stderr=stderr,
                )
            finally:
                os.close(write_end)
        self._reader = threading.Thread(target=self._copy_output, args=(read_end,),
                                        name=f"stdout-{self.pid}", daemon=True)
        self._reader.start()
        return self

    def _copy_output(self, fd: int) -> None:
        with open(self.stdout_path, "ab", buffering=0) as out:
            try:
                while True:
                    self._flowing.wait()
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        return
                    out.write(chunk)
            finally:
                os.close(fd)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "ServerProcess":
        """Poll ``GET /healthz`` until it answers 200 (blocking)."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise AssertionError(f"notifier exited with {code} before it was ready:\n"
                                     f"{self.stderr()}")
            try:
                status, _ = self.request("GET", "/healthz", timeout=1.0)
                if status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"notifier not ready after {timeout} s:\n{self.stderr()}")
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int:
        """The exit code; AssertionError if the process outlives ``timeout``."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"notifier still running {timeout} s later") from None
        self._join_reader()
        return code

    def kill(self) -> None:
        """SIGKILL if still running, and reap."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signals.SIGKILL)
        self.process.wait()
        self._join_reader()

    def _join_reader(self) -> None:
        self._flowing.set()
        if self._reader is not None:
            self._reader.join(5)

    def __enter__(self) -> "ServerProcess":
        if self.process is None:
            self.start()
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.kill()

    # Output

    def hold_output(self) -> None:
        """Stop reading the child's stdout: once the pipe is full, its next
        log line blocks the writer (with ``pipe_size`` small, soon)."""
        self._flowing.clear()

    def release_output(self) -> None:
        self._flowing.set()

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[str]:
        """stdout so far, one string per complete line."""
        try:
            text = self.stdout_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]

    def events(self) -> list[dict]:
        """The JSON log lines so far, parsed (other lines skipped)."""
        parsed = []
        for line in self.lines():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                parsed.append(value)
        return parsed

    def find_events(self, event: str, **fields) -> list[dict]:
        return [e for e in self.events() if e.get("event") == event
                and all(e.get(k) == v for k, v in fields.items())]

    def wait_for_event(self, event: str, timeout: float = 5.0, **fields) -> dict:
        """The first log event named ``event`` with these field values (blocking poll)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find_events(event, **fields)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event} {fields} in the log within {timeout} s; "
                                     f"last lines:\n" + "\n".join(self.lines()[-15:]))
            time.sleep(0.02)

    # A small blocking HTTP client (usable from threads)

    def request(self, method: str, path: str, body=None, key: str | None = API_KEY,
                headers: dict | None = None, timeout: float = 5.0) -> tuple[int, dict | None]:
        """One request on a fresh connection: (status, parsed JSON body or None)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            return send(connection, method, path, body, key, headers)
        finally:
            connection.close()


def send(connection: http.client.HTTPConnection, method: str, path: str, body=None,
         key: str | None = API_KEY, headers: dict | None = None) -> tuple[int, dict | None]:
    """One request on ``connection`` (kept alive): (status, parsed JSON body or None)."""
    all_headers = {"Content-Type": "application/json"}
    if key is not None:
        all_headers["Authorization"] = f"Bearer {key}"
    all_headers.update(headers or {})
    payload = orjson.dumps(body) if body is not None else (b"" if method == "POST" else None)
    connection.request(method, path, body=payload, headers=all_headers)
    response = connection.getresponse()
    raw = response.read()
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = {"raw": raw.decode(errors="replace")}
    return response.status, parsed


def read_history(server: ServerProcess, topic: str) -> list[dict]:
    """Every retained message of ``topic``, through the HTTP API, in pages."""
    messages: list[dict] = []
    since = 0
    while True:
        status, body = server.request("GET", f"/api/topics/{topic}/messages?since={since}&limit=1000")
        assert status == 200, body
        messages.extend(body["messages"])
        if not body["messages"] or body["messages"][-1]["seq"] >= body["head"]:
            return messages
        since = body["messages"][-1]["seq"]

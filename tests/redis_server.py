"""A real ``redis-server`` of the test's own, on a free loopback port and a
data directory in the test's temporary folder (never the machine's shared
Redis on 6379). It can be killed and started again on the same port and
data, to show what survives.

    with RedisServer(tmp_path, appendfsync="always") as redis:
        url = redis.url
        redis.kill()       # SIGKILL
        redis.start()      # same port, same AOF
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from procs import free_port
from support import in_ci

START_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The redis-server to run; fails in CI, skips elsewhere, when missing
    (``make test`` installs it)."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)
    if found is None:
        reason = "redis-server is missing (Debian: apt-get install redis-server); make test installs it"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class RedisServer:
    def __init__(self, workdir: Path, *, appendonly: bool = True, appendfsync: str = "always",
                 port: int | None = None):
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.dir = Path(workdir) / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        assert self.process is None or self.process.poll() is not None, "already running"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"),
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", self.appendfsync]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.process.returncode}:\n"
                                     + self.log())
            if time.monotonic() > deadline:
                raise AssertionError("redis-server did not answer PING:\n" + self.log())
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        """PING answered with +PONG (not -LOADING while it reads its AOF)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command through redis-cli; its raw output."""
        done = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              timeout=10)
        return done.stdout

    def kill(self) -> None:
        """SIGKILL and reap: no shutdown, no final fsync."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

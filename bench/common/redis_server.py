"""A redis-server of the benchmark's own: a free loopback port (never the
machine's shared 6379), its data folder where the caller says (tmpfs or a
disk), pinned like the server under test, AOF with ``appendfsync always``.

Automatic AOF rewrites are off (``auto-aof-rewrite-percentage 0``): a
rewrite forks a child that would take the same core in the middle of a
round; the AOF just grows for the length of a run."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from bench.common.proc import OUR_PIDS, cpu_seconds, memory_bytes
from bench.common.servers import free_port, server_preexec


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                                             else None)
    if found is None:
        raise SystemExit("redis-server not found (Debian: apt-get install redis-server)")
    return found


def redis_version() -> str:
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True).stdout
    return next((word.removeprefix("v=") for word in out.split() if word.startswith("v=")), out.strip())


class RedisServer:
    """``core``: one core, a set of cores, or None (not pinned)."""

    def __init__(self, name: str, workdir: Path, *, core: int | set[int] | None, appendfsync: str = "always"):
        self.name = name
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.core = core
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen | None = None
        self._client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def env(self) -> dict[str, str]:
        """notifier's settings for this Redis: the store and the broker on it."""
        return {"NOTIFIER_STORE_BACKEND": "redis", "NOTIFIER_STORE_REDIS_URL": self.url}

    def start(self, timeout: float = 30.0) -> "RedisServer":
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log"),
                "--appendonly", "yes", "--appendfsync", self.appendfsync,
                "--auto-aof-rewrite-percentage", "0"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=server_preexec(self.core),
                                     start_new_session=True)
        OUR_PIDS.add(self.proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer within {timeout:g} s:\n{self.log()}")
            time.sleep(0.05)

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        return self._client

    def cpu(self) -> float:
        """utime + stime of redis-server (all its threads), seconds."""
        return cpu_seconds([self.proc.pid]) if self.proc is not None else 0.0

    def rss(self) -> int:
        return memory_bytes([self.proc.pid])

    def used_memory(self) -> int:
        """INFO memory's used_memory: what Redis's allocator holds for data and clients."""
        return int(self.client().info("memory")["used_memory"])

    def keys(self) -> int:
        return int(self.client().dbsize())

    def aof_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.rglob("*.aof"))

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._drop_client()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._drop_client()

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def log(self) -> str:
        try:
            return (self.dir / "redis.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

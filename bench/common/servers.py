"""The servers under test, each a subprocess pinned to the server core: the
peers in bench/peers/, the no-op HTTP handler (bench/noop_server.py) and
`notifier serve`; free ports, readiness, stopping, and notifier's HTTP API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from bench.common.proc import OUR_PIDS, cpu_seconds, memory_bytes, proc_tree, wait_bound
from bench.common.run import ROOT, raise_nofile

TOPIC = "bench"
JWT_SECRET = "fanout-benchmark-secret-0123456789abcdef"
API_KEY = "benchkey"

# WebSocket servers speaking the part of notifier's protocol the fan-out
# benchmark uses: a label for the tables and the module to run.
PEERS = {
    "websockets": ("websockets broadcast()", "bench.peers.websockets_broadcast"),
    "fastapi": ("FastAPI ConnectionManager", "bench.peers.fastapi_manager"),
    "tornado": ("Tornado write_message", "bench.peers.tornado_plain"),
    # Not a peer: a reference row (see bench/peers/picows_reference.py).
    "picows": ("picows, 1 send per delivery (reference)", "bench.peers.picows_reference"),
}
BASELINE = "websockets"  # the peer every ratio is to
# HTTP only: the durable publish benchmark's baseline.
NOOP = {"noop": ("no-op Tornado POST", "bench.noop_server")}
# notifier's rows in the fan-out tables: label, and whether publishes are ephemeral.
NOTIFIERS = {
    "notifier": ("notifier (ephemeral)", True),
    "notifier-durable": ("notifier (durable)", False),
}
# 50 messages in flight to one subscriber is ~15 KB; a publisher sends
# thousands of commands a second: the fan-out benchmark lifts both limits so
# that it measures fan-out, not the protections.
LIFTED_LIMITS = {
    "NOTIFIER_LIMITS_MAX_BUFFERED_BYTES": str(64 * 1024 * 1024),
    "NOTIFIER_LIMITS_COMMANDS_PER_SECOND": "1000000",
    "NOTIFIER_LIMITS_COMMANDS_BURST": "1000000",
    # every subscriber of a fan-out test is the same user
    "NOTIFIER_LIMITS_CONNECTIONS_PER_USER": "0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_preexec(core: int | set[int] | None) -> Callable[[], None]:
    """For Popen's preexec_fn: the child's open-files limit raised, and the
    child pinned to `core`, or to a set of cores (None: not pinned)."""
    cores = {core} if isinstance(core, int) else core

    def preexec() -> None:
        raise_nofile()
        if cores is not None:
            os.sched_setaffinity(0, cores)

    return preexec


class Server:
    """One server subprocess: a peer module (PEERS, NOOP) or `notifier serve`.

    `name` is a PEERS/NOOP key or starts with "notifier" (a NOTIFIERS key,
    else labelled "notifier"), with an optional "@tag" to tell instances
    apart. Its files (log, store) are under <workdir>/<name>/. `notifier` is
    the notifier executable (`notifier token` mints with it), `serve` the
    command that serves (default: `<notifier> serve`), `env` more environment
    for notifier. start() after stop() runs a new process on the same port
    and store: a restart."""

    def __init__(self, name: str, workdir: Path, *, core: int | set[int] | None, notifier: str | None = None,
                 serve: list[str] | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.kind = "notifier" if name.startswith("notifier") else "peer"
        base = name.split("@")[0]
        if self.kind == "peer":
            self.label, self.module = {**PEERS, **NOOP}[base]
            self.ephemeral = True
        else:
            self.label, self.ephemeral = NOTIFIERS.get(base, ("notifier", False))
        self.core = core
        self.notifier = notifier
        self.serve = serve or [str(notifier), "serve"]
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.sub_token = "x"
        self.pub_token = "x"
        self.env = os.environ.copy()
        if self.kind == "notifier":
            self.env.update({
                "NOTIFIER_SERVER_HOST": "127.0.0.1",
                "NOTIFIER_SERVER_PORT": str(self.port),
                "NOTIFIER_AUTH_JWT_SECRET": JWT_SECRET,
                "NOTIFIER_AUTH_API_KEYS": API_KEY,
                "NOTIFIER_STORE_PATH": str(self.dir / "notifier.db"),
                "NOTIFIER_LOG_LEVEL": "warning",
                "STATE_DIRECTORY": str(self.dir),
                **(env or {}),
            })

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        if self.kind == "notifier":
            argv = self.serve
            cwd = self.dir
        else:
            argv = [sys.executable, "-m", self.module, "--port", str(self.port)]
            cwd = ROOT
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=server_preexec(self.core),
                start_new_session=True,
            )
        self.pids = [self.proc.pid]
        OUR_PIDS.update(self.pids)

    async def wait_listening(self, timeout: float = 30.0) -> None:
        """Until the port takes connections (notifier opens its store first)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start:\n{self.tail()}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout}s:\n{self.tail()}")
                await asyncio.sleep(0.1)
        self.pids = proc_tree(self.proc.pid)
        OUR_PIDS.update(self.pids)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Listening, and for notifier a subscriber's and a publisher's token for TOPIC."""
        await self.wait_listening(timeout)
        if self.kind == "notifier":
            self.sub_token = self.mint("bench-sub")
            self.pub_token = self.mint("bench-pub")

    def mint(self, user: str) -> str:
        out = subprocess.run(
            [self.notifier, "token", "--user", user, "--topics", TOPIC, "--publish", TOPIC, "--ttl", "6h"],
            env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"notifier token failed ({out.returncode}): {out.stderr.strip()}")
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if not lines:
            raise RuntimeError("notifier token printed nothing")
        return lines[-1]

    async def wait_workers(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` sockets listen on the port (`notifier serve --workers`:
        one per worker, SO_REUSEPORT), then take in every process of the tree."""
        deadline = time.monotonic() + timeout
        while listening_sockets(self.port) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {listening_sockets(self.port)} of {count} workers listen "
                                   f"on {self.port}:\n{self.tail()}")
            await asyncio.sleep(0.1)
        self.pids = proc_tree(self.proc.pid)
        OUR_PIDS.update(self.pids)

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def waited(self) -> float:
        """proc.wait_bound() of the server process: its growth is at least how
        long other tasks kept the event loop from its core."""
        return wait_bound(self.proc.pid)

    def rss(self) -> int:
        return memory_bytes(self.pids)

    def peak_rss(self) -> int:
        """The most the process has had resident since it started (VmHWM)."""
        return memory_bytes(self.pids, "VmHWM")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def listening_sockets(port: int) -> int:
    """TCP sockets listening on `port` (IPv4), from /proc/net/tcp."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, _, state = line.split()[1:4]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def topic_head(port: int, topic: str) -> int:
    """The head (last seq stored) of `topic`, through notifier's HTTP API."""
    status, body = http("GET", f"http://127.0.0.1:{port}/api/topics/{topic}/messages?since=0&limit=1")
    if status != 200:
        raise RuntimeError(f"GET /api/topics/{topic}/messages answered {status}: {body[:300]!r}")
    return json.loads(body)["head"]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 10) -> tuple[int, bytes]:
    """One request to notifier's HTTP API with the benchmarks' key: (status, body)."""
    request = urllib.request.Request(url, data=body, method=method, headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()

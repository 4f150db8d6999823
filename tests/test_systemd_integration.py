"""`notifier serve` under a stand-in for systemd: a real AF_UNIX datagram
socket named by NOTIFY_SOCKET (a path and an abstract name) receives READY=1,
STATUS=, WATCHDOG=1 at half of WATCHDOG_USEC from the event loop, and
STOPPING=1 on SIGTERM."""

from __future__ import annotations

import http.client
import re
import signal
import socket
import time

import pytest

from procs import DRAIN_TIMEOUT, ServerProcess
from support import bind_notify_socket

WATCHDOG_USEC = 400_000  # pings expected every 0.2 s


class Manager:
    """The service manager's end: datagrams as (arrival time, [lines])."""

    def __init__(self, sock: socket.socket, address: str):
        self.sock = sock
        self.address = address
        self.received: list[tuple[float, list[str]]] = []

    def next(self, timeout: float) -> list[str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        lines = data.decode().split("\n")
        self.received.append((time.monotonic(), lines))
        return lines

    def until(self, predicate, timeout: float) -> list[str]:
        """Read datagrams until one has a line matching ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            lines = self.next(max(left, 0.001)) if left > 0 else None
            if lines is None:
                seen = [d for _, d in self.received]
                raise AssertionError(f"nothing matching within {timeout} s; got {seen}")
            if any(predicate(line) for line in lines):
                return lines

    def collect(self, seconds: float) -> list[list[str]]:
        """Every datagram arriving in the next ``seconds``."""
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            lines = self.next(left)
            if lines is not None:
                got.append(lines)
        return got


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path):
    sock, address = bind_notify_socket(request.param, tmp_path)
    yield Manager(sock, address)
    sock.close()


@pytest.fixture
def path_manager(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(tmp_path / "notify.sock")
    sock.bind(address)
    yield Manager(sock, address)
    sock.close()


def systemd_env(manager: Manager) -> dict:
    return {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)}


def port_accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def watchdogs(datagrams: list[list[str]]) -> int:
    return sum(lines.count("WATCHDOG=1") for lines in datagrams)


def test_ready_status_watchdog_and_stopping(manager, tmp_path):
    server = ServerProcess(tmp_path, env=systemd_env(manager)).start()
    try:
        first = manager.until(lambda line: line == "READY=1", timeout=15)
        # READY=1 means the port listens: checked the moment it arrives.
        assert port_accepts(server.port)
        assert first == ["READY=1"]
        status = manager.until(lambda line: line.startswith("STATUS="), timeout=2)
        assert len(status) == 1 and re.search(r"\b0 connections\b", status[0]), status

        window = manager.collect(1.0)
        count = watchdogs(window)
        # Every 0.2 s: about 5 in a second; fewer than 3 means a slower
        # timer, more than 8 one faster than half of WATCHDOG_USEC.
        assert 3 <= count <= 8, window
        assert all(lines == ["WATCHDOG=1"] for lines in window), window
        assert server.request("GET", "/healthz")[0] == 200

        server.signal(signal.SIGTERM)
        manager.until(lambda line: line == "STOPPING=1", timeout=2)
        assert server.wait(DRAIN_TIMEOUT + 5) == 0
        # Nothing claims readiness after STOPPING=1.
        after = manager.collect(0.1)
        assert not any("READY=1" in lines for lines in after), after
    finally:
        server.kill()


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        # pid (comm) state ...; comm may contain spaces or parentheses.
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_stuck_event_loop_stops_the_watchdog(path_manager, tmp_path):
    """Block the event loop itself, not the process: stop reading the
    server's stdout (a 4 KiB pipe), so its next log line blocks in write()
    on the loop thread. The process keeps running (state S, not T), its
    other threads are free, yet no WATCHDOG=1 may come until the loop runs
    again."""
    server = ServerProcess(tmp_path, env=systemd_env(path_manager), pipe_size=4096).start()
    try:
        path_manager.until(lambda line: line == "READY=1", timeout=15)
        assert watchdogs(path_manager.collect(0.5)) >= 2

        server.hold_output()
        # Each answered request writes a log line; keep asking until one
        # goes unanswered, i.e. the loop is stuck in a write.
        stuck = False
        for _ in range(400):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.5)
            try:
                connection.request("GET", "/healthz")
                connection.getresponse().read()
            except TimeoutError:
                stuck = True
                break
            finally:
                connection.close()
        assert stuck, "the server kept answering with its stdout unread"
        path_manager.collect(0.25)  # a ping already on its way may land

        window = path_manager.collect(1.0)
        assert server.running() and process_state(server.pid) != "T"
        assert watchdogs(window) == 0, window

        server.release_output()
        resumed = path_manager.collect(1.0)
        assert watchdogs(resumed) >= 3, resumed
        assert server.request("GET", "/healthz")[0] == 200
        server.signal(signal.SIGTERM)
        assert server.wait(DRAIN_TIMEOUT + 5) == 0
    finally:
        server.kill()

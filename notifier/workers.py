"""``notifier serve --workers N``: N worker processes on one port, and the
process that started them looking after them.

Each worker is a whole notifier (``notifier serve`` with its own event
loop, store and broker connections, and its own node id) bound to the port
with SO_REUSEPORT, so the kernel spreads new connections among them. That
only works with a store they can share: the Redis backend.

The supervisor (this module) is what systemd sees as the main process. It
reserves the port first (so port 0 means the same port for all), starts the
workers, and hears from each over a pipe: ``ready`` once it listens,
``alive`` every second from its event loop. It sends READY=1 once every
worker is ready, WATCHDOG=1 only while every worker is alive, and on
SIGTERM tells each to drain and waits for them. A worker that dies is
logged and started again (0.1 s, doubling to 5 s while it keeps dying
young). SIGHUP goes to every worker, each reloads.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

from notifier import logs
from notifier.config import Config
from notifier.sd_notify import SystemdNotifier

ALIVE_EVERY = 1.0          # seconds between a worker's alive reports
ALIVE_WITHIN = 3 * ALIVE_EVERY
START_GRACE = 15.0         # a starting worker counts as alive this long, until ready
RESTART_FIRST = 0.1
RESTART_MOST = 5.0
YOUNG = 10.0               # a worker that dies younger than this backs off more
STOP_MARGIN = 5.0          # beyond drain_timeout, before a worker is killed


class Worker:
    def __init__(self, index: int):
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ready = False
        self.last_alive = 0.0
        self.restart_delay = RESTART_FIRST

    def alive(self, now: float) -> bool:
        """Reported from its event loop lately; a worker (re)starting gets
        START_GRACE to say it is ready."""
        if self.process is None or self.process.returncode is not None:
            return False
        if not self.ready:
            return now - self.started < START_GRACE
        return now - self.last_alive < ALIVE_WITHIN


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, count: int):
        self.config = config
        self.config_path = config_path
        self.workers = [Worker(index) for index in range(count)]
        self.log = logs.get("notifier.workers")
        self.systemd = SystemdNotifier()
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self.all_ready = asyncio.Event()
        self.failed_at_start: int | None = None
        self.port = 0

    async def run(self) -> int:
        try:
            reservation = _reserve(self.config.server.host, self.config.server.port)
        except OSError as exc:
            print(f"notifier: cannot listen on {self.config.server.host}:"
                  f"{self.config.server.port}: {exc.strerror}", file=sys.stderr)
            return 1
        self.port = reservation.getsockname()[1]
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        try:
            return await self._supervise()
        finally:
            reservation.close()

    async def _supervise(self) -> int:
        for worker in self.workers:
            await self._start(worker)
        waiting = [asyncio.ensure_future(event.wait())
                   for event in (self.all_ready, self.stop_requested)]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in waiting:
            task.cancel()
        if self.stop_requested.is_set():  # a signal, or a worker that could not start
            return await self._stop_all()
        self.log.info("workers.ready", workers=len(self.workers), port=self.port,
                      pids=[worker.process.pid for worker in self.workers])
        self.systemd.ready()
        self._status()
        watchdog = asyncio.ensure_future(self._watchdog())
        await self.stop_requested.wait()
        watchdog.cancel()
        return await self._stop_all()

    # Workers

    async def _start(self, worker: Worker) -> None:
        read_end, write_end = os.pipe()
        args = [sys.executable, "-m", "notifier", "serve", "--worker-fd", str(write_end),
                "--host", self.config.server.host, "--port", str(self.port)]
        if self.config_path:
            args += ["--config", self.config_path]
        # The workers talk to systemd through this process only.
        env = {name: value for name, value in os.environ.items()
               if name not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *args, pass_fds=(write_end,), stdin=asyncio.subprocess.DEVNULL, env=env)
        finally:
            os.close(write_end)
        worker.started = time.monotonic()
        worker.ready = False
        self.log.info("worker.started", worker=worker.index, pid=worker.process.pid)
        asyncio.ensure_future(self._listen(worker, worker.process, read_end))

    async def _listen(self, worker: Worker, process: asyncio.subprocess.Process,
                      read_end: int) -> None:
        """Read the worker's reports until its pipe closes, then see to its end."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb", 0))
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                report = line.strip()
                if report == b"ready":
                    worker.ready = True
                    worker.last_alive = time.monotonic()
                    if all(w.ready for w in self.workers):
                        self.all_ready.set()
                elif report == b"alive":
                    worker.last_alive = time.monotonic()
        finally:
            transport.close()
        code = await process.wait()
        await self._ended(worker, code)

    async def _ended(self, worker: Worker, code: int) -> None:
        if self.stopping:
            return
        age = time.monotonic() - worker.started
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        if not self.all_ready.is_set():
            # It could not start (bad config, Redis away): nor will the others.
            self.log.error("worker.failed_to_start", worker=worker.index, how=how)
            self.failed_at_start = code if code > 0 else 1
            self.stop_requested.set()
            return
        self.log.error("worker.died", worker=worker.index, pid=worker.process.pid, how=how,
                       age=round(age, 1), restart_in=worker.restart_delay)
        self._status()
        await asyncio.sleep(worker.restart_delay)
        worker.restart_delay = (min(worker.restart_delay * 2, RESTART_MOST) if age < YOUNG
                                else RESTART_FIRST)
        if not self.stopping:
            await self._start(worker)

    async def _stop_all(self) -> int:
        self.stopping = True
        self.systemd.stopping()
        running = [w for w in self.workers if w.process and w.process.returncode is None]
        self.log.info("workers.stopping", workers=len(running))
        for worker in running:
            worker.process.send_signal(signal.SIGTERM)
        limit = self.config.server.drain_timeout + STOP_MARGIN
        codes = []
        for worker in running:
            try:
                codes.append(await asyncio.wait_for(worker.process.wait(), limit))
            except asyncio.TimeoutError:
                self.log.error("worker.killed", worker=worker.index, pid=worker.process.pid)
                worker.process.kill()
                codes.append(await worker.process.wait())
        self.log.info("workers.stopped", codes=codes)
        if self.failed_at_start is not None:
            return self.failed_at_start
        return 0 if all(code == 0 for code in codes) else 1

    # Signals and systemd

    def _reload(self) -> None:
        self.systemd.reloading()
        for worker in self.workers:
            if worker.process and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGHUP)
        self.log.info("workers.reload", workers=len(self.workers))
        self.systemd.ready()

    async def _watchdog(self) -> None:
        interval = self.systemd.watchdog_interval()
        while True:
            now = time.monotonic()
            if interval and all(worker.alive(now) for worker in self.workers):
                self.systemd.watchdog()
            self._status()
            await asyncio.sleep(min(interval or ALIVE_EVERY, ALIVE_EVERY))

    def _status(self) -> None:
        now = time.monotonic()
        alive = sum(worker.alive(now) for worker in self.workers)
        self.systemd.status(f"{alive} of {len(self.workers)} workers alive on port {self.port}")


class WorkerReports:
    """The worker's end of the pipe to its supervisor."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, report: str) -> bool:
        """False once the supervisor is gone (the worker should then stop)."""
        try:
            os.write(self.fd, report.encode() + b"\n")
            return True
        except OSError:
            return False


def _reserve(host: str, port: int) -> socket.socket:
    """A bound, never listening socket with SO_REUSEPORT: it fixes the port
    (port 0 picks one) for the workers, and takes no connections itself."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def supervise(config: Config, config_path: str | None, count: int) -> int:
    logs.configure(config.log.level)
    return asyncio.run(Supervisor(config, config_path, count).run())

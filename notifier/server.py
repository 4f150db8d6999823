"""Running the service: open the store, listen, tell systemd, and on SIGTERM
drain (stop accepting, close clients with 1001, let in-flight publishes commit
and answer) before exiting; SIGHUP reloads log level and keys."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from pathlib import Path

from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from notifier import config as config_module
from notifier import internals, logs, protocol
from notifier.app import Services, build_services, make_app
from notifier.auth import ApiKeys, DevCredentials, development_credentials
from notifier.broker.base import Broker
from notifier.broker.local import LocalBroker
from notifier.broker.redis import BrokerError, RedisBroker
from notifier.config import Config, ConfigError, redact_url
from notifier.handlers.api import BodyLimit
from notifier.heartbeat import Heartbeat
from notifier.sd_notify import SystemdNotifier
from notifier.store.base import Store, StoreError
from notifier.store.sqlite import SQLiteStore
from notifier.workers import ALIVE_EVERY, WorkerReports

STATUS_INTERVAL = 5.0
CLOSE_GRACE = 1.0  # seconds a drain waits for sockets to close after the 1001s
# Connections the kernel holds for accept(): in a reconnect storm, one that
# finds the queue full is dropped and retried a second or more later. The
# kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def resolve_secrets(config: Config) -> DevCredentials | None:
    """The JWT secret and API keys to use; with none configured, development
    ones kept in the state directory (and the config is updated to use them).
    Raises ConfigError when the kept development credentials are unreadable."""
    uses_secret = any(a.startswith("HS") for a in config.auth.jwt_algorithms)
    if config.auth.jwt_secret or not uses_secret:
        return None
    dev = development_credentials(config_module.state_directory())
    config.auth.jwt_secret = dev.jwt_secret
    if not config.auth.api_keys:
        config.auth.api_keys = [dev.api_key]
    return dev


def http_server(services: Services) -> HTTPServer:
    """The HTTP server for the app, with the body limit in front of it (413
    JSON at any size; see ``BodyLimit``). ``idle_connection_timeout`` bounds
    how long a connection may take to send its request headers (a
    handshake), and how long an idle keep-alive connection stays."""
    return HTTPServer(BodyLimit(make_app(services), services),
                      xheaders=services.config.server.xheaders,
                      idle_connection_timeout=services.config.limits.handshake_timeout)


def store_path(config: Config) -> Path:
    return Path(config.store.path) if config.store.path else (
        config_module.state_directory() / "notifier.db")


def open_backend(config: Config) -> tuple[Store, Broker, str]:
    """The store and broker ``store.backend`` names (not yet opened), and
    where the store is, for the start-up line."""
    if config.store.backend == "redis":
        from notifier.store.redis import RedisStore

        store: Store = RedisStore(config.store.redis_url, config.retention.max_messages,
                                  config.retention.max_age)
        return store, RedisBroker(config.store.redis_url), redact_url(config.store.redis_url)
    path = store_path(config)
    return (SQLiteStore(path, config.retention.max_messages, config.retention.max_age),
            LocalBroker(), str(path))


class Server:
    def __init__(self, config: Config, config_path: str | None, worker_fd: int | None = None):
        self.config = config
        self.config_path = config_path
        self.log = logs.get()
        # A worker reports to its supervisor, which alone talks to systemd.
        self.reports = WorkerReports(worker_fd) if worker_fd is not None else None
        self.systemd = SystemdNotifier({} if self.reports else None)
        self.stop_requested = asyncio.Event()
        self.services: Services | None = None

    async def run(self) -> int:
        config = self.config
        try:
            internals.check()
        except internals.InternalsMissing as exc:
            print(f"notifier: {exc}", file=sys.stderr)
            return 1
        try:
            dev = resolve_secrets(config)
        except ConfigError as exc:
            print(f"notifier: {exc}", file=sys.stderr)
            return 1
        store, broker, where = open_backend(config)
        try:
            await store.open()
        except StoreError as exc:
            print(f"notifier: {exc}", file=sys.stderr)
            return 1
        try:
            await broker.start()
        except BrokerError as exc:
            print(f"notifier: {exc}", file=sys.stderr)
            await store.close()
            return 1
        services = self.services = build_services(config, store, broker)
        if config.store.backend == "redis":
            logs.bind_node(services.node.id)
        await services.presence.start()
        # A JWKS that cannot be fetched is logged (jwks.fetch_failed) and retried;
        # the service starts anyway: the HTTP API does not need it.
        await services.verifier.start()
        http = http_server(services)
        try:
            # Workers share the port; the kernel spreads connections among them.
            sockets = bind_sockets(config.server.port, config.server.host,
                                   reuse_port=self.reports is not None, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            print(f"notifier: cannot listen on {config.server.host}:{config.server.port}: "
                  f"{exc.strerror}", file=sys.stderr)
            services.verifier.stop()
            await self._close_backend(services)
            return 1
        http.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        heartbeat = Heartbeat(lambda: services.hub.peers, config.heartbeat.interval,
                              config.heartbeat.timeout)
        heartbeat.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        timers = [PeriodicCallback(self.report_status, STATUS_INTERVAL * 1000)]
        watchdog = self.systemd.watchdog_interval()
        if watchdog:
            # Sent from the event loop itself: a stuck loop stops the pings.
            timers.append(PeriodicCallback(self.systemd.watchdog, watchdog * 1000))
        if self.reports is not None:
            # From the event loop, like the watchdog: a stuck loop stops them.
            timers.append(PeriodicCallback(self._report_alive, ALIVE_EVERY * 1000))
        for timer in timers:
            timer.start()
        self.log.info("server.started", host=config.server.host, port=port, store=where,
                      backend=config.store.backend, pid=os.getpid())
        if dev is not None:
            _print_dev_banner(config, port, dev)
        _tune_gc()
        self.systemd.ready()
        self.report_status()
        self.systemd.watchdog()
        if self.reports is not None:
            self.reports.send("ready")

        await self.stop_requested.wait()

        self.systemd.stopping()
        # Nothing made from here on outlives the process; a full collection
        # over 10,000 connections' objects would take a large part of the drain.
        gc.disable()
        self.log.info("server.draining", connections=len(services.hub.peers),
                      in_flight=services.publisher.in_flight)
        services.draining = True
        http.stop()  # no new connections; new requests on open ones get 503
        # Publishes already in flight (HTTP or socket) commit and get their
        # answer before their sockets close.
        try:
            await asyncio.wait_for(services.publisher.wait_idle(), config.server.drain_timeout)
        except asyncio.TimeoutError:
            self.log.error("server.drain_timeout", in_flight=services.publisher.in_flight)
        for peer in list(services.hub.peers):
            peer.close_with(protocol.CLOSE_GOING_AWAY, "server shutting down")
        # Give answers and close frames a moment to leave, and clients a
        # moment to answer the close (each is logged as it ends), then hang up.
        try:
            await asyncio.wait_for(self._all_closed(http), CLOSE_GRACE)
        except asyncio.TimeoutError:
            pass
        for timer in timers:
            timer.stop()
        heartbeat.stop()
        services.verifier.stop()
        await self._close_backend(services)
        self.log.info("server.stopped")
        return 0

    async def _all_closed(self, http: HTTPServer) -> None:
        """Until every HTTP connection and every WebSocket has closed (the
        WebSockets left HTTPServer's keeping at their upgrade)."""
        await http.close_all_connections()
        while self.services.hub.peers:
            await asyncio.sleep(0.01)

    async def _close_backend(self, services: Services) -> None:
        await services.presence.close()
        await services.broker.close()
        await services.store.close()

    def _report_alive(self) -> None:
        if not self.reports.send("alive"):
            # The supervisor is gone: nobody would restart or stop this worker.
            self.log.error("worker.orphaned")
            self.stop_requested.set()

    def report_status(self) -> None:
        hub = self.services.hub
        self.systemd.status(f"{len(hub.peers)} connections, {len(hub.topics)} topics, "
                            f"{hub.messages_in} messages in, {hub.messages_out} out")

    def reload(self) -> None:
        """SIGHUP: re-read config and apply what can change at run time."""
        self.systemd.reloading()
        try:
            fresh = config_module.load(self.config_path)
            config_module.require_api_keys(fresh)
            resolve_secrets(fresh)  # development credentials, if still unconfigured
        except ConfigError as exc:
            self.log.error("config.reload_failed", error=str(exc))
            self.systemd.ready()
            return
        services = self.services
        logs.configure(fresh.log.level)
        services.config.log.level = fresh.log.level
        services.config.auth = fresh.auth
        services.api_keys = ApiKeys(fresh.auth.api_keys)
        services.verifier = services.verifier.reloaded(fresh.auth)
        self.log.info("config.reloaded", log_level=fresh.log.level,
                      api_keys=len(fresh.auth.api_keys))
        self.systemd.ready()


# Allocations between young collections, and collections between older
# ones: CPython's 700, 10, 10 suit small heaps. With thousands of
# connections every collection walks objects that live as long as they
# do; fewer, larger collections cut server CPU per new connection from a
# median of 0.72-0.81 ms to 0.56 ms (runs of 7, 2,000 connections each).
GC_THRESHOLDS = (20_000, 20, 20)


def _tune_gc() -> None:
    """What start-up made (modules, config, the app) lives as long as the
    process: freezing it keeps every later collection from walking it."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _print_dev_banner(config: Config, port: int, dev: DevCredentials) -> None:
    host = config.server.host
    # Only the generated key is shown; a configured one stays out of the output.
    key = dev.api_key if dev.api_key in config.auth.api_keys else "<one of auth.api_keys>"
    print(
        f"""
notifier is running with development credentials (no auth.jwt_secret configured);
they are kept in {dev.path} and are not for production.

  mint a token:   .venv/bin/notifier token --user alice
  subscribe:      .venv/bin/notifier subscribe user:alice
                  (or open ws://{host}:{port}/ws?token=<token> from any WebSocket client)
  publish:        curl -H 'Authorization: Bearer {key}' \\
                       -d '{{"user":"alice","data":{{"hello":"world"}}}}' http://{host}:{port}/api/publish
""",
        file=sys.stderr, flush=True,
    )


def serve(config: Config, config_path: str | None, worker_fd: int | None = None) -> int:
    logs.configure(config.log.level)
    return asyncio.run(_serve(Server(config, config_path, worker_fd)))


async def _serve(server: Server) -> int:
    code = await server.run()
    if code == 0:
        # Drained and stopped: the stores are closed, every answer was sent.
        # What is left is memory, and tearing it down (cancelling every
        # connection's task, freeing its objects) took over a second with
        # 10,000 connections: time a restarting service is not listening.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return code

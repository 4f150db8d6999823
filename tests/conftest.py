"""Shared fixtures: a real notifier app on a free loopback port (via
pytest-tornasync's ``http_server``), on a real SQLite file, and real
WebSocket clients that speak JSON."""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path

import pytest

from notifier import logs
from notifier.app import build_services
from notifier.broker.local import LocalBroker
from notifier.config import Config
from notifier.server import http_server as http_server_for
from notifier.store.sqlite import SQLiteStore
from redis_server import RedisServer
from support import API_KEY, SECRET, connect

# Hypothesis keeps caches under .hypothesis in the working directory (its
# example database is off, tests/test_properties.py): keep the tree clean.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      str(Path(tempfile.gettempdir()) / f"notifier-hypothesis-{os.getuid()}"))


def pytest_collection_modifyitems(config, items):
    # Every test here talks to real sockets: bound them so a hang fails fast.
    if config.option.async_test_timeout is None:
        config.option.async_test_timeout = 30


@pytest.fixture
def config(tmp_path) -> Config:
    config = Config()
    config.auth.jwt_secret = SECRET
    config.auth.api_keys = [API_KEY]
    config.store.path = str(tmp_path / "notifier.db")
    return config


@pytest.fixture
def services(io_loop, config):
    store = SQLiteStore(config.store.path, config.retention.max_messages, config.retention.max_age)
    io_loop.run_sync(store.open)
    services = build_services(config, store, LocalBroker())
    yield services
    io_loop.run_sync(store.close)


@pytest.fixture
def http_server(io_loop, services, http_server_port):
    """The app on its free port, served the way ``notifier serve`` serves it
    (pytest-tornasync's own fixture would build a bare HTTPServer)."""
    server = http_server_for(services)
    server.add_socket(http_server_port[0])
    yield server
    server.stop()


@pytest.fixture
def port(http_server, http_server_port) -> int:
    return http_server_port[1]


@pytest.fixture
def ws(port):
    """Connect like ``connect(port, ...)``; every client is closed at teardown."""
    opened = []

    async def open_client(jwt, **kwargs):
        client = await connect(port, jwt, **kwargs)
        opened.append(client)
        return client
    yield open_client
    for client in opened:
        client.close()


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of this test's own (AOF, appendfsync always) on a free port."""
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def captured():
    """Every log line (ours, Tornado's, the stdlib's) goes to a StringIO; the
    logging setup in force before is put back afterwards."""
    saved_logs = logs.settings()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    access = logging.getLogger("tornado.access")
    saved_access_level = access.level
    stream = io.StringIO()
    logs.configure("debug", stream=stream)
    yield stream
    logs.configure(*saved_logs)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    access.setLevel(saved_access_level)

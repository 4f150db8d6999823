"""sd_notify: the exact datagrams a real AF_UNIX socket receives, and the watchdog interval."""

import os
import socket
import threading
import time

import pytest

from notifier import sd_notify
from notifier.sd_notify import SystemdNotifier
from support import bind_notify_socket


@pytest.fixture(params=["path", "abstract"])
def manager(request, tmp_path, monkeypatch):
    """A socket standing in for systemd, named by NOTIFY_SOCKET."""
    sock, env_value = bind_notify_socket(request.param, tmp_path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    yield sock
    sock.close()


@pytest.fixture
def notifier():
    made = []

    def make():
        made.append(SystemdNotifier())
        return made[-1]

    yield make
    for n in made:
        n.close()


def assert_nothing_more(sock):
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.status("serving 3 connections"), b"STATUS=serving 3 connections"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.stopping(), b"STOPPING=1"),
    ],
    ids=["ready", "status", "watchdog", "stopping"],
)
def test_each_method_sends_its_datagram(manager, notifier, call, expected):
    n = notifier()
    assert n.enabled
    assert call(n) is True
    assert manager.recv(4096) == expected
    assert_nothing_more(manager)


def test_reloading_sends_the_monotonic_time(manager, notifier):
    n = notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = manager.recv(4096).split(b"\n")
    assert len(lines) == 2
    assert lines[0] == b"RELOADING=1"
    key, _, value = lines[1].partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_status_cannot_inject_other_assignments(manager, notifier):
    assert notifier().status("line one\nREADY=1") is True
    assert manager.recv(4096) == b"STATUS=line one READY=1"


def test_messages_arrive_in_order_over_one_socket(manager, notifier, monkeypatch):
    opened = []
    real_socket = socket.socket

    def counting_socket(*args, **kwargs):
        opened.append(args)
        return real_socket(*args, **kwargs)

    monkeypatch.setattr(sd_notify.socket, "socket", counting_socket)
    n = notifier()
    assert n.ready() and n.watchdog() and n.status("ok") and n.stopping()
    assert [manager.recv(4096) for _ in range(4)] == [
        b"READY=1",
        b"WATCHDOG=1",
        b"STATUS=ok",
        b"STOPPING=1",
    ]
    assert len(opened) == 1


def test_a_full_manager_queue_fails_the_send_instead_of_blocking(manager, notifier):
    n = notifier()
    results = []

    def flood():
        # The manager never reads, so its queue fills after a few datagrams.
        for _ in range(10_000):
            results.append(n.watchdog())
            if not results[-1]:
                return

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    sender.join(5)
    assert not sender.is_alive(), "sending blocked on a full queue"
    assert results[0] is True
    assert results[-1] is False


def test_without_notify_socket_nothing_is_sent_and_nothing_raises(monkeypatch, notifier):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = notifier()
    assert not n.enabled
    assert [n.ready(), n.status("x"), n.watchdog(), n.stopping(), n.reloading()] == [False] * 5


@pytest.mark.parametrize(
    "value",
    ["", "@", "relative/notify.sock", "vsock:2:1234"],
    ids=["empty", "bare-at", "relative", "vsock"],
)
def test_unsupported_addresses_are_treated_as_no_manager(monkeypatch, notifier, value):
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    n = notifier()
    assert not n.enabled
    assert n.ready() is False


def test_a_missing_socket_returns_false(tmp_path, monkeypatch, notifier):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    n = notifier()
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False


def test_a_manager_that_goes_away_returns_false(manager, notifier):
    n = notifier()
    assert n.ready() is True
    manager.close()
    assert n.watchdog() is False


def test_after_close_nothing_is_sent(manager, notifier):
    n = notifier()
    n.close()
    assert not n.enabled
    assert n.ready() is False
    assert_nothing_more(manager)


def test_environment_is_read_when_built(manager, monkeypatch, notifier):
    n = notifier()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert n.ready() is True
    assert manager.recv(4096) == b"READY=1"


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("1000", None, 0.0005),
        ("30000000", "other", None),
        (None, None, None),
        (None, "self", None),
        ("0", None, None),
        ("-5", None, None),
        ("thirty", None, None),
    ],
    ids=["set", "set-our-pid", "small", "other-pid", "unset", "unset-our-pid", "zero", "negative", "garbage"],
)
def test_watchdog_interval(monkeypatch, notifier, usec, pid, expected):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notifier().watchdog_interval() == expected


def test_an_explicit_environment_overrides_os_environ(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    n = SystemdNotifier({"WATCHDOG_USEC": "4000000"})
    assert n.watchdog_interval() == 2.0
    assert not n.enabled

"""sd_notify(3) without libsystemd: readiness, status and liveness for systemd.

The protocol is one datagram of newline-separated ``KEY=VALUE`` lines sent to
the AF_UNIX socket named by ``$NOTIFY_SOCKET``. Outside systemd the variable
is unset and every method does nothing.
"""

import os
import socket
import time
from collections.abc import Mapping


class SystemdNotifier:
    """Talks to the service manager named by the environment it is built from.

    Every sending method returns True when the datagram was handed to the
    socket and False otherwise (no ``NOTIFY_SOCKET``, an address form this
    class does not speak, the manager gone, its queue full, or ``close()``
    called). None of them raises, blocks or logs: a notification is advice to
    the manager, and failing to give it must not hurt the service.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``
        from ``environ`` (``os.environ`` by default), once."""
        env = os.environ if environ is None else environ
        self._address = _unix_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = _positive_int(env.get("WATCHDOG_USEC"))
        self._watchdog_pid = _positive_int(env.get("WATCHDOG_PID"))
        self._sock: socket.socket | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        """True when there is a manager to notify."""
        return self._address is not None and not self._closed

    def ready(self) -> bool:
        """Start-up (or a reload) is finished: ``READY=1``."""
        return self._send("READY=1")

    def status(self, text: str) -> bool:
        """A one-line human status shown by ``systemctl status``: ``STATUS=text``."""
        # A newline would end the STATUS line and let the text smuggle in
        # other assignments such as READY=1.
        return self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """The process is alive: ``WATCHDOG=1``."""
        return self._send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun: ``STOPPING=1``."""
        return self._send("STOPPING=1")

    def reloading(self) -> bool:
        """A reload has begun: ``RELOADING=1`` and ``MONOTONIC_USEC=<now>``.

        Send ``ready()`` when the reload is done. ``Type=notify-reload``
        uses the timestamp to tell this reload from an earlier one.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls, or None when not asked for.

        Half of ``WATCHDOG_USEC`` (as sd_watchdog_enabled(3) advises, so one
        late tick does not get the service killed), provided ``WATCHDOG_PID``
        is unset or is this process: a forked child must not keep its
        parent alive.
        """
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Release the socket; later calls send nothing and return False."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> bool:
        if not self.enabled:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Called from the event loop: a manager too busy to drain its
                # queue must cost us a lost notification, never a stall.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message.encode(), self._address)
        except (OSError, UnicodeError):
            return False
        return True


def _unix_address(value: str) -> str | None:
    # systemd passes either a filesystem path or an abstract name written
    # with a leading "@" standing for the NUL byte. Other forms (vsock:...)
    # need other socket families; treat them as no manager.
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value or "")
    except ValueError:
        return None
    return number if number > 0 else None

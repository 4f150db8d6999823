"""One PeriodicCallback keeps every connection honest: it pings those that
have been quiet for ``interval``, closes those that left a ping unanswered for
``timeout`` (4010), and closes those whose token expired (4001)."""

from __future__ import annotations

import time
from typing import Callable, Iterable

from tornado.ioloop import PeriodicCallback

from notifier import protocol


class Heartbeat:
    def __init__(self, peers: Callable[[], Iterable], interval: float, timeout: float):
        self.peers = peers
        self.interval = interval
        self.timeout = timeout
        # Ticking faster than either period keeps each deadline within a
        # quarter of it, still with a single callback for all connections.
        tick = max(0.05, min(interval, timeout) / 4)
        self.callback = PeriodicCallback(self.tick, tick * 1000)

    def start(self) -> None:
        self.callback.start()

    def stop(self) -> None:
        self.callback.stop()

    def tick(self) -> None:
        now = time.monotonic()
        wall = time.time()
        for peer in list(self.peers()):
            if peer.identity.expires <= wall:
                peer.close_with(protocol.CLOSE_UNAUTHORIZED, "token expired")
            elif peer.ping_sent_at is not None:
                if now - peer.ping_sent_at > self.timeout:
                    peer.close_with(protocol.CLOSE_HEARTBEAT_TIMEOUT, "heartbeat timeout")
            elif now - peer.last_seen >= self.interval:
                peer.ping_sent_at = now
                peer.send_ping()

"""Whether a new WebSocket connection may open now, and the counts behind it.

A connection is counted from its handshake (once its token is good) until
it closes, and as *connecting* until its setup is done: welcome sent and
its personal topic's queue replayed. Connecting ones cost the most (a
store read, a replay, parked live messages), so during a reconnect storm
their number is capped: past ``limits.max_connecting``, or past
``limits.max_connections`` open in all, a handshake gets 503 with
Retry-After rather than waiting for a turn. One user may hold at most
``limits.connections_per_user`` on this node (429). A zero limit is no limit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Callable

from notifier import protocol
from notifier.config import LimitsConfig

RETRY_AFTER = 1  # seconds a refused handshake is told to wait


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after: int


class Admission:
    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self.open = 0
        self.connecting = 0
        self.per_user: dict[str, int] = {}

    def crowded(self, waiting: int) -> Refusal | None:
        """Before anything else of a handshake is done: a refusal when the
        node is full, or when this one would make more than
        ``limits.max_connecting`` setting up, counting the ``waiting`` ones
        not even checked yet (the turnstile's queue)."""
        limits = self.limits
        if limits.max_connections and self.open >= limits.max_connections:
            return Refusal(503, protocol.UNAVAILABLE, "server is at its connection limit "
                           f"({limits.max_connections}); retry", RETRY_AFTER)
        if limits.max_connecting and self.connecting + waiting >= limits.max_connecting:
            return Refusal(503, protocol.UNAVAILABLE, "too many connections are being set up "
                           "at once; retry", RETRY_AFTER)
        return None

    def admit(self, user: str) -> Refusal | None:
        """Count a new connection of ``user`` in, or say why not."""
        limits = self.limits
        held = self.per_user.get(user, 0)
        if limits.connections_per_user and held >= limits.connections_per_user:
            return Refusal(429, protocol.RATE_LIMITED, f"{held} connections already open for "
                           f"this user, the most limits.connections_per_user allows",
                           RETRY_AFTER)
        self.open += 1
        self.connecting += 1
        self.per_user[user] = held + 1
        return None

    def settled(self) -> None:
        """An admitted connection finished its setup."""
        self.connecting -= 1

    def left(self, user: str, settled: bool) -> None:
        """An admitted connection closed (``settled``: after its setup)."""
        self.open -= 1
        if not settled:
            self.connecting -= 1
        held = self.per_user[user] - 1
        if held:
            self.per_user[user] = held
        else:
            del self.per_user[user]


class Turnstile:
    """Lets handshakes through a few per event-loop turn, in arrival order,
    while other work is under way.

    A burst of new connections (every browser reconnecting after a restart)
    would otherwise all be set up in the turn their requests arrive, a
    fraction of a millisecond of CPU each: hundreds of milliseconds during
    which publishes and fan-out already under way wait. While ``busy()``
    (publishes waiting for their commit, a fan-out not yet written) at most
    ``per_turn`` go through in a turn; a later one waits for a later turn,
    behind those that came first, and what else arrived runs in between.
    With nothing else to do, ``per_idle_turn`` go through: a storm with no
    traffic besides it is set up at full speed.
    """

    def __init__(self, per_turn: int, per_idle_turn: int,
                 busy: Callable[[], bool] = lambda: True):
        self.per_turn = per_turn
        self.per_idle_turn = per_idle_turn
        self.busy = busy
        self._allowed = per_turn
        self._passed = 0
        self._waiting: deque[asyncio.Future] = deque()
        self._turn_scheduled = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def enter(self) -> asyncio.Future | None:
        """None: go on now; else a future to wait for (this handshake's turn)."""
        if not self._waiting and self._passed < self._allowed:
            self._passed += 1
            self._next_turn()
            return None
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        self._next_turn()
        return future

    def _next_turn(self) -> None:
        if not self._turn_scheduled:
            self._turn_scheduled = True
            # call_soon from within a turn runs in the next one, first.
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        self._turn_scheduled = False
        self._passed = 0
        self._allowed = self.per_turn if self.busy() else self.per_idle_turn
        waiting = self._waiting
        while waiting and self._passed < self._allowed:
            future = waiting.popleft()
            if not future.done():  # its client may have gone meanwhile
                future.set_result(None)
                self._passed += 1
        if waiting or self._passed:
            self._next_turn()

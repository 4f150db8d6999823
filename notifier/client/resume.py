"""Where a subscriber is in each topic, and when to try again: no I/O.

``Positions`` decides which messages reach the caller (never one twice) and
what to ask the server for after a reconnect (nothing missed). ``Backoff``
spaces out retries of publishes and reconnects.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from notifier.client.model import JSON, Message


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th retry in a row waits a
    random time between 0 and ``min(maximum, initial * 2**(n-1))``. Jitter
    keeps many clients cut off at once (a server restart) from coming back
    in step. A reconnect counts from 1 again once a socket stayed open
    ``stable_after`` seconds."""

    initial: float = 0.5
    maximum: float = 30.0
    stable_after: float = 10.0

    def delay(self, attempt: int, uniform: Callable[[float, float], float] = random.uniform) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** min(attempt - 1, 62))
        return uniform(0.0, ceiling)


class Positions:
    """The last ``(seq, epoch)`` handed to the caller, per topic.

    Fed in stream order: the ``subscribed`` frames (``subscribed``), the
    reply to the ping sent after a connection's subscribes (``synced``),
    each lost connection (``disconnected``) and each message (``accept``).
    Seqs only compare within one epoch: a ``subscribed`` with another epoch,
    or with a head below the position, means the topic's log was reset, and
    the old position is dropped.
    """

    def __init__(self, topics: list[str], since: int | None):
        self.topics = list(dict.fromkeys(topics))
        self._seq: dict[str, int | None] = {topic: since for topic in self.topics}
        self._epoch: dict[str, str] = {}
        # Heads of subscriptions that started with nothing to resume from
        # (live only, or from a stored cursor the client cannot see): once the
        # server has finished their replays (``synced``), a topic that still
        # has no position has had nothing to hand, so its head becomes one.
        self._floors: dict[str, int] = {}

    def position(self, topic: str) -> tuple[int | None, str | None]:
        return self._seq[topic], self._epoch.get(topic)

    def subscribe_command(self, topic: str, ref: int) -> dict[str, JSON]:
        """The ``subscribe`` that resumes ``topic`` after the last message
        handed over (``since`` omitted while there is none: the stored cursor
        or live)."""
        command: dict[str, JSON] = {"type": "subscribe", "topic": topic, "ref": ref}
        seq, epoch = self.position(topic)
        if seq is not None:
            command["since"] = seq
        if epoch is not None:
            command["epoch"] = epoch
        return command

    def subscribed(self, topic: str, head: int, epoch: str) -> None:
        if topic not in self._seq:
            return
        held = self._epoch.get(topic)
        seq = self._seq[topic]
        if held is not None and (epoch != held or (seq is not None and head < seq)):
            self._seq[topic] = seq = 0  # a new log: everything in it is new to the caller
        self._epoch[topic] = epoch
        if seq is None:
            self._floors[topic] = head
        else:
            self._floors.pop(topic, None)

    def synced(self) -> None:
        for topic, head in self._floors.items():
            if self._seq[topic] is None:
                self._seq[topic] = head
        self._floors.clear()

    def disconnected(self) -> None:
        self._floors.clear()

    def accept(self, message: Message) -> bool:
        """True when ``message`` is to be handed to the caller (and it then
        becomes the topic's position); False for a topic not asked for, or
        a seq already handed."""
        if message.topic not in self._seq:
            return False
        if message.seq is None:
            return True  # ephemeral: never stored, never replayed
        seq = self._seq[message.topic]
        if seq is not None and message.seq <= seq:
            return False
        self._seq[message.topic] = message.seq
        return True

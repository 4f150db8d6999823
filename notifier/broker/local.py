"""The in-process broker: one process, so publishing is calling the listeners."""

from __future__ import annotations

from typing import Sequence

from notifier.broker.base import Broker, Listener
from notifier.messages import Message


class LocalBroker(Broker):
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, messages: Sequence[Message]) -> None:
        for listener in self._listeners:
            listener(messages)

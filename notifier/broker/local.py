"""The in-process broker: one process, so publishing is calling the listener."""

from __future__ import annotations

from typing import Any, Awaitable, Sequence

from notifier.broker.base import READY, Broker, Listener
from notifier.messages import Message


class LocalBroker(Broker):
    """Nothing is ever lost on the way, so ``missed`` is never called, and
    every topic is watched already: the hub drops what nobody wants."""

    def __init__(self) -> None:
        self._listener: Listener | None = None

    def listen(self, listener: Listener) -> None:
        self._listener = listener

    def watch(self, topic: str) -> Awaitable[None]:
        return READY

    def unwatch(self, topic: str) -> None:
        pass

    def publish(self, messages: Sequence[Message]) -> None:
        if self._listener is not None:
            self._listener.deliver(messages)

    def control(self, command: dict[str, Any]) -> None:
        if self._listener is not None:
            self._listener.control(command)

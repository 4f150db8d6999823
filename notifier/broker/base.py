"""The Broker: carries stored messages to every process's hub.

With one process the broker is a direct call; with several it is a shared bus.
Either way the publish path is the same: store, then broker, then hub.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

from notifier.messages import Message

Listener = Callable[[Sequence[Message]], None]


class Broker(ABC):
    @abstractmethod
    def listen(self, listener: Listener) -> None:
        """Register the function every published batch is handed to, on the
        event loop, in the order the batches were published."""

    @abstractmethod
    def publish(self, messages: Sequence[Message]) -> None:
        """Hand ``messages`` (already stored, or ephemeral) to every listener.
        Never blocks; messages of one topic keep their order."""

    async def ping(self) -> None:
        """Return when the broker answers; raise otherwise."""

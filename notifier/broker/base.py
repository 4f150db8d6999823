"""The Broker: carries stored messages to every process's hub.

With one process the broker is a direct call; with several it is a shared
bus. Either way the publish path is the same: store, then broker, then hub.
The bus may lose messages (a dropped connection), never reorder one topic's
and never invent them: every message carries its (seq, epoch), so a hub can
tell a gap and fill it from the store, and the broker says when a gap may
have opened without a later message to show it (``missed``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Awaitable, Protocol, Sequence

from notifier.messages import Message


class Listener(Protocol):
    """What a broker hands things to: the process's hub and its wiring."""

    def deliver(self, messages: Sequence[Message]) -> None:
        """Messages from the bus, in the order each topic's were stored."""

    def missed(self, topics: Sequence[str]) -> None:
        """The bus may have lost messages of these topics (its connection
        was lost and is back): check their positions against the store."""

    def control(self, command: dict[str, Any]) -> None:
        """A command sent to every process (``Broker.control``)."""


class Broker(ABC):
    @abstractmethod
    def listen(self, listener: Listener) -> None:
        """Register the one listener, called on the event loop."""

    @abstractmethod
    def watch(self, topic: str) -> Awaitable[None]:
        """This process has a subscriber for ``topic`` (centrifuge's
        Subscribe on the first one): from when the returned awaitable is
        done, every message stored in ``topic`` reaches the listener. A
        subscription reads history only after that, so nothing falls
        between the read and the bus."""

    @abstractmethod
    def unwatch(self, topic: str) -> None:
        """The last subscriber of ``topic`` here is gone: its traffic may stop."""

    @abstractmethod
    def publish(self, messages: Sequence[Message]) -> None:
        """Hand ``messages`` (stored, or ephemeral) to every process's
        listener. Never blocks; messages of one topic keep their order.
        A store whose append already put them on the bus (``Store.publishes``)
        is not published again."""

    @abstractmethod
    def control(self, command: dict[str, Any]) -> None:
        """Send ``command`` (JSON-able) to every process's listener, this one included."""

    async def start(self) -> None:
        """Connect, if there is anything to connect to."""

    async def close(self) -> None:
        """Disconnect."""

    async def ping(self) -> None:
        """Return when the broker answers; raise otherwise."""



class _Ready:
    """An awaitable that is done already: what ``watch`` returns when there
    is nothing to wait for."""

    def __await__(self):
        return iter(())


READY: Awaitable[None] = _Ready()

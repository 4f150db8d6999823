"""The values the client hands out and takes in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Union

JSON = Any  # any value orjson can serialize: dict, list, str, int, float, bool, None

#: A token, or a function (plain or async) that returns a fresh one; a
#: function is called for every connection and to refresh before expiry.
TokenSource = Union[str, Callable[[], "str | None | Awaitable[str | None]"]]


@dataclass(frozen=True, slots=True)
class Message:
    """A message as a subscriber receives it. ``seq`` is None for an
    ephemeral message; ``epoch`` is the topic's log epoch it belongs to."""

    topic: str
    seq: int | None
    id: str
    time: str
    event: str | None
    data: JSON
    epoch: str | None = None

    def as_dict(self) -> dict[str, JSON]:
        """The fields the history API returns for a message."""
        return {"topic": self.topic, "seq": self.seq, "id": self.id, "time": self.time,
                "event": self.event, "data": self.data}


@dataclass(frozen=True, slots=True)
class Published:
    """The server's answer to a stored publish."""

    id: str
    topic: str
    seq: int
    time: str

    def as_dict(self) -> dict[str, JSON]:
        return {"id": self.id, "topic": self.topic, "seq": self.seq, "time": self.time}


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """One message of a batch: exactly one of ``topic`` and ``user``."""

    data: JSON
    topic: str | None = None
    user: str | None = None
    event: str | None = None
    idempotency_key: str | None = None


# State changes of a subscription, handed to its ``on_event`` callback in
# order with the messages.

@dataclass(frozen=True, slots=True)
class Connected:
    """A socket is open and the server said ``welcome``."""

    connection: str
    user: str
    expires: int


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A topic is followed on the current socket, from head ``seq``."""

    topic: str
    seq: int
    epoch: str
    recovered: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The socket closed or could not be opened; the next try is in
    ``retry_in`` seconds. ``code`` and ``reason`` are the close frame's, or
    None when there was none (connection lost, refused, dead)."""

    code: int | None
    reason: str | None
    retry_in: float


Event = Union[Connected, Subscribed, Disconnected]

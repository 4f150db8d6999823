"""The values that flow from publish to delivery: a draft before it is stored,
a message after."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson


# Plain (not frozen) slotted dataclasses: frozen ones pay for object.__setattr__
# on every field, and these are built once per message on the hot path.
@dataclass(slots=True)
class Draft:
    """A message to publish. ``data`` is already-serialized compact JSON."""

    topic: str
    data: bytes
    event: str | None = None
    idempotency_key: str | None = None


@dataclass(slots=True)
class Message:
    """A published message. It carries its topic's position, ``seq`` in the
    log named ``epoch``, from the store through the broker to every hub, so
    any process can tell a gap or a repeat. Both are None for ephemeral
    messages (never stored)."""

    topic: str
    seq: int | None
    epoch: str | None
    id: str
    time: str
    event: str | None
    data: bytes

    def payload(self) -> bytes:
        """The ``message`` frame's JSON, built from the pre-serialized parts."""
        return b"".join((
            b'{"type":"message","topic":', orjson.dumps(self.topic),
            b',"seq":', b"null" if self.seq is None else str(self.seq).encode(),
            b',"id":"', self.id.encode(),
            b'","time":"', self.time.encode(),
            b'","event":', orjson.dumps(self.event),
            b',"data":', self.data, b"}",
        ))

    def as_dict(self) -> dict:
        return {
            "topic": self.topic, "seq": self.seq, "id": self.id, "time": self.time,
            "event": self.event, "data": orjson.Fragment(self.data),
        }


# Per process: a random tag and a counter, so ids are unique without a
# syscall for randomness each time.
_PROCESS_TAG = os.urandom(3).hex()
_counter = itertools.count(int.from_bytes(os.urandom(3), "big"))


def new_id() -> str:
    """A unique, roughly time-ordered id of 24 hex digits: 12 of ms time,
    6 naming the process, 6 of a counter."""
    return f"{int(time.time() * 1000):012x}{_PROCESS_TAG}{next(_counter) & 0xFFFFFF:06x}"


_connections = itertools.count(1)


def new_connection_id() -> str:
    """A connection's id, unique among every process's: 16 hex digits, 6
    naming the process and 10 of a counter (reading the OS's randomness for
    each one costs more than the rest of building a handler)."""
    return f"{_PROCESS_TAG}{next(_connections) & 0xFFFFFFFFFF:010x}"


def rfc3339(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

"""The Store: where published messages and users' cursors live.

Every implementation keeps, per topic, an append-only log numbered by ``seq``
(1, 2, 3, ... with no gaps as assigned) and an ``epoch``: an opaque string
naming that log, which changes only when the topic's log is lost or reset
(its seqs then start again and mean something else). ``(seq, epoch)`` is a
position any process can compare. Besides the logs: per-(user, topic)
cursors, idempotency keys and retention. The same contract tests run
against every implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from notifier import logs
from notifier.messages import Draft, Message

IDEMPOTENCY_WINDOW = 24 * 3600.0

_log = logs.get("notifier.store")


class StoreError(Exception):
    """The store cannot do what was asked; the message is one line for humans."""


class SeqAboveHead(StoreError):
    """An ack named a seq the topic has not reached."""


@dataclass(slots=True)
class Receipt:
    """The answer to one published draft: what a publisher is told."""

    topic: str
    seq: int
    id: str
    time: str

    def as_dict(self) -> dict:
        return {"id": self.id, "topic": self.topic, "seq": self.seq, "time": self.time}


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a topic's log: ``seq`` in the log named ``epoch``."""

    seq: int
    epoch: str


@dataclass(frozen=True, slots=True)
class AppendResult:
    receipts: list[Receipt]   # one per draft, in the drafts' order
    stored: list[Message]     # the drafts actually stored now (not repeats), in seq order


@dataclass(frozen=True, slots=True)
class History:
    """A slice of one topic's log."""

    messages: list[Message]
    head: int      # the topic's last assigned seq (0 for a topic never published to)
    epoch: str     # the topic's epoch; every message above carries it too
    oldest: int    # the lowest retained seq, or head + 1 when nothing is retained


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a user resumes a topic (``Store.read_from_cursor``)."""

    since: int | None         # the seq read from; None: live only, nothing read
    cursor: Position | None   # the stored cursor; stale when its epoch is not history.epoch
    history: History


class Store(ABC):
    #: True when ``append`` itself puts each stored message on the broker's
    #: bus, in the same atomic step (the Redis store's script): the Publisher
    #: then leaves stored messages to the bus instead of publishing them.
    publishes: bool = False

    @abstractmethod
    async def open(self) -> None:
        """Open or create the store; raise StoreError (one line) if it is unusable.
        An existing store that cannot be read is never overwritten."""

    @abstractmethod
    async def close(self) -> None:
        """Finish pending writes, then release resources."""

    @abstractmethod
    async def append(self, drafts: Sequence[Draft],
                     on_durable: Callable[[AppendResult], None] | None = None) -> AppendResult:
        """Store ``drafts`` as one atomic unit: all of them or none (StoreError).

        Each stored draft gets its topic's next seq, in the drafts' order, and
        its Message carries the topic's epoch. The returned awaitable
        resolves only once the data is durable (fsynced).
        A draft whose ``idempotency_key`` was already used for its topic within
        IDEMPOTENCY_WINDOW, or earlier in the same call, is not stored: its
        receipt is the first one. Concurrent appends resolve in commit order,
        in one event-loop callback per commit, so a caller that hands
        ``stored`` on without awaiting anything else delivers in seq order.
        ``on_durable``, if given, is called with the result inside that
        callback, before any awaiting caller resumes: the earliest moment, in
        commit order, saving the loop turns an await costs.
        """

    @abstractmethod
    async def read_since(self, topic: str, since: int, limit: int) -> History:
        """Retained messages of ``topic`` with seq > ``since``, oldest first, at
        most ``limit``; head, epoch and oldest are read in the same snapshot."""

    @abstractmethod
    async def get_cursor(self, user: str, topic: str) -> Position | None:
        """The last seq ``user`` acked on ``topic``, with the epoch it was
        acked under; None if never."""

    async def read_from_cursor(self, user: str, topic: str, default: int | None,
                               limit: int) -> Resume:
        """Where ``user`` resumes ``topic`` and what follows: from the stored
        cursor; from 0 when the cursor is stale (acked under another epoch:
        everything in this log is new to the user); with no cursor from
        ``default``; then ``read_since`` from there (``limit`` messages), or,
        when that is None too, no messages (head, epoch and oldest only).
        Stores that can should do it all in one snapshot and one round
        trip: every connection starts with this for its personal topic."""
        cursor = await self.get_cursor(user, topic)
        since = cursor.seq if cursor is not None else default
        history = await self.read_since(topic, since or 0, 0 if since is None else limit)
        if cursor is not None and cursor.epoch != history.epoch:
            since = 0  # stale: everything in this log is new to the user
            history = await self.read_since(topic, 0, limit)
        return Resume(since, cursor, history)

    @abstractmethod
    async def set_cursor(self, user: str, topic: str, seq: int) -> None:
        """Store ``seq`` as ``user``'s cursor on ``topic``, with the topic's
        current epoch; durable when it resolves. Within an epoch cursors
        only move forward (an older seq is ignored); a cursor from another
        epoch is replaced. SeqAboveHead if ``seq`` exceeds the topic's head."""

    @abstractmethod
    async def positions(self, topics: Sequence[str]) -> dict[str, Position]:
        """Each topic's head and epoch, as ``read_since`` would report them:
        how a process that may have missed messages (a lost connection to
        the bus) finds which subscriptions to fill from the log."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the store answers; raise StoreError otherwise."""


def resolve_in_order(outcomes: Iterable[tuple[Any, Any, BaseException | None]]) -> None:
    """Hand each job of one commit (anything with ``future`` and
    ``on_done``) its outcome, in commit order, in this one step: every
    ``on_done`` runs before any awaiting caller resumes, as ``append``
    promises, even for a caller that gave up, since the work is stored."""
    for job, result, error in outcomes:
        if error is None and job.on_done is not None:
            try:
                job.on_done(result)
            except Exception:  # noqa: BLE001 - the other jobs of the group must resolve
                _log.error("store.on_durable_failed", exc_info=True)
        if job.future.done():
            continue  # the caller gave up (cancelled); the work is stored regardless
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

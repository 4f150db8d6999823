"""The hub: which connection wants which topic, and fan-out.

A message is encoded and framed once; the same bytes go to every subscriber's
outbox. Each subscription expects exactly ``last_seq + 1`` in its epoch next.
A repeat is dropped. A message further ahead (another process's message
overtook one still on its way, or the bus lost some) or from another epoch
means the subscription has fallen behind: it parks what arrives and asks its
peer to catch up from the store. The hub never reads the store itself. A
subscription that is replaying history parks the same way; ``go_live``
releases what was parked only when it follows on from what the replay sent.
So delivery never skips, never repeats and stays in order, whichever process
stored a message and in whatever order the bus hands it over.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, Protocol, Sequence

from notifier import logs
from notifier.broker.base import READY
from notifier.frames import text_frame
from notifier.messages import Message

if TYPE_CHECKING:
    from notifier.store.base import Position

_log = logs.get("notifier.hub")

# Subscribers written between two questions to in_slice.
CLOCK_EVERY = 32


class Sink(Protocol):
    """Where a connection's frames go (``notifier.outbox.Outbox``)."""

    def write(self, frames: bytes, payloads: Sequence[bytes]) -> None:
        """Send now if possible: ``frames`` is the uncompressed text frames
        of ``payloads`` back to back (compressing sinks use the payloads)."""

    def queue(self, frames: bytes, payloads: Sequence[bytes]) -> None:
        """Send in a later slice of the flush pass, in order with ``write``."""


class Peer(Protocol):
    """What the hub needs from a connection."""

    id: str
    user: str
    outbox: Sink

    def slow_consumer(self) -> None:
        """The peer fell too far behind: close it (4009)."""

    def catch_up(self, subscription: "Subscription") -> None:
        """``subscription`` fell behind: read the store after its
        ``last_seq``, send what it lacks, then ``go_live`` again. The
        subscription parks whatever arrives meanwhile."""


class Subscription:
    __slots__ = ("peer", "outbox", "topic", "last_seq", "epoch", "parked", "parked_bytes",
                 "recheck")

    def __init__(self, peer: Peer, topic: str):
        self.peer = peer
        self.outbox = peer.outbox
        self.topic = topic
        # The position last sent: set by whoever reads the store for it.
        self.last_seq = 0
        self.epoch: str | None = None
        # While replaying or catching up: live messages wait here (with their frames).
        self.parked: list[tuple[Message, bytes, bytes]] | None = []
        self.parked_bytes = 0
        # Messages may have been lost while this one replayed (the bus
        # reconnected): read the store once more before going live.
        self.recheck = False

    @property
    def replaying(self) -> bool:
        return self.parked is not None


class Hub:
    """Messages handed to ``deliver`` wait until the end of the loop turn
    (``flush``, run by the Flusher); then each topic's messages are framed
    once, joined once, and the same bytes go to each subscriber in one write.
    Ten messages to a thousand subscribers cost a thousand writes, not ten
    thousand. Subscribers are written while ``flush``'s ``in_slice`` allows;
    the rest are queued for the Flusher's next slices."""

    def __init__(self, max_parked_bytes: int, schedule: Callable[[], None],
                 on_delivered: Callable[[int], None] | None = None,
                 watch: Callable[[str], Awaitable[None]] = lambda topic: READY,
                 unwatch: Callable[[str], None] = lambda topic: None):
        self.max_parked_bytes = max_parked_bytes
        self.schedule = schedule  # asks for a flush at the end of this loop turn
        self.on_delivered = on_delivered
        # The broker's interest: told of a topic's first subscriber and its last.
        self.watch = watch
        self.unwatch = unwatch
        self._watching: dict[str, Awaitable[None]] = {}  # only those not READY at once
        self.topics: dict[str, dict[Peer, Subscription]] = {}
        self.peers: dict[Peer, dict[str, Subscription]] = {}
        self.by_user: dict[str, set[Peer]] = {}
        # When a presence record elsewhere must follow this hub: the topics
        # and users whose subscribers or connections changed since it looked.
        self.changed_topics: set[str] | None = None
        self.changed_users: set[str] | None = None
        self._pending: dict[str, list[Message]] = {}
        self.messages_in = 0
        self.messages_out = 0

    # Connections and subscriptions

    def add(self, peer: Peer) -> None:
        self.peers[peer] = {}
        self.by_user.setdefault(peer.user, set()).add(peer)
        if self.changed_users is not None:
            self.changed_users.add(peer.user)

    def remove(self, peer: Peer) -> None:
        if peer not in self.peers:
            return
        for topic in self.peers.pop(peer):
            self._drop(peer, topic)
        same_user = self.by_user.get(peer.user)
        if same_user is not None:
            same_user.discard(peer)
            if not same_user:
                del self.by_user[peer.user]
        if self.changed_users is not None:
            self.changed_users.add(peer.user)

    def subscribe(self, peer: Peer, topic: str) -> Subscription:
        """A new subscription, replacing any the peer had on ``topic``. It parks
        live messages until ``go_live`` is called. Read the store for it only
        once ``watching(topic)`` is done."""
        subscription = Subscription(peer, topic)
        subscribers = self.topics.get(topic)
        if subscribers is None:
            subscribers = self.topics[topic] = {}
            ready = self.watch(topic)
            if ready is not READY:
                self._watching[topic] = ready
        if subscribers.get(peer) is None and self.changed_topics is not None:
            self.changed_topics.add(topic)
        subscribers[peer] = subscription
        self.peers[peer][topic] = subscription
        return subscription

    def watching(self, topic: str) -> Awaitable[None]:
        """Done once the broker hands over every message of ``topic``."""
        return self._watching.get(topic, READY)

    def unsubscribe(self, peer: Peer, topic: str) -> bool:
        if self.peers.get(peer, {}).pop(topic, None) is None:
            return False
        self._drop(peer, topic)
        return True

    def _drop(self, peer: Peer, topic: str) -> None:
        subscribers = self.topics.get(topic)
        if subscribers is not None:
            subscribers.pop(peer, None)
            if self.changed_topics is not None:
                self.changed_topics.add(topic)
            if not subscribers:
                del self.topics[topic]
                self._watching.pop(topic, None)
                self.unwatch(topic)

    def is_current(self, subscription: Subscription) -> bool:
        """False once the subscription was replaced, ended, or its peer left."""
        return self.peers.get(subscription.peer, {}).get(subscription.topic) is subscription

    def go_live(self, subscription: Subscription) -> bool:
        """End a replay or catch-up: send what was parked and not yet seen,
        then live. False, with everything still parked, when what was parked
        does not follow on from ``last_seq`` in ``epoch`` (a gap, another
        epoch) or a recheck is due: read the store again, then call again."""
        parked = subscription.parked or []
        if subscription.recheck:
            subscription.recheck = False
            return False
        last = subscription.last_seq
        for message, _, _ in parked:
            seq = message.seq
            if seq is None:
                continue
            if message.epoch != subscription.epoch or seq > last + 1:
                return False
            last = max(last, seq)
        subscription.parked = None
        subscription.parked_bytes = 0
        for message, frame, payload in parked:
            seq = message.seq
            if seq is not None:
                if seq <= subscription.last_seq:
                    continue  # already replayed: never twice
                subscription.last_seq = seq
            subscription.outbox.write(frame, (payload,))
        return True

    def forget_stale(self, subscription: Subscription, parked_before: int, head: int) -> None:
        """A store read that began once ``parked_before`` messages were
        parked found the log at ``head`` in ``subscription.epoch``. Those
        messages were stored before it began, so one the log does not know
        (another epoch, or beyond ``head``) is from a log that is gone:
        drop it, or the subscription would wait for it for ever."""
        parked = subscription.parked
        if not parked:
            return
        epoch = subscription.epoch
        kept = [entry for entry in parked[:parked_before]
                if entry[0].seq is None or (entry[0].epoch == epoch and entry[0].seq <= head)]
        if len(kept) < parked_before:
            subscription.parked = kept + parked[parked_before:]
            subscription.parked_bytes = sum(len(frame) for _, frame, _ in subscription.parked)

    def behind(self, positions: dict[str, "Position"]) -> int:
        """The log may hold messages this process never received (its bus
        connection was lost): every subscription whose position is short of
        its topic's head, or in another epoch, catches up; one still
        replaying rechecks before it goes live. Returns how many caught up."""
        count = 0
        for topic, position in positions.items():
            for subscription in list(self.topics.get(topic, {}).values()):
                if subscription.parked is not None:
                    subscription.recheck = True
                elif position.seq > subscription.last_seq or position.epoch != subscription.epoch:
                    self._fall_behind(subscription, [])
                    count += 1
        return count

    def _fall_behind(self, subscription: Subscription,
                     parked: list[tuple[Message, bytes, bytes]]) -> None:
        subscription.parked = parked
        subscription.parked_bytes = sum(len(frame) for _, frame, _ in parked)
        subscription.peer.catch_up(subscription)

    # Fan-out

    def deliver(self, messages: Sequence[Message]) -> None:
        """Broker listener: collect messages for this turn's flush."""
        self.messages_in += len(messages)
        pending = self._pending
        for message in messages:
            if message.topic in self.topics:
                batch = pending.get(message.topic)
                if batch is None:
                    pending[message.topic] = [message]
                else:
                    batch.append(message)
        if pending:
            self.schedule()

    def flush(self, in_slice: Callable[[], bool] = lambda: True) -> None:
        """Fan out everything delivered this turn, one topic at a time:
        written while ``in_slice()`` says so, queued after."""
        pending, self._pending = self._pending, {}
        sent = 0
        for topic, messages in pending.items():
            subscribers = self.topics.get(topic)
            if subscribers:
                try:
                    sent += self._fan_out(messages, subscribers, in_slice)
                except Exception as exc:  # noqa: BLE001 - the other topics' turn goes on
                    _log.error("hub.fan_out_failed", topic=topic, messages=len(messages),
                               error=repr(exc))
        self.messages_out += sent
        if sent and self.on_delivered is not None:
            self.on_delivered(sent)

    def _fan_out(self, messages: list[Message], subscribers: dict[Peer, Subscription],
                 in_slice: Callable[[], bool]) -> int:
        try:
            payloads = [message.payload() for message in messages]
        except Exception:  # noqa: BLE001 - one message must not cost the others
            messages, payloads = encodable(messages)
            if not messages:
                return 0
        frames = [text_frame(payload) for payload in payloads]
        joined = frames[0] if len(frames) == 1 else b"".join(frames)
        stored = [message for message in messages if message.seq is not None]
        if stored:
            # The whole batch goes in one write to a subscription that
            # expects its first seq, when its seqs run on with no hole, in
            # one epoch: the common case.
            first, last, epoch = stored[0].seq, stored[-1].seq, stored[0].epoch
            whole = last - first + 1 == len(stored) and all(
                message.epoch == epoch and message.seq == first + offset
                for offset, message in enumerate(stored))
        else:
            first = last = epoch = None
            whole = True
        count = len(messages)
        sent = 0
        everyone = list(subscribers.values())
        now = True
        # Ask in_slice once per group of subscribers, not for each.
        for start in range(0, len(everyone), CLOCK_EVERY):
            if now:
                now = in_slice()
            for subscription in everyone[start:start + CLOCK_EVERY]:
                if subscription.parked is not None:
                    subscription.parked.extend(zip(messages, frames, payloads))
                    subscription.parked_bytes += len(joined)
                    if subscription.parked_bytes > self.max_parked_bytes:
                        subscription.peer.slow_consumer()
                elif whole and (first is None or (first == subscription.last_seq + 1
                                                  and epoch == subscription.epoch)):
                    if last is not None:
                        subscription.last_seq = last
                    if now:
                        subscription.outbox.write(joined, payloads)
                    else:
                        subscription.outbox.queue(joined, payloads)
                    sent += count
                else:
                    sent += self._send_each(subscription, messages, frames, payloads)
        return sent

    def _send_each(self, subscription: Subscription, messages: list[Message],
                   frames: list[bytes], payloads: list[bytes]) -> int:
        """One message at a time: skip repeats, and at the first message
        that does not follow on, park it and the rest and catch up."""
        sent = 0
        for index, message in enumerate(messages):
            seq = message.seq
            if seq is not None:
                if message.epoch != subscription.epoch or seq > subscription.last_seq + 1:
                    self._fall_behind(subscription, list(zip(
                        messages[index:], frames[index:], payloads[index:])))
                    return sent
                if seq <= subscription.last_seq:
                    continue  # a repeat: never twice
                subscription.last_seq = seq
            subscription.outbox.write(frames[index], (payloads[index],))
            sent += 1
        return sent

    # Questions

    def presence(self, topic: str) -> tuple[list[str], int]:
        subscribers = self.topics.get(topic, {})
        return sorted({peer.user for peer in subscribers}), len(subscribers)

    def peers_of(self, user: str) -> list[Peer]:
        return list(self.by_user.get(user, ()))

    def subscription_count(self) -> int:
        return sum(len(subscribers) for subscribers in self.topics.values())

    def topics_of(self, peer: Peer) -> Iterable[str]:
        return list(self.peers.get(peer, {}))

    def users(self) -> dict[str, int]:
        """Connections per user on this node."""
        return {user: len(peers) for user, peers in self.by_user.items()}

    def topic_users(self, topic: str) -> dict[str, int]:
        """Connections per user subscribed to ``topic`` on this node."""
        return dict(Counter(peer.user for peer in self.topics.get(topic, ())))


def encodable(messages: Sequence[Message]) -> tuple[list[Message], list[bytes]]:
    """The messages whose frame can be built, with their payloads; any other
    is logged and left out (the wire rules keep such values out, so this is
    a last guard: a stored one leaves a hole a catch-up skips in the same way)."""
    kept, payloads = [], []
    for message in messages:
        try:
            payloads.append(message.payload())
        except Exception as exc:  # noqa: BLE001 - logged, and the rest go on
            _log.error("hub.unencodable_message", topic=message.topic, seq=message.seq,
                       id=message.id, error=repr(exc))
            continue
        kept.append(message)
    return kept, payloads

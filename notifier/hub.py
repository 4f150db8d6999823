"""The hub: which connection wants which topic, and fan-out.

A message is encoded and framed once; the same bytes go to every subscriber's
outbox. The hub never reads the store: a subscription that is still replaying
history parks live messages until the replay is done, then releases the ones
it has not seen, so delivery has no gap, no duplicate, and stays in order.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Protocol, Sequence

from notifier.frames import text_frame
from notifier.messages import Message

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


class Subscription:
    __slots__ = ("peer", "outbox", "topic", "last_seq", "parked", "parked_bytes")

    def __init__(self, peer: Peer, topic: str):
        self.peer = peer
        self.outbox = peer.outbox
        self.topic = topic
        self.last_seq = 0
        # While replaying: live messages wait here (with their frames).
        self.parked: list[tuple[Message, bytes, bytes]] | None = []
        self.parked_bytes = 0

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
                 on_delivered: Callable[[int], None] | None = None):
        self.max_parked_bytes = max_parked_bytes
        self.schedule = schedule  # asks for a flush at the end of this loop turn
        self.on_delivered = on_delivered
        self.topics: dict[str, dict[Peer, Subscription]] = {}
        self.peers: dict[Peer, dict[str, Subscription]] = {}
        self._pending: dict[str, list[Message]] = {}
        self.messages_in = 0
        self.messages_out = 0

    # Connections and subscriptions

    def add(self, peer: Peer) -> None:
        self.peers[peer] = {}

    def remove(self, peer: Peer) -> None:
        for topic in self.peers.pop(peer, {}):
            self._drop(peer, topic)

    def subscribe(self, peer: Peer, topic: str) -> Subscription:
        """A new subscription, replacing any the peer had on ``topic``. It parks
        live messages until ``go_live`` is called."""
        subscription = Subscription(peer, topic)
        self.topics.setdefault(topic, {})[peer] = subscription
        self.peers[peer][topic] = subscription
        return subscription

    def unsubscribe(self, peer: Peer, topic: str) -> bool:
        if self.peers.get(peer, {}).pop(topic, None) is None:
            return False
        self._drop(peer, topic)
        return True

    def _drop(self, peer: Peer, topic: str) -> None:
        subscribers = self.topics.get(topic)
        if subscribers is not None:
            subscribers.pop(peer, None)
            if not subscribers:
                del self.topics[topic]

    def is_current(self, subscription: Subscription) -> bool:
        """False once the subscription was replaced, ended, or its peer left."""
        return self.peers.get(subscription.peer, {}).get(subscription.topic) is subscription

    def go_live(self, subscription: Subscription) -> None:
        """End the replay: send what was parked and not yet seen, then live."""
        parked, subscription.parked = subscription.parked or [], None
        subscription.parked_bytes = 0
        for message, frame, payload in parked:
            self._send_one(subscription, message, frame, payload)

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
                sent += self._fan_out(messages, subscribers, in_slice)
        self.messages_out += sent
        if sent and self.on_delivered is not None:
            self.on_delivered(sent)

    def _fan_out(self, messages: list[Message], subscribers: dict[Peer, Subscription],
                 in_slice: Callable[[], bool]) -> int:
        payloads = [message.payload() for message in messages]
        frames = [text_frame(payload) for payload in payloads]
        joined = frames[0] if len(frames) == 1 else b"".join(frames)
        seqs = [message.seq for message in messages if message.seq is not None]
        first = seqs[0] if seqs else None
        last = seqs[-1] if seqs else None
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
                elif first is None or first > subscription.last_seq:
                    # The common case: nothing here was seen yet, so all of it goes.
                    if last is not None:
                        subscription.last_seq = last
                    if now:
                        subscription.outbox.write(joined, payloads)
                    else:
                        subscription.outbox.queue(joined, payloads)
                    sent += count
                else:
                    for message, frame, payload in zip(messages, frames, payloads):
                        sent += self._send_one(subscription, message, frame, payload)
        return sent

    @staticmethod
    def _send_one(subscription: Subscription, message: Message, frame: bytes, payload: bytes) -> bool:
        seq = message.seq
        if seq is not None:
            if seq <= subscription.last_seq:
                return False  # already replayed: never twice
            subscription.last_seq = seq
        subscription.outbox.write(frame, (payload,))
        return True

    # Questions

    def presence(self, topic: str) -> tuple[list[str], int]:
        subscribers = self.topics.get(topic, {})
        return sorted({peer.user for peer in subscribers}), len(subscribers)

    def peers_of(self, user: str) -> list[Peer]:
        return [peer for peer in self.peers if peer.user == user]

    def subscription_count(self) -> int:
        return sum(len(subscribers) for subscribers in self.topics.values())

    def topics_of(self, peer: Peer) -> Iterable[str]:
        return list(self.peers.get(peer, {}))

    def users(self) -> Counter:
        return Counter(peer.user for peer in self.peers)

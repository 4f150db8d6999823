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


class Peer(Protocol):
    """What the hub needs from a connection."""

    id: str
    user: str

    def send_frame(self, frame: bytes, payload: bytes) -> None:
        """Queue one text frame (``payload`` is its JSON, for compressed peers)."""

    def slow_consumer(self) -> None:
        """The peer fell too far behind: close it (4009)."""


class Subscription:
    __slots__ = ("peer", "topic", "last_seq", "parked", "parked_bytes")

    def __init__(self, peer: Peer, topic: str):
        self.peer = peer
        self.topic = topic
        self.last_seq = 0
        # While replaying: live messages wait here (with their frames).
        self.parked: list[tuple[Message, bytes, bytes]] | None = []
        self.parked_bytes = 0

    @property
    def replaying(self) -> bool:
        return self.parked is not None


class Hub:
    def __init__(self, max_parked_bytes: int, on_delivered: Callable[[Message, int], None] | None = None):
        self.max_parked_bytes = max_parked_bytes
        self.on_delivered = on_delivered
        self.topics: dict[str, dict[Peer, Subscription]] = {}
        self.peers: dict[Peer, dict[str, Subscription]] = {}
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
            self._send(subscription, message, frame, payload)

    # Fan-out

    def deliver(self, messages: Sequence[Message]) -> None:
        """Broker listener: fan each message out to its topic's subscribers."""
        for message in messages:
            self.messages_in += 1
            subscribers = self.topics.get(message.topic)
            if not subscribers:
                continue
            payload = message.payload()
            frame = text_frame(payload)
            sent = 0
            for subscription in list(subscribers.values()):
                if subscription.parked is not None:
                    subscription.parked.append((message, frame, payload))
                    subscription.parked_bytes += len(frame)
                    if subscription.parked_bytes > self.max_parked_bytes:
                        subscription.peer.slow_consumer()
                elif self._send(subscription, message, frame, payload):
                    sent += 1
            self.messages_out += sent
            if self.on_delivered is not None:
                self.on_delivered(message, sent)

    @staticmethod
    def _send(subscription: Subscription, message: Message, frame: bytes, payload: bytes) -> bool:
        seq = message.seq
        if seq is not None:
            if seq <= subscription.last_seq:
                return False  # already replayed: never twice
            subscription.last_seq = seq
        subscription.peer.send_frame(frame, payload)
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

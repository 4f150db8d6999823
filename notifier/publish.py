"""The one way in for messages, from HTTP and WebSocket alike:
store (durable) -> broker -> every hub."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Sequence

from notifier.broker.base import Broker
from notifier.messages import Draft, Message, new_id, rfc3339
from notifier.store.base import AppendResult, Store


class Publisher:
    def __init__(self, store: Store, broker: Broker,
                 on_delivered: Callable[[float], None] | None = None):
        self.store = store
        self.broker = broker
        # Seconds from a publish arriving to its hand-off to the broker (the
        # local hub writes it to sockets at the end of that same loop turn),
        # or, for a store that publishes as it stores, to the commit.
        self.on_delivered = on_delivered
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def publish(self, drafts: Sequence[Draft]) -> AppendResult:
        """Store ``drafts`` atomically; once durable, hand the new ones to the
        broker, from the store's commit callback: the store's commit order is
        the delivery order."""
        started = time.perf_counter()
        self.in_flight += 1
        self._idle.clear()

        def hand_off(result: AppendResult) -> None:
            if result.stored:
                if not self.store.publishes:
                    self.broker.publish(result.stored)
                if self.on_delivered is not None:
                    self.on_delivered(time.perf_counter() - started)

        try:
            # The hand-off runs in the store's commit callback, in commit order,
            # not after this coroutine resumes (a loop turn or two later).
            return await self.store.append(drafts, hand_off)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    def publish_ephemeral(self, draft: Draft) -> Message:
        """Deliver live only: no seq, not stored."""
        started = time.perf_counter()
        message = Message(draft.topic, None, None, new_id(), rfc3339(time.time()), draft.event,
                          draft.data)
        self.broker.publish([message])
        if self.on_delivered is not None:
            self.on_delivered(time.perf_counter() - started)
        return message

    async def wait_idle(self) -> None:
        """Return once no publish is between arriving and being answered."""
        await self._idle.wait()

"""This process as one node among many: what it hears from the broker.

Messages go to the hub. Word that the bus may have lost some (its
connection came back) becomes a position check: the store says each
topic's head, and subscriptions short of it catch up from the log. Control
commands (close a user's connections) run on every node alike.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any, Sequence

from notifier import logs, protocol
from notifier.hub import Hub
from notifier.messages import Message
from notifier.store.base import Store, StoreError

# Seconds between tries of a failing store while checking positions.
RETRY_FIRST = 0.1
RETRY_MOST = 2.0


def new_node_id() -> str:
    """Host, process and a random part: unique among live nodes, readable in logs."""
    return f"{socket.gethostname()[:32]}-{os.getpid()}-{os.urandom(2).hex()}"


class Node:
    def __init__(self, hub: Hub, store: Store, node_id: str | None = None):
        self.hub = hub
        self.store = store
        self.id = node_id or new_node_id()
        self.log = logs.get("notifier.node")
        self._checks: set[asyncio.Future] = set()

    def deliver(self, messages: Sequence[Message]) -> None:
        self.hub.deliver(messages)

    def missed(self, topics: Sequence[str]) -> None:
        task = asyncio.ensure_future(self._check_positions(list(topics)))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check_positions(self, topics: list[str]) -> None:
        delay = RETRY_FIRST
        while True:
            wanted = [topic for topic in topics if topic in self.hub.topics]
            if not wanted:
                return
            try:
                positions = await self.store.positions(wanted)
            except StoreError as exc:
                self.log.error("node.positions_failed", topics=len(wanted), error=str(exc),
                               retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MOST)
                continue
            behind = self.hub.behind(positions)
            self.log.info("node.positions_checked", topics=len(wanted), behind=behind)
            return

    def control(self, command: dict[str, Any]) -> None:
        if command.get("op") == "disconnect" and isinstance(command.get("user"), str):
            user = command["user"]
            peers = self.hub.peers_of(user)
            for peer in peers:
                peer.close_with(protocol.CLOSE_UNAUTHORIZED, "disconnected by the server")
            self.log.info("user.disconnect", user=user, connections=len(peers), node=self.id)
        else:
            self.log.warning("node.unknown_control", command=str(command)[:200])

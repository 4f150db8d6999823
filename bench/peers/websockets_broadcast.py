"""Fan-out peer: the ``websockets`` library, asyncio server and ``broadcast()``.

Written the way the websockets docs show it ("Broadcasting" guide): one
handler coroutine per connection iterating over incoming messages, a set of
connections per topic, and ``websockets.asyncio.server.broadcast`` to push one
message to all of them. Compression is off (``compression=None``).

Speaks the minimal subset of notifier's wire protocol that ``bench.fanout``
uses: ``subscribe`` -> ``subscribed``; ``publish`` -> every subscriber gets a
``message``, the publisher gets ``published``. The ``token`` query parameter is
ignored.

    python -m bench.peers.websockets_broadcast --port 8801
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import datetime, timezone

from websockets.asyncio.server import ServerConnection, broadcast, serve

TOPICS: dict[str, set[ServerConnection]] = {}
HEADS: dict[str, int] = {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reply(msg: dict, ref) -> str:
    if ref is not None:
        msg["ref"] = ref
    return json.dumps(msg)


async def handler(websocket: ServerConnection) -> None:
    mine: set[str] = set()
    try:
        async for raw in websocket:
            try:
                cmd = json.loads(raw)
                kind = cmd["type"]
            except (ValueError, TypeError, KeyError):
                await websocket.send(json.dumps({"type": "error", "code": "bad_request", "message": "bad command"}))
                continue
            ref = cmd.get("ref")
            if kind == "subscribe":
                topic = cmd["topic"]
                TOPICS.setdefault(topic, set()).add(websocket)
                mine.add(topic)
                await websocket.send(_reply(
                    {"type": "subscribed", "topic": topic, "seq": HEADS.get(topic, 0),
                     "epoch": "peer", "recovered": True}, ref))
            elif kind == "unsubscribe":
                topic = cmd["topic"]
                TOPICS.get(topic, set()).discard(websocket)
                mine.discard(topic)
                await websocket.send(_reply({"type": "unsubscribed", "topic": topic}, ref))
            elif kind == "publish":
                topic = cmd["topic"]
                seq = HEADS[topic] = HEADS.get(topic, 0) + 1
                msg_id = uuid.uuid4().hex
                message = json.dumps({
                    "type": "message", "topic": topic, "seq": seq, "id": msg_id,
                    "time": _now(), "event": cmd.get("event"), "data": cmd.get("data"),
                })
                broadcast(TOPICS.get(topic, ()), message)
                await websocket.send(_reply({"type": "published", "topic": topic, "seq": seq, "id": msg_id}, ref))
            elif kind == "ping":
                await websocket.send(_reply({"type": "pong"}, ref))
            else:
                await websocket.send(_reply({"type": "error", "code": "unknown_type", "message": kind}, ref))
    finally:
        for topic in mine:
            TOPICS.get(topic, set()).discard(websocket)


async def main(host: str, port: int) -> None:
    async with serve(handler, host, port, compression=None) as server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8801)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass

"""Fan-out peer: FastAPI with the ``ConnectionManager`` from FastAPI's WebSocket docs.

The manager is the docs' class (a list of active connections; ``broadcast``
awaits ``send_text`` on each in turn), keyed by topic so that ``subscribe``
adds the connection to that topic's manager. Served by uvicorn with its
default WebSocket implementation (``ws="auto"``, which with ``websockets``
installed is uvicorn's ``websockets-sansio`` protocol), permessage-deflate
off, ``log_level="warning"``.

Speaks the minimal subset of notifier's wire protocol that ``bench.fanout``
uses: ``subscribe`` -> ``subscribed``; ``publish`` -> every subscriber gets a
``message``, the publisher gets ``published``. The ``token`` query parameter is
ignored.

    python -m bench.peers.fastapi_manager --port 8802
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections import defaultdict
from datetime import datetime, timezone

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


# The class from the FastAPI docs ("WebSockets" -> "Handling disconnections and
# multiple clients"); the one change: ``connect`` doesn't call ``accept()``,
# since the endpoint accepts once and a connection may subscribe to topics later.
class ConnectionManager:
    def __init__(self):
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket):
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket):
        if websocket in self.active_connections:
            self.active_connections.remove(websocket)

    async def send_personal_message(self, message: str, websocket: WebSocket):
        await websocket.send_text(message)

    async def broadcast(self, message: str):
        for connection in self.active_connections:
            await connection.send_text(message)


managers: defaultdict[str, ConnectionManager] = defaultdict(ConnectionManager)
heads: dict[str, int] = {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reply(msg: dict, ref) -> str:
    if ref is not None:
        msg["ref"] = ref
    return json.dumps(msg)


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket, token: str | None = None):
    await websocket.accept()
    mine: set[str] = set()
    try:
        while True:
            raw = await websocket.receive_text()
            try:
                cmd = json.loads(raw)
                kind = cmd["type"]
            except (ValueError, TypeError, KeyError):
                await websocket.send_text(json.dumps({"type": "error", "code": "bad_request", "message": "bad command"}))
                continue
            ref = cmd.get("ref")
            if kind == "subscribe":
                topic = cmd["topic"]
                await managers[topic].connect(websocket)
                mine.add(topic)
                await websocket.send_text(_reply(
                    {"type": "subscribed", "topic": topic, "seq": heads.get(topic, 0),
                     "epoch": "peer", "recovered": True}, ref))
            elif kind == "unsubscribe":
                topic = cmd["topic"]
                managers[topic].disconnect(websocket)
                mine.discard(topic)
                await websocket.send_text(_reply({"type": "unsubscribed", "topic": topic}, ref))
            elif kind == "publish":
                topic = cmd["topic"]
                seq = heads[topic] = heads.get(topic, 0) + 1
                msg_id = uuid.uuid4().hex
                message = json.dumps({
                    "type": "message", "topic": topic, "seq": seq, "id": msg_id,
                    "time": _now(), "event": cmd.get("event"), "data": cmd.get("data"),
                })
                await managers[topic].broadcast(message)
                await websocket.send_text(_reply({"type": "published", "topic": topic, "seq": seq, "id": msg_id}, ref))
            elif kind == "ping":
                await websocket.send_text(_reply({"type": "pong"}, ref))
            else:
                await websocket.send_text(_reply({"type": "error", "code": "unknown_type", "message": kind}, ref))
    except WebSocketDisconnect:
        pass
    finally:
        for topic in mine:
            managers[topic].disconnect(websocket)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8802)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_per_message_deflate=False,
                loop="asyncio")

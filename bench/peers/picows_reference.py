"""Reference, not a peer: a ``picows`` server with one ``send`` per delivery.

This is not what anyone would call an idiomatic Python server; it is here to
calibrate the benchmark. Frames are built in C by picows and each delivery is
one ``transport.send`` (one write syscall), with no per-connection Task or
Python-level buffering: about the fastest a one-syscall-per-delivery fan-out
in a Python process gets (a server that coalesces several messages into one
write per connection can beat it). ``bench.fanout`` runs it so that the table
shows that limit next to the servers under test, and that the load generator
keeps up well above them.

Same minimal protocol as the other peers (see ``bench/peers/websockets_broadcast.py``).

    python -m bench.peers.picows_reference --port 8804
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from datetime import datetime, timezone

from picows import WSListener, WSMsgType, WSTransport, ws_create_server

TOPICS: dict[str, set[WSTransport]] = {}
HEADS: dict[str, int] = {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Conn(WSListener):
    def __init__(self) -> None:
        self.topics: set[str] = set()
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def reply(self, msg: dict, ref) -> None:
        if ref is not None:
            msg["ref"] = ref
        self.transport.send(WSMsgType.TEXT, json.dumps(msg).encode())

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        try:
            cmd = json.loads(frame.get_payload_as_bytes())
            kind = cmd["type"]
        except (ValueError, TypeError, KeyError):
            self.reply({"type": "error", "code": "bad_request", "message": "bad command"}, None)
            return
        ref = cmd.get("ref")
        if kind == "subscribe":
            topic = cmd["topic"]
            TOPICS.setdefault(topic, set()).add(transport)
            self.topics.add(topic)
            self.reply({"type": "subscribed", "topic": topic, "seq": HEADS.get(topic, 0),
                        "epoch": "peer", "recovered": True}, ref)
        elif kind == "publish":
            topic = cmd["topic"]
            seq = HEADS[topic] = HEADS.get(topic, 0) + 1
            msg_id = uuid.uuid4().hex
            message = json.dumps({
                "type": "message", "topic": topic, "seq": seq, "id": msg_id,
                "time": _now(), "event": cmd.get("event"), "data": cmd.get("data"),
            }).encode()
            for sub in TOPICS.get(topic, ()):
                sub.send(WSMsgType.TEXT, message)
            self.reply({"type": "published", "topic": topic, "seq": seq, "id": msg_id}, ref)
        elif kind == "ping":
            self.reply({"type": "pong"}, ref)
        else:
            self.reply({"type": "error", "code": "unknown_type", "message": kind}, ref)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for topic in self.topics:
            TOPICS.get(topic, set()).discard(transport)


async def main(host: str, port: int) -> None:
    server = await ws_create_server(lambda request: Conn(), host, port)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8804)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass

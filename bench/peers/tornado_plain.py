"""Fan-out peer: plain Tornado ``WebSocketHandler`` with ``write_message``.

Written the way Tornado's own chat demo does it: a class-level set of
subscribers and a loop calling ``write_message`` on each one. Compression is
off (Tornado's default: ``get_compression_options`` returns None).

Speaks the minimal subset of notifier's wire protocol that ``bench.fanout``
uses: ``subscribe`` -> ``subscribed``; ``publish`` -> every subscriber gets a
``message``, the publisher gets ``published``. The ``token`` query parameter is
ignored.

    python -m bench.peers.tornado_plain --port 8803
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from datetime import datetime, timezone

import tornado.web
import tornado.websocket


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class PubSubHandler(tornado.websocket.WebSocketHandler):
    subscribers: dict[str, set["PubSubHandler"]] = {}
    heads: dict[str, int] = {}

    def open(self) -> None:
        self.topics: set[str] = set()

    def reply(self, msg: dict, ref) -> None:
        if ref is not None:
            msg["ref"] = ref
        self.write_message(json.dumps(msg))

    def on_message(self, raw) -> None:
        try:
            cmd = json.loads(raw)
            kind = cmd["type"]
        except (ValueError, TypeError, KeyError):
            self.write_message(json.dumps({"type": "error", "code": "bad_request", "message": "bad command"}))
            return
        ref = cmd.get("ref")
        cls = PubSubHandler
        if kind == "subscribe":
            topic = cmd["topic"]
            cls.subscribers.setdefault(topic, set()).add(self)
            self.topics.add(topic)
            self.reply({"type": "subscribed", "topic": topic, "seq": cls.heads.get(topic, 0),
                        "epoch": "peer", "recovered": True}, ref)
        elif kind == "unsubscribe":
            topic = cmd["topic"]
            cls.subscribers.get(topic, set()).discard(self)
            self.topics.discard(topic)
            self.reply({"type": "unsubscribed", "topic": topic}, ref)
        elif kind == "publish":
            topic = cmd["topic"]
            seq = cls.heads[topic] = cls.heads.get(topic, 0) + 1
            msg_id = uuid.uuid4().hex
            message = json.dumps({
                "type": "message", "topic": topic, "seq": seq, "id": msg_id,
                "time": _now(), "event": cmd.get("event"), "data": cmd.get("data"),
            })
            cls.send_updates(topic, message)
            self.reply({"type": "published", "topic": topic, "seq": seq, "id": msg_id}, ref)
        elif kind == "ping":
            self.reply({"type": "pong"}, ref)
        else:
            self.reply({"type": "error", "code": "unknown_type", "message": kind}, ref)

    @classmethod
    def send_updates(cls, topic: str, message: str) -> None:
        for waiter in cls.subscribers.get(topic, ()):
            try:
                waiter.write_message(message)
            except tornado.websocket.WebSocketClosedError:
                pass
            except Exception:
                logging.error("Error sending message", exc_info=True)

    def on_close(self) -> None:
        for topic in getattr(self, "topics", ()):
            PubSubHandler.subscribers.get(topic, set()).discard(self)


async def main(host: str, port: int) -> None:
    app = tornado.web.Application([(r"/ws", PubSubHandler)])
    app.listen(port, address=host)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8803)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass

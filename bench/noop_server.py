"""The baseline for the durable publish benchmark: Tornado doing HTTP and nothing else.

A single-process Tornado server on the same Tornado version as notifier, with
one POST handler that reads and parses the JSON body and answers with a body
shaped like notifier's publish answer (``{"id","topic","seq","time"}``), but
stores nothing, checks no key and fsyncs nothing. What notifier loses against
it is the price of authentication, validation and durability.

Run alone: ``python -m bench.noop_server --port 8799``.
"""

import argparse
import asyncio
import itertools
import os
from datetime import datetime, timezone

import orjson
import tornado.web


class NoopPublishHandler(tornado.web.RequestHandler):
    def initialize(self, seqs: itertools.count) -> None:
        self._seqs = seqs

    def post(self) -> None:
        body = orjson.loads(self.request.body)
        seq = next(self._seqs)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps({
            "id": f"{os.getpid():08x}{seq:016x}",
            "topic": body.get("topic"),
            "seq": seq,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }))


def make_app() -> tornado.web.Application:
    return tornado.web.Application([
        (r"/api/publish", NoopPublishHandler, {"seqs": itertools.count(1)}),
    ])


async def serve(host: str, port: int) -> None:
    make_app().listen(port, address=host)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8799)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

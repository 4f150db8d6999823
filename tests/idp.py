"""An identity provider for tests: signing keys, and a JWKS endpoint on a free
loopback port that a test rotates, breaks, stops and restarts, counting the
requests it gets. It runs on its own thread and event loop, so it answers
while a test blocks (waiting on a ``notifier serve`` subprocess) as well as
while an async test awaits."""

from __future__ import annotations

import asyncio
import threading
import time

import jwt
import orjson
import tornado.web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets


class SigningKey:
    """A private key with a kid; ``jwk()`` is its public half as a JWK."""

    def __init__(self, kid: str, algorithm: str = "RS256"):
        self.kid = kid
        self.algorithm = algorithm
        if algorithm.startswith("ES"):
            self.private = ec.generate_private_key(ec.SECP256R1())
            self._to_jwk = jwt.algorithms.ECAlgorithm.to_jwk
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._to_jwk = jwt.algorithms.RSAAlgorithm.to_jwk

    def jwk(self, **fields) -> dict:
        """The public JWK with ``kid`` and ``alg``; ``fields`` override or,
        with None, remove members."""
        jwk = {**self._to_jwk(self.private.public_key(), as_dict=True),
               "kid": self.kid, "alg": self.algorithm, "use": "sig"}
        jwk.update(fields)
        return {name: value for name, value in jwk.items() if value is not None}

    def sign(self, claims: dict, algorithm: str | None = None, kid: str | None = "",
             ) -> str:
        """A JWT over ``claims``; ``kid`` defaults to this key's, None leaves it out."""
        headers = {} if kid is None else {"kid": kid or self.kid}
        return jwt.encode(claims, self.private, algorithm=algorithm or self.algorithm,
                          headers=headers)


def claims(user: str = "alice", ttl: float = 600, **extra) -> dict:
    return {"sub": user, "exp": int(time.time() + ttl), "topics": ["news.>"], **extra}


class _JwksHandler(tornado.web.RequestHandler):
    def initialize(self, idp: "IdentityProvider") -> None:
        self.idp = idp

    def get(self) -> None:
        idp = self.idp
        idp.requests += 1
        self.set_status(idp.status)
        self.set_header("Content-Type", "application/json")
        self.finish(idp.body if idp.body is not None else orjson.dumps({"keys": idp.keys}))


class IdentityProvider:
    """``GET /jwks.json`` answers ``{"keys": keys}`` (or ``body``) with ``status``."""

    def __init__(self):
        self.keys: list[dict] = []
        self.body: bytes | None = None
        self.status = 200
        self.requests = 0
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def publish(self, *keys: SigningKey) -> None:
        self.keys = [key.jwk() for key in keys]

    def start(self) -> "IdentityProvider":
        """Listen (on the same port as before, after a ``stop``)."""
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve(ready)),
                                        name="idp", daemon=True)
        self._thread.start()
        assert ready.wait(5), "the identity provider did not start"
        return self

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = HTTPServer(tornado.web.Application([(r"/jwks.json", _JwksHandler,
                                                      {"idp": self})]))
        sockets = bind_sockets(self.port, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        server.add_sockets(sockets)
        ready.set()
        await self._stop.wait()
        server.stop()
        await server.close_all_connections()

    def stop(self) -> None:
        """Stop listening: connections to the port are refused from now on."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)
            self._thread = None

"""``GET /ws``: the WebSocket transport under a ``Session``.

Authentication happens before the upgrade (HTTP 401 with a JSON body), the
Origin check right after it (4003, which a browser script can see). Then the
handler only moves frames: each client frame goes to the session, whose
replies come back through ``send``; the protocol's rules live in
``notifier.session``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable
from urllib.parse import urlsplit

import tornado.web
import tornado.websocket
from tornado.iostream import StreamBufferFullError

from notifier import internals, protocol
from notifier.admission import Refusal
from notifier.auth import AuthError, Identity, KeyNotCached, TokenVerifier
from notifier.config import canonical_origin
from notifier.frames import text_frame
from notifier.handlers.api import finish_with_error
from notifier.messages import new_connection_id
from notifier.outbox import Outbox
from notifier.session import Session

if TYPE_CHECKING:
    from notifier.app import Services


class SocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, services: "Services") -> None:
        self.services = services
        self.config = services.config
        self.identity: Identity | None = None  # until open() hands it to the session
        self.outbox: Outbox | None = None
        self.session: Session | None = None
        self.id = new_connection_id()
        self.compressed = False
        self.admitted: str | None = None  # the user this connection is counted for
        self.settled = False
        self.turn: asyncio.Future | None = None  # while it waits in the turnstile

    # Handshake

    def _token(self) -> str | bytes | None:
        header = self.request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header[len("Bearer "):].strip() or None
        # The raw bytes, not get_query_argument: a value that is not UTF-8 is
        # a malformed token (401), not Tornado's 400 for an undecodable argument.
        values = self.request.query_arguments.get("token")
        return values[-1] if values and values[-1] else None

    def _refuse(self, status: int, code: str, message: str) -> None:
        self.services.metrics.errors.labels(code).inc()
        self.set_status(status)
        finish_with_error(self, code, message)

    def write_error(self, status_code: int, **kwargs) -> None:
        # e.g. 405 for POST /ws: JSON like every other error.
        finish_with_error(self, "bad_request", self._reason)

    def prepare(self) -> Awaitable[None] | None:
        # Refusals happen here, before Tornado's get() upgrades; doing it in
        # prepare() rather than an overriding get() keeps one coroutine frame
        # fewer alive for the whole life of every connection.
        if self.services.draining:
            return self._refuse(503, "unavailable", "server is shutting down")
        services = self.services
        refusal = services.admission.crowded(services.turnstile.waiting)
        if refusal is not None:
            return self._refuse_with(refusal)
        turn = services.turnstile.enter()
        if turn is not None:
            self.turn = turn
            return self._prepare_in_turn(turn)
        return self._check_token()

    async def _prepare_in_turn(self, turn: asyncio.Future) -> None:
        """A burst of handshakes: this one waits for its loop turn first."""
        try:
            await turn
        except asyncio.CancelledError:
            # Its client left while it waited (on_close cancelled the turn):
            # no token check, no store read, nobody to answer.
            self.set_status(499, "Client Closed Request")
            raise tornado.web.Finish() from None
        self.turn = None
        pending = self._check_token()
        if pending is not None:
            await pending

    def _check_token(self) -> Awaitable[None] | None:
        token = self._token()
        if token is None:
            return self._refuse(401, "unauthorized", "missing token")
        verifier = self.services.verifier
        try:
            self.identity = verifier.verify(token)
        except KeyNotCached:
            # A JWKS key not fetched yet: Tornado awaits the fetch before get().
            return self._prepare_after_fetch(verifier, token)
        except AuthError as exc:
            return self._refuse_token(exc)
        return self._require_upgrade()

    async def _prepare_after_fetch(self, verifier: TokenVerifier, token: str) -> None:
        try:
            self.identity = await verifier.verify_after_fetch(token)
        except AuthError as exc:
            return self._refuse_token(exc)
        return self._require_upgrade()

    def _refuse_token(self, exc: AuthError) -> None:
        self.services.log.info("connection.refused", reason=str(exc), ip=self.request.remote_ip)
        self._refuse(401, "unauthorized", str(exc))

    def _require_upgrade(self) -> None:
        # Other methods go on to Tornado's 405 (with Allow: GET).
        if self.request.method != "GET":
            return
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            self.services.log.debug("connection.not_websocket", path=self.request.path,
                                    ip=self.request.remote_ip)
            return self._refuse(400, "bad_request", "this endpoint speaks WebSocket only "
                                "(send Upgrade: websocket)")
        user = self.identity.user
        refusal = self.services.admission.admit(user)
        if refusal is not None:
            return self._refuse_with(refusal, user)
        self.admitted = user

    def _refuse_with(self, refusal: Refusal, user: str | None = None) -> None:
        self.services.log.info("connection.refused", reason=refusal.message, user=user,
                               ip=self.request.remote_ip)
        self.set_header("Retry-After", str(refusal.retry_after))
        self._refuse(refusal.status, refusal.code, refusal.message)

    def _leave(self) -> None:
        """Count this connection out of admission, once."""
        if self.admitted is not None:
            self.services.admission.left(self.admitted, self.settled)
            self.admitted = None

    def on_finish(self) -> None:
        # A handshake that failed after admission (Tornado answered 400 or
        # similar) never opens; an upgraded one (101) is counted out on close.
        if self.get_status() != 101:
            self._leave()

    def check_origin(self, origin: str) -> bool:
        # Decided in open() instead, so a refused browser sees close code 4003.
        return True

    def _origin_allowed(self) -> bool:
        origin = self.request.headers.get("Origin")
        if origin is None:
            return True  # not a browser
        allowed = self.config.server.allowed_origins
        if "*" in allowed or canonical_origin(origin) in {canonical_origin(a) for a in allowed}:
            return True
        return urlsplit(origin).netloc.lower() == self.request.host.lower()

    def get_websocket_protocol(self):
        # Text frames reach on_message as bytes; the session's parser checks UTF-8.
        return internals.text_as_bytes(super().get_websocket_protocol())

    def get_compression_options(self) -> dict | None:
        # Off by default: uncompressed frames are built once and shared by all.
        return {} if self.config.server.compression else None

    # Lifecycle

    async def open(self, *args, **kwargs) -> None:
        assert self.identity is not None
        services = self.services
        # A negotiated permessage-deflate context is per connection: such a
        # client cannot share pre-built frames.
        self.compressed = internals.is_compressed(self.ws_connection)
        self.outbox = Outbox(self.ws_connection.stream, self.config.limits.max_buffered_bytes,
                             services.flusher, self._on_overflow,
                             self.ws_connection.write_message if self.compressed else None)
        if not self._origin_allowed():
            services.log.info("connection.refused", reason="origin not allowed",
                              origin=self.request.headers.get("Origin"))
            self.close(protocol.CLOSE_FORBIDDEN, "origin not allowed")
            return
        self.set_nodelay(True)
        self.session = Session(services, self.identity, self, self.id, self.request.remote_ip)
        self.identity = None  # the session holds it from now on (auth replaces it there)
        # The handshake is over: its headers both ways, the query (token
        # included) and the template namespace are never read again.
        internals.release_handshake(self)
        self.request.arguments = self.request.query_arguments = {}
        self.request.uri, self.request.query = self.request.path, ""  # the raw query held the token too
        self.request.connection = None  # the HTTP/1 connection; the stream was detached from it
        await self.session.start()
        if self.admitted is not None:
            self.settled = True
            self.services.admission.settled()

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        # Tornado reads the next frame only once a returned awaitable is done.
        return self.session.receive(message)

    def on_pong(self, data: bytes) -> None:
        self.session.heard()

    def on_close(self) -> None:
        if self.turn is not None:
            self.turn.cancel()  # the turnstile skips it; _prepare_in_turn finishes
        if self.outbox is not None:
            self.outbox.discard()
        if self.session is not None:
            self.session.ended(self.close_code, self.close_reason)
        self._leave()

    def _on_overflow(self) -> None:
        self.session.overflowed()
        self.close(protocol.CLOSE_SLOW_CONSUMER, "slow consumer")

    # Transport, for the session

    def send(self, payload: bytes) -> None:
        self.outbox.send(b"" if self.compressed else text_frame(payload), payload)

    def close_with(self, code: int, reason: str) -> None:
        """Close after what is already queued (replies, messages) went out."""
        if self.outbox is not None:
            self.outbox.flush()
            self.outbox.discard()
        self.close(code, reason)

    def send_ping(self) -> None:
        try:
            self.ping(b"")
        except (tornado.websocket.WebSocketClosedError, StreamBufferFullError):
            pass  # closing already, or so far behind that 4009 is on its way

    def overflow(self) -> None:
        self.outbox.overflow()

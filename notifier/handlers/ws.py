"""``GET /ws``: one WebSocket connection, speaking notifier's protocol.

Authentication happens before the upgrade (HTTP 401 with a JSON body). After
it, each client frame is parsed by ``protocol``, run by one ``_on_<command>``
method, and answered, in order: see ``on_message`` for how quick commands,
store-bound ones and pipelined durable publishes keep that order.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Awaitable
from urllib.parse import urlsplit

import tornado.websocket
from tornado.iostream import StreamBufferFullError

from notifier import internals, protocol
from notifier.auth import AuthError, Identity
from notifier.config import canonical_origin
from notifier.frames import text_frame
from notifier.handlers.api import finish_with_error
from notifier.messages import Draft
from notifier.outbox import Outbox
from notifier.protocol import ProtocolError
from notifier.ratelimit import TokenBucket
from notifier.store.base import SeqAboveHead, StoreError

if TYPE_CHECKING:
    from notifier.app import Services

REPLAY_PAGE = 500
# A replay waits for the socket once this much is queued, so history of any
# length streams through a bounded buffer instead of tripping the 4009 limit.
REPLAY_DRAIN_BYTES = 64 * 1024


class SocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, services: "Services") -> None:
        self.services = services
        self.config = services.config
        self.identity: Identity | None = None
        self.outbox: Outbox | None = None
        self.id = uuid.uuid4().hex[:16]
        self.user = ""
        self.compressed = False
        self.refused_in_a_row = 0
        self.registered = False  # in the hub and counted; cleaned up once on close
        self._chain: asyncio.Future | None = None  # the last durable publish's reply

    # Handshake

    def _token(self) -> str | None:
        header = self.request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header[len("Bearer "):].strip() or None
        return self.get_query_argument("token", None) or None

    def _refuse(self, status: int, code: str, message: str) -> None:
        self.services.metrics.errors.labels(code).inc()
        self.set_status(status)
        finish_with_error(self, code, message)

    def write_error(self, status_code: int, **kwargs) -> None:
        # e.g. 405 for POST /ws: JSON like every other error.
        finish_with_error(self, "bad_request", self._reason)

    def prepare(self) -> None:
        # Refusals happen here, before Tornado's get() upgrades; doing it in
        # prepare() rather than an overriding get() keeps one coroutine frame
        # fewer alive for the whole life of every connection.
        if self.services.draining:
            return self._refuse(503, "unavailable", "server is shutting down")
        token = self._token()
        if token is None:
            return self._refuse(401, "unauthorized", "missing token")
        try:
            self.identity = self.services.verifier.verify(token)
        except AuthError as exc:
            self.services.log.info("connection.refused", reason=str(exc), ip=self.request.remote_ip)
            return self._refuse(401, "unauthorized", str(exc))
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            self.services.log.debug("connection.not_websocket", path=self.request.path,
                                    ip=self.request.remote_ip)
            return self._refuse(400, "bad_request", "this endpoint speaks WebSocket only "
                                "(send Upgrade: websocket)")

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

    def get_compression_options(self) -> dict | None:
        # Off by default: uncompressed frames are built once and shared by all.
        return {} if self.config.server.compression else None

    # Lifecycle

    async def open(self, *args, **kwargs) -> None:
        assert self.identity is not None
        services = self.services
        self.user = self.identity.user
        self.opened = time.monotonic()
        self.last_seen = self.opened
        self.ping_sent_at: float | None = None
        self.bucket = TokenBucket(self.config.limits.commands_per_second,
                                  self.config.limits.commands_burst)
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
        services.hub.add(self)
        self.registered = True
        services.metrics.connections.inc()
        services.log.info("connection.open", conn=self.id, user=self.user,
                          ip=self.request.remote_ip)
        # The handshake is over: its headers both ways, the query (token
        # included) and the template namespace are never read again.
        internals.release_handshake(self)
        self.request.arguments = self.request.query_arguments = {}
        self.request.uri, self.request.query = self.request.path, ""  # the raw query held the token too
        self.request.connection = None  # the HTTP/1 connection; the stream was detached from it
        self.send(protocol.welcome(self.id, self.user, self.config.heartbeat.interval,
                                   self.identity.expires))
        # The offline queue: the personal topic from the stored cursor, else
        # from the oldest retained message.
        await self._subscribe(self.identity.personal_topic, None, None, default_since=0)

    def on_close(self) -> None:
        services = self.services
        if self.outbox is not None:
            self.outbox.discard()
        if self.registered:
            self.registered = False
            services.hub.remove(self)
            services.metrics.connections.dec()
            services.log.info(
                "connection.close", conn=self.id, user=self.user,
                code=self.close_code, reason=self.close_reason,
                duration=round(time.monotonic() - self.opened, 3),
            )

    def on_pong(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self.ping_sent_at = None

    def send_ping(self) -> None:
        try:
            self.ping(b"")
        except (tornado.websocket.WebSocketClosedError, StreamBufferFullError):
            pass  # closing already, or so far behind that 4009 is on its way

    def close_with(self, code: int, reason: str) -> None:
        """Close after what is already queued (replies, messages) went out."""
        if self.outbox is not None:
            self.outbox.flush()
            self.outbox.discard()
        self.close(code, reason)

    # Sending

    def send(self, payload: bytes) -> None:
        self.outbox.send(b"" if self.compressed else text_frame(payload), payload)

    def slow_consumer(self) -> None:
        self.outbox.overflow()

    def _on_overflow(self) -> None:
        services = self.services
        services.metrics.slow_consumers.inc()
        services.log.warning("connection.slow_consumer", conn=self.id, user=self.user)
        services.hub.remove(self)
        self.close(protocol.CLOSE_SLOW_CONSUMER, "slow consumer")

    def _error(self, error: ProtocolError) -> None:
        self.services.metrics.errors.labels(error.code).inc()
        self.send(error.payload())

    # Commands

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Run one command. Quick ones run right here, so frames that arrived
        together are handled in one loop turn and their replies and fan-out
        leave together; ones that wait on the store return an awaitable, and
        Tornado reads no further frame until it is done. Durable publishes
        are the exception: they queue for the store's next group commit at
        once, and their replies (and anything after them) keep command order
        through ``_chain``."""
        self.last_seen = time.monotonic()
        self.ping_sent_at = None
        command = protocol.parse(message, self.config.limits.max_message_bytes)
        if not self.bucket.take():
            self.refused_in_a_row += 1
            if self.refused_in_a_row > self.config.limits.commands_burst:
                self.services.log.warning("connection.rate_limited", conn=self.id, user=self.user)
                self.close_with(protocol.CLOSE_RATE_LIMITED, "rate limited")
                return None
            ref = None if isinstance(command, ProtocolError) else command.ref
            command = ProtocolError(protocol.RATE_LIMITED, "too many commands; slow down", ref)
        else:
            self.refused_in_a_row = 0
        if isinstance(command, protocol.Publish) and not command.ephemeral:
            self._chain = asyncio.ensure_future(self._publish_in_order(command, self._chain))
            return None
        if self._chain is not None:
            if not self._chain.done():
                return self._after_chain(command)
            self._chain = None
        return self._run(command)

    def _run(self, command) -> Awaitable[None] | None:
        if isinstance(command, ProtocolError):
            self._error(command)
            return None
        return getattr(self, "_on_" + type(command).__name__.lower())(command)

    async def _after_chain(self, command) -> None:
        await self._chain
        result = self._run(command)
        if result is not None:
            await result

    async def _on_subscribe(self, command: protocol.Subscribe) -> None:
        if not self.identity.can_subscribe(command.topic):
            self._error(ProtocolError(protocol.FORBIDDEN,
                                      f"not allowed to subscribe to {command.topic}", command.ref))
            return
        await self._subscribe(command.topic, command.since, command.ref)

    async def _subscribe(self, topic: str, since: int | None, ref, default_since: int | None = None) -> None:
        """Subscribe, replay from ``since`` (else the stored cursor, else
        ``default_since``; None means live only), then go live."""
        services = self.services
        hub = services.hub
        # Register first: anything committed from here on is parked, anything
        # committed before is in the reads below; seqs sort out the overlap.
        subscription = hub.subscribe(self, topic)
        try:
            if since is None:
                since, page = await services.store.read_from_cursor(
                    self.user, topic, default_since, REPLAY_PAGE)
            else:
                page = await services.store.read_since(topic, since, REPLAY_PAGE)
            live_only = since is None
        except StoreError as exc:
            hub.unsubscribe(self, topic)
            services.log.error("store.read_failed", topic=topic, error=str(exc))
            self._error(ProtocolError(protocol.UNAVAILABLE, "history is unavailable; retry", ref))
            return
        if not hub.is_current(subscription):
            return
        if live_only:
            subscription.last_seq = page.head
            self.send(protocol.subscribed(topic, page.head, page.epoch, True, ref))
            hub.go_live(subscription)
            return
        # Nothing lost when every seq after ``since`` up to the head is retained.
        recovered = since <= page.head and (since >= page.head or since + 1 >= page.oldest)
        if since > page.head:
            since = 0  # the log was reset under the client: start from the oldest retained
            page = await services.store.read_since(topic, 0, REPLAY_PAGE)
            if not hub.is_current(subscription):
                return
        self.send(protocol.subscribed(topic, page.head, page.epoch, recovered, ref))
        await self._replay(subscription, page.messages)
        if hub.is_current(subscription):
            hub.go_live(subscription)

    async def _replay(self, subscription, messages) -> None:
        hub = self.services.hub
        outbox = self.outbox
        drain_at = min(REPLAY_DRAIN_BYTES, outbox.limit // 2)
        while True:
            for message in messages:
                if message.seq <= subscription.last_seq:
                    continue
                subscription.last_seq = message.seq
                self.send(message.payload())
                if outbox.pending >= drain_at:
                    await outbox.drain()
                    if outbox.closed or not hub.is_current(subscription):
                        return
                    # No frames (pongs included) are read while a command runs;
                    # a client draining its replay is alive all the same.
                    self.last_seen = time.monotonic()
                    self.ping_sent_at = None
            if len(messages) < REPLAY_PAGE:
                return
            page = await self.services.store.read_since(
                subscription.topic, subscription.last_seq, REPLAY_PAGE)
            if outbox.closed or not hub.is_current(subscription):
                return
            messages = page.messages

    def _on_unsubscribe(self, command: protocol.Unsubscribe) -> None:
        self.services.hub.unsubscribe(self, command.topic)
        self.send(protocol.unsubscribed(command.topic, command.ref))

    async def _on_ack(self, command: protocol.Ack) -> None:
        if not self.identity.can_subscribe(command.topic):
            self._error(ProtocolError(protocol.FORBIDDEN,
                                      f"not allowed to ack on {command.topic}", command.ref))
            return
        try:
            await self.services.store.set_cursor(self.user, command.topic, command.seq)
        except SeqAboveHead as exc:
            self._error(ProtocolError(protocol.BAD_REQUEST, str(exc), command.ref))
        except StoreError as exc:
            self.services.log.error("store.cursor_failed", topic=command.topic, error=str(exc))
            self._error(ProtocolError(protocol.UNAVAILABLE, "ack not stored; retry", command.ref))

    def _forbidden_to_publish(self, command: protocol.Publish) -> ProtocolError | None:
        if self.identity.can_publish(command.topic):
            return None
        return ProtocolError(protocol.FORBIDDEN, f"not allowed to publish to {command.topic}",
                             command.ref)

    def _on_publish(self, command: protocol.Publish) -> None:
        """Ephemeral publishes only: delivered live, never stored."""
        services = self.services
        refused = self._forbidden_to_publish(command)
        if refused is not None:
            self._error(refused)
            return
        message = services.publisher.publish_ephemeral(
            Draft(command.topic, command.data, command.event))
        services.metrics.published_ws_ephemeral.inc()
        self.send(protocol.published(command.topic, None, message.id, command.ref))

    async def _publish_in_order(self, command: protocol.Publish, previous: asyncio.Future | None) -> None:
        services = self.services
        refused = self._forbidden_to_publish(command)
        receipt = None
        if refused is None:
            try:
                (receipt,) = (await services.publisher.publish(
                    [Draft(command.topic, command.data, command.event)])).receipts
            except StoreError as exc:
                services.log.error("publish.failed", topic=command.topic, error=str(exc))
                refused = ProtocolError(protocol.UNAVAILABLE, "not stored; retry", command.ref)
        if previous is not None:
            await previous  # replies go out in command order
        if refused is not None:
            self._error(refused)
            return
        services.metrics.published_ws_stored.inc()
        services.log.info("publish", path="ws", topic=receipt.topic, seq=receipt.seq,
                          id=receipt.id, conn=self.id, user=self.user)
        self.send(protocol.published(receipt.topic, receipt.seq, receipt.id, command.ref))

    def _on_ping(self, command: protocol.Ping) -> None:
        self.send(protocol.pong(command.ref))

    def _on_auth(self, command: protocol.Auth) -> None:
        try:
            identity = self.services.verifier.verify(command.token)
        except AuthError as exc:
            self._error(ProtocolError(protocol.UNAUTHORIZED, str(exc), command.ref))
            return
        if identity.user != self.user:
            self._error(ProtocolError(protocol.UNAUTHORIZED,
                                      "token is for another user", command.ref))
            return
        self.identity = identity
        hub = self.services.hub
        for topic in hub.topics_of(self):
            if not identity.can_subscribe(topic):
                hub.unsubscribe(self, topic)
                self.send(protocol.unsubscribed(topic))
        self.send(protocol.authenticated(identity.expires, command.ref))

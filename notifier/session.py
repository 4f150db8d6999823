"""One client's conversation, whatever carries it: commands in, replies and
actions out, with no sockets and no Tornado.

A ``Session`` is built once a connection is accepted and authenticated. The
transport under it (``handlers/ws.py`` for WebSocket) hands it each client
frame (``receive``) and each sign of life (``heard``), and says when the
connection ended (``ended``). Everything the session sends goes through the
``Transport``: reply frames, pings, closes; live messages reach the same
outbox straight from the hub. The session keeps the protocol's rules:
command order, pipelined durable publishes, the rate limit, replay with no
gap and no duplicate, acks, token refresh.

Command order: quick commands (ping, unsubscribe, auth, ephemeral publish)
run inside ``receive``, so frames that arrived together are answered in
one loop turn. ``subscribe`` and ``ack`` wait on the store, and an ``auth``
whose token names a JWKS key not fetched yet waits for that fetch:
``receive`` returns an awaitable, and the transport must not hand over the
next frame until it is done. Durable publishes are the exception: each
queues for the store's next group commit at once, its reply chained behind
the previous one (``_chain``), and any later command waits for that chain
first.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Awaitable, Protocol

from notifier import protocol
from notifier.auth import AuthError, Identity, KeyNotCached, TokenVerifier
from notifier.broker.base import READY
from notifier.hub import Sink, Subscription, encodable
from notifier.messages import Draft, Message
from notifier.protocol import ProtocolError
from notifier.ratelimit import TokenBucket
from notifier.store.base import History, SeqAboveHead, StoreError

if TYPE_CHECKING:
    from notifier.app import Services

REPLAY_PAGE = 500
# A replay waits for the transport once this much is queued, so history of
# any length streams through a bounded buffer instead of tripping the 4009
# limit.
REPLAY_DRAIN_BYTES = 64 * 1024
# Seconds between tries of a store that failed under an announced
# subscription (a replay page, a catch-up): doubling up to the most.
STORE_RETRY_FIRST = 0.1
STORE_RETRY_MOST = 2.0
# How long a subscribe waits for the broker to confirm the topic's traffic.
WATCH_TIMEOUT = 5.0


class SessionOutbox(Sink, Protocol):
    """The transport's outgoing queue (``notifier.outbox.Outbox``): the hub
    writes live messages into it, the session its replies and replays."""

    limit: int      # bytes it may hold before the connection is a slow consumer
    pending: int    # bytes queued and not yet handed to the socket
    closed: bool

    async def drain(self) -> None:
        """Return once everything queued so far was taken by the socket."""


class Transport(Protocol):
    """What a session needs from the connection under it."""

    outbox: SessionOutbox

    def send(self, payload: bytes) -> None:
        """Queue one frame (its JSON) behind everything queued before."""

    def close_with(self, code: int, reason: str) -> None:
        """Close after what is queued; ``ended`` follows."""

    def send_ping(self) -> None:
        """A transport-level ping; an answer arrives as ``heard``."""

    def overflow(self) -> None:
        """Too far behind: drop what is queued, then close with 4009."""


class Session:
    def __init__(self, services: "Services", identity: Identity, transport: Transport,
                 connection_id: str, ip: str | None = None):
        self.services = services
        self.config = services.config
        self.identity = identity
        self.transport = transport
        self.outbox = transport.outbox
        self.id = connection_id
        self.user = identity.user
        self.ip = ip
        self.opened = time.monotonic()
        # Heartbeat bookkeeping (notifier.heartbeat): any frame or pong is a sign of life.
        self.last_seen = self.opened
        self.ping_sent_at: float | None = None
        self.bucket = TokenBucket(self.config.limits.commands_per_second,
                                  self.config.limits.commands_burst)
        self.refused_in_a_row = 0
        self.registered = False  # in the hub and counted; undone once, by ended()
        self._chain: asyncio.Future | None = None  # the last durable publish's reply
        self._tasks: set[asyncio.Future] = set()  # catch-ups running in the background

    # Life cycle

    async def start(self) -> None:
        """Register, say welcome, and start the offline queue: the personal
        topic from the stored cursor, else from the oldest retained message."""
        services = self.services
        services.hub.add(self)
        self.registered = True
        services.metrics.connections.inc()
        services.log.info("connection.open", conn=self.id, user=self.user, ip=self.ip)
        # The welcome leaves with the personal topic's subscribed frame (and
        # its first replay page): one write to a new connection, not two.
        welcome = protocol.welcome(self.id, self.user, self.config.heartbeat.interval,
                                   self.identity.expires)
        await self._subscribe(self.identity.personal_topic, None, None, None, default_since=0,
                              first=welcome)

    def ended(self, code: int | None, reason: str | None) -> None:
        """The transport is closed: leave the hub (once)."""
        if not self.registered:
            return
        self.registered = False
        services = self.services
        services.hub.remove(self)
        services.metrics.connections.dec()
        services.log.info("connection.close", conn=self.id, user=self.user, code=code,
                          reason=reason, duration=round(time.monotonic() - self.opened, 3))

    def heard(self) -> None:
        self.last_seen = time.monotonic()
        self.ping_sent_at = None

    # What the hub and the heartbeat call

    def send_ping(self) -> None:
        self.transport.send_ping()

    def close_with(self, code: int, reason: str) -> None:
        """Close after what is already queued (replies, messages) went out."""
        self.transport.close_with(code, reason)

    def slow_consumer(self) -> None:
        self.transport.overflow()

    def overflowed(self) -> None:
        """The outbox gave up on this client (4009 is on its way)."""
        services = self.services
        services.metrics.slow_consumers.inc()
        services.log.warning("connection.slow_consumer", conn=self.id, user=self.user)
        services.hub.remove(self)

    # Sending

    def send(self, payload: bytes) -> None:
        self.transport.send(payload)

    def _error(self, error: ProtocolError) -> None:
        self.services.metrics.errors.labels(error.code).inc()
        self.send(error.payload())

    # Commands

    def receive(self, frame: str | bytes) -> Awaitable[None] | None:
        """Run one client frame; an awaitable when it must finish before
        the next frame is handed over (see the module docstring)."""
        self.heard()
        command = protocol.parse(frame, self.config.limits.max_message_bytes)
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

    def _run(self, command: Any) -> Awaitable[None] | None:
        if isinstance(command, ProtocolError):
            self._error(command)
            return None
        return getattr(self, "_on_" + type(command).__name__.lower())(command)

    async def _after_chain(self, command: Any) -> None:
        await self._chain
        result = self._run(command)
        if result is not None:
            await result

    async def _on_subscribe(self, command: protocol.Subscribe) -> None:
        if not self.identity.can_subscribe(command.topic):
            self._error(ProtocolError(protocol.FORBIDDEN,
                                      f"not allowed to subscribe to {command.topic}", command.ref))
            return
        most = self.config.limits.subscriptions_per_connection
        held = self.services.hub.peers.get(self, {})
        if most and len(held) >= most and command.topic not in held:
            self._error(ProtocolError(
                protocol.FORBIDDEN, f"this connection holds {len(held)} subscriptions, the "
                "most limits.subscriptions_per_connection allows; unsubscribe first",
                command.ref))
            return
        await self._subscribe(command.topic, command.since, command.epoch, command.ref)

    async def _subscribe(self, topic: str, since: int | None, epoch: str | None,
                         ref: protocol.Ref, default_since: int | None = None,
                         first: bytes | None = None) -> None:
        """Subscribe, replay from ``since`` (else the stored cursor, else
        ``default_since``; None means live only), then go live. ``epoch``
        is the log the client's ``since`` counts in, if it said. ``first``,
        if given, is sent just before the answer (subscribed or error)."""
        services = self.services
        hub = services.hub
        store = services.store
        # Register first: anything committed from here on is parked, anything
        # committed before is in the reads below; seqs sort out the overlap.
        subscription = hub.subscribe(self, topic)
        try:
            await self._watching(topic)
            if not hub.is_current(subscription):
                return
            asked = since is not None  # the client's own since, not the cursor's
            if since is None:
                resume = await store.read_from_cursor(self.user, topic, default_since, REPLAY_PAGE)
                since, page = resume.since, resume.history
                # A cursor acked in another epoch: the store read from 0.
                recovered = resume.cursor is None or resume.cursor.epoch == page.epoch
            else:
                page = await store.read_since(topic, since, REPLAY_PAGE)
                recovered = True
            if not hub.is_current(subscription):
                return
            restart = False
            if epoch is not None and epoch != page.epoch:
                restart = True  # the client's position counts in another log
            elif since is not None and since > page.head:
                restart = True  # the log was reset under the client
            elif asked and since < page.head and since + 1 < page.oldest:
                # Retention removed messages the client asked for. From a
                # cursor retention overtook, the replay starts at the oldest
                # retained too, but recovered stays true (SPEC: "With no
                # since, recovered is true").
                recovered = False
            if restart:
                recovered = False
                if since != 0:
                    since = 0
                    page = await store.read_since(topic, 0, REPLAY_PAGE)
                    if not hub.is_current(subscription):
                        return
        except StoreError as exc:
            hub.unsubscribe(self, topic)
            services.log.error("store.read_failed", topic=topic, error=str(exc))
            if first is not None:
                self.send(first)
            self._error(ProtocolError(protocol.UNAVAILABLE, "history is unavailable; retry", ref))
            return
        subscription.epoch = page.epoch
        if first is not None:
            self.send(first)
        if since is None:  # live only
            subscription.last_seq = page.head
            self.send(protocol.subscribed(topic, page.head, page.epoch, recovered, ref))
            await self._stream(subscription, [])
            return
        subscription.last_seq = since  # the client has everything up to it
        self.send(protocol.subscribed(topic, page.head, page.epoch, recovered, ref))
        await self._stream(subscription, page.messages)

    async def _watching(self, topic: str) -> None:
        """Wait until the broker hands over the topic's messages; a broker
        that cannot say so in time is a store failure to the client."""
        ready = self.services.hub.watching(topic)
        if ready is READY:
            return
        try:
            await asyncio.wait_for(asyncio.shield(ready), WATCH_TIMEOUT)
        except asyncio.TimeoutError:
            raise StoreError("the broker did not confirm the subscription in time") from None

    def catch_up(self, subscription: Subscription) -> None:
        """The hub saw ``subscription`` fall behind: fill it from the store
        in the background; commands go on meanwhile."""
        task = asyncio.ensure_future(self._catch_up(subscription))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _catch_up(self, subscription: Subscription) -> None:
        page = await self._read_after(subscription)
        if page is not None:
            await self._stream(subscription, page.messages)

    async def _stream(self, subscription: Subscription, messages: list[Message]) -> None:
        """Send ``messages`` (a page read after ``last_seq``) and whatever
        follows them in the store, until the subscription can go live."""
        hub = self.services.hub
        while True:
            if not await self._send_page(subscription, messages):
                return
            if len(messages) < REPLAY_PAGE and hub.go_live(subscription):
                return
            page = await self._read_after(subscription)
            if page is None:
                return
            messages = page.messages

    async def _send_page(self, subscription: Subscription, messages: list[Message]) -> bool:
        """Send what the subscription has not seen; False once it ended."""
        hub = self.services.hub
        outbox = self.outbox
        drain_at = min(REPLAY_DRAIN_BYTES, outbox.limit // 2)
        for message in messages:
            if message.seq <= subscription.last_seq:
                continue
            subscription.last_seq = message.seq
            try:
                payload = message.payload()
            except Exception:  # noqa: BLE001 - logged by encodable; the replay goes on
                encodable([message])
                continue
            self.send(payload)
            if outbox.pending >= drain_at:
                await outbox.drain()
                if outbox.closed or not hub.is_current(subscription):
                    return False
                # No frames (pongs included) are read while a command runs;
                # a client draining its replay is alive all the same.
                self.heard()
        return not outbox.closed and hub.is_current(subscription)

    async def _read_after(self, subscription: Subscription) -> History | None:
        """The page after the subscription's ``last_seq``, or None once it
        ended. The store failing is waited out: the subscription was
        announced, so it stays and resumes when the store answers. A log
        reset under it (another epoch) starts it over from the new log's
        oldest message, announced with a ``subscribed`` frame (no ``ref``,
        ``recovered: false``)."""
        hub = self.services.hub
        store = self.services.store
        since = subscription.last_seq
        delay = STORE_RETRY_FIRST
        while True:
            parked_before = len(subscription.parked or ())
            try:
                page = await store.read_since(subscription.topic, since, REPLAY_PAGE)
            except StoreError as exc:
                self.services.log.error("store.read_failed", topic=subscription.topic,
                                        conn=self.id, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MOST)
                if self.outbox.closed or not hub.is_current(subscription):
                    return None
                continue
            if self.outbox.closed or not hub.is_current(subscription):
                return None
            if page.epoch == subscription.epoch:
                hub.forget_stale(subscription, parked_before, page.head)
                return page
            subscription.epoch, subscription.last_seq, since = page.epoch, 0, 0
            self.send(protocol.subscribed(subscription.topic, page.head, page.epoch, False))

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

    async def _publish_in_order(self, command: protocol.Publish,
                                previous: asyncio.Future | None) -> None:
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

    def _on_auth(self, command: protocol.Auth) -> Awaitable[None] | None:
        verifier = self.services.verifier
        try:
            identity = verifier.verify(command.token)
        except KeyNotCached:
            return self._auth_after_fetch(verifier, command)
        except AuthError as exc:
            self._error(ProtocolError(protocol.UNAUTHORIZED, str(exc), command.ref))
            return None
        self._reauthenticate(identity, command)
        return None

    async def _auth_after_fetch(self, verifier: TokenVerifier, command: protocol.Auth) -> None:
        """``auth`` with a token whose JWKS key is not cached: answered once
        the fetch is done, and later frames wait for it."""
        try:
            identity = await verifier.verify_after_fetch(command.token)
        except AuthError as exc:
            self._error(ProtocolError(protocol.UNAUTHORIZED, str(exc), command.ref))
            return
        self._reauthenticate(identity, command)

    def _reauthenticate(self, identity: Identity, command: protocol.Auth) -> None:
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

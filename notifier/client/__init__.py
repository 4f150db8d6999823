"""notifier's Python client: publish over HTTP, follow topics over WebSocket.

::

    async with Client("http://127.0.0.1:8765", api_key=KEY, token=get_token) as client:
        await client.publish("news.sport", data={"score": "1-0"})
        async for message in client.subscribe(["user:alice", "news.sport"], auto_ack=True):
            print(message.topic, message.seq, message.data)

Publishing retries what is safe to retry (503 and other gateway errors,
connection refused, reset or timed out) with the same idempotency key, so a
retry never stores twice. Subscribing reconnects by itself and resumes every
topic from the last message it handed over: nothing is missed and nothing is
handed over twice, across restarts of the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from notifier.client.errors import (APIError, Forbidden, NotifierError, SubscriptionRefused,
                                    Unauthorized, Unreachable)
from notifier.client.http import HTTPPublisher, new_idempotency_key
from notifier.client.model import (JSON, Connected, Disconnected, Event, Message, Published,
                                   PublishRequest, Subscribed, TokenSource)
from notifier.client.resume import Backoff
from notifier.client.stream import Stream
from notifier.topics import is_valid_topic

__all__ = [
    "APIError", "Backoff", "Client", "Connected", "Disconnected", "Event", "Forbidden",
    "Message", "NotifierError", "Published", "PublishRequest", "Subscribed",
    "SubscriptionRefused", "TokenSource", "Unauthorized", "Unreachable", "new_idempotency_key",
]


class Client:
    """One notifier service, at ``url`` (``http://host:port``, or https,
    with any path prefix a proxy adds).

    ``api_key`` is for publishing; ``token`` (a JWT, or a function, plain
    or async, that returns one) for subscribing. ``headers`` go with every
    request and handshake. A publish is retried for up to ``retry_for``
    seconds, each try bounded by ``request_timeout``; ``backoff`` spaces out
    those retries and reconnects. ``ping_interval`` seconds without a frame
    send a ``ping``; no frame within ``ping_timeout`` after it drops the
    connection as dead.
    """

    def __init__(self, url: str, *, api_key: str | None = None, token: TokenSource | None = None,
                 headers: Mapping[str, str] | None = None, request_timeout: float = 10.0,
                 retry_for: float = 30.0, backoff: Backoff = Backoff(),
                 ping_interval: float = 20.0, ping_timeout: float = 10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.headers = dict(headers or {})
        self.request_timeout = request_timeout
        self.backoff = backoff
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._http = HTTPPublisher(self.url, api_key, self.headers, request_timeout,
                                   retry_for, backoff)
        self._stream: Stream | None = None

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the subscription (its waiting acks sent, the socket closed
        normally) and release the HTTP client."""
        if self._stream is not None:
            await self._stream.stop()
        self._http.close()

    # Publishing

    async def publish(self, topic: str | None = None, *, data: JSON, user: str | None = None,
                      event: str | None = None, idempotency_key: str | None = None) -> Published:
        """Store one message on ``topic``, or on ``user``'s personal topic.

        Answers once the server has it on disk. Without ``idempotency_key``
        one is made up, and used for every retry of this call. Raises
        ``APIError`` (``Unauthorized`` for 401) for a refusal,
        ``Unreachable`` when the server could not be reached in time.
        """
        return await self._http.publish(topic, user, data, event, idempotency_key)

    async def publish_batch(self, messages: Iterable[PublishRequest]) -> list[Published]:
        """Store up to 1000 messages in one transaction, answers in order.
        Each message without an idempotency key gets one, kept for retries."""
        return await self._http.publish_batch(messages)

    # Subscribing

    async def subscribe(self, topics: str | Iterable[str], *, since: int | None = None,
                        auto_ack: bool = False,
                        on_event: Callable[[Event], None] | None = None) -> AsyncIterator[Message]:
        """Follow ``topics`` until ``close()``, or until a refusal that
        retrying cannot fix (``Unauthorized``, ``Forbidden``,
        ``SubscriptionRefused``), which is raised.

        ``since`` (for every topic) replays what came after that seq;
        without it a topic resumes from the user's stored cursor (its last
        ack), else live. The personal topic ``user:<sub>`` is followed from
        the server's offline queue when listed. Each message is handed over
        once, in seq order per topic; acks store the cursor, by
        ``ack(message)``, or with ``auto_ack`` after the loop body returns
        for it (not when the body raises or breaks). ``on_event`` sees
        connections open, topics subscribed and connections lost, in order
        with the messages.
        """
        if self.token is None:
            raise Unauthorized(401, "unauthorized", "no token given to the client")
        if self._stream is not None:
            raise RuntimeError("this client already has a subscription running")
        names = [topics] if isinstance(topics, str) else list(topics)
        for topic in names:
            if not is_valid_topic(topic):
                raise ValueError(f"invalid topic name {topic!r}")
        ws_url = "ws" + self.url.removeprefix("http") + "/ws"  # http -> ws, https -> wss
        stream = Stream(ws_url, self.token, self.headers, names, since, self.backoff,
                        self.request_timeout, self.ping_interval, self.ping_timeout)
        self._stream = stream
        stream.start()
        try:
            async for message in stream.messages(auto_ack, on_event):
                yield message
        finally:
            await stream.stop()
            if self._stream is stream:
                self._stream = None

    async def ack(self, message: Message) -> None:
        """Store ``message`` as read (the user's cursor for its topic).

        Acks are coalesced: only the latest per topic is sent, within a
        tenth of a second, and one waiting at ``close()`` is sent before
        the socket closes. An ack of a message from a log that has since
        been reset is dropped."""
        if self._stream is None:
            raise RuntimeError("no subscription is running")
        await self._stream.ack(message)

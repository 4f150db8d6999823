"""The HTTP API for backend services: bearer API keys, JSON in and out, and
errors shaped ``{"error": {"code", "message"}}`` with a 4xx/503 status."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Awaitable

import orjson
import tornado.web
from tornado import httputil

from notifier import logs, protocol
from notifier.messages import Draft
from notifier.presence import PresenceError
from notifier.protocol import ProtocolError
from notifier.ratelimit import TokenBucket
from notifier.store.base import StoreError
from notifier.topics import is_valid_topic, is_valid_user, personal_topic

if TYPE_CHECKING:
    from notifier.app import Services

MAX_BATCH = 1000
MAX_HISTORY_LIMIT = 1000
MAX_IDEMPOTENCY_KEY = 200
# What follows an oversized body is read and dropped, so that a client still
# sending can read its 413; past this much more, the connection is closed.
DISCARD_BYTES = 64 * 1024 * 1024


class ApiError(tornado.web.HTTPError):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, reason=None)
        self.code = code
        self.message = message
        self.headers = headers or {}


def allowed_methods(handler: tornado.web.RequestHandler) -> list[str]:
    """The methods ``handler``'s class implements: those it overrides."""
    return [method for method in handler.SUPPORTED_METHODS
            if getattr(type(handler), method.lower(), None)
            is not getattr(tornado.web.RequestHandler, method.lower(), None)]


def finish_with_error(handler: tornado.web.RequestHandler, code: str, message: str) -> None:
    """End a response (its status already set) with the error body every
    endpoint uses: ``{"error": {"code", "message"}}``."""
    if handler.get_status() == 405:
        # RFC 9110: a 405 names the methods that would work.
        handler.set_header("Allow", ", ".join(allowed_methods(handler)))
    handler.set_header("Content-Type", "application/json")
    handler.finish(error_body(code, message))


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


_access_log = logs.get("notifier.access")


class BodyLimit(httputil.HTTPServerConnectionDelegate):
    """Wraps the application (``HTTPServer(BodyLimit(app, services))``): a
    request body above ``limits.max_body_bytes``, with Content-Length or
    chunked, at any size, is answered 413 with the JSON error here, and the
    application never sees that request. Nothing past the limit is kept.

    Tornado's own ``max_body_size`` would answer a bare 400 and hang up, so it
    is lifted for every request, and bytes are counted here instead."""

    def __init__(self, application: httputil.HTTPServerConnectionDelegate, services: "Services"):
        self.application = application
        self.services = services

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _LimitedBody(self.application.start_request(server_conn, request_conn),
                            request_conn, self.services)

    def on_close(self, server_conn: object) -> None:
        self.application.on_close(server_conn)


_CONTENT_LENGTH = re.compile(r"[0-9]+")


class _LimitedBody(httputil.HTTPMessageDelegate):
    def __init__(self, delegate: httputil.HTTPMessageDelegate,
                 connection: httputil.HTTPConnection, services: "Services"):
        self.delegate = delegate
        self.connection = connection
        self.services = services
        self.limit = services.config.limits.max_body_bytes
        self.received = 0
        self.refused = False  # answered 413; the rest of the body is dropped
        self.start_line: httputil.RequestStartLine | None = None

    def headers_received(self, start_line, headers) -> Awaitable[None] | None:
        self.start_line = start_line
        self.connection.set_max_body_size(2**63)
        length = headers.get("Content-Length", "")
        # Refused at once when the length is plain; anything Tornado must
        # still check (a repeated header) is counted as it arrives instead.
        if _CONTENT_LENGTH.fullmatch(length) and int(length) > self.limit:
            if headers.get("Expect", "").lower() == "100-continue":
                # The client waits before sending: answer and close, no body comes.
                self._refuse(finish=True)
                return None
            self._refuse()
            return None
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        self.received += len(chunk)
        if self.refused:
            if self.received > self.limit + DISCARD_BYTES:
                self.connection.close()
            return None
        if self.received > self.limit:
            self.delegate.on_connection_close()  # the application drops what it has
            self._refuse()
            return None
        return self.delegate.data_received(chunk)

    def finish(self) -> None:
        if self.refused:
            self.connection.finish()  # the whole body was read: keep-alive goes on
        else:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.delegate.on_connection_close()

    def _refuse(self, finish: bool = False) -> None:
        self.refused = True
        services = self.services
        services.metrics.errors.labels(protocol.TOO_LARGE).inc()
        ip = getattr(self.connection.context, "remote_ip", None)
        _access_log.warning("http.request", method=self.start_line.method,
                            path=self.start_line.path.partition("?")[0], status=413, ip=ip)
        body = error_body(protocol.TOO_LARGE,
                          f"request body is over limits.max_body_bytes ({self.limit})")
        headers = httputil.HTTPHeaders({"Content-Type": "application/json",
                                        "Content-Length": str(len(body))})
        if finish:
            headers["Connection"] = "close"  # finishing before the body is read closes it
        head_only = self.start_line.method == "HEAD"
        self.connection.write_headers(httputil.ResponseStartLine("HTTP/1.1", 413, "Content Too Large"),
                                      headers, None if head_only else body)
        if finish:
            self.connection.finish()


class JsonHandler(tornado.web.RequestHandler):
    """Base for every JSON endpoint: errors rendered as JSON, never a stack."""

    def initialize(self, services: "Services") -> None:
        self.services = services

    def write_json(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, ApiError):
            code, message = error.code, error.message
            for name, value in error.headers.items():
                self.set_header(name, value)
        elif status_code == 404:
            code, message = "not_found", "no such endpoint"
        elif status_code == 405:
            code, message = "method_not_allowed", f"{self.request.method} is not allowed here"
        elif status_code < 500:
            code, message = "bad_request", self._reason
        else:
            code, message = "internal", "internal error; see the server log"
        self.services.metrics.errors.labels(code).inc()
        finish_with_error(self, code, message)

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, ApiError):
            return  # an answered client error, not a server problem
        super().log_exception(typ, value, tb)


class NotFoundHandler(JsonHandler):
    def prepare(self) -> None:
        raise ApiError(404, "not_found", "no such endpoint")


class ApiHandler(JsonHandler):
    """Endpoints that need an API key, and are refused while draining."""

    def prepare(self) -> None:
        services = self.services
        if services.draining:
            raise ApiError(503, "unavailable", "server is shutting down", {"Retry-After": "1"})
        authorization = self.request.headers.get("Authorization")
        if not services.api_keys.accepts(authorization):
            raise ApiError(401, "unauthorized", "a valid API key is required "
                           "(Authorization: Bearer <key>)")
        self.api_key = authorization[len("Bearer "):].strip()

    def json_body(self) -> Any:
        try:
            return protocol.loads(self.request.body)
        except protocol.WireError as exc:
            raise ApiError(400, "bad_request", f"body {exc}") from None


def parse_draft(item: Any, max_message_bytes: int) -> Draft | ProtocolError:
    """One publish request (single or batch item) into a draft, or why not."""
    if not isinstance(item, dict):
        return ProtocolError(protocol.BAD_REQUEST, "must be a JSON object")
    has_topic, has_user = "topic" in item, "user" in item
    if has_topic == has_user:
        return ProtocolError(protocol.BAD_REQUEST, "give exactly one of 'topic' and 'user'")
    if has_user:
        user = item["user"]
        if not is_valid_user(user):
            return ProtocolError(protocol.INVALID_TOPIC, f"invalid user id {str(user)[:210]!r}")
        topic = personal_topic(user)
    else:
        topic = item["topic"]
        if not is_valid_topic(topic):
            return ProtocolError(protocol.INVALID_TOPIC, f"invalid topic name {str(topic)[:210]!r}")
    if "data" not in item:
        return ProtocolError(protocol.BAD_REQUEST, "'data' is required")
    data = protocol.encode_data(item["data"], max_message_bytes)
    if isinstance(data, ProtocolError):
        return data
    event = protocol.validate_event(item.get("event"))
    if isinstance(event, ProtocolError):
        return event
    key = item.get("idempotency_key")
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY):
        return ProtocolError(protocol.BAD_REQUEST,
                             f"'idempotency_key' must be a string of 1 to {MAX_IDEMPOTENCY_KEY} characters")
    return Draft(topic, data, event, key)


_STATUS_OF = {protocol.TOO_LARGE: 413}


def _raise(error: ProtocolError, where: str = "") -> None:
    raise ApiError(_STATUS_OF.get(error.code, 400), error.code, where + error.message)


class PublishHandler(ApiHandler):
    async def post(self) -> None:
        draft = parse_draft(self.json_body(), self.services.config.limits.max_message_bytes)
        if isinstance(draft, ProtocolError):
            _raise(draft)
        (receipt,) = await self._publish([draft])
        self.write_json(receipt.as_dict())

    async def _publish(self, drafts: list[Draft]):
        services = self.services
        self._check_rate(len(drafts))
        try:
            result = await services.publisher.publish(drafts)
        except StoreError as exc:
            services.log.error("publish.failed", error=str(exc), count=len(drafts))
            raise ApiError(503, "unavailable", "message not stored; retry") from None
        receipts = result.receipts
        services.metrics.published_http.inc(len(result.stored))
        if len(receipts) == 1:
            services.log.info("publish", path="http", topic=receipts[0].topic,
                              seq=receipts[0].seq, id=receipts[0].id)
        else:
            services.log.info("publish.batch", path="http", count=len(receipts))
        return receipts

    def _check_rate(self, count: int) -> None:
        rate = self.services.config.limits.publishes_per_second
        if not rate:
            return
        buckets = self.services.publish_buckets
        bucket = buckets.get(self.api_key)
        if bucket is None:
            bucket = buckets[self.api_key] = TokenBucket(rate, max(rate, 1.0))
        if not bucket.take(count):
            retry = max(1, math.ceil(bucket.retry_after()))
            raise ApiError(429, protocol.RATE_LIMITED, "publish rate limit reached",
                           {"Retry-After": str(retry)})


class BatchPublishHandler(PublishHandler):
    async def post(self) -> None:
        body = self.json_body()
        items = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(400, "bad_request", "'messages' must be a non-empty list")
        if len(items) > MAX_BATCH:
            raise ApiError(413, "too_large", f"a batch holds at most {MAX_BATCH} messages")
        max_bytes = self.services.config.limits.max_message_bytes
        drafts = []
        for index, item in enumerate(items):
            draft = parse_draft(item, max_bytes)
            if isinstance(draft, ProtocolError):
                _raise(draft, f"messages[{index}]: ")
            drafts.append(draft)
        receipts = await self._publish(drafts)
        self.write_json({"results": [receipt.as_dict() for receipt in receipts]})


def _int_argument(handler: tornado.web.RequestHandler, name: str, default: int,
                  low: int, high: int | None = None) -> int:
    raw = handler.get_query_argument(name, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"'{name}' must be an integer") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ApiError(400, "bad_request", f"'{name}' must be {bounds}")
    return value


def _topic_argument(topic: str) -> str:
    if not is_valid_topic(topic):
        raise ApiError(400, "invalid_topic", f"invalid topic name {topic[:210]!r}")
    return topic


class HistoryHandler(ApiHandler):
    async def get(self, topic: str) -> None:
        topic = _topic_argument(topic)
        since = _int_argument(self, "since", 0, 0, protocol.MAX_SEQ)
        limit = _int_argument(self, "limit", 100, 1, MAX_HISTORY_LIMIT)
        try:
            history = await self.services.store.read_since(topic, since, limit)
        except StoreError as exc:
            self.services.log.error("store.read_failed", topic=topic, error=str(exc))
            raise ApiError(503, "unavailable", "history is unavailable; retry") from None
        self.write_json({"messages": [message.as_dict() for message in history.messages],
                         "head": history.head})


class PresenceHandler(ApiHandler):
    async def get(self, topic: str) -> None:
        topic = _topic_argument(topic)
        try:
            users, connections = await self.services.presence.topic(topic)
        except PresenceError as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        self.write_json({"users": users, "connections": connections})


class DisconnectHandler(ApiHandler):
    async def post(self, user: str) -> None:
        if not is_valid_user(user):
            raise ApiError(400, "bad_request", f"invalid user id {user[:210]!r}")
        try:
            connections = await self.services.presence.user_connections(user)
        except PresenceError as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        # Every node closes its own connections of the user, this one included.
        self.services.broker.control({"op": "disconnect", "user": user})
        self.write_json({"user": user, "disconnected": connections})


class StatsHandler(ApiHandler):
    async def get(self) -> None:
        services = self.services
        hub = services.hub
        try:
            cluster = await services.presence.cluster()
        except PresenceError as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        # The top level is this node's; "cluster" adds up every live node.
        self.write_json({
            "node": services.node.id,
            "connections": len(hub.peers),
            "users": len(hub.by_user),
            "topics": len(hub.topics),
            "subscriptions": hub.subscription_count(),
            "messages_in": hub.messages_in,
            "messages_out": hub.messages_out,
            "cluster": cluster,
        })

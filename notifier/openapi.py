"""The OpenAPI 3.1 document of the HTTP API, served at ``GET /api/openapi.json``.

Built from the constants the handlers check, so a limit changed there changes
here too. tests/test_openapi.py keeps it true: schemathesis runs every
operation against a live server, with valid and invalid data, and checks
that every answer is documented and matches its schema. The WebSocket
protocol after the upgrade is in docs/protocol.md; only the handshake's HTTP
answers are described here.
"""

from __future__ import annotations

from typing import Any

import orjson

from notifier import protocol
from notifier.handlers.api import MAX_BATCH, MAX_HISTORY_LIMIT, MAX_IDEMPOTENCY_KEY
from notifier.topics import MAX_TOPIC_LENGTH, PERSONAL_PREFIX

_NAME = r"^[A-Za-z0-9_\-:@]+(\.[A-Za-z0-9_\-:@]+)*$"
TOPIC = {"type": "string", "pattern": _NAME, "minLength": 1, "maxLength": MAX_TOPIC_LENGTH,
         "description": "dot-separated segments of A-Z a-z 0-9 _ - : @", "example": "news.sport"}
USER = {"type": "string", "pattern": _NAME, "minLength": 1,
        "maxLength": MAX_TOPIC_LENGTH - len(PERSONAL_PREFIX),
        "description": "a user id: `user:<id>` must be a valid topic name", "example": "alice"}
SEQ = {"type": "integer", "minimum": 0, "maximum": protocol.MAX_SEQ}
ID = {"type": "string", "pattern": "^[0-9a-f]{24}$",
      "description": "unique message id: 12 hex digits of milliseconds, then 12 more"}
TIME = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"}

ERROR_CODES = [protocol.BAD_REQUEST, protocol.INVALID_TOPIC, protocol.UNAUTHORIZED, "not_found",
               "method_not_allowed", protocol.TOO_LARGE, protocol.RATE_LIMITED,
               protocol.UNAVAILABLE]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"content": {"application/json": {"schema": schema}}}


def _error(description: str, *codes: str, retry_after: bool | None = None) -> dict:
    """An error answer whose ``code`` is one of ``codes``. ``retry_after``:
    True when the header is always sent, None when never, False when sometimes."""
    schema = {"allOf": [_ref("Error"), {"properties": {"error": {"properties": {
        "code": {"enum": list(codes)}}}}}]}
    answer = {"description": description, **_json(schema)}
    if retry_after is not None:
        answer["headers"] = {"Retry-After": {
            "description": "seconds to wait before retrying", "required": retry_after,
            "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
    return answer


UNAUTHORIZED = _error("no valid API key (`Authorization: Bearer <key>`)", protocol.UNAUTHORIZED)
# Every /api/ answer can be a 503 while the server drains (with Retry-After: 1).
DRAINING = "shutting down (Retry-After: 1)"


def _operation(summary: str, responses: dict, **fields: Any) -> dict:
    return {"summary": summary, **fields, "responses": responses}


def _publish_responses(result: dict, extra_400: str = "") -> dict:
    return {
        "200": {"description": "stored and fsynced", **_json(result)},
        "400": _error("not JSON, a missing or mistyped field, both or neither of `topic` and "
                      f"`user`{extra_400}", protocol.BAD_REQUEST, protocol.INVALID_TOPIC),
        "401": UNAUTHORIZED,
        "413": _error("body above `limits.max_body_bytes`, `data` above "
                      f"`limits.max_message_bytes`, or more than {MAX_BATCH} messages",
                      protocol.TOO_LARGE),
        "429": _error("over `limits.publishes_per_second` for this API key",
                      protocol.RATE_LIMITED, retry_after=True),
        "503": _error(f"{DRAINING}, or the store failed: not stored, retry",
                      protocol.UNAVAILABLE, retry_after=False),
    }


def _topic_parameter(description: str) -> dict:
    return {"name": "topic", "in": "path", "required": True, "description": description,
            "schema": TOPIC}


def build() -> dict:
    publish_request = {
        "type": "object",
        "description": "Exactly one of `topic` and `user` (the user's personal topic "
                       "`user:<id>`), and `data`.",
        "properties": {
            "topic": TOPIC,
            "user": USER,
            "data": {"description": "any JSON value, `null` included"},
            "event": {"type": ["string", "null"], "minLength": 1,
                      "maxLength": protocol.MAX_EVENT_LENGTH},
            "idempotency_key": {
                "type": ["string", "null"], "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY,
                "description": "a repeat on the same topic within 24 h returns the first "
                               "answer and stores nothing"},
        },
        "required": ["data"],
        "oneOf": [{"required": ["topic"], "not": {"required": ["user"]}},
                  {"required": ["user"], "not": {"required": ["topic"]}}],
    }
    paths = {
        "/api/publish": {"post": _operation(
            "Publish one message; answered once it is durably stored",
            _publish_responses(_ref("Receipt")),
            operationId="publish",
            requestBody={"required": True, **_json(_ref("PublishRequest"))},
        )},
        "/api/publish/batch": {"post": _operation(
            f"Publish up to {MAX_BATCH} messages in one transaction; one bad item refuses all",
            _publish_responses({"type": "object", "required": ["results"], "properties": {
                "results": {"type": "array", "items": _ref("Receipt")}}},
                ", or a bad item (the message names its index)"),
            operationId="publishBatch",
            requestBody={"required": True, **_json({
                "type": "object", "required": ["messages"], "properties": {"messages": {
                    "type": "array", "minItems": 1, "maxItems": MAX_BATCH,
                    "items": _ref("PublishRequest")}}})},
        )},
        "/api/topics/{topic}/messages": {"get": _operation(
            "Retained messages with seq above `since`, oldest first",
            {
                "200": {"description": "a page of history; `head` is the topic's last seq",
                        **_json({"type": "object", "required": ["messages", "head"],
                                 "properties": {"messages": {"type": "array",
                                                             "items": _ref("Message")},
                                                "head": SEQ}})},
                "400": _error("invalid topic name, or `since`/`limit` out of range",
                              protocol.BAD_REQUEST, protocol.INVALID_TOPIC),
                "401": UNAUTHORIZED,
                "503": _error(f"{DRAINING}, or the store failed; retry", protocol.UNAVAILABLE,
                              retry_after=False),
            },
            operationId="history",
            parameters=[
                _topic_parameter("the topic to read"),
                {"name": "since", "in": "query", "schema": {**SEQ, "default": 0}},
                {"name": "limit", "in": "query", "schema": {
                    "type": "integer", "minimum": 1, "maximum": MAX_HISTORY_LIMIT,
                    "default": 100}},
            ],
        )},
        "/api/topics/{topic}/presence": {"get": _operation(
            "Users and connections subscribed to the topic, on every node",
            {
                "200": {"description": "presence", **_json({
                    "type": "object", "required": ["users", "connections"], "properties": {
                        "users": {"type": "array", "items": USER, "uniqueItems": True},
                        "connections": {"type": "integer", "minimum": 0}}})},
                "400": _error("invalid topic name", protocol.INVALID_TOPIC),
                "401": UNAUTHORIZED,
                "503": _error(DRAINING + "; or presence is unavailable (Redis)",
                              protocol.UNAVAILABLE, retry_after=True),
            },
            operationId="presence",
            parameters=[_topic_parameter("the topic")],
        )},
        "/api/users/{user}/disconnect": {"post": _operation(
            "Close the user's connections on every node with 4001 (revokes nothing)",
            {
                "200": {"description": "how many connections the user had, cluster-wide",
                        **_json({
                    "type": "object", "required": ["user", "disconnected"], "properties": {
                        "user": USER, "disconnected": {"type": "integer", "minimum": 0}}})},
                "400": _error("invalid user id", protocol.BAD_REQUEST),
                "401": UNAUTHORIZED,
                "503": _error(DRAINING + "; or presence is unavailable (Redis)",
                              protocol.UNAVAILABLE, retry_after=True),
            },
            operationId="disconnect",
            parameters=[{"name": "user", "in": "path", "required": True, "schema": USER}],
        )},
        "/api/stats": {"get": _operation(
            "Counters of this node, and cluster-wide figures from presence",
            {
                "200": {"description": "counters", **_json({
                    "type": "object",
                    "required": ["node", "connections", "users", "topics", "subscriptions",
                                 "messages_in", "messages_out", "cluster"],
                    "properties": {
                        "node": {"type": "string"},
                        **{name: {"type": "integer", "minimum": 0} for name in (
                            "connections", "users", "topics", "subscriptions", "messages_in",
                            "messages_out")},
                        "cluster": {
                            "type": "object", "required": ["nodes", "connections", "users"],
                            "properties": {name: {"type": "integer", "minimum": 0}
                                           for name in ("nodes", "connections", "users")}},
                    }})},
                "401": UNAUTHORIZED,
                "503": _error(DRAINING + "; or presence is unavailable (Redis)",
                              protocol.UNAVAILABLE, retry_after=True),
            },
            operationId="stats",
        )},
        "/healthz": {"get": _operation(
            "Liveness: 200 while the process runs",
            {"200": {"description": "alive", **_json({
                "type": "object", "required": ["status"],
                "properties": {"status": {"const": "ok"}}})}},
            operationId="healthz", security=[],
        )},
        "/readyz": {"get": _operation(
            "Readiness: the store (and broker) answer",
            {
                "200": {"description": "ready", **_json({
                    "type": "object", "required": ["status"],
                    "properties": {"status": {"const": "ready"}}})},
                "503": {"description": "draining, or the store did not answer within 2 s",
                        **_json({"type": "object", "required": ["status"], "properties": {
                            "status": {"enum": ["draining", "unavailable"]},
                            "reason": {"type": "string"}}})},
            },
            operationId="readyz", security=[],
        )},
        "/metrics": {"get": _operation(
            "Prometheus metrics, names prefixed `notifier_`",
            {"200": {"description": "Prometheus text format",
                     "content": {"text/plain": {"schema": {"type": "string"}}}}},
            operationId="metrics", security=[],
        )},
        "/api/openapi.json": {"get": _operation(
            "This document",
            {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}},
            operationId="openapi", security=[],
        )},
        "/ws": {"get": _operation(
            "The WebSocket handshake (`Upgrade: websocket`); the protocol after it is in "
            "docs/protocol.md",
            {
                "101": {"description": "switching to the WebSocket protocol"},
                "400": _error("not a WebSocket handshake", protocol.BAD_REQUEST),
                "401": _error("missing, malformed, badly signed or expired token",
                              protocol.UNAUTHORIZED),
                "503": _error("shutting down", protocol.UNAVAILABLE),
            },
            operationId="websocket",
            parameters=[{"name": "token", "in": "query", "schema": {"type": "string"},
                         "description": "the JWT, for clients that cannot set headers "
                                        "(browsers); an `Authorization: Bearer` header wins"}],
            security=[{"jwt": []}],
        )},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "notifier",
            "version": "0.1.0",
            "description": "Realtime notifications: backend services publish over this HTTP "
                           "API, browsers subscribe over the WebSocket at /ws. Every error "
                           "is `{\"error\":{\"code\",\"message\"}}`.",
        },
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "a key from `auth.api_keys`"},
                "jwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                        "description": "a user's token (or the `token` query parameter)"},
            },
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {
                        "type": "object", "required": ["code", "message"],
                        "properties": {"code": {"type": "string", "enum": ERROR_CODES},
                                       "message": {"type": "string"}}}}},
                "PublishRequest": publish_request,
                "Receipt": {
                    "type": "object", "required": ["id", "topic", "seq", "time"],
                    "properties": {"id": ID, "topic": TOPIC, "seq": {**SEQ, "minimum": 1},
                                   "time": TIME}},
                "Message": {
                    "type": "object", "required": ["topic", "seq", "id", "time", "event", "data"],
                    "properties": {"topic": TOPIC, "seq": {**SEQ, "minimum": 1}, "id": ID,
                                   "time": TIME, "event": {"type": ["string", "null"]},
                                   "data": {}}},
            },
        },
    }


DOCUMENT: bytes = orjson.dumps(build())

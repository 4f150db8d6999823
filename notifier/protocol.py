"""The WebSocket wire protocol, with no I/O: text in, commands or errors out,
and the server's replies built as JSON bytes.

Every client frame is one JSON object with a ``type``; any command may carry a
``ref`` (string or integer) that every reply to it echoes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Union

import orjson

from notifier.topics import is_valid_topic

MAX_EVENT_LENGTH = 100
MAX_EPOCH_LENGTH = 100
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER range; no topic gets near it

# Error codes (SPEC "Server -> client").
BAD_REQUEST = "bad_request"
UNKNOWN_TYPE = "unknown_type"
FORBIDDEN = "forbidden"
INVALID_TOPIC = "invalid_topic"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
UNAUTHORIZED = "unauthorized"
UNAVAILABLE = "unavailable"  # ours: the server could not do it now (store failure); retry

# Close codes (SPEC "Close codes").
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_LARGE = 1009
CLOSE_UNAUTHORIZED = 4001
CLOSE_FORBIDDEN = 4003
CLOSE_RATE_LIMITED = 4008
CLOSE_SLOW_CONSUMER = 4009

Ref = Union[str, int, None]


@dataclass(frozen=True, slots=True)
class Subscribe:
    topic: str
    since: int | None
    epoch: str | None = None  # from an earlier ``subscribed``: the log ``since`` counts in
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    topic: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Ack:
    topic: str
    seq: int
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    data: bytes  # compact JSON
    event: str | None
    ephemeral: bool
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Ping:
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    ref: Ref = None


Command = Union[Subscribe, Unsubscribe, Ack, Publish, Ping, Auth]


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """A command that cannot run: answered with an ``error`` frame."""

    code: str
    message: str
    ref: Ref = None

    def payload(self) -> bytes:
        return error(self.code, self.message, self.ref)


def _is_int(value: object) -> bool:
    # bool is an int subclass; JSON true is not a seq.
    return isinstance(value, int) and not isinstance(value, bool)


def _require_topic(body: dict, ref: Ref) -> str | ProtocolError:
    topic = body.get("topic")
    if not isinstance(topic, str):
        return ProtocolError(BAD_REQUEST, "'topic' must be a string", ref)
    if not is_valid_topic(topic):
        return ProtocolError(INVALID_TOPIC, f"invalid topic name {topic[:210]!r}", ref)
    return topic


# orjson reads integers wider than 64 bits as floats, silently losing digits;
# text with 20+ digits in a row goes through the exact (slower) stdlib parser.
# Mapping every digit to "1" and everything else to " " finds such a run an
# order of magnitude faster than a regular expression.
_DIGITS_AS_ONES = bytes(ord("1") if chr(c).isdigit() and c < 128 else ord(" ") for c in range(256))
_TWENTY_DIGITS = b"1" * 20


def _has_long_digit_run(text: str | bytes) -> bool:
    raw = text if isinstance(text, bytes) else text.encode()
    return _TWENTY_DIGITS in raw.translate(_DIGITS_AS_ONES)


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]}... is out of range")
    return value


def loads(text: str | bytes):
    """Parse JSON exactly; raises ValueError (JSONDecodeError) when invalid."""
    if _has_long_digit_run(text):
        return json.loads(text, parse_constant=_no_constants, parse_float=_finite_float)
    return orjson.loads(text)


def encode_data(data: object, max_bytes: int) -> bytes | ProtocolError:
    """Serialize a message's ``data`` compactly, enforcing the size limit.

    Shared by the WebSocket and HTTP paths so both count bytes the same way.
    """
    try:
        encoded = orjson.dumps(data)
    except TypeError:  # integers beyond 64 bits: keep them exact
        encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    if len(encoded) > max_bytes:
        return ProtocolError(
            TOO_LARGE, f"'data' is {len(encoded)} bytes serialized; the limit is {max_bytes}"
        )
    return encoded


def validate_event(event: object, ref: Ref = None) -> str | None | ProtocolError:
    if event is None:
        return None
    if not isinstance(event, str) or not 0 < len(event) <= MAX_EVENT_LENGTH:
        return ProtocolError(
            BAD_REQUEST, f"'event' must be a string of 1 to {MAX_EVENT_LENGTH} characters", ref
        )
    return event


def parse(text: str | bytes, max_message_bytes: int) -> Command | ProtocolError:
    """Turn one client frame into a command, or the error to answer it with."""
    try:
        body = loads(text)
    except ValueError:
        return ProtocolError(BAD_REQUEST, "frame is not valid JSON")
    if not isinstance(body, dict):
        return ProtocolError(BAD_REQUEST, "frame must be a JSON object")
    ref = body.get("ref")
    if ref is not None and not (isinstance(ref, str) or _is_int(ref)):
        return ProtocolError(BAD_REQUEST, "'ref' must be a string or an integer")
    kind = body.get("type")
    if not isinstance(kind, str):
        return ProtocolError(BAD_REQUEST, "'type' must be a string", ref)
    handler = _PARSERS.get(kind)
    if handler is None:
        return ProtocolError(UNKNOWN_TYPE, f"unknown command type {kind[:50]!r}", ref)
    return handler(body, ref, max_message_bytes)


def _parse_subscribe(body: dict, ref: Ref, _max: int) -> Command | ProtocolError:
    topic = _require_topic(body, ref)
    if isinstance(topic, ProtocolError):
        return topic
    since = body.get("since")
    if since is not None and not (_is_int(since) and 0 <= since <= MAX_SEQ):
        return ProtocolError(BAD_REQUEST, "'since' must be an integer >= 0", ref)
    epoch = body.get("epoch")
    if epoch is not None and not (isinstance(epoch, str) and 0 < len(epoch) <= MAX_EPOCH_LENGTH):
        return ProtocolError(
            BAD_REQUEST, f"'epoch' must be a string of 1 to {MAX_EPOCH_LENGTH} characters", ref)
    return Subscribe(topic, since, epoch, ref)


def _parse_unsubscribe(body: dict, ref: Ref, _max: int) -> Command | ProtocolError:
    topic = _require_topic(body, ref)
    if isinstance(topic, ProtocolError):
        return topic
    return Unsubscribe(topic, ref)


def _parse_ack(body: dict, ref: Ref, _max: int) -> Command | ProtocolError:
    topic = _require_topic(body, ref)
    if isinstance(topic, ProtocolError):
        return topic
    seq = body.get("seq")
    if not (_is_int(seq) and 0 <= seq <= MAX_SEQ):
        return ProtocolError(BAD_REQUEST, "'seq' must be an integer >= 0", ref)
    return Ack(topic, seq, ref)


def _parse_publish(body: dict, ref: Ref, max_message_bytes: int) -> Command | ProtocolError:
    topic = _require_topic(body, ref)
    if isinstance(topic, ProtocolError):
        return topic
    if "data" not in body:
        return ProtocolError(BAD_REQUEST, "'data' is required", ref)
    data = encode_data(body["data"], max_message_bytes)
    if isinstance(data, ProtocolError):
        return ProtocolError(data.code, data.message, ref)
    event = validate_event(body.get("event"), ref)
    if isinstance(event, ProtocolError):
        return event
    ephemeral = body.get("ephemeral", False)
    if not isinstance(ephemeral, bool):
        return ProtocolError(BAD_REQUEST, "'ephemeral' must be a boolean", ref)
    return Publish(topic, data, event, ephemeral, ref)


def _parse_ping(body: dict, ref: Ref, _max: int) -> Command:
    return Ping(ref)


def _parse_auth(body: dict, ref: Ref, _max: int) -> Command | ProtocolError:
    token = body.get("token")
    if not isinstance(token, str) or not token:
        return ProtocolError(BAD_REQUEST, "'token' must be a non-empty string", ref)
    return Auth(token, ref)


_PARSERS = {
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "ack": _parse_ack,
    "publish": _parse_publish,
    "ping": _parse_ping,
    "auth": _parse_auth,
}


# Replies. Each returns the JSON bytes of one text frame.

def _reply(body: dict, ref: Ref) -> bytes:
    if ref is not None:
        body["ref"] = ref
    return orjson.dumps(body)


def welcome(connection: str, user: str, heartbeat: float, expires: int) -> bytes:
    return orjson.dumps({
        "type": "welcome", "connection": connection, "user": user,
        "heartbeat": heartbeat, "expires": expires,
    })


def subscribed(topic: str, seq: int, epoch: str, recovered: bool, ref: Ref = None) -> bytes:
    return _reply(
        {"type": "subscribed", "topic": topic, "seq": seq, "epoch": epoch, "recovered": recovered},
        ref,
    )


def unsubscribed(topic: str, ref: Ref = None) -> bytes:
    return _reply({"type": "unsubscribed", "topic": topic}, ref)


def published(topic: str, seq: int | None, message_id: str, ref: Ref = None) -> bytes:
    return _reply({"type": "published", "topic": topic, "seq": seq, "id": message_id}, ref)


def pong(ref: Ref = None) -> bytes:
    return _reply({"type": "pong"}, ref)


def authenticated(expires: int, ref: Ref = None) -> bytes:
    return _reply({"type": "authenticated", "expires": expires}, ref)


def error(code: str, message: str, ref: Ref = None) -> bytes:
    return _reply({"type": "error", "code": code, "message": message}, ref)

"""The WebSocket wire protocol, with no I/O: text in, commands or errors out,
and the server's replies built as JSON bytes.

Every client frame is one JSON object with a ``type``; any command may carry a
``ref`` (string or integer) that every reply to it echoes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Union

import orjson

from notifier.topics import is_valid_topic

MAX_EVENT_LENGTH = 100
MAX_EPOCH_LENGTH = 100
MAX_SEQ = 2**63 - 1  # SQLite's INTEGER range; no topic gets near it
# An integer ref is echoed in every reply: it must fit in a signed 64-bit
# integer, which every JSON encoder can write back exactly.
MIN_REF, MAX_REF = -2**63, 2**63 - 1
# Arrays and objects nest at most this deep: in a whole frame or request body
# (the outer object counts), and in a message's ``data`` on its own. The
# parsers (orjson and the stdlib's) never get near their own limits.
MAX_DEPTH = 64
MAX_DATA_DEPTH = 32

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
CLOSE_HEARTBEAT_TIMEOUT = 4010

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


class WireError(ValueError):
    """Text the wire refuses; ``str()`` completes "frame ..." or "body ..."."""


# orjson reads integers outside [-2**63, 2**64 - 1] as floats, silently
# losing digits: text that may hold one (a run of 20 digits, or a minus sign
# and 19) goes through the exact (slower) stdlib parser. Mapping digits to
# "1", "-" to itself and everything else to " " finds such a run an order of
# magnitude faster than a regular expression.
_DIGIT_MARKS = bytes(ord("1") if chr(c).isdigit() and c < 128 else ord("-") if c == ord("-")
                     else ord(" ") for c in range(256))
_TWENTY_DIGITS = b"1" * 20
_NEGATIVE_NINETEEN = b"-" + b"1" * 19


def _may_hold_wide_integer(raw: bytes) -> bool:
    marks = raw.translate(_DIGIT_MARKS)
    return _TWENTY_DIGITS in marks or _NEGATIVE_NINETEEN in marks


# Nesting is measured on the text, before either parser recurses into it,
# in a few passes that each run in C, in linear time on any input.
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")
_NOT_OPENINGS = bytes(c for c in range(256) if c not in b"[{")


def nests_deeper_than(raw: bytes, limit: int) -> bool:
    """True when arrays and objects in the JSON text ``raw`` nest more than
    ``limit`` deep. Exact for valid JSON; for invalid text, never below the
    depth a parser would reach before giving up."""
    if len(raw.translate(None, _NOT_OPENINGS)) <= limit:
        return False  # never deeper than its number of openings
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)  # so that an escaped quote cannot end a string
    # Only quotes and brackets are kept; strings without brackets become "".
    marks = raw.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in marks:
        # Brackets inside strings: with escapes gone, quotes pair up, and
        # every other piece between them is inside a string.
        marks = b"".join(marks.split(b'"')[::2])
    marks = marks.translate(_BRACKETS)
    # Each round peels the innermost pairs: one level of nesting.
    depth = 0
    while True:
        peeled = marks.replace(b"()", b"")
        if len(peeled) == len(marks):
            break
        marks, depth = peeled, depth + 1
        if depth > limit:
            return True
    # Invalid text leaves ")))(((": its unclosed openings hold what was peeled.
    return depth + marks.count(b"(") > limit


# A surrogate can only arrive as a \u escape (the text itself is UTF-8).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:20]}... is out of range")
    return value


def loads(text: str | bytes):
    """Parse one frame or body by the wire's rules, or raise WireError: UTF-8
    JSON with no lone surrogate (nothing could store or send it back), no
    NaN or infinite number, nested at most MAX_DEPTH deep, and integers of
    any size (up to Python's 4300 digits) kept exact."""
    try:
        raw = text.encode() if isinstance(text, str) else text
    except UnicodeEncodeError:
        raise WireError("is not valid UTF-8") from None
    if nests_deeper_than(raw, MAX_DEPTH):
        raise WireError(f"nests arrays and objects deeper than {MAX_DEPTH} levels")
    if not _may_hold_wide_integer(raw):
        try:
            return orjson.loads(raw)  # refuses lone surrogates and bad UTF-8 itself
        except orjson.JSONDecodeError as exc:
            raise WireError(f"is not valid JSON ({exc})") from None
    try:
        # Decoded here, strictly: json.loads would guess UTF-16 or -32 from
        # the first bytes, and let encoded surrogates through.
        value = json.loads(raw.decode(), parse_constant=_no_constants, parse_float=_finite_float)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise WireError(f"is not valid JSON ({exc})") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(value, ensure_ascii=False, check_circular=False).encode()
        except UnicodeEncodeError:
            raise WireError("is not valid JSON (a string holds a lone surrogate)") from None
    return value


def encode_data(data: object, max_bytes: int) -> bytes | ProtocolError:
    """Serialize a message's ``data`` compactly, enforcing the size limit.

    Shared by the WebSocket and HTTP paths so both count bytes the same way.
    ``data`` comes from ``loads``, so it holds no lone surrogate and nests
    at most MAX_DEPTH deep: the only thing orjson cannot write is an integer
    wider than 64 bits.
    """
    try:
        encoded = orjson.dumps(data)
    except TypeError:  # integers beyond 64 bits: keep them exact
        encoded = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    if len(encoded) > max_bytes:
        return ProtocolError(
            TOO_LARGE, f"'data' is {len(encoded)} bytes serialized; the limit is {max_bytes}"
        )
    if nests_deeper_than(encoded, MAX_DATA_DEPTH):
        return ProtocolError(
            BAD_REQUEST, f"'data' nests arrays and objects deeper than {MAX_DATA_DEPTH} levels")
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
    except WireError as exc:
        return ProtocolError(BAD_REQUEST, f"frame {exc}")
    if not isinstance(body, dict):
        return ProtocolError(BAD_REQUEST, "frame must be a JSON object")
    ref = body.get("ref")
    if ref is not None and not (isinstance(ref, str) or (_is_int(ref) and MIN_REF <= ref <= MAX_REF)):
        return ProtocolError(BAD_REQUEST, "'ref' must be a string or a 64-bit signed integer")
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

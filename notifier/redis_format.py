"""What notifier keeps in Redis and sends over its pub/sub: key names and
the one encoding of a stored message, shared by the Redis store (which
writes the log and publishes in the same script) and the Redis broker
(which reads the bus).

Every key of one topic carries the hash tag ``{<topic>}`` (topic names
cannot contain braces), so a topic's keys always share a Redis Cluster
slot and its scripts stay single-slot.

A log entry is ``<seq> <created_ms> <id> <time> <event JSON>\\n<data JSON>``:
seq and the creation time are put in front by the append script, the rest
is built here. Neither JSON part can hold a raw newline (JSON escapes it
inside strings), so the first newline ends the event. A bus message is
``<epoch> <entry>`` on the topic's channel; an ephemeral one, never stored,
is ``- <id> <time> <event JSON>\n<data JSON>``.
"""

from __future__ import annotations

import orjson

from notifier.messages import Message

PREFIX = "notifier:"


def meta_key(topic: str) -> str:
    """Hash: ``head`` (last seq assigned) and ``epoch`` of the topic's log."""
    return f"{PREFIX}{{{topic}}}:meta"


def log_key(topic: str) -> str:
    """Sorted set of entries scored by seq: the retained log."""
    return f"{PREFIX}{{{topic}}}:log"


def cursors_key(topic: str) -> str:
    """Hash: user -> ``<seq> <epoch>``, the user's acked position."""
    return f"{PREFIX}{{{topic}}}:cursors"


def idempotency_key(topic: str, key: str) -> str:
    """String, expiring after the idempotency window: ``<seq> <epoch> <id>
    <time>``, the first receipt and the epoch it was given in (a key from a
    log that is gone is not a repeat)."""
    return f"{PREFIX}{{{topic}}}:idem:{key}"


def channel(topic: str) -> str:
    """The topic's pub/sub channel: every stored message, in seq order."""
    return f"{PREFIX}{{{topic}}}:bus"


def topic_of_channel(name: bytes | str) -> str:
    text = name.decode() if isinstance(name, bytes) else name
    return text[len(PREFIX) + 1:-len("}:bus")]


CONTROL_CHANNEL = PREFIX + "control"   # commands to every node (disconnect a user)
NODES_KEY = PREFIX + "nodes"           # sorted set: node id -> expiry (ms)


def node_topics_key(node: str) -> str:
    """Hash: topic -> JSON {user: connections} of one node's subscribers."""
    return f"{PREFIX}node:{node}:topics"


def node_users_key(node: str) -> str:
    """Hash: user -> connections on one node."""
    return f"{PREFIX}node:{node}:users"


def entry_tail(message_id: str, time: str, event: str | None, data: bytes) -> bytes:
    """The part of a log entry known before the append script runs."""
    return b"".join((message_id.encode(), b" ", time.encode(), b" ",
                     orjson.dumps(event), b"\n", data))


def decode_entry(topic: str, epoch: str, entry: bytes) -> tuple[Message, int]:
    """A log entry as a Message, and its creation time in ms."""
    head, _, data = entry.partition(b"\n")
    seq, created, message_id, time, event = head.split(b" ", 4)
    return (Message(topic, int(seq), epoch, message_id.decode(), time.decode(),
                    orjson.loads(event), data), int(created))


def encode_bus(message: Message) -> bytes:
    """What a broker publishes for a message the store did not put on the
    bus itself (ephemeral ones; stored ones only from a store that does not
    publish, with no creation time)."""
    tail = entry_tail(message.id, message.time, message.event, message.data)
    if message.seq is None:
        return b"- " + tail
    return b"%s %d 0 %s" % (message.epoch.encode(), message.seq, tail)


def decode_bus(topic: str, payload: bytes) -> Message:
    """A bus message as a Message."""
    epoch, _, entry = payload.partition(b" ")
    if epoch == b"-":
        head, _, data = entry.partition(b"\n")
        message_id, time, event = head.split(b" ", 2)
        return Message(topic, None, None, message_id.decode(), time.decode(),
                       orjson.loads(event), data)
    return decode_entry(topic, epoch.decode(), entry)[0]

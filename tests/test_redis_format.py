"""The one encoding of a stored message in Redis (log entry and bus
message), and the key layout: every key of a topic in one Cluster slot."""

from __future__ import annotations

import pytest

from notifier import redis_format
from notifier.messages import Message


@pytest.mark.parametrize("event", [None, "goal", 'say "hi" \n twice', "é ✓"])
@pytest.mark.parametrize("data", [b"null", b'{"a":[1,2]," b":"x y\\nz"}', b'"\xc3\xa9"',
                                  b"123456789012345678901234567890"])
def test_an_entry_decodes_to_the_message_it_encodes(event, data):
    tail = redis_format.entry_tail("01a2b3c4d5e6f7a8b9c0d1e2", "2026-01-01T09:40:02.511Z", event, data)
    entry = b"17 1767260402511 " + tail  # what the append script puts in front
    message, created = redis_format.decode_entry("user:alice", "ep0ch", entry)
    assert message == Message("user:alice", 17, "ep0ch", "01a2b3c4d5e6f7a8b9c0d1e2",
                              "2026-01-01T09:40:02.511Z", event, data)
    assert created == 1767260402511
    assert redis_format.decode_bus("user:alice", b"ep0ch " + entry) == message


def test_every_key_of_a_topic_shares_its_hash_tag():
    topic = "user:a.b-c_d@e"
    keys = [redis_format.meta_key(topic), redis_format.log_key(topic),
            redis_format.cursors_key(topic), redis_format.idempotency_key(topic, "k"),
            redis_format.channel(topic)]
    for key in keys:
        assert key[key.index("{") + 1:key.index("}")] == topic
    assert redis_format.topic_of_channel(redis_format.channel(topic).encode()) == topic


@pytest.mark.parametrize("seq, epoch", [(None, None), (42, "e9")])
def test_what_a_broker_publishes_decodes_to_the_message(seq, epoch):
    message = Message("news.a", seq, epoch, "01a2b3c4d5e6f7a8b9c0d1e2", "2026-01-01T09:40:02.511Z",
                      'typing "x"', b'{"who":"bob"}')
    assert redis_format.decode_bus("news.a", redis_format.encode_bus(message)) == message

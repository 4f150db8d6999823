"""The wire protocol with no I/O: strings in, commands or errors out; replies
built as JSON; frames per RFC 6455 section 5.2; the ``message`` frame."""

from __future__ import annotations

import re
import struct

import orjson
import pytest

from notifier import protocol
from notifier.frames import text_frame
from notifier.messages import Message, new_id, rfc3339
from notifier.protocol import (
    Ack, Auth, Ping, ProtocolError, Publish, Subscribe, Unsubscribe, parse,
)

MAX = 64 * 1024


def command(body) -> str:
    return orjson.dumps(body).decode()


def error_of(result) -> tuple[str, object]:
    assert isinstance(result, ProtocolError), result
    return result.code, result.ref


# Client -> server: every command type, with and without ref


class TestCommands:
    def test_subscribe_without_since(self):
        assert parse(command({"type": "subscribe", "topic": "news.sport"}), MAX) == \
            Subscribe("news.sport", None)

    @pytest.mark.parametrize("since", [0, 1, 42, 2**53])
    def test_subscribe_with_since(self, since):
        assert parse(command({"type": "subscribe", "topic": "news", "since": since}), MAX) == \
            Subscribe("news", since)

    def test_unsubscribe(self):
        assert parse(command({"type": "unsubscribe", "topic": "a.b"}), MAX) == Unsubscribe("a.b")

    @pytest.mark.parametrize("seq", [0, 1, 99])
    def test_ack(self, seq):
        assert parse(command({"type": "ack", "topic": "user:alice", "seq": seq}), MAX) == \
            Ack("user:alice", seq)

    def test_publish_minimal_is_stored_with_no_event(self):
        parsed = parse(command({"type": "publish", "topic": "chat.1", "data": "hi"}), MAX)
        assert parsed == Publish("chat.1", b'"hi"', None, False)

    def test_publish_data_is_compact_json(self):
        text = '{"type": "publish", "topic": "chat.1", "data": {"a": 1, "b": [1, 2.5, null, "\u00e9"]}}'
        parsed = parse(text, MAX)
        assert isinstance(parsed, Publish)
        assert parsed.data == '{"a":1,"b":[1,2.5,null,"\u00e9"]}'.encode()

    @pytest.mark.parametrize("data, encoded", [
        (None, b"null"), (0, b"0"), (False, b"false"), ([], b"[]"), ({}, b"{}"), ("", b'""'),
    ])
    def test_publish_any_json_data_even_falsy(self, data, encoded):
        parsed = parse(command({"type": "publish", "topic": "t", "data": data}), MAX)
        assert parsed == Publish("t", encoded, None, False)

    def test_publish_with_event_and_ephemeral(self):
        parsed = parse(command({"type": "publish", "topic": "t", "data": 1, "event": "typing",
                                "ephemeral": True}), MAX)
        assert parsed == Publish("t", b"1", "typing", True)

    def test_publish_event_null_and_ephemeral_false(self):
        parsed = parse(command({"type": "publish", "topic": "t", "data": 1, "event": None,
                                "ephemeral": False}), MAX)
        assert parsed == Publish("t", b"1", None, False)

    def test_publish_event_of_100_characters(self):
        parsed = parse(command({"type": "publish", "topic": "t", "data": 1, "event": "e" * 100}), MAX)
        assert isinstance(parsed, Publish) and parsed.event == "e" * 100

    def test_ping(self):
        assert parse('{"type":"ping"}', MAX) == Ping()

    def test_auth(self):
        assert parse(command({"type": "auth", "token": "abc.def.ghi"}), MAX) == Auth("abc.def.ghi")

    def test_bytes_frame_parses_like_text(self):
        assert parse(b'{"type":"ping","ref":"x"}', MAX) == Ping("x")

    def test_unknown_fields_are_ignored(self):
        assert parse('{"type":"ping","extra":[1,2]}', MAX) == Ping()

    @pytest.mark.parametrize("ref", ["r-1", "", 0, 7, -3, 2**40])
    @pytest.mark.parametrize("body, build", [
        ({"type": "subscribe", "topic": "t", "since": 3}, lambda ref: Subscribe("t", 3, None, ref)),
        ({"type": "unsubscribe", "topic": "t"}, lambda ref: Unsubscribe("t", ref)),
        ({"type": "ack", "topic": "t", "seq": 2}, lambda ref: Ack("t", 2, ref)),
        ({"type": "publish", "topic": "t", "data": [1]},
         lambda ref: Publish("t", b"[1]", None, False, ref)),
        ({"type": "ping"}, lambda ref: Ping(ref)),
        ({"type": "auth", "token": "tok"}, lambda ref: Auth("tok", ref)),
    ])
    def test_every_command_carries_ref(self, body, build, ref):
        parsed = parse(command({**body, "ref": ref}), MAX)
        assert parsed == build(ref)
        assert type(parsed.ref) is type(ref)


# Errors parse can produce


class TestBadFrames:
    @pytest.mark.parametrize("text", ["", "not json", "{", '{"type":"ping"', "{'type': 'ping'}",
                                      '{"type":"ping"} trailing', b"\xff\xfe"])
    def test_not_json_is_bad_request(self, text):
        assert error_of(parse(text, MAX)) == ("bad_request", None)

    @pytest.mark.parametrize("text", ["[]", '[{"type":"ping"}]', "1", '"ping"', "null", "true"])
    def test_not_an_object_is_bad_request(self, text):
        assert error_of(parse(text, MAX)) == ("bad_request", None)

    @pytest.mark.parametrize("body", [{}, {"type": None}, {"type": 5}, {"type": ["ping"]},
                                      {"topic": "t"}])
    def test_missing_or_mistyped_type_is_bad_request_with_ref(self, body):
        assert error_of(parse(command({**body, "ref": "r"}), MAX)) == ("bad_request", "r")

    @pytest.mark.parametrize("kind", ["Ping", "PING", "message", "welcome", "publish_batch", "",
                                      "subscribe "])
    def test_unknown_type_echoes_ref(self, kind):
        assert error_of(parse(command({"type": kind, "ref": 9}), MAX)) == ("unknown_type", 9)

    def test_unknown_type_without_ref(self):
        assert error_of(parse('{"type":"shout"}', MAX)) == ("unknown_type", None)

    @pytest.mark.parametrize("ref", [True, False, 1.5, 1.0, [1], {"a": 1}])
    def test_ref_neither_string_nor_integer_is_refused(self, ref):
        # The bad ref cannot be echoed: the error carries none.
        assert error_of(parse(command({"type": "ping", "ref": ref}), MAX)) == ("bad_request", None)

    @pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "ack", "publish"])
    @pytest.mark.parametrize("topic", [None, 5, ["t"], {"t": 1}, True])
    def test_mistyped_topic_is_bad_request(self, kind, topic):
        body = {"type": kind, "topic": topic, "seq": 1, "data": 1, "ref": "r"}
        assert error_of(parse(command(body), MAX)) == ("bad_request", "r")

    @pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "ack", "publish"])
    def test_missing_topic_is_bad_request(self, kind):
        body = {"type": kind, "seq": 1, "data": 1, "ref": 3}
        assert error_of(parse(command(body), MAX)) == ("bad_request", 3)

    @pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "ack", "publish"])
    @pytest.mark.parametrize("topic", ["", "a..b", ".a", "a.", "has space", "a/b", "news.*",
                                       "news.>", "caf\u00e9", "x" * 201])
    def test_invalid_topic(self, kind, topic):
        body = {"type": kind, "topic": topic, "seq": 1, "data": 1, "ref": "r"}
        assert error_of(parse(command(body), MAX)) == ("invalid_topic", "r")

    @pytest.mark.parametrize("since", [-1, 1.5, 1.0, "3", True, False, [1], {}])
    def test_subscribe_since_must_be_a_non_negative_integer(self, since):
        body = {"type": "subscribe", "topic": "t", "since": since, "ref": "s"}
        assert error_of(parse(command(body), MAX)) == ("bad_request", "s")

    def test_subscribe_since_beyond_64_bits_is_refused(self):
        text = '{"type":"subscribe","topic":"t","since":18446744073709551616,"ref":1}'
        assert error_of(parse(text, MAX))[0] == "bad_request"

    @pytest.mark.parametrize("body", [
        {"type": "ack", "topic": "t"},
        {"type": "ack", "topic": "t", "seq": None},
        {"type": "ack", "topic": "t", "seq": -1},
        {"type": "ack", "topic": "t", "seq": 2.0},
        {"type": "ack", "topic": "t", "seq": "2"},
        {"type": "ack", "topic": "t", "seq": True},
        {"type": "ack", "topic": "t", "seq": [2]},
    ])
    def test_ack_seq_invalid(self, body):
        assert error_of(parse(command({**body, "ref": "a"}), MAX)) == ("bad_request", "a")

    def test_publish_without_data(self):
        body = {"type": "publish", "topic": "t", "ref": "p"}
        assert error_of(parse(command(body), MAX)) == ("bad_request", "p")

    @pytest.mark.parametrize("ephemeral", [None, 1, 0, "true", "yes", [], {}])
    def test_publish_ephemeral_must_be_bool(self, ephemeral):
        body = {"type": "publish", "topic": "t", "data": 1, "ephemeral": ephemeral, "ref": "p"}
        assert error_of(parse(command(body), MAX)) == ("bad_request", "p")

    @pytest.mark.parametrize("event", [5, True, ["e"], {"e": 1}, "", "e" * 101])
    def test_publish_event_wrong_type_or_length(self, event):
        body = {"type": "publish", "topic": "t", "data": 1, "event": event, "ref": "p"}
        assert error_of(parse(command(body), MAX)) == ("bad_request", "p")

    @pytest.mark.parametrize("token", [None, "", 5, ["a"]])
    def test_auth_token_must_be_a_non_empty_string(self, token):
        body = {"type": "auth", "ref": "a"} if token is None else {"type": "auth", "token": token,
                                                                  "ref": "a"}
        assert error_of(parse(command(body), MAX)) == ("bad_request", "a")


class TestTooLarge:
    def test_data_at_the_limit_is_accepted(self):
        data = "x" * 8  # serialized: "xxxxxxxx" is 10 bytes
        parsed = parse(command({"type": "publish", "topic": "t", "data": data}), 10)
        assert isinstance(parsed, Publish) and len(parsed.data) == 10

    def test_data_one_byte_over_the_limit(self):
        body = {"type": "publish", "topic": "t", "data": "x" * 9, "ref": "big"}
        assert error_of(parse(command(body), 10)) == ("too_large", "big")

    def test_limit_counts_serialized_bytes_not_characters(self):
        # "\u00e9" is 3 characters serialized but 4 bytes of UTF-8.
        body = {"type": "publish", "topic": "t", "data": "\u00e9"}
        assert error_of(parse(command(body), 3)) == ("too_large", None)
        assert isinstance(parse(command(body), 4), Publish)

    def test_limit_counts_compact_form_not_the_frame_text(self):
        # The frame has lots of whitespace; the compact data is 7 bytes.
        text = '{"type":"publish","topic":"t","data":[ 1 ,  2 ,   3 ]}'
        parsed = parse(text, 7)
        assert isinstance(parsed, Publish) and parsed.data == b"[1,2,3]"

    def test_default_limit_of_64_kib(self):
        fits = {"type": "publish", "topic": "t", "data": "x" * (64 * 1024 - 2)}
        over = {"type": "publish", "topic": "t", "data": "x" * (64 * 1024 - 1)}
        assert isinstance(parse(command(fits), MAX), Publish)
        assert error_of(parse(command(over), MAX))[0] == "too_large"

    def test_error_payload_is_an_error_frame(self):
        error = parse(command({"type": "publish", "topic": "t", "data": "xx", "ref": 4}), 3)
        body = orjson.loads(error.payload())
        assert body["type"] == "error" and body["code"] == "too_large" and body["ref"] == 4
        assert isinstance(body["message"], str) and body["message"]


class TestWireRules:
    """What any frame or body may hold (docs/protocol.md, "JSON on the
    wire"), the same on the fast orjson path and on the exact stdlib one; a
    run of 20 digits anywhere sends a text down the exact path."""

    WIDE = ',"n":12345678901234567890'

    @pytest.mark.parametrize("wide", ["", WIDE])
    @pytest.mark.parametrize("value", ['"\\ud800"', '"\\udfff"', '"a\\udc00b"', '"\\ud800\\ud800"',
                                       '"\\udc00\\ud800"', '{"\\ud800":1}'])
    def test_a_lone_surrogate_anywhere_is_refused(self, value, wide):
        for text in ('{"type":"ping","x":%s%s}' % (value, wide),
                     '{"type":"publish","topic":"t","data":%s%s}' % (value, wide)):
            assert error_of(parse(text, MAX))[0] == "bad_request"
            with pytest.raises(protocol.WireError):
                protocol.loads(text.encode())

    @pytest.mark.parametrize("wide", ["", WIDE])
    def test_a_surrogate_pair_and_an_escaped_backslash_are_fine(self, wide):
        text = '{"type":"publish","topic":"t","data":["\\ud83d\\ude00","\\\\ud800"]%s}' % wide
        parsed = parse(text, MAX)
        assert isinstance(parsed, Publish)
        assert orjson.loads(parsed.data) == ["\U0001f600", "\\ud800"]

    @pytest.mark.parametrize("raw", [b'{"a":"\xed\xa0\x80"}', b'{"a":"\xff"}', b'{"a":"\xc3\x28"}',
                                     b'\xff\xfe{\x00}\x00', b'{\x00"\x00a\x00"\x00:\x001\x00}\x00'])
    @pytest.mark.parametrize("wide", [b"", WIDE.encode()])
    def test_bytes_must_be_utf8(self, raw, wide):
        text = raw[:-1] + wide + raw[-1:] if raw.endswith(b"}") else raw
        with pytest.raises(protocol.WireError):
            protocol.loads(text)

    @pytest.mark.parametrize("ref", [2**63, 2**64, -2**63 - 1, 10**30])
    def test_an_integer_ref_must_fit_in_64_bits(self, ref):
        assert error_of(parse('{"type":"ping","ref":%d}' % ref, MAX)) == ("bad_request", None)

    @pytest.mark.parametrize("ref", [2**63 - 1, -2**63])
    def test_64_bit_refs_are_echoed_exactly(self, ref):
        parsed = parse('{"type":"ping","ref":%d}' % ref, MAX)
        assert parsed == Ping(ref) and protocol.pong(parsed.ref) == b'{"type":"pong","ref":%d}' % ref

    @pytest.mark.parametrize("number", [-9999999999999999999, -2**63 - 1, -2**63, 2**64 - 1, 2**64,
                                        -10**30, 10**4000, -10**300])
    def test_integers_are_exact(self, number):
        for text in ('{"type":"publish","topic":"t","data":%d}' % number,
                     '{"type":"publish","topic":"t","data":[%d, 1.5]}' % number):
            parsed = parse(text, 10**6)
            assert isinstance(parsed, Publish)
            assert int(parsed.data.strip(b"[]").split(b",")[0]) == number

    @pytest.mark.parametrize("text", ['{"a":1e400}', '{"a":-1e400}', '{"a":NaN}', '{"a":Infinity}',
                                      '{"a":1%s}' % ("0" * 5000)])
    @pytest.mark.parametrize("wide", ["", WIDE])
    def test_numbers_no_double_holds_are_refused(self, text, wide):
        with pytest.raises(protocol.WireError):
            protocol.loads(text[:-1] + wide + "}")


class TestDepth:
    def nested(self, depth: int) -> str:
        return "[" * depth + "]" * depth

    @pytest.mark.parametrize("wide", ["", TestWireRules.WIDE])
    def test_data_nests_at_most_32_deep(self, wide):
        at_limit = '{"type":"publish","topic":"t","data":%s%s}' % (self.nested(32), wide)
        assert isinstance(parse(at_limit, MAX), Publish)
        over = '{"type":"publish","topic":"t","data":%s%s,"ref":1}' % (self.nested(33), wide)
        code, ref = error_of(parse(over, MAX))
        assert (code, ref) == ("bad_request", 1) and "32" in parse(over, MAX).message

    @pytest.mark.parametrize("wide", ["", TestWireRules.WIDE])
    @pytest.mark.parametrize("depth", [64, 65, 1000, 100_000])
    def test_a_frame_nests_at_most_64_deep(self, wide, depth):
        text = '{"type":"ping","x":%s%s}' % (self.nested(depth - 1), wide)
        result = parse(text, 10**6)
        if depth <= 64:
            assert result == Ping()
        else:
            assert error_of(result) == ("bad_request", None) and "64" in result.message

    @pytest.mark.parametrize("text, depth", [
        ("1", 0), ("[]", 1), ("[[],[[]]]", 3), ('{"a":{"b":[1]}}', 3),
        ('["[[[[", "]]]]", "\\"[["]', 1), ('{"k\\\\":"[[\\\\"}', 1), ('"[[[["', 0),
    ])
    def test_depth_is_exact_for_valid_json(self, text, depth):
        # The bracket count is the quick bound; the scan only runs past it.
        for limit in (0, 1, 2, 3):
            raw = text.encode()
            assert protocol.nests_deeper_than(raw, limit) == (depth > limit), (text, limit)

    @pytest.mark.parametrize("text", ['"' + "[" * 100, '"\\"' + "[" * 100, "[" * 100 + '"',
                                      '\\' + "[" * 100, '["' + '\\"' * 50 + "[" * 100])
    def test_invalid_text_is_never_counted_shallower_than_a_parser_gets(self, text):
        # Unterminated strings and stray escapes: a parser stops at once, or
        # the scan sees at least the brackets it would walk into.
        with pytest.raises(protocol.WireError):
            protocol.loads(text)


# Server -> client replies: exact JSON


class TestReplies:
    def test_welcome(self):
        assert orjson.loads(protocol.welcome("c1", "alice", 25.0, 1700000000)) == {
            "type": "welcome", "connection": "c1", "user": "alice", "heartbeat": 25.0,
            "expires": 1700000000,
        }

    def test_subscribed(self):
        assert orjson.loads(protocol.subscribed("news", 12, "ep1", True)) == {
            "type": "subscribed", "topic": "news", "seq": 12, "epoch": "ep1", "recovered": True,
        }

    def test_subscribed_not_recovered_with_ref(self):
        assert orjson.loads(protocol.subscribed("news", 0, "ep1", False, "r")) == {
            "type": "subscribed", "topic": "news", "seq": 0, "epoch": "ep1", "recovered": False,
            "ref": "r",
        }

    def test_unsubscribed(self):
        assert orjson.loads(protocol.unsubscribed("news")) == {"type": "unsubscribed", "topic": "news"}
        assert orjson.loads(protocol.unsubscribed("news", 5)) == {
            "type": "unsubscribed", "topic": "news", "ref": 5,
        }

    def test_published(self):
        assert orjson.loads(protocol.published("news", 3, "id1", "p")) == {
            "type": "published", "topic": "news", "seq": 3, "id": "id1", "ref": "p",
        }

    def test_published_ephemeral_has_null_seq(self):
        assert orjson.loads(protocol.published("news", None, "id2")) == {
            "type": "published", "topic": "news", "seq": None, "id": "id2",
        }

    def test_pong(self):
        assert orjson.loads(protocol.pong()) == {"type": "pong"}
        assert orjson.loads(protocol.pong("x")) == {"type": "pong", "ref": "x"}

    def test_authenticated(self):
        assert orjson.loads(protocol.authenticated(1700003600, 2)) == {
            "type": "authenticated", "expires": 1700003600, "ref": 2,
        }

    def test_error(self):
        assert orjson.loads(protocol.error("forbidden", "no", "r")) == {
            "type": "error", "code": "forbidden", "message": "no", "ref": "r",
        }
        assert orjson.loads(protocol.error("bad_request", "frame is not valid JSON")) == {
            "type": "error", "code": "bad_request", "message": "frame is not valid JSON",
        }

    @pytest.mark.parametrize("ref", [0, "", -1, "0"])
    def test_falsy_refs_are_echoed(self, ref):
        assert orjson.loads(protocol.pong(ref))["ref"] == ref
        assert orjson.loads(protocol.error("bad_request", "m", ref))["ref"] == ref

    def test_parsed_ref_round_trips_into_the_reply(self):
        for ref in ("abc", 12):
            parsed = parse(command({"type": "ping", "ref": ref}), MAX)
            assert orjson.loads(protocol.pong(parsed.ref)) == {"type": "pong", "ref": ref}

    def test_protocol_error_payload(self):
        assert orjson.loads(ProtocolError("unknown_type", "what", 7).payload()) == {
            "type": "error", "code": "unknown_type", "message": "what", "ref": 7,
        }

    def test_error_codes_are_the_specs(self):
        assert (protocol.BAD_REQUEST, protocol.UNKNOWN_TYPE, protocol.FORBIDDEN,
                protocol.INVALID_TOPIC, protocol.TOO_LARGE, protocol.RATE_LIMITED,
                protocol.UNAUTHORIZED) == ("bad_request", "unknown_type", "forbidden",
                                           "invalid_topic", "too_large", "rate_limited",
                                           "unauthorized")

    def test_close_codes_are_the_specs(self):
        assert (protocol.CLOSE_NORMAL, protocol.CLOSE_GOING_AWAY, protocol.CLOSE_TOO_LARGE,
                protocol.CLOSE_UNAUTHORIZED, protocol.CLOSE_FORBIDDEN,
                protocol.CLOSE_RATE_LIMITED, protocol.CLOSE_SLOW_CONSUMER,
                protocol.CLOSE_HEARTBEAT_TIMEOUT) == \
            (1000, 1001, 1009, 4001, 4003, 4008, 4009, 4010)


# RFC 6455 section 5.2: base framing protocol


class TestRFC6455Section5_2:
    @pytest.mark.parametrize("length, header", [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f" + struct.pack("!Q", 70000)),
    ])
    def test_text_frame_header(self, length, header):
        payload = bytes(ord("a") + i % 26 for i in range(length))
        frame = text_frame(payload)
        assert frame == header + payload
        assert frame[0] & 0x80, "FIN set: one unfragmented message"
        assert frame[0] & 0x70 == 0, "RSV1-3 clear: no extension (no compression)"
        assert frame[0] & 0x0F == 0x1, "opcode 1: text"
        assert frame[1] & 0x80 == 0, "server frames are never masked"

    def test_payload_is_not_altered(self):
        payload = '{"data":"\u00e9\u2603"}'.encode()
        assert text_frame(payload)[2:] == payload


# The message frame


class TestMessagePayload:
    def test_payload_is_the_spec_message_frame(self):
        message = Message("news.sport", 7, "e1", "0190abcdef01a1b2c3d4e5f6", "2024-05-01T12:00:00.123Z",
                          "goal", b'{"score":[1,0],"who":"\xc3\xa9"}')
        assert orjson.loads(message.payload()) == {
            "type": "message", "topic": "news.sport", "seq": 7, "id": "0190abcdef01a1b2c3d4e5f6",
            "time": "2024-05-01T12:00:00.123Z", "event": "goal",
            "data": {"score": [1, 0], "who": "\u00e9"},
        }

    def test_ephemeral_payload_has_null_seq_and_event(self):
        message = Message("user:bob", None, None, "id", "2024-05-01T12:00:00.000Z", None, b'"hi"')
        assert orjson.loads(message.payload()) == {
            "type": "message", "topic": "user:bob", "seq": None, "id": "id",
            "time": "2024-05-01T12:00:00.000Z", "event": None, "data": "hi",
        }

    @pytest.mark.parametrize("data", [b"null", b"0", b"[]", b"{}", b'""', b"false"])
    def test_any_json_data(self, data):
        message = Message("t", 1, "e1", "id", "2024-05-01T12:00:00.000Z", "e", data)
        assert orjson.loads(message.payload())["data"] == orjson.loads(data)

    def test_event_with_quotes_is_escaped(self):
        message = Message("t", 1, "e1", "id", "2024-05-01T12:00:00.000Z", 'say "hi"\n', b"1")
        assert orjson.loads(message.payload())["event"] == 'say "hi"\n'

    def test_as_dict_matches_payload(self):
        message = Message("t", 3, "e1", "id", "2024-05-01T12:00:00.000Z", None, b'{"a":1}')
        assert orjson.loads(orjson.dumps(message.as_dict())) == \
            {k: v for k, v in orjson.loads(message.payload()).items() if k != "type"}

    def test_time_is_rfc3339_utc(self):
        assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
        assert rfc3339(1714564800.1239) == "2024-05-01T12:00:00.123Z"

    def test_ids_are_unique(self):
        ids = {new_id() for _ in range(1000)}
        assert len(ids) == 1000
        assert all(re.fullmatch(r"[0-9a-f]{24}", i) for i in ids)


class TestSubscribeEpoch:
    def test_subscribe_with_epoch(self):
        assert parse(command({"type": "subscribe", "topic": "t", "epoch": "e1", "ref": 2}), MAX) == \
            Subscribe("t", None, "e1", 2)

    @pytest.mark.parametrize("epoch", [5, True, ["e"], {}, "", "x" * 101])
    def test_subscribe_epoch_must_be_a_short_string(self, epoch):
        body = {"type": "subscribe", "topic": "t", "epoch": epoch, "ref": "s"}
        assert error_of(parse(command(body), MAX)) == ("bad_request", "s")

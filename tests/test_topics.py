"""Topic names, patterns, matching and personal topics (pure functions)."""

from __future__ import annotations

import pytest

from notifier.topics import (
    is_valid_pattern, is_valid_topic, is_valid_user, matches, owner_of, personal_topic,
)

ALLOWED = "ABCXYZabcxyz0189_-:@"


class TestTopicNames:
    @pytest.mark.parametrize("topic", [
        "a", "news", "news.sport", "a.b.c.d", "user:alice", "user:alice@example.com",
        "chat_room-1", "A-Z.a-z.0-9", ALLOWED, "a" * 200, ".".join(["ab"] * 66) + ".x",
        "x:y:z", "@", "-", "_", ":",
    ])
    def test_valid(self, topic):
        assert len(topic) <= 200
        assert is_valid_topic(topic) is True

    @pytest.mark.parametrize("topic", [
        "", "a" * 201, ".", "..", ".a", "a.", "a..b", "a b", " a", "a ", "a/b", "a#b", "a*",
        "*", ">", "news.*", "news.>", "a,b", "a\nb", "a\tb", "caf\u00e9", "\u0661", "a$",
        "a+b", "a!b", "a'b", 'a"b', "a\\b", "a\x00b", "\uff41",
    ])
    def test_invalid(self, topic):
        assert is_valid_topic(topic) is False

    def test_length_limit_is_200_characters_including_dots(self):
        assert is_valid_topic("a." * 99 + "aa") is True    # 200
        assert is_valid_topic("a." * 100 + "a") is False   # 201

    @pytest.mark.parametrize("value", [None, 5, b"news", ["news"]])
    def test_non_strings_are_not_topics(self, value):
        assert is_valid_topic(value) is False


class TestPatterns:
    @pytest.mark.parametrize("pattern", [
        "news", "news.sport", "*", ">", "news.*", "news.>", "*.sport", "a.*.c", "*.*",
        "*.>", "user:alice.>", "a" * 200,
    ])
    def test_valid(self, pattern):
        assert is_valid_pattern(pattern) is True

    @pytest.mark.parametrize("pattern", [
        "", ">.a", "a.>.b", ">.>", "news*", "news.sp*", "news.>>", "news.**", "a..b", "a.",
        ".>", "news. >", "a" * 201, "x" * 199 + ".>", "a/b",
    ])
    def test_invalid(self, pattern):
        assert is_valid_pattern(pattern) is False

    @pytest.mark.parametrize("value", [None, 1, [">"]])
    def test_non_strings_are_not_patterns(self, value):
        assert is_valid_pattern(value) is False


class TestMatching:
    @pytest.mark.parametrize("pattern, topic, expected", [
        # exact
        ("news", "news", True),
        ("news", "news.sport", False),
        ("news.sport", "news", False),
        ("news.sport", "news.sports", False),
        ("news.sport", "News.sport", False),
        # * is exactly one segment
        ("news.*", "news.sport", True),
        ("news.*", "news", False),
        ("news.*", "news.sport.live", False),
        ("*", "news", True),
        ("*", "news.sport", False),
        ("*.sport", "news.sport", True),
        ("*.sport", "sport", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.*.c", "a.b.b.c", False),
        ("*.*", "a.b", True),
        ("*.*", "a", False),
        # > is one or more trailing segments
        ("news.>", "news.sport", True),
        ("news.>", "news.sport.live.score", True),
        ("news.>", "news", False),
        ("news.>", "newsroom.a", False),
        (">", "news", True),
        (">", "a.b.c", True),
        ("*.>", "a.b", True),
        ("*.>", "a", False),
        ("user:alice.>", "user:alice.inbox", True),
        ("user:alice.>", "user:alice", False),
    ])
    def test_matches(self, pattern, topic, expected):
        assert matches(pattern, topic) is expected


class TestPersonalTopics:
    def test_personal_topic(self):
        assert personal_topic("alice") == "user:alice"

    @pytest.mark.parametrize("topic, owner", [
        ("user:alice", "alice"),
        ("user:a.b", "a.b"),
        ("user:bob@example", "bob@example"),
        ("user:a:b", "a:b"),
        ("news", None),
        ("news.user:alice", None),
        ("users:alice", None),
        ("User:alice", None),
        ("xuser:alice", None),
    ])
    def test_owner_of(self, topic, owner):
        assert owner_of(topic) == owner

    @pytest.mark.parametrize("user", ["alice", "Bob_2", "bob@example.com", "a-b", "x:y",
                                      "1", "u" * 195])
    def test_valid_users(self, user):
        assert is_valid_user(user) is True

    @pytest.mark.parametrize("user", ["", "has space", "a/b", "caf\u00e9", "u" * 196, "a.",
                                      "a..b", "*", ">", None, 5, ["alice"]])
    def test_invalid_users(self, user):
        assert is_valid_user(user) is False

    @pytest.mark.parametrize("user", ["alice", "bob@example.com", "x:y", "a.b", "alice.inbox",
                                      "u" * 195])
    def test_a_valid_users_personal_topic_is_owned_by_that_user(self, user):
        # SPEC: "user:<id>" is the personal topic of user <id>, only that user
        # may subscribe to it. So any sub accepted as a user must own exactly
        # its own personal topic (or be refused as a user).
        if is_valid_user(user):
            assert owner_of(personal_topic(user)) == user

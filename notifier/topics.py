"""Topic names and the patterns that grant access to them.

A topic is 1 to 200 characters of ``A-Z a-z 0-9 _ - . : @`` made of non-empty
dot-separated segments. A pattern is a topic name whose segments may be ``*``
(exactly one segment) or, as the last segment, ``>`` (one or more segments).
``user:<id>`` is the personal topic of user ``<id>``.
"""

from __future__ import annotations

import re
from functools import lru_cache

MAX_TOPIC_LENGTH = 200
PERSONAL_PREFIX = "user:"

_SEGMENT = re.compile(r"[A-Za-z0-9_\-:@]+")
_TOPIC = re.compile(r"[A-Za-z0-9_\-:@]+(?:\.[A-Za-z0-9_\-:@]+)*")


def is_valid_topic(topic: object) -> bool:
    return (
        isinstance(topic, str)
        and 0 < len(topic) <= MAX_TOPIC_LENGTH
        and _TOPIC.fullmatch(topic) is not None
    )


def is_valid_pattern(pattern: object) -> bool:
    if not isinstance(pattern, str) or not 0 < len(pattern) <= MAX_TOPIC_LENGTH:
        return False
    segments = pattern.split(".")
    for index, segment in enumerate(segments):
        if segment == ">" and index == len(segments) - 1:
            continue
        if segment != "*" and not _SEGMENT.fullmatch(segment):
            return False
    return True


def personal_topic(user: str) -> str:
    return PERSONAL_PREFIX + user


def is_valid_user(user: object) -> bool:
    """A user id is valid when its personal topic is a valid topic name."""
    return isinstance(user, str) and bool(user) and is_valid_topic(personal_topic(user))


def owner_of(topic: str) -> str | None:
    """The user whose personal topic this is, else None.

    Every topic starting ``user:`` is someone's: ``user:a.b`` belongs to the
    user ``a.b``, not to ``a``, so no id can reach into another's topic.
    """
    if not topic.startswith(PERSONAL_PREFIX):
        return None
    return topic[len(PERSONAL_PREFIX):]


@lru_cache(maxsize=4096)
def _segments(pattern: str) -> tuple[str, ...]:
    return tuple(pattern.split("."))


def matches(pattern: str, topic: str) -> bool:
    """True when ``topic`` is matched by ``pattern`` (both assumed valid)."""
    wanted = _segments(pattern)
    actual = topic.split(".")
    for index, segment in enumerate(wanted):
        if segment == ">":
            return len(actual) > index
        if index >= len(actual):
            return False
        if segment != "*" and segment != actual[index]:
            return False
    return len(actual) == len(wanted)


def matches_any(patterns: tuple[str, ...], topic: str) -> bool:
    return any(matches(pattern, topic) for pattern in patterns)

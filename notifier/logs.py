"""Structured logging: one JSON object per line on stdout, for our events and
for Tornado's and the standard library's loggers alike. Tokens never appear:
a last processor scrubs anything that looks like one.

The level check is a comparison against a module-level number, done before
structlog is touched, so a filtered-out event on a hot path costs next to
nothing; ``configure`` changes level and stream at run time (SIGHUP, tests)."""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import IO

import orjson
import structlog

_SECRET_KEYS = {"token", "authorization", "api_key", "jwt_secret", "password"}
_SECRET_PATTERNS = [
    (re.compile(r"(token=)[^&\s'\"]+"), r"\1[redacted]"),
    (re.compile(r"(Bearer\s+)[^\s'\"]+", re.IGNORECASE), r"\1[redacted]"),
    # A bare JWT (three base64url parts) anywhere in text.
    (re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+"), "[redacted]"),
]

_level = logging.INFO
_level_name = "info"


class _Output:
    """The stream log lines go to, swappable after loggers were created.
    Each line leaves in one write: print() hands over the text and its
    newline separately, and several processes (``--workers``) may share the
    stream, where two writes could interleave with another's line."""

    stream: IO[str] = sys.stdout
    _pending = threading.local()

    def write(self, text: str) -> int:
        pending = getattr(self._pending, "parts", None)
        if pending is None:
            pending = self._pending.parts = []
        pending.append(text)
        return len(text)

    def flush(self) -> None:
        pending = getattr(self._pending, "parts", None)
        if pending:
            self.stream.write("".join(pending))
            pending.clear()
        self.stream.flush()


_output = _Output()


def redact(_logger, _method, event_dict: dict) -> dict:
    for key, value in event_dict.items():
        if key in _SECRET_KEYS:
            event_dict[key] = "[redacted]"
        elif isinstance(value, str):
            for pattern, replacement in _SECRET_PATTERNS:
                value = pattern.sub(replacement, value)
            event_dict[key] = value
    return event_dict


def _render(_logger, _method, event_dict: dict) -> str:
    # Time, level and event first: what a reader scans for.
    ordered = {key: event_dict.pop(key) for key in ("timestamp", "level", "event")
               if key in event_dict}
    ordered.update(event_dict)
    return orjson.dumps(ordered, default=str).decode()


_node: str | None = None


def bind_node(node: str | None) -> None:
    """Name this process's node on every line from now on (several nodes'
    lines meet in one log with Redis and ``--workers``)."""
    global _node
    _node = node


def _add_node(_logger, _method, event_dict: dict) -> dict:
    if _node is not None:
        event_dict.setdefault("node", _node)
    return event_dict


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_node,
    ]


def configure(level: str = "info", stream: IO[str] | None = None) -> None:
    """(Re)configure logging; safe to call again, e.g. on SIGHUP."""
    global _level, _level_name
    _level_name = level.lower()
    _level = logging.getLevelName(level.upper())
    _output.stream = stream or sys.stdout
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.format_exc_info,
            redact,
            _render,
        ],
        logger_factory=structlog.PrintLoggerFactory(_output),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_output)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            _render,
        ],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(_level)
    # Access lines come from our own log_function (without query strings).
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def settings() -> tuple[str, IO[str]]:
    """The level and stream in force, to hand back to ``configure`` later."""
    return _level_name, _output.stream


class Logger:
    __slots__ = ("_logger",)

    def __init__(self, name: str):
        self._logger = structlog.get_logger(name)

    def debug(self, event: str, **fields) -> None:
        if _level <= logging.DEBUG:
            self._logger.debug(event, **fields)

    def info(self, event: str, **fields) -> None:
        if _level <= logging.INFO:
            self._logger.info(event, **fields)

    def warning(self, event: str, **fields) -> None:
        if _level <= logging.WARNING:
            self._logger.warning(event, **fields)

    def error(self, event: str, **fields) -> None:
        if _level <= logging.ERROR:
            self._logger.error(event, **fields)


def get(name: str = "notifier") -> Logger:
    return Logger(name)

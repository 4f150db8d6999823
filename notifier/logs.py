"""Structured logging: one JSON object per line on stdout, for our events and
for Tornado's and the standard library's loggers alike. Tokens and keys never
appear: a last processor scrubs anything that looks like one, in every field
and in every message (request lines included), also when it hides behind
percent-escapes.

The level check is a comparison against a module-level number, done before
structlog is touched, so a filtered-out event on a hot path costs next to
nothing; ``configure`` changes level and stream at run time (SIGHUP, tests)."""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import IO, Iterable
from urllib.parse import unquote

import orjson
import structlog

_SECRET_KEYS = {"token", "authorization", "api_key", "jwt_secret", "password"}
REDACTED = "[redacted]"
_SECRET_PATTERNS = [
    # name=value, as in a query string, for any name a secret goes by.
    (re.compile(r"(?i)((?<![a-z0-9_])(?:access_token|token|api_?key|key|jwt|password|secret"
                r"|authorization)=)[^&\s'\"]+"), r"\1" + REDACTED),
    (re.compile(r"(?i)(bearer\s+)[^\s'\"]+"), r"\1" + REDACTED),
    # A JWT anywhere: three base64url parts, the first a JSON object ("{" and
    # a quote or a space make "ey", "{" and a line break "ew").
    (re.compile(r"e[yw][\w-]{6,}=*\.[\w-]*=*\.[\w-]*=*", re.ASCII), REDACTED),
    # A development API key (notifier.auth.development_credentials).
    (re.compile(r"dev-[\w-]{24}", re.ASCII), REDACTED),
]
# The configured API keys and JWT secret, whatever their shape (``hide``).
_hidden: set[str] = set()
_hidden_pattern: re.Pattern | None = None
# Text that matches none of these holds no secret: most values (topics, ids,
# paths) are let through after this one search.
_SUSPECT = re.compile(r"(?i)=|bearer|e[yw][\w-]{6}|dev-|%")

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


def hide(secrets: Iterable[str]) -> None:
    """Redact these exact strings (API keys, the JWT secret) from every log
    line from now on, as well as anything shaped like a token."""
    global _hidden_pattern
    _hidden.update(secret for secret in secrets if secret)
    if _hidden:
        alternatives = "|".join(re.escape(s) for s in sorted(_hidden, key=len, reverse=True))
        _hidden_pattern = re.compile(alternatives)


def _scrub_plain(text: str) -> str:
    if _hidden_pattern is not None:
        text = _hidden_pattern.sub(REDACTED, text)
    if not _SUSPECT.search(text):
        return text
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def scrub(text: str) -> str:
    """``text`` with every secret replaced by ``[redacted]``. Percent-escapes
    are decoded before matching (Tornado decodes ``?%74oken=`` to a token):
    when the decoded text holds a secret the plain one did not show, the
    decoded text is returned, scrubbed."""
    cleaned = _scrub_plain(text)
    if "%" not in cleaned:
        return cleaned
    decoded = cleaned
    for _ in range(3):  # a few layers of escapes; each one only shortens the text
        unescaped = unquote(decoded, errors="replace")
        if unescaped == decoded:
            break
        decoded = unescaped
    scrubbed = _scrub_plain(decoded)
    return scrubbed if scrubbed != decoded else cleaned


def redact(_logger, _method, event_dict: dict) -> dict:
    for key, value in event_dict.items():
        if key in _SECRET_KEYS:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = scrub(value)
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

    def exception(self, event: str, **fields) -> None:
        """``error`` with the exception being handled, traceback included."""
        if _level <= logging.ERROR:
            self._logger.error(event, exc_info=True, **fields)


def get(name: str = "notifier") -> Logger:
    return Logger(name)

"""Structured logging: one JSON object per line on stdout, for our events and
for Tornado's and the standard library's loggers alike. Tokens never appear:
a last processor scrubs anything that looks like one."""

from __future__ import annotations

import logging
import re
import sys

import orjson
import structlog

_SECRET_KEYS = {"token", "authorization", "api_key", "jwt_secret", "password"}
_SECRET_PATTERNS = [
    (re.compile(r"(token=)[^&\s'\"]+"), r"\1[redacted]"),
    (re.compile(r"(Bearer\s+)[^\s'\"]+", re.IGNORECASE), r"\1[redacted]"),
    # A bare JWT (three base64url parts) anywhere in text.
    (re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+"), "[redacted]"),
]


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


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure(level: str = "info", stream=None) -> None:
    """(Re)configure logging; safe to call again, e.g. on SIGHUP."""
    stream = stream or sys.stdout
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.processors.format_exc_info,
            redact,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
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
    root.setLevel(numeric)
    # Access lines come from our own log_function (without query strings).
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


def get(name: str = "notifier"):
    return structlog.get_logger(name)

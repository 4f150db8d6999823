"""Configuration: a TOML file, then ``NOTIFIER_<SECTION>_<KEY>`` environment
overrides, then validation. Every setting has one default here, one field,
one environment variable and one documented line in ``config/notifier.toml``.

Anything wrong raises ``ConfigError`` whose message is one line naming the key.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

import jwt.algorithms

ENV_PREFIX = "NOTIFIER_"


class ConfigError(Exception):
    """Bad configuration; ``str()`` is a single line naming the key."""


# Field kinds, stored in dataclass metadata: how a TOML or env value is read.
STR, INT, FLOAT, BOOL, LIST, DURATION, SIZE = "str", "int", "float", "bool", "list", "duration", "size"


def _f(kind: str, default: Any):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"kind": kind})
    return field(default=default, metadata={"kind": kind})


@dataclass
class ServerConfig:
    host: str = _f(STR, "127.0.0.1")
    port: int = _f(INT, 8765)
    allowed_origins: list[str] = _f(LIST, [])
    drain_timeout: float = _f(DURATION, 10.0)
    xheaders: bool = _f(BOOL, False)
    compression: bool = _f(BOOL, False)
    demo_page: bool = _f(BOOL, True)


@dataclass
class AuthConfig:
    jwt_secret: str = _f(STR, "")
    jwt_algorithms: list[str] = _f(LIST, ["HS256"])
    jwt_public_key_file: str = _f(STR, "")
    jwks_url: str = _f(STR, "")
    jwks_refresh_interval: float = _f(DURATION, 3600.0)
    jwks_min_fetch_interval: float = _f(DURATION, 30.0)
    audience: str = _f(STR, "")
    issuer: str = _f(STR, "")
    api_keys: list[str] = _f(LIST, [])


@dataclass
class StoreConfig:
    backend: str = _f(STR, "sqlite")
    path: str = _f(STR, "")
    redis_url: str = _f(STR, "redis://127.0.0.1:6379/0")


@dataclass
class RetentionConfig:
    max_messages: int = _f(INT, 10000)
    max_age: float = _f(DURATION, 7 * 86400.0)


@dataclass
class HeartbeatConfig:
    interval: float = _f(DURATION, 25.0)
    timeout: float = _f(DURATION, 10.0)


@dataclass
class LimitsConfig:
    max_message_bytes: int = _f(SIZE, 64 * 1024)
    max_body_bytes: int = _f(SIZE, 1024 * 1024)
    max_buffered_bytes: int = _f(SIZE, 1024 * 1024)
    commands_per_second: float = _f(FLOAT, 100.0)
    commands_burst: int = _f(INT, 200)
    publishes_per_second: float = _f(FLOAT, 0.0)
    max_connections: int = _f(INT, 0)
    max_connecting: int = _f(INT, 10000)
    connections_per_user: int = _f(INT, 100)
    subscriptions_per_connection: int = _f(INT, 200)
    handshake_timeout: float = _f(DURATION, 10.0)


@dataclass
class LogConfig:
    level: str = _f(STR, "info")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)


_SECTIONS = {f.name: f.type for f in fields(Config)}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
               "gb": 1000**3, "gib": 1024**3}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``250ms``, ``30s``, ``7d``, ``1h30m``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value))
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            return _finite(float(text))
        except ValueError:
            pass
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", text)
        if parts and re.fullmatch(r"(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w)\s*)+", text):
            return sum(float(n) * _DURATION_UNITS[unit] for n, unit in parts)
    raise ValueError(f"expected a duration like 30s, 10m, 7d, got {value!r}")


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like ``64KiB``, ``1MiB``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ValueError(f"expected a size like 65536, 64KiB or 1MiB, got {value!r}")


def _convert(kind: str, value: Any, from_env: bool) -> Any:
    if kind == STR:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if kind == INT:
        if from_env:
            value = int(value.strip()) if re.fullmatch(r"\s*-?\d+\s*", value) else value
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if kind == FLOAT:
        if from_env:
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return _finite(float(value))
    if kind == BOOL:
        if from_env:
            lowered = value.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind == LIST:
        if from_env:
            return [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"expected a list of strings, got {value!r}")
        return value
    if kind == DURATION:
        return parse_duration(value)
    if kind == SIZE:
        return parse_size(value)
    raise AssertionError(kind)


def _apply(section_obj: Any, section: str, key: str, value: Any, from_env: bool, origin: str):
    known = {f.name: f for f in fields(section_obj)}
    if key not in known:
        raise ConfigError(f"{origin}: unknown key {section}.{key}")
    try:
        setattr(section_obj, key, _convert(known[key].metadata["kind"], value, from_env))
    except ValueError as exc:
        raise ConfigError(f"{origin}: {section}.{key}: {exc}") from None


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides, validate."""
    env = os.environ if env is None else env
    config = Config()
    if path is not None:
        try:
            with open(path, "rb") as handle:
                document = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, values in document.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}]")
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            for key, value in values.items():
                _apply(getattr(config, section), section, key, value, False, str(path))
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("_")
        if section not in _SECTIONS or not key:
            raise ConfigError(f"environment: {name} names no config key")
        _apply(getattr(config, section), section, key, value, True, f"environment {name}")
    validate(config)
    return config


def validate(config: Config) -> None:
    def bad(key: str, why: str):
        raise ConfigError(f"{key}: {why}")

    if not 0 <= config.server.port <= 65535:
        bad("server.port", f"{config.server.port} is not a port number")
    if config.server.drain_timeout < 0:
        bad("server.drain_timeout", "must not be negative")
    algorithms = config.auth.jwt_algorithms
    if not algorithms:
        bad("auth.jwt_algorithms", "must name at least one algorithm")
    supported = jwt.algorithms.get_default_algorithms()
    for algorithm in algorithms:
        if algorithm not in supported or algorithm == "none":
            bad("auth.jwt_algorithms", f"unsupported algorithm {algorithm!r}")
    symmetric = [a for a in algorithms if a.startswith("HS")]
    if symmetric and len(symmetric) != len(algorithms):
        bad("auth.jwt_algorithms", "do not mix HS* with public-key algorithms")
    if symmetric and config.auth.jwt_public_key_file:
        bad("auth.jwt_public_key_file", "is for RS*/ES* algorithms; HS* tokens use auth.jwt_secret")
    jwks_url = config.auth.jwks_url
    if jwks_url:
        if not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", jwks_url):
            bad("auth.jwks_url", f"{jwks_url!r} is not an http(s) URL")
        if symmetric:
            bad("auth.jwks_url", "needs public-key auth.jwt_algorithms (e.g. RS256, ES256), "
                f"not {', '.join(symmetric)}")
        if config.auth.jwt_public_key_file:
            bad("auth.jwt_public_key_file", "give either it or auth.jwks_url, not both")
        if config.auth.jwt_secret:
            bad("auth.jwt_secret", "is not used with auth.jwks_url; leave it empty")
    if config.auth.jwks_refresh_interval <= 0:
        bad("auth.jwks_refresh_interval", "must be positive")
    if config.auth.jwks_min_fetch_interval <= 0:
        bad("auth.jwks_min_fetch_interval", "must be positive")
    if not symmetric and not config.auth.jwt_public_key_file and not jwks_url:
        bad("auth.jwt_public_key_file", f"required for {', '.join(algorithms)} "
            "(or set auth.jwks_url)")
    if config.auth.jwt_public_key_file and not Path(config.auth.jwt_public_key_file).is_file():
        bad("auth.jwt_public_key_file", f"no such file {config.auth.jwt_public_key_file}")
    if config.auth.jwt_secret and len(config.auth.jwt_secret) < 32:
        bad("auth.jwt_secret", "must be at least 32 characters")
    if config.store.backend not in ("sqlite", "redis"):
        bad("store.backend", f"must be 'sqlite' or 'redis', not {config.store.backend!r}")
    if config.store.backend == "redis" and urlsplit(config.store.redis_url).scheme not in (
            "redis", "rediss", "unix"):
        bad("store.redis_url", f"{redact_url(config.store.redis_url)!r} is not a redis://, "
            "rediss:// or unix:// URL")
    if config.retention.max_messages < 1:
        bad("retention.max_messages", "must be at least 1")
    if config.retention.max_age <= 0:
        bad("retention.max_age", "must be positive")
    if config.heartbeat.interval <= 0:
        bad("heartbeat.interval", "must be positive")
    if config.heartbeat.timeout <= 0:
        bad("heartbeat.timeout", "must be positive")
    for key in ("max_message_bytes", "max_body_bytes", "max_buffered_bytes"):
        if getattr(config.limits, key) < 1:
            bad(f"limits.{key}", "must be positive")
    if config.limits.commands_per_second <= 0:
        bad("limits.commands_per_second", "must be positive")
    if config.limits.commands_burst < 1:
        bad("limits.commands_burst", "must be at least 1")
    if config.limits.publishes_per_second < 0:
        bad("limits.publishes_per_second", "must not be negative (0 means unlimited)")
    for key in ("max_connections", "max_connecting", "connections_per_user",
                "subscriptions_per_connection"):
        if getattr(config.limits, key) < 0:
            bad(f"limits.{key}", "must not be negative (0 means unlimited)")
    if config.limits.handshake_timeout <= 0:
        bad("limits.handshake_timeout", "must be positive")
    if config.log.level.lower() not in LOG_LEVELS:
        bad("log.level", f"must be one of {', '.join(LOG_LEVELS)}")
    config.log.level = config.log.level.lower()
    for origin in config.server.allowed_origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            bad("server.allowed_origins", f"{origin!r} is not an origin like https://example.com")
    for key in config.auth.api_keys:
        if len(key) < 8:
            bad("auth.api_keys", "every key must be at least 8 characters")


def require_api_keys(config: Config) -> None:
    """What serving needs beyond a valid config: API keys. Only development
    credentials (HS* and no secret) make up a key of their own; with a
    secret, a public key or a JWKS of one's own and no key, every HTTP API
    call would get 401. The other subcommands (token, subscribe) need none."""
    auth = config.auth
    if auth.api_keys:
        return
    configured = ("auth.jwt_secret" if auth.jwt_secret else "auth.jwt_public_key_file"
                  if auth.jwt_public_key_file else "auth.jwks_url" if auth.jwks_url else None)
    if configured:
        raise ConfigError(f"auth.api_keys: is empty while {configured} is set, so every HTTP "
                          "API call would get 401; list at least one key")


def canonical_origin(origin: str) -> str:
    """``scheme://host[:port]`` the way browsers send ``Origin``: lowercase,
    no default port, no trailing slash. Allow-list entries and the request's
    header are compared in this form, so ``https://App.example.com:443/``
    in the config matches what a browser sends."""
    parts = urlsplit(origin.strip().rstrip("/"))
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    default_port = {"http": ":80", "https": ":443"}.get(scheme)
    if default_port and netloc.endswith(default_port):
        netloc = netloc[:-len(default_port)]
    return f"{scheme}://{netloc}" if scheme else origin


def redact_url(url: str) -> str:
    """``url`` with any password it carries replaced, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def state_directory(env: Mapping[str, str] | None = None) -> Path:
    """Where the embedded store lives: systemd's StateDirectory, else ./var."""
    env = os.environ if env is None else env
    # systemd may pass several colon-separated directories; the first is ours.
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(state) if state else Path("var")


def with_overrides(config: Config, **server: Any) -> Config:
    """A copy with command-line values (host, port) replacing the config's."""
    given = {key: value for key, value in server.items() if value is not None}
    return replace(config, server=replace(config.server, **given)) if given else config


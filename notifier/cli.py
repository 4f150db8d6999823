"""The ``notifier`` command: serve, token, publish, subscribe."""

from __future__ import annotations

import argparse
import asyncio
import sys
from urllib.parse import quote

import orjson

from notifier import config as config_module
from notifier.auth import mint_token
from notifier.config import Config, ConfigError, parse_duration
from notifier.topics import is_valid_pattern, is_valid_topic, is_valid_user, owner_of, personal_topic


def _fail(message: str) -> int:
    print(f"notifier: {message}", file=sys.stderr)
    return 2


def _patterns(text: str | None) -> list[str]:
    patterns = [p.strip() for p in (text or "").split(",") if p.strip()]
    for pattern in patterns:
        if not is_valid_pattern(pattern):
            raise ValueError(f"invalid topic pattern {pattern!r}")
    return patterns


def _secret_for_cli(config: Config) -> tuple[str, str]:
    """(secret, algorithm) to mint with: the configured secret, else the
    development one the server generated."""
    from notifier.server import resolve_secrets

    symmetric = [a for a in config.auth.jwt_algorithms if a.startswith("HS")]
    if not symmetric:
        raise ValueError("tokens for RS256/ES256 are signed with your private key, "
                         "not by notifier")
    resolve_secrets(config)
    return config.auth.jwt_secret, symmetric[0]


def _base_url(config: Config, url: str | None) -> str:
    if url:
        return url.rstrip("/")
    host = config.server.host
    host = "127.0.0.1" if host in ("", "0.0.0.0") else f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.server.port}"


def cmd_serve(args, config: Config) -> int:
    from notifier.server import serve

    config = config_module.with_overrides(config, host=args.host, port=args.port)
    if args.workers < 1:
        return _fail("--workers must be at least 1")
    if args.workers > 1:
        if config.store.backend != "redis":
            return _fail("--workers above 1 needs store.backend = \"redis\": the SQLite "
                         "store is one file with one writer, for one process")
        from notifier.workers import supervise

        return supervise(config, args.config, args.workers)
    return serve(config, args.config, args.worker_fd)


def cmd_token(args, config: Config) -> int:
    if not is_valid_user(args.user):
        return _fail(f"--user {args.user!r} is not usable in a topic name")
    try:
        topics, publish = _patterns(args.topics), _patterns(args.publish)
        ttl = parse_duration(args.ttl)
        secret, algorithm = _secret_for_cli(config)
    except ValueError as exc:
        return _fail(str(exc))
    print(mint_token(secret, algorithm, args.user, topics, publish, ttl,
                     config.auth.audience, config.auth.issuer))
    return 0


def cmd_publish(args, config: Config) -> int:
    from tornado.httpclient import HTTPClient, HTTPClientError

    from notifier.server import resolve_secrets

    if not is_valid_topic(args.topic):
        return _fail(f"invalid topic name {args.topic!r}")
    resolve_secrets(config)
    if not config.auth.api_keys:
        return _fail("no API key: set auth.api_keys (or NOTIFIER_AUTH_API_KEYS)")
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError:
        data = args.data  # plain text is published as a JSON string
    body = {"topic": args.topic, "data": data}
    if args.event:
        body["event"] = args.event
    client = HTTPClient()
    try:
        response = client.fetch(
            _base_url(config, args.url) + "/api/publish", method="POST",
            headers={"Authorization": f"Bearer {config.auth.api_keys[0]}",
                     "Content-Type": "application/json"},
            body=orjson.dumps(body))
    except HTTPClientError as exc:
        detail = exc.response.body.decode() if exc.response is not None else str(exc)
        return _fail(f"publish refused ({exc.code}): {detail}")
    except OSError as exc:
        return _fail(f"cannot reach the server: {exc}")
    finally:
        client.close()
    print(response.body.decode())
    return 0


async def _subscribe(url: str, topics: list[str], since: int | None, personal: str) -> int:
    from tornado.websocket import websocket_connect

    connection = await websocket_connect(url)
    for topic in topics:
        if topic == personal and since is None:
            continue  # the server subscribes it on connect, from the stored cursor
        command = {"type": "subscribe", "topic": topic}
        if since is not None:
            command["since"] = since
        await connection.write_message(orjson.dumps(command).decode())
    while True:
        frame = await connection.read_message()
        if frame is None:
            print(f"notifier: connection closed ({connection.close_code} "
                  f"{connection.close_reason or ''})".rstrip() + ")", file=sys.stderr)
            return 0 if connection.close_code in (1000, 1001) else 1
        print(frame, flush=True)


def cmd_subscribe(args, config: Config) -> int:
    for topic in args.topics:
        if not is_valid_topic(topic):
            return _fail(f"invalid topic name {topic!r}")
    try:
        secret, algorithm = _secret_for_cli(config)
    except ValueError as exc:
        return _fail(str(exc))
    owners = [owner_of(topic) for topic in args.topics if owner_of(topic)]
    user = args.user or (owners[0] if owners else "cli")
    token = mint_token(secret, algorithm, user, args.topics, [], 24 * 3600,
                       config.auth.audience, config.auth.issuer)
    url = _base_url(config, args.url).replace("http", "ws", 1) + "/ws?token=" + quote(token)
    try:
        return asyncio.run(_subscribe(url, args.topics, args.since, personal_topic(user)))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        return _fail(f"cannot reach the server: {exc}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notifier", description="Realtime notification service")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", help="TOML config file (default: built-in defaults)")
        return sub

    serve = add("serve", "run the service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes sharing the port (needs the Redis backend)")
    # Set by the supervisor of --workers for each worker: its report pipe.
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(run=cmd_serve)

    token = add("token", "mint a JWT from the configured secret")
    token.add_argument("--user", required=True)
    token.add_argument("--topics", help="comma-separated patterns the user may subscribe to")
    token.add_argument("--publish", help="comma-separated patterns the user may publish to")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 1h, 7d (default 1h)")
    token.set_defaults(run=cmd_token)

    publish = add("publish", "publish one message to a running service")
    publish.add_argument("topic")
    publish.add_argument("data", help="JSON, or plain text sent as a JSON string")
    publish.add_argument("--event")
    publish.add_argument("--url", help="server URL (default: from config)")
    publish.set_defaults(run=cmd_publish)

    subscribe = add("subscribe", "print messages of topics as they arrive (tail -f)")
    subscribe.add_argument("topics", nargs="+")
    subscribe.add_argument("--since", type=int)
    subscribe.add_argument("--user", help="whose token to mint (default: the owner of a "
                           "user:<id> topic given, else 'cli')")
    subscribe.add_argument("--url", help="server URL (default: from config)")
    subscribe.set_defaults(run=cmd_subscribe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_module.load(args.config)
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        return args.run(args, config)
    except ConfigError as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())

"""The ``notifier`` command: serve, token, publish, subscribe."""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson

from notifier import config as config_module
from notifier.auth import mint_token
from notifier.config import Config, ConfigError, parse_duration
from notifier.topics import is_valid_pattern, is_valid_topic, is_valid_user, owner_of

SUBSCRIBE_TOKEN_TTL = 3600  # seconds; the client refreshes it before it runs out


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
    config_module.require_api_keys(config)
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
    from notifier.client import APIError, Client, Unreachable
    from notifier.server import resolve_secrets

    if not is_valid_topic(args.topic):
        return _fail(f"invalid topic name {args.topic!r}")
    try:
        retry_for = parse_duration(args.retry_for)
    except ValueError as exc:
        return _fail(f"--retry-for: {exc}")
    resolve_secrets(config)
    if not config.auth.api_keys:
        return _fail("no API key: set auth.api_keys (or NOTIFIER_AUTH_API_KEYS)")
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError:
        data = args.data  # plain text is published as a JSON string

    async def publish():
        async with Client(_base_url(config, args.url), api_key=config.auth.api_keys[0],
                          retry_for=retry_for) as client:
            return await client.publish(args.topic, data=data, event=args.event)

    try:
        published = asyncio.run(publish())
    except APIError as exc:
        return _fail(f"publish refused ({exc.status} {exc.code}): {exc.message}")
    except Unreachable as exc:
        return _fail(f"cannot reach the server: {exc.__cause__ or exc}")
    print(orjson.dumps(published.as_dict()).decode())
    return 0


def _report(event) -> None:
    """State changes of ``notifier subscribe``, one line each on stderr."""
    from notifier.client import Connected, Disconnected, Subscribed

    if isinstance(event, Connected):
        line = f"connected as {event.user} (connection {event.connection})"
    elif isinstance(event, Subscribed):
        line = (f"subscribed {event.topic} at seq {event.seq} (epoch {event.epoch}"
                f"{'' if event.recovered else ', not recovered: older messages were dropped'})")
    elif isinstance(event, Disconnected):
        cause = " ".join(str(part) for part in (event.code, event.reason) if part is not None)
        line = f"disconnected ({cause or 'no reason'}); reconnecting in {event.retry_in:.1f} s"
    else:
        return
    print(f"notifier: {line}", file=sys.stderr, flush=True)


async def _subscribe(base_url: str, token, topics: list[str], since: int | None, ack: bool) -> int:
    """Print messages until SIGINT or SIGTERM (exit 0), or a refusal that
    reconnecting cannot fix (exit 1)."""
    import signal

    from notifier.client import Client, NotifierError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with Client(base_url, token=token) as client:
        async def follow() -> None:
            async for message in client.subscribe(topics, since=since, on_event=_report):
                print(orjson.dumps(message.as_dict()).decode(), flush=True)
                if ack:
                    await client.ack(message)

        following = asyncio.ensure_future(follow())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([following, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not following.done():
            await client.close()  # acks still waiting are sent, the socket closes normally
        try:
            await following
        except NotifierError as exc:
            print(f"notifier: {exc}", file=sys.stderr)
            return 1
    return 0


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

    def token() -> str:
        # A new one for every connection, and for the client's refresh
        # before it expires.
        return mint_token(secret, algorithm, user, args.topics, [], SUBSCRIBE_TOKEN_TTL,
                          config.auth.audience, config.auth.issuer)

    try:
        return asyncio.run(_subscribe(_base_url(config, args.url), token, args.topics,
                                      args.since, args.ack))
    except KeyboardInterrupt:  # before the handlers were in place
        return 0


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
    publish.add_argument("--retry-for", default="10s",
                         help="keep retrying a server that is down or restarting this long "
                              "(default 10s; 0: try once)")
    publish.set_defaults(run=cmd_publish)

    subscribe = add("subscribe", "print messages of topics as they arrive (tail -f)")
    subscribe.add_argument("topics", nargs="+")
    subscribe.add_argument("--since", type=int)
    subscribe.add_argument("--user", help="whose token to mint (default: the owner of a "
                           "user:<id> topic given, else 'cli')")
    subscribe.add_argument("--url", help="server URL (default: from config)")
    subscribe.add_argument("--ack", action="store_true",
                           help="ack each message once printed (moves the user's stored cursor)")
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

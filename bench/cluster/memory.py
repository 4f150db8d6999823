"""The figures docs/scaling.md builds on.

- Idle connections: --memory-connections clients, each its own user (a
  token each, signed here with the benchmark's secret), each subscribed to
  the same topic, connected to a fresh SQLite node and to a fresh Redis node
  (a redis-server of its own): the node's RSS growth per connection, and on
  the Redis node what Redis holds for them (INFO memory's used_memory and
  the key count): presence records and each user's personal topic, whose
  epoch the connect's resume creates.
- Redis memory per stored thing, on another fresh Redis node: topics with
  one message each and messages in one topic, published through notifier's
  HTTP API (batches of 1,000, 100-byte data as in the publish test), the
  same with an idempotency key each (kept 24 h), and cursors, written
  straight into Redis in notifier's format (``<seq> <epoch>`` in the
  topic's cursors hash: redis_format.py) for many users of one topic and
  one user of each of many topics."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import jwt

from bench.common.clients import Hub, RawSub
from bench.common.proc import proc_tree
from bench.common.redis_server import RedisServer
from bench.common.run import log
from bench.common.servers import JWT_SECRET, LIFTED_LIMITS, TOPIC, Server, http

SETTLE = 2.0  # seconds for presence to be written (every 0.1 s) and RSS to settle
EPOCH = "0123456789abcdef"  # an epoch as notifier makes them: 16 hex digits


def user_token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 6 * 3600, "topics": [TOPIC]}, JWT_SECRET,
                      algorithm="HS256")


async def connect_users(server: Server, hub: Hub, first: int, count: int, source_ips: list[str],
                        concurrency: int = 100) -> list[RawSub]:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    subs: list[RawSub] = []
    host = f"127.0.0.1:{server.port}"

    async def one(i: int) -> None:
        async with sem:
            _, sub = await loop.create_connection(
                lambda: RawSub(hub, i, host, user_token(f"u{i}")), "127.0.0.1", server.port,
                local_addr=(source_ips[i % len(source_ips)], 0))
            await asyncio.wait_for(sub.ready, 60)
            subs.append(sub)

    await asyncio.gather(*(one(first + i) for i in range(count)))
    return subs


async def idle_connections(backend: str, args: argparse.Namespace, workdir: Path) -> dict:
    redis = RedisServer(f"redis-memory-{backend}", workdir, core=args.redis_core) if backend == "redis" else None
    server = None
    try:
        env = dict(LIFTED_LIMITS)
        if redis is not None:
            redis.start()
            env.update(redis.env())
        server = Server(f"notifier@memory-{backend}", workdir, core=args.server_core, notifier=args.notifier,
                        env=env)
        server.start()
        await server.wait_ready()
        hub = Hub()
        warm = await connect_users(server, hub, 0, 100, args.source_ip_list)
        await asyncio.sleep(SETTLE)
        server.pids = proc_tree(server.proc.pid)
        rss0, cpu0 = server.rss(), server.cpu()
        used0 = redis.used_memory() if redis else 0
        keys0 = redis.keys() if redis else 0
        redis_cpu0 = redis.cpu() if redis else 0.0
        t0 = time.monotonic()
        n = args.memory_connections
        subs = await connect_users(server, hub, 100, n, args.source_ip_list)
        connect_s = time.monotonic() - t0
        cpu1 = server.cpu()
        redis_cpu1 = redis.cpu() if redis else 0.0
        await asyncio.sleep(SETTLE)
        rss1 = server.rss()
        result = {"backend": backend, "connections": n, "rss_before_mib": rss0 / 2**20, "rss_after_mib": rss1 / 2**20,
                  "kib_per_connection": (rss1 - rss0) / n / 1024, "connect_s": connect_s,
                  "notifier_cpu_ms_per_connection": 1e3 * (cpu1 - cpu0) / n, "closed": len(hub.closes)}
        if redis is not None:
            used1, keys1 = redis.used_memory(), redis.keys()
            result.update(redis_bytes_per_connection=(used1 - used0) / n, redis_keys_per_connection=(keys1 - keys0) / n,
                          redis_cpu_ms_per_connection=1e3 * (redis_cpu1 - redis_cpu0) / n,
                          redis_used_mib=used1 / 2**20)
        log(f"  memory, {backend} node: {n:,} idle connections, RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB, "
            f"{result['kib_per_connection']:.1f} KiB per connection, connected in {connect_s:.1f} s"
            + (f"; Redis {result['redis_bytes_per_connection']:.0f} bytes and "
               f"{result['redis_keys_per_connection']:.2f} keys per connection" if redis else ""))
        for s in subs + warm:
            s.close()
        return result
    finally:
        if server is not None:
            server.stop()
        if redis is not None:
            redis.stop()


def _batch(port: int, messages: list[dict]) -> None:
    status, body = http("POST", f"http://127.0.0.1:{port}/api/publish/batch", json.dumps({"messages": messages}).encode(),
                        timeout=60)
    if status != 200:
        raise RuntimeError(f"POST /api/publish/batch answered {status}: {body[:300]!r}")


async def stored_things(args: argparse.Namespace, workdir: Path) -> dict:
    redis = RedisServer("redis-memory-data", workdir, core=args.redis_core)
    server = None
    pad = "x" * args.pad
    k = args.memory_topics
    try:
        redis.start()
        server = Server("notifier@memory-data", workdir, core=args.server_core, notifier=args.notifier,
                        env={**LIFTED_LIMITS, **redis.env()})
        server.start()
        await server.wait_listening()
        port = server.port
        out = {"count": k}

        def measure(name: str, write) -> None:
            before_mem, before_keys = redis.used_memory(), redis.keys()
            write()
            after_mem, after_keys = redis.used_memory(), redis.keys()
            out[name] = {"bytes_each": (after_mem - before_mem) / k, "keys_each": (after_keys - before_keys) / k}

        def batches(make) -> None:
            for start in range(0, k, 1000):
                _batch(port, [make(i) for i in range(start, min(k, start + 1000))])

        measure("topic_with_one_message", lambda: batches(
            lambda i: {"topic": f"mem.t{i}", "data": {"n": i, "pad": pad}}))
        measure("message_in_one_topic", lambda: batches(
            lambda i: {"topic": "mem.big", "data": {"n": i, "pad": pad}}))
        measure("message_with_idempotency_key", lambda: batches(
            lambda i: {"topic": "mem.keyed", "data": {"n": i, "pad": pad}, "idempotency_key": f"order-{i:012d}"}))
        client = redis.client()

        def cursors_one_topic() -> None:
            pipe = client.pipeline(transaction=False)
            for i in range(k):
                pipe.hset("notifier:{mem.big}:cursors", f"u{i}", f"{i % 10000 + 1} {EPOCH}")
            pipe.execute()

        def cursors_many_topics() -> None:
            pipe = client.pipeline(transaction=False)
            for i in range(k):
                pipe.hset(f"notifier:{{mem.t{i}}}:cursors", "u1", f"1 {EPOCH}")
            pipe.execute()

        measure("cursor_many_users_one_topic", cursors_one_topic)
        measure("cursor_one_user_per_topic", cursors_many_topics)
        log("  Redis memory per stored thing: " + ", ".join(
            f"{name} {v['bytes_each']:.0f} bytes ({v['keys_each']:.2f} keys)" for name, v in out.items()
            if isinstance(v, dict)))
        return out
    finally:
        if server is not None:
            server.stop()
        redis.stop()


async def memory_test(args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    idle = [await idle_connections(backend, args, dirs["disk"]) for backend in ("sqlite", "redis")]
    return {"idle": idle, "stored": await stored_things(args, dirs["disk"])}


def fmt(result: dict) -> str:
    if "error" in result:
        return f"memory test FAILED: {result['error']}"
    lines = ["| node | idle connections (one user each, one topic) | notifier RSS before / after MiB "
             "| notifier KiB per connection | notifier CPU ms per connection | Redis bytes per connection "
             "| Redis keys per connection | redis-server CPU ms per connection |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in result["idle"]:
        lines.append(f"| notifier on {m['backend']} | {m['connections']:,} | {m['rss_before_mib']:.1f} / "
                     f"{m['rss_after_mib']:.1f} | {m['kib_per_connection']:.1f} "
                     f"| {m['notifier_cpu_ms_per_connection']:.2f} "
                     + (f"| {m['redis_bytes_per_connection']:.0f} | {m['redis_keys_per_connection']:.2f} "
                        f"| {m['redis_cpu_ms_per_connection']:.3f} |" if "redis_bytes_per_connection" in m
                        else "| - | - | - |"))
    s = result["stored"]
    names = {"topic_with_one_message": "a topic with one message (meta hash, log sorted set)",
             "message_in_one_topic": "one more message in a topic's log",
             "message_with_idempotency_key": "a message published with an idempotency key (kept 24 h)",
             "cursor_many_users_one_topic": "a cursor, many users on one topic (one big hash)",
             "cursor_one_user_per_topic": "a cursor, one user on each of many topics (a small hash each)"}
    lines += ["", f"| in Redis ({s['count']:,} of each, used_memory before and after) | bytes each | keys each |",
              "|---|---:|---:|"]
    for key, label in names.items():
        if key in s:
            lines.append(f"| {label} | {s[key]['bytes_each']:.0f} | {s[key]['keys_each']:.2f} |")
    return "\n".join(lines)

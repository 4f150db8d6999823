"""Publish-to-receive latency across nodes: two notifier nodes (A and B) on
one redis-server (AOF always, on a disk), all three pinned to the server
core. ``POST /api/publish`` (durable) goes to node A open loop at
--latency-rate a second over keep-alive connections; --latency-subscribers
picows subscribers on node B parse every message and time it from just
before its request was written (a ``perf_counter_ns`` stamp inside
``data``) to its arrival. The same publishes to node B itself, and to a
SQLite node with as many subscribers, are the references. Rounds alternate
between the three; the percentiles are over every delivery of every round."""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common.clients import Hub, Sub, close_all, connect_subscribers, make_data_template, stamp
from bench.common.proc import OUR_PIDS, others_cpu_delta, user_process_times, wait_quiet
from bench.common.redis_server import RedisServer
from bench.common.run import log
from bench.common.servers import API_KEY, LIFTED_LIMITS, TOPIC, Server
from bench.common.stats import percentile

GOAL_MS = 5.0
CONNECTIONS = 64  # the publisher's keep-alive connections at most


@dataclass
class Variant:
    name: str
    label: str
    publish_to: Server
    hub: Hub
    subs: list[Sub]
    folder: Path  # where the stores are
    lat: list[int] = field(default_factory=list)       # ns, every delivery of every round
    http: list[int] = field(default_factory=list)      # ns, every reply
    rounds: list[dict] = field(default_factory=list)


class Publisher:
    """Open-loop HTTP publisher: each request is written at its time on any
    idle keep-alive connection (a new one while fewer than CONNECTIONS)."""

    def __init__(self, server: Server, payload: int):
        self.server = server
        self.head, self.tail = make_data_template(payload)
        self.pool: asyncio.Queue = asyncio.Queue()
        self.opened = 0
        self.statuses: dict[int, int] = {}
        self.first_error: str | None = None
        self.replies: list[int] = []

    async def _conn(self):
        if self.pool.empty() and self.opened < CONNECTIONS:
            self.opened += 1
            return await asyncio.open_connection("127.0.0.1", self.server.port)
        return await self.pool.get()

    async def one(self) -> None:
        # From the moment the publish was due: time spent waiting for a free
        # connection (the server held every one) counts.
        ts = stamp()
        try:
            reader, writer = await self._conn()
            body = b'{"topic":"%s","data":%s%d%s}' % (TOPIC.encode(), self.head, ts, self.tail)
            writer.write(b"POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (self.server.port, API_KEY.encode(), len(body), body))
            headers = await reader.readuntil(b"\r\n\r\n")
            status = int(headers.split(b" ", 2)[1])
            length = next((int(line.split(b":", 1)[1]) for line in headers.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), 0)
            answer = await reader.readexactly(length) if length else b""
            self.replies.append(stamp() - ts)
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status != 200 and self.first_error is None:
                self.first_error = f"HTTP {status}: {answer[:300]!r}"
            self.pool.put_nowait((reader, writer))
        except Exception as exc:  # noqa: BLE001 - counted and reported
            self.opened -= 1
            self.statuses[-1] = self.statuses.get(-1, 0) + 1
            self.first_error = self.first_error or repr(exc)

    async def paced(self, rate: float, count: int) -> tuple[float, int]:
        """`count` requests, one every 1/`rate` s; (achieved rate, late sends)."""
        tasks, late = [], 0
        t0 = time.perf_counter()
        for k in range(count):
            delay = t0 + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                late += 1
            tasks.append(asyncio.create_task(self.one()))
        spent = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        return (count - 1) / spent if count > 1 and spent else float("nan"), late

    def close(self) -> None:
        while not self.pool.empty():
            self.pool.get_nowait()[1].close()


class FsyncProbe:
    """While a round runs: a thread that appends 4 KiB to a file in the
    store's folder and fdatasyncs it every PROBE_EVERY s, timing each
    fdatasync: a slow disk shows here at the moment it slows the stores."""

    EVERY = 0.02

    def __init__(self, folder: Path):
        self.path = folder / "fsync-probe"
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "FsyncProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while not self._stop.wait(self.EVERY):
                os.write(fd, b"x" * 4096)
                t0 = time.perf_counter()
                os.fdatasync(fd)
                self.times.append((time.perf_counter() - t0) * 1e3)
        finally:
            os.close(fd)

    def summary(self) -> dict:
        t = sorted(self.times)
        return {"count": len(t), "p50_ms": percentile(t, 50), "max_ms": t[-1] if t else float("nan"),
                "over_10ms": sum(1 for x in t if x > 10)}


async def run_variant(v: Variant, args: argparse.Namespace, seconds: float,
                      cpu: dict) -> tuple[dict, list[int], list[int]]:
    count = max(2, int(args.latency_rate * seconds))
    for s in v.subs:
        s.n = 0
    v.hub.lat, v.hub.bad, v.hub.total = [], [], 0
    publisher = Publisher(v.publish_to, args.payload)
    exclude = OUR_PIDS | {os.getpid()}
    others0, cpu0 = user_process_times(exclude), {k: f() for k, f in cpu.items()}
    t0 = time.perf_counter()
    with FsyncProbe(v.folder) as probe:
        achieved, late = await publisher.paced(args.latency_rate, count)
        deadline = time.monotonic() + 10
        while any(s.n < count for s in v.subs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    wall = time.perf_counter() - t0
    others1, cpu1 = user_process_times(exclude), {k: f() for k, f in cpu.items()}
    await asyncio.sleep(0.05)  # duplicates would arrive now
    publisher.close()
    problems = list(v.hub.bad[:3])
    wrong = [s for s in v.subs if s.n != count]
    if wrong:
        problems.append(f"{len(wrong)} subscribers did not get exactly {count} messages "
                        f"(e.g. sub {wrong[0].index}: {wrong[0].n})")
    if set(publisher.statuses) != {200}:
        problems.append(f"statuses {publisher.statuses}; first error: {publisher.first_error}")
    if v.hub.closes:
        problems.append(f"{len(v.hub.closes)} subscribers closed: {v.hub.closes[:3]}")
    lat = sorted(v.hub.lat)
    result = {"messages": count, "achieved_rate": achieved, "late_sends": late, "deliveries": v.hub.total,
              "p50_ms": percentile(lat, 50) / 1e6, "p99_ms": percentile(lat, 99) / 1e6,
              "max_ms": lat[-1] / 1e6 if lat else float("nan"),
              "http_p99_ms": percentile(sorted(publisher.replies), 99) / 1e6,
              "cpu_pct": {k: 100 * (cpu1[k] - cpu0[k]) / wall for k in cpu},
              "others_cpu_pct": 100 * others_cpu_delta(others0, others1) / wall, "fsync": probe.summary(),
              "problems": problems}
    return result, lat, publisher.replies


async def _nodes_on(place: str, folder: Path, args: argparse.Namespace, servers: list[Server],
                    redises: list[RedisServer]) -> tuple[list[Variant], dict]:
    """Nodes A and B on one Redis, and a SQLite node, all with their stores
    in `folder`; subscribers on B and on the SQLite node."""
    core = args.server_core
    redis = RedisServer(f"redis-latency-{place}", folder, core=args.redis_core)
    redises.append(redis)
    redis.start()
    env = {**LIFTED_LIMITS, **redis.env()}
    a = Server(f"notifier-durable@latency-a-{place}", folder, core=core, notifier=args.notifier, env=env)
    b = Server(f"notifier-durable@latency-b-{place}", folder, core=core, notifier=args.notifier, env=env)
    c = Server(f"notifier-durable@latency-sqlite-{place}", folder, core=core, notifier=args.notifier,
               env=LIFTED_LIMITS)
    servers += [a, b, c]
    for s in (a, b, c):
        s.start()
    for s in (a, b, c):
        await s.wait_ready()
    n = args.latency_subscribers
    hub_b, hub_c = Hub(), Hub()
    subs_b = await connect_subscribers(b, hub_b, n, 1, source_ips=args.source_ip_list)
    subs_c = await connect_subscribers(c, hub_c, n, 1, source_ips=args.source_ip_list)
    variants = [
        Variant(f"cross-{place}", f"Redis on {place}: publish to node A, subscribers on node B", a, hub_b, subs_b,
                folder),
        Variant(f"same-{place}", f"Redis on {place}: publish to node B, subscribers on node B", b, hub_b, subs_b,
                folder),
        Variant(f"sqlite-{place}", f"SQLite on {place}: one node (reference)", c, hub_c, subs_c, folder),
    ]
    cpu = {"node A": a.cpu, "node B": b.cpu, "redis": redis.cpu, "SQLite node": c.cpu}
    return variants, cpu


async def latency_test(args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    servers: list[Server] = []
    redises: list[RedisServer] = []
    variants: list[Variant] = []
    cpu_of: dict[str, dict] = {}
    try:
        for place in args.latency_places:
            made, cpu = await _nodes_on(place, dirs[place], args, servers, redises)
            variants += made
            for v in made:
                cpu_of[v.name] = cpu
        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        for rnd in range(args.latency_rounds + 1):
            order = variants if rnd % 2 else variants[::-1]
            for v in order:
                seconds = 1.0 if rnd == 0 else args.latency_seconds
                for attempt in range(args.retries + 1):
                    result, lat, replies = await run_variant(v, args, seconds, cpu_of[v.name])
                    f = result["fsync"]
                    log(f"  latency {v.name:12s} {'warm-up' if rnd == 0 else f'round {rnd}'}: "
                        f"{result['achieved_rate']:.0f}/s, {result['deliveries']:,} deliveries, p50 "
                        f"{result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms max {result['max_ms']:.2f} ms, "
                        f"HTTP p99 {result['http_p99_ms']:.2f} ms, CPU "
                        + ", ".join(f"{k} {p:.0f}%" for k, p in result["cpu_pct"].items())
                        + f", other processes {result['others_cpu_pct']:.0f}%; fsync probe p50 {f['p50_ms']:.2f} ms "
                          f"max {f['max_ms']:.1f} ms"
                        + (f"  PROBLEMS: {result['problems']}" if result["problems"] else ""))
                    if result["problems"]:
                        raise RuntimeError(f"latency {v.name}: {result['problems']}")
                    if rnd == 0 or result["others_cpu_pct"] <= args.max_others or attempt == args.retries:
                        break
                    log(f"  other processes used {result['others_cpu_pct']:.0f}% CPU: repeating the round")
                    await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
                if rnd > 0:
                    v.rounds.append(result)
                    v.lat += lat
                    v.http += replies
        for v in variants:
            await close_all(v.subs)
    finally:
        for s in servers:
            s.stop()
        for r in redises:
            r.stop()
    out = {}
    for v in variants:
        lat, http = sorted(v.lat), sorted(v.http)
        out[v.name] = {
            "label": v.label, "rounds": len(v.rounds), "messages": sum(r["messages"] for r in v.rounds),
            "subscribers": len(v.subs), "deliveries": sum(r["deliveries"] for r in v.rounds),
            "achieved_rate": min(r["achieved_rate"] for r in v.rounds),
            "p50_ms": percentile(lat, 50) / 1e6, "p99_ms": percentile(lat, 99) / 1e6,
            "p999_ms": percentile(lat, 99.9) / 1e6, "max_ms": lat[-1] / 1e6,
            "round_p99_ms": [r["p99_ms"] for r in v.rounds],
            "http_p50_ms": percentile(http, 50) / 1e6, "http_p99_ms": percentile(http, 99) / 1e6,
            "cpu_pct": {k: sum(r["cpu_pct"][k] for r in v.rounds) / len(v.rounds) for k in v.rounds[0]["cpu_pct"]},
            "others_cpu_pct": max(r["others_cpu_pct"] for r in v.rounds),
            "fsync_max_ms": max(r["fsync"]["max_ms"] for r in v.rounds),
            "fsync_over_10ms": sum(r["fsync"]["over_10ms"] for r in v.rounds),
            "fsync_probes": sum(r["fsync"]["count"] for r in v.rounds),
        }
    return {"variants": out, "rate": args.latency_rate, "seconds": args.latency_seconds}


def fmt(result: dict) -> str:
    if "error" in result:
        return f"latency test FAILED: {result['error']}"
    lines = ["| publish to -> subscribers | messages x subscribers | achieved rate | p50 ms | p99 ms | p99.9 ms "
             "| max ms | p99 per round, ms | HTTP reply p50 / p99 ms | CPU % of core 0 (mean of rounds) "
             "| other processes CPU % (highest round) | fsync probe: max ms, probes over 10 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for v in result["variants"].values():
        cpu = ", ".join(f"{k} {p:.0f}" for k, p in v["cpu_pct"].items() if p >= 0.5)
        lines.append(f"| {v['label']} | {v['messages']:,} x {v['subscribers']} | {v['achieved_rate']:.0f}/s "
                     f"| {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['p999_ms']:.2f} | {v['max_ms']:.2f} "
                     f"| {', '.join(f'{p:.2f}' for p in v['round_p99_ms'])} "
                     f"| {v['http_p50_ms']:.2f} / {v['http_p99_ms']:.2f} | {cpu} | {v['others_cpu_pct']:.0f} "
                     f"| {v['fsync_max_ms']:.1f}, {v['fsync_over_10ms']} of {v['fsync_probes']:,} |")
    return "\n".join(lines)


def goals(result: dict | None) -> list[tuple[str, str, str]]:
    out = []
    variants = (result or {}).get("variants", {})
    for place, what in (("disk", "stores on disk: durable, fsync included"),
                        ("tmpfs", "stores on tmpfs: the software's own latency")):
        title = (f"cross-node publish-to-receive p99 < {GOAL_MS:g} ms (HTTP publish to node A at 100/s, "
                 f"100 subscribers on node B; {what})")
        v = variants.get(f"cross-{place}")
        if not v:
            out.append((title, "n/a", "not measured"))
            continue
        note = (f"p99 {v['p99_ms']:.2f} ms, p50 {v['p50_ms']:.2f} ms over {v['deliveries']:,} deliveries at "
                f"{v['achieved_rate']:.0f}/s to {v['subscribers']}")
        same, ref = variants.get(f"same-{place}"), variants.get(f"sqlite-{place}")
        if same and ref:
            note += f"; same node on Redis p99 {same['p99_ms']:.2f} ms, SQLite node p99 {ref['p99_ms']:.2f} ms"
        if place == "disk":
            note += f"; fsync probe max {v['fsync_max_ms']:.1f} ms"
        if result["rate"] != 100 or v["subscribers"] != 100:
            out.append((title, "n/a", note + " (not the goal's load)"))
            continue
        out.append((title, "PASS" if v["p99_ms"] < GOAL_MS else "FAIL", note))
    return out

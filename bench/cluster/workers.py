"""``notifier serve`` against ``notifier serve --workers 2`` on Redis (AOF
always, on a disk), each with a redis-server of its own: durable HTTP
publish req/s (wrk, as in the publish test) and fan-out deliveries/s
(serial and burst, as in the fan-out test; the subscribers are spread over
the workers by the kernel's SO_REUSEPORT hash).

Two placements. "core 0": notifier (every worker) and redis-server pinned
to the server core, the load generator on the other, as everywhere else:
a second worker can only share the first one's core. "cores 0-1": notifier
and redis-server may run on both cores, the load generator still pinned to
its own: what a second worker can get from the core the load generator
leaves idle."""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from bench.cluster.fanout import Node, fanout_rounds, summarize
from bench.common.clients import close_all
from bench.common.httpload import Load, run_python, run_wrk, wrk_version
from bench.common.proc import OUR_PIDS, wait_quiet
from bench.common.redis_server import RedisServer
from bench.common.rounds import setup_target
from bench.common.run import log
from bench.common.servers import LIFTED_LIMITS, Server
from bench.common.stats import median


@dataclass
class Config:
    name: str
    label: str
    workers: int
    cores: set[int]
    redis: RedisServer
    server: Server
    loads: list[Load] = field(default_factory=list)


async def workers_test(args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    placements = [("core0", f"core {args.server_core}", {args.server_core})]
    if args.client_core != args.server_core:
        placements.append(("cores01", f"cores {args.server_core}-{args.client_core}",
                           {args.server_core, args.client_core}))
    configs: list[Config] = []
    try:
        for key, where, cores in placements:
            for workers in (1, 2):
                name = f"w{workers}-{key}"
                redis = RedisServer(f"redis-{name}", dirs["disk"], core=cores).start()
                serve = [args.notifier, "serve"] + (["--workers", str(workers)] if workers > 1 else [])
                server = Server(f"notifier-durable@{name}", dirs["disk"], core=cores, notifier=args.notifier,
                                serve=serve, env={**LIFTED_LIMITS, **redis.env()})
                configs.append(Config(name, f"{workers} worker{'s' if workers > 1 else ''}, {where}", workers,
                                      cores, redis, server))
        for c in configs:
            c.server.start()
        for c in configs:
            await c.server.wait_ready()
            if c.workers > 1:
                await c.server.wait_workers(c.workers)
        publish = await _publish(configs, args, dirs["disk"])
        nodes = []
        for c in configs:
            node = Node(c.name, c.label, c.server, {"redis": c.redis.cpu}, c.workers)
            node.target = await setup_target(c.server, args, c.workers, started=True)
            nodes.append(node)
        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        await fanout_rounds(nodes, args, "workers")
        for node in nodes:
            await close_all(node.target.subs, node.target.pub)
        return {"publish": publish, "fanout": summarize(nodes),
                "labels": {c.name: c.label for c in configs}, "workers": {c.name: c.workers for c in configs}}
    finally:
        for c in configs:
            c.server.stop()
            c.redis.stop()


async def _publish(configs: list[Config], args: argparse.Namespace, workdir: Path) -> dict:
    drive = run_wrk if wrk_version() else run_python

    async def measure(c: Config, seconds: float) -> Load:
        return await asyncio.to_thread(
            drive, c.name, c.server.port, "/api/publish", args.connections, seconds, 1, args.pad, workdir,
            parts={"notifier": c.server.cpu, "redis": c.redis.cpu}, server_cores=c.cores | {args.server_core},
            client_core=args.client_core)

    for c in configs:
        await measure(c, args.warmup)
    limit = args.max_others / 100
    round_no = 0
    while len(configs[0].loads) < args.rounds and round_no < args.rounds * 3:
        round_no += 1
        order = configs if round_no % 2 else configs[::-1]
        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        this_round = {}
        for c in order:
            load = await measure(c, args.duration)
            this_round[c.name] = load
            log(f"  workers publish round {round_no} {c.name:11s} {load.rate:8,.0f}/s p99 {load.p99_ms:6.2f} ms  "
                + " ".join(f"{k} {v:.0%}" for k, v in load.parts.items())
                + f" other {max(load.others, 0):.0%} load {load.client_busy:.0%}"
                + ("" if load.valid else f"  ERRORS: {load.non200} non-200, {load.socket_errors} socket errors; "
                                         f"{load.bad_sample}"))
        if any(load.others > limit for load in this_round.values()):
            log(f"  workers publish round {round_no} set aside: other work above {limit:.0%}")
            continue
        for c in configs:
            c.loads.append(this_round[c.name])
    out = {}
    for c in configs:
        rs = c.loads
        if not rs:
            continue
        out[c.name] = {"label": c.label, "rounds": len(rs), "rate": median([r.rate for r in rs]),
                       "p50_ms": median([r.p50_ms for r in rs]), "p99_ms": median([r.p99_ms for r in rs]),
                       "notifier_pct": median([100 * r.parts["notifier"] for r in rs]),
                       "redis_pct": median([100 * r.parts["redis"] for r in rs]),
                       "client_pct": median([100 * r.client_busy for r in rs]),
                       "others_pct": median([100 * max(r.others, 0) for r in rs]),
                       "errors": sum(r.non200 + r.socket_errors + r.timeouts for r in rs)}
    return out


def fmt(result: dict) -> str:
    if "error" in result:
        return f"workers test FAILED: {result['error']}"
    p, f = result["publish"], result["fanout"]
    lines = ["| notifier | placement of notifier and redis-server | publish req/s | p99 ms | notifier CPU % "
             "| redis-server CPU % | wrk CPU % | fan-out serial deliveries/s | serial: notifier / redis-server / "
             "load generator CPU % | fan-out burst deliveries/s | burst: notifier / redis-server / load generator "
             "CPU % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for name, label in result["labels"].items():
        workers, where = label.split(", ", 1)
        row = p.get(name)
        cells = [workers, where]
        cells += ([f"{row['rate']:,.0f}", f"{row['p99_ms']:.2f}", f"{row['notifier_pct']:.0f}",
                   f"{row['redis_pct']:.0f}", f"{row['client_pct']:.0f}"] if row else ["-"] * 5)
        for scenario in ("serial", "burst"):
            s = f.get(name, {}).get(scenario)
            cells += ([f"{s['deliveries_per_s']:,.0f}",
                       f"{s['server_cpu_pct']:.0f} / {s['redis_cpu_pct']:.0f} / {s['client_cpu_pct']:.0f}"]
                      if s else ["-", "-"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios, 2 workers / 1 worker: " + "; ".join(ratios(result))]
    return "\n".join(lines)


def ratios(result: dict) -> list[str]:
    out = []
    p, f, labels = result["publish"], result["fanout"], result["labels"]
    for key in ("core0", "cores01"):
        one, two = f"w1-{key}", f"w2-{key}"
        if one not in labels or two not in labels:
            continue
        where = labels[one].split(", ", 1)[1]
        parts = []
        if one in p and two in p:
            parts.append(f"publish {p[two]['rate'] / p[one]['rate']:.2f}x")
        for scenario in ("serial", "burst"):
            a, b = f.get(two, {}).get(scenario), f.get(one, {}).get(scenario)
            if a and b:
                parts.append(f"fan-out {scenario} {a['deliveries_per_s'] / b['deliveries_per_s']:.2f}x")
        out.append(f"{where}: " + ", ".join(parts))
    return out

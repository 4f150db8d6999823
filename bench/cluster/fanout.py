"""Fan-out on one node, notifier on SQLite against notifier on Redis: the
same --subscribers picows subscribers and one publishing WebSocket per
node (bench/common/clients.py), the serial and burst rounds of bench.fanout
(bench/common/rounds.py) with durable publishes, both stores on a disk,
redis-server pinned with the node. Rounds interleave across nodes; medians.

``fanout_rounds`` and ``summarize`` also serve the workers comparison."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.common.clients import close_all
from bench.common.proc import OUR_PIDS, wait_quiet
from bench.common.redis_server import RedisServer
from bench.common.rounds import Target, run_round, setup_target
from bench.common.run import CLIENT_BOUND_PCT, log
from bench.common.servers import LIFTED_LIMITS, Server
from bench.common.stats import median

SCENARIOS = ("serial", "burst")
GOAL = 0.9  # Redis deliveries/s at least this share of SQLite's


@dataclass
class Node:
    name: str
    label: str
    server: Server
    parts: dict[str, Callable[[], float]] = field(default_factory=dict)
    workers: int = 1
    target: Target | None = None


async def fanout_rounds(nodes: list[Node], args: argparse.Namespace, what: str) -> None:
    """A warm-up round, then --fanout-rounds rounds of each scenario on every
    node in turn; a round disturbed by other processes is repeated (up to
    --retries)."""
    scenarios = [("serial", args.messages_serial, 1), ("burst", args.messages_burst, args.window)]
    for rnd in range(args.fanout_rounds + 1):
        tag = "warm-up" if rnd == 0 else f"round {rnd}/{args.fanout_rounds}"
        for node in nodes:
            for scenario, messages, window in scenarios:
                if rnd == 0:
                    messages = max(5, messages // 4)
                for attempt in range(args.retries + 1):
                    r = await run_round(node.target, scenario, messages, window, args.payload, args.stall_timeout,
                                        parts=node.parts)
                    log(f"  {what} {node.name:14s} {scenario:6s} {tag:11s} {r['deliveries_per_s']:>10,.0f} "
                        f"deliveries/s p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms  notifier CPU "
                        f"{r['server_cpu_pct']:3.0f}%"
                        + "".join(f" {k} CPU {100 * v / r['elapsed_s']:.0f}%" for k, v in r["parts_cpu_s"].items())
                        + f" client CPU {r['client_cpu_pct']:3.0f}% other {r['others_cpu_pct']:.0f}%"
                        + (f"  PROBLEMS: {r['problems']}" if r["problems"] else ""))
                    if r["problems"]:
                        raise RuntimeError(f"{node.name} {scenario} {tag}: {r['problems'][:3]}")
                    if r["others_cpu_pct"] <= args.max_others or rnd == 0 or attempt == args.retries:
                        break
                    log(f"  other processes used {r['others_cpu_pct']:.0f}% CPU: repeating the round")
                    await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
                if rnd > 0:
                    node.target.rounds[scenario].append(r)


def summarize(nodes: list[Node]) -> dict:
    out: dict[str, dict] = {}
    for node in nodes:
        out[node.name] = {}
        for scenario in SCENARIOS:
            rs = node.target.rounds[scenario] if node.target else []
            if not rs:
                continue
            row = {
                "label": node.label, "rounds": len(rs),
                "deliveries_per_s": median([r["deliveries_per_s"] for r in rs]),
                "spread": [min(r["deliveries_per_s"] for r in rs), max(r["deliveries_per_s"] for r in rs)],
                "p50_ms": median([r["p50_ms"] for r in rs]), "p99_ms": median([r["p99_ms"] for r in rs]),
                "server_cpu_pct": median([r["server_cpu_pct"] for r in rs]),
                "client_cpu_pct": median([r["client_cpu_pct"] for r in rs]),
                "others_cpu_pct": median([r["others_cpu_pct"] for r in rs]),
                "frames_per_read": median([r["frames_per_read"] for r in rs]),
                "core_busy_pct": {c: median([r["core_busy_pct"][c] for r in rs]) for c in rs[0]["core_busy_pct"]},
                # µs of notifier CPU per delivery; redis-server's per message published
                "notifier_us_per_delivery": median([1e6 * r["server_cpu_s"] / r["deliveries"] for r in rs]),
            }
            for part in rs[0]["parts_cpu_s"]:
                row[f"{part}_cpu_pct"] = median([100 * r["parts_cpu_s"][part] / r["elapsed_s"] for r in rs])
                row[f"{part}_us_per_message"] = median([1e6 * r["parts_cpu_s"][part] / r["messages"] for r in rs])
            out[node.name][scenario] = row
    return out


def fmt_table(summary: dict, base: str | None = None) -> str:
    lines = ["| node | scenario | deliveries/s (median) | p50 ms | p99 ms | notifier CPU % | redis-server CPU % "
             "| redis-server CPU µs per message | load generator CPU % | other processes CPU % "
             "| frames per client read |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    flagged = False
    for scenario in SCENARIOS:
        b = summary.get(base, {}).get(scenario, {}).get("deliveries_per_s") if base else None
        for name, per in summary.items():
            row = per.get(scenario)
            if row is None:
                continue
            mark = ""
            if row["client_cpu_pct"] >= CLIENT_BOUND_PCT and row["server_cpu_pct"] < CLIENT_BOUND_PCT:
                mark, flagged = " *", True
            ratio = f" ({row['deliveries_per_s'] / b:.2f}x)" if b else ""
            lines.append(
                f"| {row['label']} | {scenario} | {row['deliveries_per_s']:,.0f}{ratio}{mark} | {row['p50_ms']:.2f} "
                f"| {row['p99_ms']:.2f} | {row['server_cpu_pct']:.0f} "
                + (f"| {row['redis_cpu_pct']:.0f} | {row['redis_us_per_message']:.1f} " if "redis_cpu_pct" in row
                   else "| - | - ")
                + f"| {row['client_cpu_pct']:.0f} | {row['others_cpu_pct']:.0f} | {row['frames_per_read']:.1f} |")
    if flagged:
        lines += ["", f"\\* the load generator was at >= {CLIENT_BOUND_PCT}% of its core while notifier was not: "
                      "notifier may be faster than this figure."]
    return "\n".join(lines)


async def fanout_test(args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    core = args.server_core
    redis = RedisServer("redis-fanout", dirs["disk"], core=args.redis_core)
    nodes = [Node("sqlite", "notifier, SQLite (disk)",
                  Server("notifier-durable@fanout-sqlite", dirs["disk"], core=core, notifier=args.notifier,
                         env=LIFTED_LIMITS))]
    try:
        redis.start()
        nodes.append(Node("redis", "notifier, Redis (disk, AOF always)",
                          Server("notifier-durable@fanout-redis", dirs["disk"], core=core, notifier=args.notifier,
                                 env={**LIFTED_LIMITS, **redis.env()}), {"redis": redis.cpu}))
        for node in nodes:
            node.target = await setup_target(node.server, args)
        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        await fanout_rounds(nodes, args, "fan-out")
        for node in nodes:
            await close_all(node.target.subs, node.target.pub)
        return {"summary": summarize(nodes)}
    finally:
        for node in nodes:
            node.server.stop()
        redis.stop()


def goals(result: dict | None) -> list[tuple[str, str, str]]:
    out = []
    s = (result or {}).get("summary", {})
    for scenario in SCENARIOS:
        title = f"fan-out ({scenario}): notifier on Redis within 10% of notifier on SQLite, deliveries/s"
        a = s.get("redis", {}).get(scenario)
        b = s.get("sqlite", {}).get(scenario)
        if not a or not b:
            out.append((title, "n/a", "not measured"))
            continue
        r = a["deliveries_per_s"] / b["deliveries_per_s"]
        note = f"{r:.2f}x ({a['deliveries_per_s']:,.0f} vs {b['deliveries_per_s']:,.0f} deliveries/s)"
        if a["client_cpu_pct"] >= CLIENT_BOUND_PCT or b["client_cpu_pct"] >= CLIENT_BOUND_PCT:
            note += (f"; the load generator was at {a['client_cpu_pct']:.0f}% / {b['client_cpu_pct']:.0f}% of its "
                     "core: it may have set the pace")
        out.append((title, "PASS" if r >= GOAL else "FAIL", note))
    return out

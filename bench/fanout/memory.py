"""Memory per idle connection: --memory-connections subscribed, idle
connections to a fresh server; RSS delta / connections, and the time and
server CPU it took to connect them."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from bench.common.clients import Hub, close_all, connect_subscribers
from bench.common.proc import proc_tree
from bench.common.run import log
from bench.common.servers import BASELINE, LIFTED_LIMITS, Server
from bench.common.stats import fmt_ratio


async def memory_test(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    server = Server(f"{name}@memory", workdir, core=args.server_core, notifier=args.notifier,
                    env=LIFTED_LIMITS)
    hub = Hub()
    warm = 100
    conns = args.memory_connections
    server.start()
    try:
        await server.wait_ready()
        warm_subs = await connect_subscribers(server, hub, warm, 0, source_ips=args.source_ip_list, what="warm-up connections")
        await asyncio.sleep(args.settle)
        server.pids = proc_tree(server.proc.pid)
        before = server.rss()
        cpu0 = server.cpu()
        t0 = time.monotonic()
        subs = await connect_subscribers(server, hub, conns, 0, source_ips=args.source_ip_list,
                                         first_index=warm, what="idle connections")
        connect_s = time.monotonic() - t0
        connect_cpu = server.cpu() - cpu0
        await asyncio.sleep(args.settle)
        server.pids = proc_tree(server.proc.pid)
        after = server.rss()
        alive = server.alive()
        result = {
            "server": name,
            "label": server.label,
            "connections": conns,
            "rss_before_mib": before / 2**20,
            "rss_after_mib": after / 2**20,
            "kib_per_connection": (after - before) / conns / 1024,
            "connect_s": connect_s,
            "connect_server_cpu_s": connect_cpu,
            "closed": len(hub.closes),
            "alive": alive,
        }
        log(f"{name}: {conns} idle connections: RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
            f"{result['kib_per_connection']:.1f} KiB/connection (connected in {connect_s:.1f}s, "
            f"server CPU {connect_cpu:.1f}s)")
        await close_all(subs + warm_subs)
        return result
    finally:
        server.stop()


def fmt_memory(mem: list[dict]) -> str:
    if not mem:
        return ""
    base = next((m for m in mem if m["server"] == BASELINE), None)
    lines = ["| server | idle connections | RSS before MiB | RSS after MiB | KiB per connection "
             "| time to connect them, s | server CPU for it, s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in mem:
        if "error" in m:
            lines.append(f"| {m['server']} | FAILED (see below) | | | | | |")
            continue
        lines.append(
            f"| {m['label']} | {m['connections']:,} | {m['rss_before_mib']:.1f} | {m['rss_after_mib']:.1f} "
            f"| {m['kib_per_connection']:.1f}{fmt_ratio(m['kib_per_connection'], base and base.get('kib_per_connection'))} "
            f"| {m['connect_s']:.1f} | {m['connect_server_cpu_s']:.1f} |")
    return "\n".join(lines)


def goal(mem: list[dict]) -> tuple[str, str, str]:
    """Issue 4's memory goal: (title, PASS/FAIL/n/a, note)."""
    title = "memory per idle connection: notifier <= websockets"
    m = {x["server"]: x for x in mem if "kib_per_connection" in x}
    if "notifier" in m and BASELINE in m:
        a, b = m["notifier"]["kib_per_connection"], m[BASELINE]["kib_per_connection"]
        return title, "PASS" if a <= b else "FAIL", f"{a:.1f} vs {b:.1f} KiB ({a / b:.2f}x)"
    return title, "n/a", "not measured"

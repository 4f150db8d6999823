"""One fan-out round: a publisher and subscribers on one server, serial (one
message in flight) or burst (a window of them), every delivery counted and
the sampled subscribers' latency, order and duplicates checked; the server's,
the load generator's and other processes' CPU over the round. Used by
bench.fanout and bench.cluster."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

from bench.common.clients import (TEXT, Hub, Pub, Sub, connect_publisher, connect_subscribers, make_data_template,
                                  noop, stamp)
from bench.common.proc import OUR_PIDS, core_times, others_cpu_delta, proc_tree, user_process_times
from bench.common.run import log
from bench.common.servers import TOPIC, Server
from bench.common.stats import percentile

_perf_ns = time.perf_counter_ns


@dataclass
class Target:
    server: Server
    hub: Hub = field(default_factory=Hub)
    subs: list[Sub] = field(default_factory=list)
    pub: Pub | None = None
    rounds: dict[str, list[dict]] = field(default_factory=lambda: {"serial": [], "burst": []})
    failures: list[str] = field(default_factory=list)


async def run_round(t: Target, scenario: str, messages: int, window: int, payload: int,
                    stall_timeout: float, parts: dict[str, Callable[[], float]] | None = None) -> dict:
    """One round. `parts`: CPU-seconds counters of more processes serving
    this server (a redis-server), reported per part as ``parts_cpu_s``."""
    server, hub, pub, subs = t.server, t.hub, t.pub, t.subs
    n = len(subs)
    head, tail = make_data_template(payload)
    eph = b'"ephemeral":true,' if (server.kind == "notifier" and server.ephemeral) else b""
    prefix = b'{"type":"publish","topic":"' + TOPIC.encode() + b'",' + eph + b'"ref":'
    transport = pub.transport
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    state = {"sent": 0}
    errors_before = len(pub.errors)

    for s in subs:
        s.n = 0
    hub.total = 0
    hub.lat = []
    hub.bad = []
    hub.reads = hub.sframes = 0
    pub.acked = 0

    def pump() -> None:
        total = hub.total
        delivered = total // n
        hub.wake_at = (delivered + 1) * n
        finished = min(pub.acked, delivered)
        sent = state["sent"]
        while sent < messages and sent - finished < window:
            transport.send(TEXT, b"%s%d,\"data\":%s%d%s}" % (prefix, sent, head, stamp(), tail))
            sent += 1
        state["sent"] = sent
        if len(pub.errors) > errors_before and not done.done():
            done.set_exception(RuntimeError(f"publish error: {pub.errors[errors_before]}"))
        elif delivered >= messages and pub.acked >= messages and not done.done():
            state["t_end"] = _perf_ns()
            done.set_result(None)

    gc.collect()
    gc.disable()
    parts = parts or {}
    parts0 = {name: cpu() for name, cpu in parts.items()}
    cpu0 = server.cpu()
    rus0 = resource.getrusage(resource.RUSAGE_SELF)
    cores0 = core_times()
    exclude = OUR_PIDS | set(server.pids) | {os.getpid()}
    others0 = user_process_times(exclude)
    t_start = _perf_ns()
    hub.wake_at = n
    pub.on_ack = pump
    hub.pump = pump
    pump()
    last_progress, last_change = None, time.monotonic()
    try:
        while not done.done():
            await asyncio.wait([done], timeout=0.5)
            progress = (hub.total, pub.acked)
            if progress != last_progress:
                last_progress, last_change = progress, time.monotonic()
            elif not done.done() and time.monotonic() - last_change > stall_timeout:
                raise RuntimeError(
                    f"stalled: {hub.total}/{messages * n} deliveries, {pub.acked}/{messages} published replies, "
                    f"{state['sent']} sent, server alive: {server.alive()}; "
                    f"closes: {hub.closes[:3]} ({len(hub.closes)}); publisher: {pub.closed}; "
                    f"errors: {pub.errors[errors_before:errors_before + 3]}")
        done.result()
    finally:
        hub.pump = noop
        pub.on_ack = noop
        hub.wake_at = 1 << 62
        gc.enable()
    t_end = state["t_end"]
    cpu1 = server.cpu()
    parts_cpu = {name: cpu() - parts0[name] for name, cpu in parts.items()}
    rus1 = resource.getrusage(resource.RUSAGE_SELF)
    cores1 = core_times()
    others1 = user_process_times(exclude)
    # Let stragglers (duplicates) arrive before checking counts.
    await asyncio.sleep(0.05)
    elapsed = (t_end - t_start) / 1e9
    client_cpu = (rus1.ru_utime + rus1.ru_stime) - (rus0.ru_utime + rus0.ru_stime)
    wrong = [s.index for s in subs if s.n != messages]
    problems = list(hub.bad[:5])
    if wrong:
        problems.append(f"{len(wrong)} subscribers did not get exactly {messages} messages "
                        f"(e.g. sub {wrong[0]}: {subs[wrong[0]].n})")
    if hub.closes:
        problems.append(f"{len(hub.closes)} subscribers closed: {hub.closes[:3]}")
    lat = sorted(hub.lat)
    return {
        "scenario": scenario,
        "messages": messages,
        "subscribers": n,
        "deliveries": hub.total,
        "elapsed_s": elapsed,
        "deliveries_per_s": messages * n / elapsed,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "max_ms": (lat[-1] / 1e6) if lat else float("nan"),
        "latency_samples": len(lat),
        "frames_per_read": hub.sframes / hub.reads if hub.reads else float("nan"),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "parts_cpu_s": parts_cpu,
        "client_cpu_pct": 100 * client_cpu / elapsed,
        "client_sys_pct": 100 * (rus1.ru_stime - rus0.ru_stime) / elapsed,
        "others_cpu_pct": 100 * others_cpu_delta(others0, others1) / elapsed,
        "core_busy_pct": {c: 100 * (cores1[c][0] - cores0[c][0]) / elapsed for c in cores1},
        "core_irq_pct": {c: 100 * (cores1[c][1] - cores0[c][1]) / elapsed for c in cores1},
        "problems": problems,
    }


async def setup_target(server: Server, args: argparse.Namespace, workers: int = 1,
                       started: bool = False) -> Target:
    """Start `server` (`workers`: its `notifier serve --workers` count; not
    when `started`: it is running and ready) and connect --subscribers
    subscribers and a publisher."""
    t = Target(server)
    if not started:
        server.start()
        await server.wait_ready()
        if workers > 1:
            await server.wait_workers(workers)
    t.subs = await connect_subscribers(server, t.hub, args.subscribers, args.sample_every,
                                       source_ips=args.source_ip_list)
    t.pub = await connect_publisher(server)
    server.pids = proc_tree(server.proc.pid)
    log(f"{server.name}: pid {server.proc.pid}, port {server.port}, {len(t.subs)} subscribers, "
        f"RSS {server.rss() / 2**20:.0f} MiB")
    return t

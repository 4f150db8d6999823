"""Durable HTTP publish, Redis against SQLite: single ``POST /api/publish``
requests from --connections keep-alive wrk clients (as bench.publish) to the
no-op Tornado handler, to notifier on SQLite and to notifier on Redis (AOF,
appendfsync always), each store once on tmpfs (/dev/shm: an fsync costs
nothing there, so what is left is the software's own cost) and once on a
disk (the cost of durability too). Rounds alternate in order; medians.

Afterwards, for each notifier: the topics' heads must account for every 200
counted; then each redis-server is SIGKILLed and started again on its AOF,
and the heads, read through the same notifier, must be unchanged."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from bench.common.httpload import TOPICS, Load, commit_counters, run_python, run_wrk, wrk_version
from bench.common.proc import OUR_PIDS, wait_quiet
from bench.common.redis_server import RedisServer
from bench.common.run import log
from bench.common.servers import Server, topic_head
from bench.common.stats import median

PLACES = ("tmpfs", "disk")
FSYNC_PROBES = 500


def fsync_probe(folder: Path, count: int = FSYNC_PROBES) -> dict:
    """`count` times: write 4 KiB at the end of a file and fdatasync it; the
    times of the fdatasync alone, ms (p50, p99, max)."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"x" * 4096
        for _ in range(count):
            os.write(fd, block)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    times.sort()
    return {"count": count, "p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99) - 1],
            "max_ms": times[-1]}


def heads(port: int) -> int:
    return sum(topic_head(port, f"bench.t{i}") for i in range(TOPICS))


async def settled_heads(port: int, timeout: float = 30) -> int:
    """The heads once they stop moving (requests a run left in flight)."""
    total = heads(port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        again = heads(port)
        if again == total:
            return total
        total = again
    raise RuntimeError(f"the heads were still moving {timeout:g} s after the last run")


class Case:
    def __init__(self, name: str, label: str, server: Server, redis: RedisServer | None = None):
        self.name, self.label, self.server, self.redis = name, label, server, redis
        self.rounds: list[Load] = []
        self.acked = 0
        self.in_flight = 0

    def parts(self) -> dict:
        parts = {"notifier" if self.server.kind == "notifier" else "server": self.server.cpu}
        if self.redis is not None:
            parts["redis"] = self.redis.cpu
        return parts


async def publish_test(args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    cases: list[Case] = []
    redises: list[RedisServer] = []
    core = args.server_core
    try:
        noop = Server("noop@publish", dirs["disk"], core=core)
        cases.append(Case("noop", "no-op Tornado POST", noop))
        for place in PLACES:
            r = RedisServer(f"redis-publish-{place}", dirs[place], core=args.redis_core).start()
            redises.append(r)
            cases.append(Case(f"sqlite-{place}", f"notifier, SQLite on {place}",
                              Server(f"notifier@sqlite-{place}", dirs[place], core=core, notifier=args.notifier)))
            cases.append(Case(f"redis-{place}", f"notifier, Redis on {place}",
                              Server(f"notifier@redis-{place}", dirs[place], core=core, notifier=args.notifier,
                                     env=r.env()), r))
        for c in cases:
            c.server.start()
        for c in cases:
            await c.server.wait_listening()
        return await _run(args, dirs, cases)
    finally:
        for c in cases:
            c.server.stop()
        for r in redises:
            r.stop()


async def _run(args: argparse.Namespace, dirs: dict[str, Path], cases: list[Case]) -> dict:
    drive = run_wrk if wrk_version() else run_python
    workdir = dirs["disk"]
    probes = {place: fsync_probe(dirs[place]) for place in PLACES}
    log("fsync probe (4 KiB write + fdatasync): " + ", ".join(
        f"{place} p50 {p['p50_ms']:.3f} ms p99 {p['p99_ms']:.3f} ms max {p['max_ms']:.2f} ms"
        for place, p in probes.items()))

    async def measure(c: Case, seconds: float) -> Load:
        before = commit_counters(c.server.port) if c.server.kind == "notifier" else None
        load = await asyncio.to_thread(
            drive, c.name, c.server.port, "/api/publish", args.connections, seconds, 1, args.pad, workdir,
            parts=c.parts(), server_cores=args.server_cores, client_core=args.client_core)
        if c.server.kind == "notifier":
            c.acked += load.ok
            c.in_flight += args.connections
            after = commit_counters(c.server.port)
            if before and after:
                load.commits, load.jobs = after[0] - before[0], after[1] - before[1]
        return load

    for c in cases:
        await measure(c, args.warmup)
    rows: list[dict] = []
    round_no = set_aside = 0
    limit = args.max_others / 100
    while len(cases[0].rounds) < args.rounds and round_no < args.rounds * 3:
        round_no += 1
        order = cases if round_no % 2 else cases[::-1]
        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        this_round = {}
        for c in order:
            load = await measure(c, args.duration)
            this_round[c.name] = load
            row = _row(round_no, c, load)
            rows.append(row)
            log(f"  publish round {round_no} {c.name:13s} {load.rate:8,.0f}/s p50 {load.p50_ms:6.2f} ms "
                f"p99 {load.p99_ms:6.2f} ms  " + " ".join(f"{k} {v:.0%}" for k, v in load.parts.items())
                + f" other {max(load.others, 0):.0%} load {load.client_busy:.0%}"
                + (f" req/commit {load.jobs / load.commits:.1f}" if load.commits else "")
                + (f"  ERRORS: {load.non200} non-200, {load.socket_errors} socket errors, {load.timeouts} "
                   f"timeouts; {load.bad_sample}" if not load.valid else ""))
        disturbed = [name for name, load in this_round.items() if load.others > limit]
        if disturbed:
            set_aside += 1
            for row in rows[-len(cases):]:
                row["set_aside"] = True
            log(f"  publish round {round_no} set aside: something else took over {limit:.0%} of the server's "
                f"core during {', '.join(disturbed)}")
            continue
        for c in cases:
            c.rounds.append(this_round[c.name])

    durability = []
    for c in cases:
        if c.server.kind != "notifier":
            continue
        stored = await settled_heads(c.server.port)
        check = {"case": c.name, "acked": c.acked, "stored": stored, "in_flight_bound": c.in_flight,
                 "ok": c.acked <= stored <= c.acked + c.in_flight}
        if c.redis is not None:
            c.redis.kill()
            t0 = time.monotonic()
            c.redis.start(timeout=120)
            check["redis_restart_s"] = time.monotonic() - t0
            check["aof_mib"] = c.redis.aof_bytes() / 2**20
            after = heads(c.server.port)
            check["after_kill"] = after
            check["ok"] = check["ok"] and after == stored
        durability.append(check)
        log(f"  durability {c.name}: {c.acked:,} acknowledged, heads add up to {stored:,} "
            f"(at most {c.in_flight:,} more allowed)"
            + (f"; after SIGKILL of redis-server and restart ({check['redis_restart_s']:.1f} s, AOF "
               f"{check['aof_mib']:.0f} MiB): {check['after_kill']:,}" if "after_kill" in check else "")
            + ("" if check["ok"] else "  NOT DURABLE"))
    return {"client": wrk_version() or "Python asyncio fallback client", "probes": probes,
            "summary": _summary(cases), "rows": rows, "set_aside": set_aside, "durability": durability,
            "labels": {c.name: c.label for c in cases}}


def _row(round_no: int, c: Case, load: Load) -> dict:
    return {"round": round_no, "case": c.name, "rate": load.rate, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
            "parts": load.parts, "part_seconds": load.part_seconds, "ok": load.ok, "others": load.others,
            "client_busy": load.client_busy, "errors": load.non200 + load.socket_errors + load.timeouts,
            "per_commit": load.jobs / load.commits if load.commits else None}


def _summary(cases: list[Case]) -> dict:
    out = {}
    noop = median([r.rate for r in cases[0].rounds]) if cases[0].rounds else float("nan")
    for c in cases:
        rs = c.rounds
        if not rs:
            continue
        rate = median([r.rate for r in rs])
        us = {part: median([1e6 * r.part_seconds[part] / r.ok for r in rs if r.ok]) for part in rs[0].parts}
        out[c.name] = {
            "label": c.label, "rounds": len(rs), "rate": rate, "ratio": rate / noop if noop else float("nan"),
            "p50_ms": median([r.p50_ms for r in rs]), "p99_ms": median([r.p99_ms for r in rs]),
            "parts": {part: median([r.parts[part] for r in rs]) for part in rs[0].parts},
            "us_per_publish": us,
            "others": median([r.others for r in rs]), "client_busy": max(r.client_busy for r in rs),
            "per_commit": median([r.jobs / r.commits for r in rs if r.commits]) if any(r.commits for r in rs)
            else None,
            "errors": sum(r.non200 + r.socket_errors + r.timeouts for r in rs),
            "spread": [min(r.rate for r in rs), max(r.rate for r in rs)],
        }
    return out


GOAL = 0.6


def goal(result: dict | None) -> tuple[str, str, str]:
    title = f"durable HTTP publish: notifier on Redis (AOF always, on disk) >= {GOAL}x the no-op handler"
    s = (result or {}).get("summary", {})
    if "redis-disk" not in s or "noop" not in s:
        return title, "n/a", "not measured"
    r = s["redis-disk"]["ratio"]
    ok = r >= GOAL and all(d["ok"] for d in result["durability"]) and s["redis-disk"]["errors"] == 0
    note = (f"{r:.2f}x ({s['redis-disk']['rate']:,.0f} vs {s['noop']['rate']:,.0f} req/s); "
            f"SQLite on disk {s['sqlite-disk']['ratio']:.2f}x" if "sqlite-disk" in s else f"{r:.2f}x")
    if "redis-tmpfs" in s:
        note += (f"; on tmpfs (no fsync cost): Redis {s['redis-tmpfs']['ratio']:.2f}x, "
                 f"SQLite {s['sqlite-tmpfs']['ratio']:.2f}x")
    return title, "PASS" if ok else "FAIL", note


def fmt(result: dict) -> str:
    if "error" in result:
        return f"publish test FAILED: {result['error']}"
    s = result["summary"]
    lines = ["| case | req/s (median) | ratio to no-op | p50 ms | p99 ms | notifier CPU % of core | "
             "redis-server CPU % of core | notifier CPU µs per publish | redis-server CPU µs per publish "
             "| req per commit | other % | load generator CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in s.items():
        parts, us = row["parts"], row["us_per_publish"]
        main = parts.get("notifier", parts.get("server", 0))
        cells = [row["label"], f"{row['rate']:,.0f}", f"{row['ratio']:.2f}", f"{row['p50_ms']:.2f}",
                 f"{row['p99_ms']:.2f}", f"{100 * main:.0f}",
                 f"{100 * parts['redis']:.0f}" if "redis" in parts else "-",
                 f"{us['notifier']:.0f}" if "notifier" in us else "-",
                 f"{us['redis']:.1f}" if "redis" in us else "-",
                 f"{row['per_commit']:.1f}" if row["per_commit"] else "-",
                 f"{100 * max(row['others'], 0):.0f}", f"{100 * row['client_busy']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    per_round = []
    for name in s:
        rates = [f"{r['rate']:,.0f}" for r in result["rows"] if r["case"] == name and not r.get("set_aside")]
        per_round.append(f"{name} {', '.join(rates)}")
    lines += ["", "Rounds (req/s): " + "; ".join(per_round) + f"; {result['set_aside']} round(s) set aside as disturbed."]
    lines += ["", "fsync probe (4 KiB appended and fdatasync'ed, "
              f"{FSYNC_PROBES} times, before the rounds): " + "; ".join(
                  f"{place}: p50 {p['p50_ms']:.3f} ms, p99 {p['p99_ms']:.3f} ms, max {p['max_ms']:.2f} ms"
                  for place, p in result["probes"].items())]
    for d in result["durability"]:
        lines.append(f"- durability, {d['case']}: {d['acked']:,} publishes answered 200 (warm-up included), the "
                     f"heads add up to {d['stored']:,} (at most {d['in_flight_bound']:,} more allowed: requests in "
                     f"flight when a run stopped)"
                     + (f"; redis-server SIGKILLed and restarted on its AOF ({d['aof_mib']:.0f} MiB, "
                        f"{d['redis_restart_s']:.1f} s): {d['after_kill']:,}" if "after_kill" in d else "")
                     + (": holds" if d["ok"] else ": FAILS"))
    return "\n".join(lines)

"""Scale-out benchmark (issue 9): notifier on Redis against notifier on
SQLite, side by side in one run.

    .venv/bin/python -m bench.cluster            # full run
    .venv/bin/python -m bench.cluster --quick    # smoke run

Every redis-server is the benchmark's own, on a free port (never the
machine's shared 6379), AOF with ``appendfsync always``, pinned with the
notifier it serves to the server core; the load generator (this process,
and wrk) runs on the other core. The parts, each in its own module:

1. ``publish``: durable HTTP publish req/s, the no-op Tornado handler,
   notifier on SQLite and notifier on Redis, stores on tmpfs and on a disk;
   goal: Redis on disk >= 0.6x the no-op handler.
2. ``fanout``: fan-out deliveries/s on one node, SQLite against Redis;
   goal: Redis within 10% of SQLite.
3. ``latency``: cross-node publish-to-receive, HTTP to node A at 100/s,
   100 subscribers on node B; goal: p99 < 5 ms.
4. ``workers``: ``notifier serve`` against ``--workers 2`` on Redis:
   publish req/s and fan-out deliveries/s, with the server on one core and
   on both; no goal.
5. ``memory``: the figures docs/scaling.md uses: RSS and Redis memory per
   idle connection on a Redis node against a SQLite node, and Redis memory
   per topic, message, idempotency key and cursor.

Results: the report on stdout, as Markdown in ``bench/results/cluster.md``
and every figure in ``cluster.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cluster import fanout, latency, memory, publish, workers
from bench.common.httpload import wrk_version
from bench.common.proc import wait_quiet
from bench.common.redis_server import redis_version
from bench.common.run import add_run_args, git_version, log, pin_load_generator, raise_nofile, run, source_ips

SECTIONS = ("publish", "fanout", "latency", "workers", "memory")


def filesystem_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mount_point, fs_type = line.split()[1:3]
        if (str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")) \
                and len(mount_point) > len(best):
            best, kind = mount_point, fs_type
    return kind


async def section(name: str, args: argparse.Namespace, dirs: dict[str, Path]) -> dict:
    """One part; a failure is returned as {"error": ...}, and the run goes on."""
    log(f"== {name}")
    started = time.monotonic()
    test = {"publish": publish.publish_test, "fanout": fanout.fanout_test, "latency": latency.latency_test,
            "workers": workers.workers_test, "memory": memory.memory_test}[name]
    try:
        result = await test(args, dirs)
    except Exception as exc:  # noqa: BLE001 - reported, and the other parts still run
        log(f"{name} failed: {exc!r}")
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = time.monotonic() - started
    return result


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    dirs = {"disk": Path(tempfile.mkdtemp(prefix="cluster-", dir=args.disk_dir)),
            "tmpfs": Path(tempfile.mkdtemp(prefix="cluster-", dir=args.tmpfs_dir))}
    results: dict[str, Any] = {}
    try:
        await wait_quiet(args, exclude={os.getpid()})
        for name in args.sections:
            results[name] = await section(name, args, dirs)
    finally:
        if args.keep_logs:
            log(f"logs and stores kept in {dirs['disk']} and {dirs['tmpfs']}")
        else:
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
    total = time.monotonic() - started
    verdicts = []
    if "publish" in results:
        verdicts.append(publish.goal(results["publish"]))
    if "fanout" in results:
        verdicts += fanout.goals(results["fanout"])
    if "latency" in results:
        verdicts += latency.goals(results["latency"])
    cmd = "python -m bench.cluster " + " ".join(sys.argv[1:])
    md = [f"Command: `{cmd.strip()}`", "",
          f"notifier at {git_version()}; redis-server {redis_version()}; load generator: "
          f"{wrk_version() or 'Python fallback client'} for HTTP, picows for WebSocket; "
          f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores; "
          f"notifier on core {args.server_core}, redis-server on core {args.redis_core}, load generator on core "
          f"{args.client_core} "
          f"(unless a table says otherwise); disk: {dirs['disk']} ({filesystem_type(dirs['disk'])}), "
          f"tmpfs: {dirs['tmpfs']} ({filesystem_type(dirs['tmpfs'])}); run took {total:.0f} s"
          + (" (--quick: not the goals' load)" if args.quick else ""), ""]
    if "publish" in results:
        r = results["publish"]
        md += [f"Durable HTTP publish ({args.connections} keep-alive clients, single publishes, "
               f"{args.rounds} rounds x {args.duration:g} s, medians):", "",
               publish.fmt(r) if "error" not in r else f"FAILED: {r['error']}", ""]
    if "fanout" in results:
        r = results["fanout"]
        md += [f"Fan-out on one node ({args.subscribers} subscribers, durable publishes, serial: "
               f"{args.messages_serial} messages a round, burst: {args.messages_burst} with {args.window} in "
               f"flight, medians of {args.fanout_rounds} rounds; ratios to the SQLite node):", "",
               fanout.fmt_table(r["summary"], base="sqlite") if "error" not in r else f"FAILED: {r['error']}", ""]
    if "latency" in results:
        r = results["latency"]
        md += [f"Publish-to-receive latency ({args.latency_rate}/s over HTTP, {args.latency_subscribers} "
               f"subscribers, {args.latency_rounds} rounds x {args.latency_seconds:g} s per row, percentiles "
               f"over every delivery):", "",
               latency.fmt(r) if "error" not in r else f"FAILED: {r['error']}", ""]
    if "workers" in results:
        r = results["workers"]
        md += [f"1 against 2 workers on Redis (publish: as above; fan-out: {args.subscribers} subscribers, "
               f"medians of {args.fanout_rounds} rounds):", "",
               workers.fmt(r) if "error" not in r else f"FAILED: {r['error']}", ""]
    if "memory" in results:
        r = results["memory"]
        md += ["Memory (for docs/scaling.md):", "", memory.fmt(r) if "error" not in r else f"FAILED: {r['error']}", ""]
    md += ["Goals (issue 9):", ""] + [f"- {v}: {title}: {note}" for title, v, note in verdicts]
    failed = [name for name, r in results.items() if "error" in r]
    if failed:
        md += ["", "Parts that failed: " + ", ".join(f"{name} ({results[name]['error']})" for name in failed)]
    text = "\n".join(md)
    print()
    print(text)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"cluster{suffix}.md").write_text(text + "\n")
    (out / f"cluster{suffix}.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k != "source_ip_list"}, "results": results,
         "goals": verdicts, "total_s": total,
         "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, indent=1, default=str))
    log(f"results in {out}/cluster{suffix}.md and .json; total {total:.0f} s")
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}")
    p.add_argument("--disk-dir", default=tempfile.gettempdir(), help="parent folder on a disk for stores and AOFs")
    p.add_argument("--tmpfs-dir", default="/dev/shm", help="parent folder on tmpfs (fsync costs nothing)")
    p.add_argument("--redis-core", type=int, default=None,
                   help="core for redis-server (default: the server core, with notifier; the workers test "
                        "always places it with notifier)")
    g = p.add_argument_group("HTTP publish (publish and workers)")
    g.add_argument("--rounds", type=int, default=5, help="measured rounds per case")
    g.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per case first")
    g.add_argument("--connections", type=int, default=50, help="wrk keep-alive clients, one request each")
    g.add_argument("--pad", type=int, default=100, help="bytes of padding in each message's data")
    g = p.add_argument_group("fan-out (fanout and workers)")
    g.add_argument("--subscribers", type=int, default=1000)
    g.add_argument("--payload", type=int, default=100, help="bytes of each message's `data`")
    g.add_argument("--messages-serial", type=int, default=200)
    g.add_argument("--messages-burst", type=int, default=300)
    g.add_argument("--window", type=int, default=50, help="messages in flight in the burst scenario")
    g.add_argument("--fanout-rounds", type=int, default=5)
    g.add_argument("--sample-every", type=int, default=10)
    g.add_argument("--stall-timeout", type=float, default=15.0)
    g = p.add_argument_group("latency")
    g.add_argument("--latency-rate", type=int, default=100, help="HTTP publishes per second to node A")
    g.add_argument("--latency-subscribers", type=int, default=100)
    g.add_argument("--latency-rounds", type=int, default=3)
    g.add_argument("--latency-seconds", type=float, default=5.0)
    g.add_argument("--latency-places", default="disk,tmpfs", help="where the stores are, comma-separated")
    g = p.add_argument_group("memory")
    g.add_argument("--memory-connections", type=int, default=10000)
    g.add_argument("--memory-topics", type=int, default=10000, help="topics, messages, keys and cursors each")
    add_run_args(p)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round of 2 s, 200 subscribers, 2 s of latency, 1,000 connections and topics")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for opt, value in (("--rounds", 1), ("--duration", 2.0), ("--warmup", 1.0), ("--subscribers", 200),
                           ("--messages-serial", 30), ("--messages-burst", 100), ("--fanout-rounds", 1),
                           ("--latency-rounds", 1), ("--latency-seconds", 2.0), ("--memory-connections", 1000),
                           ("--memory-topics", 1000), ("--retries", 0), ("--quiet-timeout", 3.0)):
            if opt not in given:
                setattr(args, opt[2:].replace("-", "_"), value)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.latency_places = [s.strip() for s in args.latency_places.split(",") if s.strip()]
    if args.redis_core is None:
        args.redis_core = args.server_core
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    if filesystem_type(Path(args.disk_dir).resolve()) in {"tmpfs", "ramfs"}:
        raise SystemExit(f"--disk-dir {args.disk_dir} is on tmpfs, where fsync costs nothing: give a folder on a disk")
    if filesystem_type(Path(args.tmpfs_dir).resolve()) not in {"tmpfs", "ramfs"}:
        raise SystemExit(f"--tmpfs-dir {args.tmpfs_dir} is not on tmpfs")
    if not Path(args.notifier).exists():
        raise SystemExit(f"{args.notifier} not found (make bench builds .venv)")
    if not pin_load_generator(args.server_core, args.client_core):
        raise SystemExit("needs two cores: one for notifier and redis-server, one for the load generator")
    args.server_cores = {args.server_core, args.redis_core}
    args.source_ip_list = source_ips(max(args.memory_connections, args.subscribers) + 200, args.source_ips)
    return run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

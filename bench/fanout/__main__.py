"""Fan-out benchmark (issue 4): notifier against three Python peers, side by side.

    .venv/bin/python -m bench.fanout            # full run, ~10 minutes on 2 cores
    .venv/bin/python -m bench.fanout --quick    # smoke run, about a minute

What it does, in one process (the load generator, pinned to one core) that
starts every server as a subprocess (pinned to the other core):

* 1,000 subscribers (``--subscribers``) per server, all ``picows`` connections
  in one asyncio loop, subscribed to topic ``bench``; one publisher connection
  per server sends ``publish`` commands over the same WebSocket protocol.
* Scenarios: ``serial`` (at most one message in flight: publish, wait until
  every subscriber has it and the ``published`` reply is in, publish the next)
  and ``burst`` (``--window`` messages in flight, default 50). A message is "in
  flight" from its publish until it is acknowledged and the subscribers have
  received one message's worth of deliveries (counted in aggregate).
* Every round publishes ``--messages`` messages with ``--payload``-byte ``data``
  holding a ``perf_counter_ns`` timestamp; every ``--sample-every``-th
  subscriber parses what it receives (checks type, order, duplicates) and
  records publish-to-receive latency; every subscriber counts, and the round
  is checked for exactly ``messages`` deliveries per subscriber.
* Rounds are interleaved across servers (round 1 of every server, then round
  2, ...) so that drift on a shared machine hits all of them alike; the table
  shows medians over ``--rounds`` rounds after one unrecorded warm-up round.
* Server CPU seconds come from /proc/<pid>/stat (utime+stime of the server and
  its children) over the measured window; client CPU % is the load
  generator's own, so a reader can see whether it was the bottleneck; "frames
  per client read" (sampled subscribers) shows whether a server coalesces
  several messages into one write.
* Besides the three peers and notifier, a reference row: a ``picows`` server
  doing one ``send`` (one syscall) per delivery with frames built in C
  (``bench/peers/picows_reference.py``), i.e. the one-syscall-per-delivery
  limit in a Python process, and a check on the load generator's headroom.
* The machine may be shared: the CPU used by every other process during each
  round is recorded, and a round during which it exceeded ``--max-others`` is
  repeated (a bounded number of times) after waiting for quiet.
* The load generator uses uvloop when it is installed (it is not a dependency
  of any server: the FastAPI peer pins uvicorn to the stdlib asyncio loop).
* Memory per idle connection: ``--memory-connections`` (10,000) subscribed,
  idle connections to a fresh notifier and a fresh ``websockets`` peer; RSS
  delta / connections.
* Send floor (``bench/send_floor.py``): a child pinned to the server core
  sends the same bytes to ``--subscribers`` TCP_NODELAY loopback sockets in a
  plain loop, ``--floor-rounds`` timed rounds, for a notifier frame's size and
  for 2,000 bytes: the least one round to every subscriber costs here, with no
  server code at all; the HTTP goal's line quotes it.
* HTTP publish -> WebSocket receive: ``POST /api/publish`` paced at
  ``--http-rate`` (1,000/s) for ``--http-seconds`` to 1,000 subscribers of a
  fresh notifier; p99 publish-to-receive. So that the load generator (which
  also runs the HTTP publisher) is not what delays delivery, only
  ``--latency-sample`` (100) subscribers, spread through the subscription
  order, are picows clients that parse and time every message; the others are
  real WebSocket clients too (the upgrade with the token and the masked
  ``subscribe`` done by hand on a plain asyncio connection) that then only
  count the bytes they read, one Python call per read: each must end with at
  least the bytes a sampled subscriber got for all messages (the same frames),
  and a shortfall is reported as lost deliveries.

Results: a table on stdout (also as Markdown in ``bench/results/``, with a JSON
of every round), and the plot ``bench/fanout.png``.

This module runs the parts in turn and writes the report; each part is a
module that imports only ``bench.common``: ``bench/fanout/rounds.py`` (serial
and burst), ``memory.py``, ``http_publish.py``, and ``bench/send_floor.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import send_floor
from bench.common.clients import message_wire_size
from bench.common.proc import OUR_PIDS, others_cpu_delta, run_quietly, user_process_times, wait_quiet
from bench.common.run import (ROOT, add_run_args, git_version, log, pin_load_generator, raise_nofile, run,
                              source_ips)
from bench.common.servers import BASELINE, PEERS, NOTIFIERS, server_preexec
from bench.fanout import http_publish, memory, rounds

ALL_SERVERS = list(PEERS) + list(NOTIFIERS)


async def floor_test(args: argparse.Namespace) -> dict:
    """bench/send_floor.py with this run's cores and subscriber count: the least
    one round of sends to every subscriber costs on the server core."""
    exclude = OUR_PIDS | {os.getpid()}
    others0 = user_process_times(exclude)
    t0 = time.perf_counter()
    f = await send_floor.measure(args.subscribers, [message_wire_size(args.payload), send_floor.BATCH_SIZE],
                                 args.floor_rounds, preexec=server_preexec(args.server_core),
                                 source_ips=args.source_ip_list)
    f["others_cpu_pct"] = 100 * others_cpu_delta(others0, user_process_times(exclude)) / (time.perf_counter() - t0)
    log("send floor: " + ", ".join(f"{r['bytes']} bytes: round median {r['round_ms_median']:.2f} ms "
                                   f"(p90 {r['round_ms_p90']:.2f}), {r['us_per_send']:.2f} µs per send"
                                   for r in f["sizes"])
        + f"; other processes {f['others_cpu_pct']:.0f}%"
        + (f"  PROBLEMS: {f['problems']}" if f["problems"] else ""))
    return f


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fanout-"))
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "source_ip_list"}}
    targets: list[rounds.Target] = []
    failures: dict[str, list[str]] = {}
    mem: list[dict] = []
    http: dict | None = None
    floor: dict | None = None
    try:
        await wait_quiet(args, exclude={os.getpid()})
        await rounds.serial_and_burst(targets, workdir, args, started, failures)

        if args.memory_connections > 0:
            for name in [BASELINE, "notifier"]:
                if name not in args.memory_servers:
                    continue
                try:
                    mem.append(await memory.memory_test(name, workdir, args))
                except Exception as exc:
                    log(f"{name}: memory test failed: {exc}")
                    mem.append({"server": name, "error": str(exc)})
        if args.floor_rounds > 0:
            floor = await run_quietly(args, "send floor", lambda attempt: floor_test(args))
        if args.http_seconds > 0:
            http = await run_quietly(args, "HTTP publish test",
                                     lambda attempt: http_publish.http_test(workdir, args, attempt))
    finally:
        for t in targets:
            t.server.stop()
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"server logs kept in {workdir}")

    for m in mem:
        if "error" in m:
            failures.setdefault(f"{m['server']} (memory)", []).append(m["error"])
    if floor:
        if "error" in floor:
            failures.setdefault("send floor", []).append(floor["error"])
        for p_ in floor.get("problems", []):
            failures.setdefault("send floor", []).append(p_)
    if http:
        if "error" in http:
            failures.setdefault("notifier (HTTP publish)", []).append(http["error"])
        for p_ in http.get("problems", []):
            failures.setdefault("notifier (HTTP publish)", []).append(p_)
        if http.get("first_error"):
            failures.setdefault("notifier (HTTP publish)", []).append(http["first_error"])
    summary = rounds.summarize(targets)
    verdicts = rounds.goals(summary) + [memory.goal(mem)]
    title, verdict, note = http_publish.goal(http)
    if send_floor.floor_note(floor):
        # Context only: the HTTP verdict does not depend on it.
        note = f"{note}; send floor: {send_floor.floor_note(floor)}"
    verdicts.append((title, verdict, note))
    version = git_version()
    total_s = time.monotonic() - started
    cmd = "python -m bench.fanout " + " ".join(sys.argv[1:])
    header = (f"{args.subscribers} subscribers, {args.payload}-byte data, serial: {args.messages_serial} "
              f"messages/round, burst: {args.messages_burst} messages/round with {args.window} in flight, "
              f"medians of {args.rounds} rounds; server on core {args.server_core}, load generator on core "
              f"{args.client_core}; {platform.python_implementation()} {platform.python_version()}, "
              f"{os.cpu_count()} cores; notifier at {version}; run took {total_s:.0f} s")
    md = [f"Command: `{cmd.strip()}`", "", header, "",
          "Ratios in parentheses are to the `websockets` peer. Server CPU s is for one round "
          "(the same work for every server).", "", rounds.fmt_table(summary)]
    if mem:
        md += ["", "Memory per idle connection (connected and subscribed, compression off):", "", memory.fmt_memory(mem)]
    if floor:
        md += ["", "Send floor (bench/send_floor.py: one plain `send` per socket, no server):", "",
               send_floor.fmt_floor(floor)]
    if http:
        md += ["", "HTTP `POST /api/publish` -> WebSocket receive (notifier, durable):", "", http_publish.fmt_http(http)]
    md += ["", "Goals (issue 4):", ""] + [f"- {v}: {title}: {note}" for title, v, note in verdicts]
    if failures:
        md += ["", "Problems seen:", ""] + [f"- {name}: " + f.replace("\n", "\n      ")
                                            for name, fs in failures.items() for f in fs]
    text = "\n".join(md)
    print()
    print(text)
    results.update(summary=summary, rounds={t.server.name: t.rounds for t in targets}, memory=mem,
                   send_floor=floor, http=http,
                   goals=verdicts, failures=failures, markdown=text, total_s=total_s,
                   when=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fanout.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "fanout.md").write_text(text + "\n")
    if summary and args.plot:
        caption = (f"python -m bench.fanout: {args.subscribers} subscribers, {args.payload}-byte data, medians of "
                   f"{args.rounds} rounds; server pinned to core {args.server_core}, picows load generator "
                   f"on core {args.client_core}; {time.strftime('%Y-%m-%d')}")
        rounds.plot(summary, Path(args.plot), caption)
        log(f"plot written to {args.plot}")
    log(f"results in {out_dir}/fanout.json and fanout.md; total {total_s:.0f} s")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--servers", default=",".join(ALL_SERVERS),
                   help=f"comma-separated, from {','.join(ALL_SERVERS)}")
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--payload", type=int, default=100, help="bytes of each message's `data` (compact JSON)")
    p.add_argument("--messages-serial", type=int, default=200, help="messages per serial round")
    p.add_argument("--messages-burst", type=int, default=300, help="messages per burst round")
    p.add_argument("--window", type=int, default=50, help="messages in flight in the burst scenario")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per scenario (after one warm-up)")
    p.add_argument("--sample-every", type=int, default=10,
                   help="every Nth subscriber parses, checks and times what it gets")
    p.add_argument("--memory-connections", type=int, default=10000, help="0 to skip the memory test")
    p.add_argument("--memory-servers", default=f"{BASELINE},notifier")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading RSS")
    p.add_argument("--floor-rounds", type=int, default=300,
                   help="send floor (bench/send_floor.py): timed rounds per send size; 0 to skip it")
    p.add_argument("--http-rate", type=int, default=1000, help="POST /api/publish per second")
    p.add_argument("--http-seconds", type=float, default=5.0, help="0 to skip the HTTP publish test")
    p.add_argument("--latency-sample", type=int, default=100,
                   help="HTTP test: subscribers (picows, spread through the subscription order) that parse and "
                        "time every message; the others complete the handshake and subscribe by hand, then only "
                        "count bytes, checked at the end against the sampled ones' (a shortfall is lost deliveries)")
    p.add_argument("--http-connections", type=int, default=256,
                   help="keep-alive connections the HTTP publisher opens before the measurement and sends on "
                        "(open loop: each request goes at its time on any idle one)")
    p.add_argument("--stall-timeout", type=float, default=15.0, help="fail a round after this long without progress")
    p.add_argument("--retry-until", type=float, default=360.0,
                   help="no more repeats of disturbed rounds after this many seconds into the run")
    p.add_argument("--plot", default=str(ROOT / "bench" / "fanout.png"), help="'' to skip")
    add_run_args(p)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 200 subscribers, short rounds, 2,000 idle connections, 100 floor rounds, "
                        "1 s of HTTP")
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for opt, value in (("--subscribers", 200), ("--messages-serial", 30), ("--messages-burst", 100),
                           ("--rounds", 2), ("--memory-connections", 2000), ("--http-seconds", 1.0),
                           ("--settle", 1.0), ("--floor-rounds", 100)):
            if opt not in given:
                setattr(args, opt[2:].replace("-", "_"), value)
        if "--plot" not in given:
            args.plot = str(Path(args.results) / "fanout-quick.png")
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.memory_servers = [s.strip() for s in args.memory_servers.split(",") if s.strip()]
    for s in args.servers + args.memory_servers:
        if s not in ALL_SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(ALL_SERVERS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.subscribers * len(args.servers), args.memory_connections + 100) + 200
    if soft < need:
        log(f"warning: open files limit {soft} < {need}; raise `ulimit -n` (hard limit) for this run")
    if not pin_load_generator(args.server_core, args.client_core):
        args.server_core = args.client_core = None
    args.source_ip_list = source_ips(max(args.memory_connections, args.subscribers), args.source_ips)
    if args.servers and any(s.startswith("notifier") for s in args.servers + args.memory_servers):
        problem = None
        if not Path(args.notifier).exists():
            problem = "not found"
        else:
            check = subprocess.run([args.notifier, "--help"], capture_output=True, text=True)
            if check.returncode != 0:
                problem = f"does not run: {(check.stderr or check.stdout).strip().splitlines()[-1:]}"
        if problem:
            log(f"{args.notifier} {problem}: skipping notifier")
            args.http_seconds = 0
            args.servers = [s for s in args.servers if not s.startswith("notifier")]
            args.memory_servers = [s for s in args.memory_servers if not s.startswith("notifier")]
    return run(amain(args))

if __name__ == "__main__":
    sys.exit(main())

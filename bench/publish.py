"""Durable publish benchmark: notifier against a no-op Tornado handler, same run, same machine.

    python -m bench.publish [--rounds 5] [--duration 5]

Starts ``bench.noop_server`` and ``notifier serve`` (embedded SQLite in a
temporary folder) as single processes pinned to core 0, drives them from
core 1 with ``wrk`` (a Lua script builds the POST bodies and counts every
answer that is not a 200) and prints, as medians of alternating rounds:

- no-op requests/s and notifier durable publishes/s with 50 keep-alive
  clients on ``POST /api/publish``, and their ratio (goal: at least 0.7);
- notifier durable messages/s through ``POST /api/publish/batch`` with
  batches of 100 and a few concurrent clients (goal: at least 50,000/s).

Afterwards it checks that durability was not faked. It runs 3 s more of
single publishes under ``strace`` and compares the fsync/fdatasync calls of
notifier's threads with the group commits its /metrics counted (at least one
per commit). It reads the topics' heads over the HTTP API, SIGKILLs notifier,
starts it again on the same database and reads them again: every 200 that was
counted must be there, before and after the kill.

Without ``wrk`` on the PATH it falls back to a Python asyncio client (raw
HTTP/1.1 keep-alive on sockets, also pinned to core 1) and says so. Each run
prints how busy the server's and the load's cores were: a load core near 100%
means the client, not the server, set the pace, and the run is not valid;
"other" is the share of the server's core that anything else took (interrupts,
the hypervisor, a neighbour's build): a high one marks a disturbed round.

The load generator, wrk's Lua script and the fallback are in
``bench/common/httpload.py`` (``bench.cluster`` drives them too).

The database must be on a disk: on tmpfs an fsync costs nothing, so the
benchmark refuses to run there (``--dir`` picks another parent folder).
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common.httpload import TOPICS, Load, commit_counters, run_python, run_wrk, wrk_version
from bench.common.proc import core_times
from bench.common.run import git_version
from bench.common.servers import Server, http
from bench.common.stats import median

SERVER_CORE = 0
CLIENT_CORE = 1
RATIO_GOAL = 0.7
BATCH_GOAL = 50_000
# A round in which anything else took more of the server's core than this is
# set aside and run again (at most ATTEMPTS times the rounds asked for).
OTHER_LIMIT = 0.15
ATTEMPTS = 3
QUIET_WAIT = 120.0  # seconds a round waits for the server's core to be left alone
FSYNC_CHECK_SECONDS = 3

@dataclass
class Totals:
    """What notifier acknowledged, for the durability check."""
    acked_messages: int = 0
    # Messages in requests the load generator had sent when it stopped but did
    # not wait for: the server may still store them, so the heads can exceed
    # what was counted by this much.
    in_flight_bound: int = 0


def wait_for_quiet_core(core: int, limit: float = QUIET_WAIT) -> None:
    """Before a round, wait (up to ``limit`` s) until the idle servers' core is
    nearly unused: on a shared machine another job may be running there."""
    deadline = time.monotonic() + limit
    told = False
    while True:
        before = core_times()[core][0]
        time.sleep(1)
        busy = core_times()[core][0] - before
        if busy <= OTHER_LIMIT or time.monotonic() >= deadline:
            if told:
                print(f"       core {core} is {busy:.0%} busy; going on")
            return
        if not told:
            print(f"       core {core} is {busy:.0%} busy with something else: waiting up to {limit:g} s")
            told = True


def filesystem_type(path: Path) -> str:
    """The type of the file system ``path`` is on, from the longest matching mount point."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mount_point, fs_type = line.split()[1:3]
        mount_point = mount_point.replace("\\040", " ")
        inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best):
            best, kind = mount_point, fs_type
    return kind


def start(server: Server) -> Server:
    """Start `server` (again, after a stop: same port, same store) and wait until it listens."""
    server.start()
    try:
        asyncio.run(server.wait_listening())
    except RuntimeError as exc:
        server.stop(signal.SIGKILL)
        raise SystemExit(str(exc)) from None
    return server


def read_heads(port: int) -> dict[str, int]:
    heads = {}
    for i in range(TOPICS):
        topic = f"bench.t{i}"
        status, body = http("GET", f"http://127.0.0.1:{port}/api/topics/{topic}/messages?since=0&limit=1")
        if status != 200:
            raise SystemExit(f"GET /api/topics/{topic}/messages answered {status}: {body[:300]!r}")
        heads[topic] = json.loads(body)["head"]
    return heads


def syscall_counts(strace_summary: str) -> dict[str, int]:
    """Calls per syscall from the table ``strace -c`` writes."""
    counts = {}
    for line in strace_summary.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[3].isdigit() and not parts[-1].startswith("total"):
            counts[parts[-1]] = int(parts[3])
    return counts


def settled_heads(port: int, timeout: float = 30) -> dict[str, int]:
    """The heads once they stop moving: requests a run left in flight are
    still being stored after the load generator has gone."""
    heads = read_heads(port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = read_heads(port)
        if again == heads:
            return heads
        heads = again
    raise SystemExit(f"the heads were still moving {timeout:g} s after the last run")


def last_message(port: int, topic: str, head: int) -> dict | None:
    status, body = http("GET", f"http://127.0.0.1:{port}/api/topics/{topic}/messages?since={head - 1}&limit=1")
    messages = json.loads(body)["messages"] if status == 200 else []
    return messages[0] if messages else None


def main() -> int:
    parser = argparse.ArgumentParser(description="Durable publish benchmark: notifier against a no-op Tornado handler.")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per case (default 5)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load per case first (default 2)")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive clients for single publishes (default 50)")
    parser.add_argument("--batch-size", type=int, default=100, help="messages per batch (default 100)")
    parser.add_argument("--batch-clients", default="4,8", help="concurrent batch clients, comma-separated (default 4,8)")
    parser.add_argument("--pad", type=int, default=100, help="bytes of padding in each message's data (default 100)")
    parser.add_argument("--notifier", default=str(Path(sys.executable).parent / "notifier") + " serve",
                        help="command that runs notifier (default: this venv's 'notifier serve')")
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="where to make the temporary folder for the database and logs (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (database and logs)")
    args = parser.parse_args()
    batch_clients = [int(c) for c in args.batch_clients.split(",")]

    if not {SERVER_CORE, CLIENT_CORE} <= os.sched_getaffinity(0):
        raise SystemExit(f"needs cores {SERVER_CORE} and {CLIENT_CORE}: one for the server, one for the load")
    if shutil.which("taskset") is None:
        raise SystemExit("needs taskset (Debian: util-linux)")
    if wrk_version():
        drive, client_name = run_wrk, wrk_version()
    else:
        drive, client_name = run_python, "Python asyncio fallback client (wrk not found: apt-get install wrk)"
        os.sched_setaffinity(0, {CLIENT_CORE})
        print("wrk not found: falling back to a Python asyncio client on core 1", file=sys.stderr)

    parent = Path(args.dir).resolve()
    if filesystem_type(parent) in {"tmpfs", "ramfs"}:
        raise SystemExit(f"{parent} is on {filesystem_type(parent)}, where fsync costs nothing: "
                         "give --dir a folder on a disk")
    workdir = Path(tempfile.mkdtemp(prefix="notifier-bench-", dir=parent))
    noop = start(Server("noop", workdir, core=SERVER_CORE))
    notifier_command = args.notifier.split()
    notifier = start(Server("notifier", workdir, core=SERVER_CORE, notifier=notifier_command[0],
                            serve=notifier_command))
    totals = Totals()

    def measure(server: Server, path: str, connections: int, per_request: int, seconds: float, label: str) -> Load:
        counters_before = commit_counters(server.port) if server is notifier else None
        load = drive(label, server.port, path, connections, seconds, per_request, args.pad, workdir,
                     parts={"server": server.cpu}, server_cores={SERVER_CORE}, client_core=CLIENT_CORE)
        everything.append(load)
        if server is notifier:
            totals.acked_messages += load.ok * per_request
            totals.in_flight_bound += connections * per_request
            counters_after = commit_counters(server.port)
            if counters_before and counters_after:
                load.commits = counters_after[0] - counters_before[0]
                load.jobs = counters_after[1] - counters_before[1]
        if load.client_bound:
            print(f"  !! {label}: the load generator used {load.client_busy:.0%} of its core", file=sys.stderr)
        if not load.valid:
            print(f"  !! {label}: {load.non200} non-200 answers, {load.socket_errors} socket errors, "
                  f"{load.timeouts} timeouts; first bad answer: {load.bad_sample}", file=sys.stderr)
        return load

    cases = [("noop", noop, "/api/publish", args.connections, 1),
             ("publish", notifier, "/api/publish", args.connections, 1)]
    cases += [(f"batch c={c}", notifier, "/api/publish/batch", c, args.batch_size) for c in batch_clients]
    results: dict[str, list[Load]] = {name: [] for name, *_ in cases}  # undisturbed rounds only
    everything: list[Load] = []
    round_no = set_aside = 0
    try:
        print(f"server core {SERVER_CORE}, load core {CLIENT_CORE}, load generator: {client_name}")
        print(f"notifier: {' '.join(notifier_command)} "
              f"(store {notifier.dir / 'notifier.db'}, on {filesystem_type(workdir)}); source {git_version()}")
        print(f"{args.rounds} rounds x {args.duration:g} s per case, order reversed every other round; "
              f"{args.warmup:g} s warm-up per case first;\na round in which anything else took over "
              f"{OTHER_LIMIT:.0%} of core {SERVER_CORE} is set aside and run again (up to "
              f"{args.rounds * ATTEMPTS} rounds in all)\n")
        for name, server, path, connections, per_request in cases:
            measure(server, path, connections, per_request, args.warmup, f"warm-up {name}")
        print(f"{'round':>5}  {'case':<12} {'msgs/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'server cpu':>10} {'other':>5} {'load cpu':>8} {'req/commit':>11}  errors")
        while len(results["noop"]) < args.rounds and round_no < args.rounds * ATTEMPTS:
            round_no += 1
            order = cases if round_no % 2 else cases[::-1]
            wait_for_quiet_core(SERVER_CORE)
            this_round = {}
            for name, server, path, connections, per_request in order:
                load = measure(server, path, connections, per_request, args.duration, name)
                this_round[name] = load
                errors = load.non200 + load.socket_errors + load.timeouts
                per_commit = f"{load.jobs / load.commits:.1f}" if load.commits else "-"
                print(f"{round_no:>5}  {name:<12} {load.rate:>9,.0f} {load.p50_ms:>7.2f} {load.p99_ms:>7.2f} "
                      f"{load.server_busy:>10.0%} {max(load.others, 0):>5.0%} {load.client_busy:>8.0%} "
                      f"{per_commit:>11}  {errors}")
            disturbed = [name for name, load in this_round.items() if load.others > OTHER_LIMIT]
            if disturbed:
                set_aside += 1
                print(f"       round {round_no} set aside: something else took over {OTHER_LIMIT:.0%} "
                      f"of core {SERVER_CORE} during {', '.join(disturbed)}")
                continue
            for name, load in this_round.items():
                results[name].append(load)

        fsync_check = None
        if shutil.which("strace"):
            # Count the fsyncs notifier's threads make while it commits: with
            # synchronous=FULL in WAL mode every commit syncs the log.
            before = commit_counters(notifier.port)
            trace_path = workdir / "strace.txt"
            tracer = subprocess.Popen(
                ["taskset", "-c", str(CLIENT_CORE), "strace", "-f", "-c", "-e", "trace=fsync,fdatasync",
                 "-o", str(trace_path), "-p", str(notifier.proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1)  # attaching to every thread
                measure(notifier, "/api/publish", args.connections, 1, FSYNC_CHECK_SECONDS, "fsync check")
                settled_heads(notifier.port)
                after = commit_counters(notifier.port)
            finally:
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
            calls = syscall_counts(trace_path.read_text()) if trace_path.exists() else {}
            if before and after:
                fsync_check = (after[0] - before[0], calls.get("fsync", 0) + calls.get("fdatasync", 0))

        heads = settled_heads(notifier.port)
        sample = last_message(notifier.port, "bench.t0", heads["bench.t0"])
        notifier.stop(signal.SIGKILL)
        start(notifier)
        heads_after_kill = read_heads(notifier.port)
    finally:
        noop.stop()
        notifier.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    clean_rounds = len(results["noop"])
    valid = clean_rounds > 0 and all(load.valid and not load.client_bound for load in everything)
    noop_rate = median([r.rate for r in results["noop"]])
    publish_rate = median([r.rate for r in results["publish"]])
    ratio = publish_rate / noop_rate if noop_rate else 0.0
    stored = sum(heads.values())
    durable = (totals.acked_messages <= stored <= totals.acked_messages + totals.in_flight_bound
               and heads_after_kill == heads and (fsync_check is None or fsync_check[1] >= fsync_check[0]))

    def verdict(ok: bool) -> str:
        return ("PASS" if ok else "FAIL") + ("" if valid and durable else " (run not valid)")

    print(f"\nmedians of {clean_rounds} undisturbed rounds of {args.duration:g} s ({set_aside} set aside); "
          f"{args.connections} keep-alive clients for single publishes, batches of {args.batch_size}")
    print(f"{'measure':<44} {'median':>10} {'goal':>10}  result")
    print(f"{'no-op Tornado POST, requests/s':<44} {noop_rate:>10,.0f} {'':>10}")
    print(f"{'notifier durable publishes/s':<44} {publish_rate:>10,.0f} {'':>10}")
    print(f"{'ratio notifier / no-op':<44} {ratio:>10.2f} {'>= ' + str(RATIO_GOAL):>10}  {verdict(ratio >= RATIO_GOAL)}")
    for c in batch_clients:
        rate = median([r.rate for r in results[f"batch c={c}"]])
        print(f"{f'notifier batch messages/s, {c} clients':<44} {rate:>10,.0f} {f'>= {BATCH_GOAL:,}':>10}  "
              f"{verdict(rate >= BATCH_GOAL)}")

    print(f"\ndurability: {totals.acked_messages:,} messages acknowledged with 200 "
          f"(warm-up included); heads of bench.t0..t{TOPICS - 1} add up to {stored:,} "
          f"(at most {totals.in_flight_bound:,} more: messages in requests still in flight when a run stopped)")
    print(f"after SIGKILL and restart the heads add up to {sum(heads_after_kill.values()):,}"
          f" ({'unchanged' if heads_after_kill == heads else 'CHANGED: ' + repr(heads_after_kill)})")
    if fsync_check is None:
        print("fsyncs not counted (needs strace, and notifier's /metrics)")
    else:
        print(f"fsync check, {FSYNC_CHECK_SECONDS} s of single publishes under strace: {fsync_check[0]:,.0f} commits, "
              f"{fsync_check[1]:,} fsync/fdatasync calls "
              f"({'at least one per commit' if fsync_check[1] >= fsync_check[0] else 'FEWER THAN COMMITS'})")
    if sample:
        print(f"last stored message of bench.t0: seq {sample.get('seq')}, data.n {sample.get('data', {}).get('n')}, "
              f"{len(json.dumps(sample.get('data')))} bytes of data")
    if not valid:
        print("NOT A VALID RUN: some answers were not 200, the load generator was saturated, "
              "or no round ran undisturbed (see above)")
    elif clean_rounds < args.rounds:
        print(f"only {clean_rounds} of the {args.rounds} rounds asked for ran undisturbed")
    if not durable:
        print("NOT DURABLE: the stored heads do not account for every acknowledged message, "
              "or notifier made fewer fsyncs than commits (see above)")
    if drive is run_python:
        print("load generator: the Python fallback client, not wrk")
    return 0 if valid and durable else 1


if __name__ == "__main__":
    sys.exit(main())

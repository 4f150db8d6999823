"""The load generator's own process: log lines, limits, pinning, source addresses, event loop, commit."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Coroutine

ROOT = Path(__file__).resolve().parent.parent.parent
# A load generator at this much CPU (% of its core) or more may have set the
# pace rather than the server: the reports flag such figures.
CLIENT_BOUND_PCT = 90


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options bench.fanout and bench.storm share: a shared machine's
    quiet waits and repeats, cores, source addresses, notifier, results."""
    p.add_argument("--max-others", type=float, default=20.0,
                   help="a round during which other processes used more CPU %% than this is repeated")
    p.add_argument("--retries", type=int, default=2, help="repeats of a disturbed round")
    p.add_argument("--quiet-timeout", type=float, default=20.0,
                   help="seconds to wait for other processes to calm down (at start and before a repeat)")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--source-ips", type=int, default=0,
                   help="spread client connections over 127.0.0.1..N (0: enough for the connection count)")
    p.add_argument("--notifier", default=str(ROOT / ".venv" / "bin" / "notifier"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and stores")


def raise_nofile() -> None:
    """Soft open-files limit up to the hard one: thousands of sockets per process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pin_load_generator(server_core: int | None, client_core: int | None) -> bool:
    """Pin this process to `client_core`, leaving `server_core` to the servers.
    False (after a warning) when the two are not distinct cores this process
    may use: then nothing is pinned."""
    cores = os.sched_getaffinity(0)
    if {server_core, client_core} <= cores and server_core != client_core:
        os.sched_setaffinity(0, {client_core})
        return True
    log(f"warning: cannot pin server to core {server_core} and client to core {client_core} "
        f"(available: {sorted(cores)}); running unpinned")
    return False


def source_ips(connections: int, given: int = 0) -> list[str]:
    """Loopback source addresses to spread `connections` over (`given` of them
    if not 0), enough that ephemeral ports never run short."""
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    per_ip = max(1000, (hi - lo) // 2)
    n_ips = given or max(1, math.ceil(connections / per_ip))
    return [f"127.0.0.{i + 1}" for i in range(n_ips)]


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run `main` on uvloop when it is installed: the load generator's loop
    only (no server uses it; the FastAPI peer pins uvicorn to stdlib asyncio)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def git_version() -> str:
    """The commit the notifier under test comes from, and whether notifier/ had
    uncommitted changes then."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "notifier"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    if not head:
        return "unknown commit"
    return f"commit {head}" + (" with uncommitted changes in notifier/" if dirty else "")

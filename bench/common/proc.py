"""CPU and memory from /proc, and waiting for a quiet machine (it may be shared)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Awaitable, Callable

from bench.common.run import log

_TICK = os.sysconf("SC_CLK_TCK")
# Every process this run started (servers, idle or not): not "other processes".
OUR_PIDS: set[int] = set()


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()  # after the command name, which may hold spaces


def _all_stat_fields():
    """(pid, stat fields) of every process on the machine."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields_ = _stat_fields(entry)
            if fields_ is not None:
                yield int(entry), fields_


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants (notifier might run helpers)."""
    children: dict[int, list[int]] = {}
    for child, fields_ in _all_stat_fields():
        children.setdefault(int(fields_[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields_ = _stat_fields(pid)
        if fields_ is not None:
            total += int(fields_[11]) + int(fields_[12])  # utime, stime (fields 14, 15)
    return total / _TICK


def user_process_times(exclude: set[int]) -> dict[int, int]:
    """CPU ticks of every user-space process on the machine except `exclude`.

    Kernel threads (children of kthreadd, pid 2) are left out: ksoftirqd does
    the server's own network work when the server keeps its core busy."""
    return {pid: int(fields_[11]) + int(fields_[12]) for pid, fields_ in _all_stat_fields()
            if pid not in exclude and pid != 2 and int(fields_[1]) != 2}


def wait_bound(pid: int) -> float:
    """A running total whose growth over a stretch of time is at least how long
    other tasks kept the process's main thread (a server's event loop) from
    its core: the thread's run-queue wait (/proc/<pid>/task/<tid>/schedstat)
    less the CPU the process's other threads used, which may have been all
    that it waited for on a server pinned to one core. Short-lived processes
    escape the per-process CPU count, not this."""
    wait = others = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        if int(tid) == pid:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    wait = int(f.read().split()[1]) / 1e9
            except (OSError, IndexError, ValueError):
                pass
        else:
            fields_ = _stat_fields(f"{pid}/task/{tid}")
            if fields_ is not None:
                others += (int(fields_[11]) + int(fields_[12])) / _TICK
    return wait - others


def others_cpu_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds used between two `user_process_times` samples (processes that
    exited in between are not seen: an underestimate, never negative)."""
    return sum(max(0, t - before.get(pid, 0)) for pid, t in after.items()) / _TICK


def memory_bytes(pids: list[int], field: str = "VmRSS") -> int:
    """A memory line of /proc/<pid>/status summed over the processes: VmRSS
    (resident now) or VmHWM (the most it has been resident)."""
    total = 0
    prefix = field + ":"
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(prefix):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def core_times() -> dict[int, tuple[float, float]]:
    """Per core: (busy seconds, softirq+irq seconds) from /proc/stat. Busy
    includes interrupts and the hypervisor's steal."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]
                user, nice, system, idle, iowait, irq, softirq, steal = v
                out[int(name[3:])] = ((user + nice + system + irq + softirq + steal) / _TICK,
                                      (irq + softirq) / _TICK)
    return out


def listen_overflows() -> int:
    """Connections the kernel dropped at a full accept queue since boot, on the
    whole machine (TcpExt ListenOverflows): each costs its client a TCP
    retransmission, 0.2 s to 1 s and more."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split())).get("ListenOverflows", 0))
    return 0


async def wait_quiet(args: argparse.Namespace, exclude: set[int], timeout: float | None = None) -> bool:
    """Wait (up to `timeout`) until other processes use under `--max-others`/2 % CPU over a second."""
    deadline = time.monotonic() + (args.quiet_timeout if timeout is None else timeout)
    while True:
        a = user_process_times(exclude)
        await asyncio.sleep(1.0)
        pct = 100 * others_cpu_delta(a, user_process_times(exclude))
        if pct < args.max_others / 2:
            return True
        if time.monotonic() > deadline:
            log(f"  machine still busy ({pct:.0f}% CPU in other processes); going on")
            return False


def time_wait_sockets() -> int:
    """TCP sockets in TIME_WAIT, machine-wide (/proc/net/sockstat)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


async def wait_time_wait(most: int = 2000, timeout: float = 75.0) -> None:
    """Until at most `most` sockets are in TIME_WAIT (each lasts 60 s). A
    previous run's tens of thousands make every connect() search for a free
    port: seen here to slow a fresh connect of 10,000 clients from 4.3 s to
    19.6 s, with the load generator at 98% of its core."""
    deadline = time.monotonic() + timeout
    waited = False
    while (count := time_wait_sockets()) > most:
        if not waited:
            log(f"  {count:,} sockets in TIME_WAIT from an earlier run: waiting for them to expire")
            waited = True
        if time.monotonic() > deadline:
            log(f"  still {count:,} in TIME_WAIT; going on")
            return
        await asyncio.sleep(1.0)


async def run_quietly(args: argparse.Namespace, what: str,
                      run: Callable[[int], Awaitable[dict]]) -> dict:
    """``run(attempt)`` once the machine is quiet; repeated (up to --retries)
    while other processes used more CPU than --max-others during it. A
    failure is returned as {"error": ...}."""
    for attempt in range(args.retries + 1):
        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        try:
            result = await run(attempt)
        except Exception as exc:
            log(f"{what} failed: {exc}")
            return {"error": str(exc)}
        # A server kept from its core by other tasks (where measured) was disturbed too.
        disturbed = max(result["others_cpu_pct"], result.get("server_wait_pct", 0.0))
        if disturbed <= args.max_others or attempt == args.retries:
            return result
        log(f"  other processes used {result['others_cpu_pct']:.0f}% CPU during the {what}"
            + (f", other tasks kept the server's event loop from its core {result['server_wait_pct']:.0f}% "
               f"of the time" if "server_wait_pct" in result else "") + ": repeating it")
    raise AssertionError("unreachable: the last attempt returns")

"""The HTTP publish load generator: ``wrk`` with a Lua script that builds
``POST /api/publish`` (or ``/api/publish/batch``) bodies and counts every
answer that is not a 200, or a Python asyncio fallback client when ``wrk``
is missing; and notifier's group-commit counters from /metrics.

Every body is ``{"topic":"bench.t<n % 10>","data":{"n":<n>,"pad":"<pad bytes>"}}``
with ``n`` running on per client thread, so every stored message is distinct.
A run measures, over its wall time, the CPU of each part of the server under
test (a ``parts`` callable each: notifier, redis-server), the load
generator's, and what anything else took of the server's cores."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench.common.proc import core_times
from bench.common.servers import API_KEY, http
from bench.common.stats import percentile

TOPICS = 10
CLIENT_BUSY_LIMIT = 0.9

# One request body per call of request(): ``n`` runs on per thread, so every
# stored message is distinct. response() counts each status; done() prints the
# totals of all threads as one JSON line for the harness.
WRK_SCRIPT = r"""
local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

function init(args)
  mode = args[1]
  per_request = tonumber(args[2])
  pad = string.rep("x", tonumber(args[3]))
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. args[4]}
  n = tid * 1000000000
  ok = 0
  bad = 0
  bad_sample = ""
end

local function message()
  n = n + 1
  return '{"topic":"bench.t' .. (n % 10) .. '","data":{"n":' .. n .. ',"pad":"' .. pad .. '"}}'
end

function request()
  local body
  if mode == "batch" then
    local items = {}
    for i = 1, per_request do items[i] = message() end
    body = '{"messages":[' .. table.concat(items, ",") .. ']}'
  else
    body = message()
  end
  return wrk.format("POST", nil, headers, body)
end

function response(status, hdrs, body)
  if status == 200 then
    ok = ok + 1
  else
    bad = bad + 1
    if bad_sample == "" then bad_sample = status .. " " .. string.sub(body, 1, 300) end
  end
end

function done(summary, latency, requests)
  local ok_total, bad_total, sample = 0, 0, ""
  for _, t in ipairs(threads) do
    ok_total = ok_total + t:get("ok")
    bad_total = bad_total + t:get("bad")
    if sample == "" then sample = t:get("bad_sample") end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"ok":%d,"non200":%d,"duration_us":%d,' ..
    '"socket_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, ok_total, bad_total, summary.duration,
    e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
  io.write("BENCHSAMPLE " .. string.gsub(sample, "\n", " ") .. "\n")
end
"""


@dataclass
class Load:
    """One timed run of the load generator against one URL."""
    label: str
    requests: int          # answers received (any status)
    ok: int                # answers with status 200
    non200: int
    socket_errors: int
    timeouts: int
    seconds: float
    per_request: int       # messages per request (1, or the batch size)
    p50_ms: float
    p99_ms: float
    server_busy: float     # share of one core the server used (every part together)
    client_busy: float     # share of one core the load generator used
    others: float          # share of the server's cores used by anything else, hypervisor included
    bad_sample: str = ""
    parts: dict[str, float] = field(default_factory=dict)  # share of one core per part of the server
    part_seconds: dict[str, float] = field(default_factory=dict)  # CPU seconds per part
    commits: float | None = None   # notifier's group commits during the run, from /metrics
    jobs: float | None = None      # store jobs (publish requests) those commits carried

    @property
    def valid(self) -> bool:
        return self.non200 == 0 and self.socket_errors == 0 and self.timeouts == 0

    @property
    def client_bound(self) -> bool:
        """The load generator's core was nearly saturated: it may have set the pace."""
        return self.client_busy >= CLIENT_BUSY_LIMIT

    @property
    def rate(self) -> float:
        """Acknowledged messages per second."""
        return self.ok * self.per_request / self.seconds


Parts = dict[str, Callable[[], float]]


def _cpu(parts: Parts) -> dict[str, float]:
    return {name: seconds() for name, seconds in parts.items()}


def _busy(cores: set[int]) -> float:
    times = core_times()
    return sum(times[c][0] for c in cores)


def _finish(before: dict[str, float], parts: Parts) -> tuple[dict[str, float], float]:
    seconds = {name: cpu() - before[name] for name, cpu in parts.items()}
    return seconds, sum(seconds.values())


def wrk_version() -> str | None:
    """``wrk <version>`` when wrk is on the PATH, else None."""
    if shutil.which("wrk") is None:
        return None
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    return "wrk " + out.split(" [")[0].removeprefix("wrk ").strip()


def run_wrk(label: str, port: int, path: str, connections: int, seconds: float, per_request: int,
            pad: int, workdir: Path, *, parts: Parts, server_cores: set[int], client_core: int) -> Load:
    """wrk (one thread, pinned to `client_core`) for `seconds` against
    127.0.0.1:`port``path`."""
    script = workdir / "publish.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    mode = "batch" if path.endswith("/batch") else "single"
    command = ["taskset", "-c", str(client_core), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s",
               "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}{path}",
               "--", mode, str(per_request), str(pad), API_KEY]
    cpu_before, busy_before = _cpu(parts), _busy(server_cores)
    wall_before = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - wall_before
    part_seconds, server_cpu = _finish(cpu_before, parts)
    client_cpu = usage.ru_utime + usage.ru_stime
    busy = _busy(server_cores) - busy_before
    others = (busy - server_cpu - (client_cpu if client_core in server_cores else 0)) / wall
    process.returncode = os.waitstatus_to_exitcode(status)
    stats = next((json.loads(line.split(" ", 1)[1]) for line in output.splitlines()
                  if line.startswith("BENCHJSON ")), None)
    if process.returncode != 0 or stats is None:
        raise SystemExit(f"wrk failed ({process.returncode}): {' '.join(command)}\n{output}")
    sample = next((line.split(" ", 1)[1] for line in output.splitlines()
                   if line.startswith("BENCHSAMPLE ")), "").strip()
    return Load(label, stats["requests"], stats["ok"], stats["non200"], stats["socket_errors"],
                stats["timeouts"], stats["duration_us"] / 1e6, per_request,
                stats["p50_us"] / 1e3, stats["p99_us"] / 1e3, server_cpu / wall, client_cpu / wall, others,
                sample, {name: s / wall for name, s in part_seconds.items()}, part_seconds)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection with one request outstanding at a time."""

    def __init__(self, load: "_PythonLoad") -> None:
        self.load = load
        self.buffer = bytearray()
        self.sent_at = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.send()

    def send(self) -> None:
        if self.load.stopping:
            self.transport.close()
            return
        self.sent_at = time.perf_counter()
        self.transport.write(self.load.next_request())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).split(b"\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head[1:]
                           if line.lower().startswith(b"content-length:")), 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            self.load.answered(int(head[0].split()[1]), body, time.perf_counter() - self.sent_at)
            self.send()

    def connection_lost(self, exc) -> None:
        if not self.load.stopping:
            self.load.socket_errors += 1


class _PythonLoad:
    def __init__(self, port: int, path: str, per_request: int, pad: int) -> None:
        self.port, self.path, self.per_request = port, path, per_request
        self.pad = "x" * pad
        self.n = 0
        self.stopping = False
        self.ok = self.non200 = self.socket_errors = 0
        self.latencies: list[float] = []
        self.bad_sample = ""

    def _message(self) -> str:
        self.n += 1
        return f'{{"topic":"bench.t{self.n % TOPICS}","data":{{"n":{self.n},"pad":"{self.pad}"}}}}'

    def next_request(self) -> bytes:
        if self.path.endswith("/batch"):
            body = ('{"messages":[' + ",".join(self._message() for _ in range(self.per_request)) + "]}").encode()
        else:
            body = self._message().encode()
        return (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def answered(self, status: int, body: bytes, latency: float) -> None:
        if self.stopping:
            return
        self.latencies.append(latency)
        if status == 200:
            self.ok += 1
        else:
            self.non200 += 1
            self.bad_sample = self.bad_sample or f"{status} {body[:300].decode(errors='replace')}"

    async def run(self, connections: int, seconds: float) -> float:
        loop = asyncio.get_running_loop()
        transports = []
        for _ in range(connections):
            transport, _ = await loop.create_connection(lambda: _Connection(self), "127.0.0.1", self.port)
            transports.append(transport)
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        self.stopping = True
        elapsed = time.perf_counter() - started
        for transport in transports:
            transport.close()
        return elapsed


def run_python(label: str, port: int, path: str, connections: int, seconds: float, per_request: int,
               pad: int, workdir: Path, *, parts: Parts, server_cores: set[int], client_core: int) -> Load:
    """The fallback: the same load from this process (which the caller has
    pinned to `client_core`), one request outstanding per connection."""
    load = _PythonLoad(port, path, per_request, pad)
    cpu_before, busy_before = _cpu(parts), _busy(server_cores)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    wall_before = time.monotonic()
    elapsed = asyncio.run(load.run(connections, seconds))
    wall = time.monotonic() - wall_before
    usage = resource.getrusage(resource.RUSAGE_SELF)
    latencies = sorted(load.latencies) or [0.0]
    part_seconds, server_cpu = _finish(cpu_before, parts)
    client_cpu = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    busy = _busy(server_cores) - busy_before
    others = (busy - server_cpu - (client_cpu if client_core in server_cores else 0)) / wall
    return Load(label, load.ok + load.non200, load.ok, load.non200, load.socket_errors, 0, elapsed,
                per_request, percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3,
                server_cpu / wall, client_cpu / wall, others, load.bad_sample,
                {name: s / wall for name, s in part_seconds.items()}, part_seconds)


def commit_counters(port: int) -> tuple[float, float] | None:
    """notifier's group-commit counters from /metrics: (commits, jobs
    committed). For the Redis store a commit is one pipeline of scripts."""
    try:
        status, body = http("GET", f"http://127.0.0.1:{port}/metrics")
    except OSError:
        return None
    values = {}
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.partition(" ")
        if name in ("notifier_store_commit_jobs_count", "notifier_store_commit_jobs_sum"):
            values[name] = float(value)
    if status != 200 or len(values) != 2:
        return None
    return values["notifier_store_commit_jobs_count"], values["notifier_store_commit_jobs_sum"]

"""HTTP publish -> WebSocket receive: ``POST /api/publish`` paced at
--http-rate for --http-seconds to --subscribers subscribers of a fresh
notifier (durable); publish-to-receive latency.

So that the load generator (which also runs the HTTP publisher) is not what
delays delivery, only --latency-sample subscribers, spread through the
subscription order, are picows clients that parse and time every message;
the others are ``RawSub`` byte counters, checked at the end against the
sampled ones' total: a shortfall is reported as lost deliveries.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import resource
import time
from pathlib import Path

from bench.common.clients import Hub, close_all, connect_mixed_subscribers, make_data_template, stamp
from bench.common.proc import OUR_PIDS, others_cpu_delta, proc_tree, user_process_times
from bench.common.run import log
from bench.common.servers import API_KEY, LIFTED_LIMITS, TOPIC, Server
from bench.common.stats import percentile


async def http_test(workdir: Path, args: argparse.Namespace, attempt: int = 0) -> dict:
    server = Server(f"notifier@http{attempt or ''}", workdir, core=args.server_core, notifier=args.notifier,
                    env=LIFTED_LIMITS)
    try:
        return await _http_test(server, args)
    finally:
        server.stop()


async def _http_test(server: Server, args: argparse.Namespace) -> dict:
    # Every subscriber is a real WebSocket client, connected and subscribed;
    # only --latency-sample of them (picows) parse and time frames, the others
    # count bytes, so that the load generator is not what delays delivery.
    hub = Hub()
    server.start()
    await server.wait_ready()
    sampled, raw = await connect_mixed_subscribers(server, hub, args.subscribers, args.latency_sample,
                                                   source_ips=args.source_ip_list)
    server.pids = proc_tree(server.proc.pid)
    n = len(sampled) + len(raw)
    log(f"{server.name}: pid {server.proc.pid}, port {server.port}, {n} subscribers "
        f"({len(sampled)} sampled picows, {len(raw)} byte-counting), RSS {server.rss() / 2**20:.0f} MiB")
    rate, seconds = args.http_rate, args.http_seconds
    count = int(rate * seconds)
    head, tail = make_data_template(args.payload)
    # A backend's connection pool: --http-connections keep-alive connections.
    pool: asyncio.Queue = asyncio.Queue()
    opened = 0
    statuses: dict[int, int] = {}
    first_error: list[str] = []
    http_lat: list[int] = []
    sent_at: list[int] = []
    host = f"127.0.0.1:{server.port}"

    async def get_conn():
        nonlocal opened
        if pool.empty() and opened < args.http_connections:
            opened += 1
            return await asyncio.open_connection("127.0.0.1", server.port)
        return await pool.get()

    async def send_one(k: int) -> None:
        nonlocal opened
        try:
            reader, writer = await get_conn()
            ts = stamp()
            if k >= 0:
                sent_at.append(ts)
            body = b'{"topic":"%s","data":%s%d%s}' % (TOPIC.encode(), head, ts, tail)
            writer.write(
                b"POST /api/publish HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (host.encode(), API_KEY.encode(), len(body), body))
            headers = await reader.readuntil(b"\r\n\r\n")
            status = int(headers.split(b" ", 2)[1])
            length = 0
            keep = True
            for line in headers.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep = False
            resp = await reader.readexactly(length) if length else b""
            http_lat.append(stamp() - ts)
            statuses[status] = statuses.get(status, 0) + 1
            if status != 200 and not first_error:
                first_error.append(f"HTTP {status}: {resp[:300]!r}")
            if keep:
                pool.put_nowait((reader, writer))
            else:
                opened -= 1
                writer.close()
        except Exception as exc:
            opened -= 1
            statuses[-1] = statuses.get(-1, 0) + 1
            if not first_error:
                first_error.append(repr(exc))

    def received() -> tuple[int, int]:
        return hub.total, sum(r.nbytes for r in raw)

    # Warm up the connection pool and the server's publish path; then wait
    # until the warm-up messages stopped arriving before counting from zero.
    await asyncio.gather(*(send_one(-1) for _ in range(args.http_connections)))
    await asyncio.sleep(0.5)
    quiet_until = time.monotonic() + 5
    last = received()
    while time.monotonic() < quiet_until:
        await asyncio.sleep(0.2)
        now_ = received()
        if now_ == last:
            break
        last = now_
    statuses.clear()
    http_lat.clear()
    first_error.clear()
    for s in sampled:
        s.n = 0
        s.last_ts = 0
        s.wire = 0
    for r in raw:
        r.nbytes = 0
        r.reads = 0
        r.pings = 0
    hub.total = 0
    hub.lat = []
    hub.bad = []
    hub.reads = hub.sframes = 0
    gc.collect()
    cpu0 = server.cpu()
    rus0 = resource.getrusage(resource.RUSAGE_SELF)
    others0 = user_process_times(OUR_PIDS | {os.getpid()})
    tasks = []
    t0 = time.perf_counter()
    late = 0
    for k in range(count):
        due = t0 + k / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        tasks.append(asyncio.create_task(send_one(k)))
    await asyncio.gather(*tasks)

    def expected_bytes() -> int:
        return max((s.wire for s in sampled), default=0)

    def complete() -> bool:
        if any(s.n < count for s in sampled):
            return False
        want = expected_bytes()
        return all(r.nbytes >= want for r in raw)

    deadline = time.monotonic() + 10
    while not complete() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    cpu1 = server.cpu()
    rus1 = resource.getrusage(resource.RUSAGE_SELF)
    others1 = user_process_times(OUR_PIDS | {os.getpid()})
    send_s = time.perf_counter() - t0  # the whole window: sends and the deliveries after them
    await asyncio.sleep(0.05)  # stragglers (duplicates) before checking counts
    lat = sorted(hub.lat)
    hl = sorted(http_lat)
    problems = list(hub.bad[:5])
    # Byte counters: every sampled subscriber that got all `count` messages saw
    # the same bytes (the same frames); the byte counters must see as many.
    full = [s.wire for s in sampled if s.n == count]
    want = max(full, default=0)
    if len(set(full)) > 1:
        problems.append(f"sampled subscribers with all {count} messages saw different byte totals: "
                        f"{min(full)}..{max(full)}")
    per_msg = want / count if want and count else float("nan")
    short = [r for r in raw if r.nbytes < want]
    extra = [r for r in raw if want and r.nbytes - want >= per_msg]
    lost_raw = sum(math.ceil((want - r.nbytes) / per_msg) for r in short) if want else len(raw) * count
    delivered = sum(min(s.n, count) for s in sampled) + len(raw) * count - lost_raw
    wrong = [s for s in sampled if s.n != count]
    if wrong:
        problems.append(f"{len(wrong)} sampled subscribers did not get exactly {count} messages "
                        f"(e.g. sub {wrong[0].index}: {wrong[0].n})")
    if not want:
        problems.append("no sampled subscriber got every message: the byte counters cannot be checked")
    elif short:
        problems.append(f"{len(short)} byte-counting subscribers got fewer bytes than {count} messages "
                        f"({want:,} bytes): about {lost_raw:,} deliveries lost "
                        f"(e.g. sub {short[0].index}: {short[0].nbytes:,} bytes)")
    if extra:
        problems.append(f"{len(extra)} byte-counting subscribers got at least one message's worth of bytes "
                        f"more than expected (duplicates?), e.g. sub {extra[0].index}: "
                        f"{extra[0].nbytes - want:,} extra bytes")
    if hub.closes:
        problems.append(f"{len(hub.closes)} subscribers closed: {hub.closes[:3]}")
    raw_reads = sum(r.reads for r in raw)
    raw_frames = sum(r.nbytes for r in raw) / per_msg if want else float("nan")
    result = {
        "rate_target": rate,
        "messages": count,
        "subscribers": n,
        "latency_sample": len(sampled),
        "byte_counters": len(raw),
        # From the first to the last request actually written.
        "achieved_rate": ((len(sent_at) - 1) / ((max(sent_at) - min(sent_at)) / 1e9)
                          if len(sent_at) > 1 else float("nan")),
        "late_sends": late,
        "connections_used": opened,
        "statuses": {str(k): v for k, v in statuses.items()},
        "first_error": first_error[0] if first_error else None,
        "deliveries": delivered,
        "expected_deliveries": count * n,
        "lost_deliveries": count * n - delivered,
        "bytes_per_message": per_msg,
        "server_pings_seen": sum(r.pings for r in raw),
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "max_ms": (lat[-1] / 1e6) if lat else float("nan"),
        "latency_samples": len(lat),
        "http_p50_ms": percentile(hl, 50) / 1e6,
        "http_p99_ms": percentile(hl, 99) / 1e6,
        "server_cpu_pct": 100 * (cpu1 - cpu0) / send_s,
        "others_cpu_pct": 100 * others_cpu_delta(others0, others1) / send_s,
        "frames_per_read": hub.sframes / hub.reads if hub.reads else float("nan"),
        "frames_per_read_byte_counters": raw_frames / raw_reads if raw_reads else float("nan"),
        "client_cpu_pct": 100 * ((rus1.ru_utime + rus1.ru_stime) - (rus0.ru_utime + rus0.ru_stime)) / send_s,
        "client_sys_pct": 100 * (rus1.ru_stime - rus0.ru_stime) / send_s,
        "problems": problems,
    }
    log(f"HTTP publish at {rate}/s: achieved {result['achieved_rate']:.0f}/s, "
        f"{delivered}/{count * n} deliveries, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
        f"max {result['max_ms']:.2f} ms ({len(lat)} samples from {len(sampled)} subscribers), "
        f"HTTP p99 {result['http_p99_ms']:.2f} ms, statuses {result['statuses']}, "
        f"server CPU {result['server_cpu_pct']:.0f}%, client CPU {result['client_cpu_pct']:.0f}% "
        f"(sys {result['client_sys_pct']:.0f}%), frames/read {result['frames_per_read']:.1f} sampled, "
        f"{result['frames_per_read_byte_counters']:.1f} byte counters"
        + (f"  PROBLEMS: {problems}" if problems else ""))
    while not pool.empty():
        pool.get_nowait()[1].close()
    for r in raw:
        r.close()
    await close_all(sampled)
    server.stop()
    return result


def fmt_http(h: dict | None) -> str:
    if not h:
        return ""
    if "error" in h:
        return f"HTTP publish test FAILED: {h['error']}"
    return "\n".join([
        "| target rate | achieved | messages x subscribers | delivered | p50 ms | p99 ms | max ms "
        "| HTTP reply p99 ms | server CPU % | client CPU % | other processes CPU % "
        "| frames per client read (sampled / byte counters) | HTTP statuses |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {h['rate_target']:,}/s | {h['achieved_rate']:,.0f}/s | {h['messages']:,} x {h['subscribers']:,} "
        f"| {h['deliveries']:,} | {h['p50_ms']:.2f} | {h['p99_ms']:.2f} | {h['max_ms']:.2f} | {h['http_p99_ms']:.2f} "
        f"| {h['server_cpu_pct']:.0f} | {h['client_cpu_pct']:.0f} | {h['others_cpu_pct']:.0f} "
        f"| {h['frames_per_read']:.1f} / {h.get('frames_per_read_byte_counters', float('nan')):.1f} "
        f"| {', '.join(f'{k}: {v}' for k, v in h['statuses'].items())} |",
        "",
        f"Latency from {h.get('latency_samples', 0):,} deliveries to the {h.get('latency_sample', '?')} sampled "
        f"(picows, parsing) subscribers; the other {h.get('byte_counters', '?')} only count bytes, "
        f"checked against the sampled ones' total ({h.get('bytes_per_message', float('nan')):.0f} bytes per "
        f"message); lost deliveries: {h.get('lost_deliveries', '?')}.",
    ])


def goal(http: dict | None) -> tuple[str, str, str]:
    """Issue 4's HTTP goal: (title, PASS/FAIL/n/a, note)."""
    title = "HTTP publish -> WS receive p99 < 10 ms at 1000 msg/s to 1000 subscribers"
    if not http or "p99_ms" not in http:
        return title, "n/a", "not measured"
    complete = http["deliveries"] == http["expected_deliveries"]
    ok = (http["p99_ms"] < 10 and complete and set(http["statuses"]) == {"200"}
          and http["achieved_rate"] >= 0.98 * http["rate_target"])
    note = (f"p99 {http['p99_ms']:.2f} ms at {http['achieved_rate']:.0f}/s to {http['subscribers']} "
            f"subscribers")
    if not complete:
        note += f"; only {http['deliveries']}/{http['expected_deliveries']} deliveries"
    if set(http["statuses"]) != {"200"}:
        note += f"; statuses {http['statuses']}"
    if http["rate_target"] != 1000 or http["subscribers"] != 1000:
        note += " (not the goal's load: run without --quick)"
        return title, "n/a", note
    return title, "PASS" if ok else "FAIL", note

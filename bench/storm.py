"""Connection storms (issue 12): how fast notifier sets connections up, and a restart under 10,000 clients.

    .venv/bin/python -m bench.storm            # full run, a few minutes on 2 cores
    .venv/bin/python -m bench.storm --quick    # smoke run: 500 clients

One process, the load generator (one event loop, uvloop when installed,
pinned to --client-core), starts every server as a subprocess pinned to
--server-core:

* Connections ready per second: --clients (2,000) clients connect,
  --concurrency (200) at a time, and stay connected until all are in. On
  notifier a client is ready once the ``subscribed`` frame for its personal
  topic has arrived: the handshake, the JWT check and the personal-topic
  resume are done (the topic is empty, so nothing is replayed). On the
  ``websockets`` peer (bench/peers/websockets_broadcast.py) it is ready once
  the bare handshake is done; it gets the same request, token included.
  These clients do the upgrade by hand on plain asyncio connections
  (``bench.common.clients.RawSub``): about 55 µs of load-generator CPU per
  connection against a picows connection's 165, so that the load generator
  stays well below the peer's rate.
  After an unrecorded warm-up, rounds alternate between the two servers; the
  table gives medians of --rounds. Server CPU per connection is the server's
  CPU (utime + stime from /proc) over a round divided by the connections.
* Reconnect storm, on a fresh notifier: --storm-clients (10,000) users get
  --queued (5) messages each on their personal topic (``POST
  /api/publish/batch``, 1,000 messages a request). Fresh connect: one client
  per user connects, --concurrency at a time, and is done once its queue has
  arrived (picows clients: each checks what it gets, frame by frame). After
  --settle s the server's VmRSS is the steady state. Then
  notifier is restarted: SIGTERM, and as soon as it has exited, start again
  on the same store and port (listening is timed by its sd_notify READY=1).
  A client whose connection ends reconnects as a client
  library would, with full-jitter exponential backoff: it sleeps a time
  drawn uniformly from 0 to min(--backoff-cap, --backoff-base x 2^n), n the
  attempts that failed since its last connection that delivered its queue;
  an attempt fails on a refused or reset connection, a refused handshake (any
  HTTP status, 503 included) or --connect-timeout without one. The storm is
  over when every client has its queue on a connection opened after the old
  process exited; it is timed from the SIGTERM. No client acknowledges, so
  each connection gets the same queue again: on the last one, each client
  must have had exactly its queued messages (seq and id as the publish
  answered), in order, and nothing else on its personal topic. Peak RSS is
  the restarted process's VmHWM at the end of the storm (VmRSS is also
  sampled every 0.1 s); no acknowledgement means no cursor writes either.
* The machine may be shared: the CPU of every other process is recorded, and
  how long other tasks at least kept the server's event loop from its core:
  the main thread's run-queue wait (schedstat) less the CPU of the server's
  other threads (short-lived processes escape the first figure, not this
  one). A ready/s round during which either exceeded
  --max-others % is repeated (up to --retries times) after waiting for
  quiet; the storm is not repeated, its figures are printed beside it.
* Accept-queue overflows (TcpExt ListenOverflows, machine-wide) are counted
  in every phase: a connection the kernel drops at a server's full listen
  queue waits for a TCP retransmission, which lowers the rate without
  showing as CPU anywhere.

Results: tables and the goals on stdout, also as Markdown and JSON in
``bench/results/`` (storm.md, storm.json).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import gc
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jwt
import orjson
from picows import WSError, WSInvalidStatusError, WSListener, WSMsgType, WSTransport, ws_connect

from bench.common.clients import Hub, RawSub
from bench.common.proc import (OUR_PIDS, listen_overflows, others_cpu_delta, run_quietly, user_process_times,
                               wait_quiet, wait_time_wait)
from bench.common.run import (CLIENT_BOUND_PCT, add_run_args, git_version, log, pin_load_generator, raise_nofile,
                              run, source_ips)
from bench.common.servers import BASELINE, JWT_SECRET, Server, http
from bench.common.stats import fmt_ratio, median

TEXT = WSMsgType.TEXT
CLOSE = WSMsgType.CLOSE
# The load: the goals are judged only there.
GOAL_CLIENTS, GOAL_CONCURRENCY, GOAL_STORM_CLIENTS = 2000, 200, 10000
READY_GOAL = 1.0  # notifier's ready/s over the peer's handshakes/s, at least
STORM_GOAL = 1.5  # storm recovery over the fresh connect time, at most
RSS_GOAL = 1.3  # peak RSS in the storm over the steady state, at most
BATCH = 1000  # messages per POST /api/publish/batch (the API's most)


def tokens(users: list[str]) -> list[str]:
    """A JWT per user, signed with the servers' secret: what a backend hands its browsers."""
    now = int(time.time())
    return [jwt.encode({"sub": user, "iat": now, "exp": now + 6 * 3600}, JWT_SECRET, algorithm="HS256")
            for user in users]


class Window:
    """CPU of a server, of this process and of every other process over a
    stretch of the run, and how long other tasks at least kept the server's
    event loop from its core (Server.waited): on a shared machine short-lived
    processes escape the per-process count, not that."""

    def __init__(self, server: Server):
        self.server = server
        self.exclude = OUR_PIDS | {os.getpid()}
        self.t0 = time.monotonic()
        self.cpu0 = server.cpu()
        self.wait0 = server.waited()
        self.overflows0 = listen_overflows()
        self.rus0 = resource.getrusage(resource.RUSAGE_SELF)
        self.others0 = user_process_times(self.exclude)

    def end(self, t1: float | None = None) -> dict:
        """The figures from the start to now (elapsed up to `t1` if given)."""
        rus1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - self.t0
        load = (rus1.ru_utime + rus1.ru_stime) - (self.rus0.ru_utime + self.rus0.ru_stime)
        return {
            "elapsed_s": (t1 if t1 is not None else time.monotonic()) - self.t0,
            "server_cpu_s": self.server.cpu() - self.cpu0,
            "server_cpu_pct": 100 * (self.server.cpu() - self.cpu0) / wall,
            "load_cpu_pct": 100 * load / wall,
            "others_cpu_pct": 100 * others_cpu_delta(self.others0, user_process_times(self.exclude)) / wall,
            "server_wait_pct": 100 * max(0.0, self.server.waited() - self.wait0) / wall,
            "listen_overflows": listen_overflows() - self.overflows0,
        }


# --------------------------------------------------------------------------- connections ready per second


async def ready_round(server: Server, users: list[str], toks: list[str], args: argparse.Namespace) -> dict:
    """`users` connect to `server`, --concurrency at a time, and stay until all are ready (or failed)."""
    sem = asyncio.Semaphore(args.concurrency)
    ips = args.source_ip_list
    loop = asyncio.get_running_loop()
    hub = Hub()
    host = f"127.0.0.1:{server.port}"
    personal = server.kind == "notifier"
    conns: list[RawSub] = []
    errors: list[str] = []
    last_ready = 0.0

    async def one(i: int) -> None:
        nonlocal last_ready
        # notifier: ready at the personal topic's `subscribed`; the peer: at the upgrade.
        topic = f"user:{users[i]}" if personal else None
        async with sem:
            try:
                _, proto = await loop.create_connection(
                    lambda: RawSub(hub, i, host, toks[i], topic, subscribe=False), "127.0.0.1", server.port,
                    local_addr=(ips[i % len(ips)], 0))
                conns.append(proto)
                await asyncio.wait_for(proto.ready, args.connect_timeout)
                last_ready = time.monotonic()
            except (OSError, asyncio.TimeoutError, RuntimeError) as exc:
                errors.append(repr(exc))

    gc.collect()
    gc.disable()
    try:
        w = Window(server)
        await asyncio.gather(*(one(i) for i in range(len(users))))
        r = w.end(last_ready or None)
    finally:
        gc.enable()
    ready = len(users) - len(errors)
    r.update({
        "server": server.name.split("@")[0],
        "clients": len(users),
        "ready": ready,
        "failed": len(errors),
        "first_error": errors[0] if errors else None,
        "ready_per_s": ready / r["elapsed_s"] if r["elapsed_s"] > 0 else float("nan"),
        "server_cpu_ms_per_conn": 1e3 * r["server_cpu_s"] / ready if ready else float("nan"),
    })
    for c in conns:
        c.close()
    await asyncio.sleep(args.settle)  # the server's share of the closes, outside the next round
    return r


async def ready_test(workdir: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Alternating rounds on notifier and the peer, after a warm-up each."""
    users = [f"ready-{i}" for i in range(args.clients)]
    toks = tokens(users)
    servers = [Server("notifier@ready", workdir, core=args.server_core, notifier=args.notifier),
               Server(f"{BASELINE}@ready", workdir, core=args.server_core)]
    rounds: dict[str, list[dict]] = {s.name.split("@")[0]: [] for s in servers}
    try:
        for s in servers:
            s.start()
            await s.wait_listening()
        warm = min(args.concurrency, args.clients)
        for s in servers:
            await ready_round(s, users[:warm], toks[:warm], args)
        for rnd in range(1, args.rounds + 1):
            for s in servers:
                r = await run_quietly(args, f"{s.name} ready round {rnd}",
                                      lambda attempt: ready_round(s, users, toks, args))
                name = s.name.split("@")[0]
                if "error" in r:
                    r["server"] = name
                else:
                    log(f"{s.name:16s} round {rnd}/{args.rounds}: {r['ready_per_s']:7,.0f} ready/s, server CPU "
                        f"{r['server_cpu_ms_per_conn']:.3f} ms per connection ({r['server_cpu_pct']:.0f}%, kept "
                        f"from its core {r['server_wait_pct']:.0f}%), load CPU {r['load_cpu_pct']:.0f}%, "
                        f"other processes {r['others_cpu_pct']:.0f}%, {r['listen_overflows']} accept-queue overflows"
                        + (f", {r['failed']} failed: {r['first_error']}" if r["failed"] else ""))
                rounds[name].append(r)
            for s in servers:
                if not s.alive():
                    raise RuntimeError(f"{s.name} exited with {s.proc.returncode}:\n{s.tail()}")
    finally:
        for s in servers:
            s.stop()
    return rounds


# --------------------------------------------------------------------------- reconnect storm


class Tally:
    """What every storm client adds to."""

    def __init__(self) -> None:
        self.complete = 0  # clients whose open connection has delivered the whole queue
        self.connections = 0  # connections opened (handshake done)
        self.failed: Counter[str] = Counter()  # failed attempts, by kind
        self.problems: list[str] = []
        self.problem_count = 0
        self.phase = "fresh"

    def problem(self, what: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 10:
            self.problems.append(f"{self.phase}: {what}")


class Session(WSListener):
    """One connection of a storm client: welcome, then `subscribed` for the
    personal topic, then the queue, checked as it arrives. An abandoned one
    (its client timed out waiting for the handshake, which may still
    complete) hangs up as soon as it can and counts for nothing."""

    def __init__(self, client: StormClient, abandoned: bool):
        self.client = client
        self.abandoned = abandoned
        self.stage = 0  # 0: before welcome, 1: before subscribed, 2: replay
        self.got: list[tuple[int, str]] = []
        self.completed = False
        self.transport: WSTransport | None = None
        loop = asyncio.get_running_loop()
        self.complete = loop.create_future()
        self.ended = loop.create_future()

    def abandon(self) -> None:
        self.abandoned = True
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        if self.abandoned:
            transport.disconnect(graceful=False)

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if self.abandoned:
            return
        kind = frame.msg_type
        if kind is CLOSE:
            # The close handshake (a browser's close event comes after it), then reconnect.
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if kind is not TEXT:
            return
        c = self.client
        tally = c.tally
        try:
            m = orjson.loads(frame.get_payload_as_bytes())
            kind = m["type"]
        except Exception:
            tally.problem(f"{c.user}: a frame that is not a JSON command")
            return
        if self.stage == 0:
            if kind != "welcome":
                tally.problem(f"{c.user}: first frame {kind!r}, not welcome")
            self.stage = 1
        elif self.stage == 1:
            if kind == "subscribed" and m.get("topic") == c.topic:
                self.stage = 2
            else:
                tally.problem(f"{c.user}: {kind!r} before the personal topic's subscribed")
        elif kind == "message" and m.get("topic") == c.topic:
            got = self.got
            got.append((m.get("seq"), m.get("id")))
            if len(got) == len(c.expected):
                if got == c.expected:
                    self.completed = True
                    c.done_at, c.done_by = time.monotonic(), self
                    tally.complete += 1
                    self.complete.set_result(None)
                else:
                    tally.problem(f"{c.user}: got {got}, queued {c.expected}")
            elif len(got) > len(c.expected):
                tally.problem(f"{c.user}: message {len(got)} (seq {got[-1][0]}) on the personal topic, "
                              f"{len(c.expected)} queued: a duplicate or an extra")
        else:
            tally.problem(f"{c.user}: unexpected {kind!r} frame")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        c = self.client
        if self.completed:
            c.tally.complete -= 1
        if c.done_by is self:
            c.done_at = c.done_by = None
        # Either may have been cancelled with a client's task at the end of the run.
        for f in (self.ended, self.complete):
            if not f.done():
                f.set_result(None)


class StormClient:
    """One user of the storm: stays connected, and reconnects with full-jitter
    exponential backoff whenever its connection ends."""

    def __init__(self, user: str, url: str, ip: str, expected: list[tuple[int, str]], tally: Tally):
        self.user = user
        self.topic = f"user:{user}"
        self.url = url
        self.ip = ip
        self.expected = expected
        self.tally = tally
        self.session: Session | None = None  # the last connection ws_connect returned
        # When an open connection had delivered the whole queue, and which.
        self.done_at: float | None = None
        self.done_by: Session | None = None

    async def connect(self, args: argparse.Namespace) -> Session | None:
        tally = self.tally
        made: list[Session] = []
        gave_up = False

        def listener() -> Session:
            made.append(Session(self, gave_up))
            return made[-1]

        try:
            _, session = await asyncio.wait_for(
                ws_connect(listener, self.url, websocket_handshake_timeout=args.connect_timeout,
                           local_addr=(self.ip, 0), read_buffer_init_size=4096),
                args.connect_timeout)
        except asyncio.TimeoutError:
            # Cancelling ws_connect does not close a connection whose handshake is under way.
            gave_up = True
            for s in made:
                s.abandon()
            tally.failed["timeout"] += 1
            return None
        except WSInvalidStatusError as exc:
            status = getattr(getattr(exc, "response", None), "status", None)
            tally.failed[f"HTTP {int(status) if status is not None else '?'}"] += 1
            return None
        except (OSError, WSError) as exc:
            tally.failed[type(exc).__name__] += 1
            return None
        tally.connections += 1
        self.session = session
        return session

    async def run(self, args: argparse.Namespace, gate: asyncio.Semaphore | None) -> None:
        """Connect (holding `gate` until the queue has arrived, for the fresh
        connect), then reconnect for ever."""
        failures = 0
        backoff = False
        while True:
            if backoff:
                await asyncio.sleep(random.uniform(0, min(args.backoff_cap, args.backoff_base * 2 ** failures)))
            backoff = True
            if gate is not None:
                async with gate:
                    session = await self.connect(args)
                    if session is not None:
                        await session.complete
            else:
                session = await self.connect(args)
            if session is None:
                failures += 1
                continue
            if session.completed:
                gate = None
            await session.ended
            failures = 0 if session.completed else failures + 1


async def queue_messages(server: Server, users: list[str], per_user: int) -> list[list[tuple[int, str]]]:
    """`per_user` messages on each user's personal topic, in batches: (seq, id) of each, per user."""
    expected: list[list[tuple[int, str]]] = [[] for _ in users]
    loop = asyncio.get_running_loop()
    step = max(1, BATCH // per_user)
    for first in range(0, len(users), step):
        items = [(i, {"user": users[i], "data": {"user": users[i], "n": k}})
                 for i in range(first, min(first + step, len(users))) for k in range(per_user)]
        body = orjson.dumps({"messages": [m for _, m in items]})
        status, answer = await loop.run_in_executor(
            None, lambda: http("POST", f"http://127.0.0.1:{server.port}/api/publish/batch", body, timeout=60))
        if status != 200:
            raise RuntimeError(f"POST /api/publish/batch answered {status}: {answer[:300]!r}")
        for (i, _), receipt in zip(items, orjson.loads(answer)["results"]):
            expected[i].append((receipt["seq"], receipt["id"]))
    return expected


def with_queue(clients: list[StormClient], since: float = 0.0) -> int:
    """Clients whose open connection delivered the whole queue after `since`."""
    return sum(1 for c in clients if c.done_at is not None and c.done_at > since)


async def until(condition, timeout: float, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True


def restart_when_exited(server: Server, notify: socket.socket) -> tuple[float, float, int | None]:
    """In a thread: wait for the server to exit (killed after 30 s), start it
    again, wait for its READY=1 on `notify`; (exit time, listening time, exit code)."""
    try:
        code = server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        code = server.proc.wait(5)
    t_exit = time.monotonic()
    server.start()
    while b"READY=1" not in notify.recv(4096).split(b"\n"):
        pass
    return t_exit, time.monotonic(), code


async def storm_test(workdir: Path, args: argparse.Namespace) -> dict:
    n = args.storm_clients
    server = Server("notifier@storm", workdir, core=args.server_core, notifier=args.notifier)
    tally = Tally()
    clients: list[StormClient] = []
    tasks: list[asyncio.Task] = []
    out: dict[str, Any] = {"clients": n, "queued": args.queued, "concurrency": args.concurrency}
    try:
        server.start()
        await server.wait_listening()
        users = [f"storm-{i}" for i in range(n)]
        t0 = time.monotonic()
        expected = await queue_messages(server, users, args.queued)
        log(f"storm: {n * args.queued:,} messages queued on {n:,} personal topics in "
            f"{time.monotonic() - t0:.1f} s")
        ips = args.source_ip_list
        clients = [StormClient(u, f"{server.url}?token={t}", ips[i % len(ips)], expected[i], tally)
                   for i, (u, t) in enumerate(zip(users, tokens(users)))]

        await wait_time_wait()
        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        gate = asyncio.Semaphore(args.concurrency)
        w = Window(server)
        tasks = [asyncio.create_task(c.run(args, gate)) for c in clients]
        if not await until(lambda: tally.complete >= n and all(c.done_at is not None for c in clients),
                           args.storm_timeout):
            raise RuntimeError(f"fresh connect: only {with_queue(clients):,} of {n:,} clients had their queue "
                               f"after {args.storm_timeout:.0f} s; attempts failed: {dict(tally.failed)}")
        fresh = w.end(max(c.done_at for c in clients))
        fresh.update(connections=tally.connections, failed=dict(tally.failed),
                     server_cpu_ms_per_client=1e3 * fresh["server_cpu_s"] / n)
        log(f"storm: fresh connect, {n:,} clients {args.concurrency} at a time: every queue in "
            f"{fresh['elapsed_s']:.1f} s, server CPU {fresh['server_cpu_s']:.1f} s (kept from its core "
            f"{fresh['server_wait_pct']:.0f}%), load CPU "
            f"{fresh['load_cpu_pct']:.0f}%, other processes {fresh['others_cpu_pct']:.0f}%, "
            f"{fresh['listen_overflows']} accept-queue overflows")
        await asyncio.sleep(args.settle)
        out["fresh"] = fresh
        out["steady_rss_mib"] = server.rss() / 2**20
        out["fresh_peak_rss_mib"] = server.peak_rss() / 2**20
        log(f"storm: steady state with {n:,} connections: VmRSS {out['steady_rss_mib']:.1f} MiB "
            f"(VmHWM {out['fresh_peak_rss_mib']:.1f} MiB)")

        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
        tally.phase = "storm"
        tally.connections = 0
        tally.failed.clear()
        w = Window(server)
        t_term = w.t0
        # Like systemd's Restart=: a thread waits for the exit and starts the
        # new process at once, and takes the times itself; the event loop,
        # busy with 10,000 clients, would notice both late. Listening is when
        # the new process says READY=1 (sd_notify): a connect probe would be
        # dropped at a full accept queue and come back a retransmission late.
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(workdir / "notify.sock"))
        notify.settimeout(30)
        server.env["NOTIFY_SOCKET"] = str(workdir / "notify.sock")
        restarted = asyncio.get_running_loop().run_in_executor(None, restart_when_exited, server, notify)
        server.proc.send_signal(signal.SIGTERM)
        t_exit, t_listen, out["old_exit_code"] = await restarted
        sampled = [0]

        async def sample_rss() -> None:
            while True:
                sampled[0] = max(sampled[0], server.rss())
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample_rss())
        try:
            await server.wait_listening()
            # Done: every client has its queue on a connection opened after the old process exited.
            done = await until(lambda: tally.complete >= n
                               and all(c.done_at is not None and c.done_at > t_exit for c in clients),
                               args.storm_timeout, every=0.05)
        finally:
            sampler.cancel()
            notify.close()
            del server.env["NOTIFY_SOCKET"]
        last = max((c.done_at for c in clients if c.done_at is not None), default=None)
        storm = w.end(last if done else None)
        # The window started on the old process: CPU and wait are the new one's, start-up included.
        storm["server_wait_pct"] = 100 * max(0.0, server.waited()) / (time.monotonic() - t_exit)
        del storm["server_cpu_pct"]
        storm.update(
            complete=done, clients_with_queue=with_queue(clients, t_exit), exit_s=t_exit - t_term,
            listening_s=t_listen - t_term, connections=tally.connections, failed=dict(tally.failed),
            server_cpu_s=server.cpu(), server_cpu_ms_per_client=1e3 * server.cpu() / n)
        out["storm"] = storm
        out["peak_rss_mib"] = server.peak_rss() / 2**20
        out["peak_rss_sampled_mib"] = sampled[0] / 2**20
        log(f"storm: restart: old process exited after {storm['exit_s']:.2f} s (code {out['old_exit_code']}), "
            f"new one listening after {storm['listening_s']:.2f} s; "
            + (f"every queue in {storm['elapsed_s']:.1f} s" if done else
               f"NOT DONE: {storm['clients_with_queue']:,}/{n:,} clients had their queue after "
               f"{args.storm_timeout:.0f} s")
            + f"; {tally.connections:,} connections, failed attempts {dict(tally.failed)}, "
            f"{storm['listen_overflows']} accept-queue overflows; peak RSS "
            f"{out['peak_rss_mib']:.1f} MiB; server kept from its core {storm['server_wait_pct']:.0f}%, load CPU "
            f"{storm['load_cpu_pct']:.0f}%, "
            f"other processes {storm['others_cpu_pct']:.0f}%")

        await asyncio.sleep(0.5)  # anything after the queue (a duplicate) arrives by then
        exact = sum(1 for c in clients if c.session is not None and c.session.got == c.expected
                    and not c.session.transport.is_disconnected)
        out["exact"] = exact
        out["problems"] = tally.problems
        out["problem_count"] = tally.problem_count
        await asyncio.sleep(max(0.0, args.settle - 0.5))
        out["after_rss_mib"] = server.rss() / 2**20
    finally:
        for t in tasks:
            t.cancel()
        for c in clients:
            if c.session is not None and c.session.transport is not None:
                c.session.transport.disconnect(graceful=False)
        await asyncio.sleep(0.2)
        server.stop()
    return out


# --------------------------------------------------------------------------- report


def summarize_ready(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rs in rounds.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        out[name] = {key: median([r[key] for r in ok]) for key in (
            "ready_per_s", "server_cpu_ms_per_conn", "server_cpu_pct", "server_wait_pct", "load_cpu_pct",
            "others_cpu_pct", "listen_overflows")}
        out[name].update(rounds=len(ok), clients=ok[0]["clients"], failed=sum(r["failed"] for r in ok),
                         spread_ready_per_s=[min(r["ready_per_s"] for r in ok), max(r["ready_per_s"] for r in ok)])
    return out


def _bound(load_pct: float) -> str:
    return " *" if load_pct >= CLIENT_BOUND_PCT else ""


def fmt_ready(summary: dict[str, dict], args: argparse.Namespace) -> str:
    base = summary.get(BASELINE, {})
    lines = ["| server | ready when | clients | ready/s | server CPU per connection, ms | server CPU % "
             "| server kept from its core % | load generator CPU % | other processes CPU % "
             "| accept-queue overflows | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    what = {"notifier": "`subscribed` for its personal topic", BASELINE: "handshake done (bare)"}
    for name in ("notifier", BASELINE):
        r = summary.get(name)
        if r is None:
            lines.append(f"| {name} | FAILED (see below) | | | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {what[name]} | {r['clients']:,} "
            f"| {r['ready_per_s']:,.0f}{fmt_ratio(r['ready_per_s'], base.get('ready_per_s'))}{_bound(r['load_cpu_pct'])} "
            f"| {r['server_cpu_ms_per_conn']:.3f}{fmt_ratio(r['server_cpu_ms_per_conn'], base.get('server_cpu_ms_per_conn'))} "
            f"| {r['server_cpu_pct']:.0f} | {r['server_wait_pct']:.0f} | {r['load_cpu_pct']:.0f} "
            f"| {r['others_cpu_pct']:.0f} | {r['listen_overflows']:,.0f} | {r['failed']} |")
    lines += ["", f"{args.concurrency} at a time, medians of {args.rounds} rounds per server (alternating, after "
                  f"a warm-up); ready/s spread: "
              + "; ".join(f"{name} {r['spread_ready_per_s'][0]:,.0f}-{r['spread_ready_per_s'][1]:,.0f}"
                          for name, r in summary.items()) + ". \"Server kept from its core\": at least this share "
              "of the time other tasks had the core the server's event loop was waiting for (its run-queue wait "
              "less its other threads' CPU): a high one means the machine, not the server, set the pace. \"Accept-queue overflows\": connections the kernel dropped "
              "because the server's listen queue was full (TcpExt ListenOverflows, whole machine); each costs its "
              "client a TCP retransmission (0.2 to 1 s or more), so they lower ready/s without using CPU."]
    if any(r["load_cpu_pct"] >= CLIENT_BOUND_PCT for r in summary.values()):
        lines.append(f"\\* the load generator was at >= {CLIENT_BOUND_PCT}% CPU: it may have set the pace.")
    return "\n".join(lines)


def fmt_storm(s: dict) -> str:
    if "error" in s:
        return f"Storm FAILED: {s['error']}"
    n, f, st = s["clients"], s["fresh"], s["storm"]

    def failed(d: dict) -> str:
        return ", ".join(f"{k}: {v:,}" for k, v in sorted(d.items())) or "none"

    lines = [
        "| phase | time, s | server CPU, s | server CPU per client, ms | server kept from its core % "
        "| load generator CPU % | other processes CPU % | accept-queue overflows | connections opened "
        "| failed attempts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| fresh connect, {s['concurrency']} at a time, until every client had its queue | {f['elapsed_s']:.1f} "
        f"| {f['server_cpu_s']:.1f} | {f['server_cpu_ms_per_client']:.3f} | {f['server_wait_pct']:.0f} "
        f"| {f['load_cpu_pct']:.0f}{_bound(f['load_cpu_pct'])} "
        f"| {f['others_cpu_pct']:.0f} | {f['listen_overflows']:,} | {f['connections']:,} | {failed(f['failed'])} |",
        f"| restart storm, from the SIGTERM until every client had its queue again "
        f"| {st['elapsed_s']:.1f}{'' if st['complete'] else ' (NOT DONE)'} | {st['server_cpu_s']:.1f} "
        f"| {st['server_cpu_ms_per_client']:.3f} | {st['server_wait_pct']:.0f} "
        f"| {st['load_cpu_pct']:.0f}{_bound(st['load_cpu_pct'])} "
        f"| {st['others_cpu_pct']:.0f} | {st['listen_overflows']:,} | {st['connections']:,} "
        f"| {failed(st['failed'])} |",
        "",
        f"{n:,} clients, {s['queued']} messages queued on each personal topic. Restart: the old process exited "
        f"{st['exit_s']:.2f} s after the SIGTERM (exit code {s['old_exit_code']}), the new one listened after "
        f"{st['listening_s']:.2f} s; every client had its queue again {st['elapsed_s']:.1f} s after the SIGTERM "
        f"({st['elapsed_s'] - st['listening_s']:.1f} s after the new process listened). The storm's server CPU "
        f"is the new process's, start-up included.",
        f"On its last connection, {s['exact']:,} of {n:,} clients had exactly their {s['queued']} queued messages "
        f"(seq and id as the publish answered), in order, and nothing more; problems seen on any connection: "
        f"{s['problem_count']}" + (f" ({'; '.join(s['problems'][:3])})" if s["problems"] else "") + ".",
        "",
        "| notifier RSS, MiB | steady state, clients connected, before the restart | peak in the storm (VmHWM) "
        "| highest VmRSS sampled (0.1 s) | after the storm |",
        "|---|---:|---:|---:|---:|",
        f"| {n:,} connections | {s['steady_rss_mib']:.1f} | {s['peak_rss_mib']:.1f}"
        f"{fmt_ratio(s['peak_rss_mib'], s['steady_rss_mib'])} | {s['peak_rss_sampled_mib']:.1f} "
        f"| {s['after_rss_mib']:.1f} |",
    ]
    return "\n".join(lines)


def goals(ready: dict[str, dict], s: dict | None, args: argparse.Namespace) -> list[tuple[str, str, str]]:
    out = []
    at_load = args.clients == GOAL_CLIENTS and args.concurrency == GOAL_CONCURRENCY
    storm_load = args.storm_clients == GOAL_STORM_CLIENTS
    off_load = " (not the goal's load: run without --quick)"

    def verdict(ok: bool, load: bool) -> str:
        return "PASS" if ok and load else "FAIL" if load else "n/a"

    ours, base = ready.get("notifier"), ready.get(BASELINE)
    title = f"connections ready/s: notifier >= {READY_GOAL}x websockets bare handshakes/s"
    if ours and base:
        r = ours["ready_per_s"] / base["ready_per_s"]
        out.append((title, verdict(r >= READY_GOAL, load=at_load),
                    f"{r:.2f}x ({ours['ready_per_s']:,.0f} vs {base['ready_per_s']:,.0f}/s)"
                    + ("" if at_load else off_load)))
        a, b = ours["server_cpu_ms_per_conn"], base["server_cpu_ms_per_conn"]
        out.append(("server CPU per connection: notifier <= websockets", verdict(a <= b, load=at_load),
                    f"{a:.3f} vs {b:.3f} ms ({a / b:.2f}x)" + ("" if at_load else off_load)))
    else:
        out.append((title, "n/a", "not measured"))
        out.append(("server CPU per connection: notifier <= websockets", "n/a", "not measured"))
    title = (f"restart storm: every client has its queue within {STORM_GOAL}x the fresh connect time, "
             f"nothing lost, nothing twice")
    title_rss = f"peak RSS in the storm <= {RSS_GOAL}x the steady state"
    if s and "storm" in s:
        st, f = s["storm"], s["fresh"]
        r = st["elapsed_s"] / f["elapsed_s"]
        exact = s["exact"] == s["clients"] and not s["problem_count"]
        note = (f"{st['elapsed_s']:.1f} s vs {f['elapsed_s']:.1f} s ({r:.2f}x); {s['exact']:,}/{s['clients']:,} "
                f"clients with exactly their queue, {s['problem_count']} problems")
        if not st["complete"]:
            note += "; the storm did not finish"
        out.append((title, verdict(st["complete"] and r <= STORM_GOAL and exact, load=storm_load),
                    note + ("" if storm_load else off_load)))
        r = s["peak_rss_mib"] / s["steady_rss_mib"]
        out.append((title_rss, verdict(r <= RSS_GOAL, load=storm_load),
                    f"{s['peak_rss_mib']:.1f} vs {s['steady_rss_mib']:.1f} MiB ({r:.2f}x)"
                    + ("" if storm_load else off_load)))
    else:
        out.append((title, "n/a", "not measured"))
        out.append((title_rss, "n/a", "not measured"))
    return out


# --------------------------------------------------------------------------- main


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="storm-"))
    failures: list[str] = []
    ready_rounds: dict[str, list[dict]] = {}
    storm: dict | None = None
    try:
        await wait_quiet(args, exclude={os.getpid()})
        if args.clients > 0:
            try:
                ready_rounds = await ready_test(workdir, args)
            except Exception as exc:
                log(f"ready/s test failed: {exc}")
                failures.append(f"ready/s test: {exc}")
        if args.storm_clients > 0:
            try:
                storm = await storm_test(workdir, args)
            except Exception as exc:
                log(f"storm failed: {exc}")
                storm = {"error": str(exc)}
    finally:
        if not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"server logs kept in {workdir}")

    for name, rs in ready_rounds.items():
        failures += [f"{name} ready round: {r['error']}" for r in rs if "error" in r]
        failures += [f"{name} ready round: {r['failed']} failed, e.g. {r['first_error']}"
                     for r in rs if r.get("failed")]
    if storm:
        if "error" in storm:
            failures.append(f"storm: {storm['error']}")
        elif storm["problem_count"] or storm["exact"] != storm["clients"] or not storm["storm"]["complete"]:
            failures.append(f"storm: {storm['exact']:,}/{storm['clients']:,} clients with exactly their queue; "
                            f"problems: {storm['problems']}")
    ready = summarize_ready(ready_rounds)
    verdicts = goals(ready, storm, args)
    total_s = time.monotonic() - started
    cmd = "python -m bench.storm " + " ".join(sys.argv[1:])
    header = (f"server on core {args.server_core}, load generator on core {args.client_core}; "
              f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores; "
              f"notifier at {git_version()}; run took {total_s:.0f} s")
    md = [f"Command: `{cmd.strip()}`", "", header]
    if ready:
        md += ["", f"Connections ready per second ({args.clients:,} clients; ratios to the `{BASELINE}` peer):", "",
               fmt_ready(ready, args)]
    if storm:
        md += ["", "Reconnect storm (notifier):", "", fmt_storm(storm)]
    md += ["", "Goals (issue 12):", ""] + [f"- {v}: {title}: {note}" for title, v, note in verdicts]
    if failures:
        md += ["", "Problems seen:", ""] + [f"- {f}".replace("\n", "\n      ") for f in failures]
    text = "\n".join(md)
    print()
    print(text)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"args": {k: v for k, v in vars(args).items() if k != "source_ip_list"}, "ready_rounds": ready_rounds,
               "ready": ready, "storm": storm, "goals": verdicts, "failures": failures, "markdown": text,
               "total_s": total_s, "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    (out_dir / "storm.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "storm.md").write_text(text + "\n")
    log(f"results in {out_dir}/storm.json and storm.md; total {total_s:.0f} s")
    return 1 if failures else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=GOAL_CLIENTS, help="ready/s test: clients per round; 0 to skip it")
    p.add_argument("--concurrency", type=int, default=GOAL_CONCURRENCY,
                   help="connections being set up at a time (ready/s test and the fresh connect)")
    p.add_argument("--rounds", type=int, default=3, help="ready/s test: measured rounds per server")
    p.add_argument("--storm-clients", type=int, default=GOAL_STORM_CLIENTS, help="0 to skip the storm")
    p.add_argument("--queued", type=int, default=5, help="messages queued on each storm client's personal topic")
    p.add_argument("--backoff-base", type=float, default=0.1, help="seconds: the first reconnect waits up to this")
    p.add_argument("--backoff-cap", type=float, default=5.0, help="seconds: no reconnect waits longer")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds for a connection attempt (TCP and handshake), and in the ready/s test for "
                        "the `subscribed` frame")
    p.add_argument("--storm-timeout", type=float, default=300.0,
                   help="seconds the fresh connect, and then the storm, may take before the run gives up")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before reading RSS, and between rounds")
    add_run_args(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 500 clients in each test, 1 round")
    args = p.parse_args(argv)
    if args.queued < 1:
        p.error("--queued must be at least 1: a client is done once its queue has arrived")
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for opt, value in (("--clients", 500), ("--storm-clients", 500), ("--rounds", 1), ("--settle", 1.0)):
            if opt not in given:
                setattr(args, opt[2:].replace("-", "_"), value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.clients, args.storm_clients) + 200
    if soft < need:
        log(f"warning: open files limit {soft} < {need}; raise `ulimit -n` (hard limit) for this run")
    if not pin_load_generator(args.server_core, args.client_core):
        args.server_core = args.client_core = None
    # Reconnects take new ports while the old connections' may still be in TIME_WAIT.
    args.source_ip_list = source_ips(3 * max(args.clients, args.storm_clients), args.source_ips)
    if not Path(args.notifier).exists():
        log(f"{args.notifier} not found")
        return 1
    return run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

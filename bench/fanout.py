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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as _dt
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
from picows import WSListener, WSMsgType, WSTransport, ws_connect

from bench import send_floor
from bench.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
TEXT = WSMsgType.TEXT
CLOSE = WSMsgType.CLOSE
TOPIC = "bench"
JWT_SECRET = "fanout-benchmark-secret-0123456789abcdef"
API_KEY = "benchkey"

# Timestamps embedded in messages: perf_counter_ns relative to process start,
# offset so that they always have 16 digits (the payload size stays fixed).
_T0 = time.perf_counter_ns()
_TS_BASE = 10**15
_perf_ns = time.perf_counter_ns


def stamp() -> int:
    return _perf_ns() - _T0 + _TS_BASE


PEERS = {
    "websockets": ("websockets broadcast()", "bench.peers.websockets_broadcast"),
    "fastapi": ("FastAPI ConnectionManager", "bench.peers.fastapi_manager"),
    "tornado": ("Tornado write_message", "bench.peers.tornado_plain"),
    # Not a peer: a reference row (see bench/peers/picows_reference.py).
    "picows": ("picows, 1 send per delivery (reference)", "bench.peers.picows_reference"),
}
NOTIFIERS = {
    "notifier": ("notifier (ephemeral)", True),
    "notifier-durable": ("notifier (durable)", False),
}
ALL_SERVERS = list(PEERS) + list(NOTIFIERS)
BASELINE = "websockets"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- servers


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _server_preexec(core: int | None) -> Callable[[], None]:
    def preexec() -> None:
        _raise_nofile()
        if core is not None:
            os.sched_setaffinity(0, {core})

    return preexec


def _proc_tree(pid: int) -> list[int]:
    """pid and its descendants (notifier might run helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


_TICK = os.sysconf("SC_CLK_TCK")
# Every process this run started (servers, idle or not): not "other processes".
OUR_PIDS: set[int] = set()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields_ = stat[stat.rindex(b")") + 2:].split()
        total += int(fields_[11]) + int(fields_[12])  # utime, stime (fields 14, 15)
    return total / _TICK


def user_process_times(exclude: set[int]) -> dict[int, int]:
    """CPU ticks of every user-space process on the machine except `exclude`.

    Kernel threads (children of kthreadd, pid 2) are left out: ksoftirqd does
    the server's own network work when the server keeps its core busy."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in exclude or pid == 2:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields_ = stat[stat.rindex(b")") + 2:].split()
        if int(fields_[1]) == 2:
            continue
        out[pid] = int(fields_[11]) + int(fields_[12])
    return out


def others_cpu_delta(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds used between two `user_process_times` samples (processes that
    exited in between are not seen: an underestimate, never negative)."""
    return sum(max(0, t - before.get(pid, 0)) for pid, t in after.items()) / _TICK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def core_times() -> dict[int, tuple[float, float]]:
    """Per core: (busy seconds, softirq+irq seconds) from /proc/stat."""
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server subprocess: a peer module or `notifier serve`."""

    def __init__(self, name: str, workdir: Path, args: argparse.Namespace, *, http: bool = False):
        self.name = name
        self.kind = "notifier" if name.startswith("notifier") else "peer"
        base = name.split("@")[0]
        if self.kind == "peer":
            self.label, self.module = PEERS[base]
            self.ephemeral = True
        else:
            self.label, self.ephemeral = NOTIFIERS.get(base, ("notifier", False))
        self.args = args
        self.port = free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.sub_token = "x"
        self.pub_token = "x"
        self.env = os.environ.copy()
        if self.kind == "notifier":
            self.env.update({
                "NOTIFIER_SERVER_HOST": "127.0.0.1",
                "NOTIFIER_SERVER_PORT": str(self.port),
                "NOTIFIER_AUTH_JWT_SECRET": JWT_SECRET,
                "NOTIFIER_AUTH_API_KEYS": API_KEY,
                "NOTIFIER_STORE_PATH": str(self.dir / "notifier.db"),
                "NOTIFIER_LOG_LEVEL": "warning",
                # 50 messages in flight to one subscriber is ~15 KB; a publisher
                # sends thousands of commands a second: lift both limits so the
                # benchmark measures fan-out, not the protections.
                "NOTIFIER_LIMITS_MAX_BUFFERED_BYTES": str(64 * 1024 * 1024),
                "NOTIFIER_LIMITS_COMMANDS_PER_SECOND": "1000000",
                "NOTIFIER_LIMITS_COMMANDS_BURST": "1000000",
                "STATE_DIRECTORY": str(self.dir),
            })

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        if self.kind == "notifier":
            argv = [self.args.notifier, "serve"]
            cwd = self.dir
        else:
            argv = [sys.executable, "-m", self.module, "--port", str(self.port)]
            cwd = ROOT
        self.log_path = self.dir / "server.log"
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, preexec_fn=_server_preexec(self.args.server_core),
            start_new_session=True,
        )
        logf.close()
        self.pids = [self.proc.pid]
        OUR_PIDS.update(self.pids)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at start:\n{self.tail()}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout}s:\n{self.tail()}")
                await asyncio.sleep(0.1)
        if self.kind == "notifier":
            self.sub_token = self.mint("bench-sub")
            self.pub_token = self.mint("bench-pub")
        self.pids = _proc_tree(self.proc.pid)
        OUR_PIDS.update(self.pids)

    def mint(self, user: str) -> str:
        out = subprocess.run(
            [self.args.notifier, "token", "--user", user, "--topics", TOPIC, "--publish", TOPIC, "--ttl", "6h"],
            env=self.env, cwd=self.dir, capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"notifier token failed ({out.returncode}): {out.stderr.strip()}")
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if not lines:
            raise RuntimeError("notifier token printed nothing")
        return lines[-1]

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def rss(self) -> int:
        return rss_bytes(self.pids)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------- clients


class Hub:
    """What all subscribers of one server share during a round."""

    __slots__ = ("total", "wake_at", "pump", "lat", "bad", "closes", "reads", "sframes")

    def __init__(self) -> None:
        self.total = 0
        self.wake_at = 1 << 62
        self.pump: Callable[[], None] = _noop
        self.lat: list[int] = []
        self.bad: list[str] = []
        self.closes: list[str] = []
        # Sampled subscribers: frames received, and reads (socket reads that
        # brought at least one whole frame): frames per read shows whether a
        # server coalesces messages into one write.
        self.reads = 0
        self.sframes = 0


def _noop() -> None:
    pass


def _subscribe_cmd(ref: int) -> bytes:
    return orjson.dumps({"type": "subscribe", "topic": TOPIC, "ref": ref})


class Sub(WSListener):
    """A subscriber. Sampled ones parse and time what they get; all count."""

    def __init__(self, hub: Hub, index: int, sampled: bool):
        self.hub = hub
        self.index = index
        self.sampled = sampled
        self.live = False
        self.n = 0
        self.last_ts = 0
        self.transport: WSTransport | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(TEXT, _subscribe_cmd(self.index))

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if self.live:
            if self.sampled:
                now = _perf_ns() - _T0 + _TS_BASE
            self.n += 1
            hub = self.hub
            hub.total += 1
            if self.sampled:
                hub.sframes += 1
                if frame.last_in_buffer:
                    hub.reads += 1
                try:
                    m = orjson.loads(frame.get_payload_as_bytes())
                    ts = m["data"]["ts"]
                    if m["type"] != "message" or m["topic"] != TOPIC:
                        raise ValueError
                except Exception:
                    hub.bad.append(f"sub {self.index}: unexpected frame {frame}")
                else:
                    hub.lat.append(now - ts)
                    # Order: by seq where there is one (stored messages); by the
                    # publisher's timestamp for ephemeral ones (one publisher,
                    # whose commands are handled in order).
                    key = m["seq"]
                    if key is None:
                        key = ts
                    if key <= self.last_ts:
                        hub.bad.append(f"sub {self.index}: out of order or duplicate "
                                       f"({'seq' if m['seq'] is not None else 'ts'} {key} after {self.last_ts})")
                    self.last_ts = key
            if hub.total >= hub.wake_at:
                hub.pump()
            return
        if frame.msg_type is CLOSE:
            return
        try:
            m = orjson.loads(frame.get_payload_as_bytes())
        except Exception:
            m = {}
        if m.get("type") == "subscribed" and m.get("topic") == TOPIC and not self.ready.done():
            self.live = True
            self.ready.set_result(None)
        elif m.get("type") == "error" and not self.ready.done():
            self.ready.set_exception(RuntimeError(f"subscribe refused: {m}"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        hs = transport.close_handshake
        code = hs.recv.code if hs is not None and hs.recv is not None else None
        code = getattr(code, "value", code)
        reason = hs.recv.reason if hs is not None and hs.recv is not None else ""
        self.hub.closes.append(f"sub {self.index}: closed, code {code} {reason!r}")
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"closed before subscribed (code {code} {reason!r})"))


class Pub(WSListener):
    """The publisher connection: counts `published` replies."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.acked = 0
        self.on_ack: Callable[[], None] = _noop
        self.errors: list[Any] = []
        self.closed: str | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(TEXT, b'{"type":"ping","ref":"ready"}')

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if frame.msg_type is CLOSE:
            return
        try:
            m = orjson.loads(frame.get_payload_as_bytes())
        except Exception:
            self.errors.append(f"publisher got a non-JSON frame: {frame}")
            return
        kind = m.get("type")
        if kind == "published":
            self.acked += 1
            self.on_ack()
        elif kind == "pong" and m.get("ref") == "ready":
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            self.errors.append(m)
            self.on_ack()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        hs = transport.close_handshake
        code = hs.recv.code if hs is not None and hs.recv is not None else None
        self.closed = f"publisher closed, code {getattr(code, 'value', code)}"
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(self.closed))


async def connect_subscribers(
    server: Server, hub: Hub, count: int, sample_every: int, *, source_ips: list[str], concurrency: int = 100,
    first_index: int = 0, what: str = "subscribers",
) -> list[Sub]:
    url = f"{server.url}?token={server.sub_token}"
    sem = asyncio.Semaphore(concurrency)
    subs: list[Sub] = []
    done = 0
    t0 = time.monotonic()

    async def one(i: int) -> None:
        nonlocal done
        sampled = sample_every > 0 and i % sample_every == 0
        ip = source_ips[i % len(source_ips)]
        async with sem:
            for attempt in range(5):
                try:
                    _, listener = await ws_connect(
                        lambda: Sub(hub, i, sampled), url, websocket_handshake_timeout=60,
                        local_addr=(ip, 0), read_buffer_init_size=4096,
                    )
                    await asyncio.wait_for(listener.ready, 60)
                    subs.append(listener)
                    done += 1
                    if done % 2000 == 0:
                        log(f"  {server.name}: {done}/{count} {what} ({time.monotonic() - t0:.1f}s)")
                    return
                except (OSError, asyncio.TimeoutError) as exc:
                    if attempt == 4:
                        raise RuntimeError(f"{server.name}: connecting {what} {i} failed: {exc!r}") from exc
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(first_index + i) for i in range(count)))
    subs.sort(key=lambda s: s.index)
    return subs


async def connect_publisher(server: Server) -> Pub:
    _, pub = await ws_connect(Pub, f"{server.url}?token={server.pub_token}", websocket_handshake_timeout=30)
    await asyncio.wait_for(pub.ready, 30)
    return pub


# The HTTP scenario's subscribers: a sample of picows ones that parse and time
# every frame, and byte counters for the rest, so that the load generator stays
# cheap (about one Python call per socket read instead of one per frame).


def _frame_wire_size(payload_size: int) -> int:
    """Bytes on the wire of an unmasked (server -> client) frame."""
    return payload_size + (2 if payload_size < 126 else 4 if payload_size < 65536 else 10)


class SampledSub(Sub):
    """A picows subscriber that also adds up the wire size of what it gets once
    subscribed: the bytes a byte-counting subscriber must see for the same
    messages."""

    def __init__(self, hub: Hub, index: int):
        super().__init__(hub, index, True)
        self.wire = 0

    def on_ws_frame(self, transport: WSTransport, frame) -> None:
        if self.live:
            self.wire += _frame_wire_size(frame.payload_size)
        Sub.on_ws_frame(self, transport, frame)


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (client frames must be masked; a zero mask leaves the
    payload as it is). Only for short control and command frames."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


_PONG = _masked_frame(0xA, b"")


class RawSub(asyncio.BufferedProtocol):
    """A real WebSocket subscriber on a plain asyncio connection: the HTTP
    upgrade (with the token) and the `subscribe` command are done by hand and
    the replies parsed until `subscribed`; from then on it only counts bytes.
    Every message has the same wire size as for the sampled subscribers, so a
    byte total below theirs means lost deliveries."""

    # One receive buffer for all of them: callbacks run one at a time.
    _buf = bytearray(256 * 1024)

    def __init__(self, hub: Hub, index: int, host: str, token: str):
        self.hub = hub
        self.index = index
        self.live = False
        self.nbytes = 0  # received after the `subscribed` frame
        self.reads = 0
        self.pings = 0
        self.pending = bytearray()
        self.upgraded = False
        self.key = base64.b64encode(os.urandom(16))
        self.request = (b"GET /ws?token=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        % (token.encode(), host.encode(), self.key))
        self.transport: asyncio.Transport | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        if self.live:
            self.nbytes += nbytes
            self.reads += 1
            # A server ping (0x89 opens its frame; never in ASCII JSON): answer it
            # so the heartbeat keeps the connection. A false positive only sends
            # an unsolicited pong, which is allowed.
            if self._buf.find(b"\x89", 0, nbytes) >= 0:
                self.pings += 1
                self.transport.write(_PONG)
            return
        self.pending += self._buf[:nbytes]
        try:
            self._handshake()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _handshake(self) -> None:
        buf = self.pending
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).split(b"\r\n")
            if not head[0].startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"upgrade refused: {bytes(buf[:300])!r}")
            accept = base64.b64encode(hashlib.sha1(self.key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            if not any(line.lower().startswith(b"sec-websocket-accept:") and line.split(b":", 1)[1].strip() == accept
                       for line in head[1:]):
                raise RuntimeError(f"bad Sec-WebSocket-Accept in {head!r}")
            del buf[:end + 4]
            self.upgraded = True
            self.transport.write(_masked_frame(0x1, _subscribe_cmd(self.index)))
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            if b1 & 0x80:
                raise RuntimeError("masked frame from the server")
            size, at = b1 & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, at = int.from_bytes(buf[2:4], "big"), 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + size:
                return
            opcode, payload = b0 & 0x0F, bytes(buf[at:at + size])
            del buf[:at + size]
            if opcode == 0x8:
                raise RuntimeError(f"closed before subscribed: {payload!r}")
            if opcode == 0x9:
                self.transport.write(_masked_frame(0xA, payload))
                continue
            if opcode != 0x1 or not b0 & 0x80:
                continue
            m = orjson.loads(payload)
            if m.get("type") == "error":
                raise RuntimeError(f"subscribe refused: {m}")
            if m.get("type") == "subscribed" and m.get("topic") == TOPIC:
                self.live = True
                self.nbytes = len(buf)  # anything after it is counted
                self.pending = bytearray()
                self.ready.set_result(None)
                return

    def connection_lost(self, exc) -> None:
        if self.live:
            self.hub.closes.append(f"raw sub {self.index}: connection lost ({exc!r})")
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"connection lost before subscribed ({exc!r})"))

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


async def connect_mixed_subscribers(
    server: Server, hub: Hub, count: int, sample: int, *, source_ips: list[str], concurrency: int = 100,
) -> tuple[list[SampledSub], list[RawSub]]:
    """`count` subscribers, `sample` of them picows ones spread evenly through
    the connection (and so subscription) order, the rest byte counters."""
    url = f"{server.url}?token={server.sub_token}"
    host = f"127.0.0.1:{server.port}"
    sample = max(0, min(sample, count))
    sampled_at = {k * count // sample for k in range(sample)} if sample else set()
    sem = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    sampled: list[SampledSub] = []
    raw: list[RawSub] = []

    async def one(i: int) -> None:
        ip = source_ips[i % len(source_ips)]
        async with sem:
            for attempt in range(5):
                try:
                    if i in sampled_at:
                        _, listener = await ws_connect(
                            lambda: SampledSub(hub, i), url, websocket_handshake_timeout=60,
                            local_addr=(ip, 0), read_buffer_init_size=4096,
                        )
                        await asyncio.wait_for(listener.ready, 60)
                        sampled.append(listener)
                    else:
                        _, proto = await loop.create_connection(
                            lambda: RawSub(hub, i, host, server.sub_token), "127.0.0.1", server.port,
                            local_addr=(ip, 0))
                        try:
                            await asyncio.wait_for(proto.ready, 60)
                        except BaseException:
                            proto.close()
                            raise
                        raw.append(proto)
                    return
                except (OSError, asyncio.TimeoutError) as exc:
                    if attempt == 4:
                        raise RuntimeError(f"{server.name}: connecting subscriber {i} failed: {exc!r}") from exc
                    await asyncio.sleep(0.2 * (attempt + 1))

    await asyncio.gather(*(one(i) for i in range(count)))
    sampled.sort(key=lambda s: s.index)
    raw.sort(key=lambda s: s.index)
    return sampled, raw


def message_wire_size(payload: int, seq: int = 1000) -> int:
    """Wire size of the `message` frame notifier sends for `payload`-byte
    `data`: the shape of Message.payload() in notifier/messages.py, with a
    24-digit id, a millisecond RFC 3339 time and a 4-digit seq (a durable
    store some thousand messages in, as in the HTTP test: 236 bytes for 100)."""
    head, tail = make_data_template(payload)
    body = (b'{"type":"message","topic":"%s","seq":%d,"id":"%s","time":"2026-01-01T00:00:00.000Z",'
            b'"event":null,"data":%s%s%s}' % (TOPIC.encode(), seq, b"0" * 24, head, b"0" * 16, tail))
    return _frame_wire_size(len(body))


def make_data_template(payload: int) -> tuple[bytes, bytes]:
    """`data` is {"ts":<16 digits>,"pad":"xxx"} of exactly `payload` bytes (compact JSON)."""
    fixed = len(b'{"ts":') + 16 + len(b',"pad":""}')
    pad = b"x" * max(0, payload - fixed)
    return b'{"ts":', b',"pad":"' + pad + b'"}'


# --------------------------------------------------------------------------- one server's load


@dataclass
class Target:
    server: Server
    hub: Hub = field(default_factory=Hub)
    subs: list[Sub] = field(default_factory=list)
    pub: Pub | None = None
    rounds: dict[str, list[dict]] = field(default_factory=lambda: {"serial": [], "burst": []})
    failures: list[str] = field(default_factory=list)


async def run_round(t: Target, scenario: str, messages: int, window: int, payload: int,
                    stall_timeout: float) -> dict:
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
        hub.pump = _noop
        pub.on_ack = _noop
        hub.wake_at = 1 << 62
        gc.enable()
    t_end = state["t_end"]
    cpu1 = server.cpu()
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
        "client_cpu_pct": 100 * client_cpu / elapsed,
        "client_sys_pct": 100 * (rus1.ru_stime - rus0.ru_stime) / elapsed,
        "others_cpu_pct": 100 * others_cpu_delta(others0, others1) / elapsed,
        "core_busy_pct": {c: 100 * (cores1[c][0] - cores0[c][0]) / elapsed for c in cores1},
        "core_irq_pct": {c: 100 * (cores1[c][1] - cores0[c][1]) / elapsed for c in cores1},
        "problems": problems,
    }


async def setup_target(server: Server, args: argparse.Namespace) -> Target:
    t = Target(server)
    server.start()
    await server.wait_ready()
    t.subs = await connect_subscribers(server, t.hub, args.subscribers, args.sample_every,
                                       source_ips=args.source_ip_list)
    t.pub = await connect_publisher(server)
    server.pids = _proc_tree(server.proc.pid)
    log(f"{server.name}: pid {server.proc.pid}, port {server.port}, {len(t.subs)} subscribers, "
        f"RSS {server.rss() / 2**20:.0f} MiB")
    return t


async def close_all(subs: list, pub: Pub | None = None) -> None:
    for s in subs:
        if s.transport is not None and not s.transport.is_disconnected:
            s.transport.disconnect(graceful=False)
    if pub is not None and pub.transport is not None:
        pub.transport.disconnect(graceful=False)
    await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- memory per idle connection


async def memory_test(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    server = Server(f"{name}@memory", workdir, args)
    hub = Hub()
    warm = 100
    conns = args.memory_connections
    server.start()
    try:
        await server.wait_ready()
        warm_subs = await connect_subscribers(server, hub, warm, 0, source_ips=args.source_ip_list, what="warm-up connections")
        await asyncio.sleep(args.settle)
        server.pids = _proc_tree(server.proc.pid)
        before = server.rss()
        cpu0 = server.cpu()
        t0 = time.monotonic()
        subs = await connect_subscribers(server, hub, conns, 0, source_ips=args.source_ip_list,
                                         first_index=warm, what="idle connections")
        connect_s = time.monotonic() - t0
        connect_cpu = server.cpu() - cpu0
        await asyncio.sleep(args.settle)
        server.pids = _proc_tree(server.proc.pid)
        after = server.rss()
        alive = server.alive()
        result = {
            "server": name,
            "label": server.label,
            "connections": conns,
            "rss_before_mib": before / 2**20,
            "rss_after_mib": after / 2**20,
            "kib_per_connection": (after - before) / conns / 1024,
            "connect_s": connect_s,
            "connect_server_cpu_s": connect_cpu,
            "closed": len(hub.closes),
            "alive": alive,
        }
        log(f"{name}: {conns} idle connections: RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, "
            f"{result['kib_per_connection']:.1f} KiB/connection (connected in {connect_s:.1f}s, "
            f"server CPU {connect_cpu:.1f}s)")
        await close_all(subs + warm_subs)
        return result
    finally:
        server.stop()


# --------------------------------------------------------------------------- send floor


async def floor_test(args: argparse.Namespace) -> dict:
    """bench/send_floor.py with this run's cores and subscriber count: the least
    one round of sends to every subscriber costs on the server core."""
    exclude = OUR_PIDS | {os.getpid()}
    others0 = user_process_times(exclude)
    t0 = time.perf_counter()
    f = await send_floor.measure(args.subscribers, [message_wire_size(args.payload), send_floor.BATCH_SIZE],
                                 args.floor_rounds, preexec=_server_preexec(args.server_core),
                                 source_ips=args.source_ip_list)
    f["others_cpu_pct"] = 100 * others_cpu_delta(others0, user_process_times(exclude)) / (time.perf_counter() - t0)
    log("send floor: " + ", ".join(f"{r['bytes']} bytes: round median {r['round_ms_median']:.2f} ms "
                                   f"(p90 {r['round_ms_p90']:.2f}), {r['us_per_send']:.2f} µs per send"
                                   for r in f["sizes"])
        + f"; other processes {f['others_cpu_pct']:.0f}%"
        + (f"  PROBLEMS: {f['problems']}" if f["problems"] else ""))
    return f


# --------------------------------------------------------------------------- HTTP publish -> WS receive


async def http_test(workdir: Path, args: argparse.Namespace, attempt: int = 0) -> dict:
    server = Server(f"notifier@http{attempt or ''}", workdir, args)
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
    server.pids = _proc_tree(server.proc.pid)
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


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarize(targets: list[Target]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for t in targets:
        out[t.server.name] = {}
        for scenario, rounds in t.rounds.items():
            if not rounds:
                continue
            out[t.server.name][scenario] = {
                "label": t.server.label,
                "rounds": len(rounds),
                "deliveries_per_s": med([r["deliveries_per_s"] for r in rounds]),
                "p50_ms": med([r["p50_ms"] for r in rounds]),
                "p99_ms": med([r["p99_ms"] for r in rounds]),
                "server_cpu_s": med([r["server_cpu_s"] for r in rounds]),
                "server_cpu_pct": med([r["server_cpu_pct"] for r in rounds]),
                "client_cpu_pct": med([r["client_cpu_pct"] for r in rounds]),
                "others_cpu_pct": med([r["others_cpu_pct"] for r in rounds]),
                "frames_per_read": med([r["frames_per_read"] for r in rounds]),
                "spread_deliveries_per_s": [min(r["deliveries_per_s"] for r in rounds),
                                            max(r["deliveries_per_s"] for r in rounds)],
                "problems": [p for r in rounds for p in r["problems"]][:5],
            }
    return out


def _ratio(value: float, base: float | None) -> str:
    if base is None or not base or base != base or value != value:
        return ""
    return f" ({value / base:.2f}x)"


CLIENT_BOUND_PCT = 90


def fmt_table(summary: dict) -> str:
    if not summary:
        return "(no fan-out rows)"
    lines = [
        "| server | scenario | deliveries/s | p50 ms | p99 ms | server CPU s | server CPU % | client CPU % "
        "| other processes CPU % | frames per client read |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flagged = False
    for scenario in ("serial", "burst"):
        b = summary.get(BASELINE, {}).get(scenario) or {}
        for name, per in summary.items():
            row = per.get(scenario)
            if row is None:
                continue
            mark = ""
            if row["client_cpu_pct"] >= CLIENT_BOUND_PCT and row["server_cpu_pct"] < CLIENT_BOUND_PCT:
                mark, flagged = " *", True
            lines.append(
                f"| {row['label']} | {scenario} "
                f"| {row['deliveries_per_s']:,.0f}{_ratio(row['deliveries_per_s'], b.get('deliveries_per_s'))}{mark} "
                f"| {row['p50_ms']:.2f}{_ratio(row['p50_ms'], b.get('p50_ms'))} "
                f"| {row['p99_ms']:.2f}{_ratio(row['p99_ms'], b.get('p99_ms'))} "
                f"| {row['server_cpu_s']:.2f}{_ratio(row['server_cpu_s'], b.get('server_cpu_s'))} "
                f"| {row['server_cpu_pct']:.0f} | {row['client_cpu_pct']:.0f} | {row['others_cpu_pct']:.0f} | {row['frames_per_read']:.1f} |")
    if flagged:
        lines += ["", f"\\* the load generator was at >= {CLIENT_BOUND_PCT}% CPU while the server was not: "
                      "the server may be faster than this figure."]
    return "\n".join(lines)


def fmt_memory(mem: list[dict]) -> str:
    if not mem:
        return ""
    base = next((m for m in mem if m["server"] == BASELINE), None)
    lines = ["| server | idle connections | RSS before MiB | RSS after MiB | KiB per connection "
             "| time to connect them, s | server CPU for it, s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in mem:
        if "error" in m:
            lines.append(f"| {m['server']} | FAILED (see below) | | | | | |")
            continue
        lines.append(
            f"| {m['label']} | {m['connections']:,} | {m['rss_before_mib']:.1f} | {m['rss_after_mib']:.1f} "
            f"| {m['kib_per_connection']:.1f}{_ratio(m['kib_per_connection'], base and base.get('kib_per_connection'))} "
            f"| {m['connect_s']:.1f} | {m['connect_server_cpu_s']:.1f} |")
    return "\n".join(lines)


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


def goals(summary: dict, mem: list[dict], http: dict | None,
          floor: dict | None = None) -> list[tuple[str, str, str]]:
    out = []

    def rate(name, scenario):
        return summary.get(name, {}).get(scenario, {}).get("deliveries_per_s")

    for scenario, need in (("serial", 1.3), ("burst", 5.0)):
        title = f"{scenario}: notifier >= {need}x websockets deliveries/s"
        base, ours = rate(BASELINE, scenario), rate("notifier", scenario)
        if not base or not ours:
            out.append((title, "n/a", "not measured"))
            continue
        r = ours / base
        extra = ""
        durable = rate("notifier-durable", scenario)
        if durable:
            extra = f"; durable publishes: {durable / base:.2f}x"
        out.append((title, "PASS" if r >= need else "FAIL", f"{r:.2f}x (ephemeral publishes){extra}"))
    title = "memory per idle connection: notifier <= websockets"
    m = {x["server"]: x for x in mem if "kib_per_connection" in x}
    if "notifier" in m and BASELINE in m:
        a, b = m["notifier"]["kib_per_connection"], m[BASELINE]["kib_per_connection"]
        out.append((title, "PASS" if a <= b else "FAIL", f"{a:.1f} vs {b:.1f} KiB ({a / b:.2f}x)"))
    else:
        out.append((title, "n/a", "not measured"))
    title = "HTTP publish -> WS receive p99 < 10 ms at 1000 msg/s to 1000 subscribers"
    if http and "p99_ms" in http:
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
            ok = False
            note += " (not the goal's load: run without --quick)"
            out.append((title, "n/a", note))
        else:
            out.append((title, "PASS" if ok else "FAIL", note))
    else:
        out.append((title, "n/a", "not measured"))
    if send_floor.floor_note(floor):
        # Context only: the verdict above does not depend on it.
        title, verdict, note = out[-1]
        out[-1] = (title, verdict, f"{note}; send floor: {send_floor.floor_note(floor)}")
    return out


SHORT_LABELS = {
    "websockets": "websockets\nbroadcast()",
    "fastapi": "FastAPI\nConnectionManager",
    "tornado": "Tornado\nwrite_message",
    "picows": "picows 1 send/\ndelivery (ref.)",
    "notifier": "notifier\n(ephemeral)",
    "notifier-durable": "notifier\n(durable)",
}
GOALS = {"serial": 1.3, "burst": 5.0}


def plot(summary: dict, path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in summary if summary[n]]
    colors = {"websockets": "#4C72B0", "notifier": "#C44E52", "notifier-durable": "#DD8452",
              "picows": "#8C8C8C"}
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    panels = [("serial", "deliveries_per_s", "serial (1 message in flight): deliveries/s, higher is better"),
              ("burst", "deliveries_per_s", "burst (50 in flight): deliveries/s, higher is better"),
              ("serial", "p99_ms", "serial: p99 publish-to-receive, ms, lower is better"),
              ("burst", "p99_ms", "burst: p99 publish-to-receive, ms, lower is better")]
    for ax, (sc, key, title) in zip(axes.flat, panels):
        xs, ys, cs, ls = [], [], [], []
        for n in names:
            row = summary[n].get(sc)
            if row is None:
                continue
            xs.append(len(xs))
            ys.append(row[key])
            cs.append(colors.get(n, "#55A868"))
            ls.append(SHORT_LABELS.get(n, n))
        ax.bar(xs, ys, 0.65, color=cs)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:,.0f}" if key == "deliveries_per_s" else f"{y:.1f}", (x, y), ha="center",
                        va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        base = summary.get(BASELINE, {}).get(sc)
        if key == "deliveries_per_s" and base:
            goal = GOALS[sc] * base[key]
            ax.axhline(goal, color="#C44E52", linestyle="--", linewidth=1)
            ax.annotate(f"goal: {GOALS[sc]}x websockets", (len(xs) - 0.5, goal), ha="right", va="bottom",
                        fontsize=8, color="#C44E52")
            ax.set_ylim(0, max(ys + [goal]) * 1.12)
        else:
            ax.set_ylim(0, max(ys) * 1.12 if ys else 1)
        ax.set_xticks(xs)
        ax.set_xticklabels(ls, fontsize=7.5)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- main


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
        if result["others_cpu_pct"] <= args.max_others or attempt == args.retries:
            return result
        log(f"  other processes used {result['others_cpu_pct']:.0f}% CPU during the {what}: repeating it")
    raise AssertionError("unreachable: the last attempt returns")


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="fanout-"))
    results: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "source_ip_list"}}
    targets: list[Target] = []
    failures: dict[str, list[str]] = {}
    mem: list[dict] = []
    http: dict | None = None
    floor: dict | None = None
    try:
        await wait_quiet(args, exclude={os.getpid()})
        for name in args.servers:
            server = Server(name, workdir, args)
            try:
                targets.append(await setup_target(server, args))
            except Exception as exc:
                log(f"{name}: setup failed: {exc}")
                failures.setdefault(name, []).append(f"setup: {exc}")
                server.stop()
        scenarios = [("serial", args.messages_serial, 1), ("burst", args.messages_burst, args.window)]
        for rnd in range(args.rounds + 1):
            tag = "warm-up" if rnd == 0 else f"round {rnd}/{args.rounds}"
            for t in targets:
                if t.failures:
                    continue
                for scenario, messages, window in scenarios:
                    if rnd == 0:
                        messages = max(5, messages // 4)
                    for attempt in range(args.retries + 1):
                        try:
                            r = await run_round(t, scenario, messages, window, args.payload, args.stall_timeout)
                        except Exception as exc:
                            r = None
                            msg = f"{scenario} {tag}: {exc}"
                            if not t.server.alive():
                                msg += f"; server exited with {t.server.proc.returncode}; log tail:\n{t.server.tail()}"
                            log(f"{t.server.name}: FAILED {msg}")
                            t.failures.append(msg)
                            failures.setdefault(t.server.name, []).append(msg)
                            break
                        log(f"{t.server.name:17s} {scenario:6s} {tag:11s} {r['deliveries_per_s']:>10,.0f} deliveries/s "
                            f"p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms  server CPU {r['server_cpu_pct']:3.0f}% "
                            f"client CPU {r['client_cpu_pct']:3.0f}% (sys {r['client_sys_pct']:3.0f}%), "
                            f"other processes {r['others_cpu_pct']:.0f}%"
                            + (f"  PROBLEMS: {r['problems']}" if r["problems"] else ""))
                        r["disturbed"] = r["others_cpu_pct"] > args.max_others
                        if (not r["disturbed"] or rnd == 0 or attempt == args.retries
                                or time.monotonic() - started > args.retry_until):
                            break
                        log(f"  other processes used {r['others_cpu_pct']:.0f}% CPU during that round: "
                            f"waiting for quiet, then repeating it")
                        await wait_quiet(args, exclude=OUR_PIDS | {os.getpid()})
                    if r is None:
                        break
                    if r["problems"]:
                        failures.setdefault(t.server.name, []).extend(f"{scenario} {tag}: {p}" for p in r["problems"][:3])
                    if rnd > 0:
                        t.rounds[scenario].append(r)
        for t in targets:
            await close_all(t.subs, t.pub)
            if not t.server.alive():
                failures.setdefault(t.server.name, []).append(
                    f"server exited with {t.server.proc.returncode}:\n{t.server.tail()}")
            t.server.stop()

        if args.memory_connections > 0:
            for name in [BASELINE, "notifier"]:
                if name not in args.memory_servers:
                    continue
                try:
                    mem.append(await memory_test(name, workdir, args))
                except Exception as exc:
                    log(f"{name}: memory test failed: {exc}")
                    mem.append({"server": name, "error": str(exc)})
        if args.floor_rounds > 0:
            floor = await run_quietly(args, "send floor", lambda attempt: floor_test(args))
        if args.http_seconds > 0:
            http = await run_quietly(args, "HTTP publish test",
                                     lambda attempt: http_test(workdir, args, attempt))
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
    summary = summarize(targets)
    verdicts = goals(summary, mem, http, floor)
    version = git_version()
    total_s = time.monotonic() - started
    cmd = "python -m bench.fanout " + " ".join(sys.argv[1:])
    header = (f"{args.subscribers} subscribers, {args.payload}-byte data, serial: {args.messages_serial} "
              f"messages/round, burst: {args.messages_burst} messages/round with {args.window} in flight, "
              f"medians of {args.rounds} rounds; server on core {args.server_core}, load generator on core "
              f"{args.client_core}; {platform.python_implementation()} {platform.python_version()}, "
              f"{os.cpu_count()} cores; notifier at {version}; run took {total_s:.0f} s")
    md = [f"Command: `{cmd.strip()}`", "", header, "",
          f"Ratios in parentheses are to the `websockets` peer. Server CPU s is for one round "
          f"(the same work for every server).", "", fmt_table(summary)]
    if mem:
        md += ["", "Memory per idle connection (connected and subscribed, compression off):", "", fmt_memory(mem)]
    if floor:
        md += ["", "Send floor (bench/send_floor.py: one plain `send` per socket, no server):", "",
               send_floor.fmt_floor(floor)]
    if http:
        md += ["", f"HTTP `POST /api/publish` -> WebSocket receive (notifier, durable):", "", fmt_http(http)]
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
        plot(summary, Path(args.plot), caption)
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
    p.add_argument("--max-others", type=float, default=20.0,
                   help="a round during which other processes used more CPU %% than this is repeated")
    p.add_argument("--retries", type=int, default=2, help="repeats of a disturbed round")
    p.add_argument("--retry-until", type=float, default=360.0,
                   help="no more repeats of disturbed rounds after this many seconds into the run")
    p.add_argument("--quiet-timeout", type=float, default=20.0,
                   help="seconds to wait for other processes to calm down (at start and before a repeat)")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--source-ips", type=int, default=0,
                   help="spread client connections over 127.0.0.1..N (0: enough for the connection count)")
    p.add_argument("--notifier", default=str(ROOT / ".venv" / "bin" / "notifier"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--plot", default=str(ROOT / "bench" / "fanout.png"), help="'' to skip")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and stores")
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
    _raise_nofile()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.subscribers * len(args.servers), args.memory_connections + 100) + 200
    if soft < need:
        log(f"warning: open files limit {soft} < {need}; raise `ulimit -n` (hard limit) for this run")
    cores = os.sched_getaffinity(0)
    if {args.server_core, args.client_core} <= cores and args.server_core != args.client_core:
        os.sched_setaffinity(0, {args.client_core})
    else:
        log(f"warning: cannot pin server to core {args.server_core} and client to core {args.client_core} "
            f"(available: {sorted(cores)}); running unpinned")
        args.server_core = args.client_core = None
    # Enough source addresses that ephemeral ports never run short.
    lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    per_ip = max(1000, (hi - lo) // 2)
    n_ips = args.source_ips or max(1, math.ceil(max(args.memory_connections, args.subscribers) / per_ip))
    args.source_ip_list = [f"127.0.0.{i + 1}" for i in range(n_ips)]
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
    try:
        import uvloop  # noqa: F401
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    return runner(amain(args))


if __name__ == "__main__":
    sys.exit(main())

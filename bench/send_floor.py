"""Send floor: what one delivery costs on the server core with nothing else around it.

    .venv/bin/python -m bench.send_floor --subscribers 1000 --rounds 300 --server-core 0 --client-core 1

Every server in ``bench.fanout`` ends a delivery in one ``send`` on a
TCP_NODELAY socket; on loopback that call also runs the receiving side's TCP
work on the sender's core. So no server here can deliver one message to N
subscribers in less than N such calls, and this measures them alone: a child
process pinned to the server core (with the servers' own pinning helper)
accepts N loopback connections, sets TCP_NODELAY on each and then, round after
round, sends the same bytes to every socket in a plain
``for send in sends: send(data)`` loop on non-blocking sockets, timing each
round with ``perf_counter``. No event loop, framing or bookkeeping: a floor,
not a server. Rounds are 5 ms apart so that the reader can drain every socket
in between, as subscribers that are not behind do.

The reader is the calling process (on the client core): an asyncio loop that
drains every socket and checks that each got exactly what was sent.

Two sizes: a real notifier ``message`` frame (236 bytes for 100-byte ``data``,
what the HTTP test measures) and 2,000 bytes, about what one write carries
when nine messages are coalesced into it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from bench.common.clients import message_wire_size
from bench.common.run import ROOT, pin_load_generator, raise_nofile, run
from bench.common.servers import server_preexec
from bench.common.stats import percentile

BATCH_SIZE = 2000  # bytes: about nine 236-byte frames in one write


# --------------------------------------------------------------------------- the sender (child process)


def _sender(port_file: Any, n: int, sizes: list[int], rounds: int, warmup: int, pause: float) -> dict:
    """Accept `n` connections, then time rounds of one send per socket. Runs in
    the child pinned to the server core; returns what it measured."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(min(n, 4096))
    print(listener.getsockname()[1], file=port_file, flush=True)
    listener.settimeout(60)
    socks = []
    while len(socks) < n:
        s, _ = listener.accept()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as every WebSocket server here
        s.setblocking(False)
        socks.append(s)
    listener.close()
    sends = [s.send for s in socks]
    out = []
    gc.disable()
    for size in sizes:
        data = b"x" * size
        times = []
        sent = short = eagain = 0
        for r in range(warmup + rounds):
            t0 = time.perf_counter()
            for send in sends:
                try:
                    k = send(data)
                except BlockingIOError:
                    eagain += 1
                    continue
                sent += k
                if k != size:
                    short += 1
            t1 = time.perf_counter()
            if r >= warmup:
                times.append(t1 - t0)
            time.sleep(pause)
        out.append({"bytes": size, "times_s": times, "sent_bytes": sent, "short_sends": short,
                    "eagain_sends": eagain})
    gc.enable()
    # Closing sends what is still queued, then FIN: the reader sees EOF after the last byte.
    for s in socks:
        s.close()
    return {"pid": os.getpid(), "cpus": sorted(os.sched_getaffinity(0)), "sizes": out}


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--subscribers", type=int)
    p.add_argument("--sizes")
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--pause", type=float)
    a = p.parse_args(argv)
    result = _sender(sys.stdout, a.subscribers, [int(x) for x in a.sizes.split(",")], a.rounds, a.warmup,
                     a.pause)
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------- the reader (this process)


class _Drain(asyncio.BufferedProtocol):
    """Counts the bytes one connection receives, one Python call per read."""

    _buf = bytearray(256 * 1024)  # shared: callbacks run one at a time

    def __init__(self) -> None:
        self.nbytes = 0
        self.eof = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self.nbytes += nbytes

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        if not self.eof.done():
            self.eof.set_result(exc)


async def measure(subscribers: int, sizes: list[int], rounds: int, *, preexec: Callable[[], None] | None,
                  warmup: int = 10, pause: float = 0.005, source_ips: list[str] | None = None,
                  timeout: float = 120.0) -> dict:
    """Start the sender child (with `preexec`, e.g.
    bench.common.servers.server_preexec(core)), connect `subscribers` sockets to it from this
    process's loop, drain them while it sends, and return the figures."""
    loop = asyncio.get_running_loop()
    source_ips = source_ips or ["127.0.0.1"]
    argv = [sys.executable, "-m", "bench.send_floor", "--child", "--subscribers", str(subscribers),
            "--sizes", ",".join(map(str, sizes)), "--rounds", str(rounds), "--warmup", str(warmup),
            "--pause", str(pause)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=preexec, start_new_session=True)
    drains: list[_Drain] = []
    try:
        line = proc.stdout.readline()  # the port; the child prints it at once
        if not line.strip():
            raise RuntimeError(f"send floor child printed no port: {proc.communicate(timeout=10)[1][-2000:]!r}")
        port = int(line)
        sem = asyncio.Semaphore(100)

        async def one(i: int) -> None:
            async with sem:
                _, d = await loop.create_connection(_Drain, "127.0.0.1", port,
                                                    local_addr=(source_ips[i % len(source_ips)], 0))
                drains.append(d)

        await asyncio.gather(*(one(i) for i in range(subscribers)))
        out, err = await loop.run_in_executor(None, lambda: proc.communicate(timeout=timeout))
        if proc.returncode != 0:
            raise RuntimeError(f"send floor child exited with {proc.returncode}: {err[-2000:]!r}")
        child = json.loads(out.splitlines()[-1])
        # Wait for the last bytes and the EOFs.
        await asyncio.wait([d.eof for d in drains], timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for d in drains:
            if not d.eof.done():
                d.eof.cancel()
    problems = []
    sent = sum(s["sent_bytes"] for s in child["sizes"])
    each = sum(s["bytes"] for s in child["sizes"]) * (rounds + warmup)
    got = [d.nbytes for d in drains]
    if sum(got) != sent:
        problems.append(f"reader got {sum(got):,} bytes, sender sent {sent:,}")
    wrong = [g for g in got if g != each]
    if wrong:
        problems.append(f"{len(wrong)} of {len(got)} sockets did not get exactly {each:,} bytes "
                        f"(e.g. {wrong[0]:,})")
    rows = []
    for s in child["sizes"]:
        t = sorted(s["times_s"])
        median = statistics.median(t)
        rows.append({
            "bytes": s["bytes"],
            "round_ms_median": median * 1e3,
            "round_ms_p90": percentile(t, 90) * 1e3,
            "round_ms_min": t[0] * 1e3,
            "us_per_send": median / subscribers * 1e6,
            "short_sends": s["short_sends"],
            "eagain_sends": s["eagain_sends"],
        })
        if s["short_sends"] or s["eagain_sends"]:
            problems.append(f"{s['bytes']}-byte sends: {s['short_sends']} short, {s['eagain_sends']} EAGAIN "
                            f"(the reader fell behind: rounds with them are not pure sends)")
    return {
        "subscribers": subscribers,
        "rounds": rounds,
        "warmup_rounds": warmup,
        "pause_ms": pause * 1e3,
        "sender_cpus": child["cpus"],
        "reader_cpus": sorted(os.sched_getaffinity(0)),
        "received_bytes": sum(got),
        "expected_bytes": each * subscribers,
        "sizes": rows,
        "problems": problems,
    }


# --------------------------------------------------------------------------- report


def fmt_floor(f: dict | None) -> str:
    """The Markdown table (and one line on what it implies) for a `measure` result."""
    if not f:
        return ""
    if "error" in f:
        return f"Send floor FAILED: {f['error']}"
    n = f["subscribers"]
    lines = ["| bytes per send | sockets | rounds | round median ms | round p90 ms | µs per send (median / sockets) "
             "| short or EAGAIN sends |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in f["sizes"]:
        lines.append(f"| {r['bytes']:,} | {n:,} | {f['rounds']} | {r['round_ms_median']:.2f} | {r['round_ms_p90']:.2f} "
                     f"| {r['us_per_send']:.2f} | {r['short_sends'] + r['eagain_sends']} |")
    small = f["sizes"][0]
    lines += ["", f"One plain `send` per socket on TCP_NODELAY loopback sockets, sender pinned to core(s) "
                  f"{f['sender_cpus']}, reader (this process) on {f['reader_cpus']}, {f['pause_ms']:.0f} ms between "
                  f"rounds; the reader got {f['received_bytes']:,} of {f['expected_bytes']:,} bytes."]
    if len(f["sizes"]) > 1:
        big = f["sizes"][-1]
        lines.append(
            f"At 1,000 messages/s to {n:,} sockets, one round per message would take 1,000 x "
            f"{small['round_ms_median']:.2f} ms = {small['round_ms_median']:.2f} s of sends per second; one round "
            f"every 10 ms (about ten messages, ~{big['bytes']:,} bytes, per write) would take 100 x "
            f"{big['round_ms_median']:.2f} ms = {10 * big['round_ms_median']:.0f}% of the server core in sends "
            f"alone.")
    return "\n".join(lines)


def floor_note(f: dict | None) -> str:
    """For the HTTP goal's line: the least one round to every subscriber costs."""
    if not f or "sizes" not in f:
        return ""
    small = f["sizes"][0]
    note = (f"a round to {f['subscribers']:,} subscribers costs at least {f['subscribers']:,} x "
            f"{small['us_per_send']:.2f} µs = {small['round_ms_median']:.2f} ms on the server core "
            f"({small['bytes']}-byte sends")
    if len(f["sizes"]) > 1:
        big = f["sizes"][-1]
        note += f"; {big['round_ms_median']:.2f} ms with {big['bytes']:,}-byte sends"
    return note + ")"


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.send_floor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--subscribers", type=int, default=1000, help="sockets the sender writes to")
    p.add_argument("--rounds", type=int, default=300, help="timed rounds per size (after 10 untimed ones)")
    p.add_argument("--payload", type=int, default=100,
                   help="bytes of `data` in the notifier frame whose size the first round sends")
    p.add_argument("--batch-bytes", type=int, default=BATCH_SIZE, help="the second size; 0 to skip it")
    p.add_argument("--pause", type=float, default=0.005, help="seconds between rounds")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = p.parse_args(argv)
    raise_nofile()
    server_core: int | None = args.server_core
    if not pin_load_generator(args.server_core, args.client_core):
        server_core = None
    sizes = [message_wire_size(args.payload)] + ([args.batch_bytes] if args.batch_bytes > 0 else [])
    f = run(measure(args.subscribers, sizes, args.rounds, preexec=server_preexec(server_core),
                    pause=args.pause))
    print(fmt_floor(f))
    print()
    print(floor_note(f))
    if args.json:
        print(json.dumps(f, indent=1))
    for problem in f["problems"]:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if f["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())

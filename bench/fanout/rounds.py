"""Fan-out, serial and burst: one publisher and --subscribers subscribers per server, rounds interleaved across servers.

serial: at most one message in flight (publish, wait until every subscriber
has it and the ``published`` reply is in, publish the next); burst:
--window messages in flight. The table gives medians over --rounds rounds
after an unrecorded warm-up round; a round during which other processes used
more than --max-others % CPU is repeated.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.common.clients import close_all
from bench.common.proc import OUR_PIDS, wait_quiet
from bench.common.rounds import Target, run_round, setup_target
from bench.common.run import CLIENT_BOUND_PCT, log
from bench.common.servers import BASELINE, LIFTED_LIMITS, Server
from bench.common.stats import fmt_ratio, median


async def serial_and_burst(targets: list[Target], workdir: Path, args: argparse.Namespace, started: float,
                           failures: dict[str, list[str]]) -> None:
    """Set up every server of --servers (appended to `targets`, so that the
    caller can stop them whatever happens), run the warm-up and the rounds,
    close the connections and stop the servers."""
    for name in args.servers:
        server = Server(name, workdir, core=args.server_core, notifier=args.notifier, env=LIFTED_LIMITS)
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


# --------------------------------------------------------------------------- report


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
                "deliveries_per_s": median([r["deliveries_per_s"] for r in rounds]),
                "p50_ms": median([r["p50_ms"] for r in rounds]),
                "p99_ms": median([r["p99_ms"] for r in rounds]),
                "server_cpu_s": median([r["server_cpu_s"] for r in rounds]),
                "server_cpu_pct": median([r["server_cpu_pct"] for r in rounds]),
                "client_cpu_pct": median([r["client_cpu_pct"] for r in rounds]),
                "others_cpu_pct": median([r["others_cpu_pct"] for r in rounds]),
                "frames_per_read": median([r["frames_per_read"] for r in rounds]),
                "spread_deliveries_per_s": [min(r["deliveries_per_s"] for r in rounds),
                                            max(r["deliveries_per_s"] for r in rounds)],
                "problems": [p for r in rounds for p in r["problems"]][:5],
            }
    return out


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
                f"| {row['deliveries_per_s']:,.0f}{fmt_ratio(row['deliveries_per_s'], b.get('deliveries_per_s'))}{mark} "
                f"| {row['p50_ms']:.2f}{fmt_ratio(row['p50_ms'], b.get('p50_ms'))} "
                f"| {row['p99_ms']:.2f}{fmt_ratio(row['p99_ms'], b.get('p99_ms'))} "
                f"| {row['server_cpu_s']:.2f}{fmt_ratio(row['server_cpu_s'], b.get('server_cpu_s'))} "
                f"| {row['server_cpu_pct']:.0f} | {row['client_cpu_pct']:.0f} | {row['others_cpu_pct']:.0f} | {row['frames_per_read']:.1f} |")
    if flagged:
        lines += ["", f"\\* the load generator was at >= {CLIENT_BOUND_PCT}% CPU while the server was not: "
                      "the server may be faster than this figure."]
    return "\n".join(lines)


SHORT_LABELS = {
    "websockets": "websockets\nbroadcast()",
    "fastapi": "FastAPI\nConnectionManager",
    "tornado": "Tornado\nwrite_message",
    "picows": "picows 1 send/\ndelivery (ref.)",
    "notifier": "notifier\n(ephemeral)",
    "notifier-durable": "notifier\n(durable)",
}
GOALS = {"serial": 1.3, "burst": 5.0}


def goals(summary: dict) -> list[tuple[str, str, str]]:
    """Issue 4's serial and burst goals: (title, PASS/FAIL/n/a, note)."""
    out = []

    def rate(name, scenario):
        return summary.get(name, {}).get(scenario, {}).get("deliveries_per_s")

    for scenario, need in GOALS.items():
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
    return out


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

"""`make bench`: measure the relay on the local stack, write docs/benchmarks.{json,md,png}, print a summary.

    python -m benchmarks [--sizes 10,100,1000] [--idle-conversations 200] [--idle-hours 1]
                         [--latency-samples 16] [--seed-conversations 16] [--seed-window 30]
                         [--fanout-conversations 2000] [--fanout-hosts 1,2,4] [--only SECTION,...] [--out docs]

It starts what it needs (Azurite, the Direct Line emulator, the provider simulator, the local host)
on free loopback ports and stops them afterwards. Most of an hour on two cores (the fan-out section, seeding
6,000 conversations, about a quarter of it). `--only` measures
the sections named (ticks, idle, latency, inbound, cold_start, latency_cost, seed, fanout) and keeps the
others from OUT/benchmarks.json. Each section is saved there as soon as it is measured: after a failure,
`--only` the sections still missing finishes the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks import candidates, coldstart, fanout, hosted, polling, report, seed
from benchmarks.report import SECTIONS
from benchmarks.stack import local_stack
from devstack.procs import ROOT

# What the relay spent before the peek path (same benchmark, commit 57695bf): kept for comparison.
BEFORE = {
    "tick_1000": {"seconds": 21.74, "table_transactions_per_conversation": 6.041, "directline_requests": 1020},
    "idle": {"table_transactions_per_conversation_hour": 520.4, "directline_requests_per_conversation_hour": 88.19,
             "settled_table_transactions_per_conversation_tick": 0.515,
             "directline_requests_per_conversation_minute_peak": 1.45},
}

# What the relay spent before issue 19 (docs/benchmarks.json of the run of 2026-11-22, commit 396c3fa): the 5 s
# timer, 200 conversations idle for a simulated hour, late replies with the 2 s burst. Kept as the baseline.
BASELINE = {
    "run": "2026-11-22, commit 396c3fa",
    "idle": {"tick_seconds": 5.0, "conversations": 200, "table_transactions_per_conversation_hour": 10.445,
             "directline_requests_per_conversation_hour": 85.0, "fixed_table_transactions_per_tick": 1,
             "per_conversation_table_transactions_per_hour": 6.845,
             "directline_requests_per_conversation_minute_settled": 1.0},
    "late": {"p50": 2.417, "p95": 4.711},
    "prompt": {"p50": 0.150, "p95": 0.155},
}


def child_env() -> dict[str, str]:
    """Our environment without relay settings that would leak into the processes we start."""
    prefixes = ("DIRECTLINE_", "RELAY_", "TWILIO_", "WHATSAPP_", "MESSAGEBIRD_", "BIRD_", "GENERIC_", "WEBCHAT_",
                "AzureWebJobs")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, "PYTHONUNBUFFERED": "1"}


def run(args: argparse.Namespace, results: dict, checkpoint: Callable[[dict], None]) -> dict:
    """Measure the sections in `args.only` into `results` (the others stay as they are), passing `results` to
    `checkpoint` after each section: a run that fails late keeps what it measured."""
    env = child_env()
    started = dt.datetime.now(dt.UTC)
    results["meta"] = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.machine(),
                       "cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_average_before": os.getloadavg()[0], "sections": list(args.only)}
    results["before"], results["baseline"] = BEFORE, BASELINE
    logs = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    print(f"logs in {logs}", flush=True)
    wanted = [name for name in SECTIONS if name in args.only]
    step = iter(range(1, len(wanted) + 1))

    measuring = False

    def announce(name: str, what: str) -> bool:
        nonlocal measuring
        if name not in wanted:
            return False
        if measuring:  # the section before is complete
            checkpoint(results)
        print(f"{next(step)}/{len(wanted)} {what}", flush=True)
        measuring = True
        return True

    if set(wanted) - {"cold_start"}:
        with local_stack(logs, env) as stack:
            if announce("ticks", f"poll tick at {args.sizes}"):
                results["ticks"] = polling.tick_benchmark(stack, args.sizes)
            if announce("idle", f"idle: {args.idle_conversations} conversations, {args.idle_hours:g} simulated "
                                "hour(s)"):
                results["idle"] = polling.idle_benchmark(stack, conversations=args.idle_conversations,
                                                         hours=args.idle_hours)
            if announce("latency", "reply latency through the local host"):
                results["latency"] = hosted.latency_benchmark(stack, env, samples=args.latency_samples)
            if announce("inbound", "inbound webhooks"):
                results["inbound"] = hosted.inbound_benchmark(stack, env)
                results["webhook_cost"] = hosted.webhook_cost(stack, burst=0)
                results["webhook_cost_burst"] = hosted.webhook_cost(stack, count=10, burst=2)
            if announce("latency_cost", "late replies: latency against cost, for each timer schedule"):
                results["latency_cost"] = candidates.latency_cost_benchmark(
                    stack, env, samples=args.latency_samples, idle_conversations=args.idle_conversations,
                    idle_hours=args.idle_hours)
            if announce("seed", "the seed's design: a thread per conversation"):
                results["seed"] = seed.seed_benchmark(stack, conversations=args.seed_conversations,
                                                      window_seconds=args.seed_window)
            if announce("fanout", f"fan-out: {args.fanout_conversations:,} due conversations on "
                                  f"{', '.join(map(str, args.fanout_hosts))} worker host(s)"):
                results["fanout"] = fanout.fanout_benchmark(stack, env, conversations=args.fanout_conversations,
                                                            hosts=args.fanout_hosts)
    if announce("cold_start", "cold start"):
        results["cold_start"] = coldstart.cold_start_benchmark(env)
    checkpoint(results)
    if "fanout" in results:
        results["fanout"]["capacity"] = report.capacity_model(results["fanout"])
    default: dict = next((c for c in results.get("latency_cost", []) if c["default"]), {})
    results["cost"] = report.cost_model(results, chase=default.get("chase"))
    for candidate in results.get("latency_cost", []):
        candidate["cost"] = report.cost_model(results, candidate["idle"], candidate.get("chase"))
    results["meta"]["seconds"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
    results["meta"]["load_average_after"] = os.getloadavg()[0]
    return results


def save_measured(results: dict, *, path: Path) -> None:
    """What is measured so far, where --only finds it: after a failure, measure only the sections missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def write(results: dict, out: Path) -> None:
    save_measured(results, path=out / "benchmarks.json")
    report.chart(results, out / "benchmarks.png")
    if "latency_cost" in results:
        report.latency_cost_chart(results, out / report.LATENCY_COST_CHART)
    if "fanout" in results:
        report.fanout_chart(results, out / report.FANOUT_CHART)
    (out / "benchmarks.md").write_text(report.markdown(results, "benchmarks.png"))


def sections(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown) or '(none)'}: choose from "
                                         f"{', '.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[10, 100, 1000])
    parser.add_argument("--idle-conversations", type=int, default=200)
    parser.add_argument("--idle-hours", type=float, default=1.0)
    parser.add_argument("--latency-samples", type=int, default=16)
    parser.add_argument("--seed-conversations", type=int, default=16)
    parser.add_argument("--seed-window", type=float, default=30.0, help="seconds the seed's GETs are counted")
    parser.add_argument("--fanout-conversations", type=int, default=2000)
    parser.add_argument("--fanout-hosts", type=lambda v: tuple(int(x) for x in v.split(",")), default=(1, 2, 4))
    parser.add_argument("--only", type=sections, default=SECTIONS,
                        help=f"comma-separated sections to measure ({','.join(SECTIONS)}); the others are kept "
                             "from OUT/benchmarks.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs from OUT/benchmarks.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    previous = args.out / "benchmarks.json"
    partial = set(args.only) != set(SECTIONS)
    if (args.render_only or partial) and not previous.exists():
        parser.error(f"{previous} is missing: run every section first (without --only or --render-only)")
    results = json.loads(previous.read_text()) if args.render_only or partial else {}
    if not args.render_only:
        results = run(args, results, checkpoint=functools.partial(save_measured, path=previous))
    write(results, args.out)
    print(report.summary(results))
    print(f"wrote {args.out / 'benchmarks.md'}, benchmarks.json and benchmarks.png "
          f"({results['meta'].get('seconds', 0):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

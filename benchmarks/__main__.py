"""`make bench`: measure the relay on the local stack, write docs/benchmarks.{json,md,png}, print a summary.

    python -m benchmarks [--sizes 10,100,1000] [--idle-conversations 200] [--idle-hours 1]
                         [--latency-samples 16] [--out docs]

It starts what it needs (Azurite, the Direct Line emulator, the provider simulator, the local host)
on free loopback ports and stops them afterwards. A few minutes on two cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks import coldstart, hosted, polling, report
from benchmarks.stack import local_stack
from devstack.procs import ROOT

# What the relay spent before the peek path (same benchmark, commit 57695bf): kept for comparison.
BEFORE = {
    "tick_1000": {"seconds": 21.74, "table_transactions_per_conversation": 6.041, "directline_requests": 1020},
    "idle": {"table_transactions_per_conversation_hour": 520.4, "directline_requests_per_conversation_hour": 88.19,
             "settled_table_transactions_per_conversation_tick": 0.515,
             "directline_requests_per_conversation_minute_peak": 1.45},
}


def child_env() -> dict[str, str]:
    """Our environment without relay settings that would leak into the processes we start."""
    prefixes = ("DIRECTLINE_", "RELAY_", "TWILIO_", "WHATSAPP_", "MESSAGEBIRD_", "BIRD_", "GENERIC_", "WEBCHAT_",
                "AzureWebJobs")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, "PYTHONUNBUFFERED": "1"}


def run(args: argparse.Namespace) -> dict:
    env = child_env()
    started = dt.datetime.now(dt.UTC)
    results: dict = {"meta": {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.machine(),
                              "cpus": os.cpu_count(), "python": platform.python_version(),
                              "load_average_before": os.getloadavg()[0]},
                     "before": BEFORE}
    logs = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    print(f"logs in {logs}", flush=True)
    with local_stack(logs, env) as stack:
        print("1/5 poll tick at", args.sizes, flush=True)
        results["ticks"] = polling.tick_benchmark(stack, args.sizes)
        print(f"2/5 idle: {args.idle_conversations} conversations, {args.idle_hours:g} simulated hour(s)", flush=True)
        results["idle"] = polling.idle_benchmark(stack, conversations=args.idle_conversations, hours=args.idle_hours)
        print("3/5 reply latency through the local host", flush=True)
        results["latency"] = hosted.latency_benchmark(stack, env, samples=args.latency_samples)
        print("4/5 inbound webhooks", flush=True)
        results["inbound"] = hosted.inbound_benchmark(stack, env)
        results["webhook_cost"] = hosted.webhook_cost(stack, burst=0)
        results["webhook_cost_burst"] = hosted.webhook_cost(stack, count=10, burst=2)
    print("5/5 cold start", flush=True)
    results["cold_start"] = coldstart.cold_start_benchmark(env)
    results["cost"] = report.cost_model(results)
    results["meta"]["seconds"] = (dt.datetime.now(dt.UTC) - started).total_seconds()
    results["meta"]["load_average_after"] = os.getloadavg()[0]
    return results


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    report.chart(results, out / "benchmarks.png")
    (out / "benchmarks.md").write_text(report.markdown(results, "benchmarks.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[10, 100, 1000])
    parser.add_argument("--idle-conversations", type=int, default=200)
    parser.add_argument("--idle-hours", type=float, default=1.0)
    parser.add_argument("--latency-samples", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--render-only", action="store_true", help="rewrite the docs from OUT/benchmarks.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    results = json.loads((args.out / "benchmarks.json").read_text()) if args.render_only else run(args)
    write(results, args.out)
    print(report.summary(results))
    print(f"wrote {args.out / 'benchmarks.md'}, benchmarks.json and benchmarks.png "
          f"({results['meta'].get('seconds', 0):.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
